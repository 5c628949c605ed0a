/* A simulated CUDA device for tests on machines without a GPU.

   loramoe's GPU path is a protocol as much as it is kernels: what the host enqueues in
   which order, what it stages in pinned memory and when it may overwrite it, what a
   captured graph reads at replay, and that the forward never waits. This runtime
   implements the CUDA runtime calls that native/src/backend_cuda.c and tests/gpu use,
   with a device thread that runs each stream's work in order, later than the host
   enqueued it (LMOE_SIM_DELAY_US per operation, default 20), so the host runs ahead of
   the device as it does of a GPU. The kernels are plain C (sim_kernels.c).

   Modelled, because the protocol depends on it:
   - stream order; streams run in any interleaving with each other;
   - events: a record completes when the stream reaches it; a query before that says
     not ready; a graph's external record node records when the replay runs, so a query
     between cudaGraphLaunch and the replay still sees the previous record;
   - copies read their source when they run if it is pinned (cudaHostAlloc) or device
     memory; a pageable source is copied at the call (the driver's staging); a copy to
     pageable memory returns once done (a host wait);
   - captured work is recorded, not run, and reads its sources at every replay; in
     capture, copies to or from pageable memory, waits on events recorded outside it
     and launches of graphs fail and invalidate the capture; a stream that waits on an
     event recorded in a capture joins it (a fork), and the capture ends only when every
     such stream's last work is waited on by the stream that began it (a join), else
     with cudaErrorStreamCaptureUnjoined; the graph keeps the host's order of its nodes
     (a valid order of the forked graph; replays run it one node after another); calls that synchronise or allocate invalidate it
     too (any thread's capture in global mode, the calling thread's in thread-local mode,
     and always a capture of the stream synchronised);
   - device memory is a bounded pool (LMOE_SIM_MEMORY_MB, default 8192) filled with 0xff
     bytes (bf16 NaN) when allocated, so a read of memory never written shows; copies
     and fills into device memory must stay inside one allocation;
   - CUPTI's runtime callbacks on entry (include/cupti.h) for the calls tests count;
   - several devices (LMOE_SIM_DEVICES, default 1, at most 8): their numbers are
     checked and each thread has a current one; they share the memory pool and the
     device thread;
   - the NCCL calls the library makes (include/nccl.h): communicators over those
     devices, and an in-place float32 sum all-reduce that runs when every rank's stream
     has reached its own (the ranks' buffers added in rank order, as one float32 sum
     each); inside ncclGroupStart/End the all-reduces are only recorded and are
     enqueued at the group's end, as NCCL does.
   Not modelled: the legacy default stream's implicit synchronisation, memory
   placement on devices, timing. */
#include "cuda_runtime_api.h"
#include "cupti.h"
#include "nccl.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { OP_COPY, OP_SET, OP_KERNEL, OP_RECORD, OP_RECORD_EXTERNAL, OP_WAIT, OP_ALLREDUCE };

typedef struct op {
  int kind;
  void *dst;
  const void *src;
  size_t n;
  int value;
  void *owned; /* pageable snapshot or kernel arguments */
  void (*fn)(const void *);
  struct sim_event *ev;
  uint64_t seq;
  struct sim_nccl_comm *comm; /* OP_ALLREDUCE: the rank's communicator (dst: its buffer, n: floats) */
  struct sim_reduce *red;     /* and, once on a stream, the all-reduce it takes part in */
  struct op *next;
} op;

enum { SIM_MAX_DEVICES = 8 };

/* The ranks of one ncclCommInitAll, and their all-reduces in flight: the i-th all-reduce
   a rank puts on a stream meets the i-th of every other rank. */
struct sim_clique {
  int n, refs;
  uint64_t issued[SIM_MAX_DEVICES];
  struct sim_reduce *pending;
};

struct sim_nccl_comm {
  struct sim_clique *clique;
  int rank, device;
};

struct sim_reduce {
  uint64_t seq;
  size_t count;
  unsigned at_head;                         /* ranks whose op heads its stream */
  struct op *ops[SIM_MAX_DEVICES];
  struct sim_stream *streams[SIM_MAX_DEVICES];
  struct sim_reduce *next;
};

struct sim_stream {
  op *head, *tail;
  int running;
  int capture;                      /* enum cudaStreamCaptureStatus */
  enum cudaStreamCaptureMode mode;
  pthread_t capture_thread;
  struct sim_graph *cap;             /* shared by the streams a capture forked into */
  uint64_t cap_id;                   /* the capture it takes part in (0: none) */
  struct sim_stream *origin;         /* the stream that began that capture */
  uint64_t cap_n;                    /* nodes it has added to the capture */
  int joined;                        /* a forked stream: its last node is waited on by origin */
  struct sim_stream *next;
};

