/* The deterministic top-k reduction of the routed-weighted expert outputs. */
#include "common.cuh"
#include "lmoe_kernels.h"

#include <cuda_runtime.h>
#include <stdint.h>

/* Deterministic reduction: out[t] = sum over j in order of y[t*k + j] (already weighted).
   A sharded layer's rank sums only its own pairs (ids in [e0, e0 + E)) and, with
   f.part, keeps the sum in float32 there for the sum over ranks (lmoe_k_sum_parts, or
   an NCCL all-reduce and then lmoe_k_sum_parts of one part). Only the columns [n0, n1)
   of f (all of H by default); a part holds just those, rows of n1 - n0. */
static __global__ void k_reduce(lmoe_fwd f, int vec) {
  int H = f.H, k = f.k, n0 = f.n0, w = lmoe_k_down_cols(&f);
  int per_row = w / vec;
  int64_t total = (int64_t)f.M * per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int t = (int)(i / per_row), c = n0 + (int)(i % per_row) * vec;
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < k; j++) {
      int id = f.ids[(size_t)t * k + j], e = id - f.e0;
      if (id < 0 || e < 0 || e >= f.E) continue;
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
    if (f.part) { /* the chunk's own region: rows of w */
      float *o = f.part + (size_t)t * w + (c - n0);
      if (vec == 8) {
        *(float4 *)o = make_float4(s[0], s[1], s[2], s[3]);
        *(float4 *)(o + 4) = make_float4(s[4], s[5], s[6], s[7]);
      } else {
        o[0] = s[0];
      }
      continue;
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

extern "C" cudaError_t lmoe_k_reduce(const lmoe_fwd *f, cudaStream_t s) {
  int32_t w = lmoe_k_down_cols(f);
  int vec = (f->H & 7) == 0 && (f->n0 & 7) == 0 && (w & 7) == 0 ? 8 : 1;
  int64_t n = (int64_t)f->M * (w / vec);
  if (n <= 0) return cudaSuccess;
  k_reduce<<<grid_for(n, 256), 256, 0, s>>>(*f, vec);
  return cudaGetLastError();
}

/* LoRA's t2 from the partials the sm90 gate_up wrote (lmoe_fwd.t2p): a block takes 64
   sorted rows, whose group's down rank and scale 64 of its threads look up first (one
   chain of dependent loads a block, not one a row), then every thread four columns of
   a row at a time: t2 = the slot's down scale times the sum of the planes in order (so
   the same bits every run), rounded once, zero from the rank to its LMOE_K_RANK_PAD
   multiple as the shrinks leave it. Rows without a group, or of a group without down,
   are not written (the expand never reads them). */
enum { T2F_ROWS = 64 };
static __global__ void __launch_bounds__(256) k_t2_finish(lmoe_fwd f) {
  if (!f.meta || f.meta[1] == 0) return; /* nothing active: gate_up wrote no partials */
  __shared__ int s_rk[T2F_ROWS];
  __shared__ float s_sd[T2F_ROWS];
  const int rows = f.ntiles[0] * f.bm, planes = lmoe_k_t2p_planes(f.I), ts = f.t2s;
  const int32_t *act = lmoe_k_meta_active(f.meta);
  const size_t plane = (size_t)f.h_rows * ts;
  for (int base = blockIdx.x * T2F_ROWS; base < rows; base += gridDim.x * T2F_ROWS) {
    if (threadIdx.x < T2F_ROWS) {
      const int p = base + threadIdx.x;
      int rk = 0;
      float sd = 0.0f;
      if (p < rows) {
        const int g = f.sorted_group[p];
        if (f.sorted_pair[p] >= 0 && g >= 1 && g != PAD_GROUP) {
          const lmoe_dslot ds = f.slots[act[g - 1]];
          rk = ds.r2;
          sd = ds.sd;
        }
      }
      s_rk[threadIdx.x] = rk;
      s_sd[threadIdx.x] = sd;
    }
    __syncthreads();
    /* four columns a thread (t2s is a multiple of LMOE_K_RANK_PAD), the planes read
       through the read-only path so the loads of several quads overlap */
    const int quads = ts / 4;
#pragma unroll 2
    for (int i = threadIdx.x; i < T2F_ROWS * quads; i += blockDim.x) {
      const int r = i / quads, c = 4 * (i - r * quads), rk = s_rk[r];
      if (rk <= 0 || c >= (rk + LMOE_K_RANK_PAD - 1) / LMOE_K_RANK_PAD * LMOE_K_RANK_PAD) continue;
      const size_t at = (size_t)(base + r) * ts + c;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (c < rk) {
#pragma unroll 4
        for (int q = 0; q < planes; q++) {
          const float4 u = __ldg((const float4 *)(f.t2p + q * plane + at));
          v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
        }
      }
      const float sd = s_sd[r];
      /* past the rank: zero (the planes hold zeros there, but a row's later columns
         were never written) */
      uint2 o;
      o.x = f2bf(c < rk ? sd * v.x : 0.0f) | ((uint32_t)f2bf(c + 1 < rk ? sd * v.y : 0.0f) << 16);
      o.y = f2bf(c + 2 < rk ? sd * v.z : 0.0f) | ((uint32_t)f2bf(c + 3 < rk ? sd * v.w : 0.0f) << 16);
      *(uint2 *)(f.t2 + at) = o;
    }
    __syncthreads();
  }
}

extern "C" cudaError_t lmoe_k_t2_finish(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->t2p || f->h_rows <= 0) return cudaSuccess;
  k_t2_finish<<<grid_for((int64_t)f->h_rows * 4, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}

/* Where element i of the parts goes in each out: the same place, or (a.cols > 0) row
   i / cols, column i % cols of rows ld apart. */
static __device__ __forceinline__ int64_t sum_out_at(const lmoe_k_sum &a, int64_t i) {
  return a.cols > 0 ? i / a.cols * a.ld + i % a.cols : i;
}

/* The sum over ranks of float32 partials on one device, in rank order, rounded once;
   four elements a thread where every pointer and the count allow it. */
static __global__ void k_sum_parts(lmoe_k_sum a, int vec) {
  int64_t n = a.count / vec;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t at = sum_out_at(a, i * vec);
    if (vec == 4) {
      float4 s = *(const float4 *)(a.part[0] + i * 4);
      for (int r = 1; r < a.n; r++) {
        float4 v = *(const float4 *)(a.part[r] + i * 4);
        s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
      }
      uint2 q;
      q.x = f2bf(s.x) | ((uint32_t)f2bf(s.y) << 16);
      q.y = f2bf(s.z) | ((uint32_t)f2bf(s.w) << 16);
      for (int o = 0; o < a.nout; o++) *(uint2 *)(a.out[o] + at) = q;
    } else {
      float s = a.part[0][i];
      for (int r = 1; r < a.n; r++) s += a.part[r][i];
      uint16_t b = f2bf(s);
      for (int o = 0; o < a.nout; o++) a.out[o][at] = b;
    }
  }
}

extern "C" cudaError_t lmoe_k_sum_parts(const lmoe_k_sum *a, cudaStream_t s) {
  if (a->count <= 0 || a->n < 1) return cudaSuccess;
  int vec = a->count % 4 == 0 && (a->cols <= 0 || (a->cols % 4 == 0 && a->ld % 4 == 0)) ? 4 : 1;
  for (int r = 0; r < a->n && vec == 4; r++)
    if ((uintptr_t)a->part[r] % 16) vec = 1;
  for (int o = 0; o < a->nout && vec == 4; o++)
    if ((uintptr_t)a->out[o] % 8) vec = 1;
  k_sum_parts<<<grid_for(a->count / vec, 256), 256, 0, s>>>(*a, vec);
  return cudaGetLastError();
}
