/* FP8 e4m3 experts with bf16 adapters on the cpu backend (issue 12; docs/formats.md,
   "FP8"): the e4m3 conversion on every code, rounding, saturation and NaN; FP8 layers
   against the float64 reference of their dequantized weights, with and without
   adapters of mixed ranks, per-expert and fused; the adapters' effect identical to the
   bf16 path's; the LoRA shrink reading the unquantized activations; the checkpoint
   quantizer, loader and their refusals. argv[1]: a directory for the files. */
#include "test_util.h"
#include "../kernels/fp8_quot.h"

#include <errno.h>
#include <sys/stat.h>

static lmoe_context *ctx;
static const char *work;

/* e4m3fn by its definition, independently of the library */
static double e4m3_value(int c) {
  int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  double v = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
  return s ? -v : v;
}

static uint8_t to_code(double v) {
  lmoe_buffer *b = NULL;
  int64_t shape[1] = {1};
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F8_E4M3, LMOE_MEMORY_HOST, 1, shape, &b));
  OK(ctx, lmoe_buffer_write(b, 0, &v, LMOE_DTYPE_F64, 1));
  uint8_t c;
  OK(ctx, lmoe_buffer_read(b, 0, &c, LMOE_DTYPE_F8_E4M3, 1));
  lmoe_buffer_release(b);
  return c;
}

/* The GPU quantizers' quotient by reciprocal (kernels/fp8_quot.h) against the IEEE
   division the rule names: for scales the kernels give it (s = RN(amax / 448) >= 2^-90,
   |v| <= amax, v a bf16 value) equal, or both below 2^-10 with one sign, so the e4m3
   code is the same. Random groups, and their maxima and zeros. */
static float bf16_value(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void test_quotient(void) {
  long n = 0, bad = 0;
  for (int g = 0; g < 20000; g++) {
    float amax;
    do amax = bf16_value((uint16_t)(test_rand() & 0x7fff));
    while (!(amax > 0.0f) || isinf(amax));
    const float s = amax / 448.0f;
    if (s < LMOE_FP8_QUOT_MIN_S) continue; /* the kernels divide exactly there */
    const float r = 1.0f / s;
    for (int k = 0; k < 520; k++) {
      float v = k < 4 ? (k & 1 ? -1.0f : 1.0f) * (k < 2 ? amax : 0.0f) : bf16_value((uint16_t)test_rand());
      if (isnan(v) || isinf(v)) continue;
      if (fabsf(v) > amax) v = copysignf(amax, v);
      const float q = v / s, q1 = lmoe_fp8_quot(v, s, r);
      const bool same = memcmp(&q, &q1, 4) == 0 ||
                        (fabsf(q) < 0x1p-10f && fabsf(q1) < 0x1p-10f && signbit(q) == signbit(q1));
      n++;
      if (!same && bad++ < 5) fprintf(stderr, "v %a s %a: %a against %a\n", v, s, q1, q);
    }
  }
  CHECK(bad == 0 && n > 5000000, "the quotient by reciprocal differs from v / s in %ld of %ld", bad, n);
}

static void test_codec(void) {
  CHECK(lmoe_dtype_size(LMOE_DTYPE_F8_E4M3) == 1 && !strcmp(lmoe_dtype_name(LMOE_DTYPE_F8_E4M3), "f8_e4m3"),
        "f8_e4m3 size %zu name %s", lmoe_dtype_size(LMOE_DTYPE_F8_E4M3), lmoe_dtype_name(LMOE_DTYPE_F8_E4M3));
  /* every code decodes to its value and encodes back to itself */
  uint8_t codes[256];
  double vals[256];
  for (int c = 0; c < 256; c++) codes[c] = (uint8_t)c;
  lmoe_buffer *b = NULL;
  int64_t shape[1] = {256};
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F8_E4M3, LMOE_MEMORY_HOST, 1, shape, &b));
  OK(ctx, lmoe_buffer_write(b, 0, codes, LMOE_DTYPE_F8_E4M3, 256));
  OK(ctx, lmoe_buffer_read(b, 0, vals, LMOE_DTYPE_F64, 256));
  int bad = 0;
  for (int c = 0; c < 256; c++) {
    double want = e4m3_value(c);
    bool same = isnan(want) ? isnan(vals[c]) : vals[c] == want && signbit(vals[c]) == signbit(want);
    if (!same && bad++ < 5) CHECK(0, "code 0x%02x decodes to %.9g, want %.9g", c, vals[c], want);
  }
  CHECK(bad == 0, "%d codes decode wrongly", bad);
  OK(ctx, lmoe_buffer_write(b, 0, vals, LMOE_DTYPE_F64, 256));
  uint8_t back[256];
  OK(ctx, lmoe_buffer_read(b, 0, back, LMOE_DTYPE_F8_E4M3, 256));
  bad = 0;
  for (int c = 0; c < 256; c++)
    if (back[c] != c && bad++ < 5) CHECK(0, "code 0x%02x: value %.9g encodes to 0x%02x", c, vals[c], back[c]);
  CHECK(bad == 0, "%d codes do not round-trip", bad);
  lmoe_buffer_release(b);
  /* between neighbours: below the midpoint down, above up, on it to the even code */
  bad = 0;
  for (int c = 0; c < 0x7e; c++) {
    double lo = e4m3_value(c), hi = e4m3_value(c + 1), mid = (lo + hi) / 2, d = (hi - lo) / 1024;
    int even = c % 2 == 0 ? c : c + 1;
    if (to_code(mid) != even || to_code(mid - d) != c || to_code(mid + d) != c + 1 || to_code(-mid) != (0x80 | even))
      if (bad++ < 5)
        CHECK(0, "between 0x%02x and 0x%02x: mid %.9g -> 0x%02x, below -> 0x%02x, above -> 0x%02x", c, c + 1, mid,
              to_code(mid), to_code(mid - d), to_code(mid + d));
  }
  CHECK(bad == 0, "%d neighbour pairs round wrongly", bad);
  /* saturation (no infinities in e4m3fn) and NaN */
  CHECK(to_code(448) == 0x7e && to_code(449) == 0x7e && to_code(480) == 0x7e && to_code(1e30) == 0x7e &&
            to_code(INFINITY) == 0x7e && to_code(-INFINITY) == 0xfe && to_code(-1e9) == 0xfe,
        "saturation: 449 -> 0x%02x, inf -> 0x%02x, -inf -> 0x%02x", to_code(449), to_code(INFINITY),
        to_code(-INFINITY));
  CHECK(to_code(NAN) == 0x7f && to_code(-NAN) == 0xff, "NaN -> 0x%02x, -NaN -> 0x%02x", to_code(NAN), to_code(-NAN));
  CHECK(to_code(ldexp(1, -10)) == 0x00 && to_code(ldexp(1.0001, -10)) == 0x01 && to_code(ldexp(3, -10)) == 0x02 &&
            to_code(-0.0) == 0x80 && to_code(ldexp(1, -20)) == 0x00,
        "subnormal rounding: 2^-10 -> 0x%02x, 3*2^-10 -> 0x%02x", to_code(ldexp(1, -10)), to_code(ldexp(3, -10)));
}

