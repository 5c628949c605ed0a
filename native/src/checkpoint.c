/* Base MoE weights from a safetensors checkpoint: one file, or shards listed by a
   model.safetensors.index.json. Qwen2/3-MoE and Mixtral naming; per-expert tensors
   or the fused experts.gate_up_proj / experts.down_proj of newer transformers. */
#include "files.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct lmoe_checkpoint {
  lmoe_object obj;
  lmoe_context *ctx;
  char *path;
  int32_t n_files;
  lmoe_safetensors **files;
};

static bool valid_ck(const lmoe_checkpoint *ck) { return lmoe_object_is(ck, LMOE_MAGIC_CHECKPOINT); }

void lmoe_checkpoint_layer_info_init(lmoe_checkpoint_layer_info *info) {
  if (!info) return;
  memset(info, 0, sizeof *info);
  info->struct_size = sizeof *info;
}

static void ck_free(lmoe_checkpoint *ck) {
  for (int32_t i = 0; i < ck->n_files; i++) lmoe_safetensors_close(ck->files[i]);
  free(ck->files);
  free(ck->path);
  if (ck->ctx) lmoe_context_release(ck->ctx);
  ck->obj.magic = 0;
  free(ck);
}

static void ck_destroy(lmoe_object *obj) { ck_free((lmoe_checkpoint *)obj); }

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && !strcmp(s + n - m, suffix);
}

static bool is_file(const char *p) {
  struct stat sb;
  return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static char *path_join(const char *dir, size_t dirlen, const char *file) {
  size_t n = dirlen + strlen(file) + 2;
  char *o = malloc(n);
  if (o) snprintf(o, n, "%.*s%s%s", (int)dirlen, dir, dirlen && dir[dirlen - 1] != '/' ? "/" : "", file);
  return o;
}

static lmoe_status add_file(lmoe_checkpoint *ck, const char *path) {
  lmoe_safetensors **f = realloc(ck->files, ((size_t)ck->n_files + 1) * sizeof *f);
  if (!f) return lmoe_fail(ck->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  ck->files = f;
  lmoe_status s = lmoe_safetensors_open(ck->ctx, path, &ck->files[ck->n_files]);
  if (!s) ck->n_files++;
  return s;
}

static lmoe_status open_index(lmoe_checkpoint *ck, const char *index) {
  lmoe_context *ctx = ck->ctx;
  char *text = NULL;
  size_t len = 0;
  lmoe_status s = lmoe_read_text_file(ctx, index, 256u << 20, &text, &len);
  if (s) return s;
  cJSON *root = cJSON_ParseWithLength(text, len);
  free(text);
  if (!root) return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: not valid JSON", index);
  const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
  const char *slash = strrchr(index, '/');
  size_t dirlen = slash ? (size_t)(slash - index + 1) : 0;
  if (!cJSON_IsObject(wm)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: weight_map is missing or not an object", index);
    goto done;
  }
  /* Open each shard once; then every tensor the map names must be in its shard. */
  for (const cJSON *e = wm->child; e && !s; e = e->next) {
    if (!cJSON_IsString(e)) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: weight_map['%s'] is not a file name", index, e->string);
      break;
    }
    const char *f = e->valuestring;
    if (!*f || strchr(f, '/') || !strcmp(f, "..") || !ends_with(f, ".safetensors")) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                    "%s: weight_map['%s'] = '%s' is not a .safetensors file next to the index", index,
                    e->string, f);
      break;
    }
    bool seen = false;
    for (const cJSON *g = wm->child; g != e && !seen; g = g->next) seen = !strcmp(g->valuestring, f);
    if (seen) continue;
    char *p = path_join(index, dirlen, f);
    s = p ? add_file(ck, p) : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    free(p);
  }
  for (const cJSON *e = wm->child; e && !s; e = e->next) {
    const char *f = e->valuestring;
    for (int32_t i = 0; i < ck->n_files; i++) {
      const char *shard = lmoe_st_display_name(ck->files[i]);
      size_t sl = strlen(shard), fl = strlen(f);
      if (!ends_with(shard, f) || (sl > fl && shard[sl - fl - 1] != '/')) continue;
      if (lmoe_safetensors_find(ck->files[i], e->string, NULL) != LMOE_OK)
        s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is mapped to %s, which doesn't hold it", index,
                      e->string, f);
      break;
    }
  }
done:
  cJSON_Delete(root);
  return s;
}

