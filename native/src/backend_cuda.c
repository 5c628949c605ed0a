/* cuda backend: device memory, copies, fills and the stream-ordered forward.

   The forward only enqueues: no host wait (except the device_sync guard's one, on
   purpose), no blocking copy, no device-to-host read, no allocation. Batch metadata
   reaches the batch's one device buffer once per batch version, by work enqueued in
   stream order: small batches as a kernel parameter (copied at launch, so nothing on
   the host can race it), large ones copied from a ring of pinned staging places that
   lmoe_batch_set fills in turn (it waits, counted as backpressure, only when the place
   it needs is still read by a copy: the host is a whole ring ahead of the device).
   The upload is enqueued by the forward, or, once a graph reads the batch, by
   lmoe_batch_set itself on the context's stream: a replay reads the device buffer
   (the graph holds its address, never a staging place), so it computes whatever the
   sets enqueued before it left there (docs/design.md, "The CUDA backend"). */
#include "internal.h"
#include "lmoe_kernels.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cuda_ctx {
  cudaStream_t stream;
  int own_stream;
  int32_t *any_host; /* pinned: the device_sync guard's flag */
  lmoe_gemm_device gemm_dev; /* what the GEMM selector knows of this device */
  int32_t fp8;               /* the FP8 engine runs here (lmoe_k_fp8_init) */
  /* Batches whose metadata the capture in progress (lmoe_graph_begin) reads, each
     retained; lmoe_graph_end hands them to the graph, whose launches upload them. */
  lmoe_batch **cap;
  int32_t ncap, cap_size;
  /* lmoe_forward_group of ranks on one device: orders the ranks' streams around the
     group's stream (group_forward) */
  cudaEvent_t order_ev;
  /* A layer sharded over NCCL sums its ranks by column chunks (lmoe_k_shard_chunks):
     each chunk's all-reduce and rounding run on the side stream after chunk_ev[c] (its
     reduce done), while the forward's stream computes the next chunk; join_ev, after
     the last rounding, orders the forward's stream after them all. The chunks and
     stream of the forward last enqueued: */
  cudaStream_t side;
  cudaEvent_t chunk_ev[LMOE_K_CHUNKS_MAX], join_ev;
  int32_t nchunks, bounds[LMOE_K_CHUNKS_MAX + 1];
  cudaStream_t chunk_stream;
} cuda_ctx;

static void destroy_side(cuda_ctx *c) {
  if (c->side) cudaStreamSynchronize(c->side), cudaStreamDestroy(c->side);
  for (int i = 0; i < LMOE_K_CHUNKS_MAX; i++)
    if (c->chunk_ev[i]) cudaEventDestroy(c->chunk_ev[i]);
  if (c->join_ev) cudaEventDestroy(c->join_ev);
}

_Static_assert((int)LMOE_DEVICE_GROUP_MAX <= (int)LMOE_K_SUM_MAX, "one sum kernel reads every rank of a one-device group");

typedef struct cuda_pool {
  lmoe_dslot *table;     /* [num_slots] */
  lmoe_k_pool_plan plan; /* the pool's part of every forward's plan (fixed with the pool) */
} cuda_pool;

/* The batch's encoding (batch.c, batch_meta.h) is what the kernels read, word for word:
   staging copies it, it is never re-encoded. The kernels' header spells the layout
   out on its own; these keep the two in step. */
_Static_assert(sizeof(((lmoe_meta_param *)0)->v) ==
                   LMOE_META_WORDS(LMOE_META_MAX_REQ_PARAM, LMOE_META_MAX_ACTIVE_PARAM) * sizeof(int32_t),
               "lmoe_meta_param holds the largest encoding sent as a kernel parameter");

/* One place of a batch's staging ring: page-locked memory lmoe_batch_set writes one
   version's encoding into, and the event recorded after the last copy out of it. A
   copy reads pinned memory when it runs, not when it is enqueued, so the place may be
   written again only once that event has completed. */
typedef struct ring_place {
  int32_t *host;
  size_t cap;   /* words */
  cudaEvent_t ev;
  int recorded; /* ev has been recorded (a copy out of this place was enqueued) */
} ring_place;

typedef struct cuda_batch {
  size_t ints;          /* words of the encoding of the current version */
  int32_t *dev;         /* what forwards and replays read; fixed once a graph reads it */
  size_t dev_cap;       /* words */
  uint64_t dev_version; /* the version the writes enqueued so far leave in dev (0: none) */
  /* The stream of the last work enqueued that reads or writes dev, and, when that is
     not the context's stream, an event recorded after it there (the stream may be
     gone by the next use; the event stays valid). Work on another stream first waits
     for it on the device, so all of a batch's uploads and readers are in one order. */
  void *last_stream;
  cudaEvent_t order_ev;
  int captured;         /* a graph reads dev: every set uploads at once, on the context's stream */
  ring_place *ring;     /* [depth] */
  int32_t depth;
  int32_t cur;          /* the place holding the current version; -1: it goes as a kernel parameter */
  int32_t next;         /* the place the next staged version takes */
} cuda_batch;

/* A graph instance and the batches its replays read (each retained: they live as long
   as the graph; each launch uploads those whose device copy is behind). */
typedef struct cuda_graph {
  cudaGraphExec_t exec;
  lmoe_batch **batches;
  int32_t n;
} cuda_graph;

static lmoe_status cuda_err(lmoe_context *ctx, cudaError_t e, const char *what) {
  lmoe_status st = e == cudaErrorMemoryAllocation ? LMOE_ERR_OUT_OF_MEMORY : LMOE_ERR_BACKEND;
  return lmoe_fail(ctx, st, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/* ---------------------------------------------------------------- devices */

static int32_t cu_device_count(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* no driver or no device: not an error for a CPU user */
    return 0;
  }
  return n;
}

static lmoe_status cu_device_info(int32_t device, lmoe_device_info *out) {
  int n = cu_device_count();
  if (device < 0 || device >= n) return n ? LMOE_ERR_INVALID_ARGUMENT : LMOE_ERR_NOT_FOUND;
  struct cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return LMOE_ERR_BACKEND;
  }
  snprintf(out->name, sizeof out->name, "%s", p.name);
  out->cc_major = p.major;
  out->cc_minor = p.minor;
  out->sm_count = p.multiProcessorCount;
  out->memory_bytes = (int64_t)p.totalGlobalMem;
  out->l2_bytes = p.l2CacheSize;
  return LMOE_OK;
}

/* ---------------------------------------------------------------- context */

static int kernels_ready[64];
static lmoe_gemm_device kernels_dev[64];
static int32_t kernels_fp8[64];

