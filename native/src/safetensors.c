/* safetensors: a validating reader and a writer.

   Layout: u64 little-endian header length N, N bytes of JSON, then the data.
   Every field is checked when the file is opened, so reads after a successful open
   can't go out of bounds. The data is read with pread (not mmap): a file truncated by
   someone else after opening gives an I/O error, not SIGBUS. */
#include "files.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader assumes a little-endian host"
#endif

#define ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000)

/* The dtypes of the safetensors format. size 0: sub-byte types we can't size here. */
typedef struct st_dtype {
  const char *name;
  uint32_t size;
  int32_t lmoe; /* lmoe_dtype it converts through, -1 if none */
} st_dtype;

static const st_dtype st_dtypes[] = {
    {"BOOL", 1, -1},    {"U8", 1, -1},      {"I8", 1, -1},      {"F8_E4M3", 1, LMOE_DTYPE_F8_E4M3},
    {"F8_E5M2", 1, -1}, {"F8_E8M0", 1, -1}, {"I16", 2, -1},     {"U16", 2, -1},
    {"F16", 2, LMOE_DTYPE_F16},            {"BF16", 2, LMOE_DTYPE_BF16},
    {"I32", 4, LMOE_DTYPE_I32},            {"U32", 4, -1},
    {"F32", 4, LMOE_DTYPE_F32},            {"I64", 8, -1},      {"U64", 8, -1},
    {"F64", 8, LMOE_DTYPE_F64},            {"C64", 8, -1},      {"F4", 0, -1},
    {"F6_E2M3", 0, -1}, {"F6_E3M2", 0, -1},
};

static const st_dtype *find_dtype(const char *name) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (!strcmp(st_dtypes[i].name, name)) return &st_dtypes[i];
  return NULL;
}

static const char *file_dtype_name(int32_t lmoe) {
  switch (lmoe) {
  case LMOE_DTYPE_BF16: return "BF16";
  case LMOE_DTYPE_F16: return "F16";
  case LMOE_DTYPE_F32: return "F32";
  case LMOE_DTYPE_F64: return "F64";
  case LMOE_DTYPE_I32: return "I32";
  case LMOE_DTYPE_F8_E4M3: return "F8_E4M3";
  default: return NULL;
  }
}

typedef struct st_tensor {
  char *name;
  const st_dtype *dt;
  int32_t ndim;
  int64_t shape[LMOE_TENSOR_MAX_DIMS];
  int64_t numel;
  uint64_t begin, end; /* relative to the data start */
} st_tensor;

struct lmoe_safetensors {
  lmoe_object obj;
  lmoe_context *ctx;
  char *path;       /* as given */
  int fd;           /* -1 when reading from memory */
  uint8_t *mem;     /* the whole file, when opened from memory */
  uint64_t size;    /* of the file */
  uint64_t data0;   /* 8 + N */
  int32_t n;
  st_tensor *t;     /* in data order */
  int32_t *by_name; /* indices of t sorted by name */
  int32_t n_meta;
  char **meta_key, **meta_val;
};

/* Messages name files as the caller gave them. */
const char *lmoe_short_path(const char *path) { return path ? path : "(null)"; }

char *lmoe_path_join(const char *dir, const char *file) {
  size_t n = strlen(dir) + strlen(file) + 2;
  char *o = malloc(n);
  if (o) snprintf(o, n, "%s%s%s", dir, *dir && dir[strlen(dir) - 1] != '/' ? "/" : "", file);
  return o;
}

const char *lmoe_st_display_name(const lmoe_safetensors *st) { return lmoe_short_path(st->path); }
lmoe_context *lmoe_st_context(const lmoe_safetensors *st) { return st->ctx; }

static bool valid_st(const lmoe_safetensors *st) {
  return lmoe_object_is(st, LMOE_MAGIC_SAFETENSORS);
}

static lmoe_status st_pread(lmoe_safetensors *st, uint64_t off, void *dst, size_t n) {
  if (st->fd < 0) {
    memcpy(dst, st->mem + off, n); /* bounds were checked at open */
    return LMOE_OK;
  }
  uint8_t *d = dst;
  while (n > 0) {
    ssize_t got = pread(st->fd, d, n, (off_t)off);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      return lmoe_fail(st->ctx, LMOE_ERR_IO, "%s: read failed at byte %llu: %s",
                       lmoe_st_display_name(st), (unsigned long long)off,
                       got < 0 ? strerror(errno) : "the file got shorter after it was opened");
    d += got;
    n -= (size_t)got;
    off += (uint64_t)got;
  }
  return LMOE_OK;
}