lmoe_status lmoe_checkpoint_open(lmoe_context *ctx, const char *path, lmoe_checkpoint **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!path) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "path is NULL");
  lmoe_checkpoint *ck = calloc(1, sizeof *ck);
  if (!ck) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&ck->obj, LMOE_MAGIC_CHECKPOINT, ck_destroy);
  lmoe_context_retain(ctx);
  ck->ctx = ctx;
  ck->path = strdup(path);
  lmoe_status s = ck->path ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  struct stat sb;
  if (!s && stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
    char *idx = path_join(path, strlen(path), "model.safetensors.index.json");
    char *one = path_join(path, strlen(path), "model.safetensors");
    if (!idx || !one) s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    else if (is_file(idx)) s = open_index(ck, idx);
    else if (is_file(one)) s = add_file(ck, one);
    else
      s = lmoe_fail(ctx, LMOE_ERR_NOT_FOUND,
                    "%s: neither model.safetensors.index.json nor model.safetensors is there", path);
    free(idx);
    free(one);
  } else if (!s && ends_with(path, ".json")) {
    s = open_index(ck, path);
  } else if (!s) {
    s = add_file(ck, path);
  }
  if (s) {
    ck_free(ck);
    return s;
  }
  *out = ck;
  return LMOE_OK;
}

void lmoe_checkpoint_close(lmoe_checkpoint *ck) {
  if (valid_ck(ck)) lmoe_object_release(&ck->obj);
}

/* The file holding tensor `name`, or NULL. */
static lmoe_safetensors *find(lmoe_checkpoint *ck, const char *name, lmoe_tensor_info *ti) {
  for (int32_t i = 0; i < ck->n_files; i++) {
    int32_t idx;
    if (lmoe_safetensors_find(ck->files[i], name, &idx) == LMOE_OK) {
      if (ti) lmoe_safetensors_tensor(ck->files[i], idx, ti);
      return ck->files[i];
    }
  }
  return NULL;
}

typedef struct layer_names {
  int32_t family;
  bool fused;
  char block[96]; /* model.layers.L.mlp or model.layers.L.block_sparse_moe */
  const char *g, *u, *d;
} layer_names;

static lmoe_status detect(lmoe_checkpoint *ck, int32_t layer, layer_names *ln,
                          lmoe_checkpoint_layer_info *info) {
  lmoe_context *ctx = ck->ctx;
  char name[256];
  lmoe_tensor_info ti;
  static const struct {
    int32_t family;
    const char *block, *g, *u, *d;
  } kinds[] = {{LMOE_FAMILY_QWEN, "mlp", "gate_proj", "up_proj", "down_proj"},
               {LMOE_FAMILY_MIXTRAL, "block_sparse_moe", "w1", "w3", "w2"}};
  memset(ln, 0, sizeof *ln);
  if (layer < 0) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer %d is negative", (int)layer);
  for (size_t k = 0; k < 2 && !ln->family; k++) {
    snprintf(ln->block, sizeof ln->block, "model.layers.%d.%s", (int)layer, kinds[k].block);
    snprintf(name, sizeof name, "%s.experts.0.%s.weight", ln->block, kinds[k].g);
    if (find(ck, name, &ti)) {
      ln->family = kinds[k].family;
      ln->g = kinds[k].g, ln->u = kinds[k].u, ln->d = kinds[k].d;
      break;
    }
    snprintf(name, sizeof name, "%s.experts.gate_up_proj", ln->block);
    if (find(ck, name, &ti)) {
      ln->family = kinds[k].family;
      ln->fused = true;
    }
  }
  if (!ln->family)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND,
                     "%s: no MoE experts for layer %d (looked for model.layers.%d.mlp.experts.* and "
                     "model.layers.%d.block_sparse_moe.experts.*)",
                     ck->path, (int)layer, (int)layer, (int)layer);
  int64_t E, H, I;
  if (ln->fused) {
    if (ti.ndim != 3 || ti.shape[1] % 2)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [E, 2I, H]", ck->path, ti.name);
    E = ti.shape[0], I = ti.shape[1] / 2, H = ti.shape[2];
  } else {
    if (ti.ndim != 2)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [I, H]", ck->path, ti.name);
    I = ti.shape[0], H = ti.shape[1];
    E = 0;
    for (;; E++) {
      snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln->block, (long long)E, ln->g);
      if (!find(ck, name, NULL)) break;
    }
  }
  if (E < 1 || E > 4096 || H < 1 || H > 65536 || I < 1 || I > 65536)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: layer %d has E %lld, H %lld, I %lld: out of range",
                     ck->path, (int)layer, (long long)E, (long long)H, (long long)I);
  lmoe_checkpoint_layer_info_init(info);
  info->family = ln->family;
  info->num_experts = (int32_t)E;
  info->hidden = (int32_t)H;
  info->intermediate = (int32_t)I;
  snprintf(name, sizeof name, "%s.gate.weight", ln->block);
  info->has_router = find(ck, name, NULL) != NULL;
  return LMOE_OK;
}