static lmoe_status cu_init(lmoe_context *ctx) {
  int n = cu_device_count();
  if (n == 0)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "no CUDA device is available (driver missing or no GPU)");
  if (ctx->device >= n)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "CUDA device %d does not exist (%d present)",
                     (int)ctx->device, n);
  cudaError_t e = cudaSetDevice(ctx->device);
  if (e) return cuda_err(ctx, e, "cudaSetDevice");
  cuda_ctx *c = calloc(1, sizeof *c);
  if (!c) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (ctx->device >= 64 || !kernels_ready[ctx->device]) {
    lmoe_gemm_device dev;
    int32_t fp8 = 0;
    e = lmoe_k_init(&dev);
    if (!e) e = lmoe_k_fp8_init(&fp8);
    if (e) {
      free(c);
      return cuda_err(ctx, e, "setting up the kernels for this device");
    }
    if (ctx->device < 64) {
      kernels_dev[ctx->device] = dev;
      kernels_fp8[ctx->device] = fp8;
      kernels_ready[ctx->device] = 1;
    }
    c->gemm_dev = dev;
    c->fp8 = fp8;
  } else {
    c->gemm_dev = kernels_dev[ctx->device];
    c->fp8 = kernels_fp8[ctx->device];
  }
  e = cudaEventCreateWithFlags(&c->order_ev, cudaEventDisableTiming);
  if (e) {
    free(c);
    return cuda_err(ctx, e, "cudaEventCreate");
  }
  e = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
  for (int i = 0; i < LMOE_K_CHUNKS_MAX && !e; i++)
    e = cudaEventCreateWithFlags(&c->chunk_ev[i], cudaEventDisableTiming);
  if (!e) e = cudaEventCreateWithFlags(&c->join_ev, cudaEventDisableTiming);
  if (e) {
    destroy_side(c);
    cudaEventDestroy(c->order_ev);
    free(c);
    return cuda_err(ctx, e, "creating the side stream of sharded layers");
  }
  e = cudaHostAlloc((void **)&c->any_host, sizeof(int32_t), cudaHostAllocDefault);
  if (e) {
    destroy_side(c);
    cudaEventDestroy(c->order_ev);
    free(c);
    return cuda_err(ctx, e, "cudaHostAlloc");
  }
  if (ctx->stream) {
    c->stream = (cudaStream_t)ctx->stream;
  } else {
    e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e) {
      cudaFreeHost(c->any_host);
      destroy_side(c);
      cudaEventDestroy(c->order_ev);
      free(c);
      return cuda_err(ctx, e, "cudaStreamCreate");
    }
    c->own_stream = 1;
    ctx->stream = c->stream;
  }
  ctx->be = c;
  return LMOE_OK;
}

static void cu_fini(lmoe_context *ctx) {
  cuda_ctx *c = ctx->be;
  if (!c) return;
  cudaSetDevice(ctx->device);
  if (c->own_stream) {
    cudaStreamSynchronize(c->stream);
    cudaStreamDestroy(c->stream);
  }
  cudaFreeHost(c->any_host);
  destroy_side(c);
  cudaEventDestroy(c->order_ev);
  free(c->cap); /* a capture never ended: its batches' references are not given back */
  cudaGetLastError(); /* at process exit the runtime may be gone: nothing to report */
  free(c);
  ctx->be = NULL;
}

static lmoe_status cu_alloc(lmoe_context *ctx, int32_t memory, size_t bytes, void **out) {
  *out = NULL;
  if (memory == LMOE_MEMORY_HOST) {
    *out = malloc(bytes ? bytes : 1);
    if (!*out) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes of host memory", bytes);
    return LMOE_OK;
  }
  if (bytes == 0) bytes = 256;
  if (ctx->allocator.alloc) {
    *out = ctx->allocator.alloc(ctx->allocator.user, bytes);
    if (!*out)
      return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY,
                       "the allocator hook could not allocate %zu bytes of device memory", bytes);
    return LMOE_OK;
  }
  cudaSetDevice(ctx->device);
  cudaError_t e = cudaMalloc(out, bytes);
  if (e) {
    cudaGetLastError();
    *out = NULL;
    return lmoe_fail(ctx, e == cudaErrorMemoryAllocation ? LMOE_ERR_OUT_OF_MEMORY : LMOE_ERR_BACKEND,
                     "could not allocate %zu bytes of device memory: %s", bytes, cudaGetErrorString(e));
  }
  return LMOE_OK;
}

/* Device memory may still be read by enqueued work (any stream, graphs too): wait for
   the device before handing it back. Frees happen outside forwards. */
static void cu_free(lmoe_context *ctx, int32_t memory, void *p) {
  if (!p) return;
  if (memory == LMOE_MEMORY_HOST) {
    free(p);
    return;
  }
  cudaSetDevice(ctx->device);
  cudaDeviceSynchronize();
  ctx->counters.host_waits++;
  if (ctx->allocator.free)
    ctx->allocator.free(ctx->allocator.user, p);
  else
    cudaFree(p);
  cudaGetLastError();
}

static lmoe_status cu_copy(lmoe_context *ctx, void *dst, int32_t dst_mem, const void *src,
                           int32_t src_mem, size_t bytes, void *stream, int blocking) {
  if (!bytes) return LMOE_OK;
  if (dst_mem == LMOE_MEMORY_HOST && src_mem == LMOE_MEMORY_HOST) {
    memmove(dst, src, bytes);
    return LMOE_OK;
  }
  cudaStream_t s = (cudaStream_t)(stream ? stream : ctx->stream);
  /* the direction as the memory kinds say (what profilers and the tests count) */
  enum cudaMemcpyKind kind = dst_mem == LMOE_MEMORY_HOST   ? cudaMemcpyDeviceToHost
                             : src_mem == LMOE_MEMORY_HOST ? cudaMemcpyHostToDevice
                                                           : cudaMemcpyDeviceToDevice;
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, s);
  if (!e && blocking) e = cudaStreamSynchronize(s);
  if (e) return cuda_err(ctx, e, "cudaMemcpyAsync");
  return LMOE_OK;
}

/* Staged uploads (upload.c): page-locked staging, and events that tell the host when a
   copy out of it has run. */
static lmoe_status cu_pinned_alloc(lmoe_context *ctx, size_t bytes, void **out) {
  cudaSetDevice(ctx->device);
  cudaError_t e = cudaHostAlloc(out, bytes, cudaHostAllocDefault);
  if (e) {
    *out = NULL;
    return cuda_err(ctx, e, "cudaHostAlloc (upload staging)");
  }
  return LMOE_OK;
}

static void cu_pinned_free(lmoe_context *ctx, void *p) {
  (void)ctx;
  if (p) cudaFreeHost(p);
  cudaGetLastError();
}

static lmoe_status cu_event_create(lmoe_context *ctx, void **ev) {
  cudaEvent_t e_ = NULL;
  cudaError_t e = cudaEventCreateWithFlags(&e_, cudaEventDisableTiming);
  *ev = e ? NULL : (void *)e_;
  return e ? cuda_err(ctx, e, "cudaEventCreate") : LMOE_OK;
}

static void cu_event_destroy(lmoe_context *ctx, void *ev) {
  (void)ctx;
  if (ev) cudaEventDestroy((cudaEvent_t)ev);
  cudaGetLastError();
}

static lmoe_status cu_event_record(lmoe_context *ctx, void *ev, void *stream) {
  cudaError_t e = cudaEventRecord((cudaEvent_t)ev, (cudaStream_t)(stream ? stream : ctx->stream));
  return e ? cuda_err(ctx, e, "cudaEventRecord") : LMOE_OK;
}

