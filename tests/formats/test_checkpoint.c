/* Base weights from checkpoints: Qwen and Mixtral per-expert names, fused experts,
   one file and shards with an index; the layer's weights and the router read back
   equal what was written (bf16 in the file: exact). And the refusals. */
#include "test_util.h"

#include <sys/stat.h>

static const char *work_dir;

typedef struct written {
  int E, H, I;
  float *w13, *w2, *router; /* [E,2I,H], [E,H,I], [E,H]: values exact in bf16 */
} written;

static float bf16_exact(void) { return (float)test_randint(-128, 127) / 64.0f; }

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

/* Writes layer `L` (and a decoy layer L+1 with other values) into one file or two
   shards plus an index. fused: experts.gate_up_proj / down_proj. */
static void write_checkpoint(lmoe_context *ctx, const char *dir, int family, int fused, int sharded, int L,
                             written *w) {
  int E = w->E, H = w->H, I = w->I;
  mkdir(dir, 0777);
  const char *block = family == LMOE_FAMILY_QWEN ? "mlp" : "block_sparse_moe";
  const char *gn = family == LMOE_FAMILY_QWEN ? "gate_proj" : "w1", *un = family == LMOE_FAMILY_QWEN ? "up_proj" : "w3",
             *dn = family == LMOE_FAMILY_QWEN ? "down_proj" : "w2";
  int cap = 2 * (3 * E + 3) + 2;
  lmoe_tensor_entry *e = calloc((size_t)cap, sizeof *e);
  char (*names)[160] = calloc((size_t)cap, sizeof *names);
  uint16_t **bufs = calloc((size_t)cap, sizeof *bufs);
  int n = 0;
#define ADD(nd, d0, d1, d2, src)                                         \
  do {                                                                   \
    long cnt = (long)(d0) * (d1) * ((nd) == 3 ? (d2) : 1);               \
    bufs[n] = malloc((size_t)cnt * 2);                                   \
    for (long q = 0; q < cnt; q++) bufs[n][q] = to_bf16((src)[q]);       \
    e[n].name = names[n];                                                \
    e[n].dtype = LMOE_DTYPE_BF16;                                        \
    e[n].ndim = (nd);                                                    \
    e[n].shape[0] = (d0), e[n].shape[1] = (d1), e[n].shape[2] = (d2);    \
    e[n].data = bufs[n];                                                 \
    n++;                                                                 \
  } while (0)
  for (int layer = L; layer <= L + 1; layer++) {
    float *w13 = w->w13, *w2 = w->w2, *router = w->router;
    if (layer != L) { /* decoy: a different layer's values must not be picked up */
      w13 = malloc((size_t)E * 2 * I * H * sizeof(float));
      w2 = malloc((size_t)E * H * I * sizeof(float));
      router = malloc((size_t)E * H * sizeof(float));
      for (long q = 0; q < (long)E * 2 * I * H; q++) w13[q] = 9.0f;
      for (long q = 0; q < (long)E * H * I; q++) w2[q] = 9.0f;
      for (long q = 0; q < (long)E * H; q++) router[q] = 9.0f;
    }
    snprintf(names[n], 160, "model.layers.%d.%s.gate.weight", layer, block);
    ADD(2, E, H, 1, router);
    if (fused) {
      snprintf(names[n], 160, "model.layers.%d.%s.experts.gate_up_proj", layer, block);
      ADD(3, E, 2 * I, H, w13);
      snprintf(names[n], 160, "model.layers.%d.%s.experts.down_proj", layer, block);
      ADD(3, E, H, I, w2);
    } else {
      for (int x = 0; x < E; x++) {
        snprintf(names[n], 160, "model.layers.%d.%s.experts.%d.%s.weight", layer, block, x, gn);
        ADD(2, I, H, 1, w13 + (long)x * 2 * I * H);
        snprintf(names[n], 160, "model.layers.%d.%s.experts.%d.%s.weight", layer, block, x, un);
        ADD(2, I, H, 1, w13 + (long)x * 2 * I * H + (long)I * H);
        snprintf(names[n], 160, "model.layers.%d.%s.experts.%d.%s.weight", layer, block, x, dn);
        ADD(2, H, I, 1, w2 + (long)x * H * I);
      }
    }
    if (layer != L) {
      free(w13);
      free(w2);
      free(router);
    }
  }
#undef ADD
  char path[4096];
  if (!sharded) {
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    OK(ctx, lmoe_safetensors_write(ctx, path, n, e, 0, NULL, NULL));
  } else {
    /* tensors alternate between two shards, so one layer spans both */
    lmoe_tensor_entry *s0 = calloc((size_t)n, sizeof *s0), *s1 = calloc((size_t)n, sizeof *s1);
    int n0 = 0, n1 = 0;
    char idx[65536] = "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {";
    for (int i = 0; i < n; i++) {
      if (i % 2) s1[n1++] = e[i];
      else s0[n0++] = e[i];
      snprintf(idx + strlen(idx), sizeof idx - strlen(idx), "%s\"%s\": \"model-0000%d-of-00002.safetensors\"",
               i ? ", " : "", e[i].name, 1 + i % 2);
    }
    strcat(idx, "}}");
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", dir);
    OK(ctx, lmoe_safetensors_write(ctx, path, n0, s0, 0, NULL, NULL));
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    OK(ctx, lmoe_safetensors_write(ctx, path, n1, s1, 0, NULL, NULL));
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(path, "w");
    fputs(idx, f);
    fclose(f);
    free(s0);
    free(s1);
  }
  for (int i = 0; i < n; i++) free(bufs[i]);
  free(bufs);
  free(names);
  free(e);
}

