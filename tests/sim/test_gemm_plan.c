/* The GEMM selector and the forward's plan (kernels/gemm_config.c, kernels/plan.c):
   plain host code, so checked here without a GPU. The selector must choose what the
   kernels chose before the table existed (the rules are restated below), for every
   device limit, LMOE_GEMM_CFG value and problem; the plan must carve the workspace as
   lmoe_k_layout says and pass the choice on. */
#include "lmoe_kernels.h"
#include "test_util.h"

/* The rules of lmoe_k_init, backend_cuda.c and the launchers before the table: tiles
   128x256 (row 0) where ~100 KB of shared memory fit, else 128x128 (1), forced by
   LMOE_GEMM_CFG=1; 64-row tiles (2, shrinks 4) under 96 pairs per expert, else shrinks
   3; devices without room for 1, 2, 3 and 4 refused. */
static int old_supported(int smem) { return smem >= 69152 && smem >= 83744 && smem >= 50976; }
static void old_choice(int smem, int env, int64_t pairs, int32_t E, int *bm, int *gemm, int *shrink) {
  int cfg = smem >= 101920 ? 0 : 1;
  if (env == 1) cfg = 1;
  *bm = pairs < 96 * (int64_t)E ? 64 : 128;
  *gemm = *bm == 64 ? 2 : cfg == 1 ? 1 : 0;
  *shrink = *bm == 64 ? 4 : 3;
}

static void test_select(void) {
  const int smems[] = {49152, 65536, 69152, 83743, 83744, 101376, 101919, 101920, 166912, 232448};
  const int envs[] = {-1, 0, 1, 2, 3, 4, 5, 99};
  const int32_t Es[] = {1, 8, 64, 128, 4096};
  const int64_t pairs[] = {0, 1, 95, 96, 767, 768, 6143, 6144, 12288, 1 << 20};
  for (size_t a = 0; a < sizeof smems / sizeof *smems; a++)
    for (size_t b = 0; b < sizeof envs / sizeof *envs; b++) {
      lmoe_gemm_device d = {90, smems[a], envs[b], 0, 0, 0, 0, 0, 0, 0, 0, 0};
      int sup = lmoe_gemm_supported(&d);
      CHECK(sup == old_supported(smems[a]), "smem %d: supported %d", smems[a], sup);
      if (!sup) continue;
      for (size_t c = 0; c < sizeof Es / sizeof *Es; c++)
        for (size_t p = 0; p < sizeof pairs / sizeof *pairs; p++) {
          lmoe_gemm_choice g;
          int bm, gemm, shrink;
          old_choice(smems[a], envs[b], pairs[p], Es[c], &bm, &gemm, &shrink);
          CHECK(lmoe_gemm_select(&d, pairs[p], Es[c], 4096, 14336, 1, &g) == 0, "select failed");
          CHECK(g.engine == LMOE_ENGINE_SM80 && g.bm == bm && g.gemm_cfg == gemm && g.shrink13_cfg == shrink &&
                    g.shrink2_cfg == shrink,
                "smem %d env %d pairs %lld E %d: got bm %d rows %d/%d/%d, want %d %d/%d", smems[a], envs[b],
                (long long)pairs[p], (int)Es[c], g.bm, g.gemm_cfg, g.shrink13_cfg, g.shrink2_cfg, bm, gemm, shrink);
          const lmoe_gemm_config *gc = &lmoe_gemm_configs[g.gemm_cfg], *sc = &lmoe_gemm_configs[g.shrink13_cfg];
          CHECK(gc->kind == LMOE_GEMM_EXPERT && sc->kind == LMOE_GEMM_SHRINK && gc->bm == g.bm && sc->bm == g.bm,
                "rows of the wrong kind or tile");
        }
    }
}

/* The sm90 engine: where usable on cc 9.0 and the operands are aligned, its rows for
   gate_up and down (5 for 128-row tiles, 6 for 64, 7 when forced) and the shrinks (8,
   9: by default each shrink whose K is at least 2048, both or neither under
   LMOE_SM90_SHRINK=1 or 0; sm80 rows 3, 4 otherwise); sm80 rows otherwise, and when no
   sm90 row fits the device. */