/* ---------------------------------------------------------------- layers */

static lmoe_layer *make_layer(int E, int H, int I, int K, int32_t wdt) {
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = 256;
  lc.weight_dtype = wdt;
  lmoe_layer *l = NULL;
  OK(ctx, lmoe_layer_create(ctx, &lc, &l));
  return l;
}

typedef struct run {
  lmoe_buffer *x, *logits, *out, *ref;
  lmoe_batch *batch;
  int64_t M;
} run;

/* requests of 7..19 tokens cycling through the slots and no adapter */
static run make_run(int64_t M, int H, int E, lmoe_pool *pool, int nslots) {
  run r = {0};
  r.M = M;
  r.x = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  r.logits = test_buffer(ctx, LMOE_DTYPE_F32, M, E);
  r.out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  r.ref = test_buffer(ctx, LMOE_DTYPE_F32, M, H);
  OK(ctx, lmoe_buffer_fill_random(r.x, 11, -1, 1, NULL));
  OK(ctx, lmoe_buffer_fill_random(r.logits, 12, -2, 2, NULL));
  int32_t tok[64], sl[64], n = 0;
  for (int64_t t = 0; t < M; n++) {
    tok[n] = (int32_t)(7 + n * 5 % 13 < M - t ? 7 + n * 5 % 13 : M - t);
    sl[n] = pool && n % (nslots + 1) < nslots ? n % (nslots + 1) : LMOE_NO_ADAPTER;
    t += tok[n];
  }
  OK(ctx, lmoe_batch_create(ctx, &r.batch));
  OK(ctx, lmoe_batch_set(r.batch, pool, n, tok, sl));
  return r;
}

static void free_run(run *r) {
  lmoe_buffer_release(r->x), lmoe_buffer_release(r->logits), lmoe_buffer_release(r->out);
  lmoe_buffer_release(r->ref), lmoe_batch_release(r->batch);
}

static lmoe_compare_result forward_vs_reference(lmoe_layer *l, lmoe_pool *p, run *r) {
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = l, a.pool = p, a.batch = r->batch, a.x = r->x, a.router_logits = r->logits, a.out = r->out;
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  a.out = r->ref;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  lmoe_compare_result c;
  OK(ctx, lmoe_buffer_compare(r->out, r->ref, &c));
  return c;
}

