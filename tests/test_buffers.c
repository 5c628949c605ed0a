/* Buffers: write/read round trips through every dtype, bf16/f16 rounding (ties,
   NaN, Inf, subnormals) against the test's own bit-level rounding, fill and
   fill_random determinism, compare. */
#include "test_util.h"

#include <stdint.h>

static uint32_t fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float bitsf(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Expected bf16 of f: round to nearest even on the upper 16 bits; NaN stays NaN. */
static uint16_t want_bf16(float f) {
  uint32_t u = fbits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff; /* marker: any NaN */
  uint32_t lower = u & 0xffffu, upper = u >> 16;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) upper++;
  return (uint16_t)upper;
}

/* Expected f16 by exhaustive nearest search over all finite halves (slow but obvious). */
static double half_value(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * ldexp(m, -24);
  if (e == 31) return m ? NAN : s * INFINITY;
  return s * ldexp(1024 + m, e - 25);
}

static void test_bf16(lmoe_context *ctx) {
  enum { N = 4096 };
  float src[N];
  for (int i = 0; i < N; i++) src[i] = bitsf((uint32_t)test_rand());
  /* special values */
  src[0] = 0.0f, src[1] = -0.0f, src[2] = INFINITY, src[3] = -INFINITY, src[4] = NAN;
  src[5] = bitsf(0x3f808000u); /* tie, even below: stays */
  src[6] = bitsf(0x3f818000u); /* tie, odd below: rounds up */
  src[7] = bitsf(0x00000001u); /* smallest subnormal */
  src[8] = bitsf(0x007fffffu); /* largest subnormal: rounds into the normals */
  src[9] = bitsf(0x7f7fffffu); /* largest float: rounds to Inf */
  int64_t shape[1] = {N};
  lmoe_buffer *b;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_HOST, 1, shape, &b));
  OK(ctx, lmoe_buffer_write(b, 0, src, LMOE_DTYPE_F32, N));
  uint16_t raw[N];
  OK(ctx, lmoe_buffer_read(b, 0, raw, LMOE_DTYPE_BF16, N));
  int bad = 0;
  for (int i = 0; i < N; i++) {
    uint16_t w = want_bf16(src[i]);
    bool ok = w == 0xffff ? ((raw[i] & 0x7f80u) == 0x7f80u && (raw[i] & 0x7fu)) : raw[i] == w;
    if (!ok && bad++ < 5) fprintf(stderr, "bf16 of %08x: got %04x want %04x\n", fbits(src[i]), raw[i], w);
  }
  CHECK(bad == 0, "%d bf16 roundings wrong", bad);
  /* bf16 -> f32 is exact: read back as f32 equals the upper bits */
  float back[N];
  OK(ctx, lmoe_buffer_read(b, 0, back, LMOE_DTYPE_F32, N));
  bad = 0;
  for (int i = 0; i < N; i++) bad += fbits(back[i]) != (uint32_t)raw[i] << 16;
  CHECK(bad == 0, "%d bf16 -> f32 widenings wrong", bad);
  /* offset writes land where asked and leave the rest */
  float two[2] = {1.5f, -2.25f};
  OK(ctx, lmoe_buffer_write(b, 100, two, LMOE_DTYPE_F32, 2));
  OK(ctx, lmoe_buffer_read(b, 99, back, LMOE_DTYPE_F32, 4));
  CHECK(back[1] == 1.5f && back[2] == -2.25f && fbits(back[0]) == (uint32_t)raw[99] << 16 &&
            fbits(back[3]) == (uint32_t)raw[102] << 16,
        "offset write");
  lmoe_buffer_release(b);
}

