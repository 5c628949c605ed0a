/* Private to the library: object layouts, the backend table, helpers. */
#ifndef LMOE_INTERNAL_H
#define LMOE_INTERNAL_H

#include "loramoe.h"
#include "batch_meta.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LMOE_ERRBUF 512

typedef struct lmoe_backend_ops lmoe_backend_ops;

/* Every object starts with this header: a reference count, so a child keeps its
   parent alive, a magic that catches handles of the wrong kind, and the function that
   destroys it when the last reference goes (object.c). Whoever holds a reference
   drops it with lmoe_object_release, whatever the kind: a backend that keeps a batch
   alive needs nothing of batch.c. */
typedef struct lmoe_object lmoe_object;
struct lmoe_object {
  uint32_t magic;
  atomic_int refs;
  void (*destroy)(lmoe_object *obj);
};

/* object.c: one reference; the magic is cleared before destroy runs. */
void lmoe_object_init(lmoe_object *obj, uint32_t magic, void (*destroy)(lmoe_object *obj));
bool lmoe_object_is(const void *handle, uint32_t magic); /* NULL: false */
void lmoe_object_retain(lmoe_object *obj);
void lmoe_object_release(lmoe_object *obj);

enum {
  LMOE_MAGIC_CONTEXT = 0x4c4d4358, /* "LMCX" */
  LMOE_MAGIC_BUFFER = 0x4c4d4246,
  LMOE_MAGIC_LAYER = 0x4c4d4c59,
  LMOE_MAGIC_POOL = 0x4c4d504c,
  LMOE_MAGIC_BATCH = 0x4c4d4254,
  LMOE_MAGIC_GRAPH = 0x4c4d4752,
  LMOE_MAGIC_COMM = 0x4c4d434d
};

struct lmoe_context {
  lmoe_object obj;
  const lmoe_backend_ops *ops;
  void *be; /* backend state */
  int32_t device;
  void *stream;
  int32_t threads;
  int32_t guard;
  lmoe_allocator allocator;
  lmoe_counters counters;
  /* Of counters.host_waits, those made because a ring of staging was full
     (lmoe_wait_counters; lmoe_count_wait). */
  uint64_t backpressure_waits;
  /* Workspace shared by all forwards of this context, sized by the largest layer's
     upper bounds; grown only outside forwards (layer creation). */
  void *workspace;
  size_t workspace_bytes;
  /* A capture in progress (graph.c): its stream, the counters at its start (work
     counted while capturing has not run, so lmoe_graph_end takes it back out), and the
     first failed forward's status (the graph would miss that work). */
  int32_t capturing;
  void *capture_stream;
  lmoe_status capture_failed;
  lmoe_counters capture_start;
  /* Two reusable host buffers for staged uploads (upload.c), made on first use and
     kept: page-locked where the backend has that. chunk is the size of each.
     inflight[i]: a copy out of buf[i] may not have run yet (ev[i] tells when it has);
     kept across uploads, since an upload may end without waiting for its copies. */
  struct {
    void *buf[2];
    void *ev[2]; /* the backend's events, NULL where it has none */
    size_t chunk;
    bool pinned;
    bool inflight[2];
    int next; /* the buffer the next upload starts with: the one filled longest ago */
  } staging;
  char error[LMOE_ERRBUF];
};

struct lmoe_buffer {
  lmoe_object obj;
  lmoe_context *ctx;
  int32_t dtype;
  int32_t memory;
  int32_t ndim;
  int64_t shape[LMOE_MAX_DIMS];
  int64_t numel;
  size_t bytes;
  void *data;
  bool owned;
};

/* A layer holds its rank's shard (docs/design.md, "Sharding"): cfg is the config as
   given (the whole layer's E and I), local the same with the shapes this rank stores
   and computes, experts [e0, e0 + local.num_experts) and intermediate columns
   [i0, i0 + local.intermediate). Unsharded: local == cfg, e0 = i0 = 0. Storage, pools
   and workspaces are sized by local; routing is over cfg.num_experts. */
