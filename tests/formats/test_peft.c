#define _POSIX_C_SOURCE 200809L
/* PEFT adapters of every layout and both model families, written by the synthetic
   writer, loaded into a pool, and checked three ways against PEFT's math computed
   here from the files (names and reshapes spelled out independently of peft.c):
   the weight deltas the pool's slot stores, the float64 reference forward, and the
   cpu forward. Then the refusals: what can't be applied exactly names what and where. */
#include "formats_util.h"
#include "internal.h"

#include <sys/stat.h>

static const char *work_dir;

typedef struct tcase {
  const char *what;
  int family, layout, targets, rank, rslora, dtype, layers, layer;
  float alpha;
  const char *rank_key;
  int rank_val;
  const char *alpha_key;
  float alpha_val;
} tcase;

/* Does a pattern key (plain dotted name here) match a module name the PEFT way:
   the whole name, or a suffix after a dot? */
static int key_matches(const char *key, const char *name) {
  if (!key) return 0;
  size_t n = strlen(name), k = strlen(key);
  if (k > n) return 0;
  return !strcmp(name + n - k, key) && (k == n || name[n - k - 1] == '.');
}

static float *read_f32(lmoe_context *ctx, lmoe_safetensors *st, const char *name, int64_t *d0, int64_t *d1) {
  int32_t idx;
  lmoe_status s = lmoe_safetensors_find(st, name, &idx);
  CHECK(s == LMOE_OK, "tensor %s present", name);
  if (s) return NULL;
  lmoe_tensor_info ti;
  OK(ctx, lmoe_safetensors_tensor(st, idx, &ti));
  *d0 = ti.shape[0];
  *d1 = ti.shape[1];
  float *f = malloc((size_t)ti.numel * sizeof(float));
  OK(ctx, lmoe_safetensors_read(st, idx, f, LMOE_DTYPE_F32, ti.numel));
  return f;
}

static double scale_of(const tcase *c, const char *module) {
  int r = key_matches(c->rank_key, module) ? c->rank_val : c->rank;
  double alpha = key_matches(c->alpha_key, module) ? c->alpha_val : c->alpha;
  return c->rslora ? alpha / sqrt((double)r) : alpha / r;
}

/* The adapter's deltas for one layer, from the file, PEFT's way. */
static host_delta expected_delta(lmoe_context *ctx, const char *dir, const tcase *c, int E, int H, int I) {
  host_delta d = delta_new(E, H, I);
  char path[4200], name[512], module[400];
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  lmoe_safetensors *st;
  OK(ctx, lmoe_safetensors_open(ctx, path, &st));
  int64_t a0, a1, b0, b1;
  if (c->layout == LMOE_PEFT_PER_EXPERT) {
    static const char *qn[3] = {"gate_proj", "up_proj", "down_proj"}, *mn[3] = {"w1", "w3", "w2"};
    for (int e = 0; e < E; e++)
      for (int p = 0; p < 3; p++) {
        if (!(c->targets & (1 << p))) continue;
        snprintf(module, sizeof module, "model.layers.%d.%s.experts.%d.%s", c->layer,
                 c->family == LMOE_FAMILY_QWEN ? "mlp" : "block_sparse_moe", e,
                 c->family == LMOE_FAMILY_QWEN ? qn[p] : mn[p]);
        snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", module);
        float *A = read_f32(ctx, st, name, &a0, &a1);
        snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", module);
        float *B = read_f32(ctx, st, name, &b0, &b1);
        if (!A || !B) exit(1);
        double s = scale_of(c, module);
        int r = (int)a0;
        if (p == 2) add_ba(d.d2 + (long)e * H * I, H, I, r, s, A, a1, 1, B, b1, 1);
        else add_ba(d.d13 + ((long)e * 2 * I + p * I) * H, I, H, r, s, A, a1, 1, B, b1, 1);
        free(A);
        free(B);
      }
  } else {
    /* target_parameters [gate_up_proj, down_proj]: the first sits under base_layer. */
    int both = (c->targets & 3) && (c->targets & 4);
    for (int p = 0; p < 2; p++) {
      if (p == 0 && !(c->targets & 3)) continue;
      if (p == 1 && !(c->targets & 4)) continue;
      const char *nest = p == 0 && both ? ".base_layer" : "";
      snprintf(module, sizeof module, "model.layers.%d.mlp.experts", c->layer);
      char full[480];
      snprintf(full, sizeof full, "%s.%s", module, p == 0 ? "gate_up_proj" : "down_proj");
      snprintf(name, sizeof name, "base_model.model.%s%s.lora_A.weight", module, nest);
      float *A = read_f32(ctx, st, name, &a0, &a1);
      snprintf(name, sizeof name, "base_model.model.%s%s.lora_B.weight", module, nest);
      float *B = read_f32(ctx, st, name, &b0, &b1);
      if (!A || !B) exit(1);
      int r = (int)(a0 / E);
      double s = scale_of(c, full);
      /* A [E*r, in] -> (E, r, in); B [out, E*r] -> (out, r, E) */
      for (int e = 0; e < E; e++) {
        const float *Ae = A + (long)e * r * a1;
        const float *Be = B + e; /* B_e[o][j] = B[o*(E*r) + j*E + e] */
        if (p == 0) add_ba(d.d13 + (long)e * 2 * I * H, 2 * I, H, r, s, Ae, a1, 1, Be, b1, E);
        else add_ba(d.d2 + (long)e * H * I, H, I, r, s, Ae, a1, 1, Be, b1, E);
      }
      free(A);
      free(B);
    }
  }
  lmoe_safetensors_close(st);
  return d;
}