/* Adapters of mixed ranks: separate gate/up/down, fused gate_up, down only. */
static lmoe_pool *make_pool(lmoe_layer *l) {
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 3, pc.max_rank = 16;
  lmoe_pool *p = NULL;
  OK(ctx, lmoe_pool_create(l, &pc, &p));
  static const struct { int targets, fused, rank; } ads[3] = {{LMOE_TARGET_ALL, 0, 16}, {LMOE_TARGET_ALL, 1, 4},
                                                              {LMOE_TARGET_DOWN, 0, 8}};
  for (int s = 0; s < 3; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.targets = ads[s].targets, ra.fused = ads[s].fused, ra.rank = ads[s].rank, ra.alpha = 2.0f * ads[s].rank;
    ra.seed = 100 + (uint64_t)s, ra.scale = 0.05f;
    OK(ctx, lmoe_pool_load_random(p, s, &ra));
  }
  return p;
}

static void test_layer_vs_reference(void) {
  /* H and I not multiples of 128: partial blocks, and up's blocks start mid-row-block */
  enum { E = 4, H = 320, I = 200, K = 2, M = 90 };
  lmoe_layer *l = make_layer(E, H, I, K, LMOE_DTYPE_F8_E4M3);
  OK(ctx, lmoe_layer_randomize(l, 5, 0.08f));
  lmoe_layer_config got;
  lmoe_layer_config_init(&got);
  OK(ctx, lmoe_layer_get_config(l, &got));
  CHECK(got.weight_dtype == LMOE_DTYPE_F8_E4M3, "weight_dtype %d", got.weight_dtype);
  lmoe_buffer *w13, *s13, *s2;
  lmoe_buffer_desc d13, ds13, ds2;
  OK(ctx, lmoe_layer_weights(l, 0, &w13));
  OK(ctx, lmoe_layer_weights(l, 2, &s13));
  OK(ctx, lmoe_layer_weights(l, 3, &s2));
  lmoe_buffer_describe(w13, &d13), lmoe_buffer_describe(s13, &ds13), lmoe_buffer_describe(s2, &ds2);
  CHECK(d13.dtype == LMOE_DTYPE_F8_E4M3 && d13.bytes == (size_t)E * 2 * I * H, "W13 %s, %zu bytes",
        lmoe_dtype_name(d13.dtype), d13.bytes);
  CHECK(ds13.dtype == LMOE_DTYPE_F32 && ds13.shape[0] == E && ds13.shape[1] == 4 && ds13.shape[2] == 3 &&
            ds2.shape[1] == 3 && ds2.shape[2] == 2,
        "scale shapes [%lld, %lld, %lld] and [%lld, %lld, %lld]", (long long)ds13.shape[0], (long long)ds13.shape[1],
        (long long)ds13.shape[2], (long long)ds2.shape[0], (long long)ds2.shape[1], (long long)ds2.shape[2]);
  /* without adapters, then with */
  run r = make_run(M, H, E, NULL, 0);
  lmoe_compare_result c = forward_vs_reference(l, NULL, &r);
  CHECK(c.rel_l2 < 4e-3 && c.nonfinite == 0, "FP8 layer, no adapters: rel_l2 %.3g", c.rel_l2);
  free_run(&r);
  lmoe_pool *p = make_pool(l);
  r = make_run(M, H, E, p, 3);
  c = forward_vs_reference(l, p, &r);
  CHECK(c.rel_l2 < 4e-3 && c.nonfinite == 0, "FP8 layer, mixed adapters: rel_l2 %.3g", c.rel_l2);
  /* the FP8 layer is not the bf16 layer of the same seed: the quantization shows */
  lmoe_layer *lb = make_layer(E, H, I, K, LMOE_DTYPE_BF16);
  OK(ctx, lmoe_layer_randomize(lb, 5, 0.08f));
  lmoe_pool *pb = make_pool(lb);
  run rb = make_run(M, H, E, pb, 3);
  lmoe_compare_result cb = forward_vs_reference(lb, pb, &rb);
  lmoe_compare_result cq;
  OK(ctx, lmoe_buffer_compare(r.out, rb.out, &cq));
  CHECK(cb.rel_l2 < 4e-3 && cq.rel_l2 > 5e-3 && cq.rel_l2 < 0.1,
        "bf16 layer rel_l2 %.3g; FP8 vs bf16 of one seed differ by %.3g (quantization)", cb.rel_l2, cq.rel_l2);
  free_run(&r), free_run(&rb);
  lmoe_pool_release(p), lmoe_pool_release(pb);
  lmoe_layer_release(l), lmoe_layer_release(lb);
}

