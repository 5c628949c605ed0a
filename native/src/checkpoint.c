/* Base MoE weights from a safetensors checkpoint: one file, or shards listed by a
   model.safetensors.index.json. Qwen2/3-MoE and Mixtral naming; per-expert tensors
   or the fused experts.gate_up_proj / experts.down_proj of newer transformers. */
#include "files.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct lmoe_checkpoint {
  lmoe_object obj;
  lmoe_context *ctx;
  char *path;
  int32_t n_files;
  lmoe_safetensors **files;
};

static bool valid_ck(const lmoe_checkpoint *ck) { return lmoe_object_is(ck, LMOE_MAGIC_CHECKPOINT); }

lmoe_safetensors **lmoe_checkpoint_files(lmoe_checkpoint *ck, int32_t *n) {
  *n = ck->n_files;
  return ck->files;
}

void lmoe_checkpoint_layer_info_init_sized(lmoe_checkpoint_layer_info *info, size_t size) {
  lmoe_checkpoint_layer_info def;
  memset(&def, 0, sizeof def);
  lmoe_struct_init(info, size, &def, sizeof def, sizeof(uint32_t));
}

static void ck_free(lmoe_checkpoint *ck) {
  for (int32_t i = 0; i < ck->n_files; i++) lmoe_safetensors_close(ck->files[i]);
  free(ck->files);
  free(ck->path);
  if (ck->ctx) lmoe_context_release(ck->ctx);
  ck->obj.magic = 0;
  free(ck);
}

static void ck_destroy(lmoe_object *obj) { ck_free((lmoe_checkpoint *)obj); }

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && !strcmp(s + n - m, suffix);
}

static bool is_file(const char *p) {
  struct stat sb;
  return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static char *path_join(const char *dir, size_t dirlen, const char *file) {
  size_t n = dirlen + strlen(file) + 2;
  char *o = malloc(n);
  if (o) snprintf(o, n, "%.*s%s%s", (int)dirlen, dir, dirlen && dir[dirlen - 1] != '/' ? "/" : "", file);
  return o;
}

static lmoe_status add_file(lmoe_checkpoint *ck, const char *path) {
  lmoe_safetensors **f = realloc(ck->files, ((size_t)ck->n_files + 1) * sizeof *f);
  if (!f) return lmoe_fail(ck->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  ck->files = f;
  lmoe_status s = lmoe_safetensors_open(ck->ctx, path, &ck->files[ck->n_files]);
  if (!s) ck->n_files++;
  return s;
}

static lmoe_status open_index(lmoe_checkpoint *ck, const char *index) {
  lmoe_context *ctx = ck->ctx;
  char *text = NULL;
  size_t len = 0;
  lmoe_status s = lmoe_read_text_file(ctx, index, 256u << 20, &text, &len);
  if (s) return s;
  cJSON *root = cJSON_ParseWithLength(text, len);
  free(text);
  if (!root) return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: not valid JSON", index);
  const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
  const char *slash = strrchr(index, '/');
  size_t dirlen = slash ? (size_t)(slash - index + 1) : 0;
  if (!cJSON_IsObject(wm)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: weight_map is missing or not an object", index);
    goto done;
  }
  /* Open each shard once; then every tensor the map names must be in its shard. */
  for (const cJSON *e = wm->child; e && !s; e = e->next) {
    if (!cJSON_IsString(e)) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: weight_map['%s'] is not a file name", index, e->string);
      break;
    }
    const char *f = e->valuestring;
    if (!*f || strchr(f, '/') || !strcmp(f, "..") || !ends_with(f, ".safetensors")) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                    "%s: weight_map['%s'] = '%s' is not a .safetensors file next to the index", index,
                    e->string, f);
      break;
    }
    bool seen = false;
    for (const cJSON *g = wm->child; g != e && !seen; g = g->next) seen = !strcmp(g->valuestring, f);
    if (seen) continue;
    char *p = path_join(index, dirlen, f);
    s = p ? add_file(ck, p) : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    free(p);
  }
  for (const cJSON *e = wm->child; e && !s; e = e->next) {
    const char *f = e->valuestring;
    for (int32_t i = 0; i < ck->n_files; i++) {
      const char *shard = lmoe_st_display_name(ck->files[i]);
      size_t sl = strlen(shard), fl = strlen(f);
      if (!ends_with(shard, f) || (sl > fl && shard[sl - fl - 1] != '/')) continue;
      if (lmoe_safetensors_find(ck->files[i], e->string, NULL) != LMOE_OK)
        s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is mapped to %s, which doesn't hold it", index,
                      e->string, f);
      break;
    }
  }