static void st_free(lmoe_safetensors *st) {
  if (!st) return;
  if (st->fd >= 0) close(st->fd);
  free(st->mem);
  for (int32_t i = 0; i < st->n; i++) free(st->t[i].name);
  free(st->t);
  free(st->by_name);
  for (int32_t i = 0; i < st->n_meta; i++) {
    free(st->meta_key[i]);
    free(st->meta_val[i]);
  }
  free(st->meta_key);
  free(st->meta_val);
  if (st->ctx) lmoe_context_release(st->ctx);
  free(st->path);
  st->obj.magic = 0;
  free(st);
}

/* A JSON number that is a non-negative integer up to 2^53 (exact in a double). */
static bool json_uint(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return false;
  double d = v->valuedouble;
  if (!(d >= 0) || d > 9007199254740992.0 || d != floor(d)) return false;
  *out = (uint64_t)d;
  return true;
}

typedef struct name_ref {
  const char *name;
  int32_t index;
} name_ref;
static int cmp_name(const void *a, const void *b) {
  return strcmp(((const name_ref *)a)->name, ((const name_ref *)b)->name);
}
static int cmp_begin(const void *a, const void *b) {
  const st_tensor *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  return x->end < y->end ? -1 : x->end > y->end;
}

/* Fills st->by_name with tensor indices in name order. */
static bool sort_names(lmoe_safetensors *st) {
  name_ref *r = malloc(((size_t)st->n + 1) * sizeof *r);
  if (!r) return false;
  for (int32_t i = 0; i < st->n; i++) r[i] = (name_ref){st->t[i].name, i};
  qsort(r, (size_t)st->n, sizeof *r, cmp_name);
  for (int32_t i = 0; i < st->n; i++) st->by_name[i] = r[i].index;
  free(r);
  return true;
}

static lmoe_status parse_tensor(lmoe_safetensors *st, const cJSON *item, st_tensor *t) {
  lmoe_context *ctx = st->ctx;
  const char *fn = lmoe_st_display_name(st), *name = item->string;
  if (!cJSON_IsObject(item))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object", fn, name);
  const cJSON *dtype = NULL, *shape = NULL, *offs = NULL;
  for (const cJSON *f = item->child; f; f = f->next) {
    const cJSON **slot = !strcmp(f->string, "dtype")          ? &dtype
                         : !strcmp(f->string, "shape")        ? &shape
                         : !strcmp(f->string, "data_offsets") ? &offs
                                                              : NULL;
    if (!slot)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': unknown field '%s'", fn, name, f->string);
    if (*slot)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': duplicate field '%s'", fn, name, f->string);
    *slot = f;
  }
  if (!cJSON_IsString(dtype))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': dtype is %s", fn, name,
                     dtype ? "not a string" : "missing");
  t->dt = find_dtype(dtype->valuestring);
  if (!t->dt)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%.32s'", fn, name,
                     dtype->valuestring);
  if (t->dt->size == 0)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s': dtype %s is not supported", fn,
                     name, t->dt->name);
  if (!cJSON_IsArray(shape))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': shape is %s", fn, name,
                     shape ? "not an array" : "missing");
  int nd = cJSON_GetArraySize(shape);
  if (nd > LMOE_TENSOR_MAX_DIMS)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s': %d dimensions (at most %d)", fn,
                     name, nd, LMOE_TENSOR_MAX_DIMS);
  t->ndim = nd;
  uint64_t numel = 1;
  int d = 0;
  for (const cJSON *v = shape->child; v; v = v->next, d++) {
    uint64_t x;
    if (!json_uint(v, &x) || x > (uint64_t)INT64_MAX)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                       "%s: tensor '%s': shape[%d] is not a non-negative integer", fn, name, d);
    t->shape[d] = (int64_t)x;
    if (__builtin_mul_overflow(numel, x, &numel) || numel > (uint64_t)INT64_MAX)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': element count overflows", fn, name);
  }
  t->numel = (int64_t)numel;
  if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': data_offsets is %s", fn, name,
                     offs ? "not an array of two integers" : "missing");
  if (!json_uint(offs->child, &t->begin) || !json_uint(offs->child->next, &t->end))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets are not non-negative integers", fn, name);
  if (t->end < t->begin)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu) end before they begin",
                     fn, name, (unsigned long long)t->begin, (unsigned long long)t->end);
  uint64_t need;
  if (__builtin_mul_overflow(numel, (uint64_t)t->dt->size, &need))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s': byte size overflows", fn, name);
  if (need != t->end - t->begin)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets [%llu, %llu) hold %llu bytes, but its shape "
                     "and dtype %s need %llu",
                     fn, name, (unsigned long long)t->begin, (unsigned long long)t->end,
                     (unsigned long long)(t->end - t->begin), t->dt->name, (unsigned long long)need);
  uint64_t data_size = st->size - st->data0;
  if (t->end > data_size)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets [%llu, %llu) go past the end of the data "
                     "(%llu bytes): the file is truncated",
                     fn, name, (unsigned long long)t->begin, (unsigned long long)t->end,
                     (unsigned long long)data_size);
  t->name = strdup(name);
  if (!t->name) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  return LMOE_OK;
}