/* Weights an FP8 layer holds exactly and bf16 does too (codes times powers of two):
   the FP8 and bf16 layers are then the same layer, and their outputs, with adapters
   and without, must be bit for bit equal: the adapters' effect is the bf16 path's. */
static void test_adapter_effect_equal(void) {
  enum { E = 3, H = 192, I = 160, K = 2, M = 70 };
  const int64_t nbh = 2, nbi = 2, n13 = (int64_t)E * 2 * I * H, n2 = (int64_t)E * H * I;
  uint8_t *c13 = malloc((size_t)n13), *c2 = malloc((size_t)n2);
  float *s13 = malloc(sizeof(float) * E * 2 * nbi * nbh), *s2 = malloc(sizeof(float) * E * nbh * nbi);
  double *v13 = malloc(sizeof(double) * (size_t)n13), *v2 = malloc(sizeof(double) * (size_t)n2);
  for (int64_t i = 0; i < E * 2 * nbi * nbh; i++) s13[i] = ldexpf(1.0f, -10 - (int)(i % 3));
  for (int64_t i = 0; i < E * nbh * nbi; i++) s2[i] = ldexpf(1.0f, -9 - (int)(i % 4));
  for (int64_t i = 0; i < n13; i++) {
    int c = test_randint(0, 255);
    if ((c & 0x7f) == 0x7f) c = 0x10; /* no NaN */
    c13[i] = (uint8_t)c;
    int64_t e = i / (2 * I * H), o = i / H % (2 * I), q = i % H, part = o / I, rr = o % I;
    v13[i] = e4m3_value(c) * s13[((e * 2 + part) * nbi + rr / 128) * nbh + q / 128];
  }
  for (int64_t i = 0; i < n2; i++) {
    int c = test_randint(0, 255);
    if ((c & 0x7f) == 0x7f) c = 0x90;
    c2[i] = (uint8_t)c;
    int64_t e = i / (H * I), o = i / I % H, q = i % I;
    v2[i] = e4m3_value(c) * s2[(e * nbh + o / 128) * nbi + q / 128];
  }
  lmoe_layer *l8 = make_layer(E, H, I, K, LMOE_DTYPE_F8_E4M3), *lb = make_layer(E, H, I, K, LMOE_DTYPE_BF16);
  OK(ctx, lmoe_layer_set_weights(l8, c13, c2, LMOE_DTYPE_F8_E4M3)); /* codes as they are */
  lmoe_buffer *b13, *b2;
  OK(ctx, lmoe_layer_weights(l8, 2, &b13));
  OK(ctx, lmoe_layer_weights(l8, 3, &b2));
  OK(ctx, lmoe_buffer_write(b13, 0, s13, LMOE_DTYPE_F32, E * 2 * nbi * nbh));
  OK(ctx, lmoe_buffer_write(b2, 0, s2, LMOE_DTYPE_F32, E * nbh * nbi));
  OK(ctx, lmoe_layer_set_weights(lb, v13, v2, LMOE_DTYPE_F64)); /* exact in bf16 */
  lmoe_pool *p8 = make_pool(l8), *pb = make_pool(lb);
  for (int with = 0; with < 2; with++) {
    run r8 = make_run(M, H, E, with ? p8 : NULL, 3), rb = make_run(M, H, E, with ? pb : NULL, 3);
    lmoe_compare_result c8 = forward_vs_reference(l8, with ? p8 : NULL, &r8);
    lmoe_compare_result cb = forward_vs_reference(lb, with ? pb : NULL, &rb);
    lmoe_compare_result same, refs;
    OK(ctx, lmoe_buffer_compare(r8.out, rb.out, &same));
    OK(ctx, lmoe_buffer_compare(r8.ref, rb.ref, &refs));
    CHECK(same.max_abs == 0 && refs.max_abs == 0 && c8.rel_l2 < 4e-3 && cb.rel_l2 < 4e-3,
          "%s adapters: FP8 and bf16 outputs differ by %.3g (references by %.3g); vs reference %.3g and %.3g",
          with ? "with" : "without", same.max_abs, refs.max_abs, c8.rel_l2, cb.rel_l2);
    free_run(&r8), free_run(&rb);
  }
  lmoe_pool_release(p8), lmoe_pool_release(pb);
  lmoe_layer_release(l8), lmoe_layer_release(lb);
  free(c13), free(c2), free(s13), free(s2), free(v13), free(v2);
}

/* The LoRA shrink must read the bf16 activations, never their FP8 quantization (the
   bug of issue 12's "gibberish" engine). Gate and up base weights are zero, so gate and
   up are the adapter's alone; the activations have one large value per 128-group, so
   quantizing them per token and group (scale = amax / 448, as an FP8 GEMM does) moves
   the small ones a lot, and the adapter's A is zero on the large ones (they set the
   scale but add nothing). The layer must match the reference on the exact activations
   and be far from the reference on the quantized ones. */
