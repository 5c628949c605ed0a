/* Fills and small writes: random and constant fills of buffers (the host generator's
   stream, bit for bit), the pool's slot table entries and batch metadata sent as
   kernel parameters. */
#include "common.cuh"
#include "lmoe_kernels.h"

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

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
    case 5: /* f8_e4m3: nearest even, saturating (convert.c's lmoe_f64_to_f8e4m3) */
      ((uint8_t *)p)[i] = (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
      break;
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
    case 5: ((uint8_t *)p)[i] = (uint8_t)__nv_cvt_double_to_fp8(v, __NV_SATFINITE, __NV_E4M3); break;
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

