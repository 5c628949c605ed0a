# CUDA sources of the library, added to the loramoe targets by native/CMakeLists.txt.
# layout.c, plan.c and gemm_config.c are plain host arithmetic, shared with the
# simulated device of the tests (tests/sim/CMakeLists.txt).
set(LMOE_CUDA_SOURCES
  ${PROJECT_SOURCE_DIR}/native/src/backend_cuda.c
  ${PROJECT_SOURCE_DIR}/kernels/layout.c
  ${PROJECT_SOURCE_DIR}/kernels/plan.c
  ${PROJECT_SOURCE_DIR}/kernels/gemm_config.c
  ${PROJECT_SOURCE_DIR}/kernels/gemm.c
  ${PROJECT_SOURCE_DIR}/kernels/fill.cu
  ${PROJECT_SOURCE_DIR}/kernels/route.cu
  ${PROJECT_SOURCE_DIR}/kernels/reduce.cu
  ${PROJECT_SOURCE_DIR}/kernels/gemm_sm80.cu
  ${PROJECT_SOURCE_DIR}/kernels/gemm_sm90.cu
  ${PROJECT_SOURCE_DIR}/kernels/gemm_sm90_fp8.cu
  ${PROJECT_SOURCE_DIR}/kernels/quant.cu
)
