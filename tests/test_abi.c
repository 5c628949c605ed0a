/* The ABI rule for structs that begin with struct_size (docs/api.md, "Struct sizes"),
   for every such struct of the API: an older (smaller) size is taken down to the
   struct's oldest, with the fields past it at their defaults and never read; a size
   below that, not a multiple of 4, or larger than this library's (a newer header) is
   refused with a message that names the struct. Output structs are written only up to
   the caller's size.

   Each "older" struct below carries, past its size, values the call would refuse or
   crash on (a wild pointer, NaN, 0 slots): taking them would show. */
#include "test_util.h"

#include <errno.h>
#include <stddef.h>
#include <sys/stat.h>

#define END(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))
#define WILD ((const void *)(uintptr_t)0x10) /* a pointer the library must not read */

static lmoe_context *ctx;
static const char *work;

/* A call that must fail with INVALID_ARGUMENT and a message naming `what`. */
#define REFUSED(what, call)                                                                   \
  do {                                                                                        \
    lmoe_status st_ = (call);                                                                 \
    const char *m_ = lmoe_context_last_error(ctx);                                            \
    CHECK(st_ == LMOE_ERR_INVALID_ARGUMENT && strstr(m_, what) && strstr(m_, "struct_size"),  \
          "%s: %s, \"%s\"", #call, lmoe_status_string(st_), m_);                              \
  } while (0)

/* A struct with room past it, for sizes larger than this library's. */
#define BIG(type) struct { type s; uint8_t tail[64]; }

static void test_context_config(void) {
  lmoe_context_config cfg;
  lmoe_context *c = NULL;
  char err[256] = "";
  /* older: up to threads; guard and allocator past it hold values create refuses */
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU, cfg.threads = 2, cfg.guard = 7;
  cfg.allocator.alloc = (void *(*)(void *, size_t))(uintptr_t)WILD; /* half an allocator */
  cfg.struct_size = END(lmoe_context_config, threads);
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_OK, "older context config: %s", err);
  CHECK(c && lmoe_context_threads(c) == 2 && lmoe_context_guard(c) == LMOE_GUARD_HOST,
        "older context config: threads %d, guard %d", c ? lmoe_context_threads(c) : -1,
        c ? lmoe_context_guard(c) : -1);
  lmoe_context_release(c);
  c = NULL;
  cfg.struct_size = sizeof(uint32_t); /* all defaults */
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_OK && c, "struct_size 4: %s", err);
  lmoe_context_release(c);
  c = NULL;
  lmoe_context_config_init(&cfg);
  cfg.struct_size = 6;
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && !c &&
            strstr(err, "context config"), "struct_size 6: %s", err);
  BIG(lmoe_context_config) big;
  memset(&big, 0, sizeof big);
  lmoe_context_config_init(&big.s);
  big.s.struct_size = sizeof big.s + 8;
  CHECK(lmoe_context_create(&big.s, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && !c &&
            strstr(err, "newer"), "larger context config: %s", err);
}

