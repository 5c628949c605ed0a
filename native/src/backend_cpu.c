/* cpu backend: memory, copies and fills on the host. The forward's math is in
   cpu_forward.c. "Device" memory is host memory; the stream is ignored: every call
   completes before it returns. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static lmoe_status cpu_init(lmoe_context *ctx) {
  if (ctx->threads == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    ctx->threads = n > 0 ? (int32_t)(n > 256 ? 256 : n) : 1;
  }
  ctx->be = NULL; /* the worker pool, made lazily (cpu_threads.c) */
  return LMOE_OK;
}

static void cpu_fini(lmoe_context *ctx) { lmoe_cpu_threads_end(ctx); }

static lmoe_status cpu_alloc(lmoe_context *ctx, int32_t memory, size_t bytes, void **out) {
  (void)memory;
  *out = NULL;
  if (bytes == 0) bytes = 1;
  if (ctx->allocator.alloc) {
    *out = ctx->allocator.alloc(ctx->allocator.user, bytes);
  } else {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    *out = aligned_alloc(64, rounded);
  }
  if (!*out)
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes of host memory", bytes);
  return LMOE_OK;
}

static void cpu_free(lmoe_context *ctx, int32_t memory, void *p) {
  (void)memory;
  if (!p) return;
  if (ctx->allocator.free)
    ctx->allocator.free(ctx->allocator.user, p);
  else
    free(p);
}

static lmoe_status cpu_copy(lmoe_context *ctx, void *dst, int32_t dst_mem, const void *src,
                            int32_t src_mem, size_t bytes, void *stream, int blocking) {
  (void)ctx, (void)dst_mem, (void)src_mem, (void)stream, (void)blocking;
  if (bytes) memmove(dst, src, bytes);
  return LMOE_OK;
}

static lmoe_status cpu_sync(lmoe_context *ctx, void *stream) {
  (void)ctx, (void)stream;
  return LMOE_OK;
}

/* Fills are element-wise pure functions of (seed, index), so they split into chunks
   over the worker pool without changing a value. */
enum { FILL_CHUNK = 1 << 16 };

typedef struct fill_job {
  lmoe_buffer *b;
  uint64_t seed;
  float lo, span;
  double value;
  bool random;
} fill_job;

static void fill_chunk(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  const fill_job *j = arg;
  int64_t end = (item + 1) * FILL_CHUNK < j->b->numel ? (item + 1) * FILL_CHUNK : j->b->numel;
  for (int64_t i = item * FILL_CHUNK; i < end; i++) {
    if (j->random) {
      float u = lmoe_uniform(j->seed, (uint64_t)i);
      float prod = j->span * u; /* two roundings, no fused multiply-add: GPU code matches */
      lmoe_store_elem(j->b->data, j->b->dtype, i, (double)(j->lo + prod));
    } else {
      lmoe_store_elem(j->b->data, j->b->dtype, i, j->value);
    }
  }
}

static lmoe_status cpu_fill_random(lmoe_context *ctx, lmoe_buffer *b, uint64_t seed, float lo,
                                   float hi, void *stream) {
  (void)stream;
  fill_job j = {b, seed, lo, hi - lo, 0.0, true};
  lmoe_cpu_parallel(ctx, (b->numel + FILL_CHUNK - 1) / FILL_CHUNK, fill_chunk, &j);
  ctx->counters.launches++;
  return LMOE_OK;
}

static lmoe_status cpu_fill(lmoe_context *ctx, lmoe_buffer *b, double v, void *stream) {
  (void)stream;
  fill_job j = {b, 0, 0.0f, 0.0f, v, false};
  lmoe_cpu_parallel(ctx, (b->numel + FILL_CHUNK - 1) / FILL_CHUNK, fill_chunk, &j);
  ctx->counters.launches++;
  return LMOE_OK;
}

static const lmoe_backend_ops cpu_ops = {
    .name = "cpu",
    .kind = LMOE_BACKEND_CPU,
    .caps = {.host_memory = true, .synchronous = true},
    .init = cpu_init,
    .fini = cpu_fini,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy = cpu_copy,
    .synchronize = cpu_sync,
    .fill_random = cpu_fill_random,
    .fill = cpu_fill,
    .workspace_bytes = lmoe_cpu_workspace_bytes,
    .forward = lmoe_cpu_forward,
};

const lmoe_backend_ops *lmoe_cpu_backend(void) { return &cpu_ops; }
