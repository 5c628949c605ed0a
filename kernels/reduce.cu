/* The deterministic top-k reduction of the routed-weighted expert outputs. */
#include "common.cuh"
#include "lmoe_kernels.h"

#include <cuda_runtime.h>
#include <stdint.h>

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

extern "C" cudaError_t lmoe_k_reduce(const lmoe_fwd *f, cudaStream_t s) {
  int64_t n = (int64_t)f->M * ((f->H & 7) == 0 ? f->H / 8 : f->H);
  k_reduce<<<grid_for(n, 256), 256, 0, s>>>(*f);
  return cudaGetLastError();
}