struct sim_event {
  uint64_t rec_seq, done_seq;
  /* recorded in a capture (cap_id, live while that capture is): by cap_stream after its
     cap_pos-th node */
  uint64_t cap_id, cap_pos;
  struct sim_stream *cap_stream;
};
static uint64_t next_cap_id;

struct sim_graph {
  op *head, *tail;
};

typedef struct region {
  char *p;
  size_t n;
  int device;
  struct region *next;
} region;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static struct sim_stream legacy, *streams = &legacy;
static region *regions;
static size_t live_bytes, capacity;
static long delay_ns;
static int quit;           /* set when the library is unloaded: the device thread ends */
static int started;
static pthread_t device;
static _Thread_local cudaError_t last_error;
static int ndevices = 1;
static _Thread_local int current_device;

static CUpti_CallbackFunc cb_fn;
static void *cb_user;
static int cb_enabled;
struct sim_subscriber {
  int unused;
};
static struct sim_subscriber the_subscriber;

static void api(CUpti_CallbackId id, const char *name, const void *params) {
  if (!cb_enabled || !cb_fn) return;
  CUpti_CallbackData d = {CUPTI_API_ENTER, name, params};
  cb_fn(cb_user, CUPTI_CB_DOMAIN_RUNTIME_API, id, &d);
}

static cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

/* ---------------------------------------------------------------- device thread */

static void free_ops(op *o) {
  while (o) {
    op *n = o->next;
    free(o->owned);
    free(o);
    o = n;
  }
}

/* Runs one operation; the lock is not held, except where said. */
static void run_op(op *o) {
  switch (o->kind) {
  case OP_COPY:
    memmove(o->dst, o->owned ? o->owned : o->src, o->n);
    break;
  case OP_SET:
    memset(o->dst, o->value, o->n);
    break;
  case OP_KERNEL:
    o->fn(o->owned);
    break;
  case OP_RECORD:
    pthread_mutex_lock(&mu);
    if (o->ev->done_seq < o->seq) o->ev->done_seq = o->seq;
    pthread_mutex_unlock(&mu);
    break;
  case OP_RECORD_EXTERNAL: /* a replayed graph node: records when the replay reaches it */
    pthread_mutex_lock(&mu);
    o->ev->done_seq = ++o->ev->rec_seq;
    pthread_mutex_unlock(&mu);
    break;
  case OP_WAIT: /* handled by the scheduler: it runs only once the event is done */
  case OP_ALLREDUCE: /* run by run_allreduce */
    break;
  }
}

/* Whether the head op of stream t may run (the lock is held). An all-reduce notes that
   its rank has reached it, and runs once every rank has. */
static int runnable(op *o, struct sim_stream *t) {
  if (o->kind == OP_WAIT) return o->ev->done_seq >= o->seq;
  if (o->kind == OP_ALLREDUCE) {
    struct sim_reduce *r = o->red;
    r->at_head |= 1u << o->comm->rank;
    r->ops[o->comm->rank] = o;
    r->streams[o->comm->rank] = t;
    return r->at_head == (1u << o->comm->clique->n) - 1;
  }
  return 1;
}

/* Binds an all-reduce op put on a stream (eagerly, at a group's end, or by a replay) to
   the all-reduce of the same number on the other ranks (the lock is held). */
static void bind_allreduce(op *o) {
  struct sim_clique *q = o->comm->clique;
  uint64_t seq = q->issued[o->comm->rank]++;
  struct sim_reduce **p = &q->pending;
  while (*p && (*p)->seq != seq) p = &(*p)->next;
  if (!*p) {
    *p = calloc(1, sizeof **p);
    if (!*p) abort();
    (*p)->seq = seq;
    (*p)->count = o->n;
  } else if ((*p)->count != o->n) { /* NCCL would read past a buffer, or hang */
    fprintf(stderr, "simulated NCCL: all-reduce %llu of rank %d has %zu floats, another rank's %zu\n",
            (unsigned long long)seq, o->comm->rank, o->n, (*p)->count);
    abort();
  }
  o->red = *p;
}

static void append(struct sim_graph *g, op *o) {
  if (g->tail) g->tail->next = o;
  else g->head = o;
  g->tail = o;
}

static void graph_free(struct sim_graph *g) {
  free_ops(g->head);
  free(g);
}

static struct sim_stream *last; /* the stream served last (round robin) */

/* Every rank's op heads its stream: they leave their streams together, the buffers are
   summed in rank order in float32 and every rank's gets the sum (the lock is held on
   entry and exit, released while adding). */