static void test_lora_reads_unquantized(void) {
  enum { E = 2, H = 256, I = 128, K = 1, M = 40 };
  lmoe_layer *l = make_layer(E, H, I, K, LMOE_DTYPE_F8_E4M3);
  OK(ctx, lmoe_layer_randomize(l, 9, 0.1f));
  float *zero = calloc((size_t)I * H, sizeof *zero);
  for (int e = 0; e < E; e++) OK(ctx, lmoe_layer_set_expert(l, e, zero, zero, NULL, LMOE_DTYPE_F32));
  free(zero);
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 1, pc.max_rank = 8;
  lmoe_pool *p = NULL;
  OK(ctx, lmoe_pool_create(l, &pc, &p));
  enum { R = 8 };
  float *ag = malloc(sizeof(float) * E * R * H), *au = malloc(sizeof(float) * E * R * H);
  float *bg = malloc(sizeof(float) * E * I * R), *bu = malloc(sizeof(float) * E * I * R);
  for (int64_t i = 0; i < (int64_t)E * R * H; i++) {
    bool big = i % H % 128 == 5;
    ag[i] = big ? 0.0f : test_randf(-0.3f, 0.3f), au[i] = big ? 0.0f : test_randf(-0.3f, 0.3f);
  }
  for (int64_t i = 0; i < (int64_t)E * I * R; i++) bg[i] = test_randf(-0.3f, 0.3f), bu[i] = test_randf(-0.3f, 0.3f);
  lmoe_adapter_desc ad;
  lmoe_adapter_desc_init(&ad);
  ad.dtype = LMOE_DTYPE_F32;
  ad.gate = (lmoe_lora_part){ag, bg, R, 1.0f};
  ad.up = (lmoe_lora_part){au, bu, R, 1.0f};
  OK(ctx, lmoe_pool_load(p, 0, &ad));
  free(ag), free(au), free(bg), free(bu);
  run r = make_run(M, H, E, p, 1);
  int32_t tok[1] = {M}, sl[1] = {0};
  OK(ctx, lmoe_batch_set(r.batch, p, 1, tok, sl));
  float *x = malloc(sizeof(float) * M * H), *xq = malloc(sizeof(float) * M * H);
  for (int64_t i = 0; i < (int64_t)M * H; i++) x[i] = i % 128 == 5 ? 1000.0f : test_randf(-1, 1);
  OK(ctx, lmoe_buffer_write(r.x, 0, x, LMOE_DTYPE_F32, M * H));
  OK(ctx, lmoe_buffer_read(r.x, 0, x, LMOE_DTYPE_F32, M * H)); /* the bf16 values */
  for (int64_t g = 0; g < (int64_t)M * H; g += 128) {
    float amax = 0;
    for (int j = 0; j < 128; j++) amax = fabsf(x[g + j]) > amax ? fabsf(x[g + j]) : amax;
    double s = amax / 448.0;
    for (int j = 0; j < 128; j++) xq[g + j] = (float)(e4m3_value(to_code(x[g + j] / s)) * s);
  }
  lmoe_compare_result c = forward_vs_reference(l, p, &r);
  lmoe_buffer *xqb = test_buffer(ctx, LMOE_DTYPE_BF16, M, H), *refq = test_buffer(ctx, LMOE_DTYPE_F32, M, H);
  OK(ctx, lmoe_buffer_write(xqb, 0, xq, LMOE_DTYPE_F32, M * H));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = l, a.pool = p, a.batch = r.batch, a.x = xqb, a.router_logits = r.logits, a.out = refq;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  lmoe_compare_result cq;
  OK(ctx, lmoe_buffer_compare(r.out, refq, &cq));
  printf("LoRA on bf16 activations: rel_l2 %.3g; against the quantized ones %.3g\n", c.rel_l2, cq.rel_l2);
  CHECK(c.rel_l2 < 4e-3 && c.ref_l2 > 0 && cq.rel_l2 > 8 * c.rel_l2 && cq.rel_l2 > 0.02,
        "LoRA on bf16 activations: rel_l2 %.3g against the exact reference, %.3g against the quantized one",
        c.rel_l2, cq.rel_l2);
  lmoe_buffer_release(xqb), lmoe_buffer_release(refq);
  free(x), free(xq);
  free_run(&r);
  lmoe_pool_release(p);
  lmoe_layer_release(l);
}

