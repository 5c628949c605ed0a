/* The real-PEFT fixture (make_peft_fixture.py: a tiny model built with transformers,
   LoRA applied with peft, expected outputs of one MoE layer computed by the real
   modules in float64). For every family directory: the base layer comes from the
   checkpoint, the router weight gives the logits, each adapter the fixture has an
   expected output for is loaded through lmoe_pool_load_peft, and the cpu forward and
   the float64 reference must match PEFT's result. */
#include "test_util.h"

#include <sys/stat.h>

static double rel_l2(const double *a, const double *ref, long n) {
  double num = 0, den = 0;
  for (long i = 0; i < n; i++) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

/* Reads tensor `name` of expected.safetensors as f64; *rows and *cols get its shape. */
static double *read2(lmoe_context *ctx, lmoe_safetensors *st, const char *name, int64_t *rows, int64_t *cols) {
  int32_t idx;
  if (lmoe_safetensors_find(st, name, &idx) != LMOE_OK) return NULL;
  lmoe_tensor_info ti;
  OK(ctx, lmoe_safetensors_tensor(st, idx, &ti));
  CHECK(ti.ndim == 2, "%s is 2-D", name);
  *rows = ti.shape[0];
  *cols = ti.shape[1];
  double *d = malloc((size_t)ti.numel * sizeof(double));
  if (ti.dtype == LMOE_DTYPE_I32) {
    int32_t *i32 = malloc((size_t)ti.numel * sizeof(int32_t));
    OK(ctx, lmoe_safetensors_read(st, idx, i32, LMOE_DTYPE_I32, ti.numel));
    for (int64_t k = 0; k < ti.numel; k++) d[k] = i32[k];
    free(i32);
  } else {
    OK(ctx, lmoe_safetensors_read(st, idx, d, LMOE_DTYPE_F64, ti.numel));
  }
  return d;
}

static const char *meta(lmoe_context *ctx, lmoe_safetensors *st, const char *key) {
  for (int32_t i = 0; i < lmoe_safetensors_metadata_count(st); i++) {
    const char *k, *v;
    OK(ctx, lmoe_safetensors_metadata(st, i, &k, &v));
    if (!strcmp(k, key)) return v;
  }
  return NULL;
}

/* Forward + reference for a batch; compares rows with want. */
static void run(lmoe_context *ctx, lmoe_layer *layer, lmoe_pool *pool, int nreq, const int32_t *tok,
                const int32_t *slots, lmoe_buffer *x, lmoe_buffer *logits, const double *want, int M, int H,
                const char *what) {
  lmoe_batch *batch;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  OK(ctx, lmoe_batch_set(batch, pool, nreq, tok, slots));
  lmoe_buffer *out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  int64_t shape[2] = {M, H};
  lmoe_buffer *ref;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, shape, &ref));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = batch, a.x = x, a.router_logits = logits, a.out = out;
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  a.out = ref;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  double *got = malloc((size_t)M * H * sizeof(double)), *gref = malloc((size_t)M * H * sizeof(double));
  OK(ctx, lmoe_buffer_read(out, 0, got, LMOE_DTYPE_F64, (int64_t)M * H));
  OK(ctx, lmoe_buffer_read(ref, 0, gref, LMOE_DTYPE_F64, (int64_t)M * H));
  double ef = rel_l2(got, want, (long)M * H), er = rel_l2(gref, want, (long)M * H);
  printf("%-40s forward rel L2 %.3g, reference %.3g\n", what, ef, er);
  CHECK(er < 1e-2, "%s: reference vs PEFT rel L2 %.3g", what, er);
  CHECK(ef < 1e-2, "%s: forward vs PEFT rel L2 %.3g", what, ef);
  free(got);
  free(gref);
  lmoe_buffer_release(out);
  lmoe_buffer_release(ref);
  lmoe_batch_release(batch);
}

