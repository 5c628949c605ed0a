/* The sm80 GEMM engine: the grouped GEMMs of the forward on tensor cores (mma.sync
   m16n8k16 bf16, ldmatrix, cp.async multi-stage pipeline), for sm_80/86/89 and as the
   fallback everywhere. One kernel template serves the four products; the table's rows
   (gemm_config.h) say which instances exist.

     gate_up   h = silu(x W13_e^T (+ t13 B13^T)) * (...)   epilogue epi_silu_up
     down      y = w * (h W2_e^T (+ t2 B2^T))                epilogue epi_routed
     shrink13  t13 = scale * (x A13^T)        (LoRA)        epilogue epi_lora_scale13
     shrink2   t2 = scale * (h A2^T)          (LoRA)        epilogue epi_lora_scale2

   Rows come sorted by expert and, inside it, by adapter group (route.cu). The LoRA
   expand is folded into gate_up and down: per group with an adapter present in a row
   tile, ceil(rank/BK) more K chunks whose A is the rows' shrink output t (rows of other
   groups zero) and whose B is the slot's B matrix. */
#include "common.cuh"
#include "gemm_engine.h"
#include "ptx.cuh"

#include <cuda_runtime.h>
#include <stdint.h>

/* This engine's K chunk: one pipeline stage holds BM x BK of A and BN x BK of B. */
#define BK 32
#define GROUP_M 8

/* The shrinks zero-fill t up to the rank rounded to LMOE_K_RANK_PAD and the expand
   reads whole BK chunks of it. */
static_assert(LMOE_K_RANK_PAD % BK == 0, "the expand's K chunks must tile the rank padding");

enum { MODE_GATEUP = LMOE_OP_GATEUP, MODE_DOWN = LMOE_OP_DOWN, MODE_SHRINK13 = LMOE_OP_SHRINK13,
       MODE_SHRINK2 = LMOE_OP_SHRINK2 };

/* Element offset of 16-byte chunk ch (0..3) of row r in a [rows][BK] bf16 tile; the XOR
   spreads the 8 rows an ldmatrix reads over all 32 banks. */
static __device__ __forceinline__ int swz(int r, int ch) {
  return r * BK + ((ch ^ ((r >> 1) & 3)) << 3);
}

/* Loads 8 elements [col, col+8) of a row (nvalid columns exist) into shared memory;
   missing row or columns read as zero. aligned: row start and stride are 16-byte
   aligned, so cp.async serves. */
static __device__ __forceinline__ void load8(uint16_t *dst, const uint16_t *row, int col, int nvalid,
                                             int aligned) {
  if (!row || col >= nvalid) {
    *(uint4 *)dst = make_uint4(0, 0, 0, 0);
    return;
  }
  int n = nvalid - col;
  if (aligned) {
    cp_async16(dst, row + col, n >= 8 ? 16 : n * 2);
  } else {
    uint16_t v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = i < n ? row[col + i] : (uint16_t)0;
    uint4 q;
    q.x = v[0] | ((uint32_t)v[1] << 16);
    q.y = v[2] | ((uint32_t)v[3] << 16);
    q.z = v[4] | ((uint32_t)v[5] << 16);
    q.w = v[6] | ((uint32_t)v[7] << 16);
    *(uint4 *)dst = q;
  }
}

/* What a block works on. */
typedef struct tile_ctx {
  int e, p0, n0;       /* expert, first sorted row, first output column */
  int nbase;           /* K chunks of the base product */
  /* shrink: the groups present, their ranks, slots, and where each one's rows of A
     start in the concatenated N (each rank rounded up to LMOE_K_RANK_PAD) */
  int nl;
  const int *rank, *cum, *slot_of;
} tile_ctx;

/* Loads K chunk `chunk` of gate_up or down when the fast path does not serve it: a
   base product's chunk (chunk < tc.nbase: A = the rows' x or h, B = the expert's W13 or
   W2), or one of the LoRA expand's after them. Those belong, in order, to the tile's
   groups with an adapter (lg_list), lg_cnt[i] = ceil(rank/BK) chunks each: A = the
   rows' shrink output t where the row is of that group (zero elsewhere), B = the
   group's slot's B13 or B2. The shrinks never come here: they have no chunks past the
   base ones, which mainloop loads through make_ptrs and load_base.
   (mainloop sends base chunks to load_base too, so the lg < 0 branches below are not
   reached either; they stay because removing them moves ptxas's register allocation
   of gate_up and down, which only a GPU run may judge.) */
