/* The forward's workspace layout: host arithmetic shared by the CUDA backend and its
   kernels (and by the simulated device of the tests). Upper bounds for a layer's
   max_tokens and a pool's slots and rank; each region 256-byte aligned. */
#include "lmoe_kernels.h"

static size_t round_up_sz(size_t v, size_t m) { return (v + m - 1) / m * m; }

void lmoe_k_layout(int64_t max_tokens, int32_t E, int32_t H, int32_t I, int32_t k,
                   int32_t num_slots, int32_t max_rank, lmoe_ws_layout *o) {
  lmoe_k_layout_fp8(max_tokens, E, H, I, k, num_slots, max_rank, 0, o);
}

void lmoe_k_layout_fp8(int64_t max_tokens, int32_t E, int32_t H, int32_t I, int32_t k,
                       int32_t num_slots, int32_t max_rank, int32_t fp8, lmoe_ws_layout *o) {
  size_t P = (size_t)max_tokens * (size_t)k;
  /* most tiles: the smallest row tile's; most rows: the largest's */
  size_t mt = (P + (size_t)E * (LMOE_K_BM_MIN - 1)) / LMOE_K_BM_MIN + 1;
  size_t rows = (P + (size_t)E * (LMOE_K_BM - 1)) / LMOE_K_BM * LMOE_K_BM + LMOE_K_BM;
  size_t gs = (size_t)(num_slots > 0 ? num_slots : 0) + 1;
  size_t hs = round_up_sz((size_t)I, 8);
  size_t t13s = max_rank > 0 ? round_up_sz(2 * (size_t)max_rank, LMOE_K_RANK_PAD) : 0;
  size_t t2s = max_rank > 0 ? round_up_sz((size_t)max_rank, LMOE_K_RANK_PAD) : 0;
  size_t at = 0;
#define LMOE_TAKE(field, bytes)          \
  do {                                   \
    o->field = at;                       \
    at = round_up_sz(at + (bytes), 256); \
  } while (0)
  LMOE_TAKE(ids, P * 4);
  LMOE_TAKE(tw, P * 4);
  LMOE_TAKE(tok_group, (size_t)max_tokens * 4);
  const size_t cnt_bytes = (size_t)LMOE_K_CNT_REP * (size_t)lmoe_k_cnt_stride(E, (int32_t)gs) * 4;
  LMOE_TAKE(cnt, cnt_bytes);
  LMOE_TAKE(off, cnt_bytes);
  LMOE_TAKE(tile_expert, mt * 4);
  LMOE_TAKE(s13f, mt * 4); /* a flag a row tile (lmoe_fwd.s13f) */
  LMOE_TAKE(ntiles, 4);
  LMOE_TAKE(any, 4);
  LMOE_TAKE(sorted_pair, rows * 4);
  LMOE_TAKE(sorted_group, rows * 4);
  LMOE_TAKE(pair_row, P * 4);
  LMOE_TAKE(h, rows * hs * 2);
  /* y, and before down writes it x's rows in sorted order (xg bf16, or an FP8 layer's
     codes xq): room for the larger */
  LMOE_TAKE(y, (P > rows ? P : rows) * (size_t)H * 2);
  LMOE_TAKE(t13, rows * t13s * 2);
  LMOE_TAKE(t2, rows * t2s * 2);
  o->xs = o->hq = o->hsc = 0;
  if (fp8) { /* float32 scales of 128-wide groups of x's and h's sorted rows, h's e4m3
                codes (x's lie in y's region) */
    size_t nbh = ((size_t)H + 127) / 128, nbi = ((size_t)I + 127) / 128;
    LMOE_TAKE(xs, rows * nbh * 4);
    LMOE_TAKE(hq, rows * (size_t)I);
    LMOE_TAKE(hsc, rows * nbi * 4);
  }
#undef LMOE_TAKE
  o->total = at;
  o->mt_max = (int32_t)mt;
  o->t13s = (int32_t)t13s;
  o->t2s = (int32_t)t2s;
}