static lmoe_status parse_metadata(lmoe_safetensors *st, const cJSON *item) {
  lmoe_context *ctx = st->ctx;
  const char *fn = lmoe_st_display_name(st);
  if (!cJSON_IsObject(item))
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: __metadata__ is not a JSON object", fn);
  int n = cJSON_GetArraySize(item);
  st->meta_key = calloc((size_t)n + 1, sizeof(char *));
  st->meta_val = calloc((size_t)n + 1, sizeof(char *));
  if (!st->meta_key || !st->meta_val) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (const cJSON *m = item->child; m; m = m->next) {
    if (!cJSON_IsString(m))
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: __metadata__ '%s' is not a string", fn, m->string);
    for (int32_t j = 0; j < st->n_meta; j++)
      if (!strcmp(st->meta_key[j], m->string))
        return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: __metadata__ has key '%s' twice", fn, m->string);
    st->meta_key[st->n_meta] = strdup(m->string);
    st->meta_val[st->n_meta] = strdup(m->valuestring);
    st->n_meta++;
    if (!st->meta_key[st->n_meta - 1] || !st->meta_val[st->n_meta - 1])
      return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  return LMOE_OK;
}

/* Parses and validates the header; st->size and st->data0 are set, header holds N bytes. */
static lmoe_status parse_header(lmoe_safetensors *st, const char *header, size_t n) {
  lmoe_context *ctx = st->ctx;
  const char *fn = lmoe_st_display_name(st);
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(header, n, &end, 0);
  if (!root) {
    const char *at = end; /* cJSON sets it to the error position */
    size_t pos = at && at >= header && at <= header + n ? (size_t)(at - header) : 0;
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header is not valid JSON (near byte %zu of %zu)",
                     fn, pos, n);
  }
  lmoe_status st_ = LMOE_OK;
  /* What follows the JSON value must be padding: spaces (or NULs some writers leave). */
  for (const char *p = end; p && p < header + n; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
      st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header has bytes after its JSON object", fn);
      goto done;
    }
  if (!cJSON_IsObject(root)) {
    st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header is not a JSON object", fn);
    goto done;
  }
  int count = cJSON_GetArraySize(root);
  st->t = calloc((size_t)count + 1, sizeof *st->t);
  st->by_name = calloc((size_t)count + 1, sizeof *st->by_name);
  if (!st->t || !st->by_name) {
    st_ = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  bool seen_meta = false;
  for (const cJSON *item = root->child; item; item = item->next) {
    if (!strcmp(item->string, "__metadata__")) {
      if (seen_meta) {
        st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header has __metadata__ twice", fn);
        goto done;
      }
      seen_meta = true;
      if ((st_ = parse_metadata(st, item))) goto done;
      continue;
    }
    if ((st_ = parse_tensor(st, item, &st->t[st->n]))) goto done;
    st->n++;
  }
  /* Duplicates (cJSON keeps them silently), through a sort by name. */
  if (!sort_names(st)) {
    st_ = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  for (int32_t i = 1; i < st->n; i++)
    if (!strcmp(st->t[st->by_name[i]].name, st->t[st->by_name[i - 1]].name)) {
      st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", fn,
                      st->t[st->by_name[i]].name);
      goto done;
    }
  /* Data order, then contiguity: each tensor starts where the previous ends and the
     last ends at the end of the file (no holes, no overlaps, no trailing bytes). */
  qsort(st->t, (size_t)st->n, sizeof *st->t, cmp_begin);
  uint64_t at = 0;
  for (int32_t i = 0; i < st->n; i++) {
    const st_tensor *t = &st->t[i];
    if (t->begin != at) {
      st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                      "%s: tensor '%s': data_offsets [%llu, %llu) %s the previous tensor's end (%llu)",
                      fn, t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                      t->begin < at ? "overlap" : "leave a hole after", (unsigned long long)at);
      goto done;
    }
    at = t->end;
  }
  if (at != st->size - st->data0) {
    st_ = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                    "%s: the tensors cover %llu bytes of data but the file has %llu after the header",
                    fn, (unsigned long long)at, (unsigned long long)(st->size - st->data0));
    goto done;
  }
  /* Name order again, now over the data-ordered array. */
  if (!sort_names(st)) st_ = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