static lmoe_layer *test_layer_config(void) {
  lmoe_layer_config lc, got;
  lmoe_layer *l = NULL;
  /* older: up to intermediate; top_k, renormalize, max_tokens take their defaults */
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8;
  lc.top_k = 99, lc.renormalize = 0, lc.max_tokens = 0;
  lc.struct_size = END(lmoe_layer_config, intermediate);
  OK(ctx, lmoe_layer_create(ctx, &lc, &l));
  OK(ctx, lmoe_layer_randomize(l, 1, 0.1f));
  lmoe_layer_config_init(&got);
  OK(ctx, lmoe_layer_get_config(l, &got));
  CHECK(got.struct_size == sizeof got && got.top_k == 2 && got.renormalize == 1 && got.max_tokens == 8192,
        "older layer config: top_k %d renormalize %d max_tokens %d", got.top_k, got.renormalize,
        got.max_tokens);
  /* the size before the shard fields (28 bytes): past it a shard the call would refuse
     (shard_size 99, a wild comm); taken as unsharded */
  lmoe_layer *l3 = NULL;
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8, lc.max_tokens = 64;
  lc.shard_mode = 7, lc.shard_rank = 5, lc.shard_size = 99, lc.comm = (lmoe_comm *)(uintptr_t)WILD;
  lc.struct_size = END(lmoe_layer_config, max_tokens);
  OK(ctx, lmoe_layer_create(ctx, &lc, &l3));
  lmoe_layer_config_init(&got);
  OK(ctx, lmoe_layer_get_config(l3, &got));
  CHECK(got.max_tokens == 64 && got.shard_mode == LMOE_SHARD_TP && got.shard_rank == 0 && got.shard_size == 1 &&
            got.comm == NULL,
        "layer config without the shard: mode %d rank %d size %d", got.shard_mode, got.shard_rank, got.shard_size);
  lmoe_layer_release(l3);
  /* the size before weight_dtype: past it a dtype the call would refuse (77); bf16 */
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8, lc.max_tokens = 64, lc.weight_dtype = 77;
  lc.struct_size = END(lmoe_layer_config, comm);
  OK(ctx, lmoe_layer_create(ctx, &lc, &l3));
  lmoe_layer_config_init(&got);
  OK(ctx, lmoe_layer_get_config(l3, &got));
  CHECK(got.weight_dtype == LMOE_DTYPE_BF16, "layer config without weight_dtype: %d", got.weight_dtype);
  /* get_config into an older struct writes up to its size */
  BIG(lmoe_layer_config) old;
  memset(&old, 0xab, sizeof old);
  old.s.struct_size = END(lmoe_layer_config, comm);
  OK(ctx, lmoe_layer_get_config(l3, &old.s));
  const uint8_t *raw = (const uint8_t *)&old;
  bool untouched = true;
  for (size_t i = END(lmoe_layer_config, comm); i < sizeof old; i++) untouched &= raw[i] == 0xab;
  CHECK(old.s.struct_size == END(lmoe_layer_config, comm) && old.s.max_tokens == 64 && untouched,
        "older layer config out: struct_size %u, max_tokens %d, past it untouched %d", old.s.struct_size,
        old.s.max_tokens, untouched);
  lmoe_layer_release(l3);
  /* FP8: the dtype is taken, and an unknown one refused naming the field */
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8, lc.max_tokens = 64, lc.weight_dtype = LMOE_DTYPE_F8_E4M3;
  OK(ctx, lmoe_layer_create(ctx, &lc, &l3));
  lmoe_layer_config_init(&got);
  OK(ctx, lmoe_layer_get_config(l3, &got));
  CHECK(got.weight_dtype == LMOE_DTYPE_F8_E4M3, "FP8 layer config: weight_dtype %d", got.weight_dtype);
  lmoe_layer_release(l3);
  lc.weight_dtype = 77;
  l3 = NULL;
  CHECK(lmoe_layer_create(ctx, &lc, &l3) == LMOE_ERR_INVALID_ARGUMENT && !l3 &&
            strstr(lmoe_context_last_error(ctx), "weight_dtype"),
        "weight_dtype 77: %s", lmoe_context_last_error(ctx));
  lmoe_layer *l2 = NULL;
  lc.struct_size = END(lmoe_layer_config, hidden); /* intermediate has no default */
  REFUSED("layer config", lmoe_layer_create(ctx, &lc, &l2));
  BIG(lmoe_layer_config) big;
  memset(&big, 0, sizeof big);
  lmoe_layer_config_init(&big.s);
  big.s.num_experts = 4, big.s.hidden = 16, big.s.intermediate = 8;
  big.s.struct_size = sizeof big.s + 4;
  REFUSED("layer config", lmoe_layer_create(ctx, &big.s, &l2));
  CHECK(l2 == NULL, "a refused layer config makes no layer");
  return l;
}

