/* Adapter pool: fixed slots of LoRA weights in the canonical layout (internal.h). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


float lmoe_lora_scale(float alpha, int32_t rank, int32_t use_rslora) {
  if (rank <= 0) return 0.0f;
  return use_rslora ? (float)(alpha / sqrt((double)rank)) : alpha / (float)rank;
}

void lmoe_pool_config_init_sized(lmoe_pool_config *cfg, size_t size) {
  lmoe_pool_config def;
  memset(&def, 0, sizeof def);
  def.num_slots = 4;
  def.max_rank = 16;
  lmoe_struct_init(cfg, size, &def, sizeof def, sizeof(uint32_t));
}

void lmoe_adapter_desc_init_sized(lmoe_adapter_desc *d, size_t size) {
  lmoe_adapter_desc def;
  memset(&def, 0, sizeof def);
  def.dtype = LMOE_DTYPE_F32;
  lmoe_struct_init(d, size, &def, sizeof def, sizeof(uint32_t));
}

void lmoe_random_adapter_init_sized(lmoe_random_adapter *s, size_t size) {
  lmoe_random_adapter def;
  memset(&def, 0, sizeof def);
  def.targets = LMOE_TARGET_ALL;
  def.rank = 16;
  def.alpha = 32.0f;
  def.seed = 1;
  def.scale = 0.05f;
  lmoe_struct_init(s, size, &def, sizeof def, sizeof(uint32_t));
}

static bool valid_pool(const lmoe_pool *p) { return lmoe_object_is(p, LMOE_MAGIC_POOL); }

static void pool_destroy(lmoe_object *obj) {
  lmoe_pool *p = (lmoe_pool *)obj;
  lmoe_layer *layer = p->layer;
  lmoe_context *ctx = layer->ctx;
  if (ctx->ops->pool_fini) ctx->ops->pool_fini(ctx, p);
  if (p->storage) ctx->ops->free(ctx, LMOE_MEMORY_DEVICE, p->storage);
  free(p->slots);
  free(p);
  lmoe_layer_release(layer);
}

lmoe_status lmoe_pool_create(lmoe_layer *layer, const lmoe_pool_config *cfg_in, lmoe_pool **out) {
  if (!layer || layer->obj.magic != LMOE_MAGIC_LAYER) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = layer->ctx;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!cfg_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "pool config is NULL");
  lmoe_pool_config cfg_v; /* every field has a default */
  lmoe_pool_config_init(&cfg_v);
  lmoe_status st = lmoe_struct_in(ctx, &cfg_v, sizeof cfg_v, sizeof(uint32_t), cfg_in, "pool config",
                                  "lmoe_pool_config_init");
  if (st) return st;
  const lmoe_pool_config *cfg = &cfg_v;
  if (cfg->num_slots < 1 || cfg->num_slots > 4096)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "num_slots must be 1..4096, got %d",
                     (int)cfg->num_slots);
  if (cfg->max_rank < 1 || cfg->max_rank > 1024)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "max_rank must be 1..1024, got %d",
                     (int)cfg->max_rank);
  const lmoe_layer_config *lc = &layer->local; /* a sharded layer's slots hold its shard */
  size_t E = (size_t)lc->num_experts, H = (size_t)lc->hidden, I = (size_t)lc->intermediate;
  size_t R = (size_t)cfg->max_rank, R13 = 2 * R;
  lmoe_pool *p = calloc(1, sizeof *p);
  if (!p) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&p->obj, LMOE_MAGIC_POOL, pool_destroy);
  p->cfg = *cfg;
  p->slots = calloc((size_t)cfg->num_slots, sizeof *p->slots);
  p->off_a13 = 0;
  p->off_b13 = p->off_a13 + E * R13 * H * 2;
  p->off_a2 = p->off_b13 + E * 2 * I * R13 * 2;
  p->off_b2 = p->off_a2 + E * R * I * 2;
  p->slot_bytes = p->off_b2 + E * H * R * 2;
  p->slot_bytes = (p->slot_bytes + 255) & ~(size_t)255;
  st = p->slots ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (!st) st = ctx->ops->alloc(ctx, LMOE_MEMORY_DEVICE, p->slot_bytes * (size_t)cfg->num_slots,
                                &p->storage);
  if (!st) st = lmoe_context_reserve(ctx, lc, cfg);
  if (!st && ctx->ops->pool_init) {
    p->layer = layer; /* hooks may look at the layer's shapes */
    st = ctx->ops->pool_init(ctx, p);
  }
  if (st) {
    if (p->storage) ctx->ops->free(ctx, LMOE_MEMORY_DEVICE, p->storage);
    free(p->slots);
    free(p);
    return st;
  }
  lmoe_object_retain(&layer->obj);
  p->layer = layer;
  *out = p;
  return LMOE_OK;
}

