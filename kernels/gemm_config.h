/* The grouped GEMMs' configurations: one table of every kernel configuration of every
   engine, and the one host-side selector that picks a forward's rows from the device's
   limits and the problem. Plain C, no CUDA types: the simulated device of the tests
   shares it. */
#ifndef LMOE_GEMM_CONFIG_H
#define LMOE_GEMM_CONFIG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Row tiles: every configuration's BM lies in [LMOE_K_BM_MIN, LMOE_K_BM], and every
   expert's pair list is padded to a multiple of the one in use (kernels/layout.c sizes
   the workspace for both ends). */
enum { LMOE_K_BM = 128, LMOE_K_BM_MIN = 64 };

/* GEMM engines. The sm80 engine (kernels/gemm_sm80.cu: mma.sync m16n8k16, ldmatrix,
   cp.async) runs on every supported device. The sm90 engine (kernels/gemm_sm90.cu:
   wgmma, TMA, warp-specialised persistent blocks) runs gate_up and down on sm_90a when
   the build holds sm_90a code and the operands are 16-byte aligned, and the shrinks
   with it under LMOE_SM90_SHRINK=1. A row's engine says which engine runs it. */
enum { LMOE_ENGINE_SM80 = 0, LMOE_ENGINE_SM90 = 1 };

/* What a row computes: the expert GEMMs (gate_up and down: base weights with the LoRA
   expand as extra K chunks) or the LoRA shrinks (shrink13 and shrink2). */
enum { LMOE_GEMM_EXPERT = 0, LMOE_GEMM_SHRINK = 1 };

/* The table, one row per kernel configuration:
     X(engine, kind, BM, BN, WARPS_M, WARPS_N, STAGES, SMEM)
   BM x BN output tile, WARPS_M x WARPS_N warps, STAGES-deep load pipeline, SMEM bytes
   of dynamic shared memory. A row's number is its position. Each engine instantiates
   its kernels from its own rows (so the table and the compiled kernels cannot drift)
   and checks SMEM against its shared-memory layout at compile time. Among the rows
   that fit, the selector takes the first of the kind and row tile it needs: order is
   preference.
   Measured on H100 (docs/gpu-notes.md): row 0 beats row 1 by ~10%; 8 or 6 stages
   changed nothing. */
#define LMOE_GEMM_TABLE(X)                                                                        \
  /* 0: 128x256 tiles (warps of 64x64), for sm_80..sm_90 */                                    \
  X(LMOE_ENGINE_SM80, LMOE_GEMM_EXPERT, 128, 256, 2, 4, 4, 101920)                               \
  /* 1: 128x128 tiles (warps of 64x32), for devices with less shared memory */                 \
  X(LMOE_ENGINE_SM80, LMOE_GEMM_EXPERT, 128, 128, 2, 4, 4, 69152)                                \
  /* 2: 64-row tiles for small batches */                                                       \
  X(LMOE_ENGINE_SM80, LMOE_GEMM_EXPERT, 64, 256, 2, 4, 4, 83744)                                 \
  /* 3, 4: the shrinks (N: the present groups' ranks side by side) */                           \
  X(LMOE_ENGINE_SM80, LMOE_GEMM_SHRINK, 128, 128, 4, 2, 4, 69152)                                \
  X(LMOE_ENGINE_SM80, LMOE_GEMM_SHRINK, 64, 128, 4, 2, 4, 50976)                                 \
  /* 5: sm90 128x256 (two consumer warpgroups of 64x256), 4 stages of 48 KB */                 \
  X(LMOE_ENGINE_SM90, LMOE_GEMM_EXPERT, 128, 256, 8, 1, 4, 199808)                               \
  /* 6, 7: sm90 64x256 (one consumer warpgroup), 4 or 5 stages of 40 KB */                      \
  X(LMOE_ENGINE_SM90, LMOE_GEMM_EXPERT, 64, 256, 4, 1, 4, 166528)                                \
  X(LMOE_ENGINE_SM90, LMOE_GEMM_EXPERT, 64, 256, 4, 1, 5, 207520)                               \
  /* 8, 9: sm90 shrinks (64-row tiles inside the forward's 128- or 64-row ones, 128      \
     columns a pass, 4 stages of 25 KB, two blocks an SM) */                               \
  X(LMOE_ENGINE_SM90, LMOE_GEMM_SHRINK, 128, 128, 4, 1, 4, 104784)                               \
  X(LMOE_ENGINE_SM90, LMOE_GEMM_SHRINK, 64, 128, 4, 1, 4, 104784)

