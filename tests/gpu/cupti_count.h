/* The GPU tests' CUPTI counter of what would make the host wait on the device: every
   synchronisation, blocking copy, device-to-host (or unknown-direction) async copy and
   allocation the process makes through the runtime while `counting` is set. A test
   subscribes on_runtime (cuptiSubscribe, cuptiEnableDomain on the runtime API), zeroes
   the counts, sets counting around the calls it checks. Shared by test_gpu_sync.c and
   test_gpu_shard.c (on the simulated device, tests/sim/include/cupti.h). */
#ifndef LMOE_TEST_CUPTI_COUNT_H
#define LMOE_TEST_CUPTI_COUNT_H

#include <cupti.h>

static volatile int counting;
static int n_sync, n_d2h, n_blocking, n_alloc;

static void CUPTIAPI on_runtime(void *user, CUpti_CallbackDomain dom, CUpti_CallbackId id,
                                const void *data) {
  (void)user;
  const CUpti_CallbackData *d = data;
  if (dom != CUPTI_CB_DOMAIN_RUNTIME_API || d->callbackSite != CUPTI_API_ENTER || !counting) return;
  switch (id) {
  case CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_ptsz_v7000:
  case CUPTI_RUNTIME_TRACE_CBID_cudaDeviceSynchronize_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaEventSynchronize_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaStreamQuery_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaStreamQuery_ptsz_v7000:
    n_sync++;
    break;
  case CUPTI_RUNTIME_TRACE_CBID_cudaMemcpy_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaMemcpy2D_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaMemcpyFromSymbol_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaMemset_v3020:
    n_blocking++;
    break;
  case CUPTI_RUNTIME_TRACE_CBID_cudaMemcpyAsync_v3020: {
    const cudaMemcpyAsync_v3020_params *p = d->functionParams;
    if (p->kind == cudaMemcpyDeviceToHost || p->kind == cudaMemcpyDefault) n_d2h++;
    break;
  }
  case CUPTI_RUNTIME_TRACE_CBID_cudaMalloc_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaFree_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaHostAlloc_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaMallocHost_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaFreeHost_v3020:
  case CUPTI_RUNTIME_TRACE_CBID_cudaMallocAsync_v11020:
    n_alloc++;
    break;
  default:
    break;
  }
}

#endif
