/* PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors, mapped onto
   the experts of one MoE layer (docs/formats.md). What can't be represented exactly
   is refused with a message that says what and where. */
#include "files.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *part_names[LMOE_PART_COUNT] = {"gate", "up", "down", "gate_up"};

/* One tensor of the file, classified by its name. */
typedef struct peft_tensor {
  int32_t st_index;
  int32_t layer;  /* -1: not under model.layers.N */
  int32_t part;   /* LMOE_PART_*, -1: not an expert LoRA tensor */
  int32_t expert; /* per-expert index, -1 for fused */
  int32_t is_b;
  int32_t family;
  char *module;   /* module name in the base model, e.g. model.layers.0.mlp.experts.3.gate_proj */
  char *param;    /* fused: the parameter name (gate_up_proj, down_proj) */
  int32_t depth;  /* fused: how many .base_layer levels deep */
} peft_tensor;

typedef struct pattern {
  char *key;
  double value;
  regex_t re;
  bool compiled;
} pattern;

struct lmoe_peft {
  lmoe_object obj;
  lmoe_context *ctx;
  char *dir;
  lmoe_safetensors *st;
  /* config */
  int32_t r;
  double alpha;
  int32_t use_rslora;
  char *target_modules; /* printable: list joined by ", " or the regex */
  char **tparams;       /* target_parameters */
  int32_t n_tparams;
  char *layers_to_transform; /* printable, NULL when absent */
  pattern *rank_pat, *alpha_pat;
  int32_t n_rank_pat, n_alpha_pat;
  /* tensors */
  peft_tensor *t;
  int32_t n;
  int32_t family, layout, targets, num_experts, max_rank;
  int32_t *layers;
  int32_t n_layers;
  int64_t bytes;
  /* layer_desc output */
  float *buf[2 * LMOE_PART_COUNT];
};

static bool valid_peft(const lmoe_peft *p) { return lmoe_object_is(p, LMOE_MAGIC_PEFT); }

void lmoe_peft_info_init_sized(lmoe_peft_info *info, size_t size) {
  lmoe_peft_info def;
  memset(&def, 0, sizeof def);
  lmoe_struct_init(info, size, &def, sizeof def, sizeof(uint32_t));
}

static void free_patterns(pattern *p, int32_t n) {
  for (int32_t i = 0; i < n; i++) {
    if (p[i].compiled) regfree(&p[i].re);
    free(p[i].key);
  }
  free(p);
}

static void peft_free(lmoe_peft *p) {
  if (!p) return;
  lmoe_safetensors_close(p->st);
  for (int32_t i = 0; i < p->n; i++) {
    free(p->t[i].module);
    free(p->t[i].param);
  }
  free(p->t);
  for (int32_t i = 0; i < p->n_tparams; i++) free(p->tparams[i]);
  free(p->tparams);
  free(p->target_modules);
  free(p->layers_to_transform);
  free_patterns(p->rank_pat, p->n_rank_pat);
  free_patterns(p->alpha_pat, p->n_alpha_pat);
  free(p->layers);
  for (int i = 0; i < 2 * LMOE_PART_COUNT; i++) free(p->buf[i]);
  if (p->ctx) lmoe_context_release(p->ctx);
  free(p->dir);
  p->obj.magic = 0;
  free(p);
}

/* ------------------------------------------------------------ patterns */

static const pattern *match_pattern(const pattern *p, int32_t n, const char *name) {
  for (int32_t i = 0; i < n; i++)
    if (regexec(&p[i].re, name, 0, NULL, 0) == 0) return &p[i];
  return NULL;
}

