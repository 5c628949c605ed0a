/* Communicators: the sum of a sharded layer's partial outputs over its ranks
   (docs/design.md, "Sharding").

   cpu: the ranks of a group live in this process and meet in host memory. Each rank's
   forward leaves its partial output in float32 in its own workspace and calls
   lmoe_comm_cpu_allreduce: after a barrier every rank reads every partial, sums them
   in rank order in float32 and rounds once to bf16 into its own output (so all ranks'
   outputs are bit-identical), then a second barrier keeps the partials alive until
   every rank has read them. lmoe_forward_group (forward_group.c) drives all ranks from
   one thread: the forwards run one after another, only recording their partials, and
   the sum is done once at the end (lmoe_comm_group_collect_begin/end here).

   nccl (builds with LMOE_HAVE_NCCL): a wrapped or owned ncclComm_t; the sum is one
   ncclAllReduce of float32 on the forward's stream (lmoe_comm_nccl_allreduce_f32).

   cuda contexts of one device (several ranks on one GPU, which NCCL refuses): a group
   as for the cpu, but no rank meets another in host memory: lmoe_forward_group
   enqueues every rank's forward and then one kernel that sums all partials (each in
   its rank's workspace, on the same device) into every rank's out (the backend's
   group_forward). lmoe_forward of one of its ranks alone is refused when there are
   several (nothing would sum them); a group of one rounds its own partial. */
#include "internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LMOE_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

void lmoe_shard_range(int32_t total, int32_t rank, int32_t size, int32_t *lo, int32_t *n) {
  int32_t q = total / size, m = total % size;
  *lo = rank * q + (rank < m ? rank : m);
  *n = q + (rank < m ? 1 : 0);
}

/* ---------------------------------------------------------------- cpu group */

typedef struct comm_slot {
  const float *part;
  int64_t rows, cols, stride;
  uint16_t *out;
  bool failed;
} comm_slot;

struct lmoe_comm_group {
  atomic_int refs;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int32_t size;
  int32_t arrived;
  uint64_t generation; /* bumps when a barrier opens */
  bool collecting;     /* lmoe_forward_group: record the partials, sum later */
  comm_slot *slots;
};

static void group_release(lmoe_comm_group *g) {
  if (!g || atomic_fetch_sub(&g->refs, 1) != 1) return;
  pthread_mutex_destroy(&g->mu);
  pthread_cond_destroy(&g->cv);
  free(g->slots);
  free(g);
}

/* With g->mu held: waits until all ranks arrived. The last one runs `last` first. */
static void barrier(lmoe_comm_group *g, void (*last)(lmoe_comm_group *)) {
  uint64_t gen = g->generation;
  if (++g->arrived == g->size) {
    if (last) last(g);
    g->arrived = 0;
    g->generation++;
    pthread_cond_broadcast(&g->cv);
  } else {
    while (gen == g->generation) pthread_cond_wait(&g->cv, &g->mu);
  }
}

static void clear_slots(lmoe_comm_group *g) { memset(g->slots, 0, (size_t)g->size * sizeof *g->slots); }

enum { SUM_ROWS = 16 };

typedef struct sum_job {
  const comm_slot *slots;
  int32_t n;
  int64_t rows, cols;
  uint16_t *out;
} sum_job;

/* out[t] = bf16(sum over ranks in rank order of part_r[t]): float32, one rounding. */
static void sum_task(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  const sum_job *j = arg;
  int64_t t_end = (item + 1) * SUM_ROWS < j->rows ? (item + 1) * SUM_ROWS : j->rows;
  for (int64_t t = item * SUM_ROWS; t < t_end; t++) {
    uint16_t *o = j->out + t * j->cols;
    const float *p0 = j->slots[0].part + t * j->slots[0].stride;
    for (int64_t h = 0; h < j->cols; h++) {
      float s = p0[h];
      for (int32_t r = 1; r < j->n; r++) s += j->slots[r].part[t * j->slots[r].stride + h];
      o[h] = lmoe_f32_to_bf16(s);
    }
  }
}