template <int MODE, int BN, int THREADS, int BM>
static __device__ __forceinline__ void load_chunk(const lmoe_fwd &f, const tile_ctx &tc, int chunk,
                                                  uint16_t *as, uint16_t *bs, const int *row_pair,
                                                  const int *row_group, const int *lg_list,
                                                  const int *lg_cnt, int nl) {
  static_assert(MODE == MODE_GATEUP || MODE == MODE_DOWN, "the shrinks load through load_base only");
  int tid = threadIdx.x;
  int col;
  int lg = -1, lslot = 0;
  if (chunk < tc.nbase) {
    col = chunk * BK;
  } else {
    int rem = chunk - tc.nbase, i = 0;
    while (i < nl - 1 && rem >= lg_cnt[i]) {
      rem -= lg_cnt[i];
      i++;
    }
    lg = lg_list[i];
    lslot = lmoe_k_meta_active(f.meta)[lg - 1];
    col = rem * BK;
  }
  const int H = f.H, I = f.I, R = f.R;
  const int hs = (I + 7) & ~7;
  /* A: BM rows x 4 chunks */
  for (int i = tid; i < BM * 4; i += THREADS) {
    int r = i >> 2, ch = i & 3, c = col + ch * 8;
    int pair = row_pair[r];
    const uint16_t *row = 0;
    int nvalid = 0, al = 1;
    if (MODE == MODE_GATEUP) {
      if (lg < 0) {
        if (pair >= 0) row = f.x + (size_t)(pair / f.k) * H;
        nvalid = H;
        al = f.al_x & LMOE_AL_X;
      } else {
        if (row_group[r] == lg) row = f.t13 + (size_t)(tc.p0 + r) * f.t13s;
        nvalid = f.t13s;
      }
    } else {
      if (lg < 0) {
        if (pair >= 0) row = f.h + (size_t)(tc.p0 + r) * hs;
        nvalid = I;
      } else {
        if (row_group[r] == lg) row = f.t2 + (size_t)(tc.p0 + r) * f.t2s;
        nvalid = f.t2s;
      }
    }
    load8(as + swz(r, ch), row, c, nvalid, al);
  }
  /* B: BN rows x 4 chunks */
  for (int i = tid; i < BN * 4; i += THREADS) {
    int n = i >> 2, ch = i & 3, c = col + ch * 8;
    const uint16_t *row = 0;
    int nvalid = 0, al = 0;
    if (MODE == MODE_GATEUP) {
      int j = tc.n0 + (n >> 1), which = n & 1;
      if (j < I) {
        size_t grow = (size_t)tc.e * 2 * I + (size_t)which * I + j;
        if (lg < 0) {
          row = f.w13 + grow * H;
          nvalid = H;
          al = f.al_x & LMOE_AL_W13;
        } else {
          row = f.pool + (size_t)lslot * f.slot_elems + f.off_b13 + grow * (2 * R);
          nvalid = 2 * R;
          al = f.al_lora & LMOE_AL_B13;
        }
      }
    } else if (MODE == MODE_DOWN) {
      int o = tc.n0 + n;
      if (o < H) {
        size_t grow = (size_t)tc.e * H + o;
        if (lg < 0) {
          row = f.w2 + grow * I;
          nvalid = I;
          al = f.al_x & LMOE_AL_W2;
        } else {
          row = f.pool + (size_t)lslot * f.slot_elems + f.off_b2 + grow * R;
          nvalid = R;
          al = f.al_lora & LMOE_AL_B2;
        }
      }
    }
    load8(bs + swz(n, ch), row, c, nvalid, al);
  }
}

/* Row pointers of the base product, fixed for a tile: each thread always loads the
   same (row, 16-byte chunk) pieces, so the K loop only adds the column. */
template <int BN, int THREADS, int BM> struct base_ptrs {
  const uint16_t *a[BM * 4 / THREADS];
  const uint16_t *b[BN * 4 / THREADS];
  int K, ala, alb;
};

