/* The part of CUPTI's callback API that tests/gpu/test_gpu_sync.c uses, served by the
   simulated device (tests/sim/simcuda.c): a subscriber's callback is called on entry to
   each simulated runtime function that has an id below, with its parameters where the
   test reads them. Not NVIDIA's CUPTI. */
#ifndef LMOE_SIM_CUPTI_H
#define LMOE_SIM_CUPTI_H

#include "cuda_runtime_api.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CUPTIAPI

typedef enum { CUPTI_SUCCESS = 0, CUPTI_ERROR_INVALID_PARAMETER = 1 } CUptiResult;
typedef enum { CUPTI_CB_DOMAIN_INVALID = 0, CUPTI_CB_DOMAIN_RUNTIME_API = 2 } CUpti_CallbackDomain;
typedef enum { CUPTI_API_ENTER = 0, CUPTI_API_EXIT = 1 } CUpti_ApiCallbackSite;
typedef unsigned int CUpti_CallbackId;

enum {
  CUPTI_RUNTIME_TRACE_CBID_cudaMalloc_v3020 = 20,
  CUPTI_RUNTIME_TRACE_CBID_cudaMallocHost_v3020 = 21,
  CUPTI_RUNTIME_TRACE_CBID_cudaFree_v3020 = 22,
  CUPTI_RUNTIME_TRACE_CBID_cudaFreeHost_v3020 = 23,
  CUPTI_RUNTIME_TRACE_CBID_cudaHostAlloc_v3020 = 24,
  CUPTI_RUNTIME_TRACE_CBID_cudaMallocAsync_v11020 = 25,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemcpy_v3020 = 31,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemcpy2D_v3020 = 32,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemcpyFromSymbol_v3020 = 33,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemcpyAsync_v3020 = 41,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemset_v3020 = 51,
  CUPTI_RUNTIME_TRACE_CBID_cudaMemsetAsync_v3020 = 52,
  CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_v3020 = 61,
  CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_ptsz_v7000 = 62,
  CUPTI_RUNTIME_TRACE_CBID_cudaStreamQuery_v3020 = 63,
  CUPTI_RUNTIME_TRACE_CBID_cudaStreamQuery_ptsz_v7000 = 64,
  CUPTI_RUNTIME_TRACE_CBID_cudaDeviceSynchronize_v3020 = 65,
  CUPTI_RUNTIME_TRACE_CBID_cudaEventSynchronize_v3020 = 66,
  CUPTI_RUNTIME_TRACE_CBID_cudaEventQuery_v3020 = 67,
  CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 = 70
};

typedef struct CUpti_CallbackData {
  CUpti_ApiCallbackSite callbackSite;
  const char *functionName;
  const void *functionParams;
} CUpti_CallbackData;

typedef struct cudaMemcpyAsync_v3020_params {
  void *dst;
  const void *src;
  size_t count;
  enum cudaMemcpyKind kind;
  cudaStream_t stream;
} cudaMemcpyAsync_v3020_params;

typedef void(CUPTIAPI *CUpti_CallbackFunc)(void *user, CUpti_CallbackDomain domain, CUpti_CallbackId id,
                                           const void *data);
typedef struct sim_subscriber *CUpti_SubscriberHandle;

CUptiResult cuptiSubscribe(CUpti_SubscriberHandle *sub, CUpti_CallbackFunc fn, void *user);
CUptiResult cuptiEnableDomain(unsigned int enable, CUpti_SubscriberHandle sub, CUpti_CallbackDomain domain);
CUptiResult cuptiUnsubscribe(CUpti_SubscriberHandle sub);

#ifdef __cplusplus
}
#endif
#endif
