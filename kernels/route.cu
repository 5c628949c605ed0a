/* Routing and the alignment of (token, expert) pairs: top-k of the router's softmax and
   each token's adapter group (route), the device_sync guard's flag (any), per-expert
   offsets, tiles and padding (scan), the pairs sorted by expert and group (scatter), and
   where the GEMMs want it x's rows in that order (gather_x).

   Pair order: pairs are grouped by expert, each expert's list padded to a multiple of
   the row tile bm; inside an expert they are sorted by adapter group (0 = none, 1 +
   index into the batch's active slots), so a GEMM row tile has one expert and a few
   groups in ascending order.

   Expert parallel (lmoe_fwd.e0, E_route): the top-k and its weights are over all
   E_route experts and the ids stay the layer's; only pairs of this rank's experts
   [e0, e0 + E) are counted and placed, as local expert id - e0. */
#include "common.cuh"
#include "lmoe_kernels.h"

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

/* Token t's adapter group: 1 + the index of its request's slot among the batch's
   active ones, 0 for none (the request segments of lmoe_fwd.meta). */
static __device__ __forceinline__ int token_group(const lmoe_fwd &f, int t) {
  if (!f.meta) return 0;
  int nreq = f.meta[0];
  const int32_t *offs = f.meta + 2;
  const int32_t *grp = offs + nreq + 1;
  int lo = 0, hi = nreq; /* largest i with offs[i] <= t, i < nreq */
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (offs[mid] <= t) lo = mid;
    else hi = mid;
  }
  return nreq > 0 ? grp[lo] : 0;
}

/* The replica of cnt and off that token t's pairs are counted and placed in
   (lmoe_kernels.h, LMOE_K_CNT_REP). */
static __device__ __forceinline__ size_t cnt_replica(const lmoe_fwd &f, int t) {
  return (size_t)((t >> 3) % LMOE_K_CNT_REP) * f.cstride;
}

/* The end of a token's routing, lane j holding pick j (myid, -1 for none; weight myw):
   the weights renormalised if asked, ids and weights written, this rank's pairs
   counted per (expert, group). */
static __device__ __forceinline__ void finish_route(const lmoe_fwd &f, int t, int lane, int g, int myid,
                                                    float myw) {
  const int k = f.k;
  if (f.logits) {
    if (f.renorm) {
      float s = lane < k ? myw : 0.0f;
#pragma unroll
      for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (s > 0.0f) myw = myw / s;
    }
    if (lane < k) {
      f.ids[(size_t)t * k + lane] = myid;
      f.tw[(size_t)t * k + lane] = myw;
    }
  }
  int le = myid - f.e0; /* this rank's expert, or out of [0, f.E) */
  if (lane < k && myid >= 0 && le >= 0 && le < f.E) atomicAdd(&f.cnt[cnt_replica(f, t) + (size_t)le * f.gstride + g], 1);
}

/* One warp per token: its adapter group (from the request segments), the top-k of the
   softmax of its router logits (ties: lower expert id), and the per (expert, group)
   pair counts. */
