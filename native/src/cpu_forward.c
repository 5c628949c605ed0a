/* The cpu backend's forward: routing, expert grouping, the two expert GEMMs with the
   per-request LoRA terms fused in, SiLU·up, and the weighted reduction over top-k.

   Shape of the computation (mirrors the device pipeline, DESIGN.md "Data flow"):
     1. route     top-k of the router logits per token (parallel over tokens), or the
                  given ids (checked here: the host can) and weights
     2. align     counting sort of the (token, expert) pairs by expert, cut into tiles
                  of TILE pairs: one work item = (expert, tile)
     3. experts   per item: gu = W13_e x (+ LoRA), h = silu(g)·u rounded to bf16,
                  y = (W2_e h (+ LoRA)) · w  -> y[pair]   (parallel over items)
     4. reduce    out[t] = bf16(sum_j y[t·k + j]) in j order (parallel over tokens)
   A sharded layer (docs/design.md, "Sharding") computes its rank's part: its experts'
   pairs only (EP: ids outside [e0, e0 + E_local) are skipped in 2 and 4), or its slice
   of I (TP); step 4 then keeps the sum in float32 (in the first y row of the token) and
   the communicator sums the ranks' partials and rounds once (comm.c).
   Each pair's y row is written by exactly one item and each out row by one reduce
   item, so there are no races and the result does not depend on the thread count.

   Numerics: bf16 storage, fp32 accumulation. h is rounded to bf16 before the down
   projection, as a GPU kernel that stores the intermediate in bf16 would; the float64
   reference (reference.c) applies the same rounding so both define the same result.

   Speed: per work item the tokens are the vector lanes: x, gu, h and y live in
   feature-major tiles [features][TILE]. A block of MR = 6 bf16 weight rows is widened
   to fp32 once per tile, then for each group of 16 (AVX-512: 32) tokens 12 vector
   accumulators sweep K (see gemm_tile; vector extensions, compiled per ISA and picked
   at run time, so no -march=native is needed). Each weight row is read once per tile
   of up to TILE tokens. LoRA runs per slot inside a tile: pairs are sorted by
   (expert, slot), so a tile holds few slot runs. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* ISO C mode turns off a*b+c contraction; allow FMAs in this file's hot loops. */
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One build, the best code for the CPU it runs on: the expert task is compiled for
   AVX-512, for AVX2+FMA and for the baseline, and picked at run time. */
#define LMOE_X86_DISPATCH 1
#endif

enum {
  TILE = 64, /* pairs per work item: one expert's tokens share each widened weight row */
  MR = 6,    /* weight rows per register block */
  NR = 32,   /* lanes computed are a multiple of this (the widest register block) */
  KC = 128,  /* K is swept in chunks: a chunk of the x tile (KC x TILE floats) stays in
                L1 while every row block of W passes over it */
  ALIGN = 64,
  REDUCE_CHUNK = 16, /* tokens per reduce / route item */
};


_Static_assert((int)KC == (int)LMOE_FP8_BLOCK, "an FP8 weight chunk of KC columns has one block scale");

static inline float bf16f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}