done:
  cJSON_Delete(root);
  return s;
}

lmoe_status lmoe_checkpoint_open(lmoe_context *ctx, const char *path, lmoe_checkpoint **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!path) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "path is NULL");
  lmoe_checkpoint *ck = calloc(1, sizeof *ck);
  if (!ck) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&ck->obj, LMOE_MAGIC_CHECKPOINT, ck_destroy);
  lmoe_context_retain(ctx);
  ck->ctx = ctx;
  ck->path = strdup(path);
  lmoe_status s = ck->path ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  struct stat sb;
  if (!s && stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
    char *idx = path_join(path, strlen(path), "model.safetensors.index.json");
    char *one = path_join(path, strlen(path), "model.safetensors");
    if (!idx || !one) s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    else if (is_file(idx)) s = open_index(ck, idx);
    else if (is_file(one)) s = add_file(ck, one);
    else
      s = lmoe_fail(ctx, LMOE_ERR_NOT_FOUND,
                    "%s: neither model.safetensors.index.json nor model.safetensors is there", path);
    free(idx);
    free(one);
  } else if (!s && ends_with(path, ".json")) {
    s = open_index(ck, path);
  } else if (!s) {
    s = add_file(ck, path);
  }
  if (s) {
    ck_free(ck);
    return s;
  }
  *out = ck;
  return LMOE_OK;
}

void lmoe_checkpoint_close(lmoe_checkpoint *ck) {
  if (valid_ck(ck)) lmoe_object_release(&ck->obj);
}

/* The file holding tensor `name`, or NULL. */
static lmoe_safetensors *find(lmoe_checkpoint *ck, const char *name, lmoe_tensor_info *ti) {
  for (int32_t i = 0; i < ck->n_files; i++) {
    int32_t idx;
    if (lmoe_safetensors_find(ck->files[i], name, &idx) == LMOE_OK) {
      if (ti) lmoe_safetensors_tensor(ck->files[i], idx, ti);
      return ck->files[i];
    }
  }
  return NULL;
}

typedef struct layer_names {
  int32_t family;
  bool fused;
  char block[96]; /* model.layers.L.mlp or model.layers.L.block_sparse_moe */
  const char *g, *u, *d;
} layer_names;