static void test_f16(lmoe_context *ctx) {
  enum { N = 3000 };
  float src[N];
  for (int i = 0; i < N; i++) {
    /* magnitudes across the half range, including subnormals and overflow */
    src[i] = (test_randint(0, 1) ? -1.0f : 1.0f) * ldexpf(test_randf(1.0f, 2.0f), test_randint(-27, 17));
  }
  src[0] = 0.0f, src[1] = INFINITY, src[2] = NAN, src[3] = 65520.0f; /* rounds to Inf */
  src[4] = 65519.0f; /* stays max half */
  src[5] = ldexpf(1.0f, -25);  /* exactly half the least subnormal: ties to even (0) */
  src[6] = ldexpf(1.5f, -24);  /* between subnormals 1 and 2, tie: rounds to 2 (even) */
  int64_t shape[1] = {N};
  lmoe_buffer *b;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F16, LMOE_MEMORY_DEVICE, 1, shape, &b));
  OK(ctx, lmoe_buffer_write(b, 0, src, LMOE_DTYPE_F32, N));
  uint16_t raw[N];
  OK(ctx, lmoe_buffer_read(b, 0, raw, LMOE_DTYPE_F16, N));
  int bad = 0;
  for (int i = 0; i < N; i++) {
    double v = src[i];
    double got = half_value(raw[i]);
    if (isnan(v)) {
      bad += !isnan(got);
      continue;
    }
    /* nearest: no half is closer; on a tie the even mantissa wins */
    double err = fabs(got - v);
    bool ok = !isnan(got);
    if (isinf(got)) ok = fabs(v) >= 65520.0;
    else {
      for (int d = -1; d <= 1 && ok; d += 2) {
        uint16_t nb = (uint16_t)(raw[i] + d);
        double other = half_value(nb);
        if ((nb & 0x7c00) == 0x7c00 || ((raw[i] & 0x7fff) == 0 && d < 0)) continue;
        if (fabs(other - v) < err || (fabs(other - v) == err && (raw[i] & 1))) ok = false;
      }
      if (fabs(v) >= 65520.0) ok = false;
    }
    if (!ok && bad++ < 5) fprintf(stderr, "f16 of %.9g: got %04x (%.9g)\n", v, raw[i], got);
  }
  CHECK(bad == 0, "%d f16 roundings wrong", bad);
  CHECK(raw[5] == 0 && raw[6] == 2, "f16 subnormal ties: %04x %04x", raw[5], raw[6]);
  lmoe_buffer_release(b);
}

static void test_round_trips(lmoe_context *ctx) {
  int dtypes[5] = {LMOE_DTYPE_BF16, LMOE_DTYPE_F16, LMOE_DTYPE_F32, LMOE_DTYPE_F64, LMOE_DTYPE_I32};
  enum { N = 257 };
  double src[N], back[N];
  for (int i = 0; i < N; i++) src[i] = (double)test_randint(-200, 200); /* exact in every dtype */
  for (int d = 0; d < 5; d++) {
    for (int mem = 0; mem < 2; mem++) {
      int64_t shape[2] = {1, N};
      lmoe_buffer *b;
      OK(ctx, lmoe_buffer_create(ctx, dtypes[d], mem, 2, shape, &b));
      lmoe_buffer_desc desc;
      OK(ctx, lmoe_buffer_describe(b, &desc));
      CHECK(desc.numel == N && desc.bytes == N * lmoe_dtype_size(dtypes[d]) && desc.ndim == 2 &&
                desc.data != NULL,
            "describe %s", lmoe_dtype_name(dtypes[d]));
      OK(ctx, lmoe_buffer_write(b, 0, src, LMOE_DTYPE_F64, N));
      OK(ctx, lmoe_buffer_read(b, 0, back, LMOE_DTYPE_F64, N));
      CHECK(memcmp(src, back, sizeof src) == 0, "round trip through %s (memory %d)",
            lmoe_dtype_name(dtypes[d]), mem);
      lmoe_buffer_release(b);
    }
  }
  /* wrap: the library reads and writes caller memory */
  float mine[6] = {1, 2, 3, 4, 5, 6};
  int64_t shape[2] = {2, 3};
  lmoe_buffer *w;
  OK(ctx, lmoe_buffer_wrap(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 2, shape, mine, &w));
  OK(ctx, lmoe_buffer_fill(w, 7.0, NULL));
  CHECK(mine[0] == 7 && mine[5] == 7, "fill through a wrapped buffer");
  lmoe_buffer_release(w);
  CHECK(mine[2] == 7, "wrapped memory survives release");
}