/* e4m3 code -> float: every value exact (generated; lmoe_f8e4m3_to_f32 is the same). */
static const float e4m3_lut[256] = {
    0.0f, 0x1.0000000000000p-9f, 0x1.0000000000000p-8f, 0x1.8000000000000p-8f, 0x1.0000000000000p-7f, 0x1.4000000000000p-7f, 0x1.8000000000000p-7f, 0x1.c000000000000p-7f,
    0x1.0000000000000p-6f, 0x1.2000000000000p-6f, 0x1.4000000000000p-6f, 0x1.6000000000000p-6f, 0x1.8000000000000p-6f, 0x1.a000000000000p-6f, 0x1.c000000000000p-6f, 0x1.e000000000000p-6f,
    0x1.0000000000000p-5f, 0x1.2000000000000p-5f, 0x1.4000000000000p-5f, 0x1.6000000000000p-5f, 0x1.8000000000000p-5f, 0x1.a000000000000p-5f, 0x1.c000000000000p-5f, 0x1.e000000000000p-5f,
    0x1.0000000000000p-4f, 0x1.2000000000000p-4f, 0x1.4000000000000p-4f, 0x1.6000000000000p-4f, 0x1.8000000000000p-4f, 0x1.a000000000000p-4f, 0x1.c000000000000p-4f, 0x1.e000000000000p-4f,
    0x1.0000000000000p-3f, 0x1.2000000000000p-3f, 0x1.4000000000000p-3f, 0x1.6000000000000p-3f, 0x1.8000000000000p-3f, 0x1.a000000000000p-3f, 0x1.c000000000000p-3f, 0x1.e000000000000p-3f,
    0x1.0000000000000p-2f, 0x1.2000000000000p-2f, 0x1.4000000000000p-2f, 0x1.6000000000000p-2f, 0x1.8000000000000p-2f, 0x1.a000000000000p-2f, 0x1.c000000000000p-2f, 0x1.e000000000000p-2f,
    0x1.0000000000000p-1f, 0x1.2000000000000p-1f, 0x1.4000000000000p-1f, 0x1.6000000000000p-1f, 0x1.8000000000000p-1f, 0x1.a000000000000p-1f, 0x1.c000000000000p-1f, 0x1.e000000000000p-1f,
    0x1.0000000000000p+0f, 0x1.2000000000000p+0f, 0x1.4000000000000p+0f, 0x1.6000000000000p+0f, 0x1.8000000000000p+0f, 0x1.a000000000000p+0f, 0x1.c000000000000p+0f, 0x1.e000000000000p+0f,
    0x1.0000000000000p+1f, 0x1.2000000000000p+1f, 0x1.4000000000000p+1f, 0x1.6000000000000p+1f, 0x1.8000000000000p+1f, 0x1.a000000000000p+1f, 0x1.c000000000000p+1f, 0x1.e000000000000p+1f,
    0x1.0000000000000p+2f, 0x1.2000000000000p+2f, 0x1.4000000000000p+2f, 0x1.6000000000000p+2f, 0x1.8000000000000p+2f, 0x1.a000000000000p+2f, 0x1.c000000000000p+2f, 0x1.e000000000000p+2f,
    0x1.0000000000000p+3f, 0x1.2000000000000p+3f, 0x1.4000000000000p+3f, 0x1.6000000000000p+3f, 0x1.8000000000000p+3f, 0x1.a000000000000p+3f, 0x1.c000000000000p+3f, 0x1.e000000000000p+3f,
    0x1.0000000000000p+4f, 0x1.2000000000000p+4f, 0x1.4000000000000p+4f, 0x1.6000000000000p+4f, 0x1.8000000000000p+4f, 0x1.a000000000000p+4f, 0x1.c000000000000p+4f, 0x1.e000000000000p+4f,
    0x1.0000000000000p+5f, 0x1.2000000000000p+5f, 0x1.4000000000000p+5f, 0x1.6000000000000p+5f, 0x1.8000000000000p+5f, 0x1.a000000000000p+5f, 0x1.c000000000000p+5f, 0x1.e000000000000p+5f,
    0x1.0000000000000p+6f, 0x1.2000000000000p+6f, 0x1.4000000000000p+6f, 0x1.6000000000000p+6f, 0x1.8000000000000p+6f, 0x1.a000000000000p+6f, 0x1.c000000000000p+6f, 0x1.e000000000000p+6f,
    0x1.0000000000000p+7f, 0x1.2000000000000p+7f, 0x1.4000000000000p+7f, 0x1.6000000000000p+7f, 0x1.8000000000000p+7f, 0x1.a000000000000p+7f, 0x1.c000000000000p+7f, 0x1.e000000000000p+7f,
    0x1.0000000000000p+8f, 0x1.2000000000000p+8f, 0x1.4000000000000p+8f, 0x1.6000000000000p+8f, 0x1.8000000000000p+8f, 0x1.a000000000000p+8f, 0x1.c000000000000p+8f, NAN,
    -0.0f, -0x1.0000000000000p-9f, -0x1.0000000000000p-8f, -0x1.8000000000000p-8f, -0x1.0000000000000p-7f, -0x1.4000000000000p-7f, -0x1.8000000000000p-7f, -0x1.c000000000000p-7f,
    -0x1.0000000000000p-6f, -0x1.2000000000000p-6f, -0x1.4000000000000p-6f, -0x1.6000000000000p-6f, -0x1.8000000000000p-6f, -0x1.a000000000000p-6f, -0x1.c000000000000p-6f, -0x1.e000000000000p-6f,
    -0x1.0000000000000p-5f, -0x1.2000000000000p-5f, -0x1.4000000000000p-5f, -0x1.6000000000000p-5f, -0x1.8000000000000p-5f, -0x1.a000000000000p-5f, -0x1.c000000000000p-5f, -0x1.e000000000000p-5f,
    -0x1.0000000000000p-4f, -0x1.2000000000000p-4f, -0x1.4000000000000p-4f, -0x1.6000000000000p-4f, -0x1.8000000000000p-4f, -0x1.a000000000000p-4f, -0x1.c000000000000p-4f, -0x1.e000000000000p-4f,
    -0x1.0000000000000p-3f, -0x1.2000000000000p-3f, -0x1.4000000000000p-3f, -0x1.6000000000000p-3f, -0x1.8000000000000p-3f, -0x1.a000000000000p-3f, -0x1.c000000000000p-3f, -0x1.e000000000000p-3f,
    -0x1.0000000000000p-2f, -0x1.2000000000000p-2f, -0x1.4000000000000p-2f, -0x1.6000000000000p-2f, -0x1.8000000000000p-2f, -0x1.a000000000000p-2f, -0x1.c000000000000p-2f, -0x1.e000000000000p-2f,
    -0x1.0000000000000p-1f, -0x1.2000000000000p-1f, -0x1.4000000000000p-1f, -0x1.6000000000000p-1f, -0x1.8000000000000p-1f, -0x1.a000000000000p-1f, -0x1.c000000000000p-1f, -0x1.e000000000000p-1f,
    -0x1.0000000000000p+0f, -0x1.2000000000000p+0f, -0x1.4000000000000p+0f, -0x1.6000000000000p+0f, -0x1.8000000000000p+0f, -0x1.a000000000000p+0f, -0x1.c000000000000p+0f, -0x1.e000000000000p+0f,
    -0x1.0000000000000p+1f, -0x1.2000000000000p+1f, -0x1.4000000000000p+1f, -0x1.6000000000000p+1f, -0x1.8000000000000p+1f, -0x1.a000000000000p+1f, -0x1.c000000000000p+1f, -0x1.e000000000000p+1f,
    -0x1.0000000000000p+2f, -0x1.2000000000000p+2f, -0x1.4000000000000p+2f, -0x1.6000000000000p+2f, -0x1.8000000000000p+2f, -0x1.a000000000000p+2f, -0x1.c000000000000p+2f, -0x1.e000000000000p+2f,
    -0x1.0000000000000p+3f, -0x1.2000000000000p+3f, -0x1.4000000000000p+3f, -0x1.6000000000000p+3f, -0x1.8000000000000p+3f, -0x1.a000000000000p+3f, -0x1.c000000000000p+3f, -0x1.e000000000000p+3f,
    -0x1.0000000000000p+4f, -0x1.2000000000000p+4f, -0x1.4000000000000p+4f, -0x1.6000000000000p+4f, -0x1.8000000000000p+4f, -0x1.a000000000000p+4f, -0x1.c000000000000p+4f, -0x1.e000000000000p+4f,
    -0x1.0000000000000p+5f, -0x1.2000000000000p+5f, -0x1.4000000000000p+5f, -0x1.6000000000000p+5f, -0x1.8000000000000p+5f, -0x1.a000000000000p+5f, -0x1.c000000000000p+5f, -0x1.e000000000000p+5f,
    -0x1.0000000000000p+6f, -0x1.2000000000000p+6f, -0x1.4000000000000p+6f, -0x1.6000000000000p+6f, -0x1.8000000000000p+6f, -0x1.a000000000000p+6f, -0x1.c000000000000p+6f, -0x1.e000000000000p+6f,
    -0x1.0000000000000p+7f, -0x1.2000000000000p+7f, -0x1.4000000000000p+7f, -0x1.6000000000000p+7f, -0x1.8000000000000p+7f, -0x1.a000000000000p+7f, -0x1.c000000000000p+7f, -0x1.e000000000000p+7f,
    -0x1.0000000000000p+8f, -0x1.2000000000000p+8f, -0x1.4000000000000p+8f, -0x1.6000000000000p+8f, -0x1.8000000000000p+8f, -0x1.a000000000000p+8f, -0x1.c000000000000p+8f, NAN,
};

