/* FP8 layers' activation quantization on the device (docs/design.md, "FP8 layers"):
   per row and 128-wide group of columns, dynamic, no host involvement.

     scale = amax / 448 in float32 (1 for an all-zero group)
     code  = e4m3(v / scale), v / scale an IEEE float division, rounded to nearest even
             and saturated to +-448 (computed by the scale's reciprocal and one
             correction, which gives the same codes: fp8_quot.h)

   the rule fp8.c applies to the weights' 128x128 blocks, here on rows of 128: a group
   is exactly one 128-byte K chunk of the FP8 engine, so one scale multiplies each
   chunk's partial sum. x (gate_up's input) and h (down's) stay in bf16 beside their
   codes: the LoRA shrinks read those, never the codes. */
#include "common.cuh"
#include "fp8_quot.h"
#include "gemm_engine.h"
#include "lmoe_kernels.h"

#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

namespace {

/* A 128-wide group's scale from its largest magnitude a (1 for an all-zero group), and
   four of its values' e4m3 codes under it, the first value's in the low byte (rc: the
   scale's reciprocal); the rule of this file's head, for both quantizers of x and h's. */
__device__ __forceinline__ float group_scale(float a) { return a > 0.0f ? __fdiv_rn(a, 448.0f) : 1.0f; }
__device__ __forceinline__ uint32_t codes4(const float (&v)[4], float s, float rc) {
  const bool exact = s < LMOE_FP8_QUOT_MIN_S; /* fp8_quot.h: the same codes at and above */
  float x[4];
#pragma unroll
  for (int i = 0; i < 4; i++) x[i] = exact ? __fdiv_rn(v[i], s) : lmoe_fp8_quot(v[i], s, rc);
  return (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(x[0], x[1]), __NV_SATFINITE, __NV_E4M3) |
         (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(x[2], x[3]), __NV_SATFINITE, __NV_E4M3) << 16;
}

/* One warp per row, its groups 8 at a time: lane l takes columns 4l..4l+3 of each
   group (cols is a multiple of 4, of 16 for FP8 layers, so a lane's 4 columns are all in
   or all out). The 8 groups' loads are issued together and their maxima reduced side by
   side, and the row's index needs no division: the kernel was a warp per (row, group)
   with one 8-byte load, a 64-bit division and a serial reduction each, and it ran at a
   third of the copy rate (docs/gpu-notes.md 35). src NULL: a padding row, zeros and scale
   0 (never read as a product: its outputs are not stored). The codes go to each of the
   nd rows dst[j] (scales at scale[j], a row's nb floats), so a token is quantized once
   for all its pairs. */
template <int ND>
__device__ __forceinline__ void quant_row(const uint16_t *src, int cols, int nb, uint8_t *const *dst,
                                          float *const *scale, int nd, int lane) {
  constexpr int GB = 8; /* groups a pass */
  for (int g0 = 0; g0 < nb; g0 += GB) {
    float v[GB][4], a[GB];
#pragma unroll
    for (int b = 0; b < GB; b++) {
      const int c = (g0 + b) * 128 + lane * 4;
      v[b][0] = v[b][1] = v[b][2] = v[b][3] = 0.0f;
      if (src && g0 + b < nb && c < cols) {
        uint2 w = *(const uint2 *)(src + c);
        v[b][0] = bf2f((uint16_t)(w.x & 0xffffu));
        v[b][1] = bf2f((uint16_t)(w.x >> 16));
        v[b][2] = bf2f((uint16_t)(w.y & 0xffffu));
        v[b][3] = bf2f((uint16_t)(w.y >> 16));
      }
      a[b] = fmaxf(fmaxf(fabsf(v[b][0]), fabsf(v[b][1])), fmaxf(fabsf(v[b][2]), fabsf(v[b][3])));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int b = 0; b < GB; b++) a[b] = fmaxf(a[b], __shfl_xor_sync(0xffffffffu, a[b], o));
    float mys = 0.0f; /* lane b < GB keeps group g0 + b's scale */
#pragma unroll
    for (int b = 0; b < GB; b++) {
      const int c = (g0 + b) * 128 + lane * 4;
      const float sc = !src ? 0.0f : group_scale(a[b]);
      if (lane == b) mys = sc;
      if (g0 + b < nb && c < cols) {
        const uint32_t q = !src ? 0u : codes4(v[b], sc, __frcp_rn(sc));
#pragma unroll
        for (int j = 0; j < ND; j++)
          if (j < nd && dst[j]) *(uint32_t *)(dst[j] + c) = q;
      }
    }
    if (lane < GB && g0 + lane < nb) {
#pragma unroll
      for (int j = 0; j < ND; j++)
        if (j < nd && dst[j]) scale[j][g0 + lane] = mys;
    }
  }
}

/* Where pairs j0 .. j0 + 7 of token t put x's codes and scales: their sorted rows of
   xq and xs (pair_row; NULL past top_k and for another rank's expert, -1) */
__device__ __forceinline__ void pair_rows(const int32_t *pair_row, int t, int k, int j0, int H, int nbh,
                                          uint8_t *xq, float *xs, uint8_t *(&dst)[8], float *(&sc)[8]) {
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int r = j0 + j < k ? pair_row[(size_t)t * k + j0 + j] : -1;
    dst[j] = r >= 0 ? xq + (size_t)r * H : nullptr;
    sc[j] = r >= 0 ? xs + (size_t)r * nbh : nullptr;
  }
}

/* x's tokens, a warp each, written to their pairs' sorted rows (pair_row; -1: another
   rank's expert, not written) */
