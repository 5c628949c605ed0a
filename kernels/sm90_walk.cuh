/* What the sm90 engines (gemm_sm90.cu: bf16, gemm_sm90_fp8.cu: FP8) share on the
   device: the persistent walk over the device-built tile list, the adapter groups of a
   tile, and the small arithmetic of their loaders and epilogues. Include inside the
   engine's LMOE_SM90_DEVICE section (sm_90a code only); everything here is inlined. */
#ifndef LMOE_SM90_WALK_CUH
#define LMOE_SM90_WALK_CUH

#include "common.cuh"
#include "lmoe_kernels.h"

/* Tile t of the walk: groups of group_m row tiles take the N tiles together, so the
   blocks working at one time share expert weights and token rows in L2. */
static __device__ __forceinline__ void sm90_tile_of(int t, int ntm, int ntn, int group_m, int &m, int &nt) {
  int per = group_m * ntn, grp = t / per, first = grp * group_m;
  int gm = min(ntm - first, group_m), rem = t - grp * per;
  m = first + rem % gm;
  nt = rem / gm;
}

/* Calls fn(group, slot, rank) once per adapter group present among a tile's BM sorted
   rows, in row order, uniformly across the calling warp; grp_of(r) is row r's group
   (rows are sorted by group), GU picks gate_up's ranks (r13) or down's (r2). The loads
   are issued together (the rows' groups, then each group start's slot and rank, one
   lane per start): three dependent loads a call, not three per group. */
template <bool GU, int BM, class G, class Fn>
static __device__ __forceinline__ void sm90_for_groups(const lmoe_fwd &f, G grp_of, Fn fn) {
  constexpr int NR = BM / 32;
  const int lane = threadIdx.x & 31;
  const int32_t *act = lmoe_k_meta_active(f.meta);
  int g[NR], slot[NR], rk[NR];
  unsigned start[NR];
#pragma unroll
  for (int i = 0; i < NR; i++) g[i] = grp_of(32 * i + lane);
#pragma unroll
  for (int i = 0; i < NR; i++) {
    int gp = __shfl_up_sync(0xffffffffu, g[i], 1);
    int prev = i > 0 ? __shfl_sync(0xffffffffu, g[i > 0 ? i - 1 : 0], 31) : -1;
    if (lane == 0) gp = prev;
    bool st = g[i] >= 1 && g[i] != PAD_GROUP && g[i] != gp;
    start[i] = __ballot_sync(0xffffffffu, st);
    slot[i] = st ? act[g[i] - 1] : 0;
  }
#pragma unroll
  for (int i = 0; i < NR; i++)
    rk[i] = (start[i] >> lane) & 1 ? (GU ? f.slots[slot[i]].r13 : f.slots[slot[i]].r2) : 0;
#pragma unroll
  for (int i = 0; i < NR; i++) {
    unsigned mask = start[i];
    while (mask) {
      int b = __ffs(mask) - 1;
      mask &= mask - 1;
      fn(__shfl_sync(0xffffffffu, g[i], b), __shfl_sync(0xffffffffu, slot[i], b),
         __shfl_sync(0xffffffffu, rk[i], b));
    }
  }
}

/* The packed LoRA axis of the tile at sorted row p0: the present groups' ranks, each
   rounded up to align columns, side by side; returns its chunks of bk columns. */
template <bool GU, int BM>
static __device__ __forceinline__ int sm90_lora_chunks(const lmoe_fwd &f, int p0, int align, int bk) {
  int cols = 0;
  sm90_for_groups<GU, BM>(f, [&](int r) { return f.sorted_group[p0 + r]; },
                          [&](int, int, int rk) { cols += (rk + align - 1) / align * align; });
  return (cols + bk - 1) / bk;
}

/* bytes of a 16-byte piece at element col that lie below limit, for elements of es bytes */
static __device__ __forceinline__ int sm90_piece_bytes(int col, int limit, int es) {
  int b = (limit - col) * es;
  return b < 0 ? 0 : b > 16 ? 16 : b;
}

/* The epilogues' stores (both engines) */

static __device__ __forceinline__ uint32_t sel4(uint32_t a, uint32_t b, uint32_t c, uint32_t d, int i) {
  return i == 0 ? a : i == 1 ? b : i == 2 ? c : d;
}

/* The accumulator layout gives each lane of a quad (4 lanes, one row) 2 columns of
   every 8-column block. Four rotations through shuffles hand lane q of the quad all 8
   columns of block q of four consecutive blocks (p0..p3: this lane's packed pairs of
   those blocks), so the row leaves as 16-byte stores, 64 contiguous bytes per quad,
   instead of 4-byte stores at a 16-byte stride. Every lane of the warp must call it. */