typedef struct lmoe_gemm_config {
  int32_t engine, kind;
  int32_t bm, bn, warps_m, warps_n, stages;
  int32_t smem; /* bytes of dynamic shared memory */
} lmoe_gemm_config;

extern const lmoe_gemm_config lmoe_gemm_configs[];
extern const int32_t lmoe_gemm_nconfigs;

/* What the selector knows of a device (filled by lmoe_k_init). */
typedef struct lmoe_gemm_device {
  int32_t cc;         /* compute capability, major * 10 + minor */
  int32_t smem_optin; /* largest dynamic shared memory a block may opt in to, bytes */
  int32_t force_cfg;  /* LMOE_GEMM_CFG: the row gate_up/down use where it fits and its
                         engine, kind and row tile match, or -1 (for measurements) */
  int32_t sm90;       /* the sm90 engine's kernels are usable here (sm_90a code in the
                         build, cc 9.0, the TMA encoder present; LMOE_ENGINE=sm80 clears it) */
  int32_t small_tile_pairs; /* LMOE_SMALL_TILE_PAIRS: 64-row tiles below this many pairs
                               per expert on average; 0: the default (96), for measuring */
  int32_t shrink_mode;      /* where the shrinks run beside sm90 expert GEMMs
                               (LMOE_SM90_SHRINK=0 or 1 for measuring; see below) */
  int32_t gather_x;         /* whether the bf16 sm90 gate_up reads x gathered into sorted
                               order by TMA (LMOE_SM90_GATHER=1 / 0 for measuring; below) */
  int32_t shard_chunks;     /* LMOE_SHARD_CHUNKS: the column chunks of a sharded layer's
                               down and all-reduce (lmoe_k_shard_chunks), 0: by the shape */
  int32_t shrink_sn;        /* LMOE_SM90_SHRINK_SN: the sm90 shrinks' pass width forced (64
                               or 128), 0: by the shape (below) */
  int32_t fuse_t2;          /* LoRA's shrink2 in the bf16 sm90 gate_up's epilogue where it
                               can be (lmoe_fwd.t2p; LMOE_SM90_FUSE_T2=1, for measuring: off
                               by default, no faster than shrink2's kernel on the H200,
                               docs/gpu-notes.md 44) */
  int32_t fuse_s13;         /* LoRA's shrink13 inside the bf16 sm90 gate_up (lmoe_fwd.s13f;
                               LMOE_SM90_FUSE_S13=1 / 0 for measuring; below) */
  int32_t fuse_s2;          /* and shrink2 inside its down (lmoe_fwd.s2f; LMOE_SM90_FUSE_S2) */
} lmoe_gemm_device;

/* lmoe_gemm_device.gather_x. By shape (the default, 0): where the forward has at least
   LMOE_SM90_GATHER_MIN_PAIRS pairs and I is at least LMOE_SM90_GATHER_MIN_I, scatter's
   pair_row and a gather kernel write x's rows in sorted order (pairs x H bf16), and
   gate_up's producer loads its A as one TMA box a stage, as down's, instead of 8 x BM
   16-byte cp.async. The gather's bytes are H x 2 a pair, gate_up's work 4 H I a pair:
   measured on the H200 (docs/gpu-notes.md 34), mixtral's layer (I 14336) 3-6% faster
   from M = 2048 (4096 pairs) up, qwen3's (I 768) 3-10% slower at every M (the gather,
   164 us at M = 16384, costs more than gate_up saves, 50 us). */
enum { LMOE_GATHER_BY_SHAPE = 0, LMOE_GATHER_ON = 1, LMOE_GATHER_OFF = 2 };
enum { LMOE_SM90_GATHER_MIN_PAIRS = 4096, LMOE_SM90_GATHER_MIN_I = 4096 };