static lmoe_status cu_event_wait(lmoe_context *ctx, void *ev, bool *waited) {
  *waited = false;
  cudaError_t e = cudaEventQuery((cudaEvent_t)ev);
  if (e == cudaErrorNotReady) {
    *waited = true;
    e = cudaEventSynchronize((cudaEvent_t)ev);
  }
  return e ? cuda_err(ctx, e, "waiting for an upload") : LMOE_OK;
}

static lmoe_status cu_sync(lmoe_context *ctx, void *stream) {
  cudaError_t e = cudaStreamSynchronize((cudaStream_t)(stream ? stream : ctx->stream));
  if (e) return cuda_err(ctx, e, "cudaStreamSynchronize");
  return LMOE_OK;
}

static lmoe_status cu_fill_random(lmoe_context *ctx, lmoe_buffer *b, uint64_t seed, float lo,
                                  float hi, void *stream) {
  if (b->memory == LMOE_MEMORY_HOST) { /* host buffer: the same generator on the host */
    lmoe_status st = cu_sync(ctx, ctx->stream);
    ctx->counters.host_waits++;
    if (st) return st;
    float span = hi - lo;
    for (int64_t i = 0; i < b->numel; i++) {
      float prod = span * lmoe_uniform(seed, (uint64_t)i);
      lmoe_store_elem(b->data, b->dtype, i, (double)(lo + prod));
    }
    return LMOE_OK;
  }
  cudaError_t e = lmoe_k_fill_random(b->data, b->dtype, b->numel, seed, lo, hi, (cudaStream_t)stream);
  ctx->counters.launches++;
  return e ? cuda_err(ctx, e, "fill_random launch") : LMOE_OK;
}

static lmoe_status cu_fill(lmoe_context *ctx, lmoe_buffer *b, double v, void *stream) {
  if (b->memory == LMOE_MEMORY_HOST) {
    lmoe_status st = cu_sync(ctx, ctx->stream);
    ctx->counters.host_waits++;
    if (st) return st;
    for (int64_t i = 0; i < b->numel; i++) lmoe_store_elem(b->data, b->dtype, i, v);
    return LMOE_OK;
  }
  cudaError_t e = lmoe_k_fill(b->data, b->dtype, b->numel, v, (cudaStream_t)stream);
  ctx->counters.launches++;
  return e ? cuda_err(ctx, e, "fill launch") : LMOE_OK;
}

/* A layer with a communicator keeps its rank's float32 partial output [M, H] in the
   workspace after lmoe_k_layout's regions (docs/design.md, "Sharding"). */
static size_t part_bytes(const lmoe_layer_config *cfg) {
  return cfg->comm ? ((size_t)cfg->max_tokens * (size_t)cfg->hidden * sizeof(float) + 255) / 256 * 256 : 0;
}

/* cfg is the layer's local config (its rank's shapes). */
static size_t cu_workspace_bytes(const lmoe_context *ctx, const lmoe_layer_config *cfg,
                                 const lmoe_pool_config *pc) {
  (void)ctx;
  lmoe_ws_layout L;
  lmoe_k_layout_fp8(cfg->max_tokens, cfg->num_experts, cfg->hidden, cfg->intermediate, cfg->top_k,
                    pc ? pc->num_slots : 0, pc ? pc->max_rank : 0, cfg->weight_dtype == LMOE_DTYPE_F8_E4M3, &L);
  return L.total + part_bytes(cfg);
}

/* The batch's active adapters' gate_up (down: r2) ranks, each rounded up to 8, summed:
   the columns a row tile's shrink takes at most (the plan's hint for fusing it into
   gate_up, down). */
static int32_t active_cols(const lmoe_pool *pool, const int32_t *meta, bool down) {
  const int32_t n = lmoe_meta_active_count(meta), *act = lmoe_meta_active(meta);
  int64_t cols = 0;
  for (int32_t i = 0; i < n; i++)
    if (act[i] >= 0 && act[i] < pool->cfg.num_slots)
      cols += ((down ? pool->slots[act[i]].r2 : pool->slots[act[i]].r13) + 7) / 8 * 8;
  return cols > INT32_MAX ? INT32_MAX : (int32_t)cols;
}

/* Where a forward of this plan keeps its partial: after the layout lmoe_k_plan carved
   for the same layer and pool. */
static float *part_of(const lmoe_context *ctx, const lmoe_forward_plan *plan) {
  const lmoe_layer_config *c = &plan->layer->local;
  const lmoe_pool *pool = plan->pool;
  lmoe_ws_layout L;
  lmoe_k_layout_fp8(c->max_tokens, c->num_experts, c->hidden, c->intermediate, c->top_k,
                    pool ? pool->cfg.num_slots : 0, pool ? pool->cfg.max_rank : 0,
                    c->weight_dtype == LMOE_DTYPE_F8_E4M3, &L);
  return (float *)((uint8_t *)ctx->workspace + L.total);
}

/* FP8 layers run on the FP8 engine (kernels/gemm_sm90_fp8.cu): e4m3 wgmma, so a Hopper
   GPU and sm_90a code in this build; its TMA reads the codes' rows (16-byte pitch) and
   its 16-byte copies the quantized activations' rows. */
static lmoe_status cu_fp8_check(lmoe_context *ctx, const lmoe_layer_config *cfg) {
  cuda_ctx *c = ctx->be;
  if (!c->fp8) {
    lmoe_device_info di;
    memset(&di, 0, sizeof di);
    cu_device_info(ctx->device, &di);
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "weight_dtype f8_e4m3 on the cuda backend needs the FP8 expert GEMMs (e4m3 wgmma): a Hopper "
                     "GPU (compute capability 9.0) and a build with sm_90a code (CMAKE_CUDA_ARCHITECTURES "
                     "including 90a); device %d (%s) is cc %d.%d%s. The cpu backend computes FP8 layers",
                     (int)ctx->device, di.name, (int)di.cc_major, (int)di.cc_minor,
#ifdef LMOE_SM90A
                     ""
#else
                     " and this build has no sm_90a code"
#endif
    );
  }
  if (cfg->hidden % 16 || cfg->intermediate % 16)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "weight_dtype f8_e4m3 on the cuda backend needs hidden and intermediate multiples of 16 "
                     "(the FP8 engine's TMA rows), got %d and %d",
                     (int)cfg->hidden, (int)cfg->intermediate);
  return LMOE_OK;
}

/* ---------------------------------------------------------------- pools */