static lmoe_status parse_patterns(lmoe_peft *p, const cJSON *obj, const char *field, pattern **out,
                                  int32_t *n_out, const char *cfg) {
  *out = NULL;
  *n_out = 0;
  if (!obj || cJSON_IsNull(obj)) return LMOE_OK;
  if (!cJSON_IsObject(obj))
    return lmoe_fail(p->ctx, LMOE_ERR_FORMAT, "%s: %s is not an object", cfg, field);
  int n = cJSON_GetArraySize(obj);
  pattern *pat = calloc((size_t)n + 1, sizeof *pat);
  if (!pat) return lmoe_fail(p->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  *out = pat;
  for (const cJSON *it = obj->child; it; it = it->next) {
    pattern *q = &pat[(*n_out)++];
    q->key = strdup(it->string);
    if (!q->key) return lmoe_fail(p->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
      return lmoe_fail(p->ctx, LMOE_ERR_FORMAT, "%s: %s['%s'] is not a number", cfg, field, it->string);
    q->value = it->valuedouble;
    if (!strcmp(field, "rank_pattern") &&
        (q->value < 1 || q->value > 65536 || q->value != floor(q->value)))
      return lmoe_fail(p->ctx, LMOE_ERR_FORMAT, "%s: rank_pattern['%s'] = %g is not a rank", cfg,
                       it->string, q->value);
    const char *why = lmoe_pattern_unusable(it->string);
    if (why)
      return lmoe_fail(p->ctx, LMOE_ERR_UNSUPPORTED, "%s: %s key '%.80s%s' %s", cfg, field, it->string,
                       strlen(it->string) > 80 ? "..." : "", why);
    if (!lmoe_pattern_compile(&q->re, it->string, true))
      return lmoe_fail(p->ctx, LMOE_ERR_UNSUPPORTED, "%s: %s key '%s' is not a regex this library can use",
                       cfg, field, it->string);
    q->compiled = true;
  }
  return LMOE_OK;
}

/* Rank and alpha PEFT gives a module (param: the fused parameter, or NULL). */
static void module_rank_alpha(const lmoe_peft *p, const char *module, const char *param, int32_t *r,
                              double *alpha) {
  const pattern *rp = NULL, *ap = NULL;
  if (param) {
    char full[512];
    snprintf(full, sizeof full, "%s.%s", module, param);
    rp = match_pattern(p->rank_pat, p->n_rank_pat, full);
    ap = match_pattern(p->alpha_pat, p->n_alpha_pat, full);
  }
  if (!rp) rp = match_pattern(p->rank_pat, p->n_rank_pat, module);
  if (!ap) ap = match_pattern(p->alpha_pat, p->n_alpha_pat, module);
  *r = rp ? (int32_t)rp->value : p->r;
  *alpha = ap ? ap->value : p->alpha;
}

/* ------------------------------------------------------------ config */

static char *join_strings(const cJSON *arr) {
  size_t len = 1;
  for (const cJSON *s = arr->child; s; s = s->next) len += strlen(s->valuestring) + 2;
  char *o = malloc(len);
  if (!o) return NULL;
  o[0] = 0;
  for (const cJSON *s = arr->child; s; s = s->next) {
    if (s != arr->child) strcat(o, ", ");
    strcat(o, s->valuestring);
  }
  return o;
}

static bool string_array(const cJSON *v) {
  if (!cJSON_IsArray(v)) return false;
  for (const cJSON *s = v->child; s; s = s->next)
    if (!cJSON_IsString(s)) return false;
  return true;
}

static lmoe_status parse_config(lmoe_peft *p, const char *text, size_t len, const char *cfg) {
  lmoe_context *ctx = p->ctx;
  cJSON *root = cJSON_ParseWithLength(text, len);
  if (!root) return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: not valid JSON", cfg);
  lmoe_status s = LMOE_OK;
  if (!cJSON_IsObject(root)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: not a JSON object", cfg);
    goto done;
  }
  /* Duplicate keys would make cJSON's lookups pick one silently. */
  for (const cJSON *a = root->child; a; a = a->next)
    for (const cJSON *b = a->next; b; b = b->next)
      if (!strcmp(a->string, b->string)) {
        s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: key '%s' appears twice", cfg, a->string);
        goto done;
      }
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
  if (v && !(cJSON_IsString(v) && !strcmp(v->valuestring, "LORA"))) {
    s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: peft_type is %s; only LORA adapters are supported", cfg,
                  cJSON_IsString(v) ? v->valuestring : "not a string");
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "r");
  p->r = 8; /* PEFT's default */
  if (v) {
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > 65536 ||
        v->valuedouble != floor(v->valuedouble)) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: r is not a positive integer", cfg);
      goto done;
    }
    p->r = (int32_t)v->valuedouble;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
  p->alpha = 8;
  if (v) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: lora_alpha is not a number", cfg);
      goto done;
    }
    p->alpha = v->valuedouble;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "use_rslora");
  if (v && !cJSON_IsBool(v) && !cJSON_IsNull(v)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: use_rslora is not true or false", cfg);
    goto done;
  }
  p->use_rslora = cJSON_IsTrue(v);
  v = cJSON_GetObjectItemCaseSensitive(root, "use_dora");
  if (cJSON_IsTrue(v)) {
    s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: use_dora is true; DoRA adapters are not supported", cfg);
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "bias");
  if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "none"))) {
    s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: bias is '%s'; only \"none\" is supported", cfg,
                  cJSON_IsString(v) ? v->valuestring : "?");
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "lora_bias");
  if (cJSON_IsTrue(v)) {
    s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: lora_bias is true; LoRA biases are not supported", cfg);
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "target_modules");
  if (cJSON_IsString(v)) {
    p->target_modules = strdup(v->valuestring);
  } else if (string_array(v)) {
    p->target_modules = join_strings(v);
  } else if (v && !cJSON_IsNull(v)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: target_modules is neither a list of names nor a regex", cfg);
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "target_parameters");
  if (string_array(v)) {
    int n = cJSON_GetArraySize(v);
    p->tparams = calloc((size_t)n + 1, sizeof(char *));
    if (!p->tparams) {
      s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
      goto done;
    }
    for (const cJSON *e = v->child; e; e = e->next) {
      if (!(p->tparams[p->n_tparams++] = strdup(e->valuestring))) {
        s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
        goto done;
      }
    }
  } else if (v && !cJSON_IsNull(v)) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: target_parameters is not a list of names", cfg);
    goto done;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "layers_to_transform");
  if (v && !cJSON_IsNull(v)) {
    char *txt = cJSON_PrintUnformatted(v);
    p->layers_to_transform = txt ? strdup(txt) : NULL;
    cJSON_free(txt);
  }
  if ((s = parse_patterns(p, cJSON_GetObjectItemCaseSensitive(root, "rank_pattern"), "rank_pattern",
                          &p->rank_pat, &p->n_rank_pat, cfg)))
    goto done;
  if ((s = parse_patterns(p, cJSON_GetObjectItemCaseSensitive(root, "alpha_pattern"), "alpha_pattern",
                          &p->alpha_pat, &p->n_alpha_pat, cfg)))
    goto done;
done:
  cJSON_Delete(root);
  return s;
}

/* ------------------------------------------------------------ tensor names */

static bool parse_index(const char **s, int32_t *out) {
  const char *q = *s;
  if (*q < '0' || *q > '9') return false;
  long v = 0;
  while (*q >= '0' && *q <= '9') {
    v = v * 10 + (*q - '0');
    if (v > 1000000) return false;
    q++;
  }
  *out = (int32_t)v;
  *s = q;
  return true;
}

