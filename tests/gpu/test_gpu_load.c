/* Checkpoint loading on the cuda backend: weights streamed from the file through the
   context's two pinned staging buffers, one stream-ordered copy per chunk, must land
   bit for bit (per-expert and fused tensors, bf16 read as is and f32 converted), with
   exactly one upload per chunk of each weight array. The staging chunk is made small
   (and not a multiple of a part) so parts straddle chunks and both buffers turn over
   many times: refilling a buffer before its copy ran would show as wrong weights on
   the simulated device, which reads pinned memory when the copy runs. */
#define _GNU_SOURCE /* mkdtemp */
#include "gpu_common.h"
#include "internal.h"

#include <unistd.h>

enum { E = 6, H = 96, I = 64 };

static char dir[64];

/* Writes layer 0 with every value of w13 [E, 2I, H] and w2 [E, H, I] (bf16-exact floats)
   as tensors of `dtype`, per expert or fused. */
static void write_ckpt(const char *path, lmoe_context *ctx, const float *w13, const float *w2, int32_t dtype,
                       int fused) {
  size_t es = lmoe_dtype_size(dtype);
  uint8_t *d13 = malloc((size_t)E * 2 * I * H * es), *d2 = malloc((size_t)E * H * I * es);
  for (size_t i = 0; i < (size_t)E * 2 * I * H; i++) {
    if (dtype == LMOE_DTYPE_F32) memcpy(d13 + i * 4, &w13[i], 4);
    else {
      uint32_t u;
      memcpy(&u, &w13[i], 4);
      uint16_t h = (uint16_t)(u >> 16);
      memcpy(d13 + i * 2, &h, 2);
    }
  }
  for (size_t i = 0; i < (size_t)E * H * I; i++) {
    if (dtype == LMOE_DTYPE_F32) memcpy(d2 + i * 4, &w2[i], 4);
    else {
      uint32_t u;
      memcpy(&u, &w2[i], 4);
      uint16_t h = (uint16_t)(u >> 16);
      memcpy(d2 + i * 2, &h, 2);
    }
  }
  char names[3 * E][96];
  lmoe_tensor_entry t[3 * E];
  memset(t, 0, sizeof t);
  int n = 0;
  if (fused) {
    snprintf(names[0], sizeof names[0], "model.layers.0.mlp.experts.gate_up_proj");
    snprintf(names[1], sizeof names[1], "model.layers.0.mlp.experts.down_proj");
    t[0] = (lmoe_tensor_entry){names[0], dtype, 3, {E, 2 * I, H}, d13};
    t[1] = (lmoe_tensor_entry){names[1], dtype, 3, {E, H, I}, d2};
    n = 2;
  } else {
    static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
    /* down first in the file: the loader's order is the layer's, not the file's */
    for (int p = 2; p >= 0; p--)
      for (int e = 0; e < E; e++, n++) {
        snprintf(names[n], sizeof names[n], "model.layers.0.mlp.experts.%d.%s.weight", e, pn[p]);
        const uint8_t *src = p == 2 ? d2 + (size_t)e * H * I * es : d13 + ((size_t)e * 2 + p) * I * H * es;
        t[n] = (lmoe_tensor_entry){names[n], dtype, 2, {p == 2 ? H : I, p == 2 ? I : H}, src};
      }
  }
  OK(ctx, lmoe_safetensors_write(ctx, path, n, t, 0, NULL, NULL));
  free(d13);
  free(d2);
}

static uint64_t chunks(size_t bytes, size_t chunk) { return (bytes + chunk - 1) / chunk; }