template <int MODE, int BN, int THREADS, int BM>
static __device__ __forceinline__ void make_ptrs(const lmoe_fwd &f, const tile_ctx &tc, const int *row_pair,
                                                 const int *row_group, base_ptrs<BN, THREADS, BM> &p) {
  const int H = f.H, I = f.I, R = f.R, hs = (I + 7) & ~7;
  int tid = threadIdx.x;
#pragma unroll
  for (int q = 0; q < BM * 4 / THREADS; q++) {
    int r = (tid + q * THREADS) >> 2;
    int pair = row_pair[r];
    const uint16_t *row = 0;
    bool lora_row = row_group[r] >= 1 && row_group[r] != PAD_GROUP;
    if (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) {
      if (pair >= 0 && (MODE == MODE_GATEUP || lora_row)) row = f.x + (size_t)(pair / f.k) * H;
    } else {
      if (pair >= 0 && (MODE == MODE_DOWN || lora_row)) row = f.h + (size_t)(tc.p0 + r) * hs;
    }
    p.a[q] = row;
  }
#pragma unroll
  for (int q = 0; q < BN * 4 / THREADS; q++) {
    int n = (tid + q * THREADS) >> 2;
    const uint16_t *row = 0;
    if (MODE == MODE_GATEUP) {
      int j = tc.n0 + (n >> 1), which = n & 1;
      if (j < I) row = f.w13 + ((size_t)tc.e * 2 * I + (size_t)which * I + j) * H;
    } else if (MODE == MODE_DOWN) {
      int o = tc.n0 + n;
      if (o < H) row = f.w2 + ((size_t)tc.e * H + o) * I;
    } else {
      int idx = tc.n0 + n, gi = 0;
      while (gi < tc.nl - 1 && idx >= tc.cum[gi + 1]) gi++;
      int q2 = idx - tc.cum[gi];
      if (tc.nl > 0 && idx < tc.cum[tc.nl] && q2 < tc.rank[gi]) {
        size_t base = (size_t)tc.slot_of[gi] * f.slot_elems;
        if (MODE == MODE_SHRINK13)
          row = f.pool + base + f.off_a13 + ((size_t)tc.e * 2 * R + q2) * H;
        else
          row = f.pool + base + f.off_a2 + ((size_t)tc.e * R + q2) * I;
      }
    }
    p.b[q] = row;
  }
  p.K = (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) ? H : I;
  p.ala = (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) ? (f.al_x & LMOE_AL_X) : 1;
  p.alb = MODE == MODE_GATEUP ? (f.al_x & LMOE_AL_W13) : MODE == MODE_DOWN ? (f.al_x & LMOE_AL_W2)
          : MODE == MODE_SHRINK13 ? (f.al_lora & LMOE_AL_A13) : (f.al_lora & LMOE_AL_A2);
}

template <int BN, int THREADS, int BM>
static __device__ __forceinline__ void load_base(const base_ptrs<BN, THREADS, BM> &p, int chunk, uint16_t *as,
                                                 uint16_t *bs) {
  int tid = threadIdx.x, ch = tid & 3, col = chunk * BK + ch * 8;
#pragma unroll
  for (int q = 0; q < BM * 4 / THREADS; q++) {
    int r = (tid + q * THREADS) >> 2;
    load8(as + swz(r, ch), p.a[q], col, p.K, p.ala);
  }
#pragma unroll
  for (int q = 0; q < BN * 4 / THREADS; q++) {
    int n = (tid + q * THREADS) >> 2;
    load8(bs + swz(n, ch), p.b[q], col, p.K, p.alb);
  }
}

/* Fragments of one k16 step of a warp's tile, loaded with ldmatrix. */
template <int BN, int WARPS_M, int WARPS_N, int BM>
static __device__ __forceinline__ void load_frags(const uint16_t *as, const uint16_t *bs, int kk,
                                                  uint32_t (*a)[4], uint32_t (*b)[2]) {
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, MI = WTM / 16, NI = WTN / 8;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int wm0 = (warp / WARPS_N) * WTM, wn0 = (warp % WARPS_N) * WTN;
#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
    int r = wm0 + mi * 16 + (lane & 15), ch = kk * 2 + (lane >> 4);
    ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], as + swz(r, ch));
  }
#pragma unroll
  for (int nj = 0; nj < NI / 2; nj++) {
    int n = wn0 + nj * 16 + (lane & 7) + ((lane >> 4) << 3), ch = kk * 2 + ((lane >> 3) & 1);
    ldmatrix_x4(b[2 * nj][0], b[2 * nj][1], b[2 * nj + 1][0], b[2 * nj + 1][1], bs + swz(n, ch));
  }
}