static bool eat(const char **s, const char *prefix) {
  size_t n = strlen(prefix);
  if (strncmp(*s, prefix, n)) return false;
  *s += n;
  return true;
}

/* Which part a fused target parameter names (its last component), -1 if none. */
static int32_t fused_param_part(const char *param) {
  const char *last = strrchr(param, '.');
  last = last ? last + 1 : param;
  if (!strcmp(last, "gate_up_proj")) return LMOE_PART_GATE_UP;
  if (!strcmp(last, "down_proj")) return LMOE_PART_DOWN;
  return -1;
}

/* Does a target_parameters entry name a parameter of an experts module? */
static bool tparam_on_experts(const char *param) {
  const char *last = strrchr(param, '.');
  if (!last) return true; /* a bare name matches any module with that parameter */
  size_t n = (size_t)(last - param);
  return n >= 7 && !strncmp(last - 7, "experts", 7);
}

static lmoe_status classify(lmoe_peft *p, int32_t idx, const char *cfg) {
  lmoe_context *ctx = p->ctx;
  lmoe_tensor_info ti;
  lmoe_safetensors_tensor(p->st, idx, &ti);
  peft_tensor *t = &p->t[p->n++];
  t->st_index = idx;
  t->layer = -1;
  t->part = -1;
  t->expert = -1;
  const char *name = ti.name, *s = name;
  eat(&s, "base_model.model.");
  size_t n = strlen(s);
  const char *tail = NULL;
  const size_t tl = sizeof ".lora_A.weight" - 1;
  if (n > tl && !strcmp(s + n - tl, ".lora_A.weight")) tail = s + n - tl, t->is_b = 0;
  else if (n > tl && !strcmp(s + n - tl, ".lora_B.weight")) tail = s + n - tl, t->is_b = 1;
  const char *m = s;
  if (!eat(&m, "model.layers.") || !parse_index(&m, &t->layer) || *m != '.') {
    t->layer = -1;
    return LMOE_OK; /* outside the decoder layers (lm_head, embeddings): not ours */
  }
  t->module = strndup(s, tail ? (size_t)(tail - s) : n);
  if (!t->module) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (!tail) return LMOE_OK; /* lora_magnitude_vector, embeddings, modules_to_save... */
  m++;
  int32_t fam = 0;
  if (eat(&m, "mlp.experts")) fam = LMOE_FAMILY_QWEN;
  else if (eat(&m, "block_sparse_moe.experts")) fam = LMOE_FAMILY_MIXTRAL;
  else return LMOE_OK;
  if (m == tail || !strncmp(m, ".base_layer", 11)) {
    /* fused: experts(.base_layer)^d.lora_X.weight; depth d picks the parameter */
    int32_t depth = 0;
    while (m != tail && eat(&m, ".base_layer")) depth++;
    if (m != tail) return LMOE_OK;
    int32_t order[8], no = 0;
    for (int32_t i = 0; i < p->n_tparams && no < 8; i++)
      if (tparam_on_experts(p->tparams[i])) order[no++] = i;
    if (no == 0)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                       "%s: tensor '%s' is a fused-experts LoRA but %s lists no target_parameters", lmoe_st_display_name(p->st), name, cfg);
    if (depth >= no)
      return lmoe_fail(ctx, LMOE_ERR_FORMAT,
                       "%s: tensor '%s' is nested %d deep but target_parameters names %d experts parameters",
                       lmoe_st_display_name(p->st), name, (int)depth, (int)no);
    /* Nesting follows the list: the first parameter is innermost (most base_layer). */
    const char *param = p->tparams[order[no - 1 - depth]];
    int32_t part = fused_param_part(param);
    if (part < 0)
      return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                       "%s: tensor '%s' targets experts parameter '%s'; only gate_up_proj and down_proj are supported",
                       lmoe_st_display_name(p->st), name, param);
    const char *last = strrchr(param, '.');
    t->param = strdup(last ? last + 1 : param);
    if (!t->param) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    /* The module of a fused tensor is the experts module itself. */
    char *em = strndup(s, (size_t)(strstr(t->module, ".experts") - t->module) + 8);
    if (!em) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    free(t->module);
    t->module = em;
    t->part = part;
    t->family = fam;
    t->depth = depth;
    return LMOE_OK;
  }
  int32_t e;
  if (!eat(&m, ".") || !parse_index(&m, &e) || *m != '.') return LMOE_OK;
  m++;
  size_t rest = (size_t)(tail - m);
  int32_t part = -1;
  static const char *qn[3] = {"gate_proj", "up_proj", "down_proj"}, *mn[3] = {"w1", "w3", "w2"};
  for (int32_t i = 0; i < 3; i++) {
    const char *want = fam == LMOE_FAMILY_QWEN ? qn[i] : mn[i];
    if (strlen(want) == rest && !strncmp(m, want, rest)) part = i;
  }
  if (part < 0) return LMOE_OK;
  t->part = part;
  t->expert = e;
  t->family = fam;
  return LMOE_OK;
}

/* PEFT saves target_parameters as a sorted list, while the base_layer nesting follows
   the order the parameters were given in when the adapter was made (seen with PEFT
   0.21: given [gate_up_proj, down_proj], saved [down_proj, gate_up_proj], gate_up_proj
   innermost). So when a layer has both fused parameters, the shapes decide: gate_up's
   A is [E*r, H] and its B [2I, E*r]; down's A is [E*r, I] and its B [H, E*r]. With the
   in/out sizes a0,b0 at depth 0 and a1,b1 at depth 1, "depth 0 is gate_up" holds iff
   b0 == 2*a1 && a0 == b1, and "depth 0 is down" iff b1 == 2*a0 && a1 == b0; both can't
   hold for non-empty tensors. When neither holds the list order stays and the shape
   checks at load time report the mismatch. */
