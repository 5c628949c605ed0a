/* The FP8 activations' quotient v / scale by the scale's reciprocal (kernels/quant.cu,
   and the FP8 gate_up's epilogue where it quantizes h): plain C, so a host test checks
   it against the IEEE division it replaces (tests/test_fp8.c).

   q0 = RN(v r) with r = RN(1 / s), then one correction by the exact remainder,
   q = RN(q0 + RN(v - q0 s) r) (Markstein): the correctly rounded v / s wherever the
   remainder does not underflow. Where it does, |v| < 2^-100, the quotient is below
   2^-10 for every scale of at least 2^-90 and rounds to a signed e4m3 zero either way
   (a zero keeps v's sign); so for s >= LMOE_FP8_QUOT_MIN_S the e4m3 code equals that of
   the IEEE quotient, and callers divide exactly below it. Three instructions a value
   instead of the division's ~10 and its branch. */
#ifndef LMOE_FP8_QUOT_H
#define LMOE_FP8_QUOT_H

#include <math.h>

#define LMOE_FP8_QUOT_MIN_S 0x1p-90f

#if defined(__CUDACC__)
#define LMOE_FP8_QUOT_FN static __host__ __device__ __forceinline__
#else
#define LMOE_FP8_QUOT_FN static inline
#endif

/* v / s for s >= LMOE_FP8_QUOT_MIN_S (finite), r = RN(1 / s): equal to the IEEE quotient
   or, both below 2^-10 in magnitude, of its sign */
LMOE_FP8_QUOT_FN float lmoe_fp8_quot(float v, float s, float r) {
#ifdef __CUDA_ARCH__
  const float q0 = __fmul_rn(v, r); /* not contracted into the fma below */
  const float q = __fmaf_rn(__fmaf_rn(-q0, s, v), r, q0);
#else
  volatile float q0v = v * r; /* a separate rounding, whatever the compiler contracts */
  const float q0 = q0v;
  const float q = fmaf(fmaf(-q0, s, v), r, q0);
#endif
  return q0 == 0.0f ? q0 : q;
}

#endif