void lmoe_pool_release(lmoe_pool *p) {
  if (valid_pool(p)) lmoe_object_release(&p->obj);
}

lmoe_status lmoe_pool_get_config(const lmoe_pool *p, lmoe_pool_config *out) {
  if (!valid_pool(p) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  *out = p->cfg;
  return LMOE_OK;
}

static lmoe_status check_slot(const lmoe_pool *p, int32_t slot) {
  if (slot < 0 || slot >= p->cfg.num_slots)
    return lmoe_fail(p->layer->ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "slot %d is out of range: the pool has slots 0..%d", (int)slot,
                     (int)p->cfg.num_slots - 1);
  return LMOE_OK;
}

static lmoe_status check_part(const lmoe_pool *p, const lmoe_lora_part *part, const char *name,
                              bool *present) {
  lmoe_context *ctx = p->layer->ctx;
  *present = part->a || part->b;
  if (!*present) return LMOE_OK;
  if (!part->a || !part->b)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter part %s has %s but no %s", name,
                     part->a ? "A" : "B", part->a ? "B" : "A");
  if (part->rank < 1 || part->rank > p->cfg.max_rank)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "adapter part %s has rank %d; this pool takes ranks 1..%d (max_rank)", name,
                     (int)part->rank, (int)p->cfg.max_rank);
  if (!isfinite(part->scale))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter part %s has a non-finite scale", name);
  return LMOE_OK;
}

/* What a rank takes of a whole layer's part arrays (docs/design.md, "Sharding"):
   experts from e0; A's columns [a0, a0 + in) of its a_in; B's local row o is whole row
   o + b0 for o < seg, else o - seg + b1, of its b_out rows. Unsharded: all of them. */
typedef struct part_cut {
  size_t e0, a_in, a0, b_out, seg, b0, b1;
} part_cut;

/* Copies part arrays (PEFT layout per expert: a [r, in], b [out, r], of the whole
   layer) into the slot image, taking the rank's cut: A rows [row0, row0 + r) of an
   [E, rows_a, in] array; B into columns [col0, col0 + r) of rows [out0, out0 + out) of
   an [E, rows_b, cols_b] array. */
static void place_part(uint16_t *img_a, size_t rows_a, uint16_t *img_b, size_t rows_b,
                       size_t cols_b, const lmoe_lora_part *part, int32_t dtype, size_t E,
                       size_t in, size_t out, size_t row0, size_t out0, size_t col0, part_cut c) {
  size_t r = (size_t)part->rank;
  for (size_t e = 0; e < E; e++) {
    size_t ge = c.e0 + e;
    for (size_t i = 0; i < r; i++)
      for (size_t j = 0; j < in; j++)
        img_a[(e * rows_a + row0 + i) * in + j] = lmoe_f32_to_bf16(
            (float)lmoe_load_elem(part->a, dtype, (int64_t)((ge * r + i) * c.a_in + c.a0 + j)));
    for (size_t o = 0; o < out; o++) {
      size_t go = o < c.seg ? o + c.b0 : o - c.seg + c.b1;
      for (size_t i = 0; i < r; i++)
        img_b[(e * rows_b + out0 + o) * cols_b + col0 + i] =
            lmoe_f32_to_bf16((float)lmoe_load_elem(part->b, dtype, (int64_t)((ge * c.b_out + go) * r + i)));
    }
  }
}

