/* The GEMM engines behind the launchers of the GEMM stages (gemm.c dispatches on
   lmoe_fwd.engine). An engine owns the kernels of its rows of the table (gemm_config.h):
   it sets them up on a device and runs one of the four products with one of its rows. */
#ifndef LMOE_GEMM_ENGINE_H
#define LMOE_GEMM_ENGINE_H

#include "lmoe_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The products: a LMOE_GEMM_EXPERT row runs the first two, a LMOE_GEMM_SHRINK row the
   last two. */
enum { LMOE_OP_GATEUP = 0, LMOE_OP_DOWN = 1, LMOE_OP_SHRINK13 = 2, LMOE_OP_SHRINK2 = 3 };

/* The mma.sync engine (gemm_sm80.cu). init: the shared-memory limit of the kernels of
   each of its rows that fits in smem_limit bytes (the current device's). run: enqueues
   op with the table's row cfg on s. */
cudaError_t lmoe_sm80_init(int32_t smem_limit);
cudaError_t lmoe_sm80_run(int32_t op, int32_t cfg, const lmoe_fwd *f, int lora, cudaStream_t s);

/* The wgmma engine (gemm_sm90.cu), gate_up and down only. init: *available = 1 when
   its kernels can run on the current device (cc 9.0, sm_90a code in the binary, the
   driver's TMA encoder, the register pool its warp specialisation needs). */
cudaError_t lmoe_sm90_init(int32_t cc, int32_t smem_limit, int32_t *available);
cudaError_t lmoe_sm90_run(int32_t op, int32_t cfg, const lmoe_fwd *f, int lora, cudaStream_t s);

/* A dense C[M, N] = A[M, K] B[N, K]^T (bf16, row-major) through the engine's down
   kernel with the table's row cfg, for measuring the engine against cuBLAS; ws holds
   lmoe_sm90_dense_ws(M) bytes of device memory. K and N multiples of 8. */
size_t lmoe_sm90_dense_ws(int64_t M);
cudaError_t lmoe_sm90_dense(int32_t cfg, int32_t M, int32_t N, int32_t K, const uint16_t *a, const uint16_t *b,
                            uint16_t *c, void *ws, cudaStream_t s);

/* The FP8 engine (gemm_sm90_fp8.cu): an FP8 layer's gate_up and down on e4m3 wgmma
   with the block scales applied per 128-wide K chunk, the LoRA expand in bf16 after
   them. init: *available = 1 when its kernels can run on the current device (cc 9.0,
   sm_90a code, the TMA encoder, its shared memory). run: op with the row tile f->bm. */
cudaError_t lmoe_fp8_init(int32_t cc, int32_t smem_limit, int32_t *available);
cudaError_t lmoe_fp8_run(int32_t op, const lmoe_fwd *f, int lora, cudaStream_t s);
/* Whether the FP8 gate_up writes h's codes and scales itself (its 256-column tiles hold
   one 128-wide group of h a row; the default; LMOE_FP8_FUSE_H=0 not), so lmoe_k_quant_h has nothing to do
   and h's bf16 values are written only where LoRA's shrink2 reads them. */
int lmoe_fp8_fuses_quant_h(void);

/* A dense C[M, N] = (A[M, K] B[N, K]^T) in bf16 through the FP8 down kernel, for tests
   and measurements: a e4m3 [M, K] with float32 scales as [M, ceil(K/128)] (a row's
   128-wide groups), b e4m3 [N, K] with scales bs [ceil(N/128), ceil(K/128)] (128x128
   blocks); ws holds lmoe_sm90_dense_ws(M) bytes. K and N multiples of 16. */
cudaError_t lmoe_fp8_dense(int32_t M, int32_t N, int32_t K, const uint8_t *a, const float *as, const uint8_t *b,
                           const float *bs, uint16_t *c, void *ws, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
