/* The cpu backend's worker threads: one persistent pool per context (ctx->be), made on
   the first parallel call. Used by the forward (cpu_forward.c) and the fills
   (backend_cpu.c). */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>

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

void lmoe_cpu_threads_end(lmoe_context *ctx) {
  cpu_pool *p = ctx->be;
  ctx->be = NULL;
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