/* The sm90 shrinks' pass width (lmoe_fwd.shrink_sn). A 64-row shrink tile computes the
   adapter groups present side by side, in passes of 128 columns, or of 64 (wgmma
   m64n64k16, half the B a stage, so six stages a block fit where four did). Measured on
   the H200 (docs/gpu-notes.md 45, qwen3, 4 adapters r16): at large M, where a tile holds
   one or two rank-16 groups, the narrow passes take shrink13 from 269 to 218 us at M =
   16384 and the sm90 shrink2 from 149 to 128 (the sm80 one: ~150), the layer 2-3%
   faster; at small M, where a tile holds three or four groups and takes two narrow
   passes (x's rows read twice), 4-6% slower. So 64 where the rows per expert and active
   group average at least LMOE_SM90_SHRINK_NARROW_ROWS (M k / (E groups)), and there
   shrink2 joins shrink13 on the sm90 row even with a short K (I < 2048), else 128. */
enum { LMOE_SM90_SHRINK_NARROW_ROWS = 128 };

/* lmoe_gemm_device.fuse_s13 and fuse_s2. By shape (the default): the bf16 sm90 gate_up
   computes t13 itself (one more walk item a row tile, lmoe_fwd.s13f), and its down t2
   (s2f), where the active adapters' ranks on that side, each rounded up to 8 and side by
   side, take at most LMOE_SM90_FUSE_S13_MAX_COLS columns (two 128-wide passes over the
   tile's x or h: a tile holds at most one group an active adapter); else the shrink's
   own kernel reads x (h) again. */
enum { LMOE_FUSE_BY_SHAPE = 0, LMOE_FUSE_ON = 1, LMOE_FUSE_OFF = 2 };
/* The default while the fused shrinks have not been measured on a GPU: off (the shrinks
   their own kernels, as before them); LMOE_SM90_FUSE_S13 / _S2 = shape, 1 or 0 choose. */
enum { LMOE_SM90_FUSE_DEFAULT = LMOE_FUSE_OFF };
enum { LMOE_SM90_FUSE_S13_MAX_COLS = 256 };
/* shrink2 inside down only with this row tile (gemm_sm90.cu's shrink_flags: with 128-row
   tiles down's consumers would spill) */
enum { LMOE_SM90_FUSE_S2_BM = 64 };

/* lmoe_gemm_device.shrink_mode. By K (the default): each shrink on the sm90 engine's row
   where its K (H for shrink13, I for shrink2) is at least LMOE_SM90_SHRINK_MIN_K, else
   on sm80 rows. Measured on the H200 (docs/gpu-notes.md 21, ncu, 4 adapters r16): the
   sm90 shrinks take 0.44-0.76x the sm80 ones' time wherever K >= 2048 (qwen3's shrink13,
   both of mixtral's), but qwen3's shrink2 (K 768) is slower on them up to M = 8192
   (16.0 -> 25.6 us at M = 512): a 64-row tile's pipeline does not fill on 12 chunks.
   Where the plan picks 64-column passes (above), shrink2 goes to shrink13's sm90 row
   whatever its K: 128 us against sm80's ~150 at qwen3 M = 16384 (gpu-notes 45). */
enum { LMOE_SHRINK_BY_K = 0, LMOE_SHRINK_SM80 = 1, LMOE_SHRINK_SM90 = 2 };
enum { LMOE_SM90_SHRINK_MIN_K = 2048 };

/* A forward's choice: the engine of the expert GEMMs, the row tile (every expert's pair
   list is padded to it) and the rows of the expert GEMMs and of each shrink (on the
   expert GEMMs' engine where shrink_mode says so and it has a row that fits, else on
   sm80: each row names its own engine). */
typedef struct lmoe_gemm_choice {
  int32_t engine, bm, gemm_cfg, shrink13_cfg, shrink2_cfg;
} lmoe_gemm_choice;

/* Picks the configurations for `pairs` (token, expert) pairs over E experts of hidden
   size H and intermediate size I (the shrinks' K) on the device; aligned16: every
   operand the sm90 engine reads has 16-byte aligned rows (plan.c says which). Returns
   0, or -1 when no row fits the device (lmoe_gemm_supported says). */
int lmoe_gemm_select(const lmoe_gemm_device *d, int64_t pairs, int32_t E, int32_t H, int32_t I, int aligned16,
                     lmoe_gemm_choice *out);

/* Whether every forward finds its rows on the device (lmoe_k_init refuses it if not). */
int lmoe_gemm_supported(const lmoe_gemm_device *d);

#ifdef __cplusplus
}
#endif
#endif