done:
  cJSON_Delete(root);
  return st_;
}

static void st_destroy(lmoe_object *obj) { st_free((lmoe_safetensors *)obj); }

static lmoe_status st_create(lmoe_context *ctx, const char *path, lmoe_safetensors **out) {
  lmoe_safetensors *st = calloc(1, sizeof *st);
  if (!st) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&st->obj, LMOE_MAGIC_SAFETENSORS, st_destroy);
  st->fd = -1;
  st->path = strdup(path ? path : "(memory)");
  lmoe_context_retain(ctx);
  st->ctx = ctx;
  if (!st->path) {
    st_free(st);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  *out = st;
  return LMOE_OK;
}

/* After fd or mem and size are set: reads and parses the header. */
static lmoe_status st_load_header(lmoe_safetensors *st) {
  lmoe_context *ctx = st->ctx;
  const char *fn = lmoe_st_display_name(st);
  if (st->size < 8)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: the file has %llu bytes, too few for the 8-byte header length", fn,
                     (unsigned long long)st->size);
  uint8_t lenb[8];
  lmoe_status s = st_pread(st, 0, lenb, 8);
  if (s) return s;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | lenb[i];
  if (n > ST_HEADER_MAX)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header length %llu is over the limit of %llu bytes",
                     fn, (unsigned long long)n, (unsigned long long)ST_HEADER_MAX);
  if (n > st->size - 8)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: the header length %llu is more than the %llu bytes that follow it: the "
                     "file is truncated or not safetensors",
                     fn, (unsigned long long)n, (unsigned long long)(st->size - 8));
  if (n < 2)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: the header length %llu is too small for a JSON object",
                     fn, (unsigned long long)n);
  st->data0 = 8 + n;
  char *header = malloc((size_t)n + 1);
  if (!header) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  s = st_pread(st, 8, header, (size_t)n);
  if (!s) {
    header[n] = 0;
    s = parse_header(st, header, (size_t)n);
  }
  free(header);
  return s;
}

lmoe_status lmoe_safetensors_open(lmoe_context *ctx, const char *path, lmoe_safetensors **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!path) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "path is NULL");
  lmoe_safetensors *st;
  lmoe_status s = st_create(ctx, path, &st);
  if (s) return s;
  st->fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat sb;
  if (st->fd < 0 || fstat(st->fd, &sb) != 0) {
    int e = errno;
    s = lmoe_fail(ctx, e == ENOENT ? LMOE_ERR_NOT_FOUND : LMOE_ERR_IO, "%s: cannot open: %s",
                  lmoe_short_path(path), strerror(e));
  } else if (!S_ISREG(sb.st_mode)) {
    s = lmoe_fail(ctx, LMOE_ERR_IO, "%s: not a regular file", lmoe_short_path(path));
  } else {
    st->size = (uint64_t)sb.st_size;
    s = st_load_header(st);
  }
  if (s) {
    st_free(st);
    return s;
  }
  *out = st;
  return LMOE_OK;
}

