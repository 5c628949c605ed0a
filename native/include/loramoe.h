/*
 * loramoe — prefill of Mixture-of-Experts layers with per-request LoRA adapters.
 *
 * One public header. It is FFI-clean: no function-like macros a binding needs (the
 * lmoe_*_init macros are C spellings of the lmoe_*_init_sized functions), no
 * bitfields, no varargs, fixed-width integers, no CUDA types. The LuaJIT cdef is
 * generated from this file at build time (see lua/CMakeLists.txt).
 *
 * Conventions
 *  - Every fallible call returns an lmoe_status; objects come back through
 *    out-parameters. lmoe_status_string() names a status; the context that the call
 *    went through holds a human-readable message (lmoe_context_last_error()).
 *  - Streams are `void *` (a cudaStream_t on the cuda backend, ignored on cpu) and
 *    come last. NULL means the context's stream.
 *  - lmoe_forward() only enqueues: it never waits for the device, copies back or
 *    allocates. Calls that do wait (buffer reads, synchronize) say so and are counted
 *    in lmoe_counters.host_waits.
 *  - Release functions accept NULL. Objects keep the objects they depend on alive
 *    (reference counted), so releasing in any order is safe.
 *  - The library never aborts, exits or prints.
 */
#ifndef LORAMOE_H
#define LORAMOE_H

