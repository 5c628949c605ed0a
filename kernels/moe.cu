/* The forward's kernels: routing, alignment of (token, expert) pairs by expert and
   adapter group, the grouped GEMMs on tensor cores (mma.sync m16n8k16 bf16, ldmatrix,
   cp.async multi-stage pipeline) with the LoRA expand folded in as extra K chunks, the
   LoRA shrinks, and the deterministic reduction. Plain C style; launchers are extern "C".

   Pair order: pairs are grouped by expert, each expert's list padded to a multiple of
   BM rows; inside an expert they are sorted by adapter group (0 = none, 1 + index into
   the batch's active slots). A row tile therefore has one expert and a few groups in
   ascending order; the GEMMs add, per group present, ceil(rank/BK) K chunks whose A is
   the row's shrink t (rows of other groups zero) and whose B is the slot's B matrix. */
#include "lmoe_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define BMAX LMOE_K_BM /* the largest row tile; 64-row tiles serve small batches */
#define BK LMOE_K_BK
#define GROUP_M 8
#define PAD_GROUP 0x7fffffff

enum { MODE_GATEUP = 0, MODE_DOWN = 1, MODE_SHRINK13 = 2, MODE_SHRINK2 = 3 };

/* ------------------------------------------------------------------ helpers */

static __device__ __forceinline__ float bf2f(uint16_t v) {
  return __uint_as_float(((uint32_t)v) << 16);
}
static __device__ __forceinline__ uint16_t f2bf(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

static __device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
static __device__ __forceinline__ void cp_async_commit(void) {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> static __device__ __forceinline__ void cp_async_wait(void) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ void ldmatrix_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2,
                                                   uint32_t &r3, const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(p)));
}

static __device__ __forceinline__ void mma_bf16(float *c, const uint32_t *a, const uint32_t *b) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

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

/* alignment flags in lmoe_fwd.al_x / al_lora bit sets */
enum { AL_X = 1, AL_W13 = 2, AL_W2 = 4, AL_A13 = 8, AL_B13 = 16, AL_A2 = 32, AL_B2 = 64 };

/* ------------------------------------------------------------------ small kernels */

static __global__ void k_fill_random(void *p, int32_t dtype, int64_t n, uint64_t seed, float lo,
                                     float hi) {
  float span = hi - lo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    uint64_t z = (uint64_t)i;
    /* lmoe_uniform(seed, i), as in internal.h */
    uint64_t a = z + 0x9e3779b97f4a7c15ull;
    a = (a ^ (a >> 30)) * 0xbf58476d1ce4e5b9ull;
    a = (a ^ (a >> 27)) * 0x94d049bb133111ebull;
    a = a ^ (a >> 31);
    uint64_t b = (seed ^ a) + 0x9e3779b97f4a7c15ull;
    b = (b ^ (b >> 30)) * 0xbf58476d1ce4e5b9ull;
    b = (b ^ (b >> 27)) * 0x94d049bb133111ebull;
    b = b ^ (b >> 31);
    float u = (float)(b >> 40) * (1.0f / 16777216.0f);
    float v = __fadd_rn(lo, __fmul_rn(span, u)); /* no FMA: matches the host */
    switch (dtype) {
    case 0: ((uint16_t *)p)[i] = f2bf(v); break;
    case 1: ((__half *)p)[i] = __float2half_rn(v); break;
    case 2: ((float *)p)[i] = v; break;
    case 3: ((double *)p)[i] = (double)v; break;
    case 4: {
      double f = floor((double)v);
      ((int32_t *)p)[i] = f >= 2147483647.0 ? 2147483647 : f <= -2147483648.0 ? (-2147483647 - 1) : (int32_t)f;
      break;
    }
    }
  }
}

static __global__ void k_fill(void *p, int32_t dtype, int64_t n, double v) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    switch (dtype) {
    case 0: ((uint16_t *)p)[i] = f2bf((float)v); break;
    case 1: ((__half *)p)[i] = __float2half_rn((float)v); break;
    case 2: ((float *)p)[i] = (float)v; break;
    case 3: ((double *)p)[i] = v; break;
    case 4: {
      double f = floor(v);
      ((int32_t *)p)[i] = f >= 2147483647.0 ? 2147483647 : f <= -2147483648.0 ? (-2147483647 - 1) : (int32_t)f;
      break;
    }
    }
  }
}