/* The slots agree (every rank ran, with the same shapes)? Else the message. */
static lmoe_status check_slots(lmoe_context *ctx, const comm_slot *s, int32_t n) {
  for (int32_t r = 0; r < n; r++)
    if (s[r].failed)
      return lmoe_fail(ctx, LMOE_ERR_STATE,
                       "rank %d's forward failed before the sum over the ranks: no rank's output was written",
                       (int)r);
  for (int32_t r = 1; r < n; r++)
    if (s[r].rows != s[0].rows || s[r].cols != s[0].cols)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "the ranks' forwards disagree: rank 0 has %lld tokens of %lld, rank %d %lld of %lld (one "
                       "batch for every rank)",
                       (long long)s[0].rows, (long long)s[0].cols, (int)r, (long long)s[r].rows,
                       (long long)s[r].cols);
  return LMOE_OK;
}

static void sum_into(lmoe_context *ctx, const comm_slot *s, int32_t n, uint16_t *out) {
  sum_job j = {s, n, s[0].rows, s[0].cols, out};
  if (j.rows <= 0 || j.cols <= 0) return;
  lmoe_cpu_parallel(ctx, (j.rows + SUM_ROWS - 1) / SUM_ROWS, sum_task, &j);
  ctx->counters.launches++;
}

lmoe_status lmoe_comm_cpu_allreduce(lmoe_comm *c, lmoe_context *ctx, const float *part, int64_t rows,
                                    int64_t cols, int64_t stride, uint16_t *out, bool failed) {
  lmoe_comm_group *g = c->group;
  comm_slot mine = {part, rows, cols, stride, out, failed};
  pthread_mutex_lock(&g->mu);
  g->slots[c->rank] = mine;
  if (g->collecting) { /* lmoe_forward_group sums when every rank has run */
    pthread_mutex_unlock(&g->mu);
    return LMOE_OK;
  }
  barrier(g, NULL);
  /* Every slot is written and stays so until the second barrier. */
  lmoe_status st = check_slots(ctx, g->slots, g->size);
  pthread_mutex_unlock(&g->mu);
  if (!st && !failed) sum_into(ctx, g->slots, g->size, out);
  pthread_mutex_lock(&g->mu);
  barrier(g, clear_slots);
  pthread_mutex_unlock(&g->mu);
  return failed ? LMOE_ERR_STATE : st;
}

/* ---------------------------------------------------------------- objects */

static void comm_destroy(lmoe_object *obj) {
  lmoe_comm *c = (lmoe_comm *)obj;
  group_release(c->group);
#ifdef LMOE_HAVE_NCCL
  if (c->owns_nccl && c->nccl) ncclCommDestroy((ncclComm_t)c->nccl);
#endif
  lmoe_context *ctx = c->ctx;
  free(c);
  lmoe_context_release(ctx);
}

static lmoe_comm *comm_new(lmoe_context *ctx, int32_t rank, int32_t size) {
  lmoe_comm *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  lmoe_object_init(&c->obj, LMOE_MAGIC_COMM, comm_destroy);
  lmoe_context_retain(ctx);
  c->ctx = ctx;
  c->rank = rank;
  c->size = size;
  return c;
}

int32_t lmoe_has_nccl(void) {
#ifdef LMOE_HAVE_NCCL
  return 1;
#else
  return 0;
#endif
}

static lmoe_status say(lmoe_status st, char *errbuf, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#include <stdarg.h>
static lmoe_status say(lmoe_status st, char *errbuf, size_t n, const char *fmt, ...) {
  if (errbuf && n) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, n, fmt, ap);
    va_end(ap);
  }
  return st;
}

