/* Host side of the sm90 engines' tensor maps (gemm_sm90.cu, gemm_sm90_fp8.cu): the
   driver's encoder, looked up once, and the maps both engines build the same way. */
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

typedef CUresult (*lmoe_tma_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                       const cuuint64_t *, const cuuint32_t *, const cuuint32_t *,
                                       CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                       CUtensorMapFloatOOBfill);

/* cuTensorMapEncodeTiled through the runtime's entry-point query (no link against the
   driver library); NULL where the driver has none (the engine then reports itself
   unavailable and the sm80 engine serves). */
static inline lmoe_tma_encode_fn lmoe_tma_encoder(void) {
  static lmoe_tma_encode_fn fn_cached;
  if (!fn_cached) {
    cudaDriverEntryPointQueryResult q;
    void *fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) ||
        q != cudaDriverEntryPointSuccess || !fn) {
      (void)cudaGetLastError();
      return nullptr;
    }
    fn_cached = (lmoe_tma_encode_fn)fn;
  }
  return fn_cached;
}

/* The LoRA expand's maps: bf16, boxes of 16 columns (32 bytes, the 32-byte swizzle) by
   box_rows rows, outside the tensor reading zero. t (t13 or t2, [rows][cols]) is
   2-D; the pool's B13 or B2 ([planes][rows][cols], a plane a slot, plane_elems apart)
   is 3-D whatever the number of slots, since the kernels load it with 3-D
   coordinates (a 2-D map under a 3-D load is an illegal instruction). */
static inline cudaError_t lmoe_tma_map_lora_t(CUtensorMap *m, const void *base, uint64_t rows, uint64_t cols,
                                              uint32_t box_rows) {
  lmoe_tma_encode_fn enc = lmoe_tma_encoder();
  cuuint64_t dims[2] = {cols, rows}, strides[1] = {cols * 2};
  cuuint32_t box[2] = {16, box_rows}, es[2] = {1, 1};
  if (!enc) return cudaErrorNotSupported;
  CUresult r = enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)base, dims, strides, box, es,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

static inline cudaError_t lmoe_tma_map_lora_pool(CUtensorMap *m, const void *base, uint64_t planes, uint64_t rows,
                                                 uint64_t cols, uint64_t plane_elems, uint32_t box_rows) {
  lmoe_tma_encode_fn enc = lmoe_tma_encoder();
  cuuint64_t dims[3] = {cols, rows, planes}, strides[2] = {cols * 2, plane_elems * 2};
  cuuint32_t box[3] = {16, box_rows, 1}, es[3] = {1, 1, 1};
  if (!enc) return cudaErrorNotSupported;
  CUresult r = enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void *)base, dims, strides, box, es,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

/* Both engines' expand maps for one launch: t's (rows of the workspace's t13 or t2)
   and the pool's B (gate_up: B13, E * 2I rows of 2R columns; down: B2, E * H rows of R
   columns), with box rows bm (t) and bn_rows (B). */
template <bool GATEUP, typename F>
static inline cudaError_t lmoe_tma_maps_expand(const F *f, uint32_t bm, uint32_t bn_rows, CUtensorMap *mt,
                                               CUtensorMap *mp) {
  const uint64_t rows = (uint64_t)f->mt_max * bm, slots = (uint64_t)f->gstride - 1;
  cudaError_t e = GATEUP ? lmoe_tma_map_lora_t(mt, f->t13, rows, (uint64_t)f->t13s, bm)
                         : lmoe_tma_map_lora_t(mt, f->t2, rows, (uint64_t)f->t2s, bm);
  if (e) return e;
  return GATEUP ? lmoe_tma_map_lora_pool(mp, f->pool + f->off_b13, slots, (uint64_t)f->E * 2 * f->I,
                                         2 * (uint64_t)f->R, f->slot_elems, bn_rows)
                : lmoe_tma_map_lora_pool(mp, f->pool + f->off_b2, slots, (uint64_t)f->E * f->H, (uint64_t)f->R,
                                         f->slot_elems, bn_rows);
}