static void resolve_fused_nesting(lmoe_peft *p) {
  for (int32_t i = 0; i < p->n; i++) {
    peft_tensor *t = &p->t[i];
    if (t->part < 0 || t->expert >= 0 || t->depth != 0 || t->is_b) continue;
    int64_t io[2][2] = {{-1, -1}, {-1, -1}}; /* [depth][A in, B out] */
    int32_t idx[2][2] = {{-1, -1}, {-1, -1}};
    for (int32_t j = 0; j < p->n; j++) {
      peft_tensor *u = &p->t[j];
      if (u->part < 0 || u->expert >= 0 || u->layer != t->layer || u->family != t->family ||
          u->depth > 1 || strcmp(u->module, t->module))
        continue;
      lmoe_tensor_info ti;
      lmoe_safetensors_tensor(p->st, u->st_index, &ti);
      if (ti.ndim != 2) return;
      io[u->depth][u->is_b] = u->is_b ? ti.shape[0] : ti.shape[1];
      idx[u->depth][u->is_b] = j;
    }
    if (idx[0][0] < 0 || idx[0][1] < 0 || idx[1][0] < 0 || idx[1][1] < 0) continue;
    int64_t a0 = io[0][0], b0 = io[0][1], a1 = io[1][0], b1 = io[1][1];
    int32_t want0 = -1;
    if (b0 == 2 * a1 && a0 == b1) want0 = LMOE_PART_GATE_UP;
    else if (b1 == 2 * a0 && a1 == b0) want0 = LMOE_PART_DOWN;
    if (want0 < 0 || p->t[idx[0][0]].part == want0) continue;
    for (int32_t d = 0; d < 2; d++)
      for (int32_t k = 0; k < 2; k++) {
        peft_tensor *u = &p->t[idx[d][k]];
        u->part = (d == 0) == (want0 == LMOE_PART_GATE_UP) ? LMOE_PART_GATE_UP : LMOE_PART_DOWN;
        char *name = strdup(u->part == LMOE_PART_GATE_UP ? "gate_up_proj" : "down_proj");
        if (name) {
          free(u->param);
          u->param = name;
        }
      }
  }
}

static int cmp_int(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

/* Shared by lmoe_peft_open and the fuzzer's in-memory entry: p->dir and the config
   text are set, st is an opened adapter_model.safetensors (owned from here on). */
static lmoe_status peft_finish(lmoe_peft *p, const char *text, size_t len, const char *cfg,
                               lmoe_safetensors *st) {
  lmoe_context *ctx = p->ctx;
  p->st = st;
  lmoe_status s = parse_config(p, text, len, cfg);
  int32_t n = s ? 0 : lmoe_safetensors_count(p->st);
  if (!s && !(p->t = calloc((size_t)n + 1, sizeof *p->t)))
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (int32_t i = 0; !s && i < n; i++) s = classify(p, i, cfg);
  if (!s) resolve_fused_nesting(p);
  /* Facts over all layers: families agree, one layout, the layers present. */
  if (!s && !(p->layers = calloc((size_t)n + 1, sizeof *p->layers)))
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  bool per = false, fused = false;
  for (int32_t i = 0; !s && i < p->n; i++) {
    const peft_tensor *t = &p->t[i];
    lmoe_tensor_info ti;
    lmoe_safetensors_tensor(p->st, t->st_index, &ti);
    p->bytes += (int64_t)ti.bytes;
    if (t->part < 0) continue;
    if (p->family && t->family != p->family) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' uses %s names, others %s names",
                    lmoe_st_display_name(p->st), ti.name,
                    t->family == LMOE_FAMILY_QWEN ? "Qwen (mlp.experts)" : "Mixtral (block_sparse_moe)",
                    p->family == LMOE_FAMILY_QWEN ? "Qwen" : "Mixtral");
      break;
    }
    p->family = t->family;
    if (t->expert >= 0) {
      per = true;
      if (t->expert + 1 > p->num_experts) p->num_experts = t->expert + 1;
      p->targets |= 1 << t->part;
      int32_t r = ti.ndim == 2 ? (int32_t)(t->is_b ? ti.shape[1] : ti.shape[0]) : 0;
      if (r > p->max_rank) p->max_rank = r;
    } else {
      fused = true; /* fused ranks are E*r: known once a layer's E is */
      p->targets |= t->part == LMOE_PART_GATE_UP ? (LMOE_TARGET_GATE | LMOE_TARGET_UP) : LMOE_TARGET_DOWN;
    }
    bool seen = false;
    for (int32_t j = 0; j < p->n_layers; j++) seen |= p->layers[j] == t->layer;
    if (!seen) p->layers[p->n_layers++] = t->layer;
  }
  if (!s && per && fused)
    s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                  "%s: mixes per-expert modules and fused target_parameters tensors",
                  lmoe_st_display_name(p->st));
  if (!s && p->n_layers == 0)
    s = lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: no LoRA tensors of MoE experts found",
                  lmoe_st_display_name(p->st));
  if (s) return s;
  p->layout = fused ? LMOE_PEFT_FUSED : LMOE_PEFT_PER_EXPERT;
  qsort(p->layers, (size_t)p->n_layers, sizeof *p->layers, cmp_int);
  return LMOE_OK;
}

static void peft_destroy(lmoe_object *obj) { peft_free((lmoe_peft *)obj); }