static void test_refusals(void) {
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = 2, lc.hidden = 16, lc.intermediate = 8, lc.weight_dtype = LMOE_DTYPE_F16;
  lmoe_layer *l = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l));
  CHECK(strstr(lmoe_context_last_error(ctx), "weight_dtype") != NULL, "%s", lmoe_context_last_error(ctx));
  lc.weight_dtype = LMOE_DTYPE_F8_E4M3, lc.shard_size = 2;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l)); /* no comm */
  lmoe_layer *lb = make_layer(2, 16, 8, 1, LMOE_DTYPE_BF16);
  lmoe_buffer *b = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_weights(lb, 2, &b));
  uint8_t codes[2 * 2 * 8 * 16] = {0};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_set_weights(lb, codes, NULL, LMOE_DTYPE_F8_E4M3));
  lmoe_layer_release(lb);
}

/* ---------------------------------------------------------------- checkpoints */

enum { CE = 3, CH = 160, CI = 128 };

/* A bf16 checkpoint of one MoE layer (layer 1), per-expert or fused, with a router. */
static void write_bf16_checkpoint(const char *path, bool fused, uint16_t *w13, uint16_t *w2) {
  for (int64_t i = 0; i < (int64_t)CE * 2 * CI * CH; i++) {
    float v = test_randf(-0.2f, 0.2f);
    memcpy(&w13[i], (char *)&v + 2, 2);
  }
  for (int64_t i = 0; i < (int64_t)CE * CH * CI; i++) {
    float v = test_randf(-0.2f, 0.2f);
    memcpy(&w2[i], (char *)&v + 2, 2);
  }
  static float router[CE * CH];
  for (int i = 0; i < CE * CH; i++) router[i] = test_randf(-1, 1);
  lmoe_tensor_entry t[3 * CE + 1];
  char names[3 * CE + 1][96];
  memset(t, 0, sizeof t);
  int n = 0;
  if (fused) {
    snprintf(names[n], 96, "model.layers.1.mlp.experts.gate_up_proj");
    t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_BF16, 3, {CE, 2 * CI, CH}, w13}, n++;
    snprintf(names[n], 96, "model.layers.1.mlp.experts.down_proj");
    t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_BF16, 3, {CE, CH, CI}, w2}, n++;
  } else {
    for (int e = 0; e < CE; e++) {
      snprintf(names[n], 96, "model.layers.1.mlp.experts.%d.gate_proj.weight", e);
      t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_BF16, 2, {CI, CH}, w13 + (size_t)e * 2 * CI * CH}, n++;
      snprintf(names[n], 96, "model.layers.1.mlp.experts.%d.up_proj.weight", e);
      t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_BF16, 2, {CI, CH}, w13 + ((size_t)e * 2 + 1) * CI * CH}, n++;
      snprintf(names[n], 96, "model.layers.1.mlp.experts.%d.down_proj.weight", e);
      t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_BF16, 2, {CH, CI}, w2 + (size_t)e * CH * CI}, n++;
    }
  }
  snprintf(names[n], 96, "model.layers.1.mlp.gate.weight");
  t[n] = (lmoe_tensor_entry){names[n], LMOE_DTYPE_F32, 2, {CE, CH}, router}, n++;
  OK(ctx, lmoe_safetensors_write(ctx, path, n, t, 0, NULL, NULL));
}

static void same_bytes(lmoe_layer *a, lmoe_layer *b, int which, const char *what) {
  lmoe_buffer *x, *y;
  OK(ctx, lmoe_layer_weights(a, which, &x));
  OK(ctx, lmoe_layer_weights(b, which, &y));
  lmoe_buffer_desc dx, dy;
  lmoe_buffer_describe(x, &dx), lmoe_buffer_describe(y, &dy);
  CHECK(dx.bytes == dy.bytes && !memcmp(dx.data, dy.data, dx.bytes), "%s: storage %d differs", what, which);
}