static void run_allreduce(struct sim_reduce *r, struct sim_clique *q) {
  const int n = q->n;
  for (int k = 0; k < n; k++) {
    struct sim_stream *t = r->streams[k];
    t->head = r->ops[k]->next;
    if (!t->head) t->tail = NULL;
    t->running = 1;
  }
  for (struct sim_reduce **p = &q->pending; *p; p = &(*p)->next)
    if (*p == r) {
      *p = r->next;
      break;
    }
  pthread_mutex_unlock(&mu);
  if (delay_ns) nanosleep(&(struct timespec){0, delay_ns}, NULL);
  float *sum = malloc((r->count ? r->count : 1) * sizeof *sum);
  if (!sum) abort();
  memcpy(sum, r->ops[0]->dst, r->count * sizeof *sum);
  for (int k = 1; k < n; k++) {
    const float *b = r->ops[k]->dst;
    for (size_t i = 0; i < r->count; i++) sum[i] += b[i];
  }
  for (int k = 0; k < n; k++) memcpy(r->ops[k]->dst, sum, r->count * sizeof *sum);
  free(sum);
  pthread_mutex_lock(&mu);
  for (int k = 0; k < n; k++) {
    r->streams[k]->running = 0;
    r->ops[k]->next = NULL;
    free_ops(r->ops[k]);
  }
  free(r);
  pthread_cond_broadcast(&cv);
}

static void *device_thread(void *arg) {
  (void)arg;
  pthread_mutex_lock(&mu);
  for (;;) {
    /* round robin over the streams, from the one after the last served */
    struct sim_stream *pick = NULL, *s = last && last->next ? last->next : streams;
    for (int pass = 0; pass < 2 && !pick; pass++) {
      for (struct sim_stream *t = s; t && !pick; t = t->next)
        if (t->head && !t->running && runnable(t->head, t)) pick = t;
      s = streams;
    }
    if (!pick) {
      if (quit) break;
      pthread_cond_wait(&cv, &mu);
      continue;
    }
    if (pick->head->kind == OP_ALLREDUCE) {
      run_allreduce(pick->head->red, pick->head->comm->clique);
      last = pick;
      continue;
    }
    op *o = pick->head;
    pick->head = o->next;
    if (!pick->head) pick->tail = NULL;
    pick->running = 1;
    last = pick;
    pthread_mutex_unlock(&mu);
    if (delay_ns) nanosleep(&(struct timespec){0, delay_ns}, NULL);
    run_op(o);
    pthread_mutex_lock(&mu);
    pick->running = 0;
    o->next = NULL;
    free_ops(o);
    pthread_cond_broadcast(&cv);
  }
  pthread_mutex_unlock(&mu);
  return NULL;
}

/* The device thread runs code of this library: it must end before the library is
   unmapped (a host that dlcloses it, as LuaJIT does at exit). Work still queued then
   runs first. */
__attribute__((destructor)) static void stop(void) {
  if (!started) return;
  pthread_mutex_lock(&mu);
  quit = 1;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
  pthread_join(device, NULL);
}

static void start(void) {
  const char *d = getenv("LMOE_SIM_DELAY_US"), *m = getenv("LMOE_SIM_MEMORY_MB");
  const char *nd = getenv("LMOE_SIM_DEVICES");
  if (nd && atoi(nd) >= 1 && atoi(nd) <= SIM_MAX_DEVICES) ndevices = atoi(nd);
  delay_ns = (d ? atol(d) : 20) * 1000L;
  if (delay_ns < 0 || delay_ns > 999999999L) delay_ns = 20000;
  capacity = (size_t)(m ? atol(m) : 8192) << 20;
  if (pthread_create(&device, NULL, device_thread, NULL) != 0) {
    fprintf(stderr, "simulated device: cannot start its thread\n");
    abort();
  }
  started = 1;
}

static void lock(void) {
  pthread_once(&once, start);
  pthread_mutex_lock(&mu);
}

static void unlock(void) { pthread_mutex_unlock(&mu); }

static struct sim_stream *S(cudaStream_t s) { return s ? s : &legacy; }

static int idle(const struct sim_stream *s) { return !s->head && !s->running; }

static void wait_idle(struct sim_stream *s) {
  while (!idle(s)) pthread_cond_wait(&cv, &mu);
}

/* ---------------------------------------------------------------- capture rules */

static void invalidate(struct sim_stream *s) {
  if (s->capture == cudaStreamCaptureStatusActive) s->capture = cudaStreamCaptureStatusInvalidated;
}

/* A call that synchronises or allocates while captures are active: the captures it
   would break are invalidated and it fails (the lock is held). `s` is the stream it
   synchronises, if any. */