static lmoe_status detect(lmoe_checkpoint *ck, int32_t layer, layer_names *ln,
                          lmoe_checkpoint_layer_info *info) {
  lmoe_context *ctx = ck->ctx;
  char name[256];
  lmoe_tensor_info ti;
  static const struct {
    int32_t family;
    const char *block, *g, *u, *d;
  } kinds[] = {{LMOE_FAMILY_QWEN, "mlp", "gate_proj", "up_proj", "down_proj"},
               {LMOE_FAMILY_MIXTRAL, "block_sparse_moe", "w1", "w3", "w2"}};
  memset(ln, 0, sizeof *ln);
  if (layer < 0) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer %d is negative", (int)layer);
  for (size_t k = 0; k < 2 && !ln->family; k++) {
    snprintf(ln->block, sizeof ln->block, "model.layers.%d.%s", (int)layer, kinds[k].block);
    snprintf(name, sizeof name, "%s.experts.0.%s.weight", ln->block, kinds[k].g);
    if (find(ck, name, &ti)) {
      ln->family = kinds[k].family;
      ln->g = kinds[k].g, ln->u = kinds[k].u, ln->d = kinds[k].d;
      break;
    }
    snprintf(name, sizeof name, "%s.experts.gate_up_proj", ln->block);
    if (find(ck, name, &ti)) {
      ln->family = kinds[k].family;
      ln->fused = true;
    }
  }
  if (!ln->family)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND,
                     "%s: no MoE experts for layer %d (looked for model.layers.%d.mlp.experts.* and "
                     "model.layers.%d.block_sparse_moe.experts.*)",
                     ck->path, (int)layer, (int)layer, (int)layer);
  int64_t E, H, I;
  if (ln->fused) {
    if (ti.ndim != 3 || ti.shape[1] % 2)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [E, 2I, H]", ck->path, ti.name);
    E = ti.shape[0], I = ti.shape[1] / 2, H = ti.shape[2];
  } else {
    if (ti.ndim != 2)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [I, H]", ck->path, ti.name);
    I = ti.shape[0], H = ti.shape[1];
    E = 0;
    for (;; E++) {
      snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln->block, (long long)E, ln->g);
      if (!find(ck, name, NULL)) break;
    }
  }
  if (E < 1 || E > 4096 || H < 1 || H > 65536 || I < 1 || I > 65536)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: layer %d has E %lld, H %lld, I %lld: out of range",
                     ck->path, (int)layer, (long long)E, (long long)H, (long long)I);
  lmoe_checkpoint_layer_info_init(info);
  info->family = ln->family;
  info->num_experts = (int32_t)E;
  info->hidden = (int32_t)H;
  info->intermediate = (int32_t)I;
  info->weight_dtype = ti.dtype == LMOE_DTYPE_F8_E4M3 ? LMOE_DTYPE_F8_E4M3 : LMOE_DTYPE_BF16;
  snprintf(name, sizeof name, "%s.gate.weight", ln->block);
  info->has_router = find(ck, name, NULL) != NULL;
  return LMOE_OK;
}

