/* Device helpers shared by the forward's kernels: bf16 conversions, the padding row's
   group and the grid of a grid-stride loop. */
#ifndef LMOE_COMMON_CUH
#define LMOE_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

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

/* Programmatic dependent launch (lmoe_fwd.pdl; docs/design.md, "Launch overlap"): a
   forward's kernels after the routing are launched with programmatic stream
   serialization, so a kernel's blocks may be scheduled while its predecessor's last
   blocks still run. Each such kernel calls pdl_wait() first, by every thread, before it
   reads or writes anything: it waits until the predecessor grid has completed and its
   writes are visible (so the chain stays ordered: no kernel completes before its
   predecessor), then lets its own successor's blocks be scheduled. Launched without the
   attribute, both instructions return at once; before sm_90 they are left out. */
static __device__ __forceinline__ void pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* Launches kernel k on s, with programmatic stream serialization when pdl is set (k
   must then begin with pdl_wait()). */
template <typename... P, typename... A>
static cudaError_t launch_k(int pdl, void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                            A &&...args) {
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, k, std::forward<A>(args)...);
}

/* Blocks of a grid-stride loop over n items, capped (the loop covers the rest). */
static inline int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  return (int)(b > 0 ? b : 1);
}

#endif
