/* Device helpers shared by the forward's kernels: bf16 conversions, the padding row's
   group and the grid of a grid-stride loop. */
#ifndef LMOE_COMMON_CUH
#define LMOE_COMMON_CUH

#include <cuda_bf16.h>
#include <stdint.h>

/* sorted_group of a padding row (scan writes it; the GEMMs skip it) */
#define PAD_GROUP 0x7fffffff

static __device__ __forceinline__ float bf2f(uint16_t v) {
  return __uint_as_float(((uint32_t)v) << 16);
}
static __device__ __forceinline__ uint16_t f2bf(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

/* Blocks of a grid-stride loop over n items, capped (the loop covers the rest). */
static inline int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  return (int)(b > 0 ? b : 1);
}

#endif
