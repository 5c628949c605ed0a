/* A tiny test harness: CHECK prints file:line and the condition when it fails and
   counts; test_summary prints "N passed, N failed" and gives the exit status. */
#ifndef LMOE_TEST_UTIL_H
#define LMOE_TEST_UTIL_H

#include "loramoe.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int test_passed, test_failed;

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (cond) {                                                           \
      test_passed++;                                                      \
    } else {                                                              \
      test_failed++;                                                      \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                       \
      fputc('\n', stderr);                                                \
    }                                                                     \
  } while (0)

/* A call that must succeed; on failure the test cannot go on sensibly. */
#define OK(ctx, call)                                                               \
  do {                                                                              \
    lmoe_status st_ = (call);                                                       \
    if (st_ != LMOE_OK) {                                                           \
      fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,      \
              lmoe_status_string(st_), (ctx) ? lmoe_context_last_error(ctx) : "");  \
      test_failed++;                                                                \
      test_summary();                                                               \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

/* A call that must fail with status `want` and leave a message. */
#define FAILS(ctx, want, call)                                                          \
  do {                                                                                  \
    lmoe_status st_ = (call);                                                           \
    const char *msg_ = (ctx) ? lmoe_context_last_error(ctx) : "x";                      \
    CHECK(st_ == (want) && msg_ && msg_[0], "%s gave %s (want %s), message \"%s\"", #call, \
          lmoe_status_string(st_), lmoe_status_string(want), msg_ ? msg_ : "(null)");   \
  } while (0)

static int test_summary(void) {
  printf("%d passed, %d failed\n", test_passed, test_failed);
  fflush(stdout);
  return test_failed ? 1 : 0;
}

/* A small deterministic generator for test choices (not the library's). */
static uint64_t test_rng_state = 0x1234567ull;
static uint64_t test_rand(void) {
  uint64_t z = (test_rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static int test_randint(int lo, int hi) { /* inclusive */
  return lo + (int)(test_rand() % (uint64_t)(hi - lo + 1));
}
static float test_randf(float lo, float hi) {
  return lo + (hi - lo) * (float)((test_rand() >> 40) * (1.0 / 16777216.0));
}

/* Seeds from the environment when given (to reproduce), else from the clock, so every
   run checks fresh inputs; printed so a failure can be replayed. */
static void test_seed(const char *name) {
  const char *s = getenv("LMOE_TEST_SEED");
  uint64_t seed = s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)clock();
  test_rng_state = seed;
  printf("%s: LMOE_TEST_SEED=%llu\n", name, (unsigned long long)seed);
}

/* The start of a GPU test: 0 (and why, on stderr) when no CUDA device is visible,
   else 1 with the generator seeded (test_seed). */
static int test_need_gpu(const char *name) {
  int32_t n = 0;
  lmoe_device_count(&n);
  if (n == 0) {
    fprintf(stderr, "%s: no CUDA device: the gpu tests need one\n", name);
    return 0;
  }
  test_seed(name);
  return 1;
}

/* A layer of the given shapes, weights uniform in [-scale, scale) from the test's
   generator (scale 0: weights left unset). */
static lmoe_layer *test_layer(lmoe_context *ctx, int E, int H, int I, int K, int max_tokens,
                              float scale) {
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = max_tokens;
  lmoe_layer *layer = NULL;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  if (scale > 0) OK(ctx, lmoe_layer_randomize(layer, test_rand(), scale));
  return layer;
}

static lmoe_context *test_cpu_context(int threads, int guard) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  cfg.threads = threads;
  cfg.guard = guard;
  lmoe_context *ctx = NULL;
  char err[256];
  lmoe_status st = lmoe_context_create(&cfg, &ctx, err, sizeof err);
  if (st) {
    fprintf(stderr, "context: %s\n", err);
    exit(1);
  }
  return ctx;
}

static lmoe_buffer *test_buffer(lmoe_context *ctx, int dtype, int64_t d0, int64_t d1) {
  int64_t shape[2] = {d0, d1};
  lmoe_buffer *b = NULL;
  OK(ctx, lmoe_buffer_create(ctx, dtype, LMOE_MEMORY_DEVICE, 2, shape, &b));
  return b;
}

#endif