static void test_select_sm90(void) {
  lmoe_gemm_choice g;
  lmoe_gemm_device d = {90, 232448, -1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
  CHECK(lmoe_gemm_supported(&d), "an H200 is supported");
  /* mixtral's sizes: both shrinks' K (4096, 14336) long enough for the sm90 rows */
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM90 &&
            g.bm == 128 && g.gemm_cfg == 5 && g.shrink13_cfg == 8 && g.shrink2_cfg == 8,
        "large: row 5, shrinks 8 (got %d %d %d %d)", g.engine, g.gemm_cfg, g.shrink13_cfg, g.shrink2_cfg);
  CHECK(lmoe_gemm_select(&d, 1000, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM90 && g.bm == 64 &&
            g.gemm_cfg == 6 && g.shrink13_cfg == 9 && g.shrink2_cfg == 9,
        "small: row 6, shrinks 9 (got %d %d %d %d)", g.engine, g.gemm_cfg, g.shrink13_cfg, g.shrink2_cfg);
  /* qwen3's: shrink13 (K = H = 2048) on sm90, shrink2 (K = I = 768) on sm80; the
     bound itself on sm90, one below it on sm80 */
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 2048, 768, 1, &g) == 0 && g.shrink13_cfg == 8 && g.shrink2_cfg == 3,
        "by K, qwen3: shrink13 row 8, shrink2 row 3 (got %d %d)", g.shrink13_cfg, g.shrink2_cfg);
  CHECK(lmoe_gemm_select(&d, 1000, 128, 2047, 2048, 1, &g) == 0 && g.shrink13_cfg == 4 && g.shrink2_cfg == 9,
        "by K at the bound (got %d %d)", g.shrink13_cfg, g.shrink2_cfg);
  d.shrink_mode = LMOE_SHRINK_SM80;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM90 &&
            g.gemm_cfg == 5 && g.shrink13_cfg == 3 && g.shrink2_cfg == 3,
        "LMOE_SM90_SHRINK=0: sm80 shrinks beside the sm90 GEMMs (got %d %d %d)", g.gemm_cfg, g.shrink13_cfg,
        g.shrink2_cfg);
  d.shrink_mode = LMOE_SHRINK_SM90;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 2048, 768, 1, &g) == 0 && g.shrink13_cfg == 8 && g.shrink2_cfg == 8,
        "LMOE_SM90_SHRINK=1: both on sm90 whatever K (got %d %d)", g.shrink13_cfg, g.shrink2_cfg);
  d.shrink_mode = LMOE_SHRINK_BY_K;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 0, &g) == 0 && g.engine == LMOE_ENGINE_SM80 &&
            g.gemm_cfg == 0 && g.shrink13_cfg == 3 && g.shrink2_cfg == 3,
        "misaligned operands: sm80");
  d.force_cfg = 7;
  CHECK(lmoe_gemm_select(&d, 1000, 128, 4096, 14336, 1, &g) == 0 && g.gemm_cfg == 7, "forced row 7 at 64-row tiles");
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.gemm_cfg == 5, "row 7 is not a 128-row row");
  d.force_cfg = 0;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.gemm_cfg == 5, "an sm80 row is not forced on sm90");
  d.force_cfg = -1;
  d.smem_optin = 170000; /* row 6 fits, row 5 does not */
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM80 && g.gemm_cfg == 0 &&
            g.shrink13_cfg == 3 && g.shrink2_cfg == 3,
        "no 128-row sm90 row fits: the sm80 one (got %d %d)", g.engine, g.gemm_cfg);
  CHECK(lmoe_gemm_select(&d, 1000, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM90 && g.gemm_cfg == 6,
        "the 64-row sm90 row fits");
  d.smem_optin = 232448;
  d.cc = 89;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM80, "sm90 rows only on 9.0");
  d.cc = 100;
  CHECK(lmoe_gemm_select(&d, 1 << 20, 128, 4096, 14336, 1, &g) == 0 && g.engine == LMOE_ENGINE_SM80,
        "sm_90a code does not run on 10.0");
}

/* The plan hands the sm90 engine only operands it can read: 16-byte aligned x, W13,
   W2 rows and pointers, and with LoRA the pool's B13 and B2 rows (and A13 rows for
   its shrink13, A2 rows for its shrink2, else that shrink runs on sm80). */