static cudaError_t unsafe_call(struct sim_stream *s) {
  int broke = 0;
  for (struct sim_stream *t = streams; t; t = t->next) {
    if (t->capture != cudaStreamCaptureStatusActive) continue;
    int hit = t == s || t->mode == cudaStreamCaptureModeGlobal ||
              (t->mode == cudaStreamCaptureModeThreadLocal && pthread_equal(t->capture_thread, pthread_self()));
    if (hit) {
      invalidate(t);
      broke = 1;
    }
  }
  return broke ? fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

/* Appends o to the stream, or to its capture (lock held). */
static cudaError_t enqueue(struct sim_stream *s, op *o) {
  if (s->capture == cudaStreamCaptureStatusInvalidated) {
    free_ops(o);
    return fail(cudaErrorStreamCaptureInvalidated);
  }
  if (s->capture == cudaStreamCaptureStatusActive) {
    if (o->kind == OP_WAIT) { /* cudaStreamWaitEvent handles the capture's own events */
      invalidate(s);
      free_ops(o);
      return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (o->kind == OP_RECORD) { /* an internal dependency: nothing to record at replay */
      o->ev->cap_id = s->cap_id, o->ev->cap_stream = s, o->ev->cap_pos = s->cap_n;
      free_ops(o);
      return cudaSuccess;
    }
    append(s->cap, o);
    s->cap_n++;
    s->joined = 0; /* work after a join needs another */
    return cudaSuccess;
  }
  if (o->kind == OP_RECORD_EXTERNAL) o->kind = OP_RECORD, o->seq = ++o->ev->rec_seq;
  if (o->kind == OP_ALLREDUCE) bind_allreduce(o);
  if (s->tail) s->tail->next = o;
  else s->head = o;
  s->tail = o;
  pthread_cond_broadcast(&cv);
  return cudaSuccess;
}

static op *new_op(int kind) {
  op *o = calloc(1, sizeof *o);
  if (!o) {
    fprintf(stderr, "simulated device: out of host memory\n");
    abort();
  }
  o->kind = kind;
  return o;
}

/* ---------------------------------------------------------------- memory */

static region *find_region(const void *p, size_t n, int device) {
  const char *c = p;
  for (region *r = regions; r; r = r->next)
    if (r->device == device && c >= r->p && c <= r->p + r->n && n <= (size_t)(r->p + r->n - c)) return r;
  return NULL;
}

int lmoe_sim_is_device(const void *p, size_t bytes) {
  lock();
  int d = find_region(p, bytes, 1) != NULL;
  unlock();
  return d;
}

static cudaError_t alloc(void **p, size_t bytes, int device) {
  if (!p) return fail(cudaErrorInvalidValue);
  *p = NULL;
  if (device && bytes > capacity - live_bytes) return fail(cudaErrorMemoryAllocation);
  region *r = malloc(sizeof *r);
  char *m = malloc(bytes ? bytes : 1);
  if (!r || !m) {
    free(r);
    free(m);
    return fail(cudaErrorMemoryAllocation);
  }
  if (device) memset(m, 0xff, bytes); /* bf16 NaN: reading memory never written shows */
  r->p = m, r->n = bytes, r->device = device, r->next = regions;
  regions = r;
  if (device) live_bytes += bytes;
  *p = m;
  return cudaSuccess;
}

static cudaError_t release(void *p, int device) {
  if (!p) return cudaSuccess;
  for (region **q = &regions; *q; q = &(*q)->next) {
    region *r = *q;
    if (r->p == p && r->device == device) {
      *q = r->next;
      if (device) live_bytes -= r->n;
      free(r->p);
      free(r);
      return cudaSuccess;
    }
  }
  return fail(cudaErrorInvalidValue);
}

cudaError_t cudaMalloc(void **p, size_t bytes) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaMalloc_v3020, "cudaMalloc", NULL);
  lock();
  cudaError_t e = unsafe_call(NULL);
  if (!e) e = alloc(p, bytes, 1);
  unlock();
  return e;
}

/* Like CUDA's, it waits for the device first. */
cudaError_t cudaFree(void *p) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaFree_v3020, "cudaFree", NULL);
  lock();
  cudaError_t e = unsafe_call(NULL);
  if (!e) {
    for (struct sim_stream *s = streams; s; s = s->next) wait_idle(s);
    e = release(p, 1);
  }
  unlock();
  return e;
}

cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned int flags) {
  (void)flags;
  api(CUPTI_RUNTIME_TRACE_CBID_cudaHostAlloc_v3020, "cudaHostAlloc", NULL);
  lock();
  cudaError_t e = unsafe_call(NULL);
  if (!e) e = alloc(p, bytes, 0);
  unlock();
  return e;
}