static __global__ void k_set_slot(lmoe_dslot *table, int32_t slot, lmoe_dslot facts) {
  table[slot] = facts;
}

static __global__ void k_meta_write(int32_t *dst, lmoe_meta_param m) {
  for (int i = threadIdx.x; i < m.count; i += blockDim.x) dst[i] = m.v[i];
}

/* ------------------------------------------------------------------ routing */

/* One warp per token: its adapter group (from the request segments), the top-k of the
   softmax of its router logits (ties: lower expert id), and the per (expert, group)
   pair counts. */
static __global__ void k_route(lmoe_fwd f) {
  __shared__ int chosen[8][32];
  int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int t = blockIdx.x * 8 + wib;
  if (t >= f.M) return;
  int g = 0;
  if (f.meta) {
    int nreq = f.meta[0];
    const int32_t *offs = f.meta + 2;
    const int32_t *grp = offs + nreq + 1;
    int lo = 0, hi = nreq; /* largest i with offs[i] <= t, i < nreq */
    while (hi - lo > 1) {
      int mid = (lo + hi) >> 1;
      if (offs[mid] <= t) lo = mid;
      else hi = mid;
    }
    g = nreq > 0 ? grp[lo] : 0;
  }
  if (lane == 0) f.tok_group[t] = g;
  int k = f.k, E = f.E;
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
    for (int j = 0; j < k; j++) {
      float bv = -1.0f;
      int be = 0x7fffffff;
      for (int e = lane; e < E; e += 32) {
        bool taken = false;
        for (int q = 0; q < j; q++) taken |= chosen[wib][q] == e;
        if (taken) continue;
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
      if (lane == 0) chosen[wib][j] = be;
      __syncwarp();
      if (lane == j) {
        myid = be;
        myw = be >= 0 ? bv : 0.0f;
      }
    }
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
  } else if (lane < k) {
    myid = f.ids[(size_t)t * k + lane];
  }
  if (lane < k && myid >= 0 && myid < E) atomicAdd(&f.cnt[(size_t)myid * f.gstride + g], 1);
}

/* device_sync guard: does any token use an adapter? */
static __global__ void k_any(lmoe_fwd f) {
  int any = 0;
  for (int t = threadIdx.x; t < f.M; t += blockDim.x) any |= f.tok_group[t] > 0;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) f.any[0] = any;
}

/* One block: per expert the padded row count, their exclusive scan, each (expert,
   group) start offset, the tile -> expert table and the padding rows. */
static __global__ void k_scan(lmoe_fwd f) {
  extern __shared__ int sbase[]; /* [E] */
  __shared__ int warp_sum[32];
  __shared__ int total_rows;
  int E = f.E, gs = f.gstride, bm = f.bm;
  int G = f.meta ? f.meta[1] + 1 : 1;
  if (G > gs) G = gs;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int c = 0;
    for (int g = 0; g < G; g++) c += f.cnt[(size_t)e * gs + g];
    sbase[e] = (c + bm - 1) / bm * bm;
  }
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
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int base = sbase[e], at = base;
    for (int g = 0; g < G; g++) {
      f.off[(size_t)e * gs + g] = at;
      at += f.cnt[(size_t)e * gs + g];
    }
    int end = (at - base + bm - 1) / bm * bm + base;
    for (int p = at; p < end; p++) {
      f.sorted_pair[p] = -1;
      f.sorted_group[p] = PAD_GROUP;
    }
    for (int m = base / bm; m < end / bm; m++) f.tile_expert[m] = e;
  }
}

static __global__ void k_scatter(lmoe_fwd f) {
  int P = f.M * f.k;
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += gridDim.x * blockDim.x) {
    int e = f.ids[p];
    if (e < 0 || e >= f.E) continue;
    int g = f.tok_group[p / f.k];
    int pos = atomicAdd(&f.off[(size_t)e * f.gstride + g], 1);
    f.sorted_pair[pos] = p;
    f.sorted_group[pos] = g;
  }
}

/* ------------------------------------------------------------------ grouped GEMM */

/* What a block works on. */
typedef struct tile_ctx {
  int e, p0, n0;       /* expert, first sorted row, first output column */
  int nbase;           /* K chunks of the base product */
  int g, slot, r;      /* (unused by the shrinks now; kept for the LoRA chunk loader) */
  /* shrink: the groups present, their ranks, slots, and where each one's rows of A
     start in the concatenated N (each rank rounded up to BK) */
  int nl;
  const int *rank, *cum, *slot_of;
} tile_ctx;