template <int MI, int NI>
static __device__ __forceinline__ void mma_frags(float (*acc)[NI][4], uint32_t (*a)[4], uint32_t (*b)[2]) {
#pragma unroll
  for (int mi = 0; mi < MI; mi++)
#pragma unroll
    for (int ni = 0; ni < NI; ni++) mma_bf16(acc[mi][ni], a[mi], b[ni]);
}

template <int MODE, int BN, int WARPS_M, int WARPS_N, int ST, int BM>
static __device__ void mainloop(const lmoe_fwd &f, const tile_ctx &tc, int nchunks, uint16_t *As,
                                uint16_t *Bs, const int *row_pair, const int *row_group,
                                const int *lg_list, const int *lg_cnt, int nl,
                                float (*acc)[BN / WARPS_N / 8][4]) {
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr bool EXPAND = MODE == MODE_GATEUP || MODE == MODE_DOWN; /* shrinks: nchunks == tc.nbase */
  constexpr int APER = BM * 4 / THREADS, BPER = BN * 4 / THREADS;
  base_ptrs<BN, THREADS, BM> bp;
  make_ptrs<MODE, BN, THREADS, BM>(f, tc, row_pair, row_group, bp);
  /* Fast path (K a multiple of BK, rows 16-byte aligned): branch-free loads, each
     piece one cp.async from a pointer fixed for the tile, missing rows zero-filled by a
     source size of 0. */
  const bool fast = bp.K % BK == 0 && bp.ala && bp.alb;
  const char *ga[APER], *gb[BPER];
  uint32_t sa[APER], sb[BPER];
  int za[APER], zb[BPER];
  {
    int tid = threadIdx.x, ch = tid & 3;
#pragma unroll
    for (int q = 0; q < APER; q++) {
      int r = (tid + q * THREADS) >> 2;
      za[q] = bp.a[q] ? 16 : 0;
      ga[q] = bp.a[q] ? (const char *)(bp.a[q] + ch * 8) : (const char *)f.w13;
      sa[q] = (uint32_t)swz(r, ch) * 2;
    }
#pragma unroll
    for (int q = 0; q < BPER; q++) {
      int n = (tid + q * THREADS) >> 2;
      zb[q] = bp.b[q] ? 16 : 0;
      gb[q] = bp.b[q] ? (const char *)(bp.b[q] + ch * 8) : (const char *)f.w13;
      sb[q] = (uint32_t)swz(n, ch) * 2;
    }
  }
  const uint32_t as0 = smem_u32(As), bs0 = smem_u32(Bs);
#define LMOE_FAST_LOAD(stage, chunk)                                                              \
  do {                                                                                           \
    uint32_t a_ = as0 + (uint32_t)(stage) * (BM * BK * 2), b_ = bs0 + (uint32_t)(stage) * (BN * BK * 2); \
    size_t o_ = (size_t)(chunk) * (BK * 2);                                                      \
    _Pragma("unroll") for (int q = 0; q < APER; q++) asm volatile(                               \
        "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a_ + sa[q]),                     \
        "l"(ga[q] + (za[q] ? o_ : 0)), "r"(za[q]));                                              \
    _Pragma("unroll") for (int q = 0; q < BPER; q++) asm volatile(                               \
        "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(b_ + sb[q]),                     \
        "l"(gb[q] + (zb[q] ? o_ : 0)), "r"(zb[q]));                                              \
  } while (0)
#pragma unroll
  for (int s = 0; s < ST - 1; s++) {
    if (s < tc.nbase && fast)
      LMOE_FAST_LOAD(s, s);
    else if (s < tc.nbase)
      load_base<BN, THREADS, BM>(bp, s, As + s * BM * BK, Bs + s * BN * BK);
    else if (s < nchunks) {
      if constexpr (EXPAND)
        load_chunk<MODE, BN, THREADS, BM>(f, tc, s, As + s * BM * BK, Bs + s * BN * BK, row_pair,
                                          row_group, lg_list, lg_cnt, nl);
    }
    cp_async_commit();
  }
  constexpr int MI = BM / WARPS_M / 16, NI = BN / WARPS_N / 8;
  for (int c = 0; c < nchunks; c++) {
    cp_async_wait<ST - 2>();
    __syncthreads();
    /* the first k16 step's fragments go out before the next chunk's loads are issued,
       the second's before the first step's products: their latencies overlap work */
    int st = c % ST;
    uint32_t a0[MI][4], b0[NI][2], a1[MI][4], b1[NI][2];
    load_frags<BN, WARPS_M, WARPS_N, BM>(As + st * BM * BK, Bs + st * BN * BK, 0, a0, b0);
    int nc = c + ST - 1;
    if (nc < nchunks) {
      int sn = nc % ST;
      if (nc < tc.nbase && fast)
        LMOE_FAST_LOAD(sn, nc);
      else if (nc < tc.nbase)
        load_base<BN, THREADS, BM>(bp, nc, As + sn * BM * BK, Bs + sn * BN * BK);
      else if constexpr (EXPAND)
        load_chunk<MODE, BN, THREADS, BM>(f, tc, nc, As + sn * BM * BK, Bs + sn * BN * BK, row_pair,
                                          row_group, lg_list, lg_cnt, nl);
    }
    cp_async_commit();
    load_frags<BN, WARPS_M, WARPS_N, BM>(As + st * BM * BK, Bs + st * BN * BK, 1, a1, b1);
    mma_frags<MI, NI>(acc, a0, b0);
    mma_frags<MI, NI>(acc, a1, b1);
  }
  cp_async_wait<0>();
  __syncthreads();
#undef LMOE_FAST_LOAD
}