static lmoe_pool *test_pool_config(lmoe_layer *l) {
  lmoe_pool_config pc, got;
  lmoe_pool *p = NULL;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 3, pc.max_rank = 0; /* rank 0 would be refused */
  pc.struct_size = END(lmoe_pool_config, num_slots);
  OK(ctx, lmoe_pool_create(l, &pc, &p));
  OK(ctx, lmoe_pool_get_config(p, &got));
  CHECK(got.num_slots == 3 && got.max_rank == 16, "older pool config: %d slots, rank %d", got.num_slots,
        got.max_rank);
  lmoe_pool *p2 = NULL;
  pc.struct_size = 2;
  REFUSED("pool config", lmoe_pool_create(l, &pc, &p2));
  BIG(lmoe_pool_config) big;
  memset(&big, 0, sizeof big);
  lmoe_pool_config_init(&big.s);
  big.s.struct_size = sizeof big.s + 4;
  REFUSED("pool config", lmoe_pool_create(l, &big.s, &p2));
  return p;
}

static void test_adapters(lmoe_pool *p) {
  enum { E = 4, H = 16, I = 8, R = 2 };
  static float a[E * R * H], b[E * I * R];
  for (size_t i = 0; i < sizeof a / sizeof *a; i++) a[i] = 0.01f * (float)(i % 7);
  for (size_t i = 0; i < sizeof b / sizeof *b; i++) b[i] = 0.02f * (float)(i % 5);
  /* older adapter desc: up to gate; up, gate_up and down past it are wild */
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  d.gate = (lmoe_lora_part){a, b, R, 1.0f};
  d.up = d.gate_up = d.down = (lmoe_lora_part){WILD, WILD, 99, 1.0f};
  d.struct_size = END(lmoe_adapter_desc, gate);
  OK(ctx, lmoe_pool_load(p, 0, &d));
  lmoe_slot_info si;
  OK(ctx, lmoe_pool_slot_info(p, 0, &si));
  CHECK(si.loaded && si.targets == LMOE_TARGET_GATE && si.rank_gate == R, "older adapter desc: targets %d",
        si.targets);
  d.struct_size = 7;
  REFUSED("adapter desc", lmoe_pool_load(p, 1, &d));
  BIG(lmoe_adapter_desc) bigd;
  memset(&bigd, 0, sizeof bigd);
  lmoe_adapter_desc_init(&bigd.s);
  bigd.s.gate = (lmoe_lora_part){a, b, R, 1.0f};
  bigd.s.struct_size = sizeof bigd.s + 8;
  REFUSED("adapter desc", lmoe_pool_load(p, 1, &bigd.s));
  OK(ctx, lmoe_pool_slot_info(p, 1, &si));
  CHECK(!si.loaded, "a refused adapter desc loads nothing");

  /* older random adapter: up to rank; alpha (NaN, refused if read) defaults to 32 */
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  ra.targets = LMOE_TARGET_DOWN, ra.rank = 4, ra.alpha = NAN, ra.scale = -1.0f;
  ra.struct_size = END(lmoe_random_adapter, rank);
  OK(ctx, lmoe_pool_load_random(p, 1, &ra));
  OK(ctx, lmoe_pool_slot_info(p, 1, &si));
  CHECK(si.loaded && si.targets == LMOE_TARGET_DOWN && fabsf(si.scale_down - 32.0f / 4) < 1e-6f,
        "older random adapter: targets %d, scale %g", si.targets, (double)si.scale_down);
  ra.struct_size = 0;
  REFUSED("random adapter", lmoe_pool_load_random(p, 2, &ra));
  BIG(lmoe_random_adapter) bigr;
  memset(&bigr, 0, sizeof bigr);
  lmoe_random_adapter_init(&bigr.s);
  bigr.s.struct_size = sizeof bigr.s + 4;
  REFUSED("random adapter", lmoe_pool_load_random(p, 2, &bigr.s));
}

