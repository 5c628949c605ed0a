/* CUDA kernels of the loramoe forward: launchers callable from C. Each launcher only
   enqueues on the stream given last and returns the launch status (cudaGetLastError);
   none of them waits for the device or allocates. */
#ifndef LMOE_KERNELS_H
#define LMOE_KERNELS_H

#include "gemm_config.h"

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The LoRA shrink outputs t13/t2 are zero-filled up to the rank rounded to this, and
   their row strides (t13s, t2s) are the pool's rank (twice it for t13) rounded to it:
   an engine may read a rank's columns in chunks that divide it. */
enum { LMOE_K_RANK_PAD = 32 };

/* The routing's per (expert, group) pair counts (cnt) and placement offsets (off) are
   kept in LMOE_K_CNT_REP replicas, lmoe_k_cnt_stride ints apart; the pairs of token t
   go to replica (t / 8) % LMOE_K_CNT_REP. One copy made every pair's atomic land on the
   same few L2 lines (qwen3's 131,072 pairs on 128 counters), and those atomics were
   most of the routing's and the scatter's time (docs/gpu-notes.md 31). */
enum { LMOE_K_CNT_REP = 16 };
static inline int32_t lmoe_k_cnt_stride(int32_t E, int32_t gstride) {
  return (int32_t)(((int64_t)E * gstride + 63) / 64 * 64);
}

/* 16-byte aligned fast paths the plan allows (lmoe_fwd.al_x / al_lora bit sets): rows
   of x, of W13, of W2 (al_x); of a pool's A13, B13, A2, B2 (al_lora). */
enum {
  LMOE_AL_X = 1, LMOE_AL_W13 = 2, LMOE_AL_W2 = 4,
  LMOE_AL_A13 = 8, LMOE_AL_B13 = 16, LMOE_AL_A2 = 32, LMOE_AL_B2 = 64
};

/* Per-slot facts on the device (a table per pool, indexed by slot; written in stream
   order by lmoe_k_set_slot when a slot is loaded or unloaded). */
typedef struct lmoe_dslot {
  int32_t r13;              /* shrink rows of a13 in use (max(g_hi, u_hi)), 0: no gate/up */
  int32_t r2;               /* down rank, 0: no down */
  int32_t g_lo, g_hi, u_lo, u_hi;
  float sg, su, sd;         /* scales of gate, up, down */
  int32_t pad;
} lmoe_dslot;

/* Batch metadata on the device, an int32 array:
     [0] n_req, [1] n_active, [2 .. 2+n_req] offsets (n_req + 1),
     then group of each request (0 = no adapter, 1 + index into the active list),
     then the active slots (n_active). */
enum { LMOE_META_MAX_REQ_PARAM = 400, LMOE_META_MAX_ACTIVE_PARAM = 120 };
static inline size_t lmoe_meta_ints(int32_t n_req, int32_t n_active) {
  return 2 + ((size_t)n_req + 1) + (size_t)n_req + (size_t)n_active;
}
/* The active slots of device meta (group g > 0 reads its slot at [g - 1]). */
#ifdef __CUDACC__
__host__ __device__
#endif
static inline const int32_t *lmoe_k_meta_active(const int32_t *meta) { return meta + 3 + 2 * meta[0]; }
/* Small batches travel as kernel parameters (copied at launch, so they never race a
   later batch): the same layout, in a fixed-size struct. */
typedef struct lmoe_meta_param {
  int32_t count; /* ints used */
  int32_t v[2 + LMOE_META_MAX_REQ_PARAM + 1 + LMOE_META_MAX_REQ_PARAM + LMOE_META_MAX_ACTIVE_PARAM];
} lmoe_meta_param;

/* Everything the forward's kernels read, by value. Pointers into the context's
   workspace, the layer, the pool and the batch. */