struct lmoe_layer {
  lmoe_object obj;
  lmoe_context *ctx;
  lmoe_layer_config cfg;
  lmoe_layer_config local;
  int32_t e0, i0;
  lmoe_comm *comm;  /* NULL when unsharded without a communicator */
  lmoe_buffer *w13; /* [E, 2I, H] bf16 (local shapes), device memory; f8_e4m3 codes in an FP8 layer */
  lmoe_buffer *w2;  /* [E, H, I] bf16 or f8_e4m3 */
  /* FP8 layers (cfg.weight_dtype f8_e4m3) only, else NULL: f32 scales of 128x128 blocks,
     w = code * scale. w13s [E, 2*nbi, nbh]: gate's row blocks, then up's (each part
     blocked on its own, as per-expert checkpoints are); w2s [E, nbh, nbi];
     nbh = ceil(H/128), nbi = ceil(I/128). */
  lmoe_buffer *w13s, *w2s;
  void *be;         /* backend per-layer state */
};

/* comm.c: communicators. cpu: the ranks of a group meet in host memory; nccl: a
   wrapped or owned ncclComm_t. */
typedef struct lmoe_comm_group lmoe_comm_group;
/* comm.c, for lmoe_forward_group (forward_group.c): begin is false while another group
   forward of the communicator is collecting; end sums the recorded partials into every
   rank's output (when st is LMOE_OK) and returns the status. */
bool lmoe_comm_group_collect_begin(lmoe_comm_group *g);
lmoe_status lmoe_comm_group_collect_end(lmoe_comm_group *g, lmoe_context *c0, int32_t n, lmoe_status st);
struct lmoe_comm {
  lmoe_object obj;
  lmoe_context *ctx;
  int32_t rank, size;
  lmoe_comm_group *group; /* cpu, or device contexts of one device (the sum is a kernel) */
  void *nccl;             /* ncclComm_t */
  bool owns_nccl;
};
/* A group communicator over device contexts of one device sums its ranks' partials
   with one kernel reading them all: at most this many ranks. */
enum { LMOE_DEVICE_GROUP_MAX = 64 };
/* comm.c, builds with NCCL only: the in-place float32 all-reduce of a rank's partial on
   the forward's stream (enqueued, capturable; no host wait). */
lmoe_status lmoe_comm_nccl_allreduce_f32(lmoe_comm *c, float *buf, size_t count, void *stream);
/* Rank r's part [*lo, *lo + *n) of a dimension of `total` over `size` ranks: the first
   total % size ranks hold one more (loramoe.h, lmoe_shard_mode). */
void lmoe_shard_range(int32_t total, int32_t rank, int32_t size, int32_t *lo, int32_t *n);
/* The cpu sum over the ranks: this rank's partial rows (rows x cols f32, row t at
   part + t * stride) with every other rank's, in rank order, rounded once to bf16 into
   out [rows, cols]. Returns when every rank has read every partial. failed: this
   rank's forward failed before its sum; it still joins so the others return (with an
   error, writing nothing). Under lmoe_forward_group it only records the partial. */
lmoe_status lmoe_comm_cpu_allreduce(lmoe_comm *c, lmoe_context *ctx, const float *part, int64_t rows,
                                    int64_t cols, int64_t stride, uint16_t *out, bool failed);

/* Per-slot facts kept on the host. Ranges index the shrink rows of a13:
   gate uses rows [g_lo, g_hi), up uses [u_lo, u_hi) (fused: both [0, r)). */
typedef struct lmoe_slot {
  bool loaded;
  int32_t targets;
  int32_t fused;
  int32_t r13;          /* valid rows of a13 = g/u ranges' union */
  int32_t g_lo, g_hi, u_lo, u_hi;
  int32_t r2;           /* down rank, 0 when absent */
  float scale_gate, scale_up, scale_down;
  uint64_t generation;
  /* life cycle (pool.c): pins survive loads and unloads; the name is the adapter's */
  int32_t pins;
  uint64_t last_used;   /* pool clock at the last load/touch/batch/forward */
  char name[LMOE_ADAPTER_NAME_MAX];
} lmoe_slot;

/* Canonical adapter storage, bf16 in device memory, one block per slot:
     a13 [E, R13, H]   R13 = 2 * max_rank (room for separate gate + up)
     b13 [E, 2I, R13]  gate rows use columns [g_lo,g_hi), up rows [u_lo,u_hi); rest zero
     a2  [E, R, I]     R = max_rank
     b2  [E, H, R]
   Unused rows/columns are zero, so a kernel may also sweep the full padded rank. */
struct lmoe_pool {
  lmoe_object obj;
  lmoe_layer *layer;
  lmoe_pool_config cfg;
  lmoe_slot *slots;
  void *storage;        /* device memory, num_slots * slot_bytes */
  size_t slot_bytes;
  size_t off_a13, off_b13, off_a2, off_b2; /* byte offsets inside a slot */
  void *be;             /* backend per-pool state */
  uint64_t clock;       /* recency counter for LRU (pool.c) */
  int64_t evictions;
};