static lmoe_status cu_pool_init(lmoe_context *ctx, lmoe_pool *pool) {
  cuda_pool *cp = calloc(1, sizeof *cp);
  if (!cp) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  size_t bytes = (size_t)pool->cfg.num_slots * sizeof(lmoe_dslot);
  lmoe_status st = cu_alloc(ctx, LMOE_MEMORY_DEVICE, bytes, (void **)&cp->table);
  if (st) {
    free(cp);
    return st;
  }
  cudaError_t e = cudaMemsetAsync(cp->table, 0, bytes, (cudaStream_t)ctx->stream);
  if (!e) e = cudaMemsetAsync(pool->storage, 0, pool->slot_bytes * (size_t)pool->cfg.num_slots,
                              (cudaStream_t)ctx->stream);
  if (e) {
    cu_free(ctx, LMOE_MEMORY_DEVICE, cp->table);
    free(cp);
    return cuda_err(ctx, e, "cudaMemsetAsync");
  }
  const lmoe_layer_config *lc = &pool->layer->local; /* a shard's slots hold its cut */
  lmoe_k_plan_pool(lc->hidden, lc->intermediate, pool->cfg.num_slots, pool->cfg.max_rank, pool->storage,
                   pool->slot_bytes, pool->off_a13, pool->off_b13, pool->off_a2, pool->off_b2, cp->table,
                   &cp->plan);
  pool->be = cp;
  return LMOE_OK;
}

static void cu_pool_fini(lmoe_context *ctx, lmoe_pool *pool) {
  cuda_pool *cp = pool->be;
  if (!cp) return;
  cu_free(ctx, LMOE_MEMORY_DEVICE, cp->table);
  free(cp);
  pool->be = NULL;
}

/* The slot's facts reach the device table as kernel parameters: stream-ordered after
   work already enqueued, with nothing on the host to race. */
static lmoe_status cu_slot_changed(lmoe_context *ctx, lmoe_pool *pool, int32_t slot) {
  cuda_pool *cp = pool->be;
  const lmoe_slot *s = &pool->slots[slot];
  lmoe_dslot d;
  memset(&d, 0, sizeof d);
  if (s->loaded) {
    d.r13 = s->g_hi > s->u_hi ? s->g_hi : s->u_hi;
    d.r2 = s->r2;
    d.g_lo = s->g_lo;
    d.g_hi = s->g_hi;
    d.u_lo = s->u_lo;
    d.u_hi = s->u_hi;
    d.sg = s->scale_gate;
    d.su = s->scale_up;
    d.sd = s->scale_down;
  }
  cudaError_t e = lmoe_k_set_slot(cp->table, slot, d, (cudaStream_t)ctx->stream);
  ctx->counters.launches++;
  return e ? cuda_err(ctx, e, "slot table update") : LMOE_OK;
}

/* ---------------------------------------------------------------- batches */

static bool meta_by_param(const int32_t *meta) {
  return lmoe_meta_requests(meta) <= LMOE_META_MAX_REQ_PARAM &&
         lmoe_meta_active_count(meta) <= LMOE_META_MAX_ACTIVE_PARAM;
}

/* Waits (counted) until the event's last record has completed; backpressure or forced. */
static lmoe_status wait_recorded(lmoe_context *ctx, cudaEvent_t ev, bool backpressure, const char *what) {
  cudaError_t e = cudaEventQuery(ev);
  if (e == cudaErrorNotReady) {
    lmoe_count_wait(ctx, backpressure);
    e = cudaEventSynchronize(ev);
  }
  return e ? cuda_err(ctx, e, what) : LMOE_OK;
}

static cuda_batch *batch_state(lmoe_context *ctx, lmoe_batch *b, lmoe_status *st) {
  cuda_batch *cb = b->be;
  *st = LMOE_OK;
  if (cb) return cb;
  int32_t depth = b->depth >= 1 ? b->depth : 1;
  cb = calloc(1, sizeof *cb);
  ring_place *ring = calloc((size_t)depth, sizeof *ring);
  if (!cb || !ring) {
    free(cb), free(ring);
    *st = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    return NULL;
  }
  cudaError_t e = cudaEventCreateWithFlags(&cb->order_ev, cudaEventDisableTiming);
  for (int32_t i = 0; i < depth && !e; i++) e = cudaEventCreateWithFlags(&ring[i].ev, cudaEventDisableTiming);
  if (e) {
    for (int32_t i = 0; i < depth; i++)
      if (ring[i].ev) cudaEventDestroy(ring[i].ev);
    if (cb->order_ev) cudaEventDestroy(cb->order_ev);
    free(cb), free(ring);
    *st = cuda_err(ctx, e, "cudaEventCreate");
    return NULL;
  }
  cb->ring = ring;
  cb->depth = depth;
  cb->cur = -1;
  b->be = cb;
  return cb;
}

/* Orders the batch's work on stream s after all of it enqueued so far elsewhere: a
   device-side wait, no host wait. Not under capture (the forward checks instead). */
static lmoe_status order_on(lmoe_context *ctx, cuda_batch *cb, cudaStream_t s) {
  cudaError_t e = cudaSuccess;
  if (cb->last_stream && cb->last_stream != (void *)s) {
    if (cb->last_stream == ctx->stream) e = cudaEventRecord(cb->order_ev, (cudaStream_t)ctx->stream);
    if (!e) e = cudaStreamWaitEvent(s, cb->order_ev, 0);
  }
  if (e) return cuda_err(ctx, e, "ordering the batch's streams");
  cb->last_stream = (void *)s;
  return LMOE_OK;
}

/* After work that reads dev was enqueued on s: remember it for the next stream. */
static lmoe_status used_on(lmoe_context *ctx, cuda_batch *cb, cudaStream_t s) {
  if ((void *)s == ctx->stream) return LMOE_OK; /* recorded when another stream needs it */
  cudaError_t e = cudaEventRecord(cb->order_ev, s);
  return e ? cuda_err(ctx, e, "cudaEventRecord (batch order)") : LMOE_OK;
}

/* Enqueues on s, after the batch's earlier work, the upload of its current version
   into dev, unless the uploads already enqueued leave it there. Never waits. */
static lmoe_status upload_meta(lmoe_context *ctx, const lmoe_batch *b, cudaStream_t s) {
  cuda_batch *cb = b->be;
  lmoe_status st = order_on(ctx, cb, s);
  if (st || cb->dev_version == b->version) return st;
  size_t bytes = cb->ints * sizeof(int32_t);
  cudaError_t e;
  if (cb->cur < 0) {
    lmoe_meta_param mp;
    mp.count = (int32_t)cb->ints;
    memcpy(mp.v, b->meta, bytes);
    e = lmoe_k_meta_write(cb->dev, &mp, s);
    ctx->counters.launches++;
  } else {
    ring_place *p = &cb->ring[cb->cur];
    e = cudaMemcpyAsync(cb->dev, p->host, bytes, cudaMemcpyHostToDevice, s);
    if (!e) e = cudaEventRecord(p->ev, s);
    if (!e) p->recorded = 1;
  }
  if (e) return cuda_err(ctx, e, "metadata upload");
  cb->dev_version = b->version;
  ctx->counters.uploads++;
  ctx->counters.bytes_uploaded += bytes;
  return LMOE_OK;
}

/* At the end of lmoe_batch_set: room in dev; a large encoding written into the next
   place of the ring (waiting, as backpressure, only while a copy out of that place is
   still queued); a batch a graph reads uploaded at once on the context's stream. */