static void test_forward_args(lmoe_layer *l, lmoe_pool *p) {
  enum { M = 3, H = 16, E = 4 };
  lmoe_batch *batch = NULL;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int32_t tok[1] = {M}, sl[1] = {0};
  OK(ctx, lmoe_batch_set(batch, p, 1, tok, sl));
  lmoe_buffer *x = test_buffer(ctx, LMOE_DTYPE_BF16, M, H), *lg = test_buffer(ctx, LMOE_DTYPE_F32, M, E);
  lmoe_buffer *out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  OK(ctx, lmoe_buffer_fill_random(x, 1, -1, 1, NULL));
  OK(ctx, lmoe_buffer_fill_random(lg, 2, -1, 1, NULL));
  BIG(lmoe_forward_args) big;
  memset(&big, 0, sizeof big);
  lmoe_forward_args *a = &big.s;
  lmoe_forward_args_init(a);
  a->layer = l, a->pool = p, a->batch = batch, a->x = x, a->router_logits = lg, a->out = out;
  OK(ctx, lmoe_forward(ctx, a, NULL));
  /* out is the last field and has no default: no older size is complete */
  a->struct_size = offsetof(lmoe_forward_args, out);
  REFUSED("forward args", lmoe_forward(ctx, a, NULL));
  a->struct_size = sizeof *a + 8;
  REFUSED("forward args", lmoe_forward(ctx, a, NULL));
  lmoe_buffer_release(x), lmoe_buffer_release(lg), lmoe_buffer_release(out);
  lmoe_batch_release(batch);
}

static void test_peft_structs(void) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/adapter", work);
  /* older synthetic spec: up to scale; the pattern keys past it are wild */
  lmoe_peft_synthetic sp;
  lmoe_peft_synthetic_init(&sp);
  sp.num_experts = 4, sp.hidden = 16, sp.intermediate = 8, sp.rank = 2;
  sp.rank_pattern_key = WILD, sp.alpha_pattern_key = WILD;
  sp.struct_size = END(lmoe_peft_synthetic, scale);
  OK(ctx, lmoe_peft_write_synthetic(ctx, dir, &sp));
  sp.struct_size = 3;
  REFUSED("synthetic spec", lmoe_peft_write_synthetic(ctx, dir, &sp));
  BIG(lmoe_peft_synthetic) bigs;
  memset(&bigs, 0, sizeof bigs);
  lmoe_peft_synthetic_init(&bigs.s);
  bigs.s.struct_size = sizeof bigs.s + 4;
  REFUSED("synthetic spec", lmoe_peft_write_synthetic(ctx, dir, &bigs.s));

  lmoe_peft *peft = NULL;
  OK(ctx, lmoe_peft_open(ctx, dir, &peft));
  /* older info: up to layout; the library writes nothing past it */
  BIG(lmoe_peft_info) info;
  memset(&info, 0xab, sizeof info);
  info.s.struct_size = END(lmoe_peft_info, layout);
  OK(ctx, lmoe_peft_get_info(peft, &info.s));
  const uint8_t *raw = (const uint8_t *)&info;
  bool untouched = true;
  for (size_t i = END(lmoe_peft_info, layout); i < sizeof info; i++) untouched &= raw[i] == 0xab;
  CHECK(info.s.struct_size == END(lmoe_peft_info, layout) && info.s.family == LMOE_FAMILY_QWEN &&
            info.s.layout == LMOE_PEFT_PER_EXPERT && untouched,
        "older peft info: family %d layout %d, past it untouched %d", info.s.family, info.s.layout, untouched);
  lmoe_peft_info_init(&info.s);
  OK(ctx, lmoe_peft_get_info(peft, &info.s));
  CHECK(info.s.rank == 2 && info.s.num_experts == 4, "peft info: rank %d, experts %d", info.s.rank,
        info.s.num_experts);
  info.s.struct_size = sizeof info.s + 4;
  REFUSED("peft info", lmoe_peft_get_info(peft, &info.s));
  info.s.struct_size = 2;
  REFUSED("peft info", lmoe_peft_get_info(peft, &info.s));
  lmoe_peft_close(peft);
}

