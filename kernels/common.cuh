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

/* silu(g) * u, the gate_up epilogue's activation. The division is the fast one (one
   reciprocal and a multiply, ~2 ulp): its result is rounded to bf16 (8 bits) next, and
   an IEEE division costs ~10 instructions a value in an epilogue the tensor cores wait
   for (gpu-notes 28). For g below about -87, 1 + e^-g is huge or infinite and the
   quotient is 0 (silu(g) is under 1e-36 there). */
static __device__ __forceinline__ float silu_mul(float g, float u) { return __fdividef(g, 1.0f + __expf(-g)) * u; }

/* Blocks of a grid-stride loop over n items, capped (the loop covers the rest). */
static inline int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  return (int)(b > 0 ? b : 1);
}

#endif