static __global__ void k_route(lmoe_fwd f) {
  int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int t = blockIdx.x * 8 + wib;
  if (t >= f.M) return;
  const int g = token_group(f, t);
  if (lane == 0) f.tok_group[t] = g;
  int k = f.k, E = f.E_route ? f.E_route : f.E;
  int myid = -1;
  float myw = 0.0f;
  if (f.logits) {
    const float *lf = (const float *)f.logits + (size_t)t * E;
    const uint16_t *lb = (const uint16_t *)f.logits + (size_t)t * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, f.logits_bf16 ? bf2f(lb[e]) : lf[e]);
#pragma unroll
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf((f.logits_bf16 ? bf2f(lb[e]) : lf[e]) - mx);
#pragma unroll
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    float inv = 1.0f / sum;
    /* Pick j goes to lane j (k <= 32), in a register: later picks skip the experts of
       lanes 0..j-1, read with shuffles, so the e loop runs the same rounds on every
       lane (the shuffles need the whole warp). */
    for (int j = 0; j < k; j++) {
      float bv = -1.0f;
      int be = 0x7fffffff;
      for (int e0 = 0; e0 < E; e0 += 32) {
        int e = e0 + lane;
        bool taken = false;
        for (int q = 0; q < j; q++) taken |= __shfl_sync(0xffffffffu, myid, q) == e;
        if (e >= E || taken) continue;
        float p = expf((f.logits_bf16 ? bf2f(lb[e]) : lf[e]) - mx) * inv;
        if (p > bv || (p == bv && e < be)) {
          bv = p;
          be = e;
        }
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oe = __shfl_xor_sync(0xffffffffu, be, o);
        if (ov > bv || (ov == bv && oe < be)) {
          bv = ov;
          be = oe;
        }
      }
      if (be == 0x7fffffff) be = -1; /* NaN logits: no expert */
      if (lane == j) {
        myid = be;
        myw = be >= 0 ? bv : 0.0f;
      }
    }
  } else if (lane < k) {
    myid = f.ids[(size_t)t * k + lane];
  }
  finish_route(f, t, lane, g, myid, myw);
}

/* k_route with the top-k in registers (the default where router logits are given;
   LMOE_ROUTE_REG=0 keeps k_route: docs/gpu-notes.md 25), for up to 32 * NV experts:
   each lane holds the probabilities of experts lane, lane + 32, ... once (k_route
   recomputes them, and skips the taken experts with k shuffles, at every pick), as
   64-bit keys (probability bits above, the complement of the expert below: the largest
   key is the largest probability, ties to the lower expert; a NaN or taken expert is
   key 0), so a pick is one warp maximum. The same probabilities, picks and weights as
   k_route. */
template <int NV> static __global__ void k_route_reg(lmoe_fwd f) {
  int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int t = blockIdx.x * 8 + wib;
  if (t >= f.M) return;
  const int g = token_group(f, t);
  if (lane == 0) f.tok_group[t] = g;
  const int k = f.k, E = f.E_route ? f.E_route : f.E;
  const float *lf = (const float *)f.logits + (size_t)t * E;
  const uint16_t *lb = (const uint16_t *)f.logits + (size_t)t * E;
  float v[NV];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < NV; i++) {
    const int e = lane + 32 * i;
    v[i] = e < E ? (f.logits_bf16 ? bf2f(lb[e]) : lf[e]) : -INFINITY;
    if (e < E) mx = fmaxf(mx, v[i]);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < NV; i++)
    if (lane + 32 * i < E) sum += expf(v[i] - mx);
#pragma unroll
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = 1.0f / sum;
  unsigned long long key[NV];
#pragma unroll
  for (int i = 0; i < NV; i++) {
    const int e = lane + 32 * i;
    const float p = expf(v[i] - mx) * inv;
    key[i] = e < E && p == p ? ((unsigned long long)__float_as_uint(p) << 32) | (0xffffffffu - (unsigned)e) : 0ull;
  }
  int myid = -1;
  float myw = 0.0f;
  for (int j = 0; j < k; j++) {
    unsigned long long b = 0;
#pragma unroll
    for (int i = 0; i < NV; i++) b = key[i] > b ? key[i] : b;
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const unsigned long long ob = __shfl_xor_sync(0xffffffffu, b, o);
      b = ob > b ? ob : b;
    }
    const int be = b ? (int)(0xffffffffu - (unsigned)(b & 0xffffffffu)) : -1; /* none left: NaN logits */
    const bool mine = be >= 0 && lane == (be & 31);
#pragma unroll
    for (int i = 0; i < NV; i++) key[i] = mine && i == (be >> 5) ? 0ull : key[i];
    if (lane == j) {
      myid = be;
      myw = be >= 0 ? __uint_as_float((unsigned)(b >> 32)) : 0.0f;
    }
  }
  finish_route(f, t, lane, g, myid, myw);
}

