/* safetensors: write -> read round trips on random data, the malformed corpus with
   its expected messages, and every truncation and many corruptions of a valid file
   (which must fail cleanly or read within bounds: ASan checks the "within"). */
#include "test_util.h"

#include <sys/stat.h>

static const char *corpus_dir, *work_dir;

static char *path_in(const char *dir, const char *name) {
  static char buf[4096];
  snprintf(buf, sizeof buf, "%s/%s", dir, name);
  return buf;
}

static void *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  void *b = malloc(n > 0 ? (size_t)n : 1);
  *len = fread(b, 1, (size_t)n, f);
  fclose(f);
  return b;
}

static void test_round_trip(lmoe_context *ctx) {
  /* Random shapes and values, every writable dtype, a zero-size and a scalar tensor. */
  enum { N = 7 };
  int dtypes[N] = {LMOE_DTYPE_BF16, LMOE_DTYPE_F16, LMOE_DTYPE_F32, LMOE_DTYPE_F64, LMOE_DTYPE_I32,
                   LMOE_DTYPE_F32, LMOE_DTYPE_F32};
  lmoe_tensor_entry e[N];
  double *ref[N];
  char names[N][32];
  for (int i = 0; i < N; i++) {
    memset(&e[i], 0, sizeof e[i]);
    snprintf(names[i], sizeof names[i], "layer.%d.w%d", test_randint(0, 99), i);
    e[i].name = names[i];
    e[i].dtype = dtypes[i];
    e[i].ndim = i == 6 ? 0 : test_randint(1, 3);
    int64_t numel = 1;
    for (int d = 0; d < e[i].ndim; d++) numel *= (e[i].shape[d] = i == 5 && d == 0 ? 0 : test_randint(1, 6));
    size_t es = lmoe_dtype_size(dtypes[i]);
    void *data = malloc((size_t)(numel ? numel : 1) * es);
    ref[i] = malloc((size_t)(numel ? numel : 1) * sizeof(double));
    for (int64_t k = 0; k < numel; k++) {
      double v = dtypes[i] == LMOE_DTYPE_I32 ? test_randint(-1000, 1000) : test_randf(-4, 4);
      /* the reference holds the value the dtype can represent */
      if (dtypes[i] == LMOE_DTYPE_BF16) {
        float f = (float)v;
        uint32_t u;
        memcpy(&u, &f, 4);
        u &= 0xffff0000u;
        memcpy(&f, &u, 4);
        v = f;
        ((uint16_t *)data)[k] = (uint16_t)(u >> 16);
      } else if (dtypes[i] == LMOE_DTYPE_F16) {
        v = (double)(float)((int)(v * 256)) / 256; /* exact in f16 */
        /* an encoder of its own, exact for k/256 with |v| < 4 (at most 10 mantissa bits) */
        float f = (float)v;
        uint16_t h;
        {
          /* f16: sign, 5-bit exponent, 10-bit mantissa */
          float a = fabsf(f);
          if (a == 0) h = 0;
          else {
            int ex;
            float m = frexpf(a, &ex); /* a = m * 2^ex, m in [0.5,1) */
            int be = ex - 1 + 15;
            uint16_t mant = (uint16_t)((m * 2 - 1) * 1024 + 0.5f);
            h = (uint16_t)((be << 10) | mant);
          }
          if (f < 0) h |= 0x8000;
        }
        ((uint16_t *)data)[k] = h;
      } else {
        if (dtypes[i] == LMOE_DTYPE_F32) {
          v = (float)v;
          ((float *)data)[k] = (float)v;
        } else if (dtypes[i] == LMOE_DTYPE_F64) {
          ((double *)data)[k] = v;
        } else {
          ((int32_t *)data)[k] = (int32_t)v;
        }
      }
      ref[i][k] = v;
    }
    e[i].data = data;
  }
  const char *keys[2] = {"format", "note"}, *vals[2] = {"pt", "round \"trip\" \\ ok"};
  char file[4096];
  snprintf(file, sizeof file, "%s/round.safetensors", work_dir);
  OK(ctx, lmoe_safetensors_write(ctx, file, N, e, 2, keys, vals));

  size_t len = 0;
  void *bytes = slurp(file, &len);
  CHECK(bytes && len >= 8, "written file readable");
  uint64_t hl = 0;
  memcpy(&hl, bytes, 8);
  CHECK((8 + hl) % 8 == 0, "data starts 8-byte aligned (header %llu)", (unsigned long long)hl);
  for (int pass = 0; pass < 2; pass++) {
    lmoe_safetensors *st = NULL;
    if (pass == 0) OK(ctx, lmoe_safetensors_open(ctx, file, &st));
    else OK(ctx, lmoe_safetensors_open_memory(ctx, bytes, len, "round", &st));
    CHECK(lmoe_safetensors_count(st) == N, "count %d", lmoe_safetensors_count(st));
    CHECK(lmoe_safetensors_metadata_count(st) == 2, "metadata");
    for (int m = 0; m < lmoe_safetensors_metadata_count(st); m++) {
      const char *k, *v;
      OK(ctx, lmoe_safetensors_metadata(st, m, &k, &v));
      int want = !strcmp(k, "format") ? 0 : 1;
      CHECK(!strcmp(k, keys[want]) && !strcmp(v, vals[want]), "metadata %s = %s", k, v);
    }
    CHECK(lmoe_safetensors_find(st, "absent", NULL) == LMOE_ERR_NOT_FOUND, "find absent");
    for (int i = 0; i < N; i++) {
      int32_t idx = -1;
      OK(ctx, lmoe_safetensors_find(st, names[i], &idx));
      lmoe_tensor_info ti;
      OK(ctx, lmoe_safetensors_tensor(st, idx, &ti));
      CHECK(!strcmp(ti.name, names[i]) && ti.dtype == dtypes[i] && ti.ndim == e[i].ndim, "info %s", names[i]);
      int64_t numel = 1;
      for (int d = 0; d < ti.ndim; d++) {
        CHECK(ti.shape[d] == e[i].shape[d], "shape %s[%d]", names[i], d);
        numel *= ti.shape[d];
      }
      CHECK(ti.numel == numel && ti.bytes == (uint64_t)numel * lmoe_dtype_size(dtypes[i]), "numel %s", names[i]);
      double *got = malloc((size_t)(numel ? numel : 1) * sizeof(double));
      OK(ctx, lmoe_safetensors_read(st, idx, got, LMOE_DTYPE_F64, numel));
      int bad = 0;
      for (int64_t k = 0; k < numel; k++) bad += got[k] != ref[i][k];
      CHECK(bad == 0, "%s: %d of %lld values differ after the round trip", names[i], bad, (long long)numel);
      /* native dtype: the same bytes that were written */
      void *raw = malloc((size_t)(numel ? numel : 1) * lmoe_dtype_size(dtypes[i]));
      OK(ctx, lmoe_safetensors_read(st, idx, raw, dtypes[i], numel));
      CHECK(numel == 0 || !memcmp(raw, e[i].data, (size_t)numel * lmoe_dtype_size(dtypes[i])), "raw %s", names[i]);
      FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_safetensors_read(st, idx, raw, dtypes[i], numel + 1));
      free(raw);
      free(got);
    }
    FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_safetensors_tensor(st, N, &(lmoe_tensor_info){0}));
    lmoe_safetensors_close(st);
  }
  free(bytes);
  /* the writer refuses duplicates and bad names */
  lmoe_tensor_entry dup[2] = {e[0], e[0]};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_safetensors_write(ctx, file, 2, dup, 0, NULL, NULL));
  dup[1].name = "__metadata__";
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_safetensors_write(ctx, file, 2, dup, 0, NULL, NULL));
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_safetensors_open(ctx, path_in(work_dir, "nope.safetensors"),
                                                       &(lmoe_safetensors *){NULL}));
  for (int i = 0; i < N; i++) {
    free((void *)e[i].data);
    free(ref[i]);
  }
}