cudaError_t cudaFreeHost(void *p) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaFreeHost_v3020, "cudaFreeHost", NULL);
  lock();
  cudaError_t e = unsafe_call(NULL);
  if (!e) {
    for (struct sim_stream *s = streams; s; s = s->next) wait_idle(s);
    e = release(p, 0);
  }
  unlock();
  return e;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  lock();
  if (free_bytes) *free_bytes = capacity - live_bytes;
  if (total_bytes) *total_bytes = capacity;
  unlock();
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                            cudaStream_t stream) {
  cudaMemcpyAsync_v3020_params prm = {dst, src, bytes, kind, stream};
  api(CUPTI_RUNTIME_TRACE_CBID_cudaMemcpyAsync_v3020, "cudaMemcpyAsync", &prm);
  if (!bytes) return cudaSuccess;
  lock();
  struct sim_stream *s = S(stream);
  int dst_dev = find_region(dst, bytes, 1) != NULL, src_dev = find_region(src, bytes, 1) != NULL;
  int dst_pinned = find_region(dst, bytes, 0) != NULL, src_pinned = find_region(src, bytes, 0) != NULL;
  cudaError_t e = cudaSuccess;
  /* a pointer that is in device memory but runs past its allocation */
  if ((!dst_dev && find_region(dst, 1, 1)) || (!src_dev && find_region(src, 1, 1)))
    e = fail(cudaErrorInvalidValue);
  if (!e && ((kind == cudaMemcpyHostToDevice && (!dst_dev || src_dev)) ||
             (kind == cudaMemcpyDeviceToHost && (dst_dev || !src_dev)) ||
             (kind == cudaMemcpyDeviceToDevice && (!dst_dev || !src_dev))))
    e = fail(cudaErrorInvalidValue);
  if (!e && !dst_dev && !src_dev) { /* host to host: done at the call */
    memmove(dst, src, bytes);
    unlock();
    return cudaSuccess;
  }
  int pageable_src = !src_dev && !src_pinned, pageable_dst = !dst_dev && !dst_pinned;
  if (!e && s->capture == cudaStreamCaptureStatusActive && (pageable_src || pageable_dst)) {
    invalidate(s);
    e = fail(cudaErrorStreamCaptureUnsupported);
  }
  if (!e && pageable_dst) e = unsafe_call(s); /* returns once done: a host wait */
  if (!e) {
    op *o = new_op(OP_COPY);
    o->dst = dst, o->src = src, o->n = bytes;
    if (pageable_src) { /* the driver stages a pageable source at the call */
      o->owned = malloc(bytes);
      if (!o->owned) abort();
      memcpy(o->owned, src, bytes);
    }
    e = enqueue(s, o);
    if (!e && pageable_dst) wait_idle(s);
  }
  unlock();
  return e;
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaMemsetAsync_v3020, "cudaMemsetAsync", NULL);
  if (!bytes) return cudaSuccess;
  lock();
  cudaError_t e = find_region(dst, bytes, 1) ? cudaSuccess : fail(cudaErrorInvalidValue);
  if (!e) {
    op *o = new_op(OP_SET);
    o->dst = dst, o->n = bytes, o->value = value;
    e = enqueue(S(stream), o);
  }
  unlock();
  return e;
}

cudaError_t lmoe_sim_launch(cudaStream_t stream, void (*fn)(const void *), const void *args, size_t bytes) {
  op *o = new_op(OP_KERNEL);
  o->fn = fn;
  o->n = bytes;
  o->owned = malloc(bytes ? bytes : 1);
  if (!o->owned) abort();
  memcpy(o->owned, args, bytes);
  lock();
  cudaError_t e = enqueue(S(stream), o);
  unlock();
  return e;
}

/* ---------------------------------------------------------------- device */

static const struct {
  cudaError_t e;
  const char *name, *text;
} errors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorStreamCaptureUnsupported, "cudaErrorStreamCaptureUnsupported",
     "operation not permitted when stream is capturing"},
    {cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated",
     "operation failed due to a previous error during capture"},
    {cudaErrorStreamCaptureUnmatched, "cudaErrorStreamCaptureUnmatched",
     "capture was not initiated in this stream"},
    {cudaErrorStreamCaptureUnjoined, "cudaErrorStreamCaptureUnjoined",
     "capture sequence contains a fork that was not joined to the primary stream"},
    {cudaErrorStreamCaptureImplicit, "cudaErrorStreamCaptureImplicit",
     "operation would make the legacy stream depend on a capturing blocking stream"},
};

const char *cudaGetErrorString(cudaError_t e) {
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].e == e) return errors[i].text;
  return "unknown error";
}

const char *cudaGetErrorName(cudaError_t e) {
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].e == e) return errors[i].name;
  return "cudaErrorUnknown";
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int *n) {
  pthread_once(&once, start);
  *n = ndevices;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
  pthread_once(&once, start);
  if (device < 0 || device >= ndevices) return fail(cudaErrorInvalidDevice);
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "loramoe simulated device (CPU)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 4;
  p->totalGlobalMem = capacity;
  p->l2CacheSize = 4 << 20;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  pthread_once(&once, start);
  if (device < 0 || device >= ndevices) return fail(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int *device) {
  *device = current_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaDeviceSynchronize_v3020, "cudaDeviceSynchronize", NULL);
  lock();
  cudaError_t e = unsafe_call(NULL);
  if (!e)
    for (struct sim_stream *s = streams; s; s = s->next) wait_idle(s);
  unlock();
  return e;
}