/* A batch: its facts computed once by lmoe_batch_set, in the encoded form the backends
   read (batch_meta.h: requests, offsets, group per request, active slots), plus what
   only the host asks (tokens per active slot, the largest rank). Arrays grow, never
   shrink. */
struct lmoe_batch {
  lmoe_object obj;
  lmoe_context *ctx;
  int32_t *meta;          /* the encoding; meta[0] = 0 requests until the first set */
  size_t meta_cap;        /* words */
  int64_t num_tokens;
  int64_t *active_tokens; /* tokens per active slot, in the order of the active slots */
  int64_t *slot_table;    /* scratch, indexed by slot: tokens, then group */
  int32_t table_cap;      /* entries of active_tokens and slot_table */
  int32_t max_rank;
  int32_t max_slot;
  uint64_t version;       /* bumps on every lmoe_batch_set */
  int32_t depth;          /* places in the backend's metadata staging ring (lmoe_batch_config) */
  bool unstaged;          /* the backend could not stage the last set: forwards refuse it */
  void *be;               /* backend per-batch state (staging for the upload) */
};

/* A captured, instantiated graph (graph.c; the backend's executable in be). per_launch
   is what one replay adds to the counters besides its single launch. */
struct lmoe_graph {
  lmoe_object obj;
  lmoe_context *ctx;
  void *be;
  lmoe_counters per_launch;
};

/* What the core hands a backend's forward, validated. */
typedef struct lmoe_forward_plan {
  lmoe_layer *layer;
  lmoe_pool *pool;        /* NULL when no LoRA */
  const lmoe_batch *batch;
  int64_t M;
  const lmoe_buffer *x, *logits, *topk_ids, *topk_w;
  lmoe_buffer *out;
  const int32_t *meta;    /* the batch's encoding (batch_meta.h) */
  int32_t guard;
  bool run_lora;          /* host decision: enqueue LoRA work (guard host/always) */
  /* lmoe_forward_group on a device backend: the forward leaves the rank's float32
     partial in its workspace and the group sums it (ops shard_chunk over NCCL, else
     group_forward). */
  bool shard_defer;
} lmoe_forward_plan;

/* What the core asks of a backend instead of asking which one it is. */
typedef struct lmoe_backend_caps {
  /* Its device memory is host memory: the host reads and writes it in place, and a
     copy between the two is a memmove (nothing to upload or download, or count). */
  bool host_memory;
  /* Every call has finished when it returns: there is never enqueued work to wait
     for, so nothing waits and no host wait is counted. */
  bool synchronous;
} lmoe_backend_caps;