lmoe_status lmoe_safetensors_open_memory(lmoe_context *ctx, const void *data, size_t size,
                                         const char *name, lmoe_safetensors **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!data && size) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "data is NULL");
  lmoe_safetensors *st;
  lmoe_status s = st_create(ctx, name ? name : "(memory)", &st);
  if (s) return s;
  st->mem = malloc(size ? size : 1);
  if (!st->mem) {
    st_free(st);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  if (size) memcpy(st->mem, data, size);
  st->size = size;
  s = st_load_header(st);
  if (s) {
    st_free(st);
    return s;
  }
  *out = st;
  return LMOE_OK;
}

void lmoe_safetensors_close(lmoe_safetensors *st) {
  if (valid_st(st)) lmoe_object_release(&st->obj);
}

int32_t lmoe_safetensors_count(const lmoe_safetensors *st) { return valid_st(st) ? st->n : 0; }

lmoe_status lmoe_safetensors_tensor(const lmoe_safetensors *st, int32_t index, lmoe_tensor_info *out) {
  if (!valid_st(st) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  if (index < 0 || index >= st->n)
    return lmoe_fail(st->ctx, LMOE_ERR_INVALID_ARGUMENT, "%s: tensor index %d is out of range (0..%d)",
                     lmoe_st_display_name(st), (int)index, (int)st->n - 1);
  const st_tensor *t = &st->t[index];
  memset(out, 0, sizeof *out);
  out->name = t->name;
  out->dtype_name = t->dt->name;
  out->dtype = t->dt->lmoe;
  out->ndim = t->ndim;
  memcpy(out->shape, t->shape, sizeof t->shape);
  out->numel = t->numel;
  out->offset = st->data0 + t->begin;
  out->bytes = t->end - t->begin;
  return LMOE_OK;
}

lmoe_status lmoe_safetensors_find(const lmoe_safetensors *st, const char *name, int32_t *index) {
  if (!valid_st(st) || !name) return LMOE_ERR_INVALID_ARGUMENT;
  int32_t lo = 0, hi = st->n;
  while (lo < hi) {
    int32_t mid = lo + (hi - lo) / 2;
    int c = strcmp(st->t[st->by_name[mid]].name, name);
    if (c == 0) {
      if (index) *index = st->by_name[mid];
      return LMOE_OK;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return LMOE_ERR_NOT_FOUND;
}

lmoe_status lmoe_safetensors_read(lmoe_safetensors *st, int32_t index, void *dst, int32_t dst_dtype,
                                  int64_t count) {
  if (!valid_st(st)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = st->ctx;
  lmoe_clear_error(ctx);
  const char *fn = lmoe_st_display_name(st);
  if (index < 0 || index >= st->n)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s: tensor index %d is out of range (0..%d)", fn,
                     (int)index, (int)st->n - 1);
  const st_tensor *t = &st->t[index];
  if (dst_dtype != LMOE_DTYPE_BF16 && dst_dtype != LMOE_DTYPE_F16 && dst_dtype != LMOE_DTYPE_F32 &&
      dst_dtype != LMOE_DTYPE_F64 && !(dst_dtype == LMOE_DTYPE_I32 && t->dt->lmoe == LMOE_DTYPE_I32) &&
      !(dst_dtype == LMOE_DTYPE_F8_E4M3 && t->dt->lmoe == LMOE_DTYPE_F8_E4M3))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s: tensor '%s': can't read into dtype %s", fn,
                     t->name, lmoe_dtype_name(dst_dtype));
  if (t->dt->lmoe < 0)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "%s: tensor '%s': %s is not supported (BF16, F16, F32, F64, I32, F8_E4M3 are)", fn, t->name,
                     t->dt->name);
  if (count != t->numel)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s: tensor '%s' has %lld elements, not %lld", fn,
                     t->name, (long long)t->numel, (long long)count);
  if (!dst && count) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "dst is NULL");
  return lmoe_st_read_range(st, index, 0, count, dst, dst_dtype);
}