/* ---------------------------------------------------------------- streams */

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *out, unsigned int flags) {
  (void)flags;
  struct sim_stream *s = calloc(1, sizeof *s);
  if (!s) return fail(cudaErrorMemoryAllocation);
  lock();
  s->next = streams->next; /* after the legacy stream, which stays first */
  streams->next = s;
  unlock();
  *out = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *out) { return cudaStreamCreateWithFlags(out, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return fail(cudaErrorInvalidResourceHandle);
  lock();
  wait_idle(stream); /* CUDA lets the work finish after the call; here the call waits */
  for (struct sim_stream **q = &streams; *q; q = &(*q)->next)
    if (*q == stream) {
      *q = stream->next;
      break;
    }
  if (last == stream) last = NULL;
  unlock();
  if (stream->cap && stream->origin == stream) graph_free(stream->cap);
  free(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_v3020, "cudaStreamSynchronize", NULL);
  lock();
  cudaError_t e = unsafe_call(S(stream));
  if (!e) wait_idle(S(stream));
  unlock();
  return e;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaStreamQuery_v3020, "cudaStreamQuery", NULL);
  lock();
  cudaError_t e = unsafe_call(S(stream));
  if (!e && !idle(S(stream))) e = cudaErrorNotReady;
  unlock();
  return e;
}

/* The stream whose capture ev was recorded in, while that capture is active (lock held). */
static struct sim_stream *capture_of(const struct sim_event *ev) {
  if (!ev->cap_id) return NULL;
  for (struct sim_stream *t = streams; t; t = t->next)
    if (t->cap_id == ev->cap_id && t->origin == t && t->capture != cudaStreamCaptureStatusNone) return t;
  return NULL;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t ev, unsigned int flags) {
  (void)flags;
  if (!ev) return fail(cudaErrorInvalidResourceHandle);
  lock();
  cudaError_t e = cudaSuccess;
  struct sim_stream *s = S(stream), *origin = capture_of(ev);
  if (origin && s->capture != cudaStreamCaptureStatusNone && s->cap_id == ev->cap_id) {
    /* a dependency inside the capture; the origin waiting on a forked stream's last
       node joins that stream */
    struct sim_stream *f = ev->cap_stream;
    if (s == origin && f != origin && f->cap_id == s->cap_id && ev->cap_pos == f->cap_n) f->joined = 1;
  } else if (origin && s->capture == cudaStreamCaptureStatusNone && s != &legacy) {
    /* a fork: s joins the capture, its work from now on is the graph's */
    s->capture = origin->capture;
    s->cap = origin->cap, s->cap_id = origin->cap_id, s->origin = origin;
    s->mode = origin->mode, s->capture_thread = origin->capture_thread;
    s->cap_n = 0, s->joined = 0;
  } else if (origin) {
    if (s->capture == cudaStreamCaptureStatusActive) invalidate(s);
    e = fail(cudaErrorStreamCaptureUnsupported);
  } else if (ev->rec_seq) { /* never recorded: nothing to wait for */
    op *o = new_op(OP_WAIT);
    o->ev = ev, o->seq = ev->rec_seq;
    e = enqueue(S(stream), o);
  }
  unlock();
  return e;
}

/* ---------------------------------------------------------------- events */

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *out, unsigned int flags) {
  (void)flags;
  *out = calloc(1, sizeof **out);
  return *out ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaEventCreate(cudaEvent_t *out) { return cudaEventCreateWithFlags(out, cudaEventDefault); }

/* Like CUDA, an event may be destroyed while a record of it is pending; the device
   thread must not touch it after that, so here the call waits for those records. */
cudaError_t cudaEventDestroy(cudaEvent_t ev) {
  if (!ev) return fail(cudaErrorInvalidResourceHandle);
  lock();
  while (ev->done_seq < ev->rec_seq) pthread_cond_wait(&cv, &mu);
  unlock();
  free(ev);
  return cudaSuccess;
}

cudaError_t cudaEventRecordWithFlags(cudaEvent_t ev, cudaStream_t stream, unsigned int flags) {
  if (!ev) return fail(cudaErrorInvalidResourceHandle);
  lock();
  op *o = new_op(flags & cudaEventRecordExternal ? OP_RECORD_EXTERNAL : OP_RECORD);
  o->ev = ev;
  struct sim_stream *s = S(stream);
  if (o->kind == OP_RECORD && s->capture != cudaStreamCaptureStatusActive) o->seq = ++ev->rec_seq, ev->cap_id = 0;
  cudaError_t e = enqueue(s, o);
  unlock();
  return e;
}

cudaError_t cudaEventRecord(cudaEvent_t ev, cudaStream_t stream) {
  return cudaEventRecordWithFlags(ev, stream, cudaEventRecordDefault);
}

cudaError_t cudaEventQuery(cudaEvent_t ev) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaEventQuery_v3020, "cudaEventQuery", NULL);
  if (!ev) return fail(cudaErrorInvalidResourceHandle);
  lock();
  cudaError_t e = ev->done_seq >= ev->rec_seq ? cudaSuccess : cudaErrorNotReady;
  unlock();
  return e;
}

