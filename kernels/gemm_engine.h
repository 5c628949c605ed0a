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

#ifdef __cplusplus
}
#endif
#endif