static int test_family(lmoe_context *ctx, const char *dir, const char *family) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s/expected.safetensors", dir, family);
  struct stat sb;
  if (stat(path, &sb) != 0) return 0;
  lmoe_safetensors *ex;
  OK(ctx, lmoe_safetensors_open(ctx, path, &ex));
  const char *ls = meta(ctx, ex, "layer"), *ks = meta(ctx, ex, "top_k");
  CHECK(ls && ks, "expected.safetensors names the layer and top_k");
  if (!ls || !ks) return 1;
  int L = atoi(ls), K = atoi(ks);
  printf("%s: transformers %s, peft %s, layer %d, top_k %d\n", family, meta(ctx, ex, "transformers"),
         meta(ctx, ex, "peft"), L, K);
  int64_t M, H, M2, E;
  double *x = read2(ctx, ex, "x", &M, &H), *logits_py = read2(ctx, ex, "router_logits", &M2, &E);
  double *base = read2(ctx, ex, "out_base", &M2, &H);
  CHECK(x && logits_py && base, "x, router_logits and out_base present");

  /* the base layer and its router from the checkpoint */
  snprintf(path, sizeof path, "%s/%s", dir, family);
  lmoe_checkpoint *ck;
  OK(ctx, lmoe_checkpoint_open(ctx, path, &ck));
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, L, &info));
  int want_family = !strcmp(family, "qwen") ? LMOE_FAMILY_QWEN : LMOE_FAMILY_MIXTRAL;
  CHECK(info.family == want_family && info.num_experts == E && info.hidden == H && info.has_router,
        "%s: checkpoint layer info family %d E %d H %d", family, info.family, info.num_experts, info.hidden);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = info.num_experts;
  lc.hidden = info.hidden;
  lc.intermediate = info.intermediate;
  lc.top_k = K;
  lc.renormalize = 1;
  lc.max_tokens = (int32_t)M;
  lmoe_layer *layer;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  lmoe_buffer *router;
  OK(ctx, lmoe_checkpoint_load_layer(ck, L, layer, &router));
  double *rw = malloc((size_t)(E * H) * sizeof(double));
  OK(ctx, lmoe_buffer_read(router, 0, rw, LMOE_DTYPE_F64, E * H));
  /* logits = x · routerᵀ, here; they must equal PEFT's side */
  float *lg = malloc((size_t)(M * E) * sizeof(float));
  double *lgd = malloc((size_t)(M * E) * sizeof(double));
  for (int64_t t = 0; t < M; t++)
    for (int64_t e = 0; e < E; e++) {
      double s = 0;
      for (int64_t h = 0; h < H; h++) s += x[t * H + h] * rw[e * H + h];
      lgd[t * E + e] = s;
      lg[t * E + e] = (float)s;
    }
  double el = rel_l2(lgd, logits_py, (long)(M * E));
  CHECK(el < 1e-9, "%s: router logits from the checkpoint vs transformers rel L2 %.3g", family, el);
  lmoe_buffer *xb = test_buffer(ctx, LMOE_DTYPE_BF16, M, H), *lb = test_buffer(ctx, LMOE_DTYPE_F32, M, E);
  OK(ctx, lmoe_buffer_write(xb, 0, x, LMOE_DTYPE_F64, M * H));
  OK(ctx, lmoe_buffer_write(lb, 0, lg, LMOE_DTYPE_F32, M * E));

  int32_t all[1] = {(int32_t)M};
  char what[128];
  snprintf(what, sizeof what, "%s base", family);
  run(ctx, layer, NULL, 1, all, NULL, xb, lb, base, (int)M, (int)H, what);

  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 2;
  pc.max_rank = 8;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  static const char *layouts[2] = {"per_expert", "fused"};
  int adapters = 0;
  for (int li = 0; li < 2; li++) {
    char key[64];
    snprintf(key, sizeof key, "out_%s", layouts[li]);
    int64_t r, c;
    double *want = read2(ctx, ex, key, &r, &c);
    if (!want) continue; /* the fixture's transformers had no such layout */
    adapters++;
    snprintf(path, sizeof path, "%s/%s/%s", dir, family, layouts[li]);
    lmoe_peft *peft;
    OK(ctx, lmoe_peft_open(ctx, path, &peft));
    char text[2048];
    OK(ctx, lmoe_peft_inspect(peft, text, sizeof text, NULL));
    printf("%s", text);
    lmoe_peft_info pi;
    lmoe_peft_info_init(&pi);
    OK(ctx, lmoe_peft_get_info(peft, &pi));
    CHECK(pi.layout == (li == 0 ? LMOE_PEFT_PER_EXPERT : LMOE_PEFT_FUSED) && pi.num_layers == 2,
          "%s %s: layout %d, %d layers", family, layouts[li], pi.layout, pi.num_layers);
    int32_t slot;
    OK(ctx, lmoe_pool_load_peft(pool, layouts[li], peft, L, &slot));
    /* every token on the adapter */
    int32_t sl1[1] = {slot};
    snprintf(what, sizeof what, "%s %s", family, layouts[li]);
    run(ctx, layer, pool, 1, all, sl1, xb, lb, want, (int)M, (int)H, what);
    /* mixed: adapter, none, adapter */
    int32_t tok[3] = {(int32_t)M / 3, (int32_t)M / 3, (int32_t)(M - 2 * (M / 3))}, sl3[3] = {slot, -1, slot};
    double *mixed = malloc((size_t)(M * H) * sizeof(double));
    for (int64_t t = 0; t < M; t++)
      memcpy(mixed + t * H, (t >= tok[0] && t < tok[0] + tok[1] ? base : want) + t * H, (size_t)H * sizeof(double));
    snprintf(what, sizeof what, "%s %s + base, mixed", family, layouts[li]);
    run(ctx, layer, pool, 3, tok, sl3, xb, lb, mixed, (int)M, (int)H, what);
    free(mixed);
    free(want);
    lmoe_peft_close(peft);
  }
  CHECK(adapters > 0, "%s: the fixture has at least one adapter's expected output", family);
  lmoe_pool_release(pool);
  lmoe_buffer_release(xb);
  lmoe_buffer_release(lb);
  lmoe_buffer_release(router);
  lmoe_layer_release(layer);
  lmoe_checkpoint_close(ck);
  lmoe_safetensors_close(ex);
  free(x);
  free(logits_py);
  free(base);
  free(rw);
  free(lg);
  free(lgd);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
    return 2;
  }
  lmoe_context *ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  int families = test_family(ctx, argv[1], "qwen") + test_family(ctx, argv[1], "mixtral");
  CHECK(families > 0, "the fixture directory %s has a family with expected.safetensors", argv[1]);
  lmoe_context_release(ctx);
  return test_summary();
}