static void run(lmoe_context *ctx, int family, int fused, int sharded, int k) {
  written w = {test_randint(2, 5), 8 * test_randint(1, 4), 8 * test_randint(1, 3), 0, 0, 0};
  long n13 = (long)w.E * 2 * w.I * w.H, n2 = (long)w.E * w.H * w.I, nr = (long)w.E * w.H;
  w.w13 = malloc((size_t)n13 * sizeof(float));
  w.w2 = malloc((size_t)n2 * sizeof(float));
  w.router = malloc((size_t)nr * sizeof(float));
  for (long q = 0; q < n13; q++) w.w13[q] = bf16_exact();
  for (long q = 0; q < n2; q++) w.w2[q] = bf16_exact();
  for (long q = 0; q < nr; q++) w.router[q] = bf16_exact();
  int L = test_randint(0, 3);
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/ck%d", work_dir, k);
  write_checkpoint(ctx, dir, family, fused, sharded, L, &w);

  lmoe_checkpoint *ck;
  OK(ctx, lmoe_checkpoint_open(ctx, dir, &ck));
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  OK(ctx, lmoe_checkpoint_get_layer_info(ck, L, &info));
  CHECK(info.family == family && info.num_experts == w.E && info.hidden == w.H && info.intermediate == w.I &&
            info.has_router,
        "case %d: info family %d E %d H %d I %d", k, info.family, info.num_experts, info.hidden, info.intermediate);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = w.E, lc.hidden = w.H, lc.intermediate = w.I, lc.top_k = 1;
  lmoe_layer *layer;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  lmoe_buffer *router = NULL;
  OK(ctx, lmoe_checkpoint_load_layer(ck, L, layer, &router));
  lmoe_buffer *b13, *b2;
  OK(ctx, lmoe_layer_weights(layer, 0, &b13));
  OK(ctx, lmoe_layer_weights(layer, 1, &b2));
  float *g13 = malloc((size_t)n13 * sizeof(float)), *g2 = malloc((size_t)n2 * sizeof(float)),
        *gr = malloc((size_t)nr * sizeof(float));
  OK(ctx, lmoe_buffer_read(b13, 0, g13, LMOE_DTYPE_F32, n13));
  OK(ctx, lmoe_buffer_read(b2, 0, g2, LMOE_DTYPE_F32, n2));
  OK(ctx, lmoe_buffer_read(router, 0, gr, LMOE_DTYPE_F32, nr));
  CHECK(!memcmp(g13, w.w13, (size_t)n13 * 4) && !memcmp(g2, w.w2, (size_t)n2 * 4) &&
            !memcmp(gr, w.router, (size_t)nr * 4),
        "case %d (family %d fused %d sharded %d): weights read back as written", k, family, fused, sharded);
  lmoe_buffer_desc rd;
  lmoe_buffer_describe(router, &rd);
  CHECK(rd.ndim == 2 && rd.shape[0] == w.E && rd.shape[1] == w.H && rd.dtype == LMOE_DTYPE_F32, "router [E, H] f32");
  /* a layer of other shapes and a missing layer are refused */
  lmoe_layer_config lc2 = lc;
  lc2.hidden = w.H + 8;
  lmoe_layer *other;
  OK(ctx, lmoe_layer_create(ctx, &lc2, &other));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_checkpoint_load_layer(ck, L, other, NULL));
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_checkpoint_get_layer_info(ck, L + 7, &info));
  lmoe_layer_release(other);
  lmoe_buffer_release(router);
  lmoe_layer_release(layer);
  lmoe_checkpoint_close(ck);
  free(g13);
  free(g2);
  free(gr);
  free(w.w13);
  free(w.w2);
  free(w.router);
}

static void test_bad_index(lmoe_context *ctx) {
  char dir[4096], path[4200];
  snprintf(dir, sizeof dir, "%s/badindex", work_dir);
  mkdir(dir, 0777);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  FILE *f = fopen(path, "w");
  fputs("{\"weight_map\": {\"a\": \"../../etc/passwd.safetensors\"}}", f);
  fclose(f);
  lmoe_checkpoint *ck = NULL;
  FAILS(ctx, LMOE_ERR_FORMAT, lmoe_checkpoint_open(ctx, dir, &ck));
  CHECK(strstr(lmoe_context_last_error(ctx), "not a .safetensors file next to the index"), "%s",
        lmoe_context_last_error(ctx));
  f = fopen(path, "w");
  fputs("{\"weight_map\": {\"a\": \"missing.safetensors\"}}", f);
  fclose(f);
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_checkpoint_open(ctx, dir, &ck));
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_checkpoint_open(ctx, work_dir, &ck));
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  work_dir = argv[2];
  mkdir(work_dir, 0777);
  test_seed("test_checkpoint");
  lmoe_context *ctx = test_cpu_context(1, LMOE_GUARD_HOST);
  int k = 0;
  for (int family = 1; family <= 2; family++)
    for (int fused = 0; fused <= 1; fused++)
      for (int sharded = 0; sharded <= 1; sharded++) run(ctx, family, fused, sharded, k++);
  test_bad_index(ctx);
  lmoe_context_release(ctx);
  return test_summary();
}