static lmoe_peft *peft_new(lmoe_context *ctx) {
  lmoe_peft *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  lmoe_object_init(&p->obj, LMOE_MAGIC_PEFT, peft_destroy);
  lmoe_context_retain(ctx);
  p->ctx = ctx;
  return p;
}

lmoe_status lmoe_peft_open(lmoe_context *ctx, const char *path, lmoe_peft **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!path) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "path is NULL");
  lmoe_peft *p = peft_new(ctx);
  if (!p) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  /* The directory, or a path to its adapter_config.json. */
  size_t pl = strlen(path);
  const char *cfgname = "adapter_config.json";
  if (pl >= strlen(cfgname) && !strcmp(path + pl - strlen(cfgname), cfgname))
    p->dir = strndup(path, pl - strlen(cfgname));
  else
    p->dir = strdup(path);
  char *cfg = p->dir ? lmoe_path_join(p->dir, cfgname) : NULL;
  char *model = p->dir ? lmoe_path_join(p->dir, "adapter_model.safetensors") : NULL;
  char *text = NULL;
  size_t len = 0;
  lmoe_safetensors *st = NULL;
  lmoe_status s = (cfg && model) ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (!s) s = lmoe_read_text_file(ctx, cfg, 16u << 20, &text, &len);
  if (!s) s = lmoe_safetensors_open(ctx, model, &st);
  if (!s) s = peft_finish(p, text, len, cfg, st);
  else lmoe_safetensors_close(st);
  free(text);
  free(cfg);
  free(model);
  if (s) {
    peft_free(p);
    return s;
  }
  *out = p;
  return LMOE_OK;
}