static lmoe_status cu_batch_stage(lmoe_context *ctx, lmoe_batch *b) {
  lmoe_status st;
  cuda_batch *cb = batch_state(ctx, b, &st);
  if (!cb) return st;
  int32_t n = lmoe_meta_requests(b->meta), A = lmoe_meta_active_count(b->meta);
  size_t ints = lmoe_meta_words(b->meta);
  if (ints != lmoe_meta_ints(n, A))
    return lmoe_fail(ctx, LMOE_ERR_STATE, "internal: the batch encoding and the kernels' layout differ");
  if (ints > cb->dev_cap) {
    if (cb->captured)
      return lmoe_fail(ctx, LMOE_ERR_STATE,
                       "this batch was captured in a graph with room for %zu metadata words; "
                       "%d requests need %zu (make a new batch, or capture it larger)",
                       cb->dev_cap, (int)n, ints);
    size_t cap = ints * 2 < 64 ? 64 : ints * 2;
    int32_t *d = NULL;
    st = cu_alloc(ctx, LMOE_MEMORY_DEVICE, cap * sizeof(int32_t), (void **)&d);
    if (st) return st;
    if (cb->dev) cu_free(ctx, LMOE_MEMORY_DEVICE, cb->dev); /* waits for readers (forced) */
    cb->dev = d;
    cb->dev_cap = cap;
    cb->dev_version = 0;
  }
  int32_t cur = -1;
  if (!meta_by_param(b->meta)) {
    cur = cb->next;
    ring_place *p = &cb->ring[cur];
    if (p->recorded) {
      st = wait_recorded(ctx, p->ev, true, "waiting for a staging place of the batch");
      if (st) return st;
    }
    if (p->cap < ints) {
      size_t cap = ints * 2 < 64 ? 64 : ints * 2;
      int32_t *h = NULL;
      cudaError_t e = cudaHostAlloc((void **)&h, cap * sizeof(int32_t), cudaHostAllocDefault);
      if (e) return cuda_err(ctx, e, "cudaHostAlloc (batch staging)");
      if (p->host) cudaFreeHost(p->host); /* no copy reads it: its event completed */
      p->host = h;
      p->cap = cap;
    }
    memcpy(p->host, b->meta, ints * sizeof(int32_t));
    cb->next = (cur + 1) % cb->depth;
  }
  cb->cur = cur;
  cb->ints = ints;
  /* dev_version no longer names this content: the version bumped before staging */
  if (cb->captured) return upload_meta(ctx, b, (cudaStream_t)ctx->stream);
  return LMOE_OK;
}

static void cu_batch_fini(lmoe_context *ctx, lmoe_batch *b) {
  cuda_batch *cb = b->be;
  if (!cb) return;
  if (cb->dev) cu_free(ctx, LMOE_MEMORY_DEVICE, cb->dev); /* waits for the device */
  for (int32_t i = 0; i < cb->depth; i++) {
    if (cb->ring[i].host) cudaFreeHost(cb->ring[i].host);
    cudaEventDestroy(cb->ring[i].ev);
  }
  cudaEventDestroy(cb->order_ev);
  cudaGetLastError();
  free(cb->ring);
  free(cb);
  b->be = NULL;
}

/* Adds b to the batches the capture in progress reads (retained once). */
static lmoe_status note_captured(lmoe_context *ctx, lmoe_batch *b) {
  cuda_ctx *cc = ctx->be;
  for (int32_t i = 0; i < cc->ncap; i++)
    if (cc->cap[i] == b) return LMOE_OK;
  if (cc->ncap == cc->cap_size) {
    int32_t n = cc->cap_size ? 2 * cc->cap_size : 8;
    lmoe_batch **c = realloc(cc->cap, (size_t)n * sizeof *c);
    if (!c) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    cc->cap = c;
    cc->cap_size = n;
  }
  lmoe_object_retain(&b->obj);
  cc->cap[cc->ncap++] = b;
  return LMOE_OK;
}

static void drop_captured(lmoe_context *ctx) {
  cuda_ctx *cc = ctx->be;
  for (int32_t i = 0; i < cc->ncap; i++) lmoe_object_release(&cc->cap[i]->obj);
  cc->ncap = 0;
}

/* A forward captured on s reads dev as the replays find it. The graph holds no upload:
   lmoe_graph_launch uploads a batch whose device copy is behind, and every later set
   of the batch uploads at once. A capture made with cudaStreamBeginCapture has no
   launch of ours, so the device copy must already hold this version in s's order. */
static lmoe_status capture_meta(lmoe_context *ctx, lmoe_batch *b, cudaStream_t s) {
  cuda_batch *cb = b->be;
  bool ours = ctx->capturing && ctx->capture_stream == (void *)s;
  if (!ours && (cb->last_stream != (void *)s || cb->dev_version != b->version))
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "this batch's metadata is not on the device in the captured stream's order: "
                     "before capturing with cudaStreamBeginCapture, run one eager forward of the "
                     "batch as it is set now on that stream (lmoe_graph_begin needs none)");
  cb->captured = 1;
  return ours ? note_captured(ctx, b) : LMOE_OK;
}

/* ---------------------------------------------------------------- forward */