template <int MODE, int BN, int THREADS, int BM>
static __device__ __forceinline__ void load_chunk(const lmoe_fwd &f, const tile_ctx &tc, int chunk,
                                                  uint16_t *as, uint16_t *bs, const int *row_pair,
                                                  const int *row_group, const int *lg_list,
                                                  const int *lg_cnt, int nl) {
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
    lslot = f.meta[2 + 2 * f.meta[0] + 1 + (lg - 1)];
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
    if (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) {
      if (lg < 0) {
        bool ok = pair >= 0 && (MODE == MODE_GATEUP || row_group[r] == tc.g);
        if (ok) row = f.x + (size_t)(pair / f.k) * H;
        nvalid = H;
        al = f.al_x & AL_X;
      } else {
        if (row_group[r] == lg) row = f.t13 + (size_t)(tc.p0 + r) * f.t13s;
        nvalid = f.t13s;
      }
    } else {
      if (lg < 0) {
        bool ok = pair >= 0 && (MODE == MODE_DOWN || row_group[r] == tc.g);
        if (ok) row = f.h + (size_t)(tc.p0 + r) * hs;
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
          al = f.al_x & AL_W13;
        } else {
          row = f.pool + (size_t)lslot * f.slot_elems + f.off_b13 + grow * (2 * R);
          nvalid = 2 * R;
          al = f.al_lora & AL_B13;
        }
      }
    } else if (MODE == MODE_DOWN) {
      int o = tc.n0 + n;
      if (o < H) {
        size_t grow = (size_t)tc.e * H + o;
        if (lg < 0) {
          row = f.w2 + grow * I;
          nvalid = I;
          al = f.al_x & AL_W2;
        } else {
          row = f.pool + (size_t)lslot * f.slot_elems + f.off_b2 + grow * R;
          nvalid = R;
          al = f.al_lora & AL_B2;
        }
      }
    } else if (MODE == MODE_SHRINK13) {
      int q = tc.n0 + n;
      if (q < tc.r) {
        row = f.pool + (size_t)tc.slot * f.slot_elems + f.off_a13 + ((size_t)tc.e * 2 * R + q) * H;
        nvalid = H;
        al = f.al_lora & AL_A13;
      }
    } else {
      int q = tc.n0 + n;
      if (q < tc.r) {
        row = f.pool + (size_t)tc.slot * f.slot_elems + f.off_a2 + ((size_t)tc.e * R + q) * I;
        nvalid = I;
        al = f.al_lora & AL_A2;
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
  p.ala = (MODE == MODE_GATEUP || MODE == MODE_SHRINK13) ? (f.al_x & AL_X) : 1;
  p.alb = MODE == MODE_GATEUP ? (f.al_x & AL_W13) : MODE == MODE_DOWN ? (f.al_x & AL_W2)
          : MODE == MODE_SHRINK13 ? (f.al_lora & AL_A13) : (f.al_lora & AL_A2);
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
    else if (s < nchunks)
      load_chunk<MODE, BN, THREADS, BM>(f, tc, s, As + s * BM * BK, Bs + s * BN * BK, row_pair,
                                    row_group, lg_list, lg_cnt, nl);
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
      else
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

template <int MODE, int BN, int WARPS_M, int WARPS_N, int ST, int BM>
static size_t gemm_smem(void) {
  return (size_t)ST * (BM + BN) * BK * 2 + (size_t)(7 * BM + 4) * sizeof(int) + 16;
}

template <int MODE, int BN, int WARPS_M, int WARPS_N, int ST, int BM>
static __global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    k_gemm(lmoe_fwd f, int lora) {
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, MI = WTM / 16, NI = WTN / 8;
  constexpr bool SHRINK = MODE == MODE_SHRINK13 || MODE == MODE_SHRINK2;
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
  int ntn;
  if (MODE == MODE_GATEUP) ntn = (f.I + BN / 2 - 1) / (BN / 2);
  else if (MODE == MODE_DOWN) ntn = (f.H + BN - 1) / BN;
  else ntn = 1;
  int id = blockIdx.x, per = GROUP_M * ntn, grp = id / per, first = grp * GROUP_M;
  int gm = min(f.mt_max - first, GROUP_M), rem = id - grp * per;
  int m = first + rem % gm, nt = rem / gm;
  if (m >= f.ntiles[0]) return;
  if (SHRINK && (!f.meta || f.meta[1] == 0)) return; /* nothing active: exit at once */

  tile_ctx tc;
  tc.e = f.tile_expert[m];
  tc.p0 = m * BM;
  tc.n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : nt * BN;
  tc.g = 0;
  tc.slot = 0;
  tc.r = 0;
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
      const int32_t *act = f.meta + 2 + 2 * f.meta[0] + 1;
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
            at += (lg_cnt[i] + BK - 1) / BK * BK;
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

  if (!SHRINK) {
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
    constexpr int OUTW = MODE == MODE_GATEUP ? BN / 2 : BN;
    constexpr int OS = OUTW + 8; /* padded row: spreads rows over the banks */
    uint16_t *so = As;
    float wrow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
      for (int half = 0; half < 2; half++) {
        int pair = row_pair[wm0 + mi * 16 + (lane >> 2) + half * 8];
        wrow[mi][half] = MODE == MODE_DOWN && pair >= 0 ? f.tw[pair] : 1.0f;
      }
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        int r = wm0 + mi * 16 + (lane >> 2) + half * 8;
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
          int c = wn0 + ni * 8 + 2 * (lane & 3);
          float a0 = acc[mi][ni][half * 2], a1 = acc[mi][ni][half * 2 + 1];
          if (MODE == MODE_GATEUP) {
            so[r * OS + c / 2] = f2bf(a0 / (1.0f + __expf(-a0)) * a1);
          } else {
            float w = wrow[mi][half];
            *(uint32_t *)(so + r * OS + c) = (uint32_t)f2bf(w * a0) | ((uint32_t)f2bf(w * a1) << 16);
          }
        }
      }
    }
    __syncthreads();
    const int hs = (f.I + 7) & ~7;
    const int limit = MODE == MODE_GATEUP ? f.I : f.H;
    const bool vec = MODE == MODE_GATEUP || (f.H & 7) == 0;
    for (int i = threadIdx.x; i < BM * (OUTW / 8); i += blockDim.x) {
      int r = i / (OUTW / 8), c = (i % (OUTW / 8)) * 8, col = tc.n0 + c;
      int pair = row_pair[r];
      if (pair < 0 || col >= limit) continue;
      uint16_t *dst = MODE == MODE_GATEUP ? f.h + (size_t)(tc.p0 + r) * hs + col : f.y + (size_t)pair * f.H + col;
      const uint16_t *src = so + r * OS + c;
      if (vec && col + 8 <= limit) {
        *(uint4 *)dst = *(const uint4 *)src;
      } else {
        for (int q = 0; q < 8 && col + q < limit; q++) dst[q] = src[q];
      }
    }
    return;
  }

  /* shrink: one K pass computes every present group's A rows side by side (N = the
     groups' ranks, each rounded up to BK); each row keeps its own group's columns,
     t = scale * (A_slot . row), zeros up to the rounded rank. */
  tc.nl = nl;
  tc.rank = lg_cnt;
  tc.cum = lg_cum;
  tc.slot_of = lg_slot;
  int K = MODE == MODE_SHRINK13 ? f.H : f.I;
  tc.nbase = (K + BK - 1) / BK;
  int total = nl > 0 ? lg_cum[nl] : 0;
  uint16_t *tb = MODE == MODE_SHRINK13 ? f.t13 : f.t2;
  int ts = MODE == MODE_SHRINK13 ? f.t13s : f.t2s;
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
          if (idx < lo || idx >= hi) continue; /* segments are BK-aligned: idx+1 follows */
          int c = idx - lo;
          float s0, s1;
          if (MODE == MODE_SHRINK13) {
            s0 = c >= ds.g_lo && c < ds.g_hi ? ds.sg : c >= ds.u_lo && c < ds.u_hi ? ds.su : 0.0f;
            s1 = c + 1 >= ds.g_lo && c + 1 < ds.g_hi ? ds.sg
                 : c + 1 >= ds.u_lo && c + 1 < ds.u_hi ? ds.su : 0.0f;
          } else {
            s0 = s1 = ds.sd;
          }
          *(uint32_t *)(trow + c) = (uint32_t)f2bf(s0 * acc[mi][ni][half * 2]) |
                                    ((uint32_t)f2bf(s1 * acc[mi][ni][half * 2 + 1]) << 16);
        }
      }
    }
  }
}