struct lmoe_backend_ops {
  const char *name;
  int32_t kind; /* lmoe_backend: what lmoe_context_backend reports */
  lmoe_backend_caps caps;
  /* Optional devices (NULL: none, the backend is always available): the count the
     runtime sees, and one device's facts (lmoe_device_get_info). */
  int32_t (*device_count)(void);
  lmoe_status (*device_info)(int32_t device, lmoe_device_info *out);
  lmoe_status (*init)(lmoe_context *ctx);
  void (*fini)(lmoe_context *ctx);
  /* memory: LMOE_MEMORY_HOST / DEVICE; both are host memory on the cpu backend */
  lmoe_status (*alloc)(lmoe_context *ctx, int32_t memory, size_t bytes, void **out);
  void (*free)(lmoe_context *ctx, int32_t memory, void *p);
  /* Copy; blocking != 0 waits for completion (counted by the core). */
  lmoe_status (*copy)(lmoe_context *ctx, void *dst, int32_t dst_mem, const void *src,
                      int32_t src_mem, size_t bytes, void *stream, int blocking);
  lmoe_status (*synchronize)(lmoe_context *ctx, void *stream);
  lmoe_status (*fill_random)(lmoe_context *ctx, lmoe_buffer *buf, uint64_t seed, float lo,
                             float hi, void *stream);
  lmoe_status (*fill)(lmoe_context *ctx, lmoe_buffer *buf, double value, void *stream);
  /* Workspace bytes a layer needs for max_tokens (may be 0). */
  size_t (*workspace_bytes)(const lmoe_context *ctx, const lmoe_layer_config *cfg,
                            const lmoe_pool_config *pool_cfg);
  lmoe_status (*forward)(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream);
  /* Optional: whether this context computes an FP8 layer of config cfg (its reason
     reported with lmoe_fail if not). NULL: only the cpu backend computes FP8 layers. */
  lmoe_status (*fp8_check)(lmoe_context *ctx, const lmoe_layer_config *cfg);
  /* Optional, sharded layers on a device (docs/design.md, "Sharding"). After a
     deferred forward over NCCL (plan->shard_defer), its sum over ranks comes in
     shard_chunks(ctx) column chunks (those that forward enqueued), each in two phases
     of shard_chunk on the forward's stream: 0 the chunk's all-reduce (every rank's in
     one NCCL group), then 1 its rounding into out. group_forward: the ranks of a group
     communicator whose contexts share one device (comm.c), from one thread: every
     rank's forward, then one kernel summing the partials into every out, all enqueued
     on one stream; plans are validated, streams as lmoe_forward_group's. */
  int32_t (*shard_chunks)(lmoe_context *ctx);
  lmoe_status (*shard_chunk)(lmoe_context *ctx, const lmoe_forward_plan *plan, int32_t c, int32_t phase,
                             void *stream);
  lmoe_status (*group_forward)(int32_t n, lmoe_context *const *ctxs, lmoe_forward_plan *plans,
                               void *const *streams);
  /* Optional hooks for backend state hung on objects (the `be` fields). */
  lmoe_status (*pool_init)(lmoe_context *ctx, lmoe_pool *pool);
  void (*pool_fini)(lmoe_context *ctx, lmoe_pool *pool);
  /* After a slot was loaded or unloaded (its lmoe_slot facts are current). */
  lmoe_status (*slot_changed)(lmoe_context *ctx, lmoe_pool *pool, int32_t slot);
  /* At the end of a successful lmoe_batch_set: stage the metadata for upload (cuda: the
     next place of the batch's staging ring, b->depth places; it waits, as
     backpressure, only for a queued copy out of that place). */
  lmoe_status (*batch_stage)(lmoe_context *ctx, lmoe_batch *batch);
  void (*batch_fini)(lmoe_context *ctx, lmoe_batch *batch);
  /* Optional, for staged uploads (upload.c): page-locked host memory the device copies
     from without the host waiting (NULL: pageable memory and blocking copies), and
     events: recorded on a stream after the work enqueued so far, waited for by the
     host (*waited: whether it had to; NULL ops: copies from staging are blocking). */
  lmoe_status (*pinned_alloc)(lmoe_context *ctx, size_t bytes, void **out);
  void (*pinned_free)(lmoe_context *ctx, void *p);
  lmoe_status (*event_create)(lmoe_context *ctx, void **ev);
  void (*event_destroy)(lmoe_context *ctx, void *ev);
  lmoe_status (*event_record)(lmoe_context *ctx, void *ev, void *stream);
  lmoe_status (*event_wait)(lmoe_context *ctx, void *ev, bool *waited);
  /* Optional (NULL: graphs unsupported): capture `stream` into a graph, end the capture
     and instantiate it into *exec (on failure the capture is ended and discarded),
     replay an instance on a stream (enqueue only), destroy an instance. */
  lmoe_status (*graph_begin)(lmoe_context *ctx, void *stream);
  lmoe_status (*graph_end)(lmoe_context *ctx, void *stream, void **exec);
  lmoe_status (*graph_launch)(lmoe_context *ctx, void *exec, void *stream);
  void (*graph_free)(lmoe_context *ctx, void *exec);
};

/* backends: each backend file defines one table; backends.c lists them */
const lmoe_backend_ops *lmoe_cpu_backend(void);
#ifdef LMOE_HAVE_CUDA
const lmoe_backend_ops *lmoe_cuda_backend(void);
#endif
/* The backend a context config asks for (AUTO: the first of the table whose device
   exists), or NULL with the status and the reason in *why. */
const lmoe_backend_ops *lmoe_backend_select(int32_t backend, int32_t device, lmoe_status *st,
                                            const char **why);
/* Whether the host may touch memory of this kind in place (host memory, or device
   memory of a backend whose device memory is host memory). */
static inline bool lmoe_host_addressable(const lmoe_context *ctx, int32_t memory) {
  return memory == LMOE_MEMORY_HOST || ctx->ops->caps.host_memory;
}