#define LAUNCH(call, lora_work)                                       \
  do {                                                                \
    cudaError_t e_ = (call);                                          \
    ctx->counters.launches++;                                         \
    if (lora_work) ctx->counters.lora_launches++;                     \
    if (e_) return cuda_err(ctx, e_, "kernel launch (" #call ")");    \
  } while (0)

/* Makes the context's device the calling thread's current one (lmoe_forward_group
   drives ranks on several devices from one thread). */
static lmoe_status use_device(lmoe_context *ctx) {
  int cur = -1;
  cudaError_t e = cudaGetDevice(&cur);
  if (!e && cur != ctx->device) e = cudaSetDevice(ctx->device);
  return e ? cuda_err(ctx, e, "cudaSetDevice") : LMOE_OK;
}

/* A sharded layer's float32 partial, summed (nothing to add: one rank, or after the
   all-reduce), rounded once into out: columns [c0, c1) of H, whose partial is the
   region of rows c1 - c0 at part + M c0 (the whole of it, rows of H, for 0 and H). */
static lmoe_status round_part(lmoe_context *ctx, const lmoe_forward_plan *plan, int32_t c0, int32_t c1,
                              cudaStream_t s) {
  int32_t H = plan->layer->cfg.hidden;
  lmoe_k_sum a;
  memset(&a, 0, sizeof a);
  a.part[0] = part_of(ctx, plan) + (size_t)plan->M * (size_t)c0;
  a.out[0] = (uint16_t *)plan->out->data + c0;
  a.n = a.nout = 1;
  a.count = plan->M * (c1 - c0);
  if (c1 - c0 < H) a.cols = c1 - c0, a.ld = H;
  LAUNCH(lmoe_k_sum_parts(&a, s), 0);
  return LMOE_OK;
}

/* Chunk c of a sharded layer's sum over NCCL, after its forward (cu_forward) enqueued
   the chunks' reduces: phase 0 its all-reduce (inside the caller's NCCL group, if any),
   phase 1 its rounding into out. One chunk runs on the forward's stream; several on the
   side stream, chunk c's after its reduce, the forward's stream joined after the last
   rounding (device-side waits; in a capture they fork and join the graph). */
static lmoe_status cu_shard_chunk(lmoe_context *ctx, const lmoe_forward_plan *plan, int32_t c, int32_t phase,
                                  void *stream) {
  cuda_ctx *cc = ctx->be;
  cudaStream_t s = (cudaStream_t)stream;
  if (plan->M == 0) return LMOE_OK;
  if (c < 0 || c >= cc->nchunks || s != cc->chunk_stream)
    return lmoe_fail(ctx, LMOE_ERR_STATE, "internal: chunk %d of a forward that enqueued %d on another stream",
                     (int)c, (int)cc->nchunks);
  const lmoe_comm *comm = plan->layer->comm;
  int32_t c0 = cc->bounds[c], c1 = cc->bounds[c + 1];
  cudaStream_t on = cc->nchunks > 1 ? cc->side : s;
  lmoe_status st = use_device(ctx);
  if (st) return st;
  cudaError_t e = cudaSuccess;
  if (phase == 0) {
    if (on != s && (e = cudaStreamWaitEvent(on, cc->chunk_ev[c], 0)))
      return cuda_err(ctx, e, "ordering a chunk's all-reduce after its reduce");
#ifdef LMOE_HAVE_NCCL
    return lmoe_comm_nccl_allreduce_f32((lmoe_comm *)comm, part_of(ctx, plan) + (size_t)plan->M * (size_t)c0,
                                        (size_t)plan->M * (size_t)(c1 - c0), on);
#else
    (void)comm;
    return lmoe_fail(ctx, LMOE_ERR_STATE, "internal: an NCCL communicator in a build without NCCL");
#endif
  }
  st = round_part(ctx, plan, c0, c1, on);
  if (st || on == s || c + 1 < cc->nchunks) return st;
  e = cudaEventRecord(cc->join_ev, on);
  if (!e) e = cudaStreamWaitEvent(s, cc->join_ev, 0);
  return e ? cuda_err(ctx, e, "joining the chunks' sums") : LMOE_OK;
}

static int32_t cu_shard_chunks(lmoe_context *ctx) { return ((cuda_ctx *)ctx->be)->nchunks; }

/* A sharded layer (one with a communicator, docs/design.md "Sharding") computes its
   rank's part with the local shapes: routing over all of the layer's experts, only its
   experts' pairs (EP) or its slice of I (TP), the top-k sum kept in float32 in the
   workspace. Then, stream-ordered: over NCCL the in-place all-reduce of that partial
   and its rounding into out (unless lmoe_forward_group finishes it); a one-device group
   of one rank rounds it; a larger one-device group leaves it to group_forward. */
static lmoe_status cu_forward(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream) {
  cudaStream_t s = (cudaStream_t)stream;
  const lmoe_layer *l = plan->layer;
  const lmoe_layer_config *c = &l->local;
  const lmoe_comm *comm = l->comm;
  const lmoe_batch *b = plan->batch;
  lmoe_pool *pool = plan->pool;
  int64_t M = plan->M;
  if (M == 0) return LMOE_OK;
  if (!b->be) return lmoe_fail(ctx, LMOE_ERR_STATE, "the batch has no staged metadata (call lmoe_batch_set)");
  if (comm && !comm->nccl && !comm->group)
    return lmoe_fail(ctx, LMOE_ERR_STATE, "internal: the layer's communicator has neither NCCL nor a group");
  if (comm && comm->group && comm->size > 1 && !plan->shard_defer)
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "the layer is rank %d of %d ranks on one device: their forwards run together, through "
                     "lmoe_forward_group",
                     (int)comm->rank, (int)comm->size);
  if (comm && comm->nccl) { /* lmoe_forward_group may drive ranks on several devices */
    lmoe_status st = use_device(ctx);
    if (st) return st;
  }

  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(s, &cap);
  if (e) return cuda_err(ctx, e, "cudaStreamIsCapturing");
  int capturing = cap == cudaStreamCaptureStatusActive;
  if (capturing && plan->guard == LMOE_GUARD_DEVICE_SYNC)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "the device_sync guard waits for the device and cannot be captured in a graph");

  bool lora_possible = pool && (plan->guard == LMOE_GUARD_DEVICE_SYNC || plan->run_lora);
  lmoe_k_plan_args pa = {
      .max_tokens = c->max_tokens,
      .E = c->num_experts,
      .H = c->hidden,
      .I = c->intermediate,
      .k = c->top_k,
      .renorm = c->renormalize,
      .w13 = l->w13->data,
      .w2 = l->w2->data,
      .fp8 = l->w13s != NULL,
      .w13s = l->w13s ? l->w13s->data : NULL,
      .w2s = l->w2s ? l->w2s->data : NULL,
      .pool = pool ? &((cuda_pool *)pool->be)->plan : NULL,
      .lora = lora_possible,
      .groups = plan->meta ? lmoe_meta_active_count(plan->meta) : 0,
      .cols13 = pool && plan->meta ? active_cols(pool, plan->meta, false) : 0,
      .cols2 = pool && plan->meta ? active_cols(pool, plan->meta, true) : 0,
      .M = M,
      .x = plan->x->data,
      .out = plan->out->data,
      .logits = plan->logits ? plan->logits->data : NULL,
      .logits_bf16 = plan->logits && plan->logits->dtype == LMOE_DTYPE_BF16,
      .topk_ids = plan->topk_ids ? plan->topk_ids->data : NULL,
      .topk_w = plan->topk_w ? plan->topk_w->data : NULL,
      .workspace = ctx->workspace,
      .workspace_bytes = ctx->workspace_bytes,
      .dev = &((cuda_ctx *)ctx->be)->gemm_dev,
  };
  lmoe_fwd f;
  size_t need = lmoe_k_plan(&pa, &f);
  size_t part = comm ? (size_t)M * (size_t)c->hidden * sizeof(float) : 0;
  if (need + part > ctx->workspace_bytes || !ctx->workspace)
    return lmoe_fail(ctx, LMOE_ERR_STATE, "the workspace (%zu bytes) is smaller than this layer needs (%zu)",
                     ctx->workspace_bytes, need + part);
  if (f.fp8) {
    const lmoe_k_pool_plan *pp = pa.pool;
    if (lora_possible && ((pp->al_lora & (LMOE_AL_B13 | LMOE_AL_B2)) != (LMOE_AL_B13 | LMOE_AL_B2) ||
                          (uintptr_t)pp->storage % 16))
      return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                       "an FP8 layer's LoRA expand reads the pool's B13 and B2 rows in 16-byte pieces: the pool's "
                       "max_rank must be a multiple of 8 (it is %d)",
                       (int)pool->cfg.max_rank);
    if ((uintptr_t)f.x % 16)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "an FP8 layer's x must be 16-byte aligned");
  }
  f.E_route = l->cfg.num_experts;
  f.e0 = l->e0;
  if (comm) f.part = part_of(ctx, plan); /* == workspace + need */
  if (lora_possible) {
    lmoe_status st = capturing ? capture_meta(ctx, (lmoe_batch *)b, s) : upload_meta(ctx, b, s);
    if (st) return st;
    f.meta = ((cuda_batch *)b->be)->dev;
  }

  LAUNCH(lmoe_k_route(&f, s), 0);

  bool run_lora = plan->run_lora && f.meta;
  if (plan->guard == LMOE_GUARD_DEVICE_SYNC) {
    /* The old way, kept to measure it: ask the device, copy back, wait. */
    cuda_ctx *cc = ctx->be;
    LAUNCH(lmoe_k_any(&f, s), 0);
    e = cudaMemcpyAsync(cc->any_host, f.any, sizeof(int32_t), cudaMemcpyDeviceToHost, s);
    ctx->counters.downloads++;
    if (!e) e = cudaStreamSynchronize(s);
    ctx->counters.host_waits++;
    if (e) return cuda_err(ctx, e, "device_sync guard");
    run_lora = *cc->any_host != 0 && f.meta;
  }

  LAUNCH(lmoe_k_scan(&f, s), 0);
  LAUNCH(lmoe_k_scatter(&f, s), 0);
  /* gate_up's A in sorted order: an FP8 layer's codes of x (the shrinks read x and h),
     or x's rows where the plan gathers them (f.xg) */
  if (f.fp8) LAUNCH(lmoe_k_quant_x(&f, s), 0);
  if (f.xg) LAUNCH(lmoe_k_gather_x(&f, s), 0);
  /* t13: computed inside gate_up where the plan says (f.s13f), else by shrink13 */
  if (run_lora && !f.s13f) LAUNCH(lmoe_k_shrink13(&f, s), 1);
  LAUNCH(lmoe_k_gateup(&f, run_lora, s), run_lora && f.s13f); /* LoRA work where it holds shrink13 */
  if (lmoe_k_quant_h_needed(&f)) LAUNCH(lmoe_k_quant_h(&f, s), 0);
  /* t2: its partials came out of gate_up's epilogue (f.t2p), or shrink2, unless down
     computes it (f.s2f) */
  if (run_lora && f.t2p) LAUNCH(lmoe_k_t2_finish(&f, s), 1);
  if (run_lora && !f.t2p && !f.s2f) LAUNCH(lmoe_k_shrink2(&f, s), 1);
  /* down and the top-k sum: over NCCL by column chunks, each one's all-reduce then
     overlapping the next one's down (cu_shard_chunk) */
  cuda_ctx *cc = ctx->be;
  const bool over_nccl = comm && comm->nccl;
  cc->nchunks = 1, cc->bounds[0] = 0, cc->bounds[1] = c->hidden, cc->chunk_stream = s;
  /* LMOE_SHARD_CHUNKS also cuts an unsharded layer's down (for measuring and testing
     the engines' column ranges); a one-device group's partials stay whole rows */
  if (over_nccl || (!comm && cc->gemm_dev.shard_chunks > 0))
    cc->nchunks = lmoe_k_shard_chunks(M, c->hidden, over_nccl ? comm->size : 1, cc->gemm_dev.shard_chunks,
                                      cc->bounds);
  float *part0 = f.part;
  for (int32_t ch = 0; ch < cc->nchunks; ch++) {
    if (cc->nchunks > 1) {
      f.n0 = cc->bounds[ch], f.n1 = cc->bounds[ch + 1];
      if (part0) f.part = part0 + (size_t)M * (size_t)f.n0;
    }
    LAUNCH(lmoe_k_down(&f, run_lora, s), run_lora && f.s2f);
    f.s2f = NULL; /* the first chunk's down has written t2 whole */
    LAUNCH(lmoe_k_reduce(&f, s), 0);
    if (over_nccl && cc->nchunks > 1 && (e = cudaEventRecord(cc->chunk_ev[ch], s)))
      return cuda_err(ctx, e, "cudaEventRecord");
  }
  if (f.meta && !capturing) {
    lmoe_status st = used_on(ctx, (cuda_batch *)b->be, s);
    if (st) return st;
  }
  if (!comm || plan->shard_defer) return LMOE_OK;
  if (!comm->nccl) return round_part(ctx, plan, 0, c->hidden, s); /* a one-device group of one rank */
  for (int32_t ch = 0; ch < cc->nchunks; ch++) {
    lmoe_status st = cu_shard_chunk(ctx, plan, ch, 0, s);
    if (!st) st = cu_shard_chunk(ctx, plan, ch, 1, s);
    if (st) return st;
  }
  return LMOE_OK;
}