lmoe_status lmoe_st_read_range(lmoe_safetensors *st, int32_t index, int64_t first, int64_t count, void *dst,
                               int32_t dst_dtype) {
  const st_tensor *t = &st->t[index];
  uint64_t off = st->data0 + t->begin + (uint64_t)first * t->dt->size;
  size_t es = t->dt->size;
  if (t->dt->lmoe == dst_dtype) return st_pread(st, off, dst, (size_t)count * es);
  /* Convert in chunks through a bounded buffer. */
  enum { CHUNK = 1 << 16 };
  uint8_t *tmp = malloc(CHUNK * 8);
  if (!tmp) return lmoe_fail(st->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  size_t ds = lmoe_dtype_size(dst_dtype);
  lmoe_status s = LMOE_OK;
  for (int64_t i = 0; i < count && !s; i += CHUNK) {
    int64_t m = count - i < CHUNK ? count - i : CHUNK;
    s = st_pread(st, off + (uint64_t)i * es, tmp, (size_t)m * es);
    if (!s) lmoe_convert((uint8_t *)dst + (size_t)i * ds, dst_dtype, tmp, t->dt->lmoe, m);
  }
  free(tmp);
  return s;
}

int32_t lmoe_safetensors_metadata_count(const lmoe_safetensors *st) {
  return valid_st(st) ? st->n_meta : 0;
}

lmoe_status lmoe_safetensors_metadata(const lmoe_safetensors *st, int32_t index, const char **key,
                                      const char **value) {
  if (!valid_st(st)) return LMOE_ERR_INVALID_ARGUMENT;
  if (index < 0 || index >= st->n_meta)
    return lmoe_fail(st->ctx, LMOE_ERR_INVALID_ARGUMENT, "metadata index %d is out of range", (int)index);
  if (key) *key = st->meta_key[index];
  if (value) *value = st->meta_val[index];
  return LMOE_OK;
}

lmoe_status lmoe_st_read_f32(lmoe_safetensors *st, const char *name, int32_t ndim,
                             const int64_t *shape, float *dst) {
  lmoe_context *ctx = st->ctx;
  int32_t idx;
  if (lmoe_safetensors_find(st, name, &idx) != LMOE_OK)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", lmoe_st_display_name(st), name);
  const st_tensor *t = &st->t[idx];
  bool same = t->ndim == ndim;
  for (int32_t d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
  if (!same) {
    char got[160] = "[", want[160] = "[";
    for (int32_t d = 0; d < t->ndim; d++)
      snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    for (int32_t d = 0; d < ndim; d++)
      snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? ", " : "", (long long)shape[d]);
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' has shape %s]; expected %s]",
                     lmoe_st_display_name(st), name, got, want);
  }
  return lmoe_safetensors_read(st, idx, dst, LMOE_DTYPE_F32, t->numel);
}

lmoe_status lmoe_read_text_file(lmoe_context *ctx, const char *path, size_t limit, char **out,
                                size_t *len) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    int e = errno;
    return lmoe_fail(ctx, e == ENOENT ? LMOE_ERR_NOT_FOUND : LMOE_ERR_IO, "%s: cannot open: %s",
                     lmoe_short_path(path), strerror(e));
  }
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap + 1);
  lmoe_status s = LMOE_OK;
  while (buf) {
    if (n == cap) {
      if (cap >= limit) {
        s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: larger than %zu bytes", lmoe_short_path(path), limit);
        break;
      }
      cap *= 2;
      char *nb = realloc(buf, cap + 1);
      if (!nb) break;
      buf = nb;
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    n += got;
    if (got == 0) {
      if (ferror(f)) s = lmoe_fail(ctx, LMOE_ERR_IO, "%s: read failed", lmoe_short_path(path));
      break;
    }
  }
  fclose(f);
  if (!buf && !s) s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (s) {
    free(buf);
    return s;
  }
  if (!buf) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  buf[n] = 0;
  *out = buf;
  if (len) *len = n;
  return LMOE_OK;
}

/* ------------------------------------------------------------------ writer */