/* The deltas the pool's slot holds, read from its canonical storage (internal.h). */
static host_delta slot_delta(const lmoe_pool *p, int slot) {
  const lmoe_layer_config *c = &p->layer->cfg;
  int E = c->num_experts, H = c->hidden, I = c->intermediate, R = p->cfg.max_rank, R13 = 2 * R;
  const lmoe_slot *s = &p->slots[slot];
  host_delta d = delta_new(E, H, I);
  const uint16_t *a13 = lmoe_slot_ptr(p, slot, p->off_a13), *b13 = lmoe_slot_ptr(p, slot, p->off_b13);
  const uint16_t *a2 = lmoe_slot_ptr(p, slot, p->off_a2), *b2 = lmoe_slot_ptr(p, slot, p->off_b2);
  for (int e = 0; e < E; e++) {
    for (int o = 0; o < 2 * I; o++) {
      int lo = o < I ? s->g_lo : s->u_lo, hi = o < I ? s->g_hi : s->u_hi;
      double sc = o < I ? s->scale_gate : s->scale_up;
      for (int h = 0; h < H; h++) {
        double v = 0;
        for (int j = lo; j < hi; j++)
          v += (double)lmoe_bf16_to_f32(b13[((long)e * 2 * I + o) * R13 + j]) *
               lmoe_bf16_to_f32(a13[((long)e * R13 + j) * H + h]);
        d.d13[((long)e * 2 * I + o) * H + h] = sc * v;
      }
    }
    for (int o = 0; o < H; o++)
      for (int i = 0; i < I; i++) {
        double v = 0;
        for (int j = 0; j < s->r2; j++)
          v += (double)lmoe_bf16_to_f32(b2[((long)e * H + o) * R + j]) * lmoe_bf16_to_f32(a2[((long)e * R + j) * I + i]);
        d.d2[((long)e * H + o) * I + i] = s->scale_down * v;
      }
  }
  return d;
}