static __device__ __forceinline__ uint4 quad_transpose(uint32_t p0, uint32_t p1, uint32_t p2, uint32_t p3) {
  const int lane = threadIdx.x & 31, q = lane & 3, base = lane & ~3;
  uint32_t o0 = 0, o1 = 0, o2 = 0, o3 = 0;
#pragma unroll
  for (int r = 0; r < 4; r++) {
    uint32_t got = __shfl_sync(0xffffffffu, sel4(p0, p1, p2, p3, (q - r) & 3), base | ((q + r) & 3));
    int j = (q + r) & 3;
    o0 = j == 0 ? got : o0;
    o1 = j == 1 ? got : o1;
    o2 = j == 2 ? got : o2;
    o3 = j == 3 ? got : o3;
  }
  return make_uint4(o0, o1, o2, o3);
}

/* Stores 8 bf16 (o) at dst[c..c+8) where columns below limit exist. */
static __device__ __forceinline__ void store8(uint16_t *dst, int c, int limit, uint4 o) {
  if (c + 8 <= limit) {
    *(uint4 *)(dst + c) = o;
  } else {
    uint32_t w[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
    for (int e = 0; e < 8; e++)
      if (c + e < limit) dst[c + e] = (uint16_t)(w[e >> 1] >> (16 * (e & 1)));
  }
}

static __device__ __forceinline__ uint32_t pack2(float a, float b) { return (uint32_t)f2bf(a) | ((uint32_t)f2bf(b) << 16); }

/* A tile's row from the accumulator layout: NB 8-column blocks whose packed pairs (this
   lane's two columns of block i, bf16) pack(i) gives, exchanged a quad at a time and
   stored 8 columns (16 bytes) a lane from dst[c0], the columns below limit (store8);
   only where live (every lane of the warp calls it) */
template <int NB, class P>
static __device__ __forceinline__ void store_row16(uint16_t *dst, int c0, int limit, bool live, P pack) {
  static_assert(NB % 4 == 0, "blocks a quad at a time");
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int g = 0; g < NB / 4; g++) {
    const uint4 o = quad_transpose(pack(4 * g), pack(4 * g + 1), pack(4 * g + 2), pack(4 * g + 3));
    if (live) store8(dst, c0 + 8 * (4 * g + q), limit, o);
  }
}

/* LoRA's shrink2 in gate_up's epilogue (lmoe_fwd.t2p, docs/design.md; gpu-notes 44).
   What a consumer thread knows of its two rows (g, g + 8 of its warp's 16) for it: the
   group (-1: none, padding), and, gathered while the main loop runs, the group's slot
   and down rank, with the A2 lines the epilogue will read prefetched into L1. Nothing
   in the epilogue then waits on a dependent load. */
struct sm90_t2rows {
  int g[2], slot[2], rk[2];
};

/* Step 1 (after the tile's first MMAs are issued): the rows' slots. */
static __device__ __forceinline__ void sm90_t2rows_slots(const lmoe_fwd &f, sm90_t2rows &rw) {
  const int32_t *act = lmoe_k_meta_active(f.meta);
#pragma unroll
  for (int hf = 0; hf < 2; hf++) rw.slot[hf] = rw.g[hf] >= 1 ? act[rw.g[hf] - 1] : 0;
}

/* Step 2 (a few chunks later, the slots arrived): the ranks, and the lines of A2 this
   lane's B fragments will load in the first pass of its rows' groups (row 8 t + g of
   the group's A2, columns [n0, n0 + 8 NB)), prefetched into L1, which the main loop's
   TMA and cp.async traffic does not touch. */
template <int NB>
static __device__ __forceinline__ void sm90_t2rows_ranks(const lmoe_fwd &f, sm90_t2rows &rw, int e, int n0) {
  const int lane = threadIdx.x & 31, n = 8 * (lane & 3) + (lane >> 2);
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    rw.rk[hf] = rw.g[hf] >= 1 ? f.slots[rw.slot[hf]].r2 : 0;
    if (rw.g[hf] < 1 || n >= f.R || (hf == 1 && rw.g[1] == rw.g[0])) continue;
    const uint16_t *row = f.pool + (size_t)rw.slot[hf] * f.slot_elems + f.off_a2 + ((size_t)e * f.R + n) * f.I;
    const int last = min(n0 + 8 * NB, f.I) - 1;
#pragma unroll
    for (int c = 0; c < 8 * NB; c += 64)
      if (n0 + c <= last) asm volatile("prefetch.global.L1 [%0];" ::"l"(row + n0 + c));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(row + last));
  }
}

/* The partial t2 of this warp's 16 rows over the tile's h columns [n0, n0 + 8 NB), i.e.
   those columns of h times the same columns of each row's group's A2, by mma.sync
   m16n8k16 straight from the h the epilogue holds: a wgmma accumulator's layout is an
   mma.sync A fragment's, 8-column blocks 2j and 2j + 1 of rows g and g + 8 (g = lane /
   4) being k-step j's four registers. A group present among the warp's rows is one pass
   (the rows of another group enter as zeros; its slot and rank from a lane that has
   it), 32 of its rank's columns at a time, B's fragments two 4-byte loads of A2 rows a
   k-step (A2 is [rank][I] a slot and expert, read-only in the forward). A row's columns
   go to plane nt of t2p as float32; lmoe_k_t2_finish adds the planes in order, scales
   and rounds. hp[hf][i]: this lane's packed bf16 h of row g + 8 hf in block i; row0:
   the sorted row of row g. Every lane of the warp calls it. */