static void test_checkpoint_info(void) {
  enum { E = 2, H = 8, I = 4 };
  static float w[I * H];
  static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
  char names[E * 3][96];
  lmoe_tensor_entry t[E * 3];
  memset(t, 0, sizeof t);
  for (int e = 0; e < E; e++)
    for (int p = 0; p < 3; p++) {
      int k = e * 3 + p;
      snprintf(names[k], sizeof names[k], "model.layers.0.mlp.experts.%d.%s.weight", e, pn[p]);
      t[k].name = names[k], t[k].dtype = LMOE_DTYPE_F32, t[k].ndim = 2, t[k].data = w;
      t[k].shape[0] = p == 2 ? H : I, t[k].shape[1] = p == 2 ? I : H;
    }
  char path[4096];
  snprintf(path, sizeof path, "%s/model.safetensors", work);
  OK(ctx, lmoe_safetensors_write(ctx, path, E * 3, t, 0, NULL, NULL));
  lmoe_checkpoint *ck = NULL;
  OK(ctx, lmoe_checkpoint_open(ctx, path, &ck));
  BIG(lmoe_checkpoint_layer_info) info;
  memset(&info, 0xcd, sizeof info);
  info.s.struct_size = END(lmoe_checkpoint_layer_info, num_experts);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, 0, &info.s));
  const uint8_t *raw = (const uint8_t *)&info;
  bool untouched = true;
  for (size_t i = END(lmoe_checkpoint_layer_info, num_experts); i < sizeof info; i++) untouched &= raw[i] == 0xcd;
  CHECK(info.s.family == LMOE_FAMILY_QWEN && info.s.num_experts == E && untouched,
        "older layer info: family %d, experts %d, past it untouched %d", info.s.family, info.s.num_experts,
        untouched);
  lmoe_checkpoint_layer_info_init(&info.s);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, 0, &info.s));
  CHECK(info.s.hidden == H && info.s.intermediate == I && !info.s.has_router &&
            info.s.weight_dtype == LMOE_DTYPE_BF16,
        "layer info: H %d I %d dtype %d", info.s.hidden, info.s.intermediate, info.s.weight_dtype);
  /* the size before weight_dtype: written up to it */
  memset(&info, 0xcd, sizeof info);
  info.s.struct_size = END(lmoe_checkpoint_layer_info, has_router);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, 0, &info.s));
  untouched = true;
  for (size_t i = END(lmoe_checkpoint_layer_info, has_router); i < sizeof info; i++) untouched &= raw[i] == 0xcd;
  CHECK(info.s.has_router == 0 && untouched, "layer info without weight_dtype: past it untouched %d", untouched);
  lmoe_checkpoint_layer_info_init(&info.s);
  info.s.struct_size = sizeof info.s + 4;
  REFUSED("layer info", lmoe_checkpoint_get_layer_info(ck, 0, &info.s));
  lmoe_checkpoint_close(ck);
}

/* lmoe_batch_config: 4 and up (a depth of 0 past an older size would be refused);
   lmoe_wait_counters: written up to the caller's size. */
static void test_batch_config_and_waits(void) {
  lmoe_batch_config bc;
  lmoe_batch *b = NULL;
  lmoe_batch_config_init(&bc);
  bc.staging_depth = 0;
  bc.struct_size = sizeof(uint32_t);
  OK(ctx, lmoe_batch_create_with(ctx, &bc, &b));
  lmoe_batch_release(b);
  b = NULL;
  bc.struct_size = 2;
  REFUSED("batch config", lmoe_batch_create_with(ctx, &bc, &b));
  BIG(lmoe_batch_config) big;
  memset(&big, 0, sizeof big);
  lmoe_batch_config_init(&big.s);
  big.s.struct_size = sizeof big.s + 4;
  REFUSED("batch config", lmoe_batch_create_with(ctx, &big.s, &b));
  CHECK(b == NULL, "a refused batch config makes no batch");

  lmoe_context_reset_counters(ctx);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  BIG(lmoe_wait_counters) w;
  memset(&w, 0xab, sizeof w);
  w.s.struct_size = END(lmoe_wait_counters, host_waits);
  OK(ctx, lmoe_context_wait_counters(ctx, &w.s));
  const uint8_t *raw = (const uint8_t *)&w;
  bool untouched = true;
  for (size_t i = END(lmoe_wait_counters, host_waits); i < sizeof w; i++) untouched &= raw[i] == 0xab;
  CHECK(w.s.host_waits == 1 && untouched, "older wait counters: %llu waits, past it untouched %d",
        (unsigned long long)w.s.host_waits, untouched);
  w.s.struct_size = sizeof w.s;
  OK(ctx, lmoe_context_wait_counters(ctx, &w.s));
  CHECK(w.s.host_waits == 1 && w.s.forced == 1 && w.s.backpressure == 0, "wait counters %llu = %llu + %llu",
        (unsigned long long)w.s.host_waits, (unsigned long long)w.s.forced, (unsigned long long)w.s.backpressure);
  w.s.struct_size = sizeof w.s + 4;
  REFUSED("wait counters", lmoe_context_wait_counters(ctx, &w.s));
}

