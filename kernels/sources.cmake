# CUDA sources of the library, added to the loramoe targets by native/CMakeLists.txt.
set(LMOE_CUDA_SOURCES
  ${PROJECT_SOURCE_DIR}/native/src/backend_cuda.c
  ${PROJECT_SOURCE_DIR}/kernels/layout.c
  ${PROJECT_SOURCE_DIR}/kernels/moe.cu
)
