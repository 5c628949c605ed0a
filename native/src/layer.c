/* MoE layer: expert weights and the workspace they need. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

void lmoe_layer_config_init_sized(lmoe_layer_config *cfg, size_t size) {
  lmoe_layer_config def;
  memset(&def, 0, sizeof def);
  def.top_k = 2;
  def.renormalize = 1;
  def.max_tokens = 8192;
  def.shard_mode = LMOE_SHARD_TP;
  def.shard_rank = 0;
  def.shard_size = 1;
  def.comm = NULL;
  def.weight_dtype = LMOE_DTYPE_BF16;
  lmoe_struct_init(cfg, size, &def, sizeof def, LMOE_OLDEST_LAYER_CONFIG);
}

static void layer_destroy(lmoe_object *obj) {
  lmoe_layer *l = (lmoe_layer *)obj;
  lmoe_context *ctx = l->ctx;
  lmoe_buffer_release(l->w13);
  lmoe_buffer_release(l->w2);
  lmoe_buffer_release(l->w13s);
  lmoe_buffer_release(l->w2s);
  lmoe_comm_release(l->comm);
  free(l);
  lmoe_context_release(ctx);
}

/* The shard fields (docs/design.md, "Sharding"): each refusal names its field. */
static lmoe_status check_shard(lmoe_context *ctx, const lmoe_layer_config *c) {
  if (c->shard_mode != LMOE_SHARD_TP && c->shard_mode != LMOE_SHARD_EP)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shard_mode must be LMOE_SHARD_TP (0) or LMOE_SHARD_EP (1), got %d",
                     (int)c->shard_mode);
  if (c->shard_size < 1 || c->shard_size > 4096)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shard_size must be 1..4096, got %d", (int)c->shard_size);
  if (c->shard_rank < 0 || c->shard_rank >= c->shard_size)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shard_rank must be 0..%d (shard_size %d), got %d",
                     (int)c->shard_size - 1, (int)c->shard_size, (int)c->shard_rank);
  if (c->shard_mode == LMOE_SHARD_EP && c->shard_size > c->num_experts)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "shard_size %d is larger than num_experts %d: expert parallel gives every rank an expert",
                     (int)c->shard_size, (int)c->num_experts);
  if (c->shard_mode == LMOE_SHARD_TP && c->shard_size > c->intermediate)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "shard_size %d is larger than intermediate %d: tensor parallel gives every rank a column",
                     (int)c->shard_size, (int)c->intermediate);
  const lmoe_comm *cm = c->comm;
  if (!cm) {
    if (c->shard_size == 1) return LMOE_OK;
    if (ctx->ops->kind != LMOE_BACKEND_CPU && !lmoe_has_nccl())
      return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                       "shard_size is %d but comm is NULL, and this build has no NCCL (cmake option LMOE_NCCL): "
                       "a %s layer is sharded over ranks on one device only, through lmoe_comm_create_local "
                       "over their contexts",
                       (int)c->shard_size, ctx->ops->name);
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "shard_size is %d but comm is NULL: a sharded layer sums its ranks' outputs through a "
                     "communicator (lmoe_comm_create_local, lmoe_comm_wrap_nccl)",
                     (int)c->shard_size);
  }
  if (!lmoe_object_is(cm, LMOE_MAGIC_COMM))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "comm is not a loramoe communicator");
  if (cm->ctx != ctx)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "comm was made for another context than the layer's");
  if (cm->size != c->shard_size || cm->rank != c->shard_rank)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "shard_rank %d and shard_size %d disagree with comm, which is rank %d of %d",
                     (int)c->shard_rank, (int)c->shard_size, (int)cm->rank, (int)cm->size);
  if (ctx->ops->kind != LMOE_BACKEND_CPU && !cm->nccl && !(cm->group && ctx->ops->group_forward))
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "comm has neither NCCL nor a group of ranks on one device: the %s backend can't sum a "
                     "sharded layer's ranks through it",
                     ctx->ops->name);
  return LMOE_OK;
}