typedef struct lmoe_fwd {
  int32_t M, H, I, E, k, renorm;
  int32_t bm;                /* row tile: 128, or 64 for small batches (fewer padding rows) */
  int32_t mt_max;            /* upper bound of row tiles: (M*k + E*(bm-1)) / bm */
  int32_t gstride;           /* groups per expert in cnt/off: pool slots + 1 (1 without pool) */
  int32_t cstride;           /* ints between cnt's (and off's) replicas: lmoe_k_cnt_stride */
  int32_t lora;              /* LoRA may run (meta and pool present) */
  int32_t R;                 /* pool max_rank (0 without pool) */
  int32_t t13s, t2s;         /* row strides of t13, t2 (multiples of LMOE_K_RANK_PAD) */
  int32_t al_x, al_lora;     /* 16-byte aligned fast paths allowed (LMOE_AL_*) */
  int32_t engine;            /* engine of the expert GEMMs (LMOE_ENGINE_*; gemm_cfg's row says the same) */
  int32_t gemm_cfg;          /* row of the GEMM table for gate_up and down */
  int32_t shrink13_cfg;      /* rows of the GEMM table for the shrinks (each its own */
  int32_t shrink2_cfg;       /* engine's: gemm_config.h's shrink_mode) */
  int32_t shrink_sn;         /* the sm90 shrinks' pass width, 64 or 128 columns (plan.c:
                                gemm_config.h's LMOE_SM90_SHRINK_NARROW_ROWS) */
  /* Sharding (docs/design.md, "Sharding"; set by the backend after lmoe_k_plan, which
     leaves them 0). E above is the experts this rank computes, [e0, e0 + E) of the
     layer's; E_route the experts the router picks from (the logits' columns; 0: E).
     Routed ids stay the layer's: a pair whose id is outside [e0, e0 + E) is another
     rank's and is not counted, placed or summed here. */
  int32_t E_route, e0;
  /* The output columns [n0, n1) that down and reduce compute this launch (n1 = 0: all
     of H, n0 = 0). A sharded layer cuts them in chunks so that each chunk's all-reduce
     overlaps the next chunk's down (docs/design.md, "Sharding"); every chunk but the
     last is a multiple of 256 columns wide, so each engine's N tiles divide it. */
  int32_t n0, n1;
  float *part;               /* [M, n1 - n0] f32 (the chunk's own region), or NULL: reduce
                                writes its float32 sums here, unrounded */
  const uint16_t *x;         /* [M, H] */
  const void *logits;        /* [M, E] f32 or bf16, or NULL */
  int32_t logits_bf16;
  const int32_t *ids_in;     /* given routing, or NULL */
  const float *w_in;
  uint16_t *out;             /* [M, H] */
  const uint16_t *w13, *w2;
  /* workspace */
  int32_t *ids;              /* [M*k] */
  float *tw;                 /* [M*k] */
  int32_t *tok_group;        /* [M] */
  int32_t *cnt, *off;        /* [LMOE_K_CNT_REP][cstride], (expert, group) at e*gstride+g */
  int32_t *tile_expert;      /* [mt_max] */
  int32_t *ntiles;           /* [1] */
  int32_t *any;              /* [1] device_sync flag */
  int32_t *sorted_pair;      /* [mt_max*BM] */
  int32_t *sorted_group;     /* [mt_max*BM] */
  uint16_t *h;               /* [mt_max*BM, I] */
  int32_t h_rows;            /* rows of h a kernel may read (tensor maps: past them reads zero) */
  uint16_t *y;               /* [M*k, H] */
  /* x's rows in sorted order, so gate_up's A arrives by TMA boxes as down's does (the
     bf16 sm90 engine where lmoe_gemm_device.gather_x says; NULL: gathered by cp.async
     from x). It lies in y's region, which down writes only after gate_up has read it. */
  uint16_t *xg;              /* [h rows, H], or NULL */
  int32_t *pair_row;         /* [M*k] sorted row of each pair (-1: another rank's expert);
                                written by scatter where xg or an FP8 layer needs it, else NULL */
  uint16_t *t13, *t2;        /* [mt_max*BM, t13s], [mt_max*BM, t2s] */
  /* LoRA's shrink2 inside the sm90 gate_up (docs/design.md, "shrink2 in gate_up's
     epilogue"; the plan sets it where LMOE_SM90_FUSE_T2=1 asks and the shape allows):
     each of gate_up's N tiles writes its rows' partial t2 over its 128 columns of h,
     float32, plane nt of
     [planes][h_rows][t2s] (in y's region, which down writes only later), and
     lmoe_k_t2_finish adds the planes in order into t2; NULL: lmoe_k_shrink2 computes t2 */
  float *t2p;
  /* LoRA's shrink13 inside the bf16 sm90 gate_up (docs/design.md, "shrink13 inside
     gate_up"; the plan sets it where LMOE_SM90_FUSE_S13 and the shape say): the walk
     gives each row tile one more item, before its N tiles, that multiplies the tile's x
     by its groups' A13 and writes t13; it then sets the tile's flag here (release, GPU
     scope), and an N tile's producer waits for it (acquire) before loading the expand's
     t13. Zeroed by the scan each forward. NULL: lmoe_k_shrink13 computes t13 */
  int32_t *s13f;             /* [mt_max] */
  /* The same for shrink2 inside the bf16 sm90 down (its row tile's h times the groups'
     A2, into t2), on the same flags: gate_up's items set a tile's flag to 1, down's to
     2, and each kernel's N tiles wait for their own value. NULL: lmoe_k_shrink2 (or
     t2p's finish) computes t2; the backend clears it for every column chunk of down but
     the first, whose launch has written t2 whole */
  int32_t *s2f;              /* [mt_max] (the region of s13f) */
  /* batch and pool */
  const int32_t *meta;       /* device meta, or NULL (no LoRA) */
  const lmoe_dslot *slots;
  const uint16_t *pool;      /* storage base */
  size_t slot_elems, off_a13, off_b13, off_a2, off_b2; /* in bf16 elements */
  /* FP8 layers (docs/design.md, "FP8 layers"): fp8 = 1, w13 and w2 hold e4m3 codes (one
     byte each) with float32 scales of 128x128 blocks (internal.h's layout: w13s
     [E, 2*nbi, nbh], gate's row blocks then up's; w2s [E, nbh, nbi]). lmoe_k_quant_x and
     lmoe_k_quant_h quantize the activations per row and 128-wide group into xq/xs and
     hq/hsc, which gate_up and down read on the FP8 engine; x and h stay in bf16 for the
     shrinks. */
  int32_t fp8;
  int32_t nbh, nbi;          /* ceil(H / 128), ceil(I / 128) */
  const float *w13s, *w2s;
  uint8_t *xq;               /* [h rows, H] e4m3, x's rows in sorted order (in y's region, as xg) */
  float *xs;                 /* [h rows, nbh] */
  uint8_t *hq;               /* [h rows, I] e4m3 (sorted rows, as h) */
  float *hsc;                /* [h rows, nbi] */
} lmoe_fwd;