lmoe_status lmoe_comm_create_local(int32_t n, lmoe_context *const *ctxs, lmoe_comm **out, char *errbuf,
                                   size_t errbuf_size) {
  if (errbuf && errbuf_size) errbuf[0] = 0;
  if (!out) return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size, "out is NULL");
  if (n < 1 || n > 4096)
    return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size, "n (ranks) must be 1..4096, got %d", (int)n);
  for (int32_t r = 0; r < n; r++) out[r] = NULL;
  if (!ctxs) return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size, "ctxs is NULL");
  for (int32_t r = 0; r < n; r++) {
    if (!lmoe_object_is(ctxs[r], LMOE_MAGIC_CONTEXT))
      return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size, "ctxs[%d] is %s", (int)r,
                 ctxs[r] ? "not a loramoe context" : "NULL");
    for (int32_t q = 0; q < r; q++)
      if (ctxs[q] == ctxs[r])
        return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size,
                   "ctxs[%d] is ctxs[%d]: every rank needs a context of its own", (int)r, (int)q);
    if (ctxs[r]->ops != ctxs[0]->ops)
      return say(LMOE_ERR_INVALID_ARGUMENT, errbuf, errbuf_size,
                 "ctxs[%d] is a %s context, ctxs[0] a %s one: the ranks share one backend", (int)r,
                 ctxs[r]->ops->name, ctxs[0]->ops->name);
  }
  bool one_device = true;
  for (int32_t r = 1; r < n; r++) one_device &= ctxs[r]->device == ctxs[0]->device;
  /* Device contexts: NCCL over several devices (and for one rank, when built with it);
     several ranks on one device, which NCCL refuses, a group summed by a kernel. */
  bool device_group = ctxs[0]->ops->kind != LMOE_BACKEND_CPU && one_device && (n > 1 || !lmoe_has_nccl());
  if (device_group && n > LMOE_DEVICE_GROUP_MAX)
    return say(LMOE_ERR_UNSUPPORTED, errbuf, errbuf_size,
               "%d ranks on one %s device: a group on one device has at most %d", (int)n, ctxs[0]->ops->name,
               (int)LMOE_DEVICE_GROUP_MAX);
  if (device_group && !ctxs[0]->ops->group_forward)
    return say(LMOE_ERR_UNSUPPORTED, errbuf, errbuf_size, "the %s backend has no sharded forward",
               ctxs[0]->ops->name);
  if (ctxs[0]->ops->kind != LMOE_BACKEND_CPU && !device_group) {
#ifdef LMOE_HAVE_NCCL
    int *devs = calloc((size_t)n, sizeof *devs);
    ncclComm_t *nc = calloc((size_t)n, sizeof *nc);
    lmoe_status st = LMOE_OK;
    if (!devs || !nc) st = say(LMOE_ERR_OUT_OF_MEMORY, errbuf, errbuf_size, "out of host memory");
    for (int32_t r = 0; !st && r < n; r++) devs[r] = ctxs[r]->device;
    ncclResult_t nr = st ? ncclSuccess : ncclCommInitAll(nc, n, devs);
    if (!st && nr != ncclSuccess)
      st = say(LMOE_ERR_BACKEND, errbuf, errbuf_size, "ncclCommInitAll over %d devices: %s", (int)n,
               ncclGetErrorString(nr));
    for (int32_t r = 0; !st && r < n; r++) {
      if (!(out[r] = comm_new(ctxs[r], r, n))) {
        st = say(LMOE_ERR_OUT_OF_MEMORY, errbuf, errbuf_size, "out of host memory");
        break;
      }
      out[r]->nccl = nc[r];
      out[r]->owns_nccl = true;
      nc[r] = NULL;
    }
    if (st) {
      for (int32_t r = 0; r < n; r++) {
        lmoe_comm_release(out[r]);
        out[r] = NULL;
        if (nc && nc[r]) ncclCommDestroy(nc[r]);
      }
    }
    free(devs);
    free(nc);
    return st;
#else
    return say(LMOE_ERR_UNSUPPORTED, errbuf, errbuf_size,
               "communicators over %s contexts on different devices need NCCL, and this build has none "
               "(cmake option LMOE_NCCL); ranks on one device need none",
               ctxs[0]->ops->name);
#endif
  }
  lmoe_comm_group *g = calloc(1, sizeof *g);
  comm_slot *slots = calloc((size_t)n, sizeof *slots);
  if (!g || !slots) {
    free(g);
    free(slots);
    return say(LMOE_ERR_OUT_OF_MEMORY, errbuf, errbuf_size, "out of host memory");
  }
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->cv, NULL);
  atomic_init(&g->refs, 1); /* the creator's, dropped below */
  g->size = n;
  g->slots = slots;
  lmoe_status st = LMOE_OK;
  for (int32_t r = 0; r < n; r++) {
    if (!(out[r] = comm_new(ctxs[r], r, n))) {
      st = say(LMOE_ERR_OUT_OF_MEMORY, errbuf, errbuf_size, "out of host memory");
      break;
    }
    atomic_fetch_add(&g->refs, 1);
    out[r]->group = g;
  }
  if (st)
    for (int32_t r = 0; r < n; r++) {
      lmoe_comm_release(out[r]);
      out[r] = NULL;
    }
  group_release(g);
  return st;
}

