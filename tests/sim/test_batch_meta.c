/* The batch's encoding (native/src/batch_meta.h) against the layout the kernels read
   (kernels/lmoe_kernels.h and the kernels' index arithmetic, restated below):
   lmoe_batch_set writes it once and the cuda backend stages it word for word, so the
   two must agree. Also what the encoding says of a batch: groups dense in slot order,
   requests without tokens or adapter in group 0. */
#include "internal.h"
#include "lmoe_kernels.h"
#include "test_util.h"

/* As route.cu and gemm_sm80.cu read it. */
static int32_t kernel_group(const int32_t *meta, int32_t token) {
  int32_t n = meta[0];
  const int32_t *offs = meta + 2, *grp = offs + n + 1;
  for (int32_t i = 0; i < n; i++)
    if (token >= offs[i] && token < offs[i + 1]) return grp[i];
  return 0;
}
static int32_t kernel_slot(const int32_t *meta, int32_t group) {
  return meta[2 + 2 * meta[0] + 1 + (group - 1)];
}

int main(void) {
  for (int32_t n = 0; n <= 1000; n += 7)
    for (int32_t a = 0; a <= 300; a += 13)
      CHECK(lmoe_meta_ints(n, a) == LMOE_META_WORDS(n, a), "n %d a %d: kernels %zu, batch %zu", (int)n, (int)a,
            lmoe_meta_ints(n, a), LMOE_META_WORDS(n, a));

  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  lmoe_context *ctx = NULL;
  OK(ctx, lmoe_context_create(&cfg, &ctx, NULL, 0));
  lmoe_batch *b = NULL;
  OK(ctx, lmoe_batch_create(ctx, &b));
  CHECK(lmoe_meta_requests(b->meta) == 0 && lmoe_meta_offsets(b->meta)[0] == 0, "a new batch is empty");
  /* slot 9 on a request without tokens only, slot 4 twice, 2 once, one request with
     no adapter; a second set with fewer requests reuses the storage */
  int32_t tok[6] = {3, 0, 5, 2, 4, 1}, sl[6] = {4, 9, LMOE_NO_ADAPTER, 2, 4, 7};
  for (int round = 0; round < 2; round++) {
    int32_t n = round ? 4 : 6;
    OK(ctx, lmoe_batch_set(b, NULL, n, tok, sl));
    const int32_t *m = b->meta;
    int32_t want_active[3] = {2, 4, 7}, na = round ? 2 : 3;
    CHECK(lmoe_meta_requests(m) == n && lmoe_meta_active_count(m) == na, "round %d: %d requests, %d active",
          round, (int)lmoe_meta_requests(m), (int)lmoe_meta_active_count(m));
    CHECK(lmoe_meta_words(m) == lmoe_meta_ints(n, na), "round %d: words", round);
    for (int32_t g = 1; g <= na; g++)
      CHECK(lmoe_meta_group_slot(m, g) == want_active[g - 1] && kernel_slot(m, g) == want_active[g - 1],
            "round %d: group %d is slot %d", round, (int)g, (int)lmoe_meta_group_slot(m, g));
    int32_t t = 0;
    for (int32_t r = 0; r < n; r++) {
      int32_t want = tok[r] > 0 && sl[r] >= 0 ? sl[r] : -1;
      CHECK(lmoe_meta_request_slot(m, r) == want, "round %d: request %d has slot %d, want %d", round, (int)r,
            (int)lmoe_meta_request_slot(m, r), (int)want);
      CHECK(lmoe_meta_offsets(m)[r] == t, "round %d: offset %d", round, (int)r);
      for (int32_t k = 0; k < tok[r]; k++, t++)
        CHECK(lmoe_meta_group_slot(m, kernel_group(m, t)) == want, "round %d: token %d", round, (int)t);
    }
    CHECK(lmoe_meta_offsets(m)[n] == t, "round %d: last offset", round);
  }
  lmoe_batch_release(b);
  lmoe_context_release(ctx);
  return test_summary();
}