/* Columns of down's output a launch computes (lmoe_fwd.n0, n1). */
#ifdef __CUDACC__
__host__ __device__
#endif
static inline int32_t lmoe_k_down_cols(const struct lmoe_fwd *f) { return (f->n1 ? f->n1 : f->H) - f->n0; }

/* The planes of t2p, one per N tile of the sm90 gate_up (128 columns of h each). shrink2
   can be fused into gate_up where there are at most LMOE_K_T2P_MAX planes and they fit
   in y's region (float32, t2s a row): I up to 2048 (qwen3, deepseek-class experts);
   beyond, the finish would read more partials a row than shrink2's kernel reads of h. */
enum { LMOE_K_T2P_MAX = 16 };
#ifdef __CUDACC__
__host__ __device__
#endif
static inline int32_t lmoe_k_t2p_planes(int32_t I) { return (I + 127) / 128; }

/* Workspace layout for the upper bounds of a layer (and pool): byte offsets. */
typedef struct lmoe_ws_layout {
  size_t ids, tw, tok_group, cnt, off, tile_expert, s13f, ntiles, any, sorted_pair, sorted_group, pair_row, h, y,
      t13, t2, total; /* y's region also holds xg (or xq): the larger of M*k and the rows, x H x 2 bytes */
  int32_t mt_max, t13s, t2s;
  size_t xs, hq, hsc; /* FP8 layers' quantized activations (0 without; their x codes at y) */
} lmoe_ws_layout;
void lmoe_k_layout(int64_t max_tokens, int32_t E, int32_t H, int32_t I, int32_t k,
                   int32_t num_slots, int32_t max_rank, lmoe_ws_layout *out);
/* The same for an FP8 layer (fp8 != 0): the regions above, then xs, hq, hsc. */
void lmoe_k_layout_fp8(int64_t max_tokens, int32_t E, int32_t H, int32_t I, int32_t k,
                       int32_t num_slots, int32_t max_rank, int32_t fp8, lmoe_ws_layout *out);

