/* Synthetic PEFT adapters: adapter_config.json + adapter_model.safetensors written with
   the library's own safetensors writer, for tests, experiments and benchmarks. */
#include "files.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void lmoe_peft_synthetic_init_sized(lmoe_peft_synthetic *s, size_t size) {
  lmoe_peft_synthetic def;
  memset(&def, 0, sizeof def);
  def.family = LMOE_FAMILY_QWEN;
  def.layout = LMOE_PEFT_PER_EXPERT;
  def.num_layers = 1;
  def.num_experts = 4;
  def.hidden = 64;
  def.intermediate = 32;
  def.targets = LMOE_TARGET_ALL;
  def.rank = 8;
  def.alpha = 16.0f;
  def.dtype = LMOE_DTYPE_BF16;
  def.seed = 1;
  def.scale = 0.1f;
  lmoe_struct_init(s, size, &def, sizeof def, sizeof(uint32_t));
}

typedef struct tensor_list {
  lmoe_tensor_entry *e;
  char **names;
  void **data;
  int32_t n, cap;
} tensor_list;

static bool tl_add(tensor_list *l, const char *name, int32_t dtype, int64_t d0, int64_t d1, uint64_t seed,
                   float scale) {
  if (l->n == l->cap) {
    int32_t cap = l->cap ? 2 * l->cap : 64;
    lmoe_tensor_entry *e = realloc(l->e, (size_t)cap * sizeof *e);
    if (e) l->e = e;
    char **nm = realloc(l->names, (size_t)cap * sizeof *nm);
    if (nm) l->names = nm;
    void **dt = realloc(l->data, (size_t)cap * sizeof *dt);
    if (dt) l->data = dt;
    if (!e || !nm || !dt) return false;
    l->cap = cap;
  }
  int64_t n = d0 * d1;
  float *f = malloc((size_t)(n ? n : 1) * sizeof(float));
  void *d = malloc((size_t)(n ? n : 1) * lmoe_dtype_size(dtype));
  char *nm = strdup(name);
  if (!f || !d || !nm) {
    free(f);
    free(d);
    free(nm);
    return false;
  }
  for (int64_t i = 0; i < n; i++) f[i] = (2.0f * lmoe_uniform(seed, (uint64_t)i) - 1.0f) * scale;
  lmoe_convert(d, dtype, f, LMOE_DTYPE_F32, n);
  free(f);
  lmoe_tensor_entry *e = &l->e[l->n];
  memset(e, 0, sizeof *e);
  e->name = nm;
  e->dtype = dtype;
  e->ndim = 2;
  e->shape[0] = d0;
  e->shape[1] = d1;
  e->data = d;
  l->names[l->n] = nm;
  l->data[l->n] = d;
  l->n++;
  return true;
}

static void tl_free(tensor_list *l) {
  for (int32_t i = 0; i < l->n; i++) {
    free(l->names[i]);
    free(l->data[i]);
  }
  free(l->e);
  free(l->names);
  free(l->data);
}