lmoe_status lmoe_layer_create(lmoe_context *ctx, const lmoe_layer_config *cfg_in, lmoe_layer **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!cfg_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer config is NULL");
  /* E, H and I have no default; top_k, renormalize and max_tokens do */
  lmoe_layer_config cfg;
  lmoe_layer_config_init(&cfg);
  lmoe_status st = lmoe_struct_in(ctx, &cfg, sizeof cfg, LMOE_OLDEST_LAYER_CONFIG, cfg_in,
                                  "layer config", "lmoe_layer_config_init");
  if (st) return st;
  if (cfg.num_experts < 1 || cfg.num_experts > 4096)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "num_experts must be 1..4096, got %d",
                     (int)cfg.num_experts);
  if (cfg.hidden < 1 || cfg.hidden > 65536 || cfg.intermediate < 1 || cfg.intermediate > 65536)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "hidden and intermediate must be 1..65536, got %d and %d", (int)cfg.hidden,
                     (int)cfg.intermediate);
  if (cfg.top_k < 1 || cfg.top_k > cfg.num_experts || cfg.top_k > 32)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "top_k must be 1..min(num_experts, 32), got %d",
                     (int)cfg.top_k);
  if (cfg.max_tokens < 1 || cfg.max_tokens > (1 << 24))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "max_tokens must be 1..16777216, got %d",
                     (int)cfg.max_tokens);
  cfg.renormalize = cfg.renormalize ? 1 : 0;
  if ((st = check_shard(ctx, &cfg))) return st;
  const bool fp8 = cfg.weight_dtype == LMOE_DTYPE_F8_E4M3;
  if (!fp8 && cfg.weight_dtype != LMOE_DTYPE_BF16)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "weight_dtype must be LMOE_DTYPE_BF16 (0) or LMOE_DTYPE_F8_E4M3 (5), got %d",
                     (int)cfg.weight_dtype);
  if (fp8 && ctx->ops->kind != LMOE_BACKEND_CPU && !ctx->ops->fp8_check)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "weight_dtype f8_e4m3: fp8 weights need FP8 expert GEMMs, which the %s backend lacks; "
                     "the cpu backend computes FP8 layers (the cuda backend on Hopper too)",
                     ctx->ops->name);
  if (fp8 && ctx->ops->fp8_check && (st = ctx->ops->fp8_check(ctx, &cfg))) return st;
  if (fp8 && cfg.shard_size > 1)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "weight_dtype f8_e4m3 with shard_size %d: FP8 layers are not sharded yet", (int)cfg.shard_size);

  lmoe_layer *l = calloc(1, sizeof *l);
  if (!l) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&l->obj, LMOE_MAGIC_LAYER, layer_destroy);
  l->cfg = cfg;
  l->local = cfg;
  if (cfg.shard_mode == LMOE_SHARD_EP)
    lmoe_shard_range(cfg.num_experts, cfg.shard_rank, cfg.shard_size, &l->e0, &l->local.num_experts);
  else
    lmoe_shard_range(cfg.intermediate, cfg.shard_rank, cfg.shard_size, &l->i0, &l->local.intermediate);
  const lmoe_layer_config *lc = &l->local;
  int64_t s13[3] = {lc->num_experts, 2 * (int64_t)lc->intermediate, lc->hidden};
  int64_t s2[3] = {lc->num_experts, lc->hidden, lc->intermediate};
  st = lmoe_buffer_create(ctx, cfg.weight_dtype, LMOE_MEMORY_DEVICE, 3, s13, &l->w13);
  if (!st) st = lmoe_buffer_create(ctx, cfg.weight_dtype, LMOE_MEMORY_DEVICE, 3, s2, &l->w2);
  if (!st && fp8) { /* scales start at 1: codes alone are the weights until set */
    const int64_t nbh = lmoe_fp8_blocks(lc->hidden), nbi = lmoe_fp8_blocks(lc->intermediate);
    int64_t c13[3] = {lc->num_experts, 2 * nbi, nbh}, c2[3] = {lc->num_experts, nbh, nbi};
    st = lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 3, c13, &l->w13s);
    if (!st) st = lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 3, c2, &l->w2s);
    if (!st) st = lmoe_buffer_fill(l->w13s, 1.0, NULL);
    if (!st) st = lmoe_buffer_fill(l->w2s, 1.0, NULL);
  }
  if (!st) st = lmoe_context_reserve(ctx, lc, NULL);
  if (st) {
    lmoe_buffer_release(l->w13);
    lmoe_buffer_release(l->w2);
    lmoe_buffer_release(l->w13s);
    lmoe_buffer_release(l->w2s);
    free(l);
    return st;
  }
  if (cfg.comm) lmoe_object_retain(&cfg.comm->obj);
  l->comm = cfg.comm;
  lmoe_context_retain(ctx);
  l->ctx = ctx;
  *out = l;
  return LMOE_OK;
}

void lmoe_layer_release(lmoe_layer *l) {
  if (lmoe_object_is(l, LMOE_MAGIC_LAYER)) lmoe_object_release(&l->obj);
}