lmoe_status lmoe_safetensors_write(lmoe_context *ctx, const char *path, int32_t n,
                                   const lmoe_tensor_entry *tensors, int32_t n_meta,
                                   const char *const *meta_keys, const char *const *meta_values) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!path) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "path is NULL");
  if (n < 0 || (n > 0 && !tensors))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensors are NULL or their count is negative");
  if (n_meta < 0 || (n_meta > 0 && (!meta_keys || !meta_values)))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "metadata arrays are NULL or their count is negative");
  const char *fn = lmoe_short_path(path);
  cJSON *root = cJSON_CreateObject();
  uint64_t *bytes = calloc((size_t)n + 1, sizeof *bytes);
  lmoe_status s = LMOE_OK;
  char *json = NULL;
  FILE *f = NULL;
  char *tmp = NULL;
  if (!root || !bytes) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  if (n_meta > 0) {
    cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
    for (int32_t i = 0; m && i < n_meta; i++) {
      if (!meta_keys[i] || !meta_values[i]) {
        s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "metadata entry %d is NULL", (int)i);
        goto done;
      }
      if (cJSON_GetObjectItemCaseSensitive(m, meta_keys[i])) {
        s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "metadata key '%s' is given twice", meta_keys[i]);
        goto done;
      }
      cJSON_AddStringToObject(m, meta_keys[i], meta_values[i]);
    }
  }
  uint64_t at = 0;
  for (int32_t i = 0; i < n; i++) {
    const lmoe_tensor_entry *e = &tensors[i];
    const char *dn = file_dtype_name(e->dtype);
    if (!e->name || !*e->name || !strcmp(e->name, "__metadata__")) {
      s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor %d has no usable name", (int)i);
      goto done;
    }
    if (!dn) {
      s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor '%s': dtype %d can't be written", e->name,
                    (int)e->dtype);
      goto done;
    }
    if (e->ndim < 0 || e->ndim > LMOE_TENSOR_MAX_DIMS) {
      s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor '%s': ndim %d is out of range", e->name,
                    (int)e->ndim);
      goto done;
    }
    if (cJSON_GetObjectItemCaseSensitive(root, e->name)) {
      s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor '%s' is given twice", e->name);
      goto done;
    }
    uint64_t numel = 1;
    cJSON *t = cJSON_AddObjectToObject(root, e->name);
    cJSON_AddStringToObject(t, "dtype", dn);
    cJSON *sh = cJSON_AddArrayToObject(t, "shape");
    for (int32_t d = 0; d < e->ndim; d++) {
      if (e->shape[d] < 0 || e->shape[d] > ((int64_t)1 << 53) ||
          __builtin_mul_overflow(numel, (uint64_t)e->shape[d], &numel)) {
        s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor '%s': shape[%d] is invalid", e->name, (int)d);
        goto done;
      }
      cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)e->shape[d]));
    }
    bytes[i] = numel * lmoe_dtype_size(e->dtype);
    if (bytes[i] && !e->data) {
      s = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tensor '%s': data is NULL", e->name);
      goto done;
    }
    cJSON *off = cJSON_AddArrayToObject(t, "data_offsets");
    cJSON_AddItemToArray(off, cJSON_CreateNumber((double)at));
    cJSON_AddItemToArray(off, cJSON_CreateNumber((double)(at + bytes[i])));
    at += bytes[i];
  }
  json = cJSON_PrintUnformatted(root);
  if (!json) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  size_t jl = strlen(json), padded = (jl + 7) & ~(size_t)7; /* data 8-byte aligned */
  uint8_t lenb[8];
  for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)((uint64_t)padded >> (8 * i));
  tmp = malloc(strlen(path) + 5);
  if (!tmp) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  sprintf(tmp, "%s.tmp", path);
  f = fopen(tmp, "wb");
  if (!f) {
    s = lmoe_fail(ctx, LMOE_ERR_IO, "%s: cannot create: %s", fn, strerror(errno));
    goto done;
  }
  bool ok = fwrite(lenb, 1, 8, f) == 8 && fwrite(json, 1, jl, f) == jl;
  for (size_t i = jl; ok && i < padded; i++) ok = fputc(' ', f) != EOF;
  for (int32_t i = 0; ok && i < n; i++)
    ok = bytes[i] == 0 || fwrite(tensors[i].data, 1, (size_t)bytes[i], f) == bytes[i];
  if (fclose(f) != 0) ok = false;
  f = NULL;
  if (!ok || rename(tmp, path) != 0) {
    s = lmoe_fail(ctx, LMOE_ERR_IO, "%s: write failed: %s", fn, strerror(errno));
    remove(tmp);
  }
done:
  if (f) {
    fclose(f);
    remove(tmp);
  }
  free(tmp);
  free(json);
  free(bytes);
  cJSON_Delete(root);
  return s;
}