/* Dynamic shared memory: the pipeline's stages, then the tile's row and group lists. */
template <int BN, int ST, int BM> static constexpr size_t gemm_smem(void) {
  return (size_t)ST * (BM + BN) * BK * 2 + (size_t)(7 * BM + 4) * sizeof(int) + 16;
}

/* N tiles of an output (blocks per row tile); a shrink walks its N inside one block. */
template <int MODE, int BN> static __host__ __device__ __forceinline__ int n_tiles(const lmoe_fwd &f) {
  if (MODE == MODE_GATEUP) return (f.I + BN / 2 - 1) / (BN / 2);
  if (MODE == MODE_DOWN) return (lmoe_k_down_cols(&f) + BN - 1) / BN;
  return 1;
}

/* ------------------------------------------------------------------ epilogues

   What a tile's accumulators become. gate_up and down stage their BM x (BN / COLS)
   bf16 outputs in shared memory (free after the main loop) and store them as 16-byte
   rows; each lane hands stage() the accumulators of two adjacent columns (a0, a1) of
   one row, with the row's weight. The shrinks write their rows of t directly, each
   column scaled by scale(). */

/* gate_up: B's rows interleave the gate and up rows of one output column, so (a0, a1)
   is one (gate, up) pair and gives one element of h = silu(gate) * up. */
struct epi_silu_up {
  static constexpr int COLS = 2; /* accumulator columns per output column */
  static __device__ __forceinline__ float row_weight(const lmoe_fwd &f, int pair) { return 1.0f; }
  static __device__ __forceinline__ void stage(uint16_t *so_row, int c, float a0, float a1, float w) {
    so_row[c / 2] = f2bf(silu_mul(a0, a1));
  }
  static __device__ __forceinline__ int limit(const lmoe_fwd &f) { return f.I; }
  static __device__ __forceinline__ bool vec(const lmoe_fwd &f) { return true; } /* h rows: stride 8k */
  static __device__ __forceinline__ uint16_t *dst(const lmoe_fwd &f, int p0, int r, int pair, int col) {
    return f.h + (size_t)(p0 + r) * ((f.I + 7) & ~7) + col;
  }
};

/* down: y of a pair = the pair's routing weight * (W2 h + B2 t2). */
struct epi_routed {
  static constexpr int COLS = 1;
  static __device__ __forceinline__ float row_weight(const lmoe_fwd &f, int pair) {
    return pair >= 0 ? f.tw[pair] : 1.0f;
  }
  static __device__ __forceinline__ void stage(uint16_t *so_row, int c, float a0, float a1, float w) {
    *(uint32_t *)(so_row + c) = (uint32_t)f2bf(w * a0) | ((uint32_t)f2bf(w * a1) << 16);
  }
  static __device__ __forceinline__ int limit(const lmoe_fwd &f) { return f.H; }
  static __device__ __forceinline__ bool vec(const lmoe_fwd &f) { return (f.H & 7) == 0; }
  static __device__ __forceinline__ uint16_t *dst(const lmoe_fwd &f, int p0, int r, int pair, int col) {
    return f.y + (size_t)pair * f.H + col;
  }
};

/* shrink13: t13 column c = the scale of the slot's range c lies in (gate or up) times
   A13 x; columns past both ranges are zero. */