lmoe_status lmoe_layer_get_config(const lmoe_layer *l, lmoe_layer_config *out) {
  if (!l || !out || l->obj.magic != LMOE_MAGIC_LAYER) return LMOE_ERR_INVALID_ARGUMENT;
  /* an older caller's struct (a valid older size) gets the fields it has; any other
     struct_size (never set) the whole struct, as before the ABI rule */
  uint32_t got;
  memcpy(&got, out, sizeof got);
  if (got >= LMOE_OLDEST_LAYER_CONFIG && got < sizeof *out && got % 4 == 0) {
    memcpy((char *)out + sizeof got, (const char *)&l->cfg + sizeof got, got - sizeof got);
    return LMOE_OK;
  }
  *out = l->cfg;
  return LMOE_OK;
}

static bool valid_layer(const lmoe_layer *l) { return l && l->obj.magic == LMOE_MAGIC_LAYER; }

static bool sharded(const lmoe_layer *l) { return l->cfg.shard_size > 1; }

/* Rows of the whole layer's weights into this rank's storage: `rows` runs of `len`
   elements, run i from src + (src0 + i * src_stride) elements of dtype to dst element
   dst0 + i * len. Through one bf16 host image per call, so a device backend gets one
   upload. */
static lmoe_status put_runs(lmoe_layer *l, lmoe_buffer *dst, int64_t dst0, const void *src, int32_t dtype,
                            int64_t src0, int64_t src_stride, int64_t rows, int64_t len) {
  if (rows <= 0 || len <= 0) return LMOE_OK;
  uint16_t *img = malloc((size_t)(rows * len) * sizeof *img);
  if (!img) return lmoe_fail(l->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  size_t es = lmoe_dtype_size(dtype);
  for (int64_t i = 0; i < rows; i++)
    lmoe_convert(img + i * len, LMOE_DTYPE_BF16, (const uint8_t *)src + (size_t)(src0 + i * src_stride) * es,
                 dtype, len);
  lmoe_status st = lmoe_buffer_write(dst, dst0, img, LMOE_DTYPE_BF16, rows * len);
  free(img);
  return st;
}

/* One expert of the whole layer (gate, up [I, H], down [H, I]) into local expert le:
   the rank's rows of gate and up, its columns of down. */
static lmoe_status put_expert(lmoe_layer *l, int32_t le, const void *gate, const void *up, const void *down,
                              int32_t dtype) {
  const int64_t H = l->cfg.hidden, I = l->cfg.intermediate, ni = l->local.intermediate, i0 = l->i0;
  lmoe_status st = LMOE_OK;
  if (gate) st = put_runs(l, l->w13, (int64_t)le * 2 * ni * H, gate, dtype, i0 * H, 0, 1, ni * H);
  if (!st && up) st = put_runs(l, l->w13, ((int64_t)le * 2 + 1) * ni * H, up, dtype, i0 * H, 0, 1, ni * H);
  if (!st && down) st = put_runs(l, l->w2, (int64_t)le * H * ni, down, dtype, i0, I, H, ni);
  return st;
}

lmoe_status lmoe_layer_set_weights(lmoe_layer *l, const void *w13, const void *w2, int32_t dtype) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  if (!lmoe_valid_dtype(dtype) || dtype == LMOE_DTYPE_I32 || (dtype == LMOE_DTYPE_F8_E4M3 && !l->w13s))
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "weights dtype must be bf16, f16, f32 or f64 (f8_e4m3 codes: FP8 layers only)");
  if (l->w13s) return lmoe_fp8_set_weights(l, w13, w2, dtype);
  lmoe_status st = LMOE_OK;
  if (!sharded(l)) {
    if (w13) st = lmoe_buffer_write(l->w13, 0, w13, dtype, l->w13->numel);
    if (!st && w2) st = lmoe_buffer_write(l->w2, 0, w2, dtype, l->w2->numel);
    return st;
  }
  /* the whole layer's arrays; this rank takes its experts and slices */
  const int64_t H = l->cfg.hidden, I = l->cfg.intermediate, ih = I * H;
  size_t es = lmoe_dtype_size(dtype);
  for (int32_t le = 0; le < l->local.num_experts && !st; le++) {
    int64_t e = l->e0 + le;
    const uint8_t *g = w13 ? (const uint8_t *)w13 + (size_t)(e * 2 * ih) * es : NULL;
    const uint8_t *u = w13 ? g + (size_t)ih * es : NULL;
    const uint8_t *d = w2 ? (const uint8_t *)w2 + (size_t)(e * ih) * es : NULL;
    st = put_expert(l, le, g, u, d, dtype);
  }
  return st;
}