/* Deterministic reduction: out[t] = sum over j in order of y[t*k + j] (already weighted). */
static __global__ void k_reduce(lmoe_fwd f) {
  int H = f.H, k = f.k;
  int vec = (H & 7) == 0 ? 8 : 1;
  int per_row = H / vec;
  int64_t total = (int64_t)f.M * per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int t = (int)(i / per_row), c = (int)(i % per_row) * vec;
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < k; j++) {
      int e = f.ids[(size_t)t * k + j];
      if (e < 0 || e >= f.E) continue;
      const uint16_t *yr = f.y + ((size_t)t * k + j) * H + c;
      if (vec == 8) {
        uint4 q = *(const uint4 *)yr;
        uint32_t w4[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int u = 0; u < 4; u++) {
          s[2 * u] += bf2f((uint16_t)(w4[u] & 0xffff));
          s[2 * u + 1] += bf2f((uint16_t)(w4[u] >> 16));
        }
      } else {
        s[0] += bf2f(yr[0]);
      }
    }
    uint16_t *o = f.out + (size_t)t * H + c;
    if (vec == 8) {
      uint4 q;
      q.x = f2bf(s[0]) | ((uint32_t)f2bf(s[1]) << 16);
      q.y = f2bf(s[2]) | ((uint32_t)f2bf(s[3]) << 16);
      q.z = f2bf(s[4]) | ((uint32_t)f2bf(s[5]) << 16);
      q.w = f2bf(s[6]) | ((uint32_t)f2bf(s[7]) << 16);
      *(uint4 *)o = q;
    } else {
      o[0] = f2bf(s[0]);
    }
  }
}