struct epi_lora_scale13 {
  static __device__ __forceinline__ float scale(const lmoe_dslot &ds, int c) {
    return c >= ds.g_lo && c < ds.g_hi ? ds.sg : c >= ds.u_lo && c < ds.u_hi ? ds.su : 0.0f;
  }
  static __device__ __forceinline__ uint16_t *out(const lmoe_fwd &f) { return f.t13; }
  static __device__ __forceinline__ int stride(const lmoe_fwd &f) { return f.t13s; }
};

/* shrink2: t2 = the down scale times A2 h. */
struct epi_lora_scale2 {
  static __device__ __forceinline__ float scale(const lmoe_dslot &ds, int c) { return ds.sd; }
  static __device__ __forceinline__ uint16_t *out(const lmoe_fwd &f) { return f.t2; }
  static __device__ __forceinline__ int stride(const lmoe_fwd &f) { return f.t2s; }
};

template <int MODE> struct epilogue_of;
template <> struct epilogue_of<MODE_GATEUP> { typedef epi_silu_up type; };
template <> struct epilogue_of<MODE_DOWN> { typedef epi_routed type; };
template <> struct epilogue_of<MODE_SHRINK13> { typedef epi_lora_scale13 type; };
template <> struct epilogue_of<MODE_SHRINK2> { typedef epi_lora_scale2 type; };

/* ------------------------------------------------------------------ the kernel */