lmoe_status lmoe_comm_wrap_nccl(lmoe_context *ctx, void *nccl_comm, lmoe_comm **out) {
  if (!lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!nccl_comm) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "nccl_comm is NULL");
#ifdef LMOE_HAVE_NCCL
  if (ctx->ops->kind != LMOE_BACKEND_CUDA)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "an NCCL communicator needs a cuda context, not a %s one",
                     ctx->ops->name);
  int rank = -1, size = -1, dev = -1;
  ncclResult_t nr = ncclCommUserRank((ncclComm_t)nccl_comm, &rank);
  if (nr == ncclSuccess) nr = ncclCommCount((ncclComm_t)nccl_comm, &size);
  if (nr == ncclSuccess) nr = ncclCommCuDevice((ncclComm_t)nccl_comm, &dev);
  if (nr != ncclSuccess)
    return lmoe_fail(ctx, LMOE_ERR_BACKEND, "asking the NCCL communicator its rank: %s", ncclGetErrorString(nr));
  if (dev != ctx->device)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "the NCCL communicator is on device %d, the context on device %d", dev, (int)ctx->device);
  lmoe_comm *c = comm_new(ctx, rank, size);
  if (!c) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  c->nccl = nccl_comm;
  *out = c;
  return LMOE_OK;
#else
  return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                   "this build of loramoe has no NCCL (cmake option LMOE_NCCL): it cannot wrap an ncclComm_t");
#endif
}

#ifdef LMOE_HAVE_NCCL
/* The sum over the ranks on the GPU: one in-place ncclAllReduce of float32 on the
   forward's stream (enqueued, capturable into a CUDA graph; no host wait). The rounding
   to bf16 follows on the same stream (the backend's conversion). */
lmoe_status lmoe_comm_nccl_allreduce_f32(lmoe_comm *c, float *buf, size_t count, void *stream) {
  ncclResult_t nr = ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, (ncclComm_t)c->nccl,
                                  (cudaStream_t)stream);
  if (nr != ncclSuccess)
    return lmoe_fail(c->ctx, LMOE_ERR_BACKEND, "ncclAllReduce of %zu floats: %s", count, ncclGetErrorString(nr));
  return LMOE_OK;
}
#endif

void lmoe_comm_release(lmoe_comm *c) {
  if (lmoe_object_is(c, LMOE_MAGIC_COMM)) lmoe_object_release(&c->obj);
}

int32_t lmoe_comm_rank(const lmoe_comm *c) { return lmoe_object_is(c, LMOE_MAGIC_COMM) ? c->rank : -1; }
int32_t lmoe_comm_size(const lmoe_comm *c) { return lmoe_object_is(c, LMOE_MAGIC_COMM) ? c->size : -1; }

/* ---------------------------------------------------------------- group forward */

/* lmoe_forward_group's side of a cpu group (forward_group.c): the forwards of all ranks
   run one after another between begin and end, each only recording its partial; end
   sums them once into every rank's output. */
bool lmoe_comm_group_collect_begin(lmoe_comm_group *g) {
  pthread_mutex_lock(&g->mu);
  bool busy = g->collecting || g->arrived;
  if (!busy) g->collecting = true;
  pthread_mutex_unlock(&g->mu);
  return !busy;
}

lmoe_status lmoe_comm_group_collect_end(lmoe_comm_group *g, lmoe_context *c0, int32_t n, lmoe_status st) {
  pthread_mutex_lock(&g->mu);
  g->collecting = false;
  pthread_mutex_unlock(&g->mu);
  if (!st) st = check_slots(c0, g->slots, n);
  if (!st) {
    sum_into(c0, g->slots, n, g->slots[0].out);
    size_t bytes = (size_t)(g->slots[0].rows * g->slots[0].cols) * sizeof(uint16_t);
    for (int32_t r = 1; r < n; r++)
      if (bytes) memcpy(g->slots[r].out, g->slots[0].out, bytes);
  }
  clear_slots(g);
  return st;
}
