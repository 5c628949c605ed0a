/* The GEMM configuration table and the selector (see gemm_config.h). */
#include "gemm_config.h"

#define LMOE_ROW(engine, kind, bm, bn, wm, wn, st, smem) {engine, kind, bm, bn, wm, wn, st, smem},
const lmoe_gemm_config lmoe_gemm_configs[] = {LMOE_GEMM_TABLE(LMOE_ROW)};
#undef LMOE_ROW
const int32_t lmoe_gemm_nconfigs = (int32_t)(sizeof lmoe_gemm_configs / sizeof lmoe_gemm_configs[0]);

/* the workspace (layout.c) is sized for row tiles between these */
#define LMOE_ROW(engine, kind, bm, bn, wm, wn, st, smem) \
  _Static_assert((bm) >= LMOE_K_BM_MIN && (bm) <= LMOE_K_BM, "row tile outside the workspace bounds");
LMOE_GEMM_TABLE(LMOE_ROW)
#undef LMOE_ROW

/* 64-row tiles when experts average under 96 pairs: a 128-row tile would be mostly
   padding there. At 128 pairs the 128-row tiles already win (docs/gpu-notes.md). */
enum { SMALL_TILE_PAIRS = 96 };

/* The sm90 engine where its kernels are usable and the operands suit TMA and its
   16-byte copies; the mma.sync engine everywhere else (every device lmoe_k_init accepts:
   cc >= 8.0). */
static int32_t pick_engine(const lmoe_gemm_device *d, int aligned16) {
  return d->sm90 && d->cc == 90 && aligned16 ? LMOE_ENGINE_SM90 : LMOE_ENGINE_SM80;
}

static int fits(const lmoe_gemm_device *d, int32_t row, int32_t engine, int32_t kind, int32_t bm) {
  const lmoe_gemm_config *c = &lmoe_gemm_configs[row];
  return c->engine == engine && c->kind == kind && c->bm == bm && c->smem <= d->smem_optin;
}

/* The first row of the engine, kind and row tile that fits the device, or -1. */
static int32_t pick_row(const lmoe_gemm_device *d, int32_t engine, int32_t kind, int32_t bm) {
  for (int32_t i = 0; i < lmoe_gemm_nconfigs; i++)
    if (fits(d, i, engine, kind, bm)) return i;
  return -1;
}

/* A shrink's row: on the expert GEMMs' engine where the mode (by its K, gemm_config.h)
   says so and it has a row that fits, else on sm80 (every shrink row writes t in the
   layout both engines' expands read). */
static int32_t pick_shrink(const lmoe_gemm_device *d, int32_t engine, int32_t bm, int32_t K) {
  int on_engine = d->shrink_mode == LMOE_SHRINK_SM90 ||
                  (d->shrink_mode == LMOE_SHRINK_BY_K && K >= LMOE_SM90_SHRINK_MIN_K);
  int32_t row = on_engine ? pick_row(d, engine, LMOE_GEMM_SHRINK, bm) : -1;
  return row >= 0 ? row : pick_row(d, LMOE_ENGINE_SM80, LMOE_GEMM_SHRINK, bm);
}

int lmoe_gemm_select(const lmoe_gemm_device *d, int64_t pairs, int32_t E, int32_t H, int32_t I, int aligned16,
                     lmoe_gemm_choice *out) {
  out->engine = pick_engine(d, aligned16);
  int64_t small = d->small_tile_pairs > 0 ? d->small_tile_pairs : SMALL_TILE_PAIRS;
  out->bm = pairs < small * (int64_t)E ? LMOE_K_BM_MIN : LMOE_K_BM;
  int32_t force = d->force_cfg;
  if (force >= 0 && force < lmoe_gemm_nconfigs && fits(d, force, out->engine, LMOE_GEMM_EXPERT, out->bm))
    out->gemm_cfg = force;
  else
    out->gemm_cfg = pick_row(d, out->engine, LMOE_GEMM_EXPERT, out->bm);
  if (out->gemm_cfg < 0 && out->engine != LMOE_ENGINE_SM80) { /* no sm90 row fits: fall back */
    out->engine = LMOE_ENGINE_SM80;
    out->gemm_cfg = pick_row(d, LMOE_ENGINE_SM80, LMOE_GEMM_EXPERT, out->bm);
  }
  out->shrink13_cfg = pick_shrink(d, out->engine, out->bm, H);
  out->shrink2_cfg = pick_shrink(d, out->engine, out->bm, I);
  return out->gemm_cfg >= 0 && out->shrink13_cfg >= 0 && out->shrink2_cfg >= 0 ? 0 : -1;
}

/* The sm80 rows are the fallback of every problem (misaligned operands), so they must
   fit; the sm90 rows are a bonus. */
int lmoe_gemm_supported(const lmoe_gemm_device *d) {
  int32_t engine = LMOE_ENGINE_SM80;
  const int32_t bms[2] = {LMOE_K_BM_MIN, LMOE_K_BM};
  for (int i = 0; i < 2; i++)
    if (pick_row(d, engine, LMOE_GEMM_EXPERT, bms[i]) < 0 || pick_row(d, engine, LMOE_GEMM_SHRINK, bms[i]) < 0)
      return 0;
  return 1;
}