template <int MODE, int BN, int WARPS_M, int WARPS_N, int ST, int BM>
static __global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    k_gemm(lmoe_fwd f, int lora) {
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, MI = WTM / 16, NI = WTN / 8;
  constexpr bool SHRINK = MODE == MODE_SHRINK13 || MODE == MODE_SHRINK2;
  typedef typename epilogue_of<MODE>::type Epi;
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t *As = (uint16_t *)smem;
  uint16_t *Bs = As + ST * BM * BK;
  int *row_pair = (int *)(Bs + ST * BN * BK);
  int *row_group = row_pair + BM;
  int *lg_list = row_group + BM;
  int *lg_cnt = lg_list + BM;
  int *lg_cum = lg_cnt + BM;   /* [BM + 1] */
  int *lg_slot = lg_cum + BM + 1;
  int *row_gi = lg_slot + BM;  /* index of the row's group in lg_list, or -1 */
  __shared__ int s_nl, s_nlora;

  /* tile: groups of GROUP_M row tiles walk the N tiles together, so a wave of blocks
     shares expert weights and activation rows in L2 */
  int ntn = n_tiles<MODE, BN>(f);
  int id = blockIdx.x, per = GROUP_M * ntn, grp = id / per, first = grp * GROUP_M;
  int gm = min(f.mt_max - first, GROUP_M), rem = id - grp * per;
  int m = first + rem % gm, nt = rem / gm;
  if (m >= f.ntiles[0]) return;
  if (SHRINK && (!f.meta || f.meta[1] == 0)) return; /* nothing active: exit at once */

  tile_ctx tc;
  tc.e = f.tile_expert[m];
  tc.p0 = m * BM;
  tc.n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : f.n0 + nt * BN;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    row_pair[r] = f.sorted_pair[tc.p0 + r];
    row_group[r] = f.sorted_group[tc.p0 + r];
  }
  __syncthreads();
  /* groups with an adapter present in this tile, ascending (rows are sorted by group) */
  bool use_lora = SHRINK || (lora && f.meta && f.meta[1] > 0);
  if (threadIdx.x < 32) {
    int lane = threadIdx.x, nl = 0, nlora = 0;
    if (use_lora) {
      const int32_t *act = lmoe_k_meta_active(f.meta);
      for (int r0 = 0; r0 < BM; r0 += 32) {
        int r = r0 + lane;
        int g = row_group[r];
        bool first_g = g >= 1 && g != PAD_GROUP && (r == 0 || row_group[r - 1] != g);
        unsigned mask = __ballot_sync(0xffffffffu, first_g);
        if (first_g) {
          int pos = nl + __popc(mask & ((1u << lane) - 1));
          int slot = act[g - 1];
          const lmoe_dslot &ds = f.slots[slot];
          int rk = (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) ? ds.r13 : ds.r2;
          lg_list[pos] = g;
          lg_cnt[pos] = SHRINK ? rk : (rk + BK - 1) / BK;
        }
        nl += __popc(mask);
      }
      __syncwarp();
      for (int i = lane; i < nl; i += 32) nlora += lg_cnt[i];
#pragma unroll
      for (int o = 16; o; o >>= 1) nlora += __shfl_xor_sync(0xffffffffu, nlora, o);
      if (SHRINK) {
        if (lane == 0) {
          int at = 0;
          for (int i = 0; i < nl; i++) {
            lg_cum[i] = at;
            lg_slot[i] = act[lg_list[i] - 1];
            at += (lg_cnt[i] + LMOE_K_RANK_PAD - 1) / LMOE_K_RANK_PAD * LMOE_K_RANK_PAD;
          }
          lg_cum[nl] = at;
        }
        for (int r = lane; r < BM; r += 32) {
          int g = row_group[r], gi = -1;
          for (int i = 0; i < nl; i++)
            if (lg_list[i] == g) gi = i;
          row_gi[r] = gi;
        }
      }
    }
    if (lane == 0) {
      s_nl = nl;
      s_nlora = nlora;
    }
  }
  __syncthreads();
  int nl = s_nl, nlora = s_nlora;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int wm0 = (warp / WARPS_N) * WTM, wn0 = (warp % WARPS_N) * WTN;
  float acc[MI][NI][4];

  if constexpr (!SHRINK) {
    int K = MODE == MODE_GATEUP ? f.H : f.I;
    tc.nbase = (K + BK - 1) / BK;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
      for (int ni = 0; ni < NI; ni++) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;
    mainloop<MODE, BN, WARPS_M, WARPS_N, ST, BM>(f, tc, tc.nbase + nlora, As, Bs, row_pair, row_group, lg_list,
                                         lg_cnt, nl, acc);
    /* Epilogue through shared memory (free after the main loop): the tile's output
       rows leave as 16-byte stores instead of 2- and 4-byte ones. */
    constexpr int OUTW = BN / Epi::COLS;
    constexpr int OS = OUTW + 8; /* padded row: spreads rows over the banks */
    uint16_t *so = As;
    float wrow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
      for (int half = 0; half < 2; half++) {
        int pair = row_pair[wm0 + mi * 16 + (lane >> 2) + half * 8];
        wrow[mi][half] = Epi::row_weight(f, pair);
      }
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        int r = wm0 + mi * 16 + (lane >> 2) + half * 8;
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
          int c = wn0 + ni * 8 + 2 * (lane & 3);
          Epi::stage(so + r * OS, c, acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1], wrow[mi][half]);
        }
      }
    }
    __syncthreads();
    const int limit = Epi::limit(f);
    const bool vec = Epi::vec(f);
    for (int i = threadIdx.x; i < BM * (OUTW / 8); i += blockDim.x) {
      int r = i / (OUTW / 8), c = (i % (OUTW / 8)) * 8, col = tc.n0 + c;
      int pair = row_pair[r];
      if (pair < 0 || col >= limit) continue;
      uint16_t *dst = Epi::dst(f, tc.p0, r, pair, col);
      const uint16_t *src = so + r * OS + c;
      if (vec && col + 8 <= limit) {
        *(uint4 *)dst = *(const uint4 *)src;
      } else {
        for (int q = 0; q < 8 && col + q < limit; q++) dst[q] = src[q];
      }
    }
  } else {
    /* shrink: one K pass computes every present group's A rows side by side (N = the
       groups' ranks, each rounded up to LMOE_K_RANK_PAD); each row keeps its own group's
       columns, t = scale * (A_slot . row), zeros up to the rounded rank. */
    tc.nl = nl;
    tc.rank = lg_cnt;
    tc.cum = lg_cum;
    tc.slot_of = lg_slot;
    int K = MODE == MODE_SHRINK13 ? f.H : f.I;
    tc.nbase = (K + BK - 1) / BK;
    int total = nl > 0 ? lg_cum[nl] : 0;
    uint16_t *tb = Epi::out(f);
    int ts = Epi::stride(f);
    for (tc.n0 = 0; tc.n0 < total; tc.n0 += BN) {
#pragma unroll
      for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;
      mainloop<MODE, BN, WARPS_M, WARPS_N, ST, BM>(f, tc, tc.nbase, As, Bs, row_pair, row_group, lg_list, lg_cnt,
                                               nl, acc);
#pragma unroll
      for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
          int r = wm0 + mi * 16 + (lane >> 2) + half * 8;
          int gi = row_gi[r];
          if (gi < 0 || row_pair[r] < 0) continue;
          int lo = lg_cum[gi], hi = lg_cum[gi + 1];
          const lmoe_dslot ds = f.slots[lg_slot[gi]];
          uint16_t *trow = tb + (size_t)(tc.p0 + r) * ts;
#pragma unroll
          for (int ni = 0; ni < NI; ni++) {
            int idx = tc.n0 + wn0 + ni * 8 + 2 * (lane & 3);
            if (idx < lo || idx >= hi) continue; /* segments have even lengths: idx+1 follows */
            int c = idx - lo;
            float s0 = Epi::scale(ds, c), s1 = Epi::scale(ds, c + 1);
            *(uint32_t *)(trow + c) = (uint32_t)f2bf(s0 * acc[mi][ni][half * 2]) |
                                      ((uint32_t)f2bf(s1 * acc[mi][ni][half * 2 + 1]) << 16);
          }
        }
      }
    }
  }
}

