/* Backend selection: the table of the backends this build has, in the order
   LMOE_BACKEND_AUTO prefers them, and the library-wide device queries. The only file
   that knows which backends exist; the rest of the core asks a backend's table
   (lmoe_backend_ops) what it can do. */
#include "internal.h"

#include <string.h>

static const lmoe_backend_ops *(*const backends[])(void) = {
#ifdef LMOE_HAVE_CUDA
    lmoe_cuda_backend,
#endif
    lmoe_cpu_backend,
};
enum { NUM_BACKENDS = sizeof backends / sizeof backends[0] };

static const lmoe_backend_ops *find(int32_t kind) {
  for (int i = 0; i < NUM_BACKENDS; i++)
    if (backends[i]()->kind == kind) return backends[i]();
  return NULL;
}

/* A backend with devices serves a context on `device` only when that device exists. */
static bool available(const lmoe_backend_ops *ops, int32_t device) {
  return !ops->device_count || ops->device_count() > device;
}

const lmoe_backend_ops *lmoe_backend_select(int32_t backend, int32_t device, lmoe_status *st,
                                            const char **why) {
  *st = LMOE_OK;
  *why = NULL;
  if (backend == LMOE_BACKEND_AUTO) {
    for (int i = 0; i < NUM_BACKENDS; i++)
      if (available(backends[i](), device)) return backends[i]();
  } else {
    const lmoe_backend_ops *ops = find(backend);
    if (ops) return ops; /* a missing device is the backend's to report, from init */
    if (backend == LMOE_BACKEND_CUDA) {
      *st = LMOE_ERR_UNSUPPORTED;
      *why = "this build of loramoe has no CUDA backend (built without nvcc)";
      return NULL;
    }
  }
  *st = LMOE_ERR_INVALID_ARGUMENT;
  *why = "backend must be auto, cpu or cuda";
  return NULL;
}

/* The device queries of the public API are about the CUDA backend's devices. */
int32_t lmoe_has_cuda(void) { return find(LMOE_BACKEND_CUDA) != NULL; }

lmoe_status lmoe_device_count(int32_t *out) {
  if (!out) return LMOE_ERR_INVALID_ARGUMENT;
  const lmoe_backend_ops *ops = find(LMOE_BACKEND_CUDA);
  *out = ops && ops->device_count ? ops->device_count() : 0;
  return LMOE_OK;
}

lmoe_status lmoe_device_get_info(int32_t device, lmoe_device_info *out) {
  if (!out) return LMOE_ERR_INVALID_ARGUMENT;
  memset(out, 0, sizeof *out);
  out->struct_size = sizeof *out;
  const lmoe_backend_ops *ops = find(LMOE_BACKEND_CUDA);
  if (!ops || !ops->device_info) return LMOE_ERR_UNSUPPORTED;
  return ops->device_info(device, out);
}