/* device_sync guard: does any token use an adapter? */
static __global__ void k_any(lmoe_fwd f) {
  int any = 0;
  for (int t = threadIdx.x; t < f.M; t += blockDim.x) any |= f.tok_group[t] > 0;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) f.any[0] = any;
}

/* One block: per expert the padded row count, their exclusive scan, each (expert,
   group) start offset, the tile -> expert table and the padding rows (a warp per
   expert, its lanes on consecutive rows: one thread per expert writing its padding
   alone made each store a scattered sector and the kernel ~20 us on an H200). */
static __global__ void k_scan(lmoe_fwd f) {
  extern __shared__ int sbase[]; /* [E] starts, then [E] ends of the real rows */
  __shared__ int warp_sum[32];
  __shared__ int total_rows;
  int E = f.E, gs = f.gstride, bm = f.bm;
  const size_t cs = f.cstride;
  int G = f.meta ? f.meta[1] + 1 : 1;
  if (G > gs) G = gs;
  int *send = sbase + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) send[e] = 0;
  /* the row tiles' flags of a gate_up or down that computes its shrink (lmoe_fwd.s13f,
     s2f: one region) */
  int32_t *const sfl = f.s13f ? f.s13f : f.s2f;
  if (sfl)
    for (int m = threadIdx.x; m < f.mt_max; m += blockDim.x) sfl[m] = 0;
  __syncthreads();
  /* each (expert, group)'s count summed over the replicas, kept in off's first replica
     until its start is written there; an expert's real rows in send */
  for (int i = threadIdx.x; i < E * G; i += blockDim.x) {
    const int e = i / G, at = e * gs + (i - e * G);
    int c = 0;
#pragma unroll
    for (int r = 0; r < LMOE_K_CNT_REP; r++) c += f.cnt[r * cs + at];
    f.off[at] = c;
    if (c) atomicAdd(&send[e], c);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) sbase[e] = (send[e] + bm - 1) / bm * bm;
  __syncthreads();
  /* exclusive scan: each thread a contiguous run of experts */
  int per = (E + blockDim.x - 1) / blockDim.x;
  int b0 = threadIdx.x * per, b1 = min(b0 + per, E);
  int local = 0;
  for (int e = b0; e < b1; e++) local += sbase[e];
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sum[w] = incl;
  __syncthreads();
  if (w == 0) {
    int nw = blockDim.x >> 5;
    int v = lane < nw ? warp_sum[lane] : 0;
    int iv = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int u = __shfl_up_sync(0xffffffffu, iv, o);
      if (lane >= o) iv += u;
    }
    if (lane < nw) warp_sum[lane] = iv - v;
    if (lane == 31) total_rows = iv;
  }
  __syncthreads();
  int run = warp_sum[w] + incl - local;
  for (int e = b0; e < b1; e++) {
    int pad = sbase[e];
    sbase[e] = run;
    run += pad;
  }
  __syncthreads();
  if (threadIdx.x == 0) f.ntiles[0] = total_rows / bm;
  /* each group's start inside its expert (replica 0's offset), then each replica's
     after the pairs of the replicas before it */
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int at = sbase[e];
    for (int g = 0; g < G; g++) {
      const int c = f.off[(size_t)e * gs + g];
      f.off[(size_t)e * gs + g] = at;
      at += c;
    }
    send[e] = at;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < E * G; i += blockDim.x) {
    const int e = i / G, at0 = e * gs + (i - e * G);
    int at = f.off[at0];
#pragma unroll
    for (int r = 0; r + 1 < LMOE_K_CNT_REP; r++) {
      at += f.cnt[r * cs + at0];
      f.off[(r + 1) * cs + at0] = at;
    }
  }
  for (int e = w; e < E; e += blockDim.x >> 5) {
    int base = sbase[e], at = send[e];
    int end = (at - base + bm - 1) / bm * bm + base;
    for (int p = at + lane; p < end; p += 32) {
      f.sorted_pair[p] = -1;
      f.sorted_group[p] = PAD_GROUP;
    }
    for (int m = base / bm + lane; m < end / bm; m += 32) f.tile_expert[m] = e;
  }
}