static void run_case(lmoe_context *ctx, const tcase *c, int idx) {
  int E = test_randint(2, 6), H = 8 * test_randint(2, 6), I = 8 * test_randint(1, 4), K = test_randint(1, E < 3 ? E : 3);
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/case%d", work_dir, idx);
  lmoe_peft_synthetic sp;
  lmoe_peft_synthetic_init(&sp);
  sp.family = c->family;
  sp.layout = c->layout;
  sp.num_layers = c->layers;
  sp.num_experts = E;
  sp.hidden = H;
  sp.intermediate = I;
  sp.targets = c->targets;
  sp.rank = c->rank;
  sp.alpha = c->alpha;
  sp.use_rslora = c->rslora;
  sp.dtype = c->dtype;
  sp.seed = test_rand();
  sp.scale = 0.2f;
  sp.rank_pattern_key = c->rank_key;
  sp.rank_pattern_value = c->rank_val;
  sp.alpha_pattern_key = c->alpha_key;
  sp.alpha_pattern_value = c->alpha_val;
  OK(ctx, lmoe_peft_write_synthetic(ctx, dir, &sp));

  lmoe_peft *peft = NULL;
  OK(ctx, lmoe_peft_open(ctx, dir, &peft));
  lmoe_peft_info info;
  lmoe_peft_info_init(&info);
  OK(ctx, lmoe_peft_get_info(peft, &info));
  CHECK(info.layout == c->layout && info.rank == c->rank && info.num_layers == c->layers &&
            info.targets == (c->layout == LMOE_PEFT_FUSED && (c->targets & 3) ? c->targets | 3 : c->targets) &&
            (c->layout == LMOE_PEFT_FUSED || (info.family == c->family && info.num_experts == E)),
        "%s: info layout %d rank %d layers %d targets %d family %d experts %d", c->what, info.layout, info.rank,
        info.num_layers, info.targets, info.family, info.num_experts);
  char text[2048];
  size_t need = 0;
  OK(ctx, lmoe_peft_inspect(peft, text, sizeof text, &need));
  char want[64];
  snprintf(want, sizeof want, "rank: %d", c->rank);
  CHECK(strstr(text, want) && need == strlen(text) + 1, "%s: inspect says \"%s\"", c->what, text);
  char tiny[16];
  OK(ctx, lmoe_peft_inspect(peft, tiny, sizeof tiny, &need));
  CHECK(strlen(tiny) == sizeof tiny - 1 && need == strlen(text) + 1, "inspect truncates and reports the length");

  lmoe_layer *layer = test_layer(ctx, E, H, I, K, 64, 0.2f);
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 2;
  pc.max_rank = 16;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  int32_t slot = -1;
  OK(ctx, lmoe_pool_load_peft(pool, "adapter", peft, c->layer, &slot));
  CHECK(slot == 0 && !strcmp(lmoe_pool_slot_name(pool, slot), "adapter"), "%s: loaded into slot %d", c->what, slot);

  host_delta want_d = expected_delta(ctx, dir, c, E, H, I), got_d = slot_delta(pool, slot);
  double e13 = rel_l2(got_d.d13, want_d.d13, (long)E * 2 * I * H), e2 = rel_l2(got_d.d2, want_d.d2, (long)E * H * I);
  /* the pool stores bf16: A and B each round once (and B once more when a scale is folded) */
  CHECK(e13 < 1e-2 && e2 < 1e-2, "%s: slot deltas vs PEFT rel L2 gate/up %.3g down %.3g", c->what, e13, e2);

  /* Forward: request 0 uses the adapter, request 1 none, request 2 the adapter again. */
  int tok[3] = {test_randint(1, 7), test_randint(0, 5), test_randint(1, 6)}, M = tok[0] + tok[1] + tok[2];
  int32_t slots[3] = {slot, LMOE_NO_ADAPTER, slot};
  lmoe_batch *batch;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  OK(ctx, lmoe_batch_set(batch, pool, 3, tok, slots));
  lmoe_buffer *x = test_buffer(ctx, LMOE_DTYPE_BF16, M, H), *ids = test_buffer(ctx, LMOE_DTYPE_I32, M, K),
              *w = test_buffer(ctx, LMOE_DTYPE_F32, M, K);
  OK(ctx, lmoe_buffer_fill_random(x, test_rand(), -1.0f, 1.0f, NULL));
  int32_t *hid = malloc((size_t)M * K * sizeof *hid);
  float *hw = malloc((size_t)M * K * sizeof *hw);
  random_routing(M, E, K, hid, hw);
  OK(ctx, lmoe_buffer_write(ids, 0, hid, LMOE_DTYPE_I32, (int64_t)M * K));
  OK(ctx, lmoe_buffer_write(w, 0, hw, LMOE_DTYPE_F32, (int64_t)M * K));
  double *hx = malloc((size_t)M * H * sizeof *hx), *want_out = malloc((size_t)M * H * sizeof *want_out);
  OK(ctx, lmoe_buffer_read(x, 0, hx, LMOE_DTYPE_F64, (int64_t)M * H));
  double *W13, *W2;
  layer_weights_f64(ctx, layer, &W13, &W2);
  const host_delta **per_tok = malloc((size_t)M * sizeof *per_tok);
  for (int t = 0; t < M; t++) per_tok[t] = (t < tok[0] || t >= tok[0] + tok[1]) ? &want_d : NULL;
  own_forward(M, E, H, I, K, hx, hid, hw, W13, W2, per_tok, want_out);
  /* the adapter must matter, or the comparison proves nothing */
  for (int t = 0; t < M; t++) per_tok[t] = NULL;
  double *base_out = malloc((size_t)M * H * sizeof *base_out);
  own_forward(M, E, H, I, K, hx, hid, hw, W13, W2, per_tok, base_out);
  double effect = rel_l2(base_out, want_out, (long)M * H);
  CHECK(effect > 0.05, "%s: the adapter changes the output by %.3g only", c->what, effect);
  double e = check_forward(ctx, layer, pool, batch, x, ids, w, want_out, M, H, c->what);
  printf("%-44s E %d H %d I %d k %d M %d: slot %.2g/%.2g forward %.2g (adapter effect %.2g)\n", c->what, E, H,
         I, K, M, e13, e2, e, effect);

  free(base_out);
  free(per_tok);
  free(W13);
  free(W2);
  free(hx);
  free(want_out);
  free(hid);
  free(hw);
  lmoe_buffer_release(x);
  lmoe_buffer_release(ids);
  lmoe_buffer_release(w);
  lmoe_batch_release(batch);
  delta_free(&want_d);
  delta_free(&got_d);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_peft_close(peft);
}