static void test_checkpoint(bool fused) {
  const char *what = fused ? "fused" : "per-expert";
  char src[4096], dst[4096];
  snprintf(src, sizeof src, "%s/bf16_%s.safetensors", work, what);
  snprintf(dst, sizeof dst, "%s/fp8_%s.safetensors", work, what);
  uint16_t *w13 = malloc(sizeof(uint16_t) * CE * 2 * CI * CH), *w2 = malloc(sizeof(uint16_t) * CE * CH * CI);
  write_bf16_checkpoint(src, fused, w13, w2);
  OK(ctx, lmoe_checkpoint_quantize_fp8(ctx, src, dst));

  /* the published names, dtypes and shapes */
  lmoe_safetensors *st = NULL;
  OK(ctx, lmoe_safetensors_open(ctx, dst, &st));
  const char *wname = fused ? "model.layers.1.mlp.experts.gate_up_proj" : "model.layers.1.mlp.experts.2.up_proj.weight";
  const char *sname = fused ? "model.layers.1.mlp.experts.gate_up_proj_scales_inv"
                            : "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv";
  int32_t iw = -1, is = -1, ir = -1;
  lmoe_safetensors_find(st, wname, &iw);
  lmoe_safetensors_find(st, sname, &is);
  lmoe_safetensors_find(st, "model.layers.1.mlp.gate.weight", &ir);
  lmoe_tensor_info tw = {0}, ts = {0}, tr = {0};
  if (iw >= 0) lmoe_safetensors_tensor(st, iw, &tw);
  if (is >= 0) lmoe_safetensors_tensor(st, is, &ts);
  if (ir >= 0) lmoe_safetensors_tensor(st, ir, &tr);
  CHECK(iw >= 0 && !strcmp(tw.dtype_name, "F8_E4M3") && tw.dtype == LMOE_DTYPE_F8_E4M3, "%s: %s is %s", what, wname,
        iw >= 0 ? tw.dtype_name : "missing");
  CHECK(is >= 0 && !strcmp(ts.dtype_name, "F32") &&
            (fused ? ts.ndim == 3 && ts.shape[0] == CE && ts.shape[1] == 2 && ts.shape[2] == 2
                   : ts.ndim == 2 && ts.shape[0] == 1 && ts.shape[1] == 2),
        "%s: scales %s: %s, ndim %d", what, sname, is >= 0 ? ts.dtype_name : "missing", ts.ndim);
  CHECK(ir >= 0 && !strcmp(tr.dtype_name, "F32"), "%s: the router is copied as it is", what);
  lmoe_safetensors_close(st);

  /* loads into an FP8 layer: the same codes and scales set_weights gives */
  lmoe_checkpoint *ck = NULL;
  OK(ctx, lmoe_checkpoint_open(ctx, dst, &ck));
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, 1, &info));
  CHECK(info.weight_dtype == LMOE_DTYPE_F8_E4M3 && info.num_experts == CE && info.hidden == CH &&
            info.intermediate == CI,
        "%s: layer info dtype %d E %d H %d I %d", what, info.weight_dtype, info.num_experts, info.hidden,
        info.intermediate);
  lmoe_layer *l8 = make_layer(CE, CH, CI, 2, LMOE_DTYPE_F8_E4M3), *ls = make_layer(CE, CH, CI, 2, LMOE_DTYPE_F8_E4M3);
  lmoe_buffer *router = NULL;
  OK(ctx, lmoe_checkpoint_load_layer(ck, 1, l8, &router));
  OK(ctx, lmoe_layer_set_weights(ls, w13, w2, LMOE_DTYPE_BF16));
  for (int which = 0; which < 4; which++) same_bytes(l8, ls, which, what);
  /* and computes it */
  lmoe_pool *p = make_pool(l8);
  run r = make_run(60, CH, CE, p, 3);
  lmoe_compare_result c = forward_vs_reference(l8, p, &r);
  CHECK(c.rel_l2 < 4e-3, "%s: the loaded FP8 layer vs reference: rel_l2 %.3g", what, c.rel_l2);
  free_run(&r);
  lmoe_pool_release(p);
  lmoe_buffer_release(router);

  /* FP8 into bf16 and bf16 into FP8: refused, saying so */
  lmoe_layer *lb = make_layer(CE, CH, CI, 2, LMOE_DTYPE_BF16);
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_checkpoint_load_layer(ck, 1, lb, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "F8_E4M3") != NULL, "%s", lmoe_context_last_error(ctx));
  lmoe_checkpoint_close(ck);
  OK(ctx, lmoe_checkpoint_open(ctx, src, &ck));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_checkpoint_load_layer(ck, 1, l8, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "quantize") != NULL, "%s", lmoe_context_last_error(ctx));
  OK(ctx, lmoe_checkpoint_load_layer(ck, 1, lb, NULL));
  lmoe_checkpoint_close(ck);
  lmoe_layer_release(l8), lmoe_layer_release(ls), lmoe_layer_release(lb);
  free(w13), free(w2);
}