static __global__ void k_scatter(lmoe_fwd f) {
  int P = f.M * f.k;
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += gridDim.x * blockDim.x) {
    int id = f.ids[p], e = id - f.e0;
    if (id < 0 || e < 0 || e >= f.E) {
      if (f.pair_row) f.pair_row[p] = -1;
      continue;
    }
    const int t = p / f.k, g = f.tok_group[t];
    int pos = atomicAdd(&f.off[cnt_replica(f, t) + (size_t)e * f.gstride + g], 1);
    f.sorted_pair[pos] = p;
    f.sorted_group[pos] = g;
    if (f.pair_row) f.pair_row[p] = pos;
  }
}

/* x's rows into sorted order (lmoe_fwd.xg): a warp per token reads its row once, in
   16-byte pieces, and writes it to each of its pairs' rows. Padding rows are left
   unwritten (their products are not stored, and never mix with another row's). */
static __global__ void k_gather_x(lmoe_fwd f) {
  const int lane = threadIdx.x & 31, k = f.k;
  const int64_t nw = (int64_t)gridDim.x * (blockDim.x / 32);
  const int pieces = f.H / 8; /* H % 8 == 0 where xg is set (the sm90 engine's alignment) */
  for (int64_t t = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; t < f.M; t += nw) {
    const uint4 *src = (const uint4 *)(f.x + t * f.H);
    for (int j0 = 0; j0 < k; j0 += 8) { /* 8 pairs a pass (top_k may be up to 32) */
      int row[8];
#pragma unroll
      for (int j = 0; j < 8; j++) row[j] = j0 + j < k ? f.pair_row[t * k + j0 + j] : -1;
      for (int c = lane; c < pieces; c += 32) {
        const uint4 v = src[c];
#pragma unroll
        for (int j = 0; j < 8; j++)
          if (row[j] >= 0) ((uint4 *)(f.xg + (size_t)row[j] * f.H))[c] = v;
      }
    }
  }
}

extern "C" cudaError_t lmoe_k_route(const lmoe_fwd *f, cudaStream_t s) {
  static const bool reg = [] { /* LMOE_ROUTE_REG=0: k_route always (read once; a static's
                                   initialisation is thread-safe) */
    const char *v = getenv("LMOE_ROUTE_REG");
    return !v || atoi(v) != 0;
  }();
  cudaError_t e = cudaMemsetAsync(f->cnt, 0, (size_t)LMOE_K_CNT_REP * f->cstride * sizeof(int32_t), s);
  if (e) return e;
  const int E = f->E_route ? f->E_route : f->E, grid = (f->M + 7) / 8;
  if (reg && f->logits && E <= 128)
    k_route_reg<4><<<grid, 256, 0, s>>>(*f);
  else if (reg && f->logits && E <= 256)
    k_route_reg<8><<<grid, 256, 0, s>>>(*f);
  else
    k_route<<<grid, 256, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_any(const lmoe_fwd *f, cudaStream_t s) {
  k_any<<<1, 1024, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_scan(const lmoe_fwd *f, cudaStream_t s) {
  k_scan<<<1, 1024, 2 * (size_t)f->E * sizeof(int), s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_scatter(const lmoe_fwd *f, cudaStream_t s) {
  k_scatter<<<grid_for((int64_t)f->M * f->k, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_gather_x(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->xg || f->M <= 0) return cudaSuccess;
  if (f->H % 8 || !f->pair_row || ((uintptr_t)f->x | (uintptr_t)f->xg) % 16) return cudaErrorInvalidValue;
  k_gather_x<<<grid_for((int64_t)f->M * 32, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}