/* Initialising (lmoe_X_init_sized; lmoe_X_init(p) is the macro passing sizeof *(p)).
   Each struct lies at the start of a buffer of canary bytes. An older size: struct_size
   is that size, the fields inside it hold their defaults, and every byte past it is
   still a canary (an init that wrote the library's whole sizeof, as before, fails
   here). The full size: as before. A size below the struct's oldest, or NULL: nothing
   written. A larger size (a newer header): the library's part written, struct_size
   the caller's (so the calls refuse it), the bytes past the library's sizeof kept.
   The symbols lmoe_X_init (called by name, not through the macro) write up to the
   struct's 0.1.0 end and no further. */
#define CANARY 0x5a
#define CANARY_TAIL 64

static size_t canaries_from(const void *buf, size_t from, size_t size) {
  const uint8_t *b = buf;
  for (size_t i = from; i < size; i++)
    if (b[i] != CANARY) return i;
  return SIZE_MAX;
}

/* INIT_CASES(type, older, frozen_end, full_ok, older_ok): older is an older size of the
   struct, frozen_end the end of its last field at 0.1.0; full_ok and older_ok are
   conditions on `q` (a type *) after the full and the older init. */
#define INIT_CASES(type, older, frozen_end, full_ok, older_ok)                                          \
  do {                                                                                                  \
    union {                                                                                             \
      type s;                                                                                           \
      uint8_t raw[sizeof(type) + CANARY_TAIL];                                                          \
    } u_;                                                                                               \
    type *q = &u_.s;                                                                                    \
    size_t at_;                                                                                         \
    /* older */                                                                                         \
    memset(&u_, CANARY, sizeof u_);                                                                     \
    type##_init_sized(q, (older));                                                                      \
    at_ = canaries_from(u_.raw, (older), sizeof u_);                                                    \
    CHECK(q->struct_size == (older) && at_ == SIZE_MAX && (older_ok),                                   \
          #type "_init_sized(%zu): struct_size %u, byte %zu written past it (SIZE_MAX: none)",          \
          (size_t)(older), q->struct_size, at_);                                                        \
    /* full, through the macro */                                                                       \
    memset(&u_, CANARY, sizeof u_);                                                                     \
    type##_init(q);                                                                                     \
    at_ = canaries_from(u_.raw, sizeof(type), sizeof u_);                                               \
    CHECK(q->struct_size == sizeof(type) && at_ == SIZE_MAX && (full_ok),                               \
          #type "_init: struct_size %u (want %zu), byte %zu written past it", q->struct_size,          \
          sizeof(type), at_);                                                                           \
    /* below the oldest, and NULL */                                                                    \
    memset(&u_, CANARY, sizeof u_);                                                                     \
    type##_init_sized(q, 3);                                                                            \
    at_ = canaries_from(u_.raw, 0, sizeof u_);                                                          \
    CHECK(at_ == SIZE_MAX, #type "_init_sized(3) wrote byte %zu", at_);                                 \
    type##_init_sized(NULL, sizeof(type));                                                              \
    /* larger (a newer header's struct) */                                                              \
    memset(&u_, CANARY, sizeof u_);                                                                     \
    type##_init_sized(q, sizeof(type) + 8);                                                             \
    at_ = canaries_from(u_.raw, sizeof(type), sizeof u_);                                               \
    CHECK(q->struct_size == sizeof(type) + 8 && at_ == SIZE_MAX && (full_ok),                           \
          #type "_init_sized(sizeof + 8): struct_size %u, byte %zu written past sizeof", q->struct_size, \
          at_);                                                                                         \
    /* the symbol by name: up to the 0.1.0 end */                                                       \
    memset(&u_, CANARY, sizeof u_);                                                                     \
    (type##_init)(q);                                                                                   \
    at_ = canaries_from(u_.raw, (frozen_end), sizeof u_);                                               \
    CHECK(q->struct_size == (frozen_end) && at_ == SIZE_MAX && (frozen_end) <= sizeof(type),            \
          "(" #type "_init)(): struct_size %u (want %zu), byte %zu written past it", q->struct_size,    \
          (size_t)(frozen_end), at_);                                                                   \
  } while (0)

static void test_init_sizes(void) {
  INIT_CASES(lmoe_context_config, END(lmoe_context_config, threads), END(lmoe_context_config, allocator),
             q->backend == LMOE_BACKEND_AUTO && q->device == 0 && q->stream == NULL && q->threads == 0 &&
                 q->guard == LMOE_GUARD_HOST && q->allocator.alloc == NULL && q->allocator.free == NULL &&
                 q->allocator.user == NULL,
             q->backend == LMOE_BACKEND_AUTO && q->device == 0 && q->stream == NULL && q->threads == 0);
  INIT_CASES(lmoe_layer_config, END(lmoe_layer_config, max_tokens), END(lmoe_layer_config, weight_dtype),
             q->num_experts == 0 && q->hidden == 0 && q->intermediate == 0 && q->top_k == 2 &&
                 q->renormalize == 1 && q->max_tokens == 8192 && q->shard_mode == LMOE_SHARD_TP &&
                 q->shard_rank == 0 && q->shard_size == 1 && q->comm == NULL &&
                 q->weight_dtype == LMOE_DTYPE_BF16,
             q->num_experts == 0 && q->intermediate == 0 && q->top_k == 2 && q->renormalize == 1 &&
                 q->max_tokens == 8192);
  INIT_CASES(lmoe_layer_config, END(lmoe_layer_config, comm), END(lmoe_layer_config, weight_dtype),
             q->top_k == 2 && q->weight_dtype == LMOE_DTYPE_BF16,
             q->top_k == 2 && q->shard_size == 1 && q->comm == NULL);
  INIT_CASES(lmoe_pool_config, END(lmoe_pool_config, num_slots), END(lmoe_pool_config, max_rank),
             q->num_slots == 4 && q->max_rank == 16, q->num_slots == 4);
  INIT_CASES(lmoe_adapter_desc, END(lmoe_adapter_desc, gate), END(lmoe_adapter_desc, down),
             q->dtype == LMOE_DTYPE_F32 && q->gate.a == NULL && q->up.rank == 0 && q->gate_up.b == NULL &&
                 q->down.a == NULL && q->down.scale == 0.0f,
             q->dtype == LMOE_DTYPE_F32 && q->gate.a == NULL && q->gate.b == NULL && q->gate.rank == 0);
  INIT_CASES(lmoe_random_adapter, END(lmoe_random_adapter, rank), END(lmoe_random_adapter, scale),
             q->targets == LMOE_TARGET_ALL && q->fused == 0 && q->rank == 16 && q->alpha == 32.0f &&
                 q->use_rslora == 0 && q->seed == 1 && q->scale == 0.05f,
             q->targets == LMOE_TARGET_ALL && q->fused == 0 && q->rank == 16);
  INIT_CASES(lmoe_batch_config, sizeof(uint32_t), END(lmoe_batch_config, staging_depth),
             q->staging_depth == 4, true);
  /* no older size of lmoe_forward_args is complete (out has no default): the size
     before out is below its oldest and writes nothing; that case stands for "older" */
  {
    union {
      lmoe_forward_args s;
      uint8_t raw[sizeof(lmoe_forward_args) + CANARY_TAIL];
    } u;
    memset(&u, CANARY, sizeof u);
    lmoe_forward_args_init_sized(&u.s, offsetof(lmoe_forward_args, out));
    size_t at = canaries_from(u.raw, 0, sizeof u);
    CHECK(at == SIZE_MAX, "lmoe_forward_args_init_sized(below the oldest) wrote byte %zu", at);
  }
  INIT_CASES(lmoe_forward_args, END(lmoe_forward_args, out), END(lmoe_forward_args, out),
             q->layer == NULL && q->pool == NULL && q->batch == NULL && q->x == NULL &&
                 q->router_logits == NULL && q->topk_ids == NULL && q->topk_weights == NULL && q->out == NULL,
             q->layer == NULL && q->out == NULL);
  INIT_CASES(lmoe_peft_info, END(lmoe_peft_info, layout), END(lmoe_peft_info, bytes),
             q->family == 0 && q->rank == 0 && q->num_tensors == 0 && q->bytes == 0,
             q->family == 0 && q->layout == 0);
  INIT_CASES(lmoe_peft_synthetic, END(lmoe_peft_synthetic, scale), END(lmoe_peft_synthetic, alpha_pattern_value),
             q->family == LMOE_FAMILY_QWEN && q->layout == LMOE_PEFT_PER_EXPERT && q->num_layers == 1 &&
                 q->num_experts == 4 && q->hidden == 64 && q->intermediate == 32 &&
                 q->targets == LMOE_TARGET_ALL && q->rank == 8 && q->alpha == 16.0f && q->use_rslora == 0 &&
                 q->dtype == LMOE_DTYPE_BF16 && q->seed == 1 && q->scale == 0.1f &&
                 q->rank_pattern_key == NULL && q->rank_pattern_value == 0 && q->alpha_pattern_key == NULL &&
                 q->alpha_pattern_value == 0.0f,
             q->family == LMOE_FAMILY_QWEN && q->num_layers == 1 && q->rank == 8 && q->alpha == 16.0f &&
                 q->dtype == LMOE_DTYPE_BF16 && q->seed == 1 && q->scale == 0.1f);
  INIT_CASES(lmoe_checkpoint_layer_info, END(lmoe_checkpoint_layer_info, has_router),
             END(lmoe_checkpoint_layer_info, weight_dtype), q->family == 0 && q->has_router == 0 && q->weight_dtype == 0,
             q->family == 0 && q->num_experts == 0 && q->has_router == 0);

  /* what the calls make of them: an older size initialised by the library is taken
     with the defaults past it; a larger one (a newer header) is refused */
  lmoe_pool_config pc;
  lmoe_pool_config_init_sized(&pc, END(lmoe_pool_config, num_slots));
  pc.num_slots = 3;
  lmoe_layer_config lc;
  lmoe_layer_config_init_sized(&lc, END(lmoe_layer_config, max_tokens));
  lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8, lc.max_tokens = 64;
  lmoe_layer *l = NULL;
  lmoe_pool *p = NULL;
  OK(ctx, lmoe_layer_create(ctx, &lc, &l));
  OK(ctx, lmoe_pool_create(l, &pc, &p));
  lmoe_pool_config got;
  lmoe_pool_config_init(&got);
  OK(ctx, lmoe_pool_get_config(p, &got));
  CHECK(got.num_slots == 3 && got.max_rank == 16, "pool of an older initialised config: %d slots, rank %d",
        got.num_slots, got.max_rank);
  lmoe_pool_release(p);
  BIG(lmoe_layer_config) big;
  memset(&big, CANARY, sizeof big);
  lmoe_layer_config_init_sized(&big.s, sizeof big.s + 8);
  big.s.num_experts = 4, big.s.hidden = 16, big.s.intermediate = 8;
  lmoe_layer *l2 = NULL;
  REFUSED("newer", lmoe_layer_create(ctx, &big.s, &l2));
  CHECK(l2 == NULL, "a layer config of a newer header makes no layer");
  lmoe_layer_release(l);
}

int main(int argc, char **argv) {
  work = argc > 1 ? argv[1] : "test_abi_work";
  if (mkdir(work, 0777) != 0 && errno != EEXIST) {
    perror(work);
    return 1;
  }
  ctx = test_cpu_context(1, LMOE_GUARD_HOST);
  test_context_config();
  lmoe_layer *l = test_layer_config();
  lmoe_pool *p = test_pool_config(l);
  test_adapters(p);
  test_forward_args(l, p);
  test_peft_structs();
  test_checkpoint_info();
  test_batch_config_and_waits();
  test_init_sizes();
  lmoe_pool_release(p);
  lmoe_layer_release(l);
  lmoe_context_release(ctx);
  return test_summary();
}