lmoe_status lmoe_pool_load(lmoe_pool *p, int32_t slot, const lmoe_adapter_desc *d_in) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = p->layer->ctx;
  lmoe_clear_error(ctx);
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  if (!d_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter description is NULL");
  lmoe_adapter_desc d_v; /* every field has a default (f32, parts absent) */
  lmoe_adapter_desc_init(&d_v);
  st = lmoe_struct_in(ctx, &d_v, sizeof d_v, sizeof(uint32_t), d_in, "adapter desc", "lmoe_adapter_desc_init");
  if (st) return st;
  const lmoe_adapter_desc *d = &d_v;
  if (d->dtype != LMOE_DTYPE_BF16 && d->dtype != LMOE_DTYPE_F16 && d->dtype != LMOE_DTYPE_F32 &&
      d->dtype != LMOE_DTYPE_F64)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter dtype must be bf16, f16, f32 or f64");
  bool hg, hu, hgu, hd;
  if ((st = check_part(p, &d->gate, "gate", &hg)) || (st = check_part(p, &d->up, "up", &hu)) ||
      (st = check_part(p, &d->gate_up, "gate_up", &hgu)) ||
      (st = check_part(p, &d->down, "down", &hd)))
    return st;
  if (hgu && (hg || hu))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "adapter gives gate_up (fused) and gate/up (separate): give one form");
  if (!hg && !hu && !hgu && !hd)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter has no LoRA part");

  /* the desc is the whole layer's; a sharded layer's slot takes its rank's cut */
  const lmoe_layer *ly = p->layer;
  const lmoe_layer_config *lc = &ly->local;
  size_t E = (size_t)lc->num_experts, H = (size_t)lc->hidden, I = (size_t)lc->intermediate;
  size_t IW = (size_t)ly->cfg.intermediate, e0 = (size_t)ly->e0, i0 = (size_t)ly->i0;
  part_cut cut_gu = {e0, H, 0, 2 * IW, I, i0, IW + i0}, cut_g = {e0, H, 0, IW, I, i0, 0};
  part_cut cut_d = {e0, IW, i0, H, H, 0, 0};
  size_t R = (size_t)p->cfg.max_rank, R13 = 2 * R;
  /* The slot image goes to the device through the context's upload staging (upload.c),
     one stream-ordered copy per staging chunk on the context's stream, so it lands
     after every forward enqueued before it there and before every one enqueued after
     (docs/design.md, "Reloads"); the load does not wait for it. An image that fits one
     chunk is built in the staging itself (on a backend whose device memory is host
     memory, in the slot); a larger one in host memory first, then staged chunk by
     chunk. Everything was validated above: from here on the slot is rewritten. */
  uint8_t *dst = (uint8_t *)p->storage + (size_t)slot * p->slot_bytes;
  lmoe_upload u;
  void *span = NULL;
  size_t got = 0;
  st = lmoe_upload_begin(ctx, &u);
  if (!st) st = lmoe_upload_span(&u, dst, p->slot_bytes, &span, &got);
  if (st) {
    lmoe_upload_finish(&u);
    return st;
  }
  bool in_place = got == p->slot_bytes;
  uint8_t *img = in_place ? span : malloc(p->slot_bytes);
  if (!img) {
    lmoe_upload_finish(&u);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory (%zu bytes)", p->slot_bytes);
  }
  memset(img, 0, p->slot_bytes);
  uint16_t *a13 = (uint16_t *)(img + p->off_a13), *b13 = (uint16_t *)(img + p->off_b13);
  uint16_t *a2 = (uint16_t *)(img + p->off_a2), *b2 = (uint16_t *)(img + p->off_b2);

  lmoe_slot s = {0};
  s.loaded = true;
  if (hgu) {
    int32_t r = d->gate_up.rank;
    place_part(a13, R13, b13, 2 * I, R13, &d->gate_up, d->dtype, E, H, 2 * I, 0, 0, 0, cut_gu);
    s.fused = 1;
    s.g_lo = s.u_lo = 0;
    s.g_hi = s.u_hi = r;
    s.r13 = r;
    s.scale_gate = s.scale_up = d->gate_up.scale;
    s.targets |= LMOE_TARGET_GATE | LMOE_TARGET_UP;
  } else {
    int32_t row = 0;
    if (hg) {
      place_part(a13, R13, b13, 2 * I, R13, &d->gate, d->dtype, E, H, I, 0, 0, 0, cut_g);
      s.g_lo = 0;
      s.g_hi = row = d->gate.rank;
      s.scale_gate = d->gate.scale;
      s.targets |= LMOE_TARGET_GATE;
    }
    if (hu) {
      place_part(a13, R13, b13, 2 * I, R13, &d->up, d->dtype, E, H, I, (size_t)row, I, (size_t)row, cut_g);
      s.u_lo = row;
      s.u_hi = row + d->up.rank;
      row = s.u_hi;
      s.scale_up = d->up.scale;
      s.targets |= LMOE_TARGET_UP;
    }
    s.r13 = row;
  }
  if (hd) {
    place_part(a2, R, b2, H, R, &d->down, d->dtype, E, I, H, 0, 0, 0, cut_d);
    s.r2 = d->down.rank;
    s.scale_down = d->down.scale;
    s.targets |= LMOE_TARGET_DOWN;
  }

  if (in_place) {
    lmoe_upload_commit(&u, p->slot_bytes);
  } else { /* the first span is in hand; then one per chunk */
    for (size_t off = 0; !st && off < p->slot_bytes; off += got) {
      if (off) st = lmoe_upload_span(&u, dst + off, p->slot_bytes - off, &span, &got);
      if (st) break;
      memcpy(span, img + off, got);
      lmoe_upload_commit(&u, got);
    }
    free(img);
  }
  lmoe_status st2 = lmoe_upload_finish(&u);
  if (!st) st = st2;
  if (st) {
    p->slots[slot].loaded = false; /* content unknown after a failed copy */
    p->slots[slot].generation++;
    return st;
  }
  s.generation = p->slots[slot].generation + 1;
  s.pins = p->slots[slot].pins; /* pins belong to the slot, names to the adapter */
  s.last_used = ++p->clock;
  p->slots[slot] = s;
  return ctx->ops->slot_changed ? ctx->ops->slot_changed(ctx, p, slot) : LMOE_OK;
}