cudaError_t cudaEventSynchronize(cudaEvent_t ev) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaEventSynchronize_v3020, "cudaEventSynchronize", NULL);
  if (!ev) return fail(cudaErrorInvalidResourceHandle);
  lock();
  cudaError_t e = unsafe_call(NULL);
  uint64_t want = ev->rec_seq;
  while (!e && ev->done_seq < want) pthread_cond_wait(&cv, &mu);
  unlock();
  return e;
}

/* ---------------------------------------------------------------- graphs */

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, enum cudaStreamCaptureMode mode) {
  lock();
  struct sim_stream *s = S(stream);
  cudaError_t e = cudaSuccess;
  if (s == &legacy || s->capture != cudaStreamCaptureStatusNone) {
    e = fail(cudaErrorStreamCaptureUnsupported);
  } else {
    s->cap = calloc(1, sizeof *s->cap);
    if (!s->cap) abort();
    s->capture = cudaStreamCaptureStatusActive;
    s->mode = mode;
    s->capture_thread = pthread_self();
    s->cap_id = ++next_cap_id, s->origin = s, s->cap_n = 0;
  }
  unlock();
  return e;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *g) {
  lock();
  struct sim_stream *s = S(stream);
  *g = NULL;
  cudaError_t e = cudaSuccess;
  if (s->capture == cudaStreamCaptureStatusNone || s->origin != s) {
    unlock();
    return fail(cudaErrorStreamCaptureUnmatched);
  }
  /* the streams it forked into leave it; each must have been joined */
  int invalid = s->capture == cudaStreamCaptureStatusInvalidated, unjoined = 0;
  for (struct sim_stream *t = streams; t; t = t->next) {
    if (t == s || t->cap_id != s->cap_id || t->capture == cudaStreamCaptureStatusNone) continue;
    if (t->capture == cudaStreamCaptureStatusInvalidated) invalid = 1;
    if (!t->joined) unjoined = 1;
    t->capture = cudaStreamCaptureStatusNone;
    t->cap = NULL, t->cap_id = 0, t->origin = NULL;
  }
  if (invalid || unjoined) {
    graph_free(s->cap);
    e = fail(invalid ? cudaErrorStreamCaptureInvalidated : cudaErrorStreamCaptureUnjoined);
  } else {
    *g = s->cap;
  }
  s->cap = NULL, s->cap_id = 0, s->origin = NULL;
  s->capture = cudaStreamCaptureStatusNone;
  unlock();
  return e;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status) {
  lock();
  *status = (enum cudaStreamCaptureStatus)S(stream)->capture;
  unlock();
  return cudaSuccess;
}

/* A copy of a recorded operation (kernel arguments included). */
static op *copy_op(const op *o) {
  op *c = new_op(o->kind);
  *c = *o;
  c->next = NULL;
  c->owned = NULL;
  c->red = NULL;
  if (o->kind == OP_KERNEL) {
    c->owned = malloc(o->n ? o->n : 1);
    if (!c->owned) abort();
    memcpy(c->owned, o->owned, o->n);
  }
  return c;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags) {
  (void)flags;
  if (!g) return fail(cudaErrorInvalidValue);
  struct sim_graph *x = calloc(1, sizeof *x);
  if (!x) return fail(cudaErrorMemoryAllocation);
  for (op *o = g->head; o; o = o->next) append(x, copy_op(o)); /* g may be destroyed now */
  *exec = x;
  return cudaSuccess;
}

/* A replay puts a copy of each node on the stream: other streams' work interleaves
   with it node by node, as kernels of different streams do on a GPU. */
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  api(CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000, "cudaGraphLaunch", NULL);
  if (!exec) return fail(cudaErrorInvalidValue);
  lock();
  struct sim_stream *s = S(stream);
  cudaError_t e = cudaSuccess;
  if (s->capture != cudaStreamCaptureStatusNone) {
    invalidate(s);
    e = fail(cudaErrorStreamCaptureUnsupported);
  } else {
    for (op *o = exec->head; o; o = o->next) {
      op *c = copy_op(o);
      if (c->kind == OP_ALLREDUCE) bind_allreduce(c);
      if (s->tail) s->tail->next = c;
      else s->head = c;
      s->tail = c;
    }
    pthread_cond_broadcast(&cv);
  }
  unlock();
  return e;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  if (g) graph_free(g);
  return cudaSuccess;
}