static void test_corpus(lmoe_context *ctx) {
  FILE *m = fopen(path_in(corpus_dir, "MANIFEST"), "r");
  CHECK(m != NULL, "corpus manifest at %s", corpus_dir);
  if (!m) return;
  char line[1024];
  int cases = 0;
  while (fgets(line, sizeof line, m)) {
    if (line[0] == '#' || line[0] == '\n') continue;
    line[strcspn(line, "\n")] = 0;
    char *file = strtok(line, "\t"), *when = strtok(NULL, "\t"), *want = strtok(NULL, "\t");
    if (!file || !when || !want) continue;
    cases++;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", corpus_dir, file);
    size_t len = 0;
    void *bytes = slurp(path, &len);
    for (int pass = 0; pass < 2; pass++) {
      lmoe_safetensors *st = NULL;
      lmoe_status s = pass == 0 ? lmoe_safetensors_open(ctx, path, &st)
                                : lmoe_safetensors_open_memory(ctx, bytes, len, file, &st);
      const char *msg = lmoe_context_last_error(ctx);
      if (!strcmp(when, "valid")) {
        CHECK(s == LMOE_OK, "%s should open: %s", file, msg);
      } else if (!strcmp(when, "open")) {
        CHECK(s != LMOE_OK && st == NULL, "%s should fail to open", file);
        CHECK(strstr(msg, want) != NULL, "%s: message \"%s\" lacks \"%s\"", file, msg, want);
        CHECK(strstr(msg, file) != NULL, "%s: message \"%s\" doesn't name the file", file, msg);
      } else {
        CHECK(s == LMOE_OK, "%s should open: %s", file, msg);
        if (st) {
          lmoe_tensor_info ti;
          lmoe_safetensors_tensor(st, 0, &ti);
          float out[64];
          s = lmoe_safetensors_read(st, 0, out, LMOE_DTYPE_F32, ti.numel);
          msg = lmoe_context_last_error(ctx);
          CHECK(s == LMOE_ERR_UNSUPPORTED && strstr(msg, want), "%s: read gave %s \"%s\", want \"%s\"", file,
                lmoe_status_string(s), msg, want);
        }
      }
      lmoe_safetensors_close(st);
    }
    free(bytes);
  }
  fclose(m);
  CHECK(cases >= 25, "corpus has %d cases", cases);
}

