/* FP8 layers' activation quantization on the device (docs/design.md, "FP8 layers"):
   per row and 128-wide group of columns, dynamic, no host involvement.

     scale = amax / 448 in float32 (1 for an all-zero group)
     code  = e4m3(v / scale), v / scale an IEEE float division, rounded to nearest even
             and saturated to +-448

   the rule fp8.c applies to the weights' 128x128 blocks, here on rows of 128: a group
   is exactly one 128-byte K chunk of the FP8 engine, so one scale multiplies each
   chunk's partial sum. x (gate_up's input) and h (down's) stay in bf16 beside their
   codes: the LoRA shrinks read those, never the codes. */
#include "common.cuh"
#include "lmoe_kernels.h"

#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

/* One warp per (row, group): lane l takes columns 4l..4l+3 of the group. cols is a
   multiple of 4 (of 16 for FP8 layers), so a lane's 4 columns are all in or all out.
   src NULL: a padding row, zeros and scale 0 (never read as a product: its outputs are
   not stored). The codes go to each of the nd rows dst[j] (scale[j]), so a token is
   quantized once for all its pairs. */
template <int ND>
__device__ __forceinline__ void quant_group(const uint16_t *src, int cols, int g, uint8_t *const *dst,
                                            float *const *scale, int nd, int lane) {
  const int c = g * 128 + lane * 4;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (src && c < cols) {
    uint2 w = *(const uint2 *)(src + c);
    v[0] = bf2f((uint16_t)(w.x & 0xffffu));
    v[1] = bf2f((uint16_t)(w.x >> 16));
    v[2] = bf2f((uint16_t)(w.y & 0xffffu));
    v[3] = bf2f((uint16_t)(w.y >> 16));
  }
  float a = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  const float s = !src ? 0.0f : a > 0.0f ? __fdiv_rn(a, 448.0f) : 1.0f;
  if (c < cols) {
    uint32_t q = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint32_t b = src ? (uint32_t)__nv_cvt_float_to_fp8(__fdiv_rn(v[i], s), __NV_SATFINITE, __NV_E4M3) : 0u;
      q |= b << (8 * i);
    }
#pragma unroll
    for (int j = 0; j < ND; j++)
      if (j < nd && dst[j]) *(uint32_t *)(dst[j] + c) = q;
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < ND; j++)
      if (j < nd && dst[j]) *scale[j] = s;
  }
}

/* x's tokens, each written to its pairs' sorted rows (pair_row; -1: another rank's
   expert, not written) */
__global__ void k_quant_x(const uint16_t *x, const int32_t *pair_row, int M, int k, int H, int nbh, uint8_t *xq,
                          float *xs) {
  const int lane = threadIdx.x & 31;
  const int64_t nw = (int64_t)gridDim.x * (blockDim.x / 32), total = (int64_t)M * nbh;
  for (int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; w < total; w += nw) {
    const int64_t t = w / nbh;
    const int g = (int)(w - t * nbh);
    for (int j0 = 0; j0 < k; j0 += 8) { /* 8 pairs a pass (top_k may be up to 32) */
      uint8_t *dst[8];
      float *sc[8];
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const int r = j0 + j < k ? pair_row[t * k + j0 + j] : -1;
        dst[j] = r >= 0 ? xq + (size_t)r * H : nullptr;
        sc[j] = r >= 0 ? xs + (size_t)r * nbh + g : nullptr;
      }
      quant_group<8>(x + t * H, H, g, dst, sc, k - j0, lane);
    }
  }
}

/* h's rows in use (ntiles x bm, sorted order); a padding row (sorted_pair < 0) gets
   zeros: gate_up never wrote it */
__global__ void k_quant_h(const uint16_t *h, const int32_t *ntiles, const int32_t *sorted_pair, int bm, int I,
                          int nbi, uint8_t *hq, float *hsc) {
  const int lane = threadIdx.x & 31, hs = (I + 7) & ~7;
  const int64_t rows = (int64_t)ntiles[0] * bm;
  const int64_t nw = (int64_t)gridDim.x * (blockDim.x / 32), total = rows * nbi;
  for (int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; w < total; w += nw) {
    const int64_t r = w / nbi;
    const int g = (int)(w - r * nbi);
    uint8_t *dst = hq + r * I;
    float *sc = hsc + r * nbi + g;
    quant_group<1>(sorted_pair[r] >= 0 ? h + r * hs : nullptr, I, g, &dst, &sc, 1, lane);
  }
}

} /* namespace */

extern "C" cudaError_t lmoe_k_quant_x(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->fp8 || f->M <= 0) return cudaSuccess;
  const int64_t warps = (int64_t)f->M * f->nbh;
  if (!f->pair_row) return cudaErrorInvalidValue;
  k_quant_x<<<grid_for(warps * 32, 256), 256, 0, s>>>(f->x, f->pair_row, f->M, f->k, f->H, f->nbh, f->xq, f->xs);
  return cudaGetLastError();
}

extern "C" cudaError_t lmoe_k_quant_h(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->fp8 || f->M <= 0) return cudaSuccess;
  /* the grid for the most rows the tile list may hold; the loop reads the real count */
  const int64_t warps = (int64_t)f->mt_max * f->bm * f->nbi;
  k_quant_h<<<grid_for(warps * 32, 256), 256, 0, s>>>(f->h, f->ntiles, f->sorted_pair, f->bm, f->I, f->nbi, f->hq,
                                                      f->hsc);
  return cudaGetLastError();
}