/* Replays already launched hold copies of the nodes: the instance can go now. */
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (exec) graph_free(exec);
  return cudaSuccess;
}

/* ---------------------------------------------------------------- NCCL */

static _Thread_local int group_depth;
static _Thread_local struct pending_op {
  op *o;
  struct sim_stream *s;
} *group_ops;
static _Thread_local size_t group_n, group_cap;

ncclResult_t ncclCommInitAll(ncclComm_t *comms, int ndev, const int *devlist) {
  pthread_once(&once, start);
  if (!comms || ndev < 1 || ndev > SIM_MAX_DEVICES) return ncclInvalidArgument;
  for (int r = 0; r < ndev; r++) {
    int d = devlist ? devlist[r] : r;
    if (d < 0 || d >= ndevices) return ncclInvalidArgument;
    for (int q = 0; q < r; q++) /* NCCL refuses one device twice */
      if ((devlist ? devlist[q] : q) == d) return ncclInvalidUsage;
  }
  struct sim_clique *q = calloc(1, sizeof *q);
  if (!q) return ncclSystemError;
  q->n = q->refs = ndev;
  for (int r = 0; r < ndev; r++) {
    comms[r] = calloc(1, sizeof *comms[r]);
    if (!comms[r]) abort();
    comms[r]->clique = q, comms[r]->rank = r, comms[r]->device = devlist ? devlist[r] : r;
  }
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  lock();
  struct sim_clique *q = comm->clique;
  int last_ref = --q->refs == 0;
  unlock();
  if (last_ref) free(q);
  free(comm);
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
  if (!comm || !count) return ncclInvalidArgument;
  *count = comm->clique->n;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
  if (!comm || !rank) return ncclInvalidArgument;
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device) {
  if (!comm || !device) return ncclInvalidArgument;
  *device = comm->device;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                           ncclRedOp_t red, ncclComm_t comm, cudaStream_t stream) {
  if (!comm || sendbuff != recvbuff || datatype != ncclFloat32 || red != ncclSum) return ncclInvalidArgument;
  lock();
  ncclResult_t r = ncclSuccess;
  if (count && !find_region(recvbuff, count * sizeof(float), 1)) r = ncclInvalidArgument;
  if (!r) {
    op *o = new_op(OP_ALLREDUCE);
    o->dst = recvbuff, o->n = count, o->comm = comm;
    if (group_depth) { /* enqueued by the group's end */
      if (group_n == group_cap) {
        group_cap = group_cap ? 2 * group_cap : 8;
        group_ops = realloc(group_ops, group_cap * sizeof *group_ops);
        if (!group_ops) abort();
      }
      group_ops[group_n++] = (struct pending_op){o, S(stream)};
    } else if (enqueue(S(stream), o)) {
      r = ncclUnhandledCudaError;
    }
  }
  unlock();
  return r;
}

ncclResult_t ncclGroupStart(void) {
  group_depth++;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
  if (group_depth == 0) return ncclInvalidUsage;
  if (--group_depth) return ncclSuccess;
  ncclResult_t r = ncclSuccess;
  lock();
  for (size_t i = 0; i < group_n; i++)
    if (enqueue(group_ops[i].s, group_ops[i].o)) r = ncclUnhandledCudaError;
  group_n = 0;
  unlock();
  return r;
}

const char *ncclGetErrorString(ncclResult_t result) {
  switch (result) {
  case ncclSuccess: return "no error";
  case ncclInvalidArgument: return "invalid argument (the simulated NCCL: in-place float32 sums only)";
  case ncclInvalidUsage: return "invalid usage";
  case ncclSystemError: return "system error";
  default: return "error";
  }
}

/* ---------------------------------------------------------------- CUPTI */

CUptiResult cuptiSubscribe(CUpti_SubscriberHandle *sub, CUpti_CallbackFunc fn, void *user) {
  if (!sub || !fn) return CUPTI_ERROR_INVALID_PARAMETER;
  cb_fn = fn;
  cb_user = user;
  *sub = &the_subscriber;
  return CUPTI_SUCCESS;
}

CUptiResult cuptiEnableDomain(unsigned int enable, CUpti_SubscriberHandle sub, CUpti_CallbackDomain domain) {
  if (sub != &the_subscriber || domain != CUPTI_CB_DOMAIN_RUNTIME_API) return CUPTI_ERROR_INVALID_PARAMETER;
  cb_enabled = enable != 0;
  return CUPTI_SUCCESS;
}

CUptiResult cuptiUnsubscribe(CUpti_SubscriberHandle sub) {
  if (sub != &the_subscriber) return CUPTI_ERROR_INVALID_PARAMETER;
  cb_enabled = 0;
  cb_fn = NULL;
  return CUPTI_SUCCESS;
}