static void test_fill_random(lmoe_context *ctx) {
  enum { N = 1000 };
  int64_t shape[1] = {N};
  lmoe_buffer *a, *b, *c, *ints;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 1, shape, &a));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 1, shape, &b));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 1, shape, &c));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_I32, LMOE_MEMORY_DEVICE, 1, shape, &ints));
  uint64_t seed = test_rand();
  OK(ctx, lmoe_buffer_fill_random(a, seed, -3.0f, 5.0f, NULL));
  OK(ctx, lmoe_buffer_fill_random(b, seed, -3.0f, 5.0f, NULL));
  OK(ctx, lmoe_buffer_fill_random(c, seed + 1, -3.0f, 5.0f, NULL));
  OK(ctx, lmoe_buffer_fill_random(ints, seed, 0.0f, 6.0f, NULL));
  float va[N], vb[N], vc[N];
  int32_t vi[N];
  OK(ctx, lmoe_buffer_read(a, 0, va, LMOE_DTYPE_F32, N));
  OK(ctx, lmoe_buffer_read(b, 0, vb, LMOE_DTYPE_F32, N));
  OK(ctx, lmoe_buffer_read(c, 0, vc, LMOE_DTYPE_F32, N));
  OK(ctx, lmoe_buffer_read(ints, 0, vi, LMOE_DTYPE_I32, N));
  CHECK(memcmp(va, vb, sizeof va) == 0, "same seed, different values");
  int same = 0, out_of_range = 0, distinct_ints[6] = {0};
  double mean = 0;
  for (int i = 0; i < N; i++) {
    same += va[i] == vc[i];
    out_of_range += !(va[i] >= -3.0f && va[i] < 5.0f);
    mean += va[i];
    if (vi[i] >= 0 && vi[i] < 6) distinct_ints[vi[i]] = 1;
    else out_of_range++;
  }
  mean /= N;
  CHECK(same < 10, "different seeds gave %d equal values", same);
  CHECK(out_of_range == 0, "%d values outside [lo, hi)", out_of_range);
  CHECK(fabs(mean - 1.0) < 0.3, "mean %.3f far from 1", mean);
  int seen = 0;
  for (int i = 0; i < 6; i++) seen += distinct_ints[i];
  CHECK(seen == 6, "integer fill hits every value 0..5 (saw %d)", seen);
  /* compare: identical buffers give 0, a perturbed one its exact error */
  lmoe_compare_result r;
  OK(ctx, lmoe_buffer_compare(a, b, &r));
  CHECK(r.rel_l2 == 0 && r.max_abs == 0 && r.nonfinite == 0 && r.numel == N, "compare equal");
  vb[3] += 1.0f;
  vb[7] = NAN;
  OK(ctx, lmoe_buffer_write(b, 0, vb, LMOE_DTYPE_F32, N));
  OK(ctx, lmoe_buffer_compare(b, a, &r));
  CHECK(r.nonfinite == 1 && r.max_abs > 0.99 && r.max_abs < 1.01, "compare finds the NaN and the error");
  lmoe_buffer_release(a), lmoe_buffer_release(b), lmoe_buffer_release(c), lmoe_buffer_release(ints);
}

/* Large fills run in chunks on the worker pool: same values for any thread count. */
static void test_fill_threads(void) {
  enum { N = 300001 };
  lmoe_context *c1 = test_cpu_context(1, LMOE_GUARD_HOST), *c3 = test_cpu_context(3, LMOE_GUARD_HOST);
  int64_t shape[1] = {N};
  lmoe_buffer *a, *b;
  OK(c1, lmoe_buffer_create(c1, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 1, shape, &a));
  OK(c3, lmoe_buffer_create(c3, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 1, shape, &b));
  uint64_t seed = test_rand();
  OK(c1, lmoe_buffer_fill_random(a, seed, -1.0f, 1.0f, NULL));
  OK(c3, lmoe_buffer_fill_random(b, seed, -1.0f, 1.0f, NULL));
  uint16_t *va = malloc(sizeof(uint16_t) * N), *vb = malloc(sizeof(uint16_t) * N);
  OK(c1, lmoe_buffer_read(a, 0, va, LMOE_DTYPE_BF16, N));
  OK(c3, lmoe_buffer_read(b, 0, vb, LMOE_DTYPE_BF16, N));
  CHECK(memcmp(va, vb, sizeof(uint16_t) * N) == 0, "fill_random differs between 1 and 3 threads");
  OK(c3, lmoe_buffer_fill(b, -0.5, NULL));
  OK(c3, lmoe_buffer_read(b, 0, vb, LMOE_DTYPE_BF16, N));
  int bad = 0;
  for (int i = 0; i < N; i++) bad += vb[i] != 0xbf00; /* -0.5 in bf16 */
  CHECK(bad == 0, "fill left %d elements", bad);
  free(va), free(vb);
  lmoe_buffer_release(a), lmoe_buffer_release(b);
  lmoe_context_release(c1), lmoe_context_release(c3);
}

int main(void) {
  test_seed("test_buffers");
  lmoe_context *ctx = test_cpu_context(1, LMOE_GUARD_HOST);
  test_bf16(ctx);
  test_f16(ctx);
  test_round_trips(ctx);
  test_fill_random(ctx);
  test_fill_threads();
  CHECK(lmoe_dtype_size(LMOE_DTYPE_BF16) == 2 && lmoe_dtype_size(LMOE_DTYPE_F64) == 8 &&
            lmoe_dtype_size(77) == 0,
        "dtype sizes");
  lmoe_context_release(ctx);
  return test_summary();
}