lmoe_status lmoe_layer_set_expert(lmoe_layer *l, int32_t e, const void *gate, const void *up,
                                  const void *down, int32_t dtype) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  const lmoe_layer_config *c = &l->cfg;
  if (e < 0 || e >= c->num_experts)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "expert %d is out of range 0..%d", (int)e,
                     (int)c->num_experts - 1);
  if (!lmoe_valid_dtype(dtype) || dtype == LMOE_DTYPE_I32 || (dtype == LMOE_DTYPE_F8_E4M3 && !l->w13s))
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "weights dtype must be bf16, f16, f32 or f64 (f8_e4m3 codes: FP8 layers only)");
  if (l->w13s) return lmoe_fp8_set_expert(l, e, gate, up, down, dtype);
  if (sharded(l)) {
    if (e < l->e0 || e >= l->e0 + l->local.num_experts) return LMOE_OK; /* another rank's expert */
    return put_expert(l, e - l->e0, gate, up, down, dtype);
  }
  int64_t ih = (int64_t)c->intermediate * c->hidden;
  lmoe_status st = LMOE_OK;
  if (gate) st = lmoe_buffer_write(l->w13, (int64_t)e * 2 * ih, gate, dtype, ih);
  if (!st && up) st = lmoe_buffer_write(l->w13, (int64_t)e * 2 * ih + ih, up, dtype, ih);
  if (!st && down) st = lmoe_buffer_write(l->w2, (int64_t)e * ih, down, dtype, ih);
  return st;
}

/* A sharded layer's randomize: the values the whole layer's fill would give its
   elements (backend_cpu.c's fill_chunk: lo + span * u, two roundings), made on the host
   for this rank's elements only. */
static lmoe_status randomize_shard(lmoe_layer *l, lmoe_buffer *b, bool w13, uint64_t seed, float scale) {
  const int64_t H = l->cfg.hidden, I = l->cfg.intermediate, ni = l->local.intermediate;
  const float lo = -scale, span = scale - lo;
  uint16_t *img = malloc((size_t)(b->numel ? b->numel : 1) * sizeof *img);
  if (!img) return lmoe_fail(l->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  int64_t k = 0;
  for (int64_t le = 0; le < l->local.num_experts; le++) {
    int64_t e = l->e0 + le;
    if (w13) {
      for (int64_t half = 0; half < 2; half++)
        for (int64_t o = 0; o < ni; o++)
          for (int64_t h = 0; h < H; h++) {
            uint64_t g = (uint64_t)(((e * 2 + half) * I + l->i0 + o) * H + h);
            float prod = span * lmoe_uniform(seed, g);
            img[k++] = lmoe_f32_to_bf16(lo + prod);
          }
    } else {
      for (int64_t h = 0; h < H; h++)
        for (int64_t o = 0; o < ni; o++) {
          uint64_t g = (uint64_t)((e * H + h) * I + l->i0 + o);
          float prod = span * lmoe_uniform(seed, g);
          img[k++] = lmoe_f32_to_bf16(lo + prod);
        }
    }
  }
  lmoe_status st = lmoe_buffer_write(b, 0, img, LMOE_DTYPE_BF16, b->numel);
  free(img);
  return st;
}

lmoe_status lmoe_layer_randomize(lmoe_layer *l, uint64_t seed, float scale) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  if (!(scale >= 0))
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "scale must be >= 0");
  if (l->w13s) return lmoe_fp8_randomize(l, seed, scale);
  if (sharded(l)) {
    lmoe_status st = randomize_shard(l, l->w13, true, lmoe_mix64(seed * 2 + 1), scale);
    if (!st) st = randomize_shard(l, l->w2, false, lmoe_mix64(seed * 2 + 2), scale);
    return st;
  }
  lmoe_status st = lmoe_buffer_fill_random(l->w13, lmoe_mix64(seed * 2 + 1), -scale, scale, NULL);
  if (!st) st = lmoe_buffer_fill_random(l->w2, lmoe_mix64(seed * 2 + 2), -scale, scale, NULL);
  return st;
}

lmoe_status lmoe_layer_weights(lmoe_layer *l, int32_t which, lmoe_buffer **out) {
  if (!valid_layer(l) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  if (which == 2 || which == 3) {
    if (!l->w13s)
      return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "which %d: block scales belong to FP8 layers; this layer's weight_dtype is bf16", (int)which);
    *out = which == 2 ? l->w13s : l->w2s;
    return LMOE_OK;
  }
  if (which != 0 && which != 1)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "which must be 0 (W13), 1 (W2), or for an FP8 layer 2 (W13's scales), 3 (W2's)");
  *out = which == 0 ? l->w13 : l->w2;
  return LMOE_OK;
}