static void fill_uniform(float *dst, size_t n, uint64_t seed, float scale) {
  for (size_t i = 0; i < n; i++) dst[i] = (2.0f * lmoe_uniform(seed, i) - 1.0f) * scale;
}

lmoe_status lmoe_pool_load_random(lmoe_pool *p, int32_t slot, const lmoe_random_adapter *spec_in) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = p->layer->ctx;
  lmoe_clear_error(ctx);
  if (!spec_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "random adapter spec is NULL");
  lmoe_random_adapter spec_v; /* every field has a default */
  lmoe_random_adapter_init(&spec_v);
  lmoe_status st = lmoe_struct_in(ctx, &spec_v, sizeof spec_v, sizeof(uint32_t), spec_in, "random adapter",
                                  "lmoe_random_adapter_init");
  if (st) return st;
  const lmoe_random_adapter *spec = &spec_v;
  if (spec->targets <= 0 || spec->targets > LMOE_TARGET_ALL)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "targets must be a non-empty mask of gate (1), up (2), down (4)");
  if (spec->fused && (spec->targets & 3) != 3)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "a fused adapter targets both gate and up");
  if (spec->rank < 1 || spec->rank > p->cfg.max_rank)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "rank %d is out of range: this pool takes ranks 1..%d (max_rank)",
                     (int)spec->rank, (int)p->cfg.max_rank);
  if (!(spec->scale >= 0) || !isfinite(spec->alpha))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "scale must be >= 0 and alpha finite");
  const lmoe_layer_config *lc = &p->layer->cfg;
  size_t E = (size_t)lc->num_experts, H = (size_t)lc->hidden, I = (size_t)lc->intermediate;
  size_t r = (size_t)spec->rank;
  float sc = lmoe_lora_scale(spec->alpha, spec->rank, spec->use_rslora);
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  d.dtype = LMOE_DTYPE_F32;
  float *bufs[8] = {0};
  int nb = 0;
  uint64_t seed = lmoe_mix64(spec->seed);
