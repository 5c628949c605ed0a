/* What the GPU benchmarks (bench_gpu.c, bench_shard.c) share: the presets of
   PERFORMANCE.md, exits on a failed call, a comma list of integers. */
#ifndef LMOE_BENCH_GPU_COMMON_H
#define LMOE_BENCH_GPU_COMMON_H

#include "loramoe.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(ctx, call)                                                                          \
  do {                                                                                         \
    lmoe_status st_ = (call);                                                                  \
    if (st_) {                                                                                 \
      fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call, lmoe_status_string(st_), \
              lmoe_context_last_error(ctx));                                                   \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)
#define CU(call)                                                                     \
  do {                                                                               \
    cudaError_t e_ = (call);                                                         \
    if (e_) {                                                                        \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

typedef struct preset {
  const char *name;
  int E, H, I, k;
} preset;

static const preset PRESETS[] = {{"qwen3-30b-a3b", 128, 2048, 768, 8}, {"mixtral-8x7b", 8, 4096, 14336, 2}};

/* "a,b,c" into out (at most max values); returns how many */
static inline int parse_ints(char *s, int *out, int max) {
  int n = 0;
  for (char *t = strtok(s, ","); t && n < max; t = strtok(NULL, ",")) out[n++] = atoi(t);
  return n;
}

#endif
