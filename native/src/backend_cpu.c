/* cpu backend: memory, copies and fills on the host. The forward's math is in
   cpu_forward.c. "Device" memory is host memory; the stream is ignored: every call
   completes before it returns. */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A persistent worker pool per context (ctx->be), made on the first parallel call.
   The calling thread is worker 0 and takes items too; items are handed out through an
   atomic counter, so which thread runs an item never changes what it computes. */
typedef struct cpu_pool {
  pthread_mutex_t mu;
  pthread_cond_t start, done;
  pthread_t *tids;
  int32_t nworkers;  /* threads started besides the caller */
  uint64_t job;      /* bumps per dispatched job; workers wait for a change */
  int32_t finished;  /* workers done with the current job */
  bool quit;
  lmoe_cpu_task fn;
  void *arg;
  int64_t n;
  atomic_llong next;
} cpu_pool;

typedef struct cpu_worker {
  cpu_pool *pool;
  int32_t id;
} cpu_worker;

static void run_items(cpu_pool *p, int32_t thread) {
  for (;;) {
    int64_t i = atomic_fetch_add(&p->next, 1);
    if (i >= p->n) break;
    p->fn(p->arg, i, thread);
  }
}

static void *worker_main(void *v) {
  cpu_pool *p = ((cpu_worker *)v)->pool;
  int32_t id = ((cpu_worker *)v)->id;
  free(v);
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->quit && p->job == seen) pthread_cond_wait(&p->start, &p->mu);
    if (p->quit) break;
    seen = p->job;
    pthread_mutex_unlock(&p->mu);
    run_items(p, id);
    pthread_mutex_lock(&p->mu);
    if (++p->finished == p->nworkers) pthread_cond_signal(&p->done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static void pool_destroy(cpu_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->quit = true;
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);
  for (int32_t i = 0; i < p->nworkers; i++) pthread_join(p->tids[i], NULL);
  pthread_cond_destroy(&p->start);
  pthread_cond_destroy(&p->done);
  pthread_mutex_destroy(&p->mu);
  free(p->tids);
  free(p);
}

/* Best effort: when threads can't be made, the pool runs with fewer (down to the
   caller alone); results do not depend on the thread count. */
static cpu_pool *pool_create(int32_t threads) {
  cpu_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->start, NULL);
  pthread_cond_init(&p->done, NULL);
  atomic_init(&p->next, 0);
  if (threads > 1) p->tids = calloc((size_t)threads - 1, sizeof *p->tids);
  for (int32_t i = 1; p->tids && i < threads; i++) {
    cpu_worker *w = malloc(sizeof *w);
    if (!w) break;
    w->pool = p;
    w->id = i;
    if (pthread_create(&p->tids[p->nworkers], NULL, worker_main, w) != 0) {
      free(w);
      break;
    }
    p->nworkers++;
  }
  return p;
}

void lmoe_cpu_parallel(lmoe_context *ctx, int64_t n, lmoe_cpu_task fn, void *arg) {
  if (n <= 0) return;
  cpu_pool *p = ctx->be;
  if (!p && ctx->threads > 1 && n > 1) p = ctx->be = pool_create(ctx->threads);
  if (!p || p->nworkers == 0 || n == 1) {
    for (int64_t i = 0; i < n; i++) fn(arg, i, 0);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->arg = arg;
  p->n = n;
  atomic_store(&p->next, 0);
  p->finished = 0;
  p->job++;
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);
  run_items(p, 0);
  pthread_mutex_lock(&p->mu);
  while (p->finished < p->nworkers) pthread_cond_wait(&p->done, &p->mu);
  pthread_mutex_unlock(&p->mu);
}

static lmoe_status cpu_init(lmoe_context *ctx) {
  if (ctx->threads == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    ctx->threads = n > 0 ? (int32_t)(n > 256 ? 256 : n) : 1;
  }
  ctx->be = NULL; /* the worker pool, made lazily */
  return LMOE_OK;
}

static void cpu_fini(lmoe_context *ctx) {
  pool_destroy(ctx->be);
  ctx->be = NULL;
}

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
    .slot_write_begin = NULL,
};

const lmoe_backend_ops *lmoe_cpu_backend(void) { return &cpu_ops; }