#define LMOE_PART(field, in, out)                                             \
  do {                                                                        \
    float *a = malloc(E * r * (in) * sizeof(float));                          \
    float *b = malloc(E * (out) * r * sizeof(float));                         \
    bufs[nb++] = a;                                                           \
    bufs[nb++] = b;                                                           \
    if (!a || !b) {                                                           \
      st = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");      \
      goto done;                                                              \
    }                                                                         \
    fill_uniform(a, E * r * (in), seed = lmoe_mix64(seed + 1), spec->scale); \
    fill_uniform(b, E * (out) * r, seed = lmoe_mix64(seed + 1), spec->scale); \
    d.field.a = a;                                                            \
    d.field.b = b;                                                            \
    d.field.rank = spec->rank;                                                \
    d.field.scale = sc;                                                       \
  } while (0)
  if (spec->fused) {
    LMOE_PART(gate_up, H, 2 * I);
  } else {
    if (spec->targets & LMOE_TARGET_GATE) LMOE_PART(gate, H, I);
    if (spec->targets & LMOE_TARGET_UP) LMOE_PART(up, H, I);
  }
  if (spec->targets & LMOE_TARGET_DOWN) LMOE_PART(down, I, H);
#undef LMOE_PART
  st = lmoe_pool_load(p, slot, &d);
done:
  for (int i = 0; i < nb; i++) free(bufs[i]);
  return st;
}

lmoe_status lmoe_pool_unload(lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(p->layer->ctx);
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  uint64_t gen = p->slots[slot].generation;
  int32_t pins = p->slots[slot].pins;
  memset(&p->slots[slot], 0, sizeof p->slots[slot]);
  p->slots[slot].generation = gen + 1;
  p->slots[slot].pins = pins;
  lmoe_context *ctx = p->layer->ctx;
  return ctx->ops->slot_changed ? ctx->ops->slot_changed(ctx, p, slot) : LMOE_OK;
}

lmoe_status lmoe_pool_slot_info(const lmoe_pool *p, int32_t slot, lmoe_slot_info *out) {
  if (!valid_pool(p) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  const lmoe_slot *s = &p->slots[slot];
  memset(out, 0, sizeof *out);
  out->loaded = s->loaded;
  out->generation = s->generation;
  out->bytes = (int64_t)p->slot_bytes;
  if (!s->loaded) return LMOE_OK;
  out->targets = s->targets;
  out->fused = s->fused;
  out->rank_gate = s->g_hi - s->g_lo;
  out->rank_up = s->u_hi - s->u_lo;
  out->rank_down = s->r2;
  out->scale_gate = s->scale_gate;
  out->scale_up = s->scale_up;
  out->scale_down = s->scale_down;
  int32_t m = out->rank_gate > out->rank_up ? out->rank_gate : out->rank_up;
  out->max_rank = m > s->r2 ? m : s->r2;
  return LMOE_OK;
}

/* Largest rank of a loaded slot (for batch facts). */
int32_t lmoe_pool_slot_rank(const lmoe_pool *p, int32_t slot) {
  const lmoe_slot *s = &p->slots[slot];
  int32_t m = s->g_hi - s->g_lo;
  if (s->u_hi - s->u_lo > m) m = s->u_hi - s->u_lo;
  return s->r2 > m ? s->r2 : m;
}

/* ------------------------------------------------------------ life cycle by name */

void lmoe_pool_note_use(lmoe_pool *p, const int32_t *slots, int32_t n) {
  uint64_t now = ++p->clock;
  for (int32_t i = 0; i < n; i++)
    if (slots[i] >= 0 && slots[i] < p->cfg.num_slots) p->slots[slots[i]].last_used = now;
}

lmoe_status lmoe_pool_check_name(lmoe_context *ctx, const char *name) {
  if (!name || !*name) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter name is NULL or empty");
  if (strlen(name) >= LMOE_ADAPTER_NAME_MAX)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "adapter name is longer than %d bytes",
                     LMOE_ADAPTER_NAME_MAX - 1);
  return LMOE_OK;
}

static int32_t find_name(const lmoe_pool *p, const char *name) {
  for (int32_t i = 0; i < p->cfg.num_slots; i++)
    if (p->slots[i].loaded && !strcmp(p->slots[i].name, name)) return i;
  return -1;
}

lmoe_status lmoe_pool_find(const lmoe_pool *p, const char *name, int32_t *slot) {
  if (!valid_pool(p) || !name) return LMOE_ERR_INVALID_ARGUMENT;
  int32_t s = find_name(p, name);
  if (s < 0) return LMOE_ERR_NOT_FOUND;
  if (slot) *slot = s;
  return LMOE_OK;
}

const char *lmoe_pool_slot_name(const lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p) || slot < 0 || slot >= p->cfg.num_slots || !p->slots[slot].loaded) return "";
  return p->slots[slot].name;
}