/* Structs that begin with struct_size (structs.c, docs/api.md "Struct sizes").
   lmoe_struct_in copies a caller's input struct into *dst (size bytes, holding the
   defaults) when its struct_size is in [oldest, size]: the fields past it keep the
   defaults. lmoe_struct_out writes src (size bytes) into a caller's output struct, up
   to its struct_size (at least 4). Either refuses another size, naming `what` and the
   init function. lmoe_struct_size_ok is the check, with the message in msg (for
   lmoe_context_create, which has no context yet). The oldest size is written
   LMOE_FIELD_END(type, the last field without a default), or 4 when all have one. */
bool lmoe_struct_size_ok(uint32_t got, size_t size, size_t oldest, const char *what, const char *init,
                         char *msg, size_t n);
lmoe_status lmoe_struct_in(lmoe_context *ctx, void *dst, size_t size, size_t oldest, const void *src,
                           const char *what, const char *init);
lmoe_status lmoe_struct_out(lmoe_context *ctx, void *dst, const void *src, size_t size, const char *what,
                            const char *init);
#define LMOE_FIELD_END(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))
/* The oldest sizes of the input structs whose fields do not all have a default (the
   others take 4 and up): used by the calls that take them and by their *_init_sized. */
#define LMOE_OLDEST_LAYER_CONFIG LMOE_FIELD_END(lmoe_layer_config, intermediate)
#define LMOE_OLDEST_FORWARD_ARGS LMOE_FIELD_END(lmoe_forward_args, out)
/* The body of every lmoe_*_init_sized: writes the first min(size, full) bytes of
   `defaults` (a whole struct of this library, full bytes) into dst with struct_size set
   to `size`, and nothing past them. Does nothing when dst is NULL, size is below
   `oldest` or does not fit struct_size's uint32_t. A size above full (a newer header)
   is kept in struct_size so that the calls refuse the struct as the rule says. */
void lmoe_struct_init(void *dst, size_t size, void *defaults, size_t full, size_t oldest);

/* Staged uploads (upload.c): host bytes bound for device memory, written into the
   context's staging and moved one stream-ordered copy per filled chunk while the host
   fills the other buffer; on a host_memory backend the span is the destination itself.
   begin; then span (host memory for up to *n of `want` bytes bound for dst, a device
   address) and commit (how many were written) as often as needed; end moves the rest
   and waits until every copy has landed (also after a failure: call it always). The
   first failure is kept and returned by end. */
typedef struct lmoe_upload {
  lmoe_context *ctx;
  bool direct;
  int cur;          /* the staging buffer being filled */
  uint8_t *dst;     /* where its bytes go */
  size_t pending;   /* bytes in it */
  lmoe_status st;
} lmoe_upload;
lmoe_status lmoe_upload_begin(lmoe_context *ctx, lmoe_upload *u);
lmoe_status lmoe_upload_span(lmoe_upload *u, void *dst, size_t want, void **host, size_t *n);
void lmoe_upload_commit(lmoe_upload *u, size_t n);
lmoe_status lmoe_upload_flush(lmoe_upload *u); /* before spans into another allocation */
lmoe_status lmoe_upload_end(lmoe_upload *u);
/* Like end, without the final wait: the last copies stay enqueued on the context's
   stream (ordered before whatever is enqueued there next), and the next upload that
   needs their staging waits for them (backpressure). A pool load ends this way. */
lmoe_status lmoe_upload_finish(lmoe_upload *u);
void lmoe_upload_staging_free(lmoe_context *ctx); /* context destroy */
enum { LMOE_STAGING_CHUNK = 32 << 20 };

/* One host wait, counted in counters.host_waits; backpressure: because a ring of
   staging was full (the host a whole ring ahead of the device), not forced. */
static inline void lmoe_count_wait(lmoe_context *ctx, bool backpressure) {
  ctx->counters.host_waits++;
  if (backpressure) ctx->backpressure_waits++;
}