lmoe_status lmoe_peft_write_synthetic(lmoe_context *ctx, const char *dir, const lmoe_peft_synthetic *sp_in) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!dir || !sp_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "dir or spec is NULL");
  lmoe_peft_synthetic sp_v; /* every field has a default */
  lmoe_peft_synthetic_init(&sp_v);
  lmoe_status s = lmoe_struct_in(ctx, &sp_v, sizeof sp_v, sizeof(uint32_t), sp_in, "synthetic spec",
                                 "lmoe_peft_synthetic_init");
  if (s) return s;
  const lmoe_peft_synthetic *sp = &sp_v;
  if (sp->family != LMOE_FAMILY_QWEN && sp->family != LMOE_FAMILY_MIXTRAL)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "family must be qwen (1) or mixtral (2)");
  if (sp->layout != LMOE_PEFT_PER_EXPERT && sp->layout != LMOE_PEFT_FUSED)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layout must be per-expert (0) or fused (1)");
  if (sp->num_layers < 1 || sp->num_layers > 1024 || sp->num_experts < 1 || sp->num_experts > 4096 ||
      sp->hidden < 1 || sp->hidden > 65536 || sp->intermediate < 1 || sp->intermediate > 65536 ||
      sp->rank < 1 || sp->rank > 1024 || !isfinite(sp->alpha) || !(sp->scale >= 0))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "synthetic adapter shapes, rank or scale out of range");
  if (sp->targets <= 0 || sp->targets > LMOE_TARGET_ALL)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "targets must be a non-empty mask of gate, up, down");
  if (sp->layout == LMOE_PEFT_FUSED && (sp->targets & 3) && (sp->targets & 3) != 3)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "a fused adapter targets gate and up together");
  if (sp->dtype != LMOE_DTYPE_BF16 && sp->dtype != LMOE_DTYPE_F16 && sp->dtype != LMOE_DTYPE_F32)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "dtype must be bf16, f16 or f32");
  if (sp->rank_pattern_key && (sp->rank_pattern_value < 1 || sp->rank_pattern_value > 1024))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "rank_pattern_value must be 1..1024");
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return lmoe_fail(ctx, LMOE_ERR_IO, "%s: cannot create the directory: %s", dir, strerror(errno));
  regex_t rre;
  bool have_rre = false;
  if (sp->rank_pattern_key) {
    if (!lmoe_pattern_compile(&rre, sp->rank_pattern_key, true))
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "rank_pattern_key '%s' is not a usable regex",
                       sp->rank_pattern_key);
    have_rre = true;
  }
  int64_t E = sp->num_experts, H = sp->hidden, I = sp->intermediate;
  bool qwen = sp->family == LMOE_FAMILY_QWEN, fused = sp->layout == LMOE_PEFT_FUSED;
  static const char *qn[3] = {"gate_proj", "up_proj", "down_proj"}, *mn[3] = {"w1", "w3", "w2"};
  tensor_list tl = {0};
  s = LMOE_OK;
  uint64_t seed = lmoe_mix64(sp->seed);
  char name[512], module[400];
  for (int32_t L = 0; L < sp->num_layers && !s; L++) {
    if (fused) {
      /* target_parameters = [gate_up_proj, down_proj] (those targeted): the first is
         nested deepest, under base_layer. */
      int32_t parts[2], np = 0;
      if (sp->targets & 3) parts[np++] = LMOE_PART_GATE_UP;
      if (sp->targets & LMOE_TARGET_DOWN) parts[np++] = LMOE_PART_DOWN;
      snprintf(module, sizeof module, "model.layers.%d.mlp.experts", (int)L);
      for (int32_t i = 0; i < np && !s; i++) {
        int32_t r = sp->rank;
        char full[480];
        snprintf(full, sizeof full, "%s.%s", module, parts[i] == LMOE_PART_GATE_UP ? "gate_up_proj" : "down_proj");
        if (have_rre && (regexec(&rre, full, 0, NULL, 0) == 0 || regexec(&rre, module, 0, NULL, 0) == 0))
          r = sp->rank_pattern_value;
        int64_t in = parts[i] == LMOE_PART_GATE_UP ? H : I, out = parts[i] == LMOE_PART_GATE_UP ? 2 * I : H;
        char nest[64] = "";
        for (int32_t d = 0; d < np - 1 - i; d++) strcat(nest, ".base_layer");
        snprintf(name, sizeof name, "base_model.model.%s%s.lora_A.weight", module, nest);
        if (!tl_add(&tl, name, sp->dtype, E * r, in, seed = lmoe_mix64(seed + 1), sp->scale)) s = LMOE_ERR_OUT_OF_MEMORY;
        snprintf(name, sizeof name, "base_model.model.%s%s.lora_B.weight", module, nest);
        if (!s && !tl_add(&tl, name, sp->dtype, out, E * r, seed = lmoe_mix64(seed + 1), sp->scale))
          s = LMOE_ERR_OUT_OF_MEMORY;
      }
      continue;
    }
    for (int64_t e = 0; e < E && !s; e++)
      for (int32_t part = 0; part < 3 && !s; part++) {
        if (!(sp->targets & (1 << part))) continue;
        snprintf(module, sizeof module, "model.layers.%d.%s.experts.%lld.%s", (int)L,
                 qwen ? "mlp" : "block_sparse_moe", (long long)e, qwen ? qn[part] : mn[part]);
        int32_t r = have_rre && regexec(&rre, module, 0, NULL, 0) == 0 ? sp->rank_pattern_value : sp->rank;
        int64_t in = part == LMOE_PART_DOWN ? I : H, out = part == LMOE_PART_DOWN ? H : I;
        snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", module);
        if (!tl_add(&tl, name, sp->dtype, r, in, seed = lmoe_mix64(seed + 1), sp->scale)) s = LMOE_ERR_OUT_OF_MEMORY;
        snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", module);
        if (!s && !tl_add(&tl, name, sp->dtype, out, r, seed = lmoe_mix64(seed + 1), sp->scale))
          s = LMOE_ERR_OUT_OF_MEMORY;
      }
  }
  if (have_rre) regfree(&rre);
  if (s) {
    tl_free(&tl);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  /* adapter_config.json, with the fields PEFT writes that matter here. */
  cJSON *c = cJSON_CreateObject();
  cJSON_AddStringToObject(c, "peft_type", "LORA");
  cJSON_AddStringToObject(c, "base_model_name_or_path", "synthetic");
  cJSON_AddStringToObject(c, "task_type", "CAUSAL_LM");
  cJSON_AddNumberToObject(c, "r", sp->rank);
  cJSON_AddNumberToObject(c, "lora_alpha", sp->alpha);
  cJSON_AddNumberToObject(c, "lora_dropout", 0.0);
  cJSON_AddBoolToObject(c, "use_rslora", sp->use_rslora != 0);
  cJSON_AddBoolToObject(c, "use_dora", 0);
  cJSON_AddStringToObject(c, "bias", "none");
  cJSON_AddNullToObject(c, "layers_to_transform");
  if (fused) {
    cJSON_AddNullToObject(c, "target_modules");
    cJSON *tp = cJSON_AddArrayToObject(c, "target_parameters");
    if (sp->targets & 3) cJSON_AddItemToArray(tp, cJSON_CreateString("mlp.experts.gate_up_proj"));
    if (sp->targets & LMOE_TARGET_DOWN) cJSON_AddItemToArray(tp, cJSON_CreateString("mlp.experts.down_proj"));
  } else {
    cJSON *tm = cJSON_AddArrayToObject(c, "target_modules");
    for (int32_t part = 0; part < 3; part++)
      if (sp->targets & (1 << part)) cJSON_AddItemToArray(tm, cJSON_CreateString(qwen ? qn[part] : mn[part]));
    cJSON_AddNullToObject(c, "target_parameters");
  }
  cJSON *rp = cJSON_AddObjectToObject(c, "rank_pattern");
  if (sp->rank_pattern_key) cJSON_AddNumberToObject(rp, sp->rank_pattern_key, sp->rank_pattern_value);
  cJSON *ap = cJSON_AddObjectToObject(c, "alpha_pattern");
  if (sp->alpha_pattern_key) cJSON_AddNumberToObject(ap, sp->alpha_pattern_key, sp->alpha_pattern_value);
  char *json = cJSON_Print(c);
  cJSON_Delete(c);
  char *cfg = lmoe_path_join(dir, "adapter_config.json"), *model = lmoe_path_join(dir, "adapter_model.safetensors");
  if (!json || !cfg || !model) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  } else {
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    s = lmoe_safetensors_write(ctx, model, tl.n, tl.e, 1, mk, mv);
    if (!s) {
      FILE *f = fopen(cfg, "wb");
      bool ok = f && fputs(json, f) >= 0 && fputc('\n', f) != EOF;
      if (f && fclose(f) != 0) ok = false;
      if (!ok) s = lmoe_fail(ctx, LMOE_ERR_IO, "%s: write failed: %s", cfg, strerror(errno));
    }
  }
  cJSON_free(json);
  free(cfg);
  free(model);
  tl_free(&tl);
  return s;
}