/* ---------------------------------------------------------------- workspace */

typedef struct ws_layout {
  size_t ids, wts, slot_of, offsets, sorted, items, y, scratch; /* byte offsets */
  size_t by_slot, slot_off;                                      /* LoRA: pairs by slot first */
  size_t per_thread;                                             /* scratch bytes per thread */
  size_t xt, gut, ht, wbuf, sh13t, sh2t;                         /* inside a thread's scratch */
  size_t total;
} ws_layout;

static size_t up64(size_t n) { return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

static void layout(ws_layout *L, int64_t M, int32_t k, int32_t E, int32_t H, int32_t I,
                   int32_t R, int32_t S, int32_t threads) {
  size_t P = (size_t)M * (size_t)k;
  size_t nitems = (P + 15) / 16 + (size_t)E; /* tiles are >= 16 pairs */
  size_t o = 0;
  L->ids = o, o += up64(P * sizeof(int32_t));
  L->wts = o, o += up64(P * sizeof(float));
  L->slot_of = o, o += up64((size_t)M * sizeof(int32_t));
  L->offsets = o, o += up64(((size_t)E + 1) * sizeof(int32_t));
  L->sorted = o, o += up64(P * sizeof(int32_t));
  L->by_slot = o, o += up64(S ? P * sizeof(int32_t) : 0);
  L->slot_off = o, o += up64(((size_t)S + 2) * sizeof(int32_t));
  L->items = o, o += up64(nitems * 3 * sizeof(int32_t));
  L->y = o, o += up64(P * (size_t)H * sizeof(float));
  L->scratch = o;
  /* Per thread, feature-major tiles [features][TILE] (tokens are the vector lanes):
     xt holds x and later y (x is dead once gate/up are done). */
  size_t R13 = 2 * (size_t)R;
  size_t t = 0, lane = TILE * sizeof(float);
  L->xt = t, t += up64((size_t)H * lane);
  L->gut = t, t += up64(2 * (size_t)I * lane);
  L->ht = t, t += up64((size_t)I * lane);
  L->wbuf = t, t += up64(MR * KC * sizeof(float));
  L->sh13t = t, t += up64((R13 ? R13 : 1) * lane);
  L->sh2t = t, t += up64((R ? (size_t)R : 1) * lane);
  L->per_thread = t;
  L->total = o + t * (size_t)threads;
}

size_t lmoe_cpu_workspace_bytes(const lmoe_context *ctx, const lmoe_layer_config *cfg,
                                const lmoe_pool_config *pool_cfg) {
  ws_layout L;
  int32_t R = pool_cfg ? pool_cfg->max_rank : 0, S = pool_cfg ? pool_cfg->num_slots : 0;
  layout(&L, cfg->max_tokens, cfg->top_k, cfg->num_experts, cfg->hidden, cfg->intermediate, R, S,
         ctx->threads > 0 ? ctx->threads : 1);
  return L.total + ALIGN; /* room to align the base */
}

/* ---------------------------------------------------------------- GEMM tile */

/* OUT[r][lane] (=|+=) alpha * sum_h W[r][h] * XT[h][lane], for r < rows and lanes in
   [lo, hi). W is bf16 [rows][ldw]; XT and OUT are feature-major fp32 tiles with TILE
   lanes per row. accumulate = 0 stores whole lane groups (lanes outside [lo, hi)
   are scratch), 1 adds inside [lo, hi) only. wbuf holds MR*KC floats.
   MR weight rows are widened to fp32 once, then for each group of GW lanes a
   register block of MR x NV native vectors (GW = 16 lanes with SSE/AVX2, 32 with
   AVX-512) sweeps K: NV vector loads of x and MR broadcasts of w feed MR*NV vector
   FMAs per step, 12 independent accumulators, enough to hide the FMA latency.
   Instantiated per vector width so each is native in its target (gcc splits
   over-wide generic vectors badly). */
#define LMOE_GEMM_TILE(NAME, VT, NV)                                                          \
  static inline __attribute__((always_inline)) void NAME(                                     \
      const void *Wv, size_t ldw, int32_t rows, int32_t K, const float *XT, int32_t lo,        \
      int32_t hi, float *OUT, int accumulate, float alpha, float *wbuf, const float *S,       \
      int32_t lds, int32_t split) {                                                           \
    enum { VL = sizeof(VT) / sizeof(float), GW = VL * NV }; /* lanes per group */           \
    if (hi <= lo || rows <= 0) return;                                                        \
    const uint16_t *W = Wv;                                                                   \
    const uint8_t *W8 = Wv;                                                                   \
    const int32_t nbs = (split + 127) / 128; /* S: row blocks of the rows before split */    \
    for (int32_t k0 = 0; k0 < K; k0 += KC) {                                                  \
      const int32_t kc = K - k0 < KC ? K - k0 : KC;                                           \
      const int add = accumulate || k0 > 0;                                                   \
      for (int32_t r0 = 0; r0 < rows; r0 += MR) {                                             \
        int32_t nr = rows - r0 < MR ? rows - r0 : MR;                                         \
        for (int32_t i = 0; i < nr; i++) {                                                    \
          float *d = wbuf + (size_t)i * KC;                                                   \
          if (S) { /* FP8: code * its block's scale; KC = 128, so one scale per chunk */     \
            const int32_t r = r0 + i;                                                         \
            const int32_t br = r < split ? r / 128 : nbs + (r - split) / 128;                 \
            const float sc = S[(size_t)br * (size_t)lds + (size_t)(k0 / 128)];                \
            const uint8_t *w8 = W8 + (size_t)r * ldw + k0;                                    \
            for (int32_t h = 0; h < kc; h++) d[h] = e4m3_lut[w8[h]] * sc;                     \
            continue;                                                                         \
          }                                                                                   \
          const uint16_t *w = W + (size_t)(r0 + i) * ldw + k0;                                \
          for (int32_t h = 0; h < kc; h++) { /* bf16 -> fp32: the bits move up 16 */         \
            uint32_t u = (uint32_t)w[h] << 16;                                                \
            memcpy(&d[h], &u, sizeof u);                                                      \
          }                                                                                   \
        }                                                                                     \
        /* rows past nr repeat the last one: computed, never stored */                        \
        const float *wr[MR];                                                                  \
        for (int32_t i = 0; i < MR; i++) wr[i] = wbuf + (size_t)(i < nr ? i : nr - 1) * KC;   \
        for (int32_t g0 = lo - lo % GW; g0 < hi; g0 += GW) {                                  \
          VT acc[MR][NV];                                                                     \
          _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)                                \
          _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = (VT){0};           \
          const float *xp = XT + (size_t)k0 * TILE + g0;                                      \
          for (int32_t h = 0; h < kc; h++) {                                                  \
            VT x[NV];                                                                         \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \
              x[v] = *(const VT *)(xp + (size_t)h * TILE + v * VL);                           \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                            \
              float wv = wr[i][h];                                                            \
              _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] += wv * x[v];    \
            }                                                                                 \
          }                                                                                   \
          int32_t l0 = lo > g0 ? lo - g0 : 0, l1 = hi < g0 + GW ? hi - g0 : GW;               \
          if (!accumulate) l0 = 0, l1 = GW; /* store mode owns whole groups */                \
          for (int32_t i = 0; i < nr; i++) {                                                  \
            float *o = OUT + (size_t)(r0 + i) * TILE + g0;                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                            \
              VT val = acc[i][v] * alpha;                                                     \
              if (!add) {                                                                     \
                *(VT *)(o + v * VL) = val;                                                    \
              } else if (l0 <= v * VL && v * VL + VL <= l1) {                                 \
                *(VT *)(o + v * VL) += val;                                                   \
              } else {                                                                        \
                for (int32_t c = 0; c < VL; c++)                                              \
                  if (v * VL + c >= l0 && v * VL + c < l1) o[v * VL + c] += val[c];           \
              }                                                                               \
            }                                                                                 \
          }                                                                                   \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  }