/* Where a new adapter goes: a free unpinned slot (lowest index), else the least
   recently used loaded slot that is not pinned. -1 when every slot is pinned. */
static int32_t pick_slot(const lmoe_pool *p, bool *evict) {
  *evict = false;
  for (int32_t i = 0; i < p->cfg.num_slots; i++)
    if (!p->slots[i].loaded && p->slots[i].pins == 0) return i;
  int32_t best = -1;
  for (int32_t i = 0; i < p->cfg.num_slots; i++) {
    const lmoe_slot *s = &p->slots[i];
    if (s->pins > 0 || !s->loaded) continue;
    if (best < 0 || s->last_used < p->slots[best].last_used) best = i;
  }
  *evict = best >= 0;
  return best;
}

lmoe_status lmoe_pool_load_named(lmoe_pool *p, const char *name, const lmoe_adapter_desc *d,
                                 int32_t *slot) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = p->layer->ctx;
  lmoe_clear_error(ctx);
  lmoe_status st = lmoe_pool_check_name(ctx, name);
  if (st) return st;
  int32_t s = find_name(p, name);
  bool evict = false;
  if (s < 0) s = pick_slot(p, &evict);
  if (s < 0)
    return lmoe_fail(ctx, LMOE_ERR_FULL,
                     "can't load adapter '%s': all %d slots hold pinned adapters (unpin or unload one)",
                     name, (int)p->cfg.num_slots);
  /* lmoe_pool_load validates before it writes: on a refused adapter the slot, and
     whatever it held, is left as it was. */
  st = lmoe_pool_load(p, s, d);
  if (st) return st;
  if (evict) p->evictions++;
  memcpy(p->slots[s].name, name, strlen(name) + 1);
  if (slot) *slot = s;
  return LMOE_OK;
}

lmoe_status lmoe_pool_unload_named(lmoe_pool *p, const char *name) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = p->layer->ctx;
  lmoe_clear_error(ctx);
  lmoe_status st = lmoe_pool_check_name(ctx, name);
  if (st) return st;
  int32_t s = find_name(p, name);
  if (s < 0) return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "no slot holds adapter '%s'", name);
  return lmoe_pool_unload(p, s);
}

lmoe_status lmoe_pool_pin(lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(p->layer->ctx);
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  p->slots[slot].pins++;
  return LMOE_OK;
}

lmoe_status lmoe_pool_unpin(lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(p->layer->ctx);
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  if (p->slots[slot].pins == 0)
    return lmoe_fail(p->layer->ctx, LMOE_ERR_STATE, "slot %d is not pinned", (int)slot);
  p->slots[slot].pins--;
  return LMOE_OK;
}

int32_t lmoe_pool_pin_count(const lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p) || slot < 0 || slot >= p->cfg.num_slots) return 0;
  return p->slots[slot].pins;
}

lmoe_status lmoe_pool_touch(lmoe_pool *p, int32_t slot) {
  if (!valid_pool(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(p->layer->ctx);
  lmoe_status st = check_slot(p, slot);
  if (st) return st;
  p->slots[slot].last_used = ++p->clock;
  return LMOE_OK;
}

lmoe_status lmoe_pool_get_memory(const lmoe_pool *p, lmoe_pool_memory *out) {
  if (!valid_pool(p) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  memset(out, 0, sizeof *out);
  const lmoe_layer_config *c = &p->layer->local; /* the shard's */
  int64_t E = c->num_experts, H = c->hidden, I = c->intermediate;
  out->slot_bytes = (int64_t)p->slot_bytes;
  out->num_slots = p->cfg.num_slots;
  out->total_bytes = (int64_t)p->slot_bytes * p->cfg.num_slots;
  out->evictions = p->evictions;
  for (int32_t i = 0; i < p->cfg.num_slots; i++) {
    const lmoe_slot *s = &p->slots[i];
    if (!s->loaded) continue;
    out->loaded_slots++;
    out->loaded_bytes += (int64_t)p->slot_bytes;
    /* a13 + b13 rows of the gate/up rank, a2 + b2 of the down rank, bf16 */
    out->used_bytes += 2 * E * ((int64_t)s->r13 * (H + 2 * I) + (int64_t)s->r2 * (I + H));
  }
  return LMOE_OK;
}