/* Every prefix of a valid file fails to open; random byte corruptions either fail or
   give a file whose every tensor reads back (bounds are ASan's to check). */
static void test_truncation_and_corruption(lmoe_context *ctx) {
  char file[4096];
  snprintf(file, sizeof file, "%s/round.safetensors", work_dir);
  size_t len = 0;
  uint8_t *bytes = slurp(file, &len);
  if (!bytes) return;
  int opened = 0;
  for (size_t n = 0; n < len; n++) {
    lmoe_safetensors *st = NULL;
    lmoe_status s = lmoe_safetensors_open_memory(ctx, bytes, n, "prefix", &st);
    opened += s == LMOE_OK;
    lmoe_safetensors_close(st);
  }
  CHECK(opened == 0, "%d truncated prefixes opened", opened);
  uint8_t *copy = malloc(len);
  int ok = 0, failed = 0;
  for (int trial = 0; trial < 3000; trial++) {
    memcpy(copy, bytes, len);
    int flips = test_randint(1, 3);
    for (int f = 0; f < flips; f++) {
      size_t at = (size_t)test_randint(0, (int)(len < 400 ? len - 1 : 399)); /* mostly the header */
      copy[at] = (uint8_t)test_randint(0, 255);
    }
    lmoe_safetensors *st = NULL;
    if (lmoe_safetensors_open_memory(ctx, copy, len, "corrupt", &st) != LMOE_OK) {
      failed++;
      CHECK(lmoe_context_last_error(ctx)[0] != 0, "a failure leaves a message");
      continue;
    }
    ok++;
    for (int32_t i = 0; i < lmoe_safetensors_count(st); i++) {
      lmoe_tensor_info ti;
      lmoe_safetensors_tensor(st, i, &ti);
      CHECK(ti.offset + ti.bytes <= len, "tensor inside the file");
      double *d = malloc((size_t)(ti.numel ? ti.numel : 1) * sizeof(double));
      if (ti.dtype >= 0) lmoe_safetensors_read(st, i, d, LMOE_DTYPE_F64, ti.numel);
      free(d);
    }
    lmoe_safetensors_close(st);
  }
  printf("corruptions: %d opened, %d refused\n", ok, failed);
  CHECK(failed > 0, "some corruptions are refused");
  free(copy);
  free(bytes);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s CORPUS_DIR WORK_DIR\n", argv[0]);
    return 2;
  }
  corpus_dir = argv[1];
  work_dir = argv[2];
  mkdir(work_dir, 0777);
  test_seed("test_safetensors");
  lmoe_context *ctx = test_cpu_context(1, LMOE_GUARD_HOST);
  test_round_trip(ctx);
  test_corpus(ctx);
  test_truncation_and_corruption(ctx);
  lmoe_context_release(ctx);
  return test_summary();
}