#ifndef LMOE_FFI_CDEF
#include <stddef.h>
#include <stdint.h>
#if defined(LMOE_BUILDING) && defined(__GNUC__)
#define LMOE_API __attribute__((visibility("default")))
#else
#define LMOE_API
#endif
#ifdef __cplusplus
extern "C" {
#endif
#else
#define LMOE_API
#endif

/* Bumped when a struct below grows; structs carry their size in struct_size. A struct
   grows only at its end. The library takes any older (smaller) size of an input struct
   down to the end of its fields without a default (named at each struct; the fields
   past the size take their *_init defaults), writes output structs only up to their
   struct_size, and refuses a size larger than its own (a newer header).
   Initialising follows the same rule: lmoe_X_init_sized(p, size) writes the defaults
   and struct_size = size into the first min(size, sizeof) bytes of *p and nothing past
   them (nothing at all for a NULL p or a size below the struct's oldest), so a program
   built against an older header may call a newer library's init on its shorter struct;
   a larger size (a newer header) stays in struct_size, and the calls refuse it.
   In C write lmoe_X_init(p): a macro passing sizeof *(p), the program's own size. A
   binding calls lmoe_X_init_sized with its struct's size. The functions lmoe_X_init
   (the macro is not expanded for an address or in a binding) stay for programs built
   before the macros: they write the struct only up to its size in this release's
   header (0.1.0), however it grows later. */
enum { LMOE_VERSION_MAJOR = 0, LMOE_VERSION_MINOR = 1, LMOE_VERSION_PATCH = 0 };

typedef enum lmoe_status {
  LMOE_OK = 0,
  LMOE_ERR_INVALID_ARGUMENT = 1, /* NULL, wrong shape, out of range, wrong dtype */
  LMOE_ERR_OUT_OF_MEMORY = 2,    /* host or device allocation failed */
  LMOE_ERR_UNSUPPORTED = 3,      /* valid request the build or backend can't do */
  LMOE_ERR_BACKEND = 4,          /* the CUDA runtime or driver reported an error */
  LMOE_ERR_STATE = 5,            /* object in the wrong state (empty slot, closed, stale) */
  LMOE_ERR_NOT_FOUND = 6,        /* name, file or device not found */
  LMOE_ERR_FULL = 7,             /* no free slot and nothing evictable */
  LMOE_ERR_IO = 8,               /* reading or writing a file failed */
  LMOE_ERR_FORMAT = 9            /* a file's content is malformed */
} lmoe_status;

typedef enum lmoe_backend {
  LMOE_BACKEND_AUTO = 0, /* cuda when built with CUDA and a device is present, else cpu */
  LMOE_BACKEND_CPU = 1,
  LMOE_BACKEND_CUDA = 2
} lmoe_backend;

typedef enum lmoe_dtype {
  LMOE_DTYPE_BF16 = 0,
  LMOE_DTYPE_F16 = 1,
  LMOE_DTYPE_F32 = 2,
  LMOE_DTYPE_F64 = 3, /* host-side results (the float64 reference) */
  LMOE_DTYPE_I32 = 4, /* top-k expert ids */
  /* FP8 e4m3 (OCP "e4m3fn": bias 7, no infinities, 0x7f/0xff NaN, largest finite 448).
     Storing into it rounds to nearest even and saturates to +-448 (NaN stays NaN). The
     expert storage of a layer whose weight_dtype is this (docs/formats.md, "FP8"). */
  LMOE_DTYPE_F8_E4M3 = 5
} lmoe_dtype;

typedef enum lmoe_memory {
  LMOE_MEMORY_HOST = 0,  /* pageable host memory */
  LMOE_MEMORY_DEVICE = 1 /* device memory of the context (host memory on the cpu backend) */
} lmoe_memory;

/* How a forward decides whether to enqueue LoRA work (DESIGN.md, "guard mode"). */
typedef enum lmoe_guard {
  LMOE_GUARD_HOST = 0,        /* from the batch, on the host: no LoRA work when none is active */
  LMOE_GUARD_DEVICE_SYNC = 1, /* the old way: reduce on the device, copy back, wait (1 wait/forward) */
  LMOE_GUARD_ALWAYS = 2       /* enqueue LoRA work regardless; it exits early on device flags */
} lmoe_guard;

/* Which parts of an expert an adapter targets (bit mask). */
typedef enum lmoe_target {
  LMOE_TARGET_GATE = 1,
  LMOE_TARGET_UP = 2,
  LMOE_TARGET_DOWN = 4,
  LMOE_TARGET_ALL = 7
} lmoe_target;

enum { LMOE_NO_ADAPTER = -1 }; /* slot of a request without adapter */

typedef struct lmoe_context lmoe_context;
typedef struct lmoe_buffer lmoe_buffer;
typedef struct lmoe_layer lmoe_layer;
typedef struct lmoe_pool lmoe_pool;
typedef struct lmoe_batch lmoe_batch;

/* ---------------------------------------------------------------- library */

LMOE_API const char *lmoe_version(void);
LMOE_API const char *lmoe_status_string(lmoe_status status);
/* 1 when this build contains the CUDA backend. */
LMOE_API int32_t lmoe_has_cuda(void);
/* Number of CUDA devices visible (0 when built without CUDA or none present). */
LMOE_API lmoe_status lmoe_device_count(int32_t *out);

typedef struct lmoe_device_info {
  uint32_t struct_size; /* set by the library, which fills the whole struct */
  char name[256];
  int32_t cc_major, cc_minor;
  int32_t sm_count;
  int64_t memory_bytes;
  int64_t l2_bytes;
} lmoe_device_info;
LMOE_API lmoe_status lmoe_device_get_info(int32_t device, lmoe_device_info *out);

/* Bytes per element of a dtype, 0 for an unknown one. */
LMOE_API size_t lmoe_dtype_size(int32_t dtype);
LMOE_API const char *lmoe_dtype_name(int32_t dtype);

/* PEFT's LoRA scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA. */
LMOE_API float lmoe_lora_scale(float alpha, int32_t rank, int32_t use_rslora);

/* ---------------------------------------------------------------- context */

/* Optional allocator hooks for device memory (host memory on the cpu backend).
   Both NULL: the backend's own (cudaMalloc / aligned malloc). */
typedef struct lmoe_allocator {
  void *(*alloc)(void *user, size_t bytes);
  void (*free)(void *user, void *ptr);
  void *user;
} lmoe_allocator;

typedef struct lmoe_context_config {
  uint32_t struct_size; /* sizeof(lmoe_context_config); every field has a default: 4 and up */
  int32_t backend;      /* lmoe_backend */
  int32_t device;       /* CUDA device ordinal */
  void *stream;         /* cudaStream_t to enqueue on; NULL: the context creates its own */
  int32_t threads;      /* cpu backend worker threads; 0: one per core */
  int32_t guard;        /* lmoe_guard */
  lmoe_allocator allocator;
} lmoe_context_config;

/* Fill cfg with the defaults (auto backend, device 0, own stream, guard host). */
LMOE_API void lmoe_context_config_init_sized(lmoe_context_config *cfg, size_t size);
LMOE_API void lmoe_context_config_init(lmoe_context_config *cfg); /* its 0.1.0 fields */
#define lmoe_context_config_init(cfg) lmoe_context_config_init_sized((cfg), sizeof *(cfg))
/* cfg may be NULL (defaults). On failure *out is NULL and, when errbuf is given, it
   receives the reason. */
LMOE_API lmoe_status lmoe_context_create(const lmoe_context_config *cfg, lmoe_context **out,
                                         char *errbuf, size_t errbuf_size);
LMOE_API void lmoe_context_release(lmoe_context *ctx);
/* Adds a reference, for a second owner (a Lua state that adopts a context the host
   made): the context is freed when the last reference is released. NULL and handles
   that are not a context are ignored. */
LMOE_API void lmoe_context_retain(lmoe_context *ctx);
/* 1 when ptr is a context made by this copy of the library and not yet destroyed,
   else 0. Compares the address with the live contexts only (never reads through ptr),
   so a binding can refuse any other pointer before using it (lm.adopt_context). */
LMOE_API int32_t lmoe_context_is_live(const void *ptr);
/* Message of the last failed call made through this context ("" when none). */
LMOE_API const char *lmoe_context_last_error(const lmoe_context *ctx);
LMOE_API int32_t lmoe_context_backend(const lmoe_context *ctx);
LMOE_API int32_t lmoe_context_threads(const lmoe_context *ctx);
LMOE_API lmoe_status lmoe_context_set_guard(lmoe_context *ctx, int32_t guard);
LMOE_API int32_t lmoe_context_guard(const lmoe_context *ctx);
/* The stream forwards use when they are given NULL. */
LMOE_API void *lmoe_context_stream(const lmoe_context *ctx);
/* Waits until all work enqueued on the stream (NULL: the context's) has finished.
   Counted as a host wait. */
LMOE_API lmoe_status lmoe_context_synchronize(lmoe_context *ctx, void *stream);

typedef struct lmoe_counters {
  uint64_t forwards;       /* lmoe_forward calls that enqueued work */
  uint64_t launches;       /* kernel launches (cuda) or parallel tasks (cpu) */
  uint64_t lora_launches;  /* of which for LoRA work */
  uint64_t host_waits;     /* times the host waited for the device */
  uint64_t uploads;        /* host-to-device copies */
  uint64_t bytes_uploaded; /* their bytes */
  uint64_t downloads;      /* device-to-host copies */
} lmoe_counters;
LMOE_API lmoe_status lmoe_context_counters(const lmoe_context *ctx, lmoe_counters *out);
/* Sets these counters and the wait counters below to 0. */
LMOE_API void lmoe_context_reset_counters(lmoe_context *ctx);

/* The host waits of lmoe_counters.host_waits told apart. A backpressure wait is the
   host waiting for a ring of staging to free a place because it is a whole ring ahead
   of the device (a batch's metadata ring, the context's upload staging); any other
   wait is forced: the caller asked for one (synchronize, reads, the device_sync
   guard), or the library needed the device idle (freeing or growing device memory). */
typedef struct lmoe_wait_counters {
  uint32_t struct_size;  /* output: written up to this size */
  uint64_t host_waits;   /* all of them: forced + backpressure */
  uint64_t forced;
  uint64_t backpressure;
} lmoe_wait_counters;
LMOE_API lmoe_status lmoe_context_wait_counters(const lmoe_context *ctx, lmoe_wait_counters *out);

/* ---------------------------------------------------------------- buffers */

enum { LMOE_MAX_DIMS = 4 };

typedef struct lmoe_buffer_desc {
  int32_t dtype;  /* lmoe_dtype */
  int32_t memory; /* lmoe_memory */
  int32_t ndim;
  int64_t shape[LMOE_MAX_DIMS];
  int64_t numel;
  size_t bytes;
  void *data;     /* host or device address */
} lmoe_buffer_desc;

LMOE_API lmoe_status lmoe_buffer_create(lmoe_context *ctx, int32_t dtype, int32_t memory,
                                        int32_t ndim, const int64_t *shape, lmoe_buffer **out);
/* A buffer over memory the caller owns and keeps alive (not freed by the library). */
LMOE_API lmoe_status lmoe_buffer_wrap(lmoe_context *ctx, int32_t dtype, int32_t memory,
                                      int32_t ndim, const int64_t *shape, void *data,
                                      lmoe_buffer **out);
LMOE_API void lmoe_buffer_release(lmoe_buffer *buf);
LMOE_API lmoe_status lmoe_buffer_describe(const lmoe_buffer *buf, lmoe_buffer_desc *out);
/* Copy `count` elements of src_dtype from host memory into the buffer at element
   `offset`, converting. Blocking (the data is in place when it returns). */
LMOE_API lmoe_status lmoe_buffer_write(lmoe_buffer *buf, int64_t offset, const void *src,
                                       int32_t src_dtype, int64_t count);
/* Copy `count` elements from element `offset` into host memory as dst_dtype. Waits for
   the context's stream first (counted as a host wait on the cuda backend). */
LMOE_API lmoe_status lmoe_buffer_read(lmoe_buffer *buf, int64_t offset, void *dst,
                                      int32_t dst_dtype, int64_t count);
/* Fill with uniform values in [lo, hi) from a counter-based generator: the same seed
   gives the same values on every backend. Integer buffers get floor(value). Enqueued. */
LMOE_API lmoe_status lmoe_buffer_fill_random(lmoe_buffer *buf, uint64_t seed, float lo,
                                             float hi, void *stream);
LMOE_API lmoe_status lmoe_buffer_fill(lmoe_buffer *buf, double value, void *stream);

typedef struct lmoe_compare_result {
  double rel_l2;       /* ||a - ref|| / ||ref|| */
  double max_abs;      /* max |a - ref| over finite pairs */
  double ref_l2;       /* ||ref|| */
  int64_t nonfinite;   /* elements of a that are NaN or Inf */
  int64_t numel;
} lmoe_compare_result;
/* Compares two buffers of the same element count (any dtypes, any memory). Waits. */
LMOE_API lmoe_status lmoe_buffer_compare(lmoe_buffer *a, lmoe_buffer *ref,
                                         lmoe_compare_result *out);

/* ---------------------------------------------------------------- MoE layer */

/* How a layer is cut over the ranks of a communicator (docs/design.md, "Sharding").
   Rank r of n holds part [lo, hi) of a dimension of size D with q = D / n, m = D % n:
   lo = r*q + min(r, m), hi = lo + q + (r < m): the first m ranks hold one more. */
typedef enum lmoe_shard_mode {
  LMOE_SHARD_TP = 0, /* tensor parallel: every expert, a slice of the intermediate dimension */
  LMOE_SHARD_EP = 1  /* expert parallel: a contiguous range of whole experts */
} lmoe_shard_mode;

/* A communicator: one rank of a group that sums the layer outputs of its ranks. */
typedef struct lmoe_comm lmoe_comm;

typedef struct lmoe_layer_config {
  uint32_t struct_size; /* at least through intermediate (top_k on have defaults) */
  int32_t num_experts;  /* E */
  int32_t hidden;       /* H */
  int32_t intermediate; /* I */
  int32_t top_k;        /* k, 1..E */
  int32_t renormalize;  /* renormalise the top-k weights to sum to 1 */
  int32_t max_tokens;   /* largest M a forward may get; sizes the workspace */
  /* The shard (default: rank 0 of 1, unsharded). E and I above stay the whole layer's;
     the layer holds and computes its rank's part, and its forward ends with the sum
     over the ranks of comm (needed when shard_size > 1; rank and size must be comm's). */
  int32_t shard_mode;   /* lmoe_shard_mode */
  int32_t shard_rank;   /* 0..shard_size-1 */
  int32_t shard_size;   /* ranks the layer is cut over, 1 (default): not cut */
  lmoe_comm *comm;      /* the communicator of this rank (kept alive by the layer) */
  /* The experts' storage: LMOE_DTYPE_BF16 (default) or LMOE_DTYPE_F8_E4M3, FP8 with one
     float32 scale per 128x128 block (w = fp8 * scale; docs/formats.md, "FP8"). The cpu
     backend computes an FP8 layer by dequantizing per block; the cuda backend on FP8
     wgmma, which needs a Hopper GPU and a build with sm_90a code (else creation fails
     with LMOE_ERR_UNSUPPORTED) and hidden, intermediate multiples of 16. */
  int32_t weight_dtype;
} lmoe_layer_config;

LMOE_API void lmoe_layer_config_init_sized(lmoe_layer_config *cfg, size_t size);
LMOE_API void lmoe_layer_config_init(lmoe_layer_config *cfg); /* its 0.1.0 fields */
#define lmoe_layer_config_init(cfg) lmoe_layer_config_init_sized((cfg), sizeof *(cfg))
/* Allocates the expert weights (uninitialised) and reserves the context's workspace. */
LMOE_API lmoe_status lmoe_layer_create(lmoe_context *ctx, const lmoe_layer_config *cfg,
                                       lmoe_layer **out);
LMOE_API void lmoe_layer_release(lmoe_layer *layer);
/* out->struct_size an older size (lmoe_layer_config's rule): written up to it; any
   other value: the whole struct (struct_size set to this library's). */
LMOE_API lmoe_status lmoe_layer_get_config(const lmoe_layer *layer, lmoe_layer_config *out);
/* All experts from host memory: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
   Either may be NULL to leave that part unchanged. Stored as bf16, or in an FP8 layer
   quantized per 128x128 block of each expert's gate, up and down (scale = block amax /
   448, round to nearest even, saturating); dtype f8_e4m3 (FP8 layers only) copies the
   codes as they are and leaves the scales (lmoe_layer_weights 2, 3) unchanged. Blocking. */
LMOE_API lmoe_status lmoe_layer_set_weights(lmoe_layer *layer, const void *w13, const void *w2,
                                            int32_t dtype);
/* One expert: gate [I, H], up [I, H], down [H, I]; NULL leaves that part unchanged. */
LMOE_API lmoe_status lmoe_layer_set_expert(lmoe_layer *layer, int32_t expert, const void *gate,
                                           const void *up, const void *down, int32_t dtype);
/* Uniform random weights in [-scale, scale), the same on every backend for one seed. */
LMOE_API lmoe_status lmoe_layer_randomize(lmoe_layer *layer, uint64_t seed, float scale);
/* The layer's weight storage as buffers owned by the layer (valid while it lives):
   which = 0 for W13 [E, 2I, H], 1 for W2 [E, H, I] (bf16, or f8_e4m3 codes in an FP8
   layer). FP8 layers only, their f32 block scales: 2 for W13's [E, 2*ceil(I/128),
   ceil(H/128)] (gate's row blocks, then up's), 3 for W2's [E, ceil(H/128), ceil(I/128)]. */
LMOE_API lmoe_status lmoe_layer_weights(lmoe_layer *layer, int32_t which, lmoe_buffer **out);

/* ---------------------------------------------------------------- communicators */

/* 1 when this build has NCCL (the cmake option LMOE_NCCL), so cuda contexts can be
   sharded; 0 otherwise. */
LMOE_API int32_t lmoe_has_nccl(void);
/* n communicators for n ranks inside this process, one per context: out[r] is rank r's,
   for the layer made on ctxs[r]. Contexts must be distinct and of one backend. cpu
   backend: the ranks meet in host memory; each rank's lmoe_forward then returns once
   every rank's forward has reached the sum (call them from n threads, or all at once
   through lmoe_forward_group). cuda backend: ncclCommInitAll over the contexts'
   devices (builds with NCCL; else LMOE_ERR_UNSUPPORTED). errbuf (may be NULL) gets the
   reason of a failure. */
LMOE_API lmoe_status lmoe_comm_create_local(int32_t n, lmoe_context *const *ctxs, lmoe_comm **out,
                                            char *errbuf, size_t errbuf_size);
/* Wraps an ncclComm_t the host made (one rank per process), for a layer made on ctx
   (a cuda context on that communicator's device). The library does not destroy it:
   keep it alive while the comm is. Builds without NCCL: LMOE_ERR_UNSUPPORTED. */
LMOE_API lmoe_status lmoe_comm_wrap_nccl(lmoe_context *ctx, void *nccl_comm, lmoe_comm **out);
LMOE_API void lmoe_comm_release(lmoe_comm *comm);
LMOE_API int32_t lmoe_comm_rank(const lmoe_comm *comm); /* -1 when comm is not one */
LMOE_API int32_t lmoe_comm_size(const lmoe_comm *comm); /* -1 when comm is not one */

/* ---------------------------------------------------------------- adapter pool */

typedef struct lmoe_pool_config {
  uint32_t struct_size; /* every field has a default: 4 and up */
  int32_t num_slots; /* fixed number of adapter slots */
  int32_t max_rank;  /* largest rank of any part of any adapter */
} lmoe_pool_config;

LMOE_API void lmoe_pool_config_init_sized(lmoe_pool_config *cfg, size_t size);
LMOE_API void lmoe_pool_config_init(lmoe_pool_config *cfg); /* its 0.1.0 fields */
#define lmoe_pool_config_init(cfg) lmoe_pool_config_init_sized((cfg), sizeof *(cfg))
/* A pool holds adapters for one layer's shapes. */
LMOE_API lmoe_status lmoe_pool_create(lmoe_layer *layer, const lmoe_pool_config *cfg,
                                      lmoe_pool **out);
LMOE_API void lmoe_pool_release(lmoe_pool *pool);
LMOE_API lmoe_status lmoe_pool_get_config(const lmoe_pool *pool, lmoe_pool_config *out);

/* One LoRA part for every expert, in host memory, PEFT's layout per expert:
   a [E, rank, in], b [E, out, rank]. a == NULL and b == NULL: part absent. */
typedef struct lmoe_lora_part {
  const void *a;
  const void *b;
  int32_t rank;
  float scale; /* multiplies B·A; see lmoe_lora_scale() */
} lmoe_lora_part;

/* An adapter's weights for one layer. Gate and up are given either separately
   (PEFT on gate_proj / up_proj modules: in = H, out = I each) or fused (PEFT
   target_parameters on gate_up_proj: in = H, out = 2I, one rank), never both. */
typedef struct lmoe_adapter_desc {
  uint32_t struct_size;   /* every field has a default (parts absent): 4 and up */
  int32_t dtype;          /* of every array below */
  lmoe_lora_part gate;    /* out = I */
  lmoe_lora_part up;      /* out = I */
  lmoe_lora_part gate_up; /* fused: out = 2I */
  lmoe_lora_part down;    /* in = I, out = H */
} lmoe_adapter_desc;

LMOE_API void lmoe_adapter_desc_init_sized(lmoe_adapter_desc *desc, size_t size);
LMOE_API void lmoe_adapter_desc_init(lmoe_adapter_desc *desc); /* its 0.1.0 fields */
#define lmoe_adapter_desc_init(desc) lmoe_adapter_desc_init_sized((desc), sizeof *(desc))

/* A synthetic adapter for experiments and tests. */
typedef struct lmoe_random_adapter {
  uint32_t struct_size; /* every field has a default: 4 and up */
  int32_t targets;    /* lmoe_target mask */
  int32_t fused;      /* gate and up as one gate_up part */
  int32_t rank;
  float alpha;
  int32_t use_rslora;
  uint64_t seed;
  float scale;        /* A and B values uniform in [-scale, scale) */
} lmoe_random_adapter;

LMOE_API void lmoe_random_adapter_init_sized(lmoe_random_adapter *spec, size_t size);
LMOE_API void lmoe_random_adapter_init(lmoe_random_adapter *spec); /* its 0.1.0 fields */
#define lmoe_random_adapter_init(spec) lmoe_random_adapter_init_sized((spec), sizeof *(spec))

/* Loads an adapter into `slot` (replacing what it held: stream-ordered, work already
   enqueued keeps reading the old weights). Copies the arrays; they may be freed after. */
LMOE_API lmoe_status lmoe_pool_load(lmoe_pool *pool, int32_t slot, const lmoe_adapter_desc *desc);
LMOE_API lmoe_status lmoe_pool_load_random(lmoe_pool *pool, int32_t slot,
                                           const lmoe_random_adapter *spec);
LMOE_API lmoe_status lmoe_pool_unload(lmoe_pool *pool, int32_t slot);

typedef struct lmoe_slot_info {
  int32_t loaded;
  int32_t targets;      /* lmoe_target mask */
  int32_t fused;
  int32_t rank_gate, rank_up, rank_down; /* 0 when absent; gate = up = rank when fused */
  float scale_gate, scale_up, scale_down;
  int32_t max_rank;     /* largest of the ranks */
  int64_t bytes;        /* device bytes this slot's weights occupy */
  uint64_t generation;  /* bumps on every load/unload of the slot */
} lmoe_slot_info;
LMOE_API lmoe_status lmoe_pool_slot_info(const lmoe_pool *pool, int32_t slot, lmoe_slot_info *out);

/* ---------------------------------------------------------------- batch */

typedef struct lmoe_batch_info {
  int32_t num_requests;
  int64_t num_tokens;    /* M */
  int32_t has_active;    /* any request uses an adapter */
  int32_t num_active;    /* distinct slots used */
  int32_t max_rank;      /* largest rank among the active slots (needs a pool) */
  int32_t max_slot;      /* largest slot used, -1 when none */
} lmoe_batch_info;

LMOE_API lmoe_status lmoe_batch_create(lmoe_context *ctx, lmoe_batch **out);

typedef struct lmoe_batch_config {
  uint32_t struct_size;  /* every field has a default: 4 and up */
  /* Places in the batch's ring of metadata staging, 1..64 (default 4): how many sets
     of one batch may run ahead of the device before lmoe_batch_set waits
     (backpressure). Used by the cuda backend for batches that travel through host
     staging (over 400 requests or 120 active slots); others need none. */
  int32_t staging_depth;
} lmoe_batch_config;
/* Fill cfg with the defaults (staging_depth 4). */
LMOE_API void lmoe_batch_config_init_sized(lmoe_batch_config *cfg, size_t size);
LMOE_API void lmoe_batch_config_init(lmoe_batch_config *cfg); /* its 0.1.0 fields */
#define lmoe_batch_config_init(cfg) lmoe_batch_config_init_sized((cfg), sizeof *(cfg))
/* lmoe_batch_create with a config (NULL: the defaults, as lmoe_batch_create). */
LMOE_API lmoe_status lmoe_batch_create_with(lmoe_context *ctx, const lmoe_batch_config *cfg,
                                            lmoe_batch **out);
LMOE_API void lmoe_batch_release(lmoe_batch *batch);
/* Requests in order: request i has tokens[i] consecutive tokens (>= 0) and uses
   slots[i] (or LMOE_NO_ADAPTER). Computes on the host the segment offsets, the set of
   active slots, tokens per active slot, has_active and, when pool is given, checks the
   slots hold adapters and finds the largest active rank; the pool also records the
   slots as used (recency for eviction). slots may be NULL (no adapters). Reuses its
   storage: no allocation once it has seen this many requests. */
LMOE_API lmoe_status lmoe_batch_set(lmoe_batch *batch, lmoe_pool *pool, int32_t num_requests,
                                    const int32_t *tokens, const int32_t *slots);
LMOE_API lmoe_status lmoe_batch_get_info(const lmoe_batch *batch, lmoe_batch_info *out);
/* Segment offsets (num_requests + 1 entries) into out; returns how many were written. */
LMOE_API int32_t lmoe_batch_offsets(const lmoe_batch *batch, int64_t *out, int32_t capacity);
/* Active slots in increasing order, and the tokens each one has (either may be NULL). */
LMOE_API int32_t lmoe_batch_active_slots(const lmoe_batch *batch, int32_t *slots,
                                         int64_t *tokens, int32_t capacity);

/* ---------------------------------------------------------------- forward */

typedef struct lmoe_forward_args {
  uint32_t struct_size;       /* at least through out: sizeof(lmoe_forward_args) today */
  lmoe_layer *layer;
  lmoe_pool *pool;            /* may be NULL when the batch uses no adapter */
  const lmoe_batch *batch;    /* its token count is M */
  lmoe_buffer *x;             /* [M, H] bf16 */
  lmoe_buffer *router_logits; /* [M, E] f32 or bf16; or NULL and the two below */
  lmoe_buffer *topk_ids;      /* [M, k] i32, given routing */
  lmoe_buffer *topk_weights;  /* [M, k] f32, used as given */
  lmoe_buffer *out;           /* [M, H] bf16, overwritten */
} lmoe_forward_args;

LMOE_API void lmoe_forward_args_init_sized(lmoe_forward_args *args, size_t size);
LMOE_API void lmoe_forward_args_init(lmoe_forward_args *args); /* its 0.1.0 fields */
#define lmoe_forward_args_init(args) lmoe_forward_args_init_sized((args), sizeof *(args))
/* Enqueues one MoE layer on `stream` (NULL: the context's) and returns. */
LMOE_API lmoe_status lmoe_forward(lmoe_context *ctx, const lmoe_forward_args *args, void *stream);

/* The forwards of the n ranks of one sharded layer, from one thread: args[r] is rank
   r's, on ctxs[r] (its layer's context), streams[r] its stream (streams may be NULL:
   the contexts' streams). cpu backend: the ranks run one after another and their
   outputs are summed once all have run; cuda with NCCL: one NCCL group. On failure no
   rank's output is written (cpu). */
LMOE_API lmoe_status lmoe_forward_group(int32_t n, lmoe_context *const *ctxs,
                                        const lmoe_forward_args *const *args, void *const *streams);

/* The float64 reference: straightforward loops in double precision over the same
   inputs, written independently of the backends. out is an f32 or f64 buffer of
   [M, H] in host memory. Waits for the context's stream. Slow: for tests. */
LMOE_API lmoe_status lmoe_reference_forward(lmoe_context *ctx, const lmoe_forward_args *args);

/* ---------------------------------------------------------------- graphs */

/* CUDA-graph capture and replay of forwards (cuda backend only; the cpu backend
   answers LMOE_ERR_UNSUPPORTED). docs/api.md, "Graphs", gives the rules in full:
   - Between begin and end call only lmoe_forward on the captured stream: nothing that
     waits or reads back (buffer reads, synchronize, lmoe_batch_set, device_sync guard).
     The capture is thread-local (cudaStreamCaptureModeThreadLocal): other threads,
     with their own contexts, may go on allocating and synchronising meanwhile.
   - A replay reads the buffers, layers, pools and batch that were captured, as they
     are at replay time: they must outlive the graph and keep their shapes. The batch
     may be set again with the same token count M and any adapter mix; the replay
     computes that mix. Under guard host a capture holds only the LoRA work its batch
     had then: capture under guard always to replay arbitrary mixes.
   - Replays share the context's workspace with every other forward of it: as with
     eager forwards, keep them on one stream (or order the streams). */
typedef struct lmoe_graph lmoe_graph;

/* Starts capturing `stream` (NULL: the context's). One capture per context at a time. */
LMOE_API lmoe_status lmoe_graph_begin(lmoe_context *ctx, void *stream);
/* Ends the capture begun on `stream` and instantiates it. On any failure (a forward
   failed, an uncapturable call was made) the capture is discarded and *out is NULL. */
LMOE_API lmoe_status lmoe_graph_end(lmoe_context *ctx, void *stream, lmoe_graph **out);
/* Enqueues one replay on `stream` (NULL: the context's) and returns. Counted as one
   launch; forwards, uploads and bytes_uploaded grow by what the capture held. */
LMOE_API lmoe_status lmoe_graph_launch(lmoe_graph *graph, void *stream);
/* NULL is fine. A replay still enqueued completes first (freed asynchronously). */
LMOE_API void lmoe_graph_release(lmoe_graph *graph);

/* ---- files: safetensors, PEFT adapters, checkpoints, pool life cycle ---- */

/* safetensors (docs/formats.md). Opening validates the whole header: a file that
   opens is safe to read. Errors name the file and the tensor, in the context. */
typedef struct lmoe_safetensors lmoe_safetensors;

enum { LMOE_TENSOR_MAX_DIMS = 8 };

typedef struct lmoe_tensor_info {
  const char *name;       /* valid while the file is open */
  const char *dtype_name; /* as written in the file: "BF16", "F8_E4M3", ... */
  int32_t dtype;          /* lmoe_dtype (F8_E4M3: LMOE_DTYPE_F8_E4M3), or -1 when the library can't convert it */
  int32_t ndim;
  int64_t shape[LMOE_TENSOR_MAX_DIMS];
  int64_t numel;
  uint64_t offset;        /* of the data, from the start of the file */
  uint64_t bytes;
} lmoe_tensor_info;

LMOE_API lmoe_status lmoe_safetensors_open(lmoe_context *ctx, const char *path,
                                           lmoe_safetensors **out);
/* The same over bytes in memory (copied); name is used in messages. */
LMOE_API lmoe_status lmoe_safetensors_open_memory(lmoe_context *ctx, const void *data,
                                                  size_t size, const char *name,
                                                  lmoe_safetensors **out);
LMOE_API void lmoe_safetensors_close(lmoe_safetensors *st);
LMOE_API int32_t lmoe_safetensors_count(const lmoe_safetensors *st);
/* Tensors in file order (increasing data offset). */
LMOE_API lmoe_status lmoe_safetensors_tensor(const lmoe_safetensors *st, int32_t index,
                                             lmoe_tensor_info *out);
/* LMOE_ERR_NOT_FOUND when absent (not recorded as an error of the context). */
LMOE_API lmoe_status lmoe_safetensors_find(const lmoe_safetensors *st, const char *name,
                                           int32_t *index);
/* Reads tensor `index` into host memory as dst_dtype (bf16, f16, f32, f64), converting;
   an I32 tensor also as i32, an F8_E4M3 one also as f8_e4m3 (its codes; converted to a
   float dtype it is decoded without block scales). count must equal the tensor's
   element count. */
LMOE_API lmoe_status lmoe_safetensors_read(lmoe_safetensors *st, int32_t index, void *dst,
                                           int32_t dst_dtype, int64_t count);
LMOE_API int32_t lmoe_safetensors_metadata_count(const lmoe_safetensors *st);
LMOE_API lmoe_status lmoe_safetensors_metadata(const lmoe_safetensors *st, int32_t index,
                                               const char **key, const char **value);

typedef struct lmoe_tensor_entry {
  const char *name;
  int32_t dtype; /* lmoe_dtype of data, also written to the file */
  int32_t ndim;
  int64_t shape[LMOE_TENSOR_MAX_DIMS];
  const void *data; /* host memory */
} lmoe_tensor_entry;

/* Writes a safetensors file (to path.tmp, then renamed). meta_keys/meta_values:
   n_meta strings for __metadata__ (may be 0 and NULL). */
LMOE_API lmoe_status lmoe_safetensors_write(lmoe_context *ctx, const char *path, int32_t n,
                                            const lmoe_tensor_entry *tensors, int32_t n_meta,
                                            const char *const *meta_keys,
                                            const char *const *meta_values);

/* Model families by tensor naming. */
typedef enum lmoe_family {
  LMOE_FAMILY_UNKNOWN = 0,
  LMOE_FAMILY_QWEN = 1,   /* Qwen2-MoE / Qwen3-MoE: mlp.experts.e.{gate,up,down}_proj */
  LMOE_FAMILY_MIXTRAL = 2 /* block_sparse_moe.experts.e.{w1,w3,w2} */
} lmoe_family;

typedef enum lmoe_peft_layout {
  LMOE_PEFT_PER_EXPERT = 0, /* target_modules on each expert's projections */
  LMOE_PEFT_FUSED = 1       /* target_parameters on experts.gate_up_proj / down_proj */
} lmoe_peft_layout;

/* A PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors. */
typedef struct lmoe_peft lmoe_peft;

typedef struct lmoe_peft_info {
  uint32_t struct_size; /* output: written up to this size */
  int32_t family;     /* lmoe_family, from the tensor names */
  int32_t layout;     /* lmoe_peft_layout */
  int32_t rank;       /* r of the config */
  float alpha;        /* lora_alpha */
  int32_t use_rslora;
  int32_t targets;    /* lmoe_target mask over all layers */
  int32_t num_layers; /* distinct layer indices with expert tensors */
  int32_t min_layer, max_layer;
  int32_t num_experts;    /* largest expert index + 1 (fused: from the shapes) */
  int32_t max_rank;       /* largest tensor rank */
  int32_t has_patterns;   /* rank_pattern or alpha_pattern non-empty */
  int32_t num_tensors;
  int64_t bytes;          /* tensor bytes in the file */
} lmoe_peft_info;

/* path: the adapter's directory, or its adapter_config.json. */
LMOE_API lmoe_status lmoe_peft_open(lmoe_context *ctx, const char *path, lmoe_peft **out);
LMOE_API void lmoe_peft_close(lmoe_peft *peft);
LMOE_API void lmoe_peft_info_init_sized(lmoe_peft_info *info, size_t size);
LMOE_API void lmoe_peft_info_init(lmoe_peft_info *info); /* its 0.1.0 fields */
#define lmoe_peft_info_init(info) lmoe_peft_info_init_sized((info), sizeof *(info))
LMOE_API lmoe_status lmoe_peft_get_info(const lmoe_peft *peft, lmoe_peft_info *out);
/* Layer indices that have expert tensors, increasing; returns how many were written. */
LMOE_API int32_t lmoe_peft_layers(const lmoe_peft *peft, int32_t *out, int32_t capacity);
/* A printable summary (rank, alpha, targets, layout, layers, bytes) into buf,
   truncated to size; *needed (may be NULL) gets the full length + 1. */
LMOE_API lmoe_status lmoe_peft_inspect(const lmoe_peft *peft, char *buf, size_t size,
                                       size_t *needed);
/* Maps one layer of the adapter for a layer of these shapes into desc (f32 arrays
   owned by peft, valid until the next call on it or its close). Refuses what it
   can't represent exactly, naming what and where. */
LMOE_API lmoe_status lmoe_peft_layer_desc(lmoe_peft *peft, int32_t layer, int32_t num_experts,
                                          int32_t hidden, int32_t intermediate,
                                          lmoe_adapter_desc *desc);

/* A synthetic PEFT adapter written to a directory (created if missing). */
typedef struct lmoe_peft_synthetic {
  uint32_t struct_size; /* every field has a default: 4 and up */
  int32_t family;      /* lmoe_family (per-expert naming; fused always uses mlp.experts) */
  int32_t layout;      /* lmoe_peft_layout */
  int32_t num_layers;  /* layers 0..num_layers-1 get tensors */
  int32_t num_experts, hidden, intermediate;
  int32_t targets;     /* lmoe_target mask; fused: gate and up go together */
  int32_t rank;
  float alpha;
  int32_t use_rslora;
  int32_t dtype;       /* of the tensors: bf16, f16 or f32 */
  uint64_t seed;
  float scale;         /* values uniform in [-scale, scale) */
  /* Optional single entries of rank_pattern / alpha_pattern (NULL: none); tensors of
     modules the key matches get that rank. */
  const char *rank_pattern_key;
  int32_t rank_pattern_value;
  const char *alpha_pattern_key;
  float alpha_pattern_value;
} lmoe_peft_synthetic;

LMOE_API void lmoe_peft_synthetic_init_sized(lmoe_peft_synthetic *spec, size_t size);
LMOE_API void lmoe_peft_synthetic_init(lmoe_peft_synthetic *spec); /* its 0.1.0 fields */
#define lmoe_peft_synthetic_init(spec) lmoe_peft_synthetic_init_sized((spec), sizeof *(spec))
LMOE_API lmoe_status lmoe_peft_write_synthetic(lmoe_context *ctx, const char *dir,
                                               const lmoe_peft_synthetic *spec);

/* Base weights from a checkpoint: one .safetensors file, a
   model.safetensors.index.json of shards, or a directory holding either. */
typedef struct lmoe_checkpoint lmoe_checkpoint;

typedef struct lmoe_checkpoint_layer_info {
  uint32_t struct_size; /* output: written up to this size */
  int32_t family;       /* lmoe_family */
  int32_t num_experts;
  int32_t hidden;
  int32_t intermediate;
  int32_t has_router;   /* the router weight [E, H] is present */
  int32_t weight_dtype; /* the experts': LMOE_DTYPE_F8_E4M3 for an FP8 checkpoint, else bf16 */
} lmoe_checkpoint_layer_info;

LMOE_API lmoe_status lmoe_checkpoint_open(lmoe_context *ctx, const char *path,
                                          lmoe_checkpoint **out);
LMOE_API void lmoe_checkpoint_close(lmoe_checkpoint *ck);
LMOE_API void lmoe_checkpoint_layer_info_init_sized(lmoe_checkpoint_layer_info *info, size_t size);
LMOE_API void lmoe_checkpoint_layer_info_init(lmoe_checkpoint_layer_info *info); /* its 0.1.0 fields */
#define lmoe_checkpoint_layer_info_init(info) lmoe_checkpoint_layer_info_init_sized((info), sizeof *(info))
LMOE_API lmoe_status lmoe_checkpoint_get_layer_info(lmoe_checkpoint *ck, int32_t layer,
                                                    lmoe_checkpoint_layer_info *out);
/* Sets the experts of `dst` (made with the shapes get_layer_info gives) from the
   checkpoint's layer `layer`. router (may be NULL) receives a new f32 host buffer
   [E, H] with the router weight: logits = x · routerᵀ. */
LMOE_API lmoe_status lmoe_checkpoint_load_layer(lmoe_checkpoint *ck, int32_t layer,
                                                lmoe_layer *dst, lmoe_buffer **router);

/* Quantizes a bf16 (or f16, f32) checkpoint to FP8 e4m3 in the published HF format
   (docs/formats.md, "FP8"): every MoE expert weight of every layer (per-expert
   `...experts.N.{gate,up,down}_proj.weight`, Mixtral's w1/w3/w2, or the fused
   `experts.gate_up_proj` / `experts.down_proj`) becomes F8_E4M3 with float32 block
   scales beside it (`weight_scale_inv`, fused `_scales_inv`), one per 128x128 block:
   scale = block amax / 448 (1 for an all-zero block), code = e4m3(w / scale) rounded to
   nearest even, saturating. Every other tensor is copied as it is. src: whatever
   lmoe_checkpoint_open takes; dst: one .safetensors file (written whole from memory:
   meant for tests and single layers, not for a whole large model at once). */
LMOE_API lmoe_status lmoe_checkpoint_quantize_fp8(lmoe_context *ctx, const char *src, const char *dst);

/* Pool life cycle by name. A name is up to 127 bytes. Recency: a slot is "used" when
   loaded, touched, or named by lmoe_batch_set / lmoe_forward with this pool. */
enum { LMOE_ADAPTER_NAME_MAX = 128 };

/* Loads under `name`: the slot that already holds name (reload in place), else a free
   slot, else the least recently used unpinned slot (evicted). LMOE_ERR_FULL when every
   slot is pinned. *slot (may be NULL) gets the slot. */
LMOE_API lmoe_status lmoe_pool_load_named(lmoe_pool *pool, const char *name,
                                          const lmoe_adapter_desc *desc, int32_t *slot);
/* The same from one layer of a PEFT adapter (lmoe_peft_layer_desc + load_named). */
LMOE_API lmoe_status lmoe_pool_load_peft(lmoe_pool *pool, const char *name, lmoe_peft *peft,
                                         int32_t layer, int32_t *slot);
LMOE_API lmoe_status lmoe_pool_unload_named(lmoe_pool *pool, const char *name);
/* LMOE_ERR_NOT_FOUND when no slot holds name (not recorded as an error). */
LMOE_API lmoe_status lmoe_pool_find(const lmoe_pool *pool, const char *name, int32_t *slot);
/* Name of a slot's adapter ("" when unnamed or empty); valid until the slot changes. */
LMOE_API const char *lmoe_pool_slot_name(const lmoe_pool *pool, int32_t slot);
/* Pinned slots are never evicted; pins nest (counted). A pinned slot can still be
   unloaded or reloaded explicitly. */
LMOE_API lmoe_status lmoe_pool_pin(lmoe_pool *pool, int32_t slot);
LMOE_API lmoe_status lmoe_pool_unpin(lmoe_pool *pool, int32_t slot);
LMOE_API int32_t lmoe_pool_pin_count(const lmoe_pool *pool, int32_t slot);
/* Marks a slot as just used (for LRU). */
LMOE_API lmoe_status lmoe_pool_touch(lmoe_pool *pool, int32_t slot);

typedef struct lmoe_pool_memory {
  int64_t slot_bytes;     /* device bytes of one slot */
  int64_t total_bytes;    /* all slots */
  int32_t num_slots;
  int32_t loaded_slots;
  int64_t loaded_bytes;   /* slots holding an adapter */
  int64_t used_bytes;     /* of which bytes the adapters' actual ranks fill */
  int64_t evictions;      /* slots evicted by load_named since the pool was made */
} lmoe_pool_memory;
LMOE_API lmoe_status lmoe_pool_get_memory(const lmoe_pool *pool, lmoe_pool_memory *out);

#ifndef LMOE_FFI_CDEF
#ifdef __cplusplus
}
#endif
#endif
#endif /* LORAMOE_H */