static void test_plan_sm90(void) {
  lmoe_gemm_device d = {90, 232448, -1, 1, 0, LMOE_SHRINK_SM90, 0, 0, 0, 0, 0, 0};
  lmoe_ws_layout L;
  lmoe_k_layout(4096, 8, 1024, 768, 2, 4, 16, &L);
  void *ws = malloc(L.total);
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  lmoe_dslot table[4];
  lmoe_k_pool_plan pp;
  lmoe_k_plan_pool(1024, 768, 4, 16, (void *)w, 1 << 20, 0, 4096, 8192, 12288, table, &pp);
  int32_t ids[8];
  float tw[8];
  lmoe_k_plan_args a = {.max_tokens = 4096, .E = 8, .H = 1024, .I = 768, .k = 2, .w13 = w, .w2 = w,
                        .pool = &pp, .lora = 1, .M = 4096, .x = x, .out = out, .topk_ids = ids, .topk_w = tw,
                        .workspace = ws, .workspace_bytes = L.total, .dev = &d};
  lmoe_fwd f;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM90 && f.gemm_cfg == 5 && f.shrink13_cfg == 8 && f.shrink2_cfg == 8,
        "aligned: sm90 (%d)", f.engine);
  lmoe_k_pool_plan a13odd; /* A13 rows start 8 bytes off: the sm90 GEMMs, shrink13 on sm80 */
  lmoe_k_plan_pool(1024, 768, 4, 16, (void *)w, 1 << 20, 8, 4096, 8192, 12288, table, &a13odd);
  a.pool = &a13odd;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM90 && f.gemm_cfg == 5 && f.shrink13_cfg == 3 && f.shrink2_cfg == 8,
        "A13 rows not 16-byte aligned: shrink13 on sm80 (got %d %d %d)", f.gemm_cfg, f.shrink13_cfg, f.shrink2_cfg);
  lmoe_k_pool_plan a2odd; /* A2 rows start 8 bytes off: shrink2 on sm80 */
  lmoe_k_plan_pool(1024, 768, 4, 16, (void *)w, 1 << 20, 0, 4096, 8200, 12288, table, &a2odd);
  a.pool = &a2odd;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM90 && f.shrink13_cfg == 8 && f.shrink2_cfg == 3,
        "A2 rows not 16-byte aligned: shrink2 on sm80 (got %d %d)", f.shrink13_cfg, f.shrink2_cfg);
  a.pool = &pp;
  d.shrink_mode = LMOE_SHRINK_BY_K; /* H 1024, I 768: both under the bound */
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM90 && f.shrink13_cfg == 3 && f.shrink2_cfg == 3,
        "by K, short K: sm80 shrinks (got %d %d)", f.shrink13_cfg, f.shrink2_cfg);
  d.shrink_mode = LMOE_SHRINK_SM90;
  a.x = x + 1;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM80 && f.gemm_cfg == 0, "x rows not 16-byte aligned: sm80");
  a.x = x;
  a.w2 = w + 1;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM80, "W2 pointer not 16-byte aligned: sm80");
  a.w2 = w;
  a.H = 1020; /* x, W13 rows of 2040 bytes */
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM80, "H %% 8 != 0: sm80");
  a.H = 1024;
  lmoe_k_pool_plan odd;
  lmoe_k_plan_pool(1024, 768, 4, 12, (void *)w, 1 << 20, 0, 4096, 8192, 12296, table, &odd); /* B2 rows of 24 bytes */
  a.pool = &odd;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM80, "B2 rows not 16-byte aligned with LoRA: sm80");
  a.lora = 0;
  lmoe_k_plan(&a, &f);
  CHECK(f.engine == LMOE_ENGINE_SM90, "the same pool without LoRA: sm90");
  free(ws);
}