/* ------------------------------------------------------------ refusals */

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  fputs(text, f);
  fclose(f);
}

static char *read_all(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  b[fread(b, 1, (size_t)n, f)] = 0;
  fclose(f);
  return b;
}

/* Replaces the first `from` in the config with `to`. */
static void edit_config(const char *dir, const char *from, const char *to) {
  char path[4096];
  snprintf(path, sizeof path, "%s/adapter_config.json", dir);
  char *t = read_all(path);
  char *at = strstr(t, from);
  CHECK(at != NULL, "config has \"%s\"", from);
  if (!at) return;
  char *o = malloc(strlen(t) + strlen(to) + 1);
  memcpy(o, t, (size_t)(at - t));
  strcpy(o + (at - t), to);
  strcat(o, at + strlen(from));
  write_text(path, o);
  free(o);
  free(t);
}

/* Rewrites adapter_model.safetensors keeping tensors for which keep() says so, and
   adding one extra [r, in] / [out, r] pair under `extra` (NULL: none). */
static void rewrite_model(lmoe_context *ctx, const char *dir, const char *drop, const char *extra) {
  char path[4096];
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  lmoe_safetensors *st;
  OK(ctx, lmoe_safetensors_open(ctx, path, &st));
  int n = lmoe_safetensors_count(st);
  lmoe_tensor_entry *e = calloc((size_t)n + 2, sizeof *e);
  char **names = calloc((size_t)n + 2, sizeof *names);
  int m = 0;
  for (int i = 0; i < n; i++) {
    lmoe_tensor_info ti;
    lmoe_safetensors_tensor(st, i, &ti);
    if (drop && !strcmp(ti.name, drop)) continue;
    names[m] = strdup(ti.name);
    e[m].name = names[m];
    e[m].dtype = LMOE_DTYPE_F32;
    e[m].ndim = ti.ndim;
    memcpy(e[m].shape, ti.shape, sizeof ti.shape);
    float *d = malloc((size_t)ti.numel * sizeof(float));
    lmoe_safetensors_read(st, i, d, LMOE_DTYPE_F32, ti.numel);
    e[m].data = d;
    m++;
  }
  lmoe_safetensors_close(st);
  if (extra) {
    names[m] = strdup(extra);
    e[m].name = names[m];
    e[m].dtype = LMOE_DTYPE_F32;
    e[m].ndim = 2;
    e[m].shape[0] = 4;
    e[m].shape[1] = 4;
    e[m].data = calloc(16, sizeof(float));
    m++;
  }
  OK(ctx, lmoe_safetensors_write(ctx, path, m, e, 0, NULL, NULL));
  for (int i = 0; i < m; i++) {
    free((void *)e[i].data);
    free(names[i]);
  }
  free(e);
  free(names);
}