/* hr[i] = bf16(silu(g[i]) * u[i]) for i < n (a multiple of the vector length).
   exp by range reduction, x = i*ln2 + r with |r| < ln2, and a degree-8 Taylor
   polynomial (relative error ~1e-7, far below the bf16 rounding that follows);
   libm's expf would not vectorise. NaN stays NaN through the rounding. */
#define LMOE_SILU(NAME, VT, IT, UT)                                                                 \
  static inline __attribute__((always_inline)) void NAME(const float *g, const float *u,        \
                                                         float *hr, int32_t n) {                \
    enum { VL = sizeof(VT) / sizeof(float) };                                                   \
    for (int32_t i = 0; i < n; i += VL) {                                                       \
      VT gv = *(const VT *)(g + i), uv = *(const VT *)(u + i);                                  \
      VT x = -gv;                                                                               \
      IT lo = x < -87.0f, hi = x > 88.0f;                                                       \
      x = (VT)(((IT)x & ~lo) | ((IT)((VT){0} - 87.0f) & lo));                                   \
      x = (VT)(((IT)x & ~hi) | ((IT)((VT){0} + 88.0f) & hi));                                   \
      IT k = __builtin_convertvector(x * 1.44269504088896341f, IT);                            \
      VT kf = __builtin_convertvector(k, VT);                                                   \
      VT r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;                       \
      VT p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +  \
             r * (1.0f / 720 + r * (1.0f / 5040 + r * (1.0f / 40320))))))));                    \
      VT e = p * (VT)((k + 127) << 23);                                                         \
      VT h = gv / (1.0f + e) * uv;                                                              \
      UT b = (UT)h, nan = (UT)(h != h);                                                         \
      UT rb = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u; /* round to nearest even */     \
      *(VT *)(hr + i) = (VT)((rb & ~nan) | (b & nan));                                          \
    }                                                                                           \
  }

typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef uint32_t vu4 __attribute__((vector_size(16)));
#ifdef __wasm_simd128__
/* SIMD128 has a tile of its own (cpu_gemm_wasm.h: 4 rows x 2 vectors, so nothing
   spills, and widening with shuffles), with the generic tile's results bit for bit. */
#include "cpu_gemm_wasm.h"
#define gemm_tile_v4 gemm_tile_wasm
#else
LMOE_GEMM_TILE(gemm_tile_v4, vf4, 4)
#endif
LMOE_SILU(silu_v4, vf4, vi4, vu4)
#ifdef LMOE_X86_DISPATCH
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
LMOE_GEMM_TILE(gemm_tile_v8, vf8, 2)
LMOE_GEMM_TILE(gemm_tile_v16, vf16, 2)
LMOE_SILU(silu_v8, vf8, vi8, vu8)
LMOE_SILU(silu_v16, vf16, vi16, vu16)
#endif

/* ---------------------------------------------------------------- the forward */

typedef struct fwd {
  lmoe_context *ctx;
  const lmoe_forward_plan *plan;
  int32_t E, H, I, k, R, R13;
  int64_t M;
  const uint16_t *x;
  const void *w13, *w2;       /* bf16, or f8_e4m3 codes when s13 is set */
  const float *s13, *s2;      /* FP8 layers: block scales (internal.h, lmoe_layer), else NULL */
  const int32_t *ids;
  const float *wts;
  int32_t *slot_of; /* per token: slot whose LoRA applies, -1 none (only when LoRA runs) */
  const int32_t *sorted, *items;
  float *y;
  uint8_t *scratch;
  const ws_layout *L;
  bool lora;
  int32_t *route_ids; /* routing writes */
  float *route_wts;
  int32_t e0, El;     /* local experts [e0, e0 + El) */
  bool partial;       /* sharded: reduce keeps float32 sums for the communicator */
} fwd;

static void route_task(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  fwd *f = arg;
  const lmoe_buffer *lg = f->plan->logits;
  int32_t E = f->E, k = f->k;
  int64_t t_end = (item + 1) * REDUCE_CHUNK < f->M ? (item + 1) * REDUCE_CHUNK : f->M;
  for (int64_t t = item * REDUCE_CHUNK; t < t_end; t++) {
    float vals[32];
    int32_t sel[32];
    int32_t n = 0;
    float mx = -INFINITY;
    for (int32_t e = 0; e < E; e++) {
      float v = lg->dtype == LMOE_DTYPE_F32 ? ((const float *)lg->data)[t * E + e]
                                            : bf16f(((const uint16_t *)lg->data)[t * E + e]);
      if (v > mx) mx = v;
      /* keep the k largest in order; an equal value never passes an earlier expert */
      if (n < k || v > vals[n - 1]) {
        int32_t pos = n < k ? n : k - 1;
        while (pos > 0 && vals[pos - 1] < v) {
          if (pos < k) vals[pos] = vals[pos - 1], sel[pos] = sel[pos - 1];
          pos--;
        }
        vals[pos] = v;
        sel[pos] = e;
        if (n < k) n++;
      }
    }
    float sum = 0.0f;
    for (int32_t e = 0; e < E; e++) {
      float v = lg->dtype == LMOE_DTYPE_F32 ? ((const float *)lg->data)[t * E + e]
                                            : bf16f(((const uint16_t *)lg->data)[t * E + e]);
      sum += expf(v - mx);
    }
    float sel_sum = 0.0f, p[32];
    for (int32_t j = 0; j < k; j++) sel_sum += p[j] = expf(vals[j] - mx);
    float den = f->plan->layer->cfg.renormalize ? sel_sum : sum;
    for (int32_t j = 0; j < k; j++) {
      f->route_ids[t * k + j] = sel[j];
      f->route_wts[t * k + j] = p[j] / den;
    }
  }
}

/* The expert work of one item. width (a constant after inlining) picks the GEMM
   instance, so each target below gets only its own. */
#define gemm_tile(...)                                       \
  do {                                                       \
    if (width == 16) GEMM16(__VA_ARGS__);                    \
    else if (width == 8) GEMM8(__VA_ARGS__);                 \
    else gemm_tile_v4(__VA_ARGS__);                          \
  } while (0)