template <int NB>
static __device__ __forceinline__ void sm90_shrink2_part(const lmoe_fwd &f, const uint32_t (&hp)[2][NB],
                                                         const sm90_t2rows &rw, int e, int n0, int nt, int row0) {
  static_assert(NB % 2 == 0, "k16 steps of two 8-column blocks");
  const int lane = threadIdx.x & 31, gq = lane >> 2, t = lane & 3;
  int todo0 = rw.g[0] >= 1 && rw.rk[0] > 0 ? rw.g[0] : -1, todo1 = rw.g[1] >= 1 && rw.rk[1] > 0 ? rw.g[1] : -1;
  float *out0 = f.t2p + ((size_t)nt * f.h_rows + row0) * f.t2s, *out1 = out0 + 8 * (size_t)f.t2s;
#pragma unroll 1
  for (;;) {
    const int cand = __reduce_min_sync(0xffffffffu, min(todo0 < 0 ? 0x7fffffff : todo0, todo1 < 0 ? 0x7fffffff : todo1));
    if (cand == 0x7fffffff) break;
    const bool on0 = todo0 == cand, on1 = todo1 == cand;
    if (on0) todo0 = -1;
    if (on1) todo1 = -1;
    const int src = __ffs(__ballot_sync(0xffffffffu, on0 || on1)) - 1;
    const int slot = __shfl_sync(0xffffffffu, on0 ? rw.slot[0] : rw.slot[1], src);
    const int rk = __shfl_sync(0xffffffffu, on0 ? rw.rk[0] : rw.rk[1], src);
    const uint16_t *a2 = f.pool + (size_t)slot * f.slot_elems + f.off_a2 + (size_t)e * f.R * f.I;
#pragma unroll 1
    for (int q0 = 0; q0 < rk; q0 += 32) {
      /* B's fragments of half the pass's k-steps loaded first, then their MMAs:
         interleaved, each mma.sync waited on its own loads (a chain of 32 L2 round trips
         a pass, which cost the epilogue ~20 us a tile on the H200); all of them at once
         spilled at BM = 128 */
      constexpr int JH = NB / 4 > 0 ? NB / 4 : 1;
      float d[4][4];
#pragma unroll
      for (int nb = 0; nb < 4; nb++) d[nb][0] = d[nb][1] = d[nb][2] = d[nb][3] = 0.0f;
#pragma unroll
      for (int j0 = 0; j0 < NB / 2; j0 += JH) {
        uint32_t b[JH][4][2];
#pragma unroll
        for (int jj = 0; jj < JH; jj++) {
          const int k = n0 + 16 * (j0 + jj) + 2 * t;
#pragma unroll
          for (int nb = 0; nb < 4; nb++) {
            const int n = q0 + 8 * nb + gq;
            const uint16_t *row = a2 + (size_t)(n < rk ? n : 0) * f.I;
            b[jj][nb][0] = n < rk && k < f.I ? __ldg((const unsigned int *)(row + k)) : 0u;
            b[jj][nb][1] = n < rk && k + 8 < f.I ? __ldg((const unsigned int *)(row + k + 8)) : 0u;
          }
        }
#pragma unroll
        for (int jj = 0; jj < JH; jj++) {
          const int j = j0 + jj, k = n0 + 16 * j + 2 * t;
          /* h's columns past I (a last tile's) enter as zeros: their values are not h's */
          const bool lo = on0 && k < f.I, hi = on0 && k + 8 < f.I, lo1 = on1 && k < f.I, hi1 = on1 && k + 8 < f.I;
          const uint32_t a[4] = {lo ? hp[0][2 * j] : 0u, lo1 ? hp[1][2 * j] : 0u, hi ? hp[0][2 * j + 1] : 0u,
                                 hi1 ? hp[1][2 * j + 1] : 0u};
#pragma unroll
          for (int nb = 0; nb < 4; nb++)
            if (q0 + 8 * nb < rk) mma_bf16(d[nb], a, b[jj][nb]); /* rk is the warp's: no divergence */
        }
      }
#pragma unroll
      for (int nb = 0; nb < 4; nb++) {
        const int c = q0 + 8 * nb + 2 * t; /* columns c, c + 1 (past the rank: zero) */
        if (c >= rk) continue;
        if (on0) *(float2 *)(out0 + c) = make_float2(d[nb][0], d[nb][1]);
        if (on1) *(float2 *)(out1 + c) = make_float2(d[nb][2], d[nb][3]);
      }
    }
  }
}

#endif