static void expect_refusal(lmoe_context *ctx, const char *dir, int at_open, lmoe_status want, const char *text) {
  lmoe_peft *p = NULL;
  lmoe_status s = lmoe_peft_open(ctx, dir, &p);
  if (!at_open && s == LMOE_OK) {
    lmoe_adapter_desc d;
    lmoe_adapter_desc_init(&d);
    s = lmoe_peft_layer_desc(p, 0, 4, 16, 8, &d);
  }
  const char *msg = lmoe_context_last_error(ctx);
  CHECK(s == want && strstr(msg, text), "%s: got %s \"%s\", want %s \"%s\"", dir, lmoe_status_string(s), msg,
        lmoe_status_string(want), text);
  lmoe_peft_close(p);
}

static void fresh(lmoe_context *ctx, const char *dir, int layout) {
  lmoe_peft_synthetic sp;
  lmoe_peft_synthetic_init(&sp);
  sp.num_experts = 4;
  sp.hidden = 16;
  sp.intermediate = 8;
  sp.rank = 4;
  sp.layout = layout;
  sp.seed = test_rand();
  OK(ctx, lmoe_peft_write_synthetic(ctx, dir, &sp));
}

/* A config edit (in a fresh adapter of `layout`) and the refusal it must bring. */
typedef struct config_refusal {
  int layout, at_open;
  const char *from, *to;
  lmoe_status want;
  const char *text;
} config_refusal;