/* The forward's host-side plan (plan.c): the lmoe_fwd its kernels read.

   A pool's part is fixed for the pool's life (storage, offsets, slot table, alignment):
   computed once, when the backend sets the pool up. The rest is computed per forward:
   it is a few dozen integer operations, and the layer's part alone (its workspace
   layout depends on the pool too, and a forward may run with or without one) would
   need a cache keyed by (layer, pool) for nothing measurable. */
typedef struct lmoe_k_pool_plan {
  const lmoe_dslot *slots;   /* the pool's device slot table */
  const uint16_t *storage;
  int32_t num_slots, max_rank;
  size_t slot_elems, off_a13, off_b13, off_a2, off_b2; /* in bf16 elements */
  int32_t al_lora;
} lmoe_k_pool_plan;
/* offsets and slot_bytes in bytes, as the pool keeps them */
void lmoe_k_plan_pool(int32_t H, int32_t I, int32_t num_slots, int32_t max_rank, const void *storage,
                      size_t slot_bytes, size_t off_a13, size_t off_b13, size_t off_a2, size_t off_b2,
                      const lmoe_dslot *slots, lmoe_k_pool_plan *out);

typedef struct lmoe_k_plan_args {
  /* the layer */
  int64_t max_tokens;
  int32_t E, H, I, k, renorm;
  const uint16_t *w13, *w2;     /* FP8 layers: e4m3 codes */
  int32_t fp8;                  /* an FP8 layer: w13s, w2s its block scales */
  const float *w13s, *w2s;
  const lmoe_k_pool_plan *pool; /* or NULL */
  int32_t lora;                 /* LoRA may run: the pool's fields are filled (meta is the caller's) */
  int32_t groups;               /* adapters active in the batch (0 if unknown): a hint for the
                                   shrinks' pass width, never for correctness */
  int32_t cols13, cols2;        /* the active adapters' gate_up (down) ranks, each rounded up
                                   to 8, summed (0 if unknown): hints for where the shrinks
                                   run (gemm_config.h's fuse_s13), never for correctness */
  /* the forward */
  int64_t M;
  const uint16_t *x;
  uint16_t *out;
  const void *logits;           /* or NULL: the routing is given in topk_ids, topk_w */
  int32_t logits_bf16;
  int32_t *topk_ids;
  float *topk_w;
  void *workspace;
  size_t workspace_bytes;
  const lmoe_gemm_device *dev;  /* for the GEMM selector */
} lmoe_k_plan_args;
/* Fills *f (meta aside) and returns the workspace bytes the forward needs; when the
   workspace is missing or smaller, returns that size and leaves *f alone. */
size_t lmoe_k_plan(const lmoe_k_plan_args *a, lmoe_fwd *f);

/* The column chunks of a sharded layer's down, reduce and all-reduce over NCCL: chunk c
   is columns [bounds[c], bounds[c + 1]) of H (docs/design.md, "Sharding"). Each chunk's
   all-reduce (and its rounding into out) runs on a side stream while down computes the
   next chunk, so only the last chunk's sum waits after the layer's GEMMs. Returns the
   count, 1 to LMOE_K_CHUNKS_MAX; every bound but the last a multiple of 256. forced > 0
   asks for that many (LMOE_SHARD_CHUNKS, for measuring, which also cuts an unsharded
   layer's down; fewer where H has fewer 256-column blocks);
   else by the shape: none for one rank (nothing to overlap), 2 from 1024 tokens, 4
   from 4096 (a chunk's all-reduce must stay large enough to run at NCCL's bandwidth). */
enum { LMOE_K_CHUNKS_MAX = 8 };
int32_t lmoe_k_shard_chunks(int64_t M, int32_t H, int32_t ranks, int32_t forced, int32_t *bounds);

/* Per-device setup of the current device: the GEMM kernels' shared-memory limits;
   *dev receives what the GEMM selector needs to know of the device. Fails
   (cudaErrorInvalidConfiguration) on a device that fits no configuration. */
cudaError_t lmoe_k_init(lmoe_gemm_device *dev);
/* Whether FP8 layers can run on the current device: the FP8 engine's kernels
   (kernels/gemm_sm90_fp8.cu) need cc 9.0, sm_90a code in the binary and the driver's
   TMA encoder. Call after lmoe_k_init. */