lmoe_status lmoe_checkpoint_get_layer_info(lmoe_checkpoint *ck, int32_t layer, lmoe_checkpoint_layer_info *out) {
  if (!valid_ck(ck)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ck->ctx);
  if (!out) return lmoe_fail(ck->ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  layer_names ln;
  lmoe_checkpoint_layer_info info;
  lmoe_status s = detect(ck, layer, &ln, &info);
  if (s) return s;
  /* an older caller's struct gets the fields it has */
  return lmoe_struct_out(ck->ctx, out, &info, sizeof info, "layer info", "lmoe_checkpoint_layer_info_init");
}

static lmoe_status read_named(lmoe_checkpoint *ck, const char *name, int32_t ndim, const int64_t *shape,
                              float *dst) {
  lmoe_safetensors *f = find(ck, name, NULL);
  if (!f) return lmoe_fail(ck->ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", ck->path, name);
  return lmoe_st_read_f32(f, name, ndim, shape, dst);
}

lmoe_status lmoe_checkpoint_load_layer(lmoe_checkpoint *ck, int32_t layer, lmoe_layer *dst,
                                       lmoe_buffer **router) {
  if (!valid_ck(ck)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = ck->ctx;
  lmoe_clear_error(ctx);
  if (router) *router = NULL;
  if (!dst || dst->obj.magic != LMOE_MAGIC_LAYER)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer is NULL or not a loramoe layer");
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  layer_names ln;
  lmoe_status s = detect(ck, layer, &ln, &info);
  if (s) return s;
  const lmoe_layer_config *c = &dst->cfg;
  if (c->num_experts != info.num_experts || c->hidden != info.hidden || c->intermediate != info.intermediate)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "%s: layer %d has E %d, H %d, I %d; the destination layer was made with E %d, H %d, I %d",
                     ck->path, (int)layer, (int)info.num_experts, (int)info.hidden, (int)info.intermediate,
                     (int)c->num_experts, (int)c->hidden, (int)c->intermediate);
  if (router && !info.has_router)
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: layer %d has no router weight %s.gate.weight", ck->path,
                     (int)layer, ln.block);
  int64_t E = info.num_experts, H = info.hidden, I = info.intermediate;
  char name[256];
  lmoe_buffer *rb = NULL;
  if (router) {
    /* Read the router first: a bad shape fails before any expert is overwritten. */
    int64_t shape[2] = {E, H};
    s = lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 2, shape, &rb);
    snprintf(name, sizeof name, "%s.gate.weight", ln.block);
    if (!s) s = read_named(ck, name, 2, shape, rb->data);
    if (s) {
      lmoe_buffer_release(rb);
      return s;
    }
  }
  if (ln.fused) {
    float *w13 = malloc((size_t)(E * 2 * I * H) * sizeof(float));
    float *w2 = malloc((size_t)(E * H * I) * sizeof(float));
    int64_t s13[3] = {E, 2 * I, H}, s2[3] = {E, H, I};
    s = w13 && w2 ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    snprintf(name, sizeof name, "%s.experts.gate_up_proj", ln.block);
    if (!s) s = read_named(ck, name, 3, s13, w13);
    snprintf(name, sizeof name, "%s.experts.down_proj", ln.block);
    if (!s) s = read_named(ck, name, 3, s2, w2);
    if (!s) s = lmoe_layer_set_weights(dst, w13, w2, LMOE_DTYPE_F32);
    free(w13);
    free(w2);
  } else {
    /* Every expert's tensors are there with their shapes before any is written, so a
       broken checkpoint leaves the layer as it was. */
    for (int64_t e = 0; e < E && !s; e++)
      for (int p = 0; p < 3 && !s; p++) {
        const char *pn = p == 0 ? ln.g : p == 1 ? ln.u : ln.d;
        snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln.block, (long long)e, pn);
        lmoe_tensor_info ti;
        if (!find(ck, name, &ti))
          s = lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: tensor '%s' is missing", ck->path, name);
        else if (ti.ndim != 2 || ti.shape[0] != (p == 2 ? H : I) || ti.shape[1] != (p == 2 ? I : H))
          s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' is not [%lld, %lld]", ck->path, name,
                        (long long)(p == 2 ? H : I), (long long)(p == 2 ? I : H));
        else if (ti.dtype < 0)
          s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s': %s is not supported", ck->path, name,
                        ti.dtype_name);
      }
    if (s) {
      lmoe_buffer_release(rb);
      return s;
    }
    float *g = malloc((size_t)(I * H) * sizeof(float)), *u = malloc((size_t)(I * H) * sizeof(float));
    float *d = malloc((size_t)(H * I) * sizeof(float));
    int64_t sg[2] = {I, H}, sd[2] = {H, I};
    s = g && u && d ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t e = 0; e < E && !s; e++) {
      snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln.block, (long long)e, ln.g);
      s = read_named(ck, name, 2, sg, g);
      snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln.block, (long long)e, ln.u);
      if (!s) s = read_named(ck, name, 2, sg, u);
      snprintf(name, sizeof name, "%s.experts.%lld.%s.weight", ln.block, (long long)e, ln.d);
      if (!s) s = read_named(ck, name, 2, sd, d);
      if (!s) s = lmoe_layer_set_expert(dst, (int32_t)e, g, u, d, LMOE_DTYPE_F32);
    }
    free(g);
    free(u);
    free(d);
  }
  if (s) {
    lmoe_buffer_release(rb);
    return s;
  }
  if (router) *router = rb;
  return LMOE_OK;
}