static void test_refusals(lmoe_context *ctx) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/refuse", work_dir);
  char long_key[1200];
  snprintf(long_key, sizeof long_key, "\"rank_pattern\": {\"%01030d\": 4, \"x\": 4", 0);
  const config_refusal edits[] = {
      {0, 1, "\"use_dora\":\tfalse", "\"use_dora\": true", LMOE_ERR_UNSUPPORTED, "use_dora is true"},
      {0, 1, "\"bias\":\t\"none\"", "\"bias\": \"lora_only\"", LMOE_ERR_UNSUPPORTED, "bias is 'lora_only'"},
      {0, 1, "\"peft_type\":\t\"LORA\"", "\"peft_type\": \"IA3\"", LMOE_ERR_UNSUPPORTED, "only LORA adapters"},
      {0, 1, "\"r\":\t4", "\"r\": 4, \"r\": 8", LMOE_ERR_FORMAT, "key 'r' appears twice"},
      {0, 0, "\"r\":\t4", "\"r\": 6", LMOE_ERR_FORMAT,
       "has rank 4, but the config gives module model.layers.0.mlp.experts.0"},
      /* rank_pattern / alpha_pattern keys come from an untrusted file: keys whose counted
         repetitions would take gigabytes to compile (a fuzzer grew one), back-references
         and overlong keys are refused with a reason */
      {0, 1, "\"rank_pattern\":\t{", "\"rank_pattern\": {\"((a{255}){255}){255}\": 4, \"x\": 4",
       LMOE_ERR_UNSUPPORTED, "expands to more than 4096 atoms"},
      {0, 1, "\"alpha_pattern\":\t{", "\"alpha_pattern\": {\"a{99}{99}\": 4, \"x\": 4", LMOE_ERR_UNSUPPORTED,
       "repeats a repetition"},
      {0, 1, "\"alpha_pattern\":\t{", "\"alpha_pattern\": {\"(a{99}b){99}\": 4, \"x\": 4", LMOE_ERR_UNSUPPORTED,
       "expands to more than 4096 atoms"},
      {0, 1, "\"rank_pattern\":\t{", "\"rank_pattern\": {\"(up)_proj\\\\1\": 4, \"x\": 4", LMOE_ERR_UNSUPPORTED,
       "uses a back-reference"},
      /* each + of glibc's a++++... doubles the tree; a fuzzer grew 100 of them */
      {0, 1, "\"rank_pattern\":\t{", "\"rank_pattern\": {\"down_p+++\": 4, \"x\": 4", LMOE_ERR_UNSUPPORTED,
       "repeats a repetition"},
      {0, 1, "\"alpha_pattern\":\t{", "\"alpha_pattern\": {\"((((((((((((a+)+)+)+)+)+)+)+)+)+)+)+)+\": 4, \"x\": 4",
       LMOE_ERR_UNSUPPORTED, "expands to more than 4096 atoms"},
      {0, 1, "\"rank_pattern\":\t{", long_key, LMOE_ERR_UNSUPPORTED, "is longer than 1024 characters"},
      /* fused: a fused tensor with no target_parameters to say which parameter it is */
      {1, 1, "\"target_parameters\":", "\"target_parameters\": null, \"unused\":", LMOE_ERR_FORMAT,
       "lists no target_parameters"},
      {1, 1, "mlp.experts.gate_up_proj", "mlp.experts.gate_proj", LMOE_ERR_UNSUPPORTED,
       "only gate_up_proj and down_proj are supported"},
  };
  for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
    fresh(ctx, dir, edits[i].layout);
    edit_config(dir, edits[i].from, edits[i].to);
    expect_refusal(ctx, dir, edits[i].at_open, edits[i].want, edits[i].text);
  }
  /* ordinary counted and lazy repetitions in a key still work */
  fresh(ctx, dir, 0);
  edit_config(dir, "\"rank_pattern\":\t{",
              "\"rank_pattern\": {\"experts\\\\.[0-9]{1,3}\\\\.down_proj\": 4, \"layers\\\\.[0-9]+?\\\\.mlp\": 4, \"x\": 4");
  {
    lmoe_peft *p;
    OK(ctx, lmoe_peft_open(ctx, dir, &p));
    lmoe_peft_close(p);
  }
  fresh(ctx, dir, 0);
  rewrite_model(ctx, dir, "base_model.model.model.layers.0.mlp.experts.2.up_proj.lora_A.weight", NULL);
  expect_refusal(ctx, dir, 0, LMOE_ERR_FORMAT, "layer 0 expert 2 up has lora_B but no lora_A");
  fresh(ctx, dir, 0);
  rewrite_model(ctx, dir, "base_model.model.model.layers.0.mlp.experts.3.down_proj.lora_A.weight", NULL);
  rewrite_model(ctx, dir, "base_model.model.model.layers.0.mlp.experts.3.down_proj.lora_B.weight", NULL);
  expect_refusal(ctx, dir, 0, LMOE_ERR_FORMAT, "down LoRA tensors are missing for expert 3 (3 of 4 experts");
  fresh(ctx, dir, 0);
  rewrite_model(ctx, dir, NULL, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  expect_refusal(ctx, dir, 0, LMOE_ERR_UNSUPPORTED, "module model.layers.0.self_attn.q_proj) is not a LoRA of the routed experts");
  fresh(ctx, dir, 0);
  rewrite_model(ctx, dir, NULL, "base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_magnitude_vector");
  expect_refusal(ctx, dir, 0, LMOE_ERR_UNSUPPORTED, "lora_magnitude_vector");
  fresh(ctx, dir, 0);
  rewrite_model(ctx, dir, NULL, "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight");
  expect_refusal(ctx, dir, 1, LMOE_ERR_FORMAT, "uses Mixtral (block_sparse_moe) names, others Qwen names");
  fresh(ctx, dir, 0);
  {
    /* a layer the adapter doesn't have, and an expert the layer doesn't have */
    lmoe_peft *p;
    OK(ctx, lmoe_peft_open(ctx, dir, &p));
    lmoe_adapter_desc d;
    lmoe_adapter_desc_init(&d);
    FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_peft_layer_desc(p, 3, 4, 16, 8, &d));
    CHECK(strstr(lmoe_context_last_error(ctx), "no expert LoRA tensors for layer 3 (layers: 0)"), "%s",
          lmoe_context_last_error(ctx));
    FAILS(ctx, LMOE_ERR_FORMAT, lmoe_peft_layer_desc(p, 0, 3, 16, 8, &d));
    CHECK(strstr(lmoe_context_last_error(ctx), "tensors for expert 3, but the layer has 3 experts"), "%s",
          lmoe_context_last_error(ctx));
    FAILS(ctx, LMOE_ERR_FORMAT, lmoe_peft_layer_desc(p, 0, 4, 32, 8, &d));
    CHECK(strstr(lmoe_context_last_error(ctx), "don't fit in = 32, out = 8"), "%s", lmoe_context_last_error(ctx));
    /* a rank over the pool's max_rank is refused by the pool, and the slot stays free */
    lmoe_layer_config lc;
    lmoe_layer_config_init(&lc);
    lc.num_experts = 4, lc.hidden = 16, lc.intermediate = 8;
    lmoe_layer *layer;
    OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
    lmoe_pool_config pc;
    lmoe_pool_config_init(&pc);
    pc.max_rank = 2;
    lmoe_pool *pool;
    OK(ctx, lmoe_pool_create(layer, &pc, &pool));
    FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_peft(pool, "big", p, 0, NULL));
    CHECK(lmoe_pool_find(pool, "big", NULL) == LMOE_ERR_NOT_FOUND, "refused adapter not loaded");
    lmoe_pool_release(pool);
    lmoe_layer_release(layer);
    lmoe_peft_close(p);
  }
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_peft_open(ctx, "/nonexistent-dir-for-test", &(lmoe_peft *){NULL}));
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s CORPUS_DIR WORK_DIR\n", argv[0]);
    return 2;
  }
  work_dir = argv[2];
  mkdir(work_dir, 0777);
  test_seed("test_peft");
  lmoe_context *ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  const tcase cases[] = {
      {"qwen per-expert all, bf16", LMOE_FAMILY_QWEN, LMOE_PEFT_PER_EXPERT, 7, 8, 0, LMOE_DTYPE_BF16, 1, 0, 16},
      {"qwen per-expert gate+down, f32, rslora", LMOE_FAMILY_QWEN, LMOE_PEFT_PER_EXPERT, 5, 4, 1, LMOE_DTYPE_F32, 1, 0, 8},
      {"qwen per-expert up only, layer 2 of 3", LMOE_FAMILY_QWEN, LMOE_PEFT_PER_EXPERT, 2, 6, 0, LMOE_DTYPE_BF16, 3, 2, 12},
      {"mixtral per-expert all, f16", LMOE_FAMILY_MIXTRAL, LMOE_PEFT_PER_EXPERT, 7, 8, 0, LMOE_DTYPE_F16, 1, 0, 16},
      {"mixtral per-expert w1+w3, layer 1 of 2", LMOE_FAMILY_MIXTRAL, LMOE_PEFT_PER_EXPERT, 3, 4, 1, LMOE_DTYPE_BF16, 2, 1, 4},
      {"fused gate_up+down, bf16", LMOE_FAMILY_QWEN, LMOE_PEFT_FUSED, 7, 8, 0, LMOE_DTYPE_BF16, 1, 0, 16},
      {"fused gate_up only, f32, rslora", LMOE_FAMILY_QWEN, LMOE_PEFT_FUSED, 3, 4, 1, LMOE_DTYPE_F32, 1, 0, 8},
      {"fused down only, layer 1 of 2", LMOE_FAMILY_QWEN, LMOE_PEFT_FUSED, 4, 8, 0, LMOE_DTYPE_BF16, 2, 1, 32},
      {"qwen rank_pattern on one expert's down", LMOE_FAMILY_QWEN, LMOE_PEFT_PER_EXPERT, 7, 8, 0, LMOE_DTYPE_BF16, 1, 0, 16,
       "experts.1.down_proj", 4, NULL, 0},
      {"qwen alpha_pattern on up_proj, rslora", LMOE_FAMILY_QWEN, LMOE_PEFT_PER_EXPERT, 7, 8, 1, LMOE_DTYPE_BF16, 1, 0, 16,
       NULL, 0, "up_proj", 64},
      {"mixtral rank+alpha patterns", LMOE_FAMILY_MIXTRAL, LMOE_PEFT_PER_EXPERT, 7, 4, 0, LMOE_DTYPE_F32, 1, 0, 8,
       "experts.0.w2", 12, "w1", 2},
      {"fused rank_pattern on gate_up_proj", LMOE_FAMILY_QWEN, LMOE_PEFT_FUSED, 7, 4, 0, LMOE_DTYPE_BF16, 1, 0, 8,
       "gate_up_proj", 8, "down_proj", 24},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(ctx, &cases[i], (int)i);
  test_refusals(ctx);
  lmoe_context_release(ctx);
  return test_summary();
}