lmoe_status lmoe_peft_open_parts(lmoe_context *ctx, const char *config, size_t config_len,
                                 const void *model, size_t model_len, lmoe_peft **out) {
  *out = NULL;
  lmoe_clear_error(ctx);
  lmoe_peft *p = peft_new(ctx);
  if (!p || !(p->dir = strdup("(memory)"))) {
    peft_free(p);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  lmoe_safetensors *st = NULL;
  lmoe_status s = lmoe_safetensors_open_memory(ctx, model, model_len, "adapter_model.safetensors", &st);
  if (!s) s = peft_finish(p, config, config_len, "adapter_config.json", st);
  if (s) {
    peft_free(p);
    return s;
  }
  *out = p;
  return LMOE_OK;
}

void lmoe_peft_close(lmoe_peft *p) {
  if (valid_peft(p)) lmoe_object_release(&p->obj);
}

lmoe_status lmoe_peft_get_info(const lmoe_peft *p, lmoe_peft_info *out) {
  if (!valid_peft(p) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_peft_info i;
  lmoe_peft_info_init(&i);
  i.family = p->family;
  i.layout = p->layout;
  i.rank = p->r;
  i.alpha = (float)p->alpha;
  i.use_rslora = p->use_rslora;
  i.targets = p->targets;
  i.num_layers = p->n_layers;
  i.min_layer = p->layers[0];
  i.max_layer = p->layers[p->n_layers - 1];
  i.num_experts = p->num_experts;
  i.max_rank = p->max_rank;
  i.has_patterns = p->n_rank_pat + p->n_alpha_pat > 0;
  i.num_tensors = lmoe_safetensors_count(p->st);
  i.bytes = p->bytes;
  /* an older caller's struct gets the fields it has */
  return lmoe_struct_out(p->ctx, out, &i, sizeof i, "peft info", "lmoe_peft_info_init");
}

int32_t lmoe_peft_layers(const lmoe_peft *p, int32_t *out, int32_t capacity) {
  if (!valid_peft(p) || !out || capacity <= 0) return 0;
  int32_t n = p->n_layers < capacity ? p->n_layers : capacity;
  memcpy(out, p->layers, (size_t)n * sizeof *out);
  return n;
}

/* Appends to a bounded buffer, counting what would have been written. */
typedef struct sbuf {
  char *buf;
  size_t size, len;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void sb_printf(sbuf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *dst = b->len < b->size ? b->buf + b->len : NULL;
  int n = vsnprintf(dst, dst ? b->size - b->len : 0, fmt, ap);
  va_end(ap);
  if (n > 0) b->len += (size_t)n;
}

lmoe_status lmoe_peft_inspect(const lmoe_peft *p, char *buf, size_t size, size_t *needed) {
  if (!valid_peft(p)) return LMOE_ERR_INVALID_ARGUMENT;
  if (!buf && size) return lmoe_fail(p->ctx, LMOE_ERR_INVALID_ARGUMENT, "buf is NULL");
  sbuf b = {buf, size, 0};
  if (size) buf[0] = 0;
  static const char *fam[] = {"unknown", "qwen (mlp.experts.E.{gate,up,down}_proj)",
                              "mixtral (block_sparse_moe.experts.E.{w1,w3,w2})"};
  sb_printf(&b, "adapter: %s\n", p->dir);
  sb_printf(&b, "layout: %s\n", p->layout == LMOE_PEFT_FUSED ? "fused experts (target_parameters)"
                                                              : "per-expert modules (target_modules)");
  sb_printf(&b, "family: %s\n", p->layout == LMOE_PEFT_FUSED ? "fused experts" : fam[p->family]);
  sb_printf(&b, "rank: %d  alpha: %g  rslora: %s  scale: %g\n", (int)p->r, p->alpha,
            p->use_rslora ? "yes" : "no", (double)lmoe_lora_scale((float)p->alpha, p->r, p->use_rslora));
  sb_printf(&b, "targets:%s%s%s\n", p->targets & LMOE_TARGET_GATE ? " gate" : "",
            p->targets & LMOE_TARGET_UP ? " up" : "", p->targets & LMOE_TARGET_DOWN ? " down" : "");
  if (p->target_modules) sb_printf(&b, "target_modules: %s\n", p->target_modules);
  if (p->n_tparams) {
    sb_printf(&b, "target_parameters:");
    for (int32_t i = 0; i < p->n_tparams; i++) sb_printf(&b, "%s%s", i ? ", " : " ", p->tparams[i]);
    sb_printf(&b, "\n");
  }
  for (int32_t i = 0; i < p->n_rank_pat; i++)
    sb_printf(&b, "rank_pattern: %s = %g\n", p->rank_pat[i].key, p->rank_pat[i].value);
  for (int32_t i = 0; i < p->n_alpha_pat; i++)
    sb_printf(&b, "alpha_pattern: %s = %g\n", p->alpha_pat[i].key, p->alpha_pat[i].value);
  sb_printf(&b, "layers: %d (", (int)p->n_layers);
  for (int32_t i = 0; i < p->n_layers; i++) {
    int32_t j = i;
    while (j + 1 < p->n_layers && p->layers[j + 1] == p->layers[j] + 1) j++;
    sb_printf(&b, "%s%d", i ? ", " : "", (int)p->layers[i]);
    if (j > i) sb_printf(&b, "-%d", (int)p->layers[j]);
    i = j;
  }
  sb_printf(&b, ")\n");
  if (p->layers_to_transform) sb_printf(&b, "layers_to_transform: %s\n", p->layers_to_transform);
  if (p->layout == LMOE_PEFT_PER_EXPERT) sb_printf(&b, "experts: %d\n", (int)p->num_experts);
  int32_t other = 0, outside = 0;
  for (int32_t i = 0; i < p->n; i++) {
    if (p->t[i].layer < 0) outside++;
    else if (p->t[i].part < 0) other++;
  }
  if (other) sb_printf(&b, "other tensors in layers: %d (refused when their layer is loaded)\n", (int)other);
  if (outside) sb_printf(&b, "tensors outside the layers: %d (not used by loramoe)\n", (int)outside);
  sb_printf(&b, "tensors: %d  bytes: %lld\n", (int)lmoe_safetensors_count(p->st), (long long)p->bytes);
  if (needed) *needed = b.len + 1;
  return LMOE_OK;
}

/* ------------------------------------------------------------ one layer */

static lmoe_status read_tensor(lmoe_peft *p, const peft_tensor *t, float **out, lmoe_tensor_info *ti) {
  lmoe_safetensors_tensor(p->st, t->st_index, ti);
  if (ti->ndim != 2)
    return lmoe_fail(p->ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' has %d dimensions; LoRA weights have 2",
                     lmoe_st_display_name(p->st), ti->name, (int)ti->ndim);
  *out = malloc((size_t)(ti->numel ? ti->numel : 1) * sizeof(float));
  if (!*out) return lmoe_fail(p->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  return lmoe_safetensors_read(p->st, t->st_index, *out, LMOE_DTYPE_F32, ti->numel);
}

static float part_scale(const lmoe_peft *p, int32_t r, double alpha) {
  return lmoe_lora_scale((float)alpha, r, p->use_rslora);
}

/* Checks a tensor's rank against what the config says for its module. */
static lmoe_status check_rank(lmoe_peft *p, const peft_tensor *t, int32_t got, int32_t *want_r,
                              double *alpha, const char *tname) {
  module_rank_alpha(p, t->module, t->param, want_r, alpha);
  if (got != *want_r)
    return lmoe_fail(p->ctx, LMOE_ERR_FORMAT,
                     "%s: tensor '%s' has rank %d, but the config gives module %s rank %d",
                     lmoe_st_display_name(p->st), tname, (int)got, t->module, (int)*want_r);
  return LMOE_OK;
}

static lmoe_status map_fused(lmoe_peft *p, int32_t part, const peft_tensor *ta, const peft_tensor *tb,
                             int32_t E, int64_t in, int64_t outd, lmoe_lora_part *dst, float **abuf,
                             float **bbuf) {
  lmoe_context *ctx = p->ctx;
  const char *fn = lmoe_st_display_name(p->st);
  lmoe_tensor_info ia, ib;
  float *A = NULL, *B = NULL;
  lmoe_status s = read_tensor(p, ta, &A, &ia);
  if (!s) s = read_tensor(p, tb, &B, &ib);
  if (s) goto done;
  if (ia.shape[0] % E != 0 || ia.shape[0] == 0 || ia.shape[1] != in) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                  "%s: tensor '%s' has shape [%lld, %lld]; expected [%d*r, %lld] for %d experts (%s)", fn,
                  ia.name, (long long)ia.shape[0], (long long)ia.shape[1], (int)E, (long long)in, (int)E,
                  part_names[part]);
    goto done;
  }
  int64_t r = ia.shape[0] / E;
  if (ib.shape[0] != outd || ib.shape[1] != ia.shape[0]) {
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld]; expected [%lld, %lld] (%s)",
                  fn, ib.name, (long long)ib.shape[0], (long long)ib.shape[1], (long long)outd,
                  (long long)ia.shape[0], part_names[part]);
    goto done;
  }
  int32_t want;
  double alpha;
  if ((s = check_rank(p, ta, (int32_t)r, &want, &alpha, ia.name))) goto done;
  /* A [E*r, in] is (E, r, in) expert-major: already PEFT's per-expert layout.
     B [out, E*r] is (out, r, E) expert-minor: b[e][o][j] = B[o][j*E + e]. */
  float *b = malloc((size_t)(E * outd * r) * sizeof(float));
  if (!b) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  for (int64_t e = 0; e < E; e++)
    for (int64_t o = 0; o < outd; o++)
      for (int64_t j = 0; j < r; j++) b[(e * outd + o) * r + j] = B[o * (r * E) + j * E + e];
  *abuf = A;
  *bbuf = b;
  A = NULL;
  dst->a = *abuf;
  dst->b = *bbuf;
  dst->rank = (int32_t)r;
  dst->scale = part_scale(p, (int32_t)r, alpha);
done:
  free(A);
  free(B);
  return s;
}