static void check_load(lmoe_context *ctx, size_t chunk, int32_t dtype, int fused, const float *w13,
                       const float *w2) {
  char path[128];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  write_ckpt(path, ctx, w13, w2, dtype, fused);
  lmoe_layer *l = test_layer(ctx, E, H, I, 2, 16, 0.5f); /* overwritten by the load */
  lmoe_checkpoint *ck = NULL;
  OK(ctx, lmoe_checkpoint_open(ctx, path, &ck));
  ctx->staging.chunk = chunk; /* takes effect when the staging is made */
  lmoe_counters c0, c1;
  OK(ctx, lmoe_context_counters(ctx, &c0));
  OK(ctx, lmoe_checkpoint_load_layer(ck, 0, l, NULL));
  OK(ctx, lmoe_context_counters(ctx, &c1));
  size_t b13 = (size_t)E * 2 * I * H * 2, b2 = (size_t)E * H * I * 2;
  uint64_t want = chunks(b13, chunk) + chunks(b2, chunk);
  CHECK(c1.uploads - c0.uploads == want && c1.bytes_uploaded - c0.bytes_uploaded == b13 + b2,
        "chunk %zu, %s %s: %llu uploads of %llu bytes, want %llu of %zu", chunk, lmoe_dtype_name(dtype),
        fused ? "fused" : "per expert", (unsigned long long)(c1.uploads - c0.uploads),
        (unsigned long long)(c1.bytes_uploaded - c0.bytes_uploaded), (unsigned long long)want, b13 + b2);
  /* at most one wait per chunk (the host outran the copies) and one at the end; the
     old loader made three blocking uploads per expert */
  CHECK(c1.host_waits - c0.host_waits <= want + 2, "chunk %zu: %llu host waits for %llu uploads", chunk,
        (unsigned long long)(c1.host_waits - c0.host_waits), (unsigned long long)want);
  lmoe_buffer *b;
  float *got = malloc(sizeof(float) * (size_t)E * 2 * I * H);
  OK(ctx, lmoe_layer_weights(l, 0, &b));
  OK(ctx, lmoe_buffer_read(b, 0, got, LMOE_DTYPE_F32, (int64_t)E * 2 * I * H));
  size_t bad = 0;
  for (size_t i = 0; i < (size_t)E * 2 * I * H; i++) bad += got[i] != w13[i];
  OK(ctx, lmoe_layer_weights(l, 1, &b));
  OK(ctx, lmoe_buffer_read(b, 0, got, LMOE_DTYPE_F32, (int64_t)E * H * I));
  for (size_t i = 0; i < (size_t)E * H * I; i++) bad += got[i] != w2[i];
  CHECK(bad == 0, "chunk %zu, %s %s: %zu weights differ from the file", chunk, lmoe_dtype_name(dtype),
        fused ? "fused" : "per expert", bad);
  free(got);
  lmoe_checkpoint_close(ck);
  lmoe_layer_release(l);
  unlink(path);
}

int main(void) {
  if (!test_need_gpu("test_gpu_load")) return 0;
  snprintf(dir, sizeof dir, "lmoe_load_XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  float *w13 = malloc(sizeof(float) * (size_t)E * 2 * I * H), *w2 = malloc(sizeof(float) * (size_t)E * H * I);
  for (size_t i = 0; i < (size_t)E * 2 * I * H; i++) w13[i] = bfr(urand(-1, 1));
  for (size_t i = 0; i < (size_t)E * H * I; i++) w2[i] = bfr(urand(-1, 1));
  /* one context per chunk size: the staging is made once per context, at its first use */
  const size_t sizes[2] = {5000 * 2, LMOE_STAGING_CHUNK};
  for (int c = 0; c < 2; c++) {
    lmoe_context_config cfg;
    lmoe_context_config_init(&cfg);
    cfg.backend = LMOE_BACKEND_CUDA;
    lmoe_context *ctx = NULL;
    char err[256];
    if (lmoe_context_create(&cfg, &ctx, err, sizeof err)) {
      fprintf(stderr, "context: %s\n", err);
      return 1;
    }
    for (int fused = 0; fused < 2; fused++) {
      check_load(ctx, sizes[c], LMOE_DTYPE_BF16, fused, w13, w2);
      check_load(ctx, sizes[c], LMOE_DTYPE_F32, fused, w13, w2);
    }
    lmoe_context_release(ctx);
  }
  free(w13);
  free(w2);
  rmdir(dir);
  return test_summary();
}