/* lmoe_forward_group of a group communicator whose ranks share one device: every
   rank's forward and the sum are enqueued, in rank order, on one stream (streams[0],
   or rank 0's context's stream), so the sum kernel runs after every partial is written
   and the next group forward's partials are written after it has read them. Eager, a
   rank whose context's stream is another one is ordered after what that stream holds
   (its pool loads) before, and that stream after the sum: device-side waits, no host
   wait. Under capture those waits are left out (the graph is one unit on the captured
   stream; a replay orders nothing else). */
static lmoe_status cu_group_forward(int32_t n, lmoe_context *const *ctxs, lmoe_forward_plan *plans,
                                    void *const *streams) {
  lmoe_context *c0 = ctxs[0];
  cudaStream_t s = (cudaStream_t)(streams && streams[0] ? streams[0] : c0->stream);
  if (n > LMOE_K_SUM_MAX)
    return lmoe_fail(c0, LMOE_ERR_UNSUPPORTED, "%d ranks on one device: at most %d", (int)n, LMOE_K_SUM_MAX);
  for (int32_t r = 1; r < n; r++) {
    if (streams && streams[r] && streams[r] != (void *)s)
      return lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT,
                       "streams[%d] is not streams[0]: ranks on one device run on one stream (give it as "
                       "streams[0], the others NULL or the same)",
                       (int)r);
    if (ctxs[r]->device != c0->device)
      return lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT, "ctxs[%d] is on device %d, ctxs[0] on device %d", (int)r,
                       (int)ctxs[r]->device, (int)c0->device);
    if (plans[r].M != plans[0].M || plans[r].layer->cfg.hidden != plans[0].layer->cfg.hidden)
      return lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT,
                       "the ranks' forwards disagree: rank 0 has %lld tokens of %d, rank %d %lld of %d (one "
                       "batch for every rank)",
                       (long long)plans[0].M, (int)plans[0].layer->cfg.hidden, (int)r, (long long)plans[r].M,
                       (int)plans[r].layer->cfg.hidden);
  }
  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(s, &cap);
  if (e) return cuda_err(c0, e, "cudaStreamIsCapturing");
  bool eager = cap == cudaStreamCaptureStatusNone;
  for (int32_t r = 0; r < n && eager; r++) {
    cudaStream_t sr = (cudaStream_t)ctxs[r]->stream;
    if (sr == s) continue;
    cuda_ctx *cr = ctxs[r]->be;
    e = cudaEventRecord(cr->order_ev, sr);
    if (!e) e = cudaStreamWaitEvent(s, cr->order_ev, 0);
    if (e) return cuda_err(c0, e, "ordering the ranks' streams");
  }
  for (int32_t r = 0; r < n; r++) {
    plans[r].shard_defer = true;
    lmoe_status st = cu_forward(ctxs[r], &plans[r], s);
    if (st) {
      if (ctxs[r] != c0) lmoe_fail(c0, st, "rank %d: %s", (int)r, lmoe_context_last_error(ctxs[r]));
      return st;
    }
  }
  if (plans[0].M == 0) return LMOE_OK;
  lmoe_k_sum a;
  memset(&a, 0, sizeof a);
  for (int32_t r = 0; r < n; r++) {
    a.part[r] = part_of(ctxs[r], &plans[r]);
    a.out[r] = plans[r].out->data;
  }
  a.n = a.nout = n;
  a.count = plans[0].M * plans[0].layer->cfg.hidden;
  {
    lmoe_context *ctx = c0; /* LAUNCH counts and reports on it */
    LAUNCH(lmoe_k_sum_parts(&a, s), 0);
  }
  cuda_ctx *cc0 = c0->be;
  bool recorded = false;
  for (int32_t r = 0; r < n && eager; r++) {
    cudaStream_t sr = (cudaStream_t)ctxs[r]->stream;
    if (sr == s) continue;
    if (!recorded) e = cudaEventRecord(cc0->order_ev, s);
    recorded = true;
    if (!e) e = cudaStreamWaitEvent(sr, cc0->order_ev, 0);
    if (e) return cuda_err(c0, e, "ordering the ranks' streams");
  }
  return LMOE_OK;
}