lmoe_status lmoe_checkpoint_get_layer_info(lmoe_checkpoint *ck, int32_t layer, lmoe_checkpoint_layer_info *out) {
  if (!valid_ck(ck)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ck->ctx);
  if (!out) return lmoe_fail(ck->ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  layer_names ln;
  lmoe_checkpoint_layer_info info;
  lmoe_status s = detect(ck, layer, &ln, &info);
  if (s) return s;
  /* an older caller's struct gets the fields it has */
  return lmoe_struct_out(ck->ctx, out, &info, sizeof info, "layer info", "lmoe_checkpoint_layer_info_init");
}

static lmoe_status read_named(lmoe_checkpoint *ck, const char *name, int32_t ndim, const int64_t *shape,
                              float *dst) {
  lmoe_safetensors *f = find(ck, name, NULL);
  if (!f) return lmoe_fail(ck->ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", ck->path, name);
  return lmoe_st_read_f32(f, name, ndim, shape, dst);
}

/* What of one tensor goes where: `runs` runs of run_len elements, run i from element
   src0 + i * src_stride of the tensor, all to elements [first, first + numel) of dst
   (numel = runs * run_len). A sharded layer's rank takes its experts (EP) or its rows
   of gate and up and columns of down (TP); unsharded, a run is a whole expert. */
typedef struct part {
  char name[192];
  int32_t ndim;
  int64_t shape[3];
  lmoe_buffer *dst;
  int64_t first;
  lmoe_safetensors *file;
  int32_t index;
  int64_t numel;
  int64_t src0, src_stride, runs, run_len;
} part;

static lmoe_status find_part(lmoe_checkpoint *ck, part *pt) {
  lmoe_tensor_info ti;
  pt->file = find(ck, pt->name, &ti);
  if (!pt->file) return lmoe_fail(ck->ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", ck->path, pt->name);
  bool same = ti.ndim == pt->ndim;
  for (int32_t d = 0; same && d < pt->ndim; d++) same = ti.shape[d] == pt->shape[d];
  if (!same)
    return pt->ndim == 2
               ? lmoe_fail(ck->ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [%lld, %lld]", ck->path, pt->name,
                           (long long)pt->shape[0], (long long)pt->shape[1])
               : lmoe_fail(ck->ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [%lld, %lld, %lld]", ck->path,
                           pt->name, (long long)pt->shape[0], (long long)pt->shape[1], (long long)pt->shape[2]);
  if (ti.dtype < 0 || ti.dtype == LMOE_DTYPE_I32)
    return lmoe_fail(ck->ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s': %s is not supported", ck->path, pt->name,
                     ti.dtype_name);
  lmoe_safetensors_find(pt->file, pt->name, &pt->index);
  pt->numel = pt->runs * pt->run_len;
  return LMOE_OK;
}

/* Streams the parts into the layer's bf16 storage: read from the file straight into
   the span the upload hands out (the destination itself where device memory is host
   memory, else a staging chunk: parts that follow each other in the layer share
   chunks, one copy per chunk), converted on the way only when a tensor is not bf16. */
static lmoe_status stream_parts(lmoe_checkpoint *ck, lmoe_context *lctx, const part *parts, int32_t np) {
  lmoe_upload u;
  lmoe_status s = lmoe_upload_begin(lctx, &u);
  for (int32_t k = 0; k < np && !s; k++) {
    const part *pt = &parts[k];
    if (k > 0 && pt->dst != parts[k - 1].dst) s = lmoe_upload_flush(&u); /* W13, then W2: one copy each */
    if (s) break;
    uint16_t *base = (uint16_t *)pt->dst->data + pt->first;
    for (int64_t run = 0; run < pt->runs && !s; run++) {
      uint16_t *rb = base + run * pt->run_len;
      int64_t src = pt->src0 + run * pt->src_stride;
      for (int64_t done = 0; done < pt->run_len && !s;) {
        void *host;
        size_t n;
        s = lmoe_upload_span(&u, rb + done, (size_t)(pt->run_len - done) * sizeof(uint16_t), &host, &n);
        int64_t m = (int64_t)(n / sizeof(uint16_t));
        if (!s) s = lmoe_st_read_range(pt->file, pt->index, src + done, m, host, LMOE_DTYPE_BF16);
        if (!s) lmoe_upload_commit(&u, (size_t)m * sizeof(uint16_t));
        done += m;
      }
    }
  }
  lmoe_status s2 = lmoe_upload_end(&u);
  if (!s && s2) s = lctx == ck->ctx ? s2 : lmoe_fail(ck->ctx, s2, "%s", lmoe_context_last_error(lctx));
  return s;
}

/* An FP8 checkpoint into an FP8 layer (never sharded; host memory on the cpu backend,
   device memory on cuda, written through lmoe_buffer_write): every code tensor and its scale tensor found with its shape and dtype,
   and every scale read and checked finite, before anything is written. Codes are
   copied as they are; the scales go to the layer's block scales (gate's row blocks,
   then up's). Per expert: `P.weight` F8_E4M3 [out, in] and `P.weight_scale_inv`
   [ceil(out/128), ceil(in/128)]; fused: `experts.gate_up_proj` [E, 2I, H] with
   `experts.gate_up_proj_scales_inv` (or `_scale_inv`) [E, ceil(2I/128), ceil(H/128)],
   and down_proj alike. */
typedef struct fp8_part {
  char name[192], sname[208];
  int64_t shape[3], sshape[3];
  int32_t ndim;
  lmoe_safetensors *file, *sfile;
  int32_t index, sindex;
  int64_t dst;    /* first code's element in the layer's w13 or w2 */
  int64_t sdst;   /* first scale's element in w13s or w2s (the layer's layout) */
  bool down;      /* w2 and w2s (else w13 and w13s) */
  int64_t srows;  /* scale rows to place (fused: per expert, E of them) */
} fp8_part;

static lmoe_status find_fp8_part(lmoe_checkpoint *ck, fp8_part *p) {
  lmoe_context *ctx = ck->ctx;
  lmoe_tensor_info ti;
  p->file = find(ck, p->name, &ti);
  if (!p->file) return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", ck->path, p->name);
  bool same = ti.ndim == p->ndim;
  for (int32_t d = 0; same && d < p->ndim; d++) same = ti.shape[d] == p->shape[d];
  if (!same)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [%lld, %lld%s%lld]", ck->path, p->name,
                     (long long)p->shape[0], (long long)p->shape[1], p->ndim == 3 ? ", " : "",
                     p->ndim == 3 ? (long long)p->shape[2] : 0LL);
  if (ti.dtype != LMOE_DTYPE_F8_E4M3)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is %s; the layer's other experts are F8_E4M3", ck->path,
                     p->name, ti.dtype_name);
  lmoe_safetensors_find(p->file, p->name, &p->index);
  p->sfile = find(ck, p->sname, &ti);
  if (!p->sfile && p->ndim == 3) { /* fused: transformers' FP8Expert says _scales_inv, its converter _scale_inv */
    size_t n = strlen(p->sname);
    if (n > 12 && !strcmp(p->sname + n - 11, "_scales_inv")) {
      memmove(p->sname + n - 5, p->sname + n - 4, 5); /* _scales_inv -> _scale_inv */
      p->sfile = find(ck, p->sname, &ti);
    }
  }
  if (!p->sfile)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is F8_E4M3 but its block scales '%s' are missing",
                     ck->path, p->name, p->sname);
  same = ti.ndim == p->ndim;
  for (int32_t d = 0; same && d < p->ndim; d++) same = ti.shape[d] == p->sshape[d];
  if (!same) {
    char got[160] = "[";
    for (int32_t d = 0; d < ti.ndim && d < 8; d++)
      snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)ti.shape[d]);
    return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                     "%s: block scales '%s' have shape %s]; %s [%lld, %lld%s%lld] needs one per 128x128 block: "
                     "[%lld, %lld%s%lld]",
                     ck->path, p->sname, got, p->name, (long long)p->shape[0], (long long)p->shape[1],
                     p->ndim == 3 ? ", " : "", p->ndim == 3 ? (long long)p->shape[2] : 0LL, (long long)p->sshape[0],
                     (long long)p->sshape[1], p->ndim == 3 ? ", " : "", p->ndim == 3 ? (long long)p->sshape[2] : 0LL);
  }
  if (ti.dtype != LMOE_DTYPE_F32 && ti.dtype != LMOE_DTYPE_BF16 && ti.dtype != LMOE_DTYPE_F16 &&
      ti.dtype != LMOE_DTYPE_F64)
    return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: block scales '%s' are %s, not a float dtype (F32)", ck->path, p->sname,
                     ti.dtype_name);
  lmoe_safetensors_find(p->sfile, p->sname, &p->sindex);
  return LMOE_OK;
}