#ifdef LMOE_X86_DISPATCH
#define GEMM16 gemm_tile_v16
#define GEMM8 gemm_tile_v8
#define SILU16 silu_v16
#define SILU8 silu_v8
#else
#define GEMM16 gemm_tile_v4
#define GEMM8 gemm_tile_v4
#define SILU16 silu_v4
#define SILU8 silu_v4
#endif
static inline __attribute__((always_inline)) void expert_body(void *arg, int64_t item,
                                                              int32_t thread, const int width) {
  fwd *f = arg;
  const ws_layout *L = f->L;
  uint8_t *sc = f->scratch + L->per_thread * (size_t)thread;
  float *xt = (float *)(sc + L->xt), *gut = (float *)(sc + L->gut), *ht = (float *)(sc + L->ht);
  float *wbuf = (float *)(sc + L->wbuf), *sh13t = (float *)(sc + L->sh13t);
  float *sh2t = (float *)(sc + L->sh2t), *yt = xt;
  const size_t H = (size_t)f->H, I = (size_t)f->I, I2 = 2 * I;
  const int32_t e = f->items[3 * item], start = f->items[3 * item + 1], n = f->items[3 * item + 2];
  const int32_t *pairs = f->sorted + start;
  const int32_t np = (n + NR - 1) / NR * NR; /* lanes computed; those past n are zero */

  /* gather x of the tile, feature-major, as fp32 */
  for (int32_t i = 0; i < n; i++) {
    const uint16_t *xr = f->x + (size_t)(pairs[i] / f->k) * H;
    for (size_t h = 0; h < H; h++) xt[h * TILE + (size_t)i] = bf16f(xr[h]);
  }
  for (size_t h = 0; h < H; h++)
    for (int32_t i = n; i < np; i++) xt[h * TILE + (size_t)i] = 0.0f;
  /* gu = W13_e x */
  const size_t nbh = (H + 127) / 128, nbi = (I + 127) / 128;
  if (f->s13) /* FP8: the codes with their block scales; LoRA below reads xt, the bf16 activations */
    gemm_tile((const uint8_t *)f->w13 + (size_t)e * I2 * H, H, (int32_t)I2, (int32_t)H, xt, 0, n, gut, 0, 1.0f,
              wbuf, f->s13 + (size_t)e * 2 * nbi * nbh, (int32_t)nbh, (int32_t)I);
  else
    gemm_tile((const uint16_t *)f->w13 + (size_t)e * I2 * H, H, (int32_t)I2, (int32_t)H, xt, 0, n, gut, 0, 1.0f,
              wbuf, NULL, 0, 0);

  const lmoe_pool *pool = f->plan->pool;
  const size_t R = (size_t)f->R, R13 = (size_t)f->R13;
  /* gate/up LoRA per run of consecutive tokens sharing a slot (requests are
     contiguous, so a tile has few runs): shrink, then expand into gate and up rows */
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r13 > 0) {
        const uint16_t *a13 = lmoe_slot_ptr(pool, slot, pool->off_a13) + (size_t)e * R13 * H;
        const uint16_t *b13 = lmoe_slot_ptr(pool, slot, pool->off_b13) + (size_t)e * I2 * R13;
        gemm_tile(a13, H, sl->r13, (int32_t)H, xt, s, s + len, sh13t, 0, 1.0f, wbuf, NULL, 0, 0);
        if (sl->g_hi > sl->g_lo)
          gemm_tile(b13 + sl->g_lo, R13, (int32_t)I, sl->g_hi - sl->g_lo,
                    sh13t + (size_t)sl->g_lo * TILE, s, s + len, gut, 1, sl->scale_gate, wbuf, NULL, 0, 0);
        if (sl->u_hi > sl->u_lo)
          gemm_tile(b13 + I * R13 + sl->u_lo, R13, (int32_t)I, sl->u_hi - sl->u_lo,
                    sh13t + (size_t)sl->u_lo * TILE, s, s + len, gut + I * TILE, 1, sl->scale_up,
                    wbuf, NULL, 0, 0);
      }
      s += len;
    }
  }
  /* h = silu(g) * u, stored as bf16 values (see the note at the top) */
  for (size_t c = 0; c < I; c++) {
    const float *g = gut + c * TILE, *u = gut + (I + c) * TILE;
    float *hr = ht + c * TILE;
    if (width == 16) SILU16(g, u, hr, np);
    else if (width == 8) SILU8(g, u, hr, np);
    else silu_v4(g, u, hr, np);
  }
  /* y = W2_e h (+ down LoRA) */
  if (f->s2)
    gemm_tile((const uint8_t *)f->w2 + (size_t)e * H * I, I, (int32_t)H, (int32_t)I, ht, 0, n, yt, 0, 1.0f, wbuf,
              f->s2 + (size_t)e * nbh * nbi, (int32_t)nbi, (int32_t)H);
  else
    gemm_tile((const uint16_t *)f->w2 + (size_t)e * H * I, I, (int32_t)H, (int32_t)I, ht, 0, n, yt, 0, 1.0f, wbuf,
              NULL, 0, 0);
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r2 > 0) {
        const uint16_t *a2 = lmoe_slot_ptr(pool, slot, pool->off_a2) + (size_t)e * R * I;
        const uint16_t *b2 = lmoe_slot_ptr(pool, slot, pool->off_b2) + (size_t)e * H * R;
        gemm_tile(a2, I, sl->r2, (int32_t)I, ht, s, s + len, sh2t, 0, 1.0f, wbuf, NULL, 0, 0);
        gemm_tile(b2, R, (int32_t)H, sl->r2, sh2t, s, s + len, yt, 1, sl->scale_down, wbuf, NULL, 0, 0);
      }
      s += len;
    }
  }
  /* routed weight, into the pair's row of y */
  for (int32_t i = 0; i < n; i++) {
    float w = f->wts[pairs[i]];
    float *yr = f->y + (size_t)pairs[i] * H;
    for (size_t h = 0; h < H; h++) yr[h] = w * yt[h * TILE + (size_t)i];
  }
}