static void test_plan(void) {
  lmoe_gemm_device d = {90, 232448, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  lmoe_ws_layout L;
  lmoe_k_layout(512, 64, 1024, 768, 8, 4, 16, &L);
  void *ws = malloc(L.total);
  static uint16_t x[16], out[16], w[16];
  float logits[4];
  lmoe_dslot table[4];
  lmoe_k_pool_plan pp;
  lmoe_k_plan_pool(1024, 768, 4, 16, (void *)w, 1 << 20, 0, 4096, 8192, 12288, table, &pp);
  CHECK(pp.al_lora == (LMOE_AL_A13 | LMOE_AL_B13 | LMOE_AL_A2 | LMOE_AL_B2), "al_lora %d", pp.al_lora);
  CHECK(pp.slot_elems == (1 << 19) && pp.off_b13 == 2048 && pp.off_b2 == 6144, "pool offsets in elements");
  lmoe_k_plan_args a = {.max_tokens = 512, .E = 64, .H = 1024, .I = 768, .k = 8, .renorm = 1, .w13 = w, .w2 = w,
                        .pool = &pp, .lora = 1, .M = 100, .x = x, .out = out, .logits = logits,
                        .workspace = ws, .workspace_bytes = L.total - 1, .dev = &d};
  lmoe_fwd f;
  memset(&f, 0x5a, sizeof f);
  CHECK(lmoe_k_plan(&a, &f) == L.total && f.M == 0x5a5a5a5a, "a short workspace leaves f alone");
  a.workspace_bytes = L.total;
  CHECK(lmoe_k_plan(&a, &f) == L.total, "plan");
  uint8_t *b = ws;
  CHECK(f.bm == 64 && f.mt_max == (800 + 64 * 63) / 64 && f.gemm_cfg == 2 && f.shrink13_cfg == 4 && f.shrink2_cfg == 4 && f.engine == 0,
        "800 pairs over 64 experts: 64-row tiles");
  CHECK((uint8_t *)f.ids == b + L.ids && (uint8_t *)f.t2 == b + L.t2 && (uint8_t *)f.h == b + L.h, "carving");
  CHECK(f.t13s == 32 && f.t2s == 32 && f.gstride == 5 && f.R == 16 && f.lora == 1 && f.al_lora == pp.al_lora,
        "pool facts");
  CHECK(f.al_x == (LMOE_AL_W13 | LMOE_AL_W2 | (((uintptr_t)x % 16) == 0 ? LMOE_AL_X : 0)), "al_x %d", f.al_x);
  a.M = 512;
  a.E = 8;
  a.lora = 0;
  a.logits = NULL;
  int32_t ids[8];
  float tw[8];
  a.topk_ids = ids;
  a.topk_w = tw;
  lmoe_k_plan(&a, &f);
  CHECK(f.bm == 128 && f.gemm_cfg == 0 && f.shrink13_cfg == 3 && f.shrink2_cfg == 3 && f.ids == ids && f.tw == tw && !f.pool && !f.lora,
        "4096 pairs over 8 experts: 128-row tiles; routing given; no LoRA");
  free(ws);
}

/* An FP8 layer's plan: the bf16 regions where they were, then the quantized
   activations' (x's group scales and h's codes and scales, by sorted row; x's codes in
   y's region), the weights' block scales, and every pair's sorted row. */
static void test_plan_fp8(void) {
  lmoe_gemm_device d = {90, 232448, -1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
  lmoe_ws_layout L, L0;
  lmoe_k_layout(512, 8, 1024, 768, 2, 0, 0, &L0);
  lmoe_k_layout_fp8(512, 8, 1024, 768, 2, 0, 0, 1, &L);
  size_t rows = (512 * 2 + 8 * 127) / 128 * 128 + 128;
  CHECK(L.h == L0.h && L.t2 == L0.t2 && L0.xs == 0 && L.xs >= L0.total && L.hq >= L.xs + rows * 8 * 4 &&
            L.hsc >= L.hq + rows * 768 && L.total >= L.hsc + rows * 6 * 4 && L.xs % 256 == 0 && L.hq % 256 == 0,
        "FP8 regions after the bf16 ones, a row of each for every sorted row");
  CHECK(L.t13 - L.y >= rows * 1024 * 2 && L.t13 - L.y >= 512 * 2 * 1024 * 2 && L.pair_row >= L.sorted_group &&
            L.h >= L.pair_row + 512 * 2 * 4,
        "y's region holds y and the sorted rows of x; a sorted row for every pair");
  void *ws = malloc(L.total);
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  static float s13[16], s2[16];
  int32_t ids[8];
  float tw[8];
  lmoe_k_plan_args a = {.max_tokens = 512, .E = 8, .H = 1024, .I = 768, .k = 2, .w13 = w, .w2 = w, .fp8 = 1,
                        .w13s = s13, .w2s = s2, .M = 512, .x = x, .out = out, .topk_ids = ids, .topk_w = tw,
                        .workspace = ws, .workspace_bytes = L0.total, .dev = &d};
  lmoe_fwd f;
  CHECK(lmoe_k_plan(&a, &f) == L.total, "an FP8 plan needs the larger workspace");
  a.workspace_bytes = L.total;
  lmoe_k_plan(&a, &f);
  uint8_t *b = ws;
  CHECK(f.fp8 == 1 && f.nbh == 8 && f.nbi == 6 && f.w13s == s13 && f.w2s == s2, "FP8 facts");
  CHECK(f.xq == b + L.y && (uint8_t *)f.xs == b + L.xs && f.hq == b + L.hq && (uint8_t *)f.hsc == b + L.hsc &&
            (uint8_t *)f.h == b + L.h && (uint8_t *)f.pair_row == b + L.pair_row && !f.xg,
        "FP8 carving: x's codes in y's region, no bf16 gather");
  a.fp8 = 0;
  lmoe_k_plan(&a, &f);
  CHECK(!f.fp8 && !f.xq && !f.hq && !f.w13s, "a bf16 layer's plan has no FP8 regions");
  free(ws);
}

/* The bf16 sm90 gate_up's x in sorted order (gemm_config.h's gather_x): by the pair
   count unless forced; never on the sm80 engine; in y's region, with the pairs' rows. */
static void test_plan_gather(void) {
  const int64_t maxT = 8192;
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  int32_t ids[8];
  float tw[8];
  const struct {
    int sm90, mode, I;
    int64_t M;
    int want;
  } cases[] = {
      {1, LMOE_GATHER_BY_SHAPE, LMOE_SM90_GATHER_MIN_I, LMOE_SM90_GATHER_MIN_PAIRS / 2, 1},
      {1, LMOE_GATHER_BY_SHAPE, LMOE_SM90_GATHER_MIN_I, LMOE_SM90_GATHER_MIN_PAIRS / 2 - 1, 0},
      {1, LMOE_GATHER_BY_SHAPE, LMOE_SM90_GATHER_MIN_I - 8, maxT, 0},
      {1, LMOE_GATHER_ON, 768, 3, 1},
      {1, LMOE_GATHER_OFF, LMOE_SM90_GATHER_MIN_I, maxT, 0},
      {0, LMOE_GATHER_ON, LMOE_SM90_GATHER_MIN_I, maxT, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    lmoe_ws_layout L;
    lmoe_k_layout(maxT, 8, 1024, cases[i].I, 2, 0, 0, &L);
    void *ws = malloc(L.total);
    lmoe_gemm_device d = {90, 232448, -1, cases[i].sm90, 0, 0, cases[i].mode, 0, 0, 0, 0, 0};
    lmoe_k_plan_args a = {.max_tokens = maxT, .E = 8, .H = 1024, .I = cases[i].I, .k = 2, .w13 = w, .w2 = w,
                          .M = cases[i].M, .x = x, .out = out, .topk_ids = ids, .topk_w = tw,
                          .workspace = ws, .workspace_bytes = L.total, .dev = &d};
    lmoe_fwd f;
    CHECK(lmoe_k_plan(&a, &f) == L.total, "case %zu: planned", i);
    uint8_t *b = ws;
    if (cases[i].want)
      CHECK(f.xg == f.y && (uint8_t *)f.y == b + L.y && (uint8_t *)f.pair_row == b + L.pair_row &&
                (size_t)f.h_rows * 1024 * 2 <= L.t13 - L.y,
            "case %zu: x gathered into y's region, which holds its rows", i);
    else
      CHECK(!f.xg && !f.pair_row, "case %zu: x read by token", i);
    free(ws);
  }
}

/* shrink2 in the bf16 sm90 gate_up's epilogue (lmoe_fwd.t2p): only with LoRA on the
   sm90 engine, bf16, x not gathered into y's region, A2 rows 16-byte aligned, at most
   LMOE_K_T2P_MAX planes that fit y's region, and only when asked (LMOE_SM90_FUSE_T2=1:
   fuse_t2); the planes at y's start. */
static void test_plan_t2p(void) {
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  static float s13[16], s2[16];
  int32_t ids[8];
  float tw[8];
  lmoe_dslot table[4];
  const int64_t big = 4096; /* tokens: 1024 pairs an expert at k 2, E 8 */
  const struct {
    int sm90, fuse, fp8, gather, a2off, I, lora;
    int64_t M;
    int want;
    const char *what;
  } cases[] = {
      {1, 1, 0, LMOE_GATHER_BY_SHAPE, 8192, 768, 1, big, 1, "qwen3's I"},
      {1, 1, 0, LMOE_GATHER_BY_SHAPE, 8192, 768, 1, 3, 1, "3 tokens"},
      {1, 0, 0, LMOE_GATHER_BY_SHAPE, 8192, 768, 1, big, 0, "not asked (the default)"},
      {0, 1, 0, LMOE_GATHER_BY_SHAPE, 8192, 768, 1, big, 0, "the sm80 engine"},
      {1, 1, 1, LMOE_GATHER_BY_SHAPE, 8192, 768, 1, big, 0, "an FP8 layer"},
      {1, 1, 0, LMOE_GATHER_ON, 8192, 768, 1, big, 0, "x gathered into y's region"},
      {1, 1, 0, LMOE_GATHER_BY_SHAPE, 8200, 768, 1, big, 0, "A2 rows 8 bytes off"},
      {1, 1, 0, LMOE_GATHER_BY_SHAPE, 8192, 768, 0, big, 0, "no LoRA"},
      {1, 1, 0, LMOE_GATHER_OFF, 8192, 128 * LMOE_K_T2P_MAX, 1, big, 1, "the most planes"},
      {1, 1, 0, LMOE_GATHER_OFF, 8192, 128 * LMOE_K_T2P_MAX + 8, 1, big, 0, "one plane more"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const int32_t H = 1024, I = cases[i].I, E = 8, k = 2, R = 16;
    const int64_t T = big;
    lmoe_ws_layout L;
    lmoe_k_layout_fp8(T, E, H, I, k, 4, R, cases[i].fp8, &L);
    void *ws = malloc(L.total);
    lmoe_k_pool_plan pp;
    lmoe_k_plan_pool(H, I, 4, R, (void *)w, 1 << 24, 0, 4096, cases[i].a2off, 1 << 22, table, &pp);
    lmoe_gemm_device d = {.cc = 90, .smem_optin = 232448, .force_cfg = -1, .sm90 = cases[i].sm90,
                          .shrink_mode = LMOE_SHRINK_BY_K, .gather_x = cases[i].gather, .fuse_t2 = cases[i].fuse};
    lmoe_k_plan_args a = {.max_tokens = T, .E = E, .H = H, .I = I, .k = k, .w13 = w, .w2 = w,
                          .fp8 = cases[i].fp8, .w13s = s13, .w2s = s2, .pool = &pp, .lora = cases[i].lora,
                          .M = cases[i].M, .x = x, .out = out, .topk_ids = ids, .topk_w = tw, .workspace = ws,
                          .workspace_bytes = L.total, .dev = &d};
    lmoe_fwd f;
    CHECK(lmoe_k_plan(&a, &f) == L.total, "t2p case %zu: planned", i);
    if (cases[i].want)
      CHECK(f.engine == LMOE_ENGINE_SM90 && (uint8_t *)f.t2p == (uint8_t *)ws + L.y &&
                (size_t)lmoe_k_t2p_planes(I) * f.h_rows * f.t2s * 4 <= L.t13 - L.y,
            "t2p case %zu (%s): the planes at y's start, within its region", i, cases[i].what);
    else
      CHECK(!f.t2p, "t2p case %zu (%s): shrink2 its own kernel", i, cases[i].what);
    free(ws);
  }
}

/* The sm90 shrinks' pass width (lmoe_fwd.shrink_sn): 64 columns from
   LMOE_SM90_SHRINK_NARROW_ROWS pairs an expert and active group, and then shrink2 on
   shrink13's sm90 row although its K is short, where its A2 rows allow; forced either
   way by LMOE_SM90_SHRINK_SN; only by K's rule (not under LMOE_SM90_SHRINK). */
static void test_plan_shrink_sn(void) {
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  int32_t ids[8];
  float tw[8];
  lmoe_dslot table[4];
  const int32_t E = 8, k = 2, H = 2048, I = 768, R = 16;
  const int64_t at4 = (int64_t)LMOE_SM90_SHRINK_NARROW_ROWS * E * 4 / k; /* tokens at the bound, 4 groups */
  const struct {
    int64_t M;
    int groups, forced, mode, a2off, want_sn, want_s2_sm90;
    const char *what;
  } cases[] = {
      {at4, 4, 0, LMOE_SHRINK_BY_K, 8192, 64, 1, "at the bound, four groups"},
      {at4 - 1, 4, 0, LMOE_SHRINK_BY_K, 8192, 128, 0, "a token under it"},
      {at4 / 4, 1, 0, LMOE_SHRINK_BY_K, 8192, 64, 1, "one group: a quarter of the tokens"},
      {at4 / 4, 0, 0, LMOE_SHRINK_BY_K, 8192, 64, 1, "groups unknown: as one"},
      {at4, 4, 128, LMOE_SHRINK_BY_K, 8192, 128, 0, "forced 128"},
      {3, 4, 64, LMOE_SHRINK_BY_K, 8192, 64, 1, "forced 64, 3 tokens"},
      {at4, 4, 0, LMOE_SHRINK_BY_K, 8200, 64, 0, "A2 rows 8 bytes off: shrink2 stays on sm80"},
      {at4, 4, 0, LMOE_SHRINK_SM80, 8192, 64, 0, "both shrinks forced on sm80"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    lmoe_ws_layout L;
    lmoe_k_layout(at4, E, H, I, k, 4, R, &L);
    void *ws = malloc(L.total);
    lmoe_k_pool_plan pp;
    lmoe_k_plan_pool(H, I, 4, R, (void *)w, 1 << 24, 0, 1 << 20, (size_t)(1 << 21) + cases[i].a2off - 8192,
                     1 << 22, table, &pp);
    lmoe_gemm_device d = {.cc = 90, .smem_optin = 232448, .force_cfg = -1, .sm90 = 1, .shrink_mode = cases[i].mode,
                          .shrink_sn = cases[i].forced};
    lmoe_k_plan_args a = {.max_tokens = at4, .E = E, .H = H, .I = I, .k = k, .w13 = w, .w2 = w, .pool = &pp,
                          .lora = 1, .groups = cases[i].groups, .M = cases[i].M, .x = x, .out = out,
                          .topk_ids = ids, .topk_w = tw, .workspace = ws, .workspace_bytes = L.total, .dev = &d};
    lmoe_fwd f;
    CHECK(lmoe_k_plan(&a, &f) == L.total, "shrink_sn case %zu: planned", i);
    const int s2_sm90 = lmoe_gemm_configs[f.shrink2_cfg].engine == LMOE_ENGINE_SM90;
    CHECK(f.engine == LMOE_ENGINE_SM90 && f.shrink_sn == cases[i].want_sn && s2_sm90 == cases[i].want_s2_sm90 &&
              (!s2_sm90 || f.shrink2_cfg == f.shrink13_cfg),
          "shrink_sn case %zu (%s): width %d, shrink2 on row %d", i, cases[i].what, (int)f.shrink_sn,
          (int)f.shrink2_cfg);
    free(ws);
  }
}

/* shrink13 inside the bf16 sm90 gate_up (lmoe_fwd.s13f): only with LoRA on the sm90
   engine, bf16, the pool's A13 rows 16-byte aligned; by the shape where the active
   adapters' packed gate_up ranks (cols13, or groups x the pool's widest when not known)
   take at most LMOE_SM90_FUSE_S13_MAX_COLS, or forced either way (LMOE_SM90_FUSE_S13);
   the flags in their own region, a row tile each. shrink2 inside down (s2f) likewise
   on the down ranks (cols2) and A2's alignment, in 64-row tiles only, and not where
   gate_up's epilogue computes it (t2p); on the same flags. */
static void test_plan_s13f(void) {
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  static float s13[16], s2[16];
  int32_t ids[8];
  float tw[8];
  lmoe_dslot table[4];
  const int32_t H = 2048, I = 768, E = 8, k = 2, R = 16; /* the pool's widest: 2R = 32 columns */
  const int64_t T = 4096;
  const struct {
    int sm90, fuse, fp8, lora, a13off, groups, cols13, want;
    const char *what;
  } cases[] = {
      {1, LMOE_FUSE_BY_SHAPE, 0, 1, 0, 4, 128, 1, "four rank-16 adapters"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 1, 0, 8, LMOE_SM90_FUSE_S13_MAX_COLS, 1, "at the bound"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 1, 0, 9, LMOE_SM90_FUSE_S13_MAX_COLS + 8, 0, "a group's columns past it"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 1, 0, 8, 0, 1, "ranks unknown: 8 groups x 32"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 1, 0, 9, 0, 0, "ranks unknown: 9 groups x 32"},
      {1, LMOE_FUSE_ON, 0, 1, 0, 40, 4000, 1, "forced on, many passes"},
      {1, LMOE_FUSE_OFF, 0, 1, 0, 4, 128, 0, "forced off"},
      {0, LMOE_FUSE_ON, 0, 1, 0, 4, 128, 0, "the sm80 engine"},
      {1, LMOE_FUSE_ON, 1, 1, 0, 4, 128, 0, "an FP8 layer"},
      {1, LMOE_FUSE_ON, 0, 0, 0, 4, 128, 0, "no LoRA"},
      {1, LMOE_FUSE_ON, 0, 1, 8, 4, 128, 0, "A13 rows 8 bytes off"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    lmoe_ws_layout L;
    lmoe_k_layout_fp8(T, E, H, I, k, 4, R, cases[i].fp8, &L);
    void *ws = malloc(L.total);
    lmoe_k_pool_plan pp;
    lmoe_k_plan_pool(H, I, 4, R, (void *)w, 1 << 24, (size_t)cases[i].a13off, 1 << 20, 1 << 21, 1 << 22, table, &pp);
    lmoe_gemm_device d = {.cc = 90, .smem_optin = 232448, .force_cfg = -1, .sm90 = cases[i].sm90,
                          .shrink_mode = LMOE_SHRINK_BY_K, .fuse_s13 = cases[i].fuse};
    lmoe_k_plan_args a = {.max_tokens = T, .E = E, .H = H, .I = I, .k = k, .w13 = w, .w2 = w,
                          .fp8 = cases[i].fp8, .w13s = s13, .w2s = s2, .pool = &pp, .lora = cases[i].lora,
                          .groups = cases[i].groups, .cols13 = cases[i].cols13, .M = T, .x = x, .out = out,
                          .topk_ids = ids, .topk_w = tw, .workspace = ws, .workspace_bytes = L.total, .dev = &d};
    lmoe_fwd f;
    CHECK(lmoe_k_plan(&a, &f) == L.total, "s13f case %zu: planned", i);
    CHECK(f.bm == 128 && !f.s2f, "s13f case %zu (%s): shrink2 its own kernel with 128-row tiles", i,
          cases[i].what);
    if (cases[i].want)
      CHECK(f.engine == LMOE_ENGINE_SM90 && (uint8_t *)f.s13f == (uint8_t *)ws + L.s13f &&
                L.s13f + (size_t)f.mt_max * 4 <= L.ntiles && L.s13f >= L.tile_expert + (size_t)f.mt_max * 4,
            "s13f case %zu (%s): a flag a row tile, in its own region", i, cases[i].what);
    else
      CHECK(!f.s13f, "s13f case %zu (%s): shrink13 its own kernel", i, cases[i].what);
    free(ws);
  }
}

/* shrink2 inside the bf16 sm90 down (lmoe_fwd.s2f): see test_plan_s13f. */
static void test_plan_s2f(void) {
  static _Alignas(16) uint16_t x[64], out[16], w[64];
  int32_t ids[8];
  float tw[8];
  lmoe_dslot table[4];
  const int32_t H = 2048, I = 768, E = 64, k = 2, R = 16; /* the pool's widest down rank: 16 */
  const int64_t T = 256;                                  /* 8 pairs an expert: 64-row tiles */
  const struct {
    int sm90, fuse, t2, a2off, groups, cols2, want;
    const char *what;
  } cases[] = {
      {1, LMOE_FUSE_BY_SHAPE, 0, 0, 4, 64, 1, "four rank-16 adapters"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 0, 32, LMOE_SM90_FUSE_S13_MAX_COLS, 1, "at the bound"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 0, 33, LMOE_SM90_FUSE_S13_MAX_COLS + 8, 0, "a group's columns past it"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 0, 16, 0, 1, "ranks unknown: 16 groups x 16"},
      {1, LMOE_FUSE_BY_SHAPE, 0, 0, 17, 0, 0, "ranks unknown: 17 groups x 16"},
      {1, LMOE_FUSE_ON, 0, 0, 40, 4000, 1, "forced on, many passes"},
      {1, LMOE_FUSE_OFF, 0, 0, 4, 64, 0, "forced off"},
      {0, LMOE_FUSE_ON, 0, 0, 4, 64, 0, "the sm80 engine"},
      {1, LMOE_FUSE_ON, 1, 0, 4, 64, 0, "shrink2 in gate_up's epilogue"},
      {1, LMOE_FUSE_ON, 0, 8, 4, 64, 0, "A2 rows 8 bytes off"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    lmoe_ws_layout L;
    lmoe_k_layout(T, E, H, I, k, 4, R, &L);
    void *ws = malloc(L.total);
    lmoe_k_pool_plan pp;
    lmoe_k_plan_pool(H, I, 4, R, (void *)w, 1 << 24, 0, 1 << 20, (size_t)(1 << 21) + (size_t)cases[i].a2off,
                     1 << 22, table, &pp);
    lmoe_gemm_device d = {.cc = 90, .smem_optin = 232448, .force_cfg = -1, .sm90 = cases[i].sm90,
                          .shrink_mode = LMOE_SHRINK_BY_K, .fuse_t2 = cases[i].t2, .fuse_s13 = LMOE_FUSE_OFF,
                          .fuse_s2 = cases[i].fuse};
    lmoe_k_plan_args a = {.max_tokens = T, .E = E, .H = H, .I = I, .k = k, .w13 = w, .w2 = w, .pool = &pp,
                          .lora = 1, .groups = cases[i].groups, .cols2 = cases[i].cols2, .M = T, .x = x,
                          .out = out, .topk_ids = ids, .topk_w = tw, .workspace = ws, .workspace_bytes = L.total,
                          .dev = &d};
    lmoe_fwd f;
    CHECK(lmoe_k_plan(&a, &f) == L.total, "s2f case %zu: planned", i);
    CHECK(!f.s13f, "s2f case %zu: shrink13 its own kernel (fuse_s13 off)", i);
    if (cases[i].want)
      CHECK(f.engine == LMOE_ENGINE_SM90 && f.bm == LMOE_SM90_FUSE_S2_BM && (uint8_t *)f.s2f == (uint8_t *)ws + L.s13f,
            "s2f case %zu (%s): down computes shrink2, on the flags' region", i, cases[i].what);
    else
      CHECK(!f.s2f, "s2f case %zu (%s): shrink2 its own kernel", i, cases[i].what);
    free(ws);
  }
}

/* The column chunks of a sharded layer's down and all-reduce: they tile [0, H) in
   order, none empty, every bound but the last a multiple of 256 (the engines' N tiles
   divide a chunk), as many as forced or the shape asks where H is wide enough. */
static void test_shard_chunks(void) {
  const int32_t Hs[] = {1, 100, 255, 256, 257, 511, 512, 1000, 1280, 2048, 4096, 5120, 7168};
  const int64_t Ms[] = {0, 1, 1023, 1024, 4095, 4096, 16384};
  for (size_t h = 0; h < sizeof Hs / sizeof *Hs; h++)
    for (size_t m = 0; m < sizeof Ms / sizeof *Ms; m++)
      for (int32_t ranks = 1; ranks <= 4; ranks++)
        for (int32_t forced = 0; forced <= 9; forced++) {
          int32_t b[LMOE_K_CHUNKS_MAX + 2], H = Hs[h];
          b[LMOE_K_CHUNKS_MAX + 1] = -7;
          int32_t n = lmoe_k_shard_chunks(Ms[m], H, ranks, forced, b);
          int32_t want = forced ? forced : ranks < 2 ? 1 : Ms[m] >= 4096 ? 4 : Ms[m] >= 1024 ? 2 : 1;
          if (want > LMOE_K_CHUNKS_MAX) want = LMOE_K_CHUNKS_MAX;
          CHECK(n >= 1 && n <= want && b[LMOE_K_CHUNKS_MAX + 1] == -7, "H %d M %lld ranks %d forced %d: %d chunks",
                (int)H, (long long)Ms[m], (int)ranks, (int)forced, (int)n);
          /* fewer than asked only where chunks of 256 columns would not fit */
          CHECK(n == want || want > (H + 255) / 256, "H %d forced %d: %d of %d chunks", (int)H,
                (int)forced, (int)n, (int)want);
          CHECK(b[0] == 0 && b[n] == H, "H %d: bounds %d..%d", (int)H, (int)b[0], (int)b[n]);
          for (int32_t c = 0; c < n; c++) {
            CHECK(b[c + 1] > b[c], "H %d chunk %d empty (%d..%d)", (int)H, (int)c, (int)b[c], (int)b[c + 1]);
            CHECK(c + 1 == n || b[c + 1] % 256 == 0, "H %d bound %d = %d", (int)H, (int)(c + 1), (int)b[c + 1]);
          }
        }
  int32_t b[LMOE_K_CHUNKS_MAX + 1];
  CHECK(lmoe_k_shard_chunks(16384, 2048, 2, 0, b) == 4 && b[1] == 512 && b[2] == 1024 && b[3] == 1536,
        "qwen3's H at 16384 tokens: four chunks of 512");
  CHECK(lmoe_k_shard_chunks(2048, 4096, 2, 0, b) == 2 && b[1] == 2048, "mixtral's H at 2048 tokens: two halves");
  CHECK(lmoe_k_shard_chunks(16384, 2048, 1, 0, b) == 1, "one rank: one chunk");
  CHECK(lmoe_k_shard_chunks(512, 2048, 4, 0, b) == 1, "512 tokens: one chunk");
  CHECK(lmoe_k_shard_chunks(4096, 1000, 2, 3, b) == 3 && b[1] == 256 && b[2] == 512, "H 1000 in three");
}

int main(void) {
  test_shard_chunks();
  test_plan_fp8();
  test_plan_gather();
  test_plan_t2p();
  test_plan_s13f();
  test_plan_s2f();
  test_plan_shrink_sn();
  test_select();
  test_select_sm90();
  test_plan();
  test_plan_sm90();
  return test_summary();
}