/* ------------------------------------------------------------------ launchers */

template <int MODE, int BN, int WM, int WN, int ST, int BM> static cudaError_t set_smem(void) {
  return cudaFuncSetAttribute(k_gemm<MODE, BN, WM, WN, ST, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)gemm_smem<BN, ST, BM>());
}

template <int MODE, int BN, int WM, int WN, int ST, int BM>
static cudaError_t launch(const lmoe_fwd *f, int lora, cudaStream_t s) {
  k_gemm<MODE, BN, WM, WN, ST, BM><<<f->mt_max * n_tiles<MODE, BN>(*f), 32 * WM * WN, gemm_smem<BN, ST, BM>(), s>>>(
      *f, lora);
  return cudaGetLastError();
}

/* (in an unnamed namespace: gemm_sm90.cu has a `row` of its own, and two class
   templates of one name with external linkage would be merged by the linker) */
namespace {

/* One row of the table (gemm_config.h): its two kernels, gate_up and down or the two
   shrinks. Rows of other engines compile to nothing here. */
template <int ENGINE, int KIND, int BM, int BN, int WM, int WN, int ST, int SMEM> struct row {
  static constexpr int OP0 = KIND == LMOE_GEMM_EXPERT ? MODE_GATEUP : MODE_SHRINK13;
  static constexpr int OP1 = KIND == LMOE_GEMM_EXPERT ? MODE_DOWN : MODE_SHRINK2;
  static cudaError_t init(int smem_limit) {
    if constexpr (ENGINE != LMOE_ENGINE_SM80) {
      return cudaSuccess;
    } else {
      static_assert(gemm_smem<BN, ST, BM>() == SMEM, "the table's SMEM is not this row's need");
      if (SMEM > smem_limit) return cudaSuccess; /* never selected on this device */
      cudaError_t e = set_smem<OP0, BN, WM, WN, ST, BM>();
      return e ? e : set_smem<OP1, BN, WM, WN, ST, BM>();
    }
  }
  static cudaError_t run(int op, const lmoe_fwd *f, int lora, cudaStream_t s) {
    if constexpr (ENGINE != LMOE_ENGINE_SM80) {
      (void)OP0, (void)OP1; /* another engine's row */
      return cudaErrorInvalidValue;
    } else {
      if (op == OP0) return launch<OP0, BN, WM, WN, ST, BM>(f, lora, s);
      if (op == OP1) return launch<OP1, BN, WM, WN, ST, BM>(f, lora, s);
      return cudaErrorInvalidValue;
    }
  }
};

typedef struct row_fns {
  cudaError_t (*init)(int smem_limit);
  cudaError_t (*run)(int op, const lmoe_fwd *f, int lora, cudaStream_t s);
} row_fns;

#define LMOE_SM80_ROW(engine, kind, bm, bn, wm, wn, st, smem) \
  {row<engine, kind, bm, bn, wm, wn, st, smem>::init, row<engine, kind, bm, bn, wm, wn, st, smem>::run},
static const row_fns rows[] = {LMOE_GEMM_TABLE(LMOE_SM80_ROW)};
#undef LMOE_SM80_ROW

} /* namespace */

extern "C" cudaError_t lmoe_sm80_init(int32_t smem_limit) {
  for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
    cudaError_t e = rows[i].init(smem_limit);
    if (e) return e;
  }
  return cudaSuccess;
}

extern "C" cudaError_t lmoe_sm80_run(int32_t op, int32_t cfg, const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (cfg < 0 || (size_t)cfg >= sizeof rows / sizeof rows[0]) return cudaErrorInvalidValue;
  return rows[cfg].run(op, f, lora, s);
}