/* errors (error.c): set the context's message and return the status */
lmoe_status lmoe_fail(lmoe_context *ctx, lmoe_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void lmoe_clear_error(lmoe_context *ctx);

/* conversions (convert.c) */
float lmoe_bf16_to_f32(uint16_t v);
uint16_t lmoe_f32_to_bf16(float f); /* round to nearest even, NaN kept */
float lmoe_f16_to_f32(uint16_t v);
uint16_t lmoe_f32_to_f16(float f);
float lmoe_f8e4m3_to_f32(uint8_t v);       /* exact; 0x7f/0xff NaN */
uint8_t lmoe_f32_to_f8e4m3(float f);       /* nearest even, saturating to +-448, NaN kept */
uint8_t lmoe_f64_to_f8e4m3(double d);
/* FP8 block quantization (fp8.c), one matrix [rows, cols] of doubles into codes and
   f32 scales [ceil(rows/128), ceil(cols/128)]: scale = amax / 448 (1 when the block is
   all zero), code = e4m3(w / scale). */
enum { LMOE_FP8_BLOCK = 128 };
void lmoe_fp8_quantize(const double *w, int64_t rows, int64_t cols, uint8_t *codes, float *scales);
static inline int64_t lmoe_fp8_blocks(int64_t n) { return (n + LMOE_FP8_BLOCK - 1) / LMOE_FP8_BLOCK; }
/* An FP8 layer's weights (fp8.c): the layer.c calls of the same names, for FP8 layers. */
lmoe_status lmoe_fp8_set_weights(lmoe_layer *l, const void *w13, const void *w2, int32_t dtype);
lmoe_status lmoe_fp8_set_expert(lmoe_layer *l, int32_t e, const void *gate, const void *up, const void *down,
                                int32_t dtype);
lmoe_status lmoe_fp8_randomize(lmoe_layer *l, uint64_t seed, float scale);
/* Element i of an array of dtype as double / store double as dtype. */
double lmoe_load_elem(const void *p, int32_t dtype, int64_t i);
void lmoe_store_elem(void *p, int32_t dtype, int64_t i, double v);
/* Convert n elements between host arrays. */
void lmoe_convert(void *dst, int32_t dst_dtype, const void *src, int32_t src_dtype, int64_t n);

/* The counter-based generator every backend uses for fill_random: uniform in [0,1)
   for element i of a stream identified by seed. Pure function, so GPU code can
   implement the same and match bit for bit. */
static inline uint64_t lmoe_mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static inline float lmoe_uniform(uint64_t seed, uint64_t i) {
  uint64_t z = lmoe_mix64(seed ^ lmoe_mix64(i));
  return (float)(z >> 40) * (1.0f / 16777216.0f); /* 24 bits: exact in float */
}

/* core helpers shared across files */
lmoe_status lmoe_context_reserve(lmoe_context *ctx, const lmoe_layer_config *cfg,
                                 const lmoe_pool_config *pool_cfg);
lmoe_status lmoe_forward_validate(lmoe_context *ctx, const lmoe_forward_args *a,
                                  lmoe_forward_plan *plan, bool out_is_reference);
/* The batch's active slots against a pool as it is now (batch.c): a forward may come
   after a slot was unloaded. */
lmoe_status lmoe_batch_check_pool(const lmoe_batch *b, const lmoe_pool *pool);
int32_t lmoe_pool_slot_rank(const lmoe_pool *p, int32_t slot);
/* An adapter name a pool can hold (pool.c): non-empty, shorter than LMOE_ADAPTER_NAME_MAX. */
lmoe_status lmoe_pool_check_name(lmoe_context *ctx, const char *name);
/* Stamps slots as just used, for LRU eviction (batch_set, forward). */
void lmoe_pool_note_use(lmoe_pool *p, const int32_t *slots, int32_t n);
static inline const uint16_t *lmoe_slot_ptr(const lmoe_pool *p, int32_t slot, size_t off) {
  return (const uint16_t *)((const uint8_t *)p->storage + (size_t)slot * p->slot_bytes + off);
}

/* cpu backend pieces (backend_cpu.c owns memory and threads, cpu_forward.c the math) */
lmoe_status lmoe_cpu_forward(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream);
size_t lmoe_cpu_workspace_bytes(const lmoe_context *ctx, const lmoe_layer_config *cfg,
                                const lmoe_pool_config *pool_cfg);
/* cpu_threads.c: runs fn(arg, item, thread) for item in [0, n) on the context's worker
   pool (made on first use, kept in ctx->be); thread is in [0, ctx->threads). Returns
   when all ran. lmoe_cpu_threads_end ends the pool's threads (backend fini). */
typedef void (*lmoe_cpu_task)(void *arg, int64_t item, int32_t thread);
void lmoe_cpu_parallel(lmoe_context *ctx, int64_t n, lmoe_cpu_task fn, void *arg);
void lmoe_cpu_threads_end(lmoe_context *ctx);

/* shared validation helpers */
bool lmoe_valid_dtype(int32_t dtype);
const char *lmoe_shape_str(const lmoe_buffer *b, char *tmp, size_t n);

#endif