/* ---------------------------------------------------------------- graphs */

/* Thread-local capture mode: the capturing thread is kept from calls that would
   break the capture (a read-back, a synchronize: they fail and the capture's end
   reports it), while other threads, say with contexts of their own, may allocate and
   synchronise freely. Global mode would turn their legal calls into errors too. */
static lmoe_status cu_graph_begin(lmoe_context *ctx, void *stream) {
  cudaStream_t s = (cudaStream_t)stream;
  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(s, &cap);
  if (e) return cuda_err(ctx, e, "cudaStreamIsCapturing");
  if (cap != cudaStreamCaptureStatusNone)
    return lmoe_fail(ctx, LMOE_ERR_STATE, "the stream is already being captured");
  e = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  if (e) {
    cudaGetLastError();
    return cuda_err(ctx, e, "cudaStreamBeginCapture");
  }
  return LMOE_OK;
}

static lmoe_status cu_graph_end(lmoe_context *ctx, void *stream, void **exec) {
  *exec = NULL;
  cuda_ctx *cc = ctx->be;
  cudaGraph_t g = NULL;
  cudaError_t e = cudaStreamEndCapture((cudaStream_t)stream, &g);
  if (e) {
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    drop_captured(ctx);
    return lmoe_fail(ctx, LMOE_ERR_BACKEND,
                     "the capture failed and was discarded: %s (%s); between lmoe_graph_begin and "
                     "lmoe_graph_end only forwards on the captured stream may be called",
                     cudaGetErrorString(e), cudaGetErrorName(e));
  }
  cudaGraphExec_t ge = NULL;
  e = cudaGraphInstantiate(&ge, g, 0);
  cudaGraphDestroy(g);
  if (e) {
    cudaGetLastError();
    drop_captured(ctx);
    return cuda_err(ctx, e, "cudaGraphInstantiate");
  }
  cuda_graph *cg = calloc(1, sizeof *cg);
  lmoe_batch **bs = cc->ncap ? malloc((size_t)cc->ncap * sizeof *bs) : NULL;
  if (!cg || (cc->ncap && !bs)) {
    free(cg), free(bs);
    cudaGraphExecDestroy(ge);
    drop_captured(ctx);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  for (int32_t i = 0; i < cc->ncap; i++) bs[i] = cc->cap[i]; /* the references move to the graph */
  cg->exec = ge;
  cg->batches = bs;
  cg->n = cc->ncap;
  cc->ncap = 0;
  *exec = cg;
  return LMOE_OK;
}

/* Before the replay, on its stream: each batch it reads ordered after the batch's
   earlier work (a device-side wait when that was on another stream) and uploaded if
   its device copy is behind (a capture of a batch whose version had not reached the
   device, say). After it, on another stream than the context's, the batch's order
   event. Never waits. */
static lmoe_status cu_graph_launch(lmoe_context *ctx, void *exec, void *stream) {
  cuda_graph *cg = exec;
  cudaStream_t s = (cudaStream_t)stream;
  for (int32_t i = 0; i < cg->n; i++) {
    lmoe_batch *b = cg->batches[i];
    /* a batch whose last set was refused is replayed as last staged (its set-time
       upload): only ordered, its host encoding is not the staged one */
    lmoe_status st = b->unstaged ? order_on(ctx, b->be, s) : upload_meta(ctx, b, s);
    if (st) return st;
  }
  cudaError_t e = cudaGraphLaunch(cg->exec, s);
  if (e) return cuda_err(ctx, e, "cudaGraphLaunch");
  for (int32_t i = 0; i < cg->n; i++) {
    lmoe_status st = used_on(ctx, cg->batches[i]->be, s);
    if (st) return st;
  }
  return LMOE_OK;
}

/* The runtime frees an instance that is still in flight once it completes; the
   batches are released after it (a batch's release waits for the device). */
static void cu_graph_free(lmoe_context *ctx, void *exec) {
  cuda_graph *cg = exec;
  cudaSetDevice(ctx->device);
  cudaGraphExecDestroy(cg->exec);
  cudaGetLastError();
  for (int32_t i = 0; i < cg->n; i++) lmoe_object_release(&cg->batches[i]->obj);
  free(cg->batches);
  free(cg);
}

static const lmoe_backend_ops cuda_ops = {
    .name = "cuda",
    .kind = LMOE_BACKEND_CUDA,
    .caps = {.host_memory = false, .synchronous = false},
    .device_count = cu_device_count,
    .device_info = cu_device_info,
    .init = cu_init,
    .fini = cu_fini,
    .alloc = cu_alloc,
    .free = cu_free,
    .copy = cu_copy,
    .synchronize = cu_sync,
    .fill_random = cu_fill_random,
    .fill = cu_fill,
    .workspace_bytes = cu_workspace_bytes,
    .forward = cu_forward,
    .fp8_check = cu_fp8_check,
    .shard_chunks = cu_shard_chunks,
    .shard_chunk = cu_shard_chunk,
    .group_forward = cu_group_forward,
    .pinned_alloc = cu_pinned_alloc,
    .pinned_free = cu_pinned_free,
    .event_create = cu_event_create,
    .event_destroy = cu_event_destroy,
    .event_record = cu_event_record,
    .event_wait = cu_event_wait,
    .pool_init = cu_pool_init,
    .pool_fini = cu_pool_fini,
    .slot_changed = cu_slot_changed,
    .batch_stage = cu_batch_stage,
    .batch_fini = cu_batch_fini,
    .graph_begin = cu_graph_begin,
    .graph_end = cu_graph_end,
    .graph_launch = cu_graph_launch,
    .graph_free = cu_graph_free,
};

const lmoe_backend_ops *lmoe_cuda_backend(void) { return &cuda_ops; }