#undef gemm_tile

static void expert_task_base(void *arg, int64_t item, int32_t thread) {
  expert_body(arg, item, thread, 4);
}
#ifdef LMOE_X86_DISPATCH
__attribute__((target("avx2,fma"))) static void expert_task_avx2(void *arg, int64_t item,
                                                                  int32_t thread) {
  expert_body(arg, item, thread, 8);
}
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) static void
expert_task_avx512(void *arg, int64_t item, int32_t thread) {
  expert_body(arg, item, thread, 16);
}
#endif

static lmoe_cpu_task pick_expert_task(void) {
#ifdef LMOE_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return expert_task_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return expert_task_avx2;
#endif
  return expert_task_base;
}

static void reduce_task(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  fwd *f = arg;
  const size_t H = (size_t)f->H;
  uint16_t *out = f->plan->out->data;
  int64_t t_end = (item + 1) * REDUCE_CHUNK < f->M ? (item + 1) * REDUCE_CHUNK : f->M;
  for (int64_t t = item * REDUCE_CHUNK; t < t_end; t++) {
    const float *y0 = f->y + (size_t)t * f->k * H;
    uint16_t *o = out + (size_t)t * H;
    if (f->partial) { /* this rank's pairs, in j order, kept in float32 in row j = 0 */
      float *p0 = f->y + (size_t)t * f->k * H;
      bool first = true;
      for (int32_t j = 0; j < f->k; j++) {
        int32_t le = f->ids[t * f->k + j] - f->e0;
        if (le < 0 || le >= f->El) continue;
        const float *yj = y0 + (size_t)j * H;
        if (first && j > 0)
          for (size_t h = 0; h < H; h++) p0[h] = yj[h];
        else if (!first)
          for (size_t h = 0; h < H; h++) p0[h] += yj[h];
        first = false;
      }
      if (first) memset(p0, 0, H * sizeof *p0); /* no pair of this token is ours */
      continue;
    }
    for (size_t h = 0; h < H; h++) { /* lmoe_f32_to_bf16, inline so the loop vectorises */
      float s = y0[h];
      for (int32_t j = 1; j < f->k; j++) s += y0[(size_t)j * H + h];
      uint32_t u;
      memcpy(&u, &s, sizeof u);
      uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      uint16_t quiet = (uint16_t)((u >> 16) | 0x40u);
      o[h] = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
    }
  }
}

static lmoe_status cpu_forward_part(lmoe_context *ctx, const lmoe_forward_plan *plan, fwd *f, ws_layout *L,
                                    uint8_t **ws_out) {
  const lmoe_layer *layer = plan->layer;
  const lmoe_layer_config *c = &layer->local; /* the shapes this rank holds */
  const int64_t M = plan->M;
  const int32_t E = layer->cfg.num_experts, El = c->num_experts, k = c->top_k;
  const int32_t R = plan->pool ? plan->pool->cfg.max_rank : 0;
  const int32_t S = plan->pool ? plan->pool->cfg.num_slots : 0;

  /* Given routing: the host can check the ids, so it does, before any work. */
  if (!plan->logits) {
    const int32_t *ids = plan->topk_ids->data;
    for (int64_t i = 0; i < M * k; i++)
      if (ids[i] < 0 || ids[i] >= E)
        return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                         "topk_ids of token %lld (position %d) is %d; experts are 0..%d",
                         (long long)(i / k), (int)(i % k), (int)ids[i], (int)E - 1);
  }

  layout(L, M, k, El, c->hidden, c->intermediate, R, S, ctx->threads > 0 ? ctx->threads : 1);
  uint8_t *ws = (uint8_t *)(((uintptr_t)ctx->workspace + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1));
  if (!ctx->workspace || L->total + (size_t)(ws - (uint8_t *)ctx->workspace) > ctx->workspace_bytes)
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "the context's workspace (%zu bytes) is smaller than this forward needs (%zu)",
                     ctx->workspace_bytes, L->total + ALIGN);
  *ws_out = ws;

  f->ctx = ctx;
  f->plan = plan;
  f->E = E, f->H = c->hidden, f->I = c->intermediate, f->k = k, f->R = R, f->R13 = 2 * R, f->M = M;
  f->e0 = layer->e0, f->El = El;
  f->partial = layer->cfg.shard_size > 1;
  f->x = plan->x->data;
  f->w13 = layer->w13->data;
  f->w2 = layer->w2->data;
  f->s13 = layer->w13s ? layer->w13s->data : NULL;
  f->s2 = layer->w2s ? layer->w2s->data : NULL;
  f->slot_of = (int32_t *)(ws + L->slot_of);
  f->y = (float *)(ws + L->y);
  f->scratch = ws + L->scratch;
  f->L = L;

  /* Which tokens take which adapter. device_sync emulates the old way: the device
     reduces "any token active?", copies the flag back and the host waits on it. */
  bool lora = plan->run_lora;
  if (plan->pool && (lora || plan->guard == LMOE_GUARD_DEVICE_SYNC)) {
    const int32_t *m = plan->meta, *off = lmoe_meta_offsets(m);
    for (int32_t r = 0; r < lmoe_meta_requests(m); r++) {
      int32_t slot = lmoe_meta_request_slot(m, r);
      for (int32_t t = off[r]; t < off[r + 1]; t++) f->slot_of[t] = slot;
    }
  }
  if (plan->guard == LMOE_GUARD_DEVICE_SYNC) {
    bool any = false;
    for (int64_t t = 0; plan->pool && t < M && !any; t++) any = f->slot_of[t] >= 0;
    ctx->counters.host_waits++;
    lora = any;
  }
  f->lora = lora && plan->pool;
  if (M == 0) return LMOE_OK;

  /* 1. route (over all E experts: the routing is the whole layer's) */
  if (plan->logits) {
    f->route_ids = (int32_t *)(ws + L->ids);
    f->route_wts = (float *)(ws + L->wts);
    lmoe_cpu_parallel(ctx, (M + REDUCE_CHUNK - 1) / REDUCE_CHUNK, route_task, f);
    ctx->counters.launches++;
    f->ids = f->route_ids;
    f->wts = f->route_wts;
  } else {
    f->ids = plan->topk_ids->data;
    f->wts = plan->topk_w->data;
  }

  /* 2. align: stable counting sort of this rank's pairs by local expert, then
     (expert, tile) items */
  int32_t *off = (int32_t *)(ws + L->offsets), *sorted = (int32_t *)(ws + L->sorted);
  int32_t *items = (int32_t *)(ws + L->items);
  const int64_t P = M * k;
  const int32_t e0 = f->e0;