static lmoe_status map_per_expert(lmoe_peft *p, int32_t layer, int32_t part, int32_t E, int64_t in,
                                  int64_t outd, lmoe_lora_part *dst, float **abuf, float **bbuf, int32_t e_lo,
                                  int32_t e_hi) {
  lmoe_context *ctx = p->ctx;
  const char *fn = lmoe_st_display_name(p->st);
  const peft_tensor **ta = calloc((size_t)E, sizeof *ta), **tb = calloc((size_t)E, sizeof *tb);
  int32_t *rank = calloc((size_t)E, sizeof *rank);
  float *scale = calloc((size_t)E, sizeof *scale);
  float *a = NULL, *b = NULL, *tmp = NULL;
  lmoe_status s = (ta && tb && rank && scale) ? LMOE_OK : lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (int32_t i = 0; !s && i < p->n; i++) {
    const peft_tensor *t = &p->t[i];
    if (t->layer != layer || t->part != part || t->expert < 0) continue;
    if (t->expert >= E) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: layer %d has LoRA tensors for expert %d, but the layer has %d experts",
                    fn, (int)layer, (int)t->expert, (int)E);
      break;
    }
    (t->is_b ? tb : ta)[t->expert] = t;
  }
  /* Every expert or none: a partial set is a broken or foreign adapter. */
  int32_t have = 0, missing = -1;
  for (int32_t e = 0; !s && e < E; e++) {
    if (ta[e] && tb[e]) have++;
    else if (missing < 0) missing = e;
    if (!s && (!!ta[e] != !!tb[e]))
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: layer %d expert %d %s has lora_%s but no lora_%s", fn,
                    (int)layer, (int)e, part_names[part], ta[e] ? "A" : "B", ta[e] ? "B" : "A");
  }
  if (!s && have == 0) goto done; /* part not targeted */
  if (!s && have != E)
    s = lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: layer %d: %s LoRA tensors are missing for expert %d (%d of %d experts have them)",
                  fn, (int)layer, part_names[part], (int)missing, (int)have, (int)E);
  int32_t R = 0;
  for (int32_t e = 0; !s && e < E; e++) {
    lmoe_tensor_info ia, ib;
    lmoe_safetensors_tensor(p->st, ta[e]->st_index, &ia);
    lmoe_safetensors_tensor(p->st, tb[e]->st_index, &ib);
    if (ia.ndim != 2 || ib.ndim != 2 || ia.shape[1] != in || ib.shape[0] != outd || ia.shape[0] != ib.shape[1] ||
        ia.shape[0] < 1) {
      s = lmoe_fail(ctx, LMOE_ERR_FORMAT,
                    "%s: layer %d expert %d %s: lora_A %s and lora_B %s don't fit in = %lld, out = %lld", fn,
                    (int)layer, (int)e, part_names[part], ia.name, ib.name, (long long)in, (long long)outd);
      break;
    }
    double alpha;
    int32_t want;
    if ((s = check_rank(p, ta[e], (int32_t)ia.shape[0], &want, &alpha, ia.name))) break;
    rank[e] = want;
    scale[e] = part_scale(p, want, alpha);
    if (want > R) R = want;
  }
  if (s) goto done;
  /* Pad every expert to the largest rank with zero rows of A and columns of B; one
     scale for the part, each expert's own folded into its B. */
  a = calloc((size_t)(E * R * in), sizeof(float));
  b = calloc((size_t)(E * outd * R), sizeof(float));
  if (!a || !b) {
    s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    goto done;
  }
  float s0 = scale[0];
  /* Only experts [e_lo, e_hi) are read (a rank's experts); the others stay zero. */
  for (int32_t e = e_lo; !s && e < e_hi; e++) {
    lmoe_tensor_info ti;
    if ((s = read_tensor(p, ta[e], &tmp, &ti))) break;
    for (int64_t j = 0; j < rank[e]; j++) memcpy(a + ((int64_t)e * R + j) * in, tmp + j * in, (size_t)in * sizeof(float));
    free(tmp);
    tmp = NULL;
    if ((s = read_tensor(p, tb[e], &tmp, &ti))) break;
    float f = scale[e] == s0 ? 1.0f : scale[e] / s0;
    for (int64_t o = 0; o < outd; o++)
      for (int64_t j = 0; j < rank[e]; j++) b[((int64_t)e * outd + o) * R + j] = tmp[o * rank[e] + j] * f;
    free(tmp);
    tmp = NULL;
  }
  if (s) goto done;
  *abuf = a;
  *bbuf = b;
  a = b = NULL;
  dst->a = *abuf;
  dst->b = *bbuf;
  dst->rank = R;
  dst->scale = s0;
done:
  free(tmp);
  free(a);
  free(b);
  free(ta);
  free(tb);
  free(rank);
  free(scale);
  return s;
}

static lmoe_status layer_desc(lmoe_peft *p, int32_t layer, int32_t E, int32_t H, int32_t I,
                              lmoe_adapter_desc *desc, int32_t e_lo, int32_t e_hi);