__global__ void k_quant_x(const uint16_t *x, const int32_t *pair_row, int M, int k, int H, int nbh, uint8_t *xq,
                          float *xs) {
  const int lane = threadIdx.x & 31;
  const int nw = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < M; t += nw) {
    for (int j0 = 0; j0 < k; j0 += 8) { /* 8 pairs a pass (top_k may be up to 32) */
      uint8_t *dst[8];
      float *sc[8];
      pair_rows(pair_row, t, k, j0, H, nbh, xq, xs, dst, sc);
      quant_row<8>(x + (size_t)t * H, H, nbh, dst, sc, k - j0, lane);
    }
  }
}

/* x's tokens as k_quant_x, 16 columns a lane (H a multiple of 16, as an FP8 layer's
   is): a pass of a warp is four 128-column groups, eight lanes a group, so a lane loads
   32 bytes and stores its 16 codes as one 16-byte store to each pair's row, where
   k_quant_x's lanes stored 4 bytes (four times the store instructions for the 256 MB
   of codes qwen3 writes at M = 16384; docs/gpu-notes.md 46). Same scale and codes. */
__global__ void k_quant_x16(const uint16_t *x, const int32_t *pair_row, int M, int k, int H, int nbh, uint8_t *xq,
                            float *xs) {
  const int lane = threadIdx.x & 31;
  const int nw = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < M; t += nw) {
    const uint16_t *src = x + (size_t)t * H;
    for (int j0 = 0; j0 < k; j0 += 8) { /* 8 pairs a pass (top_k may be up to 32) */
      uint8_t *dst[8];
      float *sc[8];
      pair_rows(pair_row, t, k, j0, H, nbh, xq, xs, dst, sc);
      for (int c0 = 0; c0 < H; c0 += 512) {
        const int c = c0 + 16 * lane; /* group (c0 / 128) + lane / 8 */
        float v[4][4], a = 0.0f; /* this lane's 16 columns, four a code word */
        if (c < H) {
          const uint4 w0 = *(const uint4 *)(src + c), w1 = *(const uint4 *)(src + c + 8);
          const uint32_t w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
          for (int i = 0; i < 8; i++) {
            v[i / 2][2 * (i % 2)] = bf2f((uint16_t)(w[i] & 0xffffu));
            v[i / 2][2 * (i % 2) + 1] = bf2f((uint16_t)(w[i] >> 16));
          }
#pragma unroll
          for (int i = 0; i < 16; i++) a = fmaxf(a, fabsf(v[i / 4][i % 4]));
        } else {
#pragma unroll
          for (int i = 0; i < 16; i++) v[i / 4][i % 4] = 0.0f;
        }
#pragma unroll
        for (int o = 4; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        if (c >= H) continue; /* the shuffles above had every lane */
        const float s = group_scale(a), rc = __frcp_rn(s);
        const uint4 o = make_uint4(codes4(v[0], s, rc), codes4(v[1], s, rc), codes4(v[2], s, rc), codes4(v[3], s, rc));
        const int g = c / 128;
#pragma unroll
        for (int j = 0; j < 8; j++) {
          if (!dst[j]) continue;
          *(uint4 *)(dst[j] + c) = o;
          if ((lane & 7) == 0) sc[j][g] = s;
        }
      }
    }
  }
}

/* h's rows in use (ntiles x bm, sorted order), a warp each; a padding row (sorted_pair
   < 0) gets zeros: gate_up never wrote it */
__global__ void k_quant_h(const uint16_t *h, const int32_t *ntiles, const int32_t *sorted_pair, int bm, int I,
                          int nbi, uint8_t *hq, float *hsc) {
  const int lane = threadIdx.x & 31, hs = (I + 7) & ~7;
  const int rows = ntiles[0] * bm, nw = gridDim.x * (blockDim.x / 32);
  for (int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += nw) {
    uint8_t *dst = hq + (size_t)r * I;
    float *sc = hsc + (size_t)r * nbi;
    quant_row<1>(sorted_pair[r] >= 0 ? h + (size_t)r * hs : nullptr, I, nbi, &dst, &sc, 1, lane);
  }
}

} /* namespace */

extern "C" cudaError_t lmoe_k_quant_x(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->fp8 || f->M <= 0) return cudaSuccess;
  if (!f->pair_row) return cudaErrorInvalidValue;
  /* LMOE_FP8_QUANT_X16=0 (for measuring): the 4-columns-a-lane kernel */
  static int wide = -1;
  if (wide < 0) {
    const char *e = getenv("LMOE_FP8_QUANT_X16");
    wide = !e || atoi(e) != 0;
  }
  if (wide && f->H % 16 == 0 && (uintptr_t)f->x % 16 == 0 && (uintptr_t)f->xq % 16 == 0) {
    k_quant_x16<<<grid_for((int64_t)f->M * 32, 256), 256, 0, s>>>(f->x, f->pair_row, f->M, f->k, f->H, f->nbh, f->xq,
                                                                  f->xs);
    return cudaGetLastError();
  }
  k_quant_x<<<grid_for((int64_t)f->M * 32, 256), 256, 0, s>>>(f->x, f->pair_row, f->M, f->k, f->H, f->nbh, f->xq, f->xs);
  return cudaGetLastError();
}

extern "C" int lmoe_k_quant_h_needed(const lmoe_fwd *f) { return f->fp8 && !lmoe_fp8_fuses_quant_h(); }

extern "C" cudaError_t lmoe_k_quant_h(const lmoe_fwd *f, cudaStream_t s) {
  if (!f->fp8 || f->M <= 0) return cudaSuccess;
  /* the grid for the most rows the tile list may hold; the loop reads the real count */
  k_quant_h<<<grid_for((int64_t)f->mt_max * f->bm * 32, 256), 256, 0, s>>>(f->h, f->ntiles, f->sorted_pair, f->bm, f->I, f->nbi, f->hq,
                                                      f->hsc);
  return cudaGetLastError();
}