cudaError_t lmoe_k_fp8_init(int32_t *available);

cudaError_t lmoe_k_fill_random(void *p, int32_t dtype, int64_t n, uint64_t seed, float lo, float hi,
                               cudaStream_t s);
cudaError_t lmoe_k_fill(void *p, int32_t dtype, int64_t n, double v, cudaStream_t s);
cudaError_t lmoe_k_set_slot(lmoe_dslot *table, int32_t slot, lmoe_dslot facts, cudaStream_t s);
cudaError_t lmoe_k_meta_write(int32_t *dst, const lmoe_meta_param *m, cudaStream_t s);

/* The forward's stages, in order. Each returns the launch status. */
cudaError_t lmoe_k_route(const lmoe_fwd *f, cudaStream_t s);     /* counts zeroed; top-k, groups, counts */
cudaError_t lmoe_k_any(const lmoe_fwd *f, cudaStream_t s);       /* device_sync: any active */
cudaError_t lmoe_k_scan(const lmoe_fwd *f, cudaStream_t s);      /* offsets, tiles, padding */
cudaError_t lmoe_k_scatter(const lmoe_fwd *f, cudaStream_t s);   /* pairs sorted by expert, group */
cudaError_t lmoe_k_gather_x(const lmoe_fwd *f, cudaStream_t s);  /* xg = x's rows sorted (if f->xg) */
cudaError_t lmoe_k_shrink13(const lmoe_fwd *f, cudaStream_t s);  /* t13 = s * A13 x  (LoRA) */
cudaError_t lmoe_k_gateup(const lmoe_fwd *f, int lora, cudaStream_t s); /* h = silu(g) * u */
cudaError_t lmoe_k_shrink2(const lmoe_fwd *f, cudaStream_t s);   /* t2 = s * A2 h    (LoRA) */
cudaError_t lmoe_k_t2_finish(const lmoe_fwd *f, cudaStream_t s); /* t2 = s * sum of t2p's planes
                                                                    (LoRA, where f->t2p) */
cudaError_t lmoe_k_down(const lmoe_fwd *f, int lora, cudaStream_t s);   /* y = w * (W2 h + B2 t2) */
cudaError_t lmoe_k_reduce(const lmoe_fwd *f, cudaStream_t s);    /* out = sum_j y (or part, f32) */
/* FP8 layers only (kernels/quant.cu): the activations quantized per row and 128-wide
   group, scale = amax / 448 (1 for an all-zero group), code = e4m3(v / scale) rounded to
   nearest even, saturating. quant_x: each token of x once, its codes and scales written
   to its pairs' sorted rows of xq, xs (before gate_up; padding rows left unwritten: a
   row's products never mix with another row's, and a padding row's are not stored);
   quant_h: h's rows in use into hq, hsc (after gate_up; padding rows zero). */
cudaError_t lmoe_k_quant_x(const lmoe_fwd *f, cudaStream_t s);
cudaError_t lmoe_k_quant_h(const lmoe_fwd *f, cudaStream_t s);
/* Whether an FP8 forward needs lmoe_k_quant_h: not where the FP8 gate_up quantizes h in
   its epilogue (the default on 256-column tiles; LMOE_FP8_FUSE_H=0 not) */
int lmoe_k_quant_h_needed(const lmoe_fwd *f);

/* A sharded layer's sum over ranks whose partials share one device (and the rounding
   after an NCCL all-reduce, n = 1): out[o][i] = bf16(part[0][i] + part[1][i] + ...), in
   rank order in float32, rounded once, the same bits into every out[o]. */
enum { LMOE_K_SUM_MAX = 64 };
typedef struct lmoe_k_sum {
  const float *part[LMOE_K_SUM_MAX];
  uint16_t *out[LMOE_K_SUM_MAX];
  int32_t n, nout;
  int64_t count; /* elements of each */
  /* cols > 0: the parts are rows of cols elements (a chunk of columns, lmoe_fwd.n0/n1)
     and each out holds them at a row stride of ld elements; 0: out is contiguous too */
  int32_t cols, ld;
} lmoe_k_sum;
cudaError_t lmoe_k_sum_parts(const lmoe_k_sum *a, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