/* ------------------------------------------------------------------ launchers */

#define GEMM_S13 MODE_SHRINK13, 128, 4, 2, 4
#define GEMM_S2 MODE_SHRINK2, 128, 4, 2, 4

static int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  return (int)(b > 0 ? b : 1);
}

/* Tile configurations of the two big GEMMs: 0 = 128x256 tiles (warps of 64x64),
   4 stages, ~98 KB of shared memory (fits sm_80..sm_90); 1 = 128x128 tiles (warps of
   64x32), 4 stages, ~66 KB, for devices with less. Measured on H100 (docs/gpu-notes.md):
   0 beats 1 by ~10%; 8 stages or 6 stages changed nothing. LMOE_GEMM_CFG=1 forces 1. */
#include <stdlib.h>

template <int MODE, int BN, int WM, int WN, int ST, int BM> static cudaError_t set_smem(int limit, int *ok) {
  size_t need = gemm_smem<MODE, BN, WM, WN, ST, BM>();
  if ((int)need > limit) {
    *ok = 0;
    return cudaSuccess;
  }
  return cudaFuncSetAttribute(k_gemm<MODE, BN, WM, WN, ST, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)need);
}

extern "C" cudaError_t lmoe_k_init(int32_t *gemm_cfg) {
  int dev = 0, limit = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (!e) e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e) return e;
  int ok[2] = {1, 1}, must = 1;
  if ((e = set_smem<MODE_GATEUP, 256, 2, 4, 4, 128>(limit, &ok[0])) ||
      (e = set_smem<MODE_DOWN, 256, 2, 4, 4, 128>(limit, &ok[0])) ||
      (e = set_smem<MODE_GATEUP, 128, 2, 4, 4, 128>(limit, &ok[1])) ||
      (e = set_smem<MODE_DOWN, 128, 2, 4, 4, 128>(limit, &ok[1])) ||
      (e = set_smem<MODE_GATEUP, 256, 2, 4, 4, 64>(limit, &must)) ||
      (e = set_smem<MODE_DOWN, 256, 2, 4, 4, 64>(limit, &must)) ||
      (e = set_smem<GEMM_S13, 128>(limit, &must)) || (e = set_smem<GEMM_S2, 128>(limit, &must)) ||
      (e = set_smem<GEMM_S13, 64>(limit, &must)) || (e = set_smem<GEMM_S2, 64>(limit, &must)))
    return e;
  if (!ok[1] || !must) return cudaErrorInvalidConfiguration; /* under ~70 KB: not a supported GPU */
  int cfg = ok[0] ? 0 : 1;
  const char *env = getenv("LMOE_GEMM_CFG");
  if (env && atoi(env) == 1) cfg = 1;
  *gemm_cfg = cfg;
  return cudaSuccess;
}