/* Hand-made FP8 files with broken scales: each refused naming the tensor. */
static void test_malformed_scales(void) {
  enum { I = 8, H = 16 };
  static uint8_t g[I * H], u[I * H], d[H * I];
  static float s_ok[1] = {0.01f}, s_bad[2] = {0.01f, 0.01f}, s_nan[1] = {NAN};
  static const struct {
    const char *label, *want;
    int down_scale; /* 0 ok, 1 wrong shape, 2 missing, 3 NaN, 4 wrong dtype (I32) */
    lmoe_status st;
  } cases[] = {{"shape", "down_proj.weight_scale_inv' have shape [1, 2]", 1, LMOE_ERR_FORMAT},
               {"missing", "down_proj.weight_scale_inv' are missing", 2, LMOE_ERR_NOT_FOUND},
               {"nan", "down_proj.weight_scale_inv' hold nan", 3, LMOE_ERR_FORMAT},
               {"dtype", "down_proj.weight_scale_inv' are I32", 4, LMOE_ERR_FORMAT}};
  for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
    lmoe_tensor_entry t[6];
    memset(t, 0, sizeof t);
    int n = 0;
    t[n++] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.0.gate_proj.weight", LMOE_DTYPE_F8_E4M3, 2, {I, H}, g};
    t[n++] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv", LMOE_DTYPE_F32, 2, {1, 1}, s_ok};
    t[n++] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.0.up_proj.weight", LMOE_DTYPE_F8_E4M3, 2, {I, H}, u};
    t[n++] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.0.up_proj.weight_scale_inv", LMOE_DTYPE_F32, 2, {1, 1}, s_ok};
    t[n++] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.0.down_proj.weight", LMOE_DTYPE_F8_E4M3, 2, {H, I}, d};
    const char *dn = "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv";
    switch (cases[k].down_scale) {
    case 1: t[n++] = (lmoe_tensor_entry){dn, LMOE_DTYPE_F32, 2, {1, 2}, s_bad}; break;
    case 3: t[n++] = (lmoe_tensor_entry){dn, LMOE_DTYPE_F32, 2, {1, 1}, s_nan}; break;
    case 4: t[n++] = (lmoe_tensor_entry){dn, LMOE_DTYPE_I32, 2, {1, 1}, s_ok}; break;
    default: break;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/bad_scale_%s.safetensors", work, cases[k].label);
    OK(ctx, lmoe_safetensors_write(ctx, path, n, t, 0, NULL, NULL));
    lmoe_checkpoint *ck = NULL;
    OK(ctx, lmoe_checkpoint_open(ctx, path, &ck));
    lmoe_layer *l = make_layer(1, H, I, 1, LMOE_DTYPE_F8_E4M3);
    lmoe_status st = lmoe_checkpoint_load_layer(ck, 0, l, NULL);
    const char *m = lmoe_context_last_error(ctx);
    CHECK(st == cases[k].st && strstr(m, cases[k].want), "%s: %s, \"%s\"", cases[k].label, lmoe_status_string(st), m);
    lmoe_layer_release(l);
    lmoe_checkpoint_close(ck);
  }
  /* fused FP8 with I not a multiple of 128: the blocks straddle gate and up */
  static uint8_t gu[2 * I * H], dd[H * I];
  static float sgu[1] = {1}, sd[1] = {1};
  lmoe_tensor_entry t[4] = {
      {"model.layers.0.mlp.experts.gate_up_proj", LMOE_DTYPE_F8_E4M3, 3, {1, 2 * I, H}, gu},
      {"model.layers.0.mlp.experts.gate_up_proj_scales_inv", LMOE_DTYPE_F32, 3, {1, 1, 1}, sgu},
      {"model.layers.0.mlp.experts.down_proj", LMOE_DTYPE_F8_E4M3, 3, {1, H, I}, dd},
      {"model.layers.0.mlp.experts.down_proj_scales_inv", LMOE_DTYPE_F32, 3, {1, 1, 1}, sd}};
  char path[4096];
  snprintf(path, sizeof path, "%s/fused_straddle.safetensors", work);
  OK(ctx, lmoe_safetensors_write(ctx, path, 4, t, 0, NULL, NULL));
  lmoe_checkpoint *ck = NULL;
  OK(ctx, lmoe_checkpoint_open(ctx, path, &ck));
  lmoe_layer *l = make_layer(1, H, I, 1, LMOE_DTYPE_F8_E4M3);
  FAILS(ctx, LMOE_ERR_UNSUPPORTED, lmoe_checkpoint_load_layer(ck, 0, l, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "gate_up_proj") != NULL, "%s", lmoe_context_last_error(ctx));
  lmoe_layer_release(l);
  lmoe_checkpoint_close(ck);
}

int main(int argc, char **argv) {
  work = argc > 1 ? argv[1] : "test_fp8_work";
  if (mkdir(work, 0777) != 0 && errno != EEXIST) {
    perror(work);
    return 1;
  }
  test_seed("test_fp8");
  ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  test_codec();
  test_quotient();
  test_layer_vs_reference();
  test_adapter_effect_equal();
  test_lora_reads_unquantized();
  test_refusals();
  test_checkpoint(false);
  test_checkpoint(true);
  test_malformed_scales();
  lmoe_context_release(ctx);
  return test_summary();
}