static lmoe_status load_fp8(lmoe_checkpoint *ck, const layer_names *ln, lmoe_layer *dst) {
  lmoe_context *ctx = ck->ctx;
  const int64_t E = dst->cfg.num_experts, H = dst->cfg.hidden, I = dst->cfg.intermediate;
  const int64_t nbh = lmoe_fp8_blocks(H), nbi = lmoe_fp8_blocks(I);
  if (ln->fused && I % LMOE_FP8_BLOCK)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "%s: %s.experts.gate_up_proj is FP8 with I = %lld, not a multiple of 128: its scale blocks "
                     "straddle gate and up, which the layer keeps apart",
                     ck->path, ln->block, (long long)I);
  const int32_t np = ln->fused ? 2 : (int32_t)(3 * E);
  fp8_part *parts = calloc((size_t)np, sizeof *parts);
  float **scales = calloc((size_t)np, sizeof *scales);
  lmoe_status s = parts && scales ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (int32_t k = 0; k < np && !s; k++) {
    fp8_part *p = &parts[k];
    if (ln->fused) {
      const bool down = k == 1;
      snprintf(p->name, sizeof p->name, "%s.experts.%s", ln->block, down ? "down_proj" : "gate_up_proj");
      snprintf(p->sname, sizeof p->sname, "%s_scales_inv", p->name);
      p->ndim = 3;
      p->shape[0] = E, p->shape[1] = down ? H : 2 * I, p->shape[2] = down ? I : H;
      p->sshape[0] = E, p->sshape[1] = down ? nbh : 2 * nbi, p->sshape[2] = down ? nbi : nbh;
      p->down = down;
    } else {
      const int64_t e = k / 3, pi = k % 3; /* gate, up, down */
      const char *pn = pi == 2 ? ln->d : pi == 1 ? ln->u : ln->g;
      snprintf(p->name, sizeof p->name, "%s.experts.%lld.%s.weight", ln->block, (long long)e, pn);
      snprintf(p->sname, sizeof p->sname, "%s_scale_inv", p->name);
      p->ndim = 2;
      p->shape[0] = pi == 2 ? H : I, p->shape[1] = pi == 2 ? I : H;
      p->sshape[0] = pi == 2 ? nbh : nbi, p->sshape[1] = pi == 2 ? nbi : nbh;
      p->down = pi == 2;
      p->dst = pi == 2 ? e * H * I : (e * 2 + pi) * I * H;
      p->sdst = pi == 2 ? e * nbh * nbi : (e * 2 + pi) * nbi * nbh;
    }
    s = find_fp8_part(ck, p);
    int64_t ns = p->sshape[0] * p->sshape[1] * (p->ndim == 3 ? p->sshape[2] : 1);
    if (!s) s = (scales[k] = malloc((size_t)ns * sizeof(float))) ? LMOE_OK
                                                                : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    if (!s) s = lmoe_st_read_range(p->sfile, p->sindex, 0, ns, scales[k], LMOE_DTYPE_F32);
    for (int64_t i = 0; i < ns && !s; i++)
      if (!isfinite(scales[k][i]))
        s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: block scales '%s' hold %g at element %lld: not finite", ck->path,
                      p->sname, (double)scales[k][i], (long long)i);
  }
  for (int32_t k = 0; k < np && !s; k++) {
    fp8_part *p = &parts[k];
    int64_t n = p->shape[0] * p->shape[1] * (p->ndim == 3 ? p->shape[2] : 1);
    int64_t ns = p->sshape[0] * p->sshape[1] * (p->ndim == 3 ? p->sshape[2] : 1);
    lmoe_buffer *bc = p->down ? dst->w2 : dst->w13, *bs = p->down ? dst->w2s : dst->w13s;
    if (lmoe_host_addressable(dst->ctx, bc->memory)) {
      s = lmoe_st_read_range(p->file, p->index, 0, n, (uint8_t *)bc->data + p->dst, LMOE_DTYPE_F8_E4M3);
      /* I % 128 == 0 when fused: same layout */
      if (!s) memcpy((float *)bs->data + p->sdst, scales[k], (size_t)ns * sizeof(float));
      continue;
    }
    /* device memory: the codes through host memory (a part at a time) */
    uint8_t *tmp = malloc((size_t)(n ? n : 1));
    if (!tmp) {
      s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
      break;
    }
    s = lmoe_st_read_range(p->file, p->index, 0, n, tmp, LMOE_DTYPE_F8_E4M3);
    lmoe_status w = LMOE_OK;
    if (!s) w = lmoe_buffer_write(bc, p->dst, tmp, LMOE_DTYPE_F8_E4M3, n);
    if (!s && !w) w = lmoe_buffer_write(bs, p->sdst, scales[k], LMOE_DTYPE_F32, ns);
    if (w) s = dst->ctx == ctx ? w : lmoe_fail(ctx, w, "%s", lmoe_context_last_error(dst->ctx));
    free(tmp);
  }
  for (int32_t k = 0; scales && k < np; k++) free(scales[k]);
  free(scales);
  free(parts);
  return s;
}