extern "C" cudaError_t lmoe_k_fill_random(void *p, int32_t dtype, int64_t n, uint64_t seed, float lo,
                                          float hi, cudaStream_t s) {
  k_fill_random<<<grid_for(n, 256), 256, 0, s>>>(p, dtype, n, seed, lo, hi);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_fill(void *p, int32_t dtype, int64_t n, double v, cudaStream_t s) {
  k_fill<<<grid_for(n, 256), 256, 0, s>>>(p, dtype, n, v);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_set_slot(lmoe_dslot *table, int32_t slot, lmoe_dslot facts,
                                       cudaStream_t s) {
  k_set_slot<<<1, 1, 0, s>>>(table, slot, facts);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_meta_write(int32_t *dst, const lmoe_meta_param *m, cudaStream_t s) {
  k_meta_write<<<1, 256, 0, s>>>(dst, *m);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_route(const lmoe_fwd *f, cudaStream_t s) {
  k_route<<<(f->M + 7) / 8, 256, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_any(const lmoe_fwd *f, cudaStream_t s) {
  k_any<<<1, 1024, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_scan(const lmoe_fwd *f, cudaStream_t s) {
  k_scan<<<1, 1024, (size_t)f->E * sizeof(int), s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_scatter(const lmoe_fwd *f, cudaStream_t s) {
  k_scatter<<<grid_for((int64_t)f->M * f->k, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_shrink13(const lmoe_fwd *f, cudaStream_t s) {
  if (f->bm == 64)
    k_gemm<GEMM_S13, 64><<<f->mt_max, 256, gemm_smem<GEMM_S13, 64>(), s>>>(*f, 1);
  else
    k_gemm<GEMM_S13, 128><<<f->mt_max, 256, gemm_smem<GEMM_S13, 128>(), s>>>(*f, 1);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_shrink2(const lmoe_fwd *f, cudaStream_t s) {
  if (f->bm == 64)
    k_gemm<GEMM_S2, 64><<<f->mt_max, 256, gemm_smem<GEMM_S2, 64>(), s>>>(*f, 1);
  else
    k_gemm<GEMM_S2, 128><<<f->mt_max, 256, gemm_smem<GEMM_S2, 128>(), s>>>(*f, 1);
  return cudaGetLastError();
}

template <int MODE, int BN, int WM, int WN, int ST, int BM>
static cudaError_t launch_gemm(const lmoe_fwd *f, int lora, cudaStream_t s) {
  int ntn = MODE == MODE_GATEUP ? (f->I + BN / 2 - 1) / (BN / 2) : (f->H + BN - 1) / BN;
  k_gemm<MODE, BN, WM, WN, ST, BM><<<f->mt_max * ntn, 32 * WM * WN, gemm_smem<MODE, BN, WM, WN, ST, BM>(), s>>>(
      *f, lora);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_gateup(const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (f->bm == 64) return launch_gemm<MODE_GATEUP, 256, 2, 4, 4, 64>(f, lora, s);
  if (f->gemm_cfg == 1) return launch_gemm<MODE_GATEUP, 128, 2, 4, 4, 128>(f, lora, s);
  return launch_gemm<MODE_GATEUP, 256, 2, 4, 4, 128>(f, lora, s);
}

extern "C" cudaError_t lmoe_k_down(const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (f->bm == 64) return launch_gemm<MODE_DOWN, 256, 2, 4, 4, 64>(f, lora, s);
  if (f->gemm_cfg == 1) return launch_gemm<MODE_DOWN, 128, 2, 4, 4, 128>(f, lora, s);
  return launch_gemm<MODE_DOWN, 256, 2, 4, 4, 128>(f, lora, s);
}

extern "C" cudaError_t lmoe_k_reduce(const lmoe_fwd *f, cudaStream_t s) {
  int64_t n = (int64_t)f->M * ((f->H & 7) == 0 ? f->H / 8 : f->H);
  k_reduce<<<grid_for(n, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}