lmoe_status lmoe_peft_layer_desc(lmoe_peft *p, int32_t layer, int32_t E, int32_t H, int32_t I,
                                 lmoe_adapter_desc *desc) {
  return layer_desc(p, layer, E, H, I, desc, 0, E);
}

/* The desc of the whole layer, with the tensors of experts outside [e_lo, e_hi) not
   read (zero): what an expert-parallel rank's pool takes. */
static lmoe_status layer_desc(lmoe_peft *p, int32_t layer, int32_t E, int32_t H, int32_t I,
                              lmoe_adapter_desc *desc, int32_t e_lo, int32_t e_hi) {
  if (!valid_peft(p)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = p->ctx;
  lmoe_clear_error(ctx);
  if (!desc) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "desc is NULL");
  if (E < 1 || H < 1 || I < 1)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shapes must be positive (E %d, H %d, I %d)", (int)E,
                     (int)H, (int)I);
  const char *fn = lmoe_st_display_name(p->st);
  bool found = false;
  for (int32_t i = 0; i < p->n_layers; i++) found |= p->layers[i] == layer;
  if (!found) {
    char list[256] = "";
    for (int32_t i = 0; i < p->n_layers && strlen(list) < 200; i++)
      snprintf(list + strlen(list), sizeof list - strlen(list), "%s%d", i ? ", " : "", (int)p->layers[i]);
    return lmoe_fail(ctx, LMOE_ERR_NOT_FOUND, "%s: no expert LoRA tensors for layer %d (layers: %s%s)", fn,
                     (int)layer, list, strlen(list) >= 200 ? ", ..." : "");
  }
  /* Anything else the adapter targets in this layer would be silently dropped. */
  for (int32_t i = 0; i < p->n; i++) {
    const peft_tensor *t = &p->t[i];
    if (t->layer != layer || t->part >= 0) continue;
    lmoe_tensor_info ti;
    lmoe_safetensors_tensor(p->st, t->st_index, &ti);
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "%s: layer %d: tensor '%s' (module %s) is not a LoRA of the routed experts; loramoe "
                     "computes only the experts, so this adapter can't be applied exactly",
                     fn, (int)layer, ti.name, t->module ? t->module : "?");
  }
  for (int i = 0; i < 2 * LMOE_PART_COUNT; i++) {
    free(p->buf[i]);
    p->buf[i] = NULL;
  }
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  d.dtype = LMOE_DTYPE_F32;
  lmoe_status s = LMOE_OK;
  if (p->layout == LMOE_PEFT_FUSED) {
    for (int32_t part = LMOE_PART_DOWN; !s && part <= LMOE_PART_GATE_UP; part++) {
      const peft_tensor *ta = NULL, *tb = NULL;
      for (int32_t i = 0; i < p->n; i++) {
        const peft_tensor *t = &p->t[i];
        if (t->layer != layer || t->part != part) continue;
        const peft_tensor **slot = t->is_b ? &tb : &ta;
        if (*slot)
          return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: layer %d has two %s lora_%s tensors", fn, (int)layer,
                           part_names[part], t->is_b ? "B" : "A");
        *slot = t;
      }
      if (!ta && !tb) continue;
      if (!ta || !tb)
        return lmoe_fail(ctx, LMOE_ERR_FORMAT, "%s: layer %d %s has lora_%s but no lora_%s", fn, (int)layer,
                         part_names[part], ta ? "A" : "B", ta ? "B" : "A");
      if (part == LMOE_PART_GATE_UP)
        s = map_fused(p, part, ta, tb, E, H, 2 * (int64_t)I, &d.gate_up, &p->buf[0], &p->buf[1]);
      else
        s = map_fused(p, part, ta, tb, E, I, H, &d.down, &p->buf[2], &p->buf[3]);
    }
  } else {
    s = map_per_expert(p, layer, LMOE_PART_GATE, E, H, I, &d.gate, &p->buf[0], &p->buf[1], e_lo, e_hi);
    if (!s) s = map_per_expert(p, layer, LMOE_PART_UP, E, H, I, &d.up, &p->buf[2], &p->buf[3], e_lo, e_hi);
    if (!s) s = map_per_expert(p, layer, LMOE_PART_DOWN, E, I, H, &d.down, &p->buf[4], &p->buf[5], e_lo, e_hi);
  }
  if (s) return s;
  *desc = d;
  return LMOE_OK;
}

/* One layer of a PEFT adapter into a pool slot: the mapping is this file's, the slot's
   life cycle pool.c's (lmoe_pool_load_named). */
lmoe_status lmoe_pool_load_peft(lmoe_pool *pool, const char *name, lmoe_peft *peft, int32_t layer,
                                int32_t *slot) {
  if (!lmoe_object_is(pool, LMOE_MAGIC_POOL)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = pool->layer->ctx;
  lmoe_clear_error(ctx);
  if (!valid_peft(peft)) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "peft adapter is NULL or not one");
  lmoe_status st = lmoe_pool_check_name(ctx, name);
  if (st) return st;
  /* the whole layer's shapes; an expert-parallel rank reads only its experts' tensors
     and the pool takes its rank's cut (pool.c) */
  const lmoe_layer *ly = pool->layer;
  const lmoe_layer_config *c = &ly->cfg;
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  st = layer_desc(peft, layer, c->num_experts, c->hidden, c->intermediate, &d, ly->e0,
                  ly->e0 + ly->local.num_experts);
  if (st) {
    /* the message went to the adapter's context; keep it visible on the pool's */
    if (peft->ctx != ctx && ctx->error[0] == 0) lmoe_fail(ctx, st, "%s", peft->ctx->error);
    return st;
  }
  return lmoe_pool_load_named(pool, name, &d, slot);
}