lmoe_status lmoe_checkpoint_load_layer(lmoe_checkpoint *ck, int32_t layer, lmoe_layer *dst,
                                       lmoe_buffer **router) {
  if (!valid_ck(ck)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = ck->ctx;
  lmoe_clear_error(ctx);
  if (router) *router = NULL;
  if (!dst || dst->obj.magic != LMOE_MAGIC_LAYER)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer is NULL or not a loramoe layer");
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  layer_names ln;
  lmoe_status s = detect(ck, layer, &ln, &info);
  if (s) return s;
  const lmoe_layer_config *c = &dst->cfg;
  if (c->num_experts != info.num_experts || c->hidden != info.hidden || c->intermediate != info.intermediate)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "%s: layer %d has E %d, H %d, I %d; the destination layer was made with E %d, H %d, I %d",
                     ck->path, (int)layer, (int)info.num_experts, (int)info.hidden, (int)info.intermediate,
                     (int)c->num_experts, (int)c->hidden, (int)c->intermediate);
  if (info.weight_dtype != c->weight_dtype)
    return info.weight_dtype == LMOE_DTYPE_F8_E4M3
               ? lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                           "%s: layer %d's experts are F8_E4M3 (an FP8 checkpoint) but the destination layer's "
                           "weight_dtype is bf16: make the layer with weight_dtype f8_e4m3 (FP8 checkpoints are "
                           "not dequantized on load)",
                           ck->path, (int)layer)
               : lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                           "%s: layer %d's experts are not FP8 but the destination layer's weight_dtype is "
                           "f8_e4m3: quantize the checkpoint first (lmoe_checkpoint_quantize_fp8), or load it "
                           "into a bf16 layer",
                           ck->path, (int)layer);
  if (router && !info.has_router)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: layer %d has no router weight %s.gate.weight", ck->path,
                     (int)layer, ln.block);
  int64_t E = info.num_experts, H = info.hidden, I = info.intermediate;
  char name[256];
  lmoe_buffer *rb = NULL;
  if (router) {
    /* Read the router first: a bad shape fails before any expert is overwritten. */
    int64_t shape[2] = {E, H};
    s = lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 2, shape, &rb);
    snprintf(name, sizeof name, "%s.gate.weight", ln.block);
    if (!s) s = read_named(ck, name, 2, shape, rb->data);
    if (s) {
      lmoe_buffer_release(rb);
      return s;
    }
  }
  if (c->weight_dtype == LMOE_DTYPE_F8_E4M3) {
    s = load_fp8(ck, &ln, dst);
    if (s) {
      lmoe_buffer_release(rb);
      return s;
    }
    if (router) *router = rb;
    return LMOE_OK;
  }
  /* The layer's parts in the order of its memory: W13's (expert by expert, gate rows
     then up rows) then W2's, only this rank's experts and slices (a sharded layer).
     Every one is found with its shape and a readable dtype before any is written, so a
     broken checkpoint leaves the layer as it was. */
  const int64_t El = dst->local.num_experts, ni = dst->local.intermediate, e0 = dst->e0, i0 = dst->i0;
  const bool tp = ni != I; /* gate and up are cut: two runs per expert */
  const int32_t per13 = tp || !ln.fused ? 2 : 1;
  int32_t np = (int32_t)(El * (per13 + 1));
  part *parts = calloc((size_t)np, sizeof *parts);
  s = parts ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (int32_t k = 0; k < np && !s; k++) {
    part *pt = &parts[k];
    const bool down = k >= per13 * El;
    const int64_t le = down ? k - per13 * El : k / per13, e = e0 + le;
    const int32_t half = down ? 0 : k % per13; /* 0: gate (or gate and up), 1: up */
    pt->dst = down ? dst->w2 : dst->w13;
    pt->runs = 1, pt->src_stride = 0;
    if (down) {
      pt->first = le * H * ni; /* [H, ni] of the rank's columns: H runs */
      pt->runs = H, pt->run_len = ni, pt->src_stride = I;
      if (!tp) pt->runs = 1, pt->run_len = H * I; /* the whole expert: one run */
    } else {
      pt->first = (le * 2 + half) * ni * H;
      pt->run_len = (per13 == 1 ? 2 : 1) * ni * H;
    }
    if (ln.fused) {
      snprintf(pt->name, sizeof pt->name, "%s.experts.%s", ln.block, down ? "down_proj" : "gate_up_proj");
      pt->ndim = 3;
      pt->shape[0] = E, pt->shape[1] = down ? H : 2 * I, pt->shape[2] = down ? I : H;
      pt->src0 = down ? e * H * I + i0 : (e * 2 * I + half * I + i0) * H;
    } else {
      const char *pn = down ? ln.d : half ? ln.u : ln.g;
      snprintf(pt->name, sizeof pt->name, "%s.experts.%lld.%s.weight", ln.block, (long long)e, pn);
      pt->ndim = 2;
      pt->shape[0] = down ? H : I, pt->shape[1] = down ? I : H;
      pt->src0 = down ? i0 : i0 * H;
    }
    s = find_part(ck, pt);
  }
  if (!s) s = stream_parts(ck, dst->ctx, parts, np);
  free(parts);
  if (s) {
    lmoe_buffer_release(rb);
    return s;
  }
  if (router) *router = rb;
  return LMOE_OK;
}