#define LOCAL(p) ((uint32_t)(f->ids[p] - e0) < (uint32_t)El)
  memset(off, 0, ((size_t)El + 1) * sizeof *off);
  int64_t Pl = 0;
  for (int64_t p = 0; p < P; p++)
    if (LOCAL(p)) off[f->ids[p] - e0 + 1]++, Pl++;
  /* Smaller tiles when full ones would leave threads idle. Lanes are independent, so
     the tile size changes no result, only the weight reuse. */
  int32_t tile = TILE;
  int64_t want = 2 * (int64_t)(ctx->threads > 0 ? ctx->threads : 1);
  if (Pl < want * TILE) {
    int64_t t = (Pl + want - 1) / want;
    tile = (int32_t)(t < 16 ? 16 : (t + 15) / 16 * 16);
  }
  int64_t nitems = 0;
  for (int32_t e = 0; e < El; e++) {
    int32_t cnt = off[e + 1];
    off[e + 1] += off[e];
    for (int32_t s = 0; s < cnt; s += tile) {
      items[3 * nitems] = e;
      items[3 * nitems + 1] = off[e] + s;
      items[3 * nitems + 2] = cnt - s < tile ? cnt - s : tile;
      nitems++;
    }
  }
  /* off[e] is now the start of expert e; fill using a running cursor per expert.
     With LoRA the pairs are first put in slot order (stable), so inside an expert a
     slot's tokens are adjacent: one LoRA pass per slot and tile, not per request. */
  if (f->lora) {
    int32_t *so = (int32_t *)(ws + L->slot_off), *by = (int32_t *)(ws + L->by_slot);
    memset(so, 0, ((size_t)S + 2) * sizeof *so);
    for (int64_t p = 0; p < P; p++) so[f->slot_of[p / k] + 2]++; /* key slot + 1, >= 0 */
    for (int32_t i = 2; i < S + 2; i++) so[i] += so[i - 1];
    for (int64_t p = 0; p < P; p++) by[so[f->slot_of[p / k] + 1]++] = (int32_t)p;
    for (int64_t q = 0; q < P; q++)
      if (LOCAL(by[q])) sorted[off[f->ids[by[q]] - e0]++] = by[q];
  } else {
    for (int64_t p = 0; p < P; p++)
      if (LOCAL(p)) sorted[off[f->ids[p] - e0]++] = (int32_t)p;
  }
#undef LOCAL
  f->sorted = sorted;
  f->items = items;

  /* 3. experts (LoRA fused in when it runs: then this task counts as LoRA work) */
  lmoe_cpu_parallel(ctx, nitems, pick_expert_task(), f);
  ctx->counters.launches++;
  if (f->lora) ctx->counters.lora_launches++;

  /* 4. reduce over top-k (sharded: float32 partials, rounded after the sum over ranks) */
  lmoe_cpu_parallel(ctx, (M + REDUCE_CHUNK - 1) / REDUCE_CHUNK, reduce_task, f);
  ctx->counters.launches++;
  return LMOE_OK;
}

lmoe_status lmoe_cpu_forward(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream) {
  (void)stream;
  fwd f = {0};
  ws_layout L;
  uint8_t *ws = NULL;
  lmoe_status st = cpu_forward_part(ctx, plan, &f, &L, &ws);
  const lmoe_layer *layer = plan->layer;
  if (layer->cfg.shard_size < 2 || !layer->comm || !layer->comm->group) return st;
  /* The sum over the ranks, also after a failure (the others would wait for it). */
  char keep[LMOE_ERRBUF];
  if (st) memcpy(keep, ctx->error, sizeof keep);
  lmoe_status st2 = lmoe_comm_cpu_allreduce(layer->comm, ctx, f.y, plan->M, layer->cfg.hidden,
                                            (int64_t)layer->cfg.top_k * layer->cfg.hidden, plan->out->data, st != 0);
  if (st) memcpy(ctx->error, keep, sizeof keep);
  return st ? st : st2;
}
