/* Checkpoint loading: writes a synthetic checkpoint of qwen3-30b-a3b-sized MoE layers
   (E 128, H 2048, I 768, bf16: 1.21 GB of experts per layer) with the library's own
   writer, then times lmoe_checkpoint_load_layer from the page cache into a new layer
   each time (fresh memory, as when a model is loaded).

     bench_load write DIR [layers] [per-expert|fused]   one shard per layer + index
     bench_load load DIR [reps] [cpu|cuda]              every layer, reps times

   `load` runs in its own process so its peak resident memory (ru_maxrss, taken before
   the reference copies) is the load's alone; it also reports the machine's memcpy and page-cache read bandwidth
   for scale, and the host waits the loads made. */
#include "bench_common.h"
#include "loramoe.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

enum { E = 128, H = 2048, I = 768 };

static uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void entry(lmoe_tensor_entry *t, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2,
                  const void *data) {
  memset(t, 0, sizeof *t);
  t->name = name;
  t->dtype = LMOE_DTYPE_BF16;
  t->ndim = ndim;
  t->shape[0] = d0, t->shape[1] = d1, t->shape[2] = d2;
  t->data = data;
}

static int fail(const char *what, lmoe_context *ctx, lmoe_status st) {
  fprintf(stderr, "%s: %s: %s\n", what, lmoe_status_string(st), ctx ? lmoe_context_last_error(ctx) : "");
  return 1;
}

static lmoe_context *make_ctx(int32_t backend) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = backend;
  lmoe_context *ctx = NULL;
  char err[256];
  if (lmoe_context_create(&cfg, &ctx, err, sizeof err)) fprintf(stderr, "context: %s\n", err);
  return ctx;
}

static int write_ckpt(const char *dir, int layers, int fused) {
  lmoe_context *ctx = make_ctx(LMOE_BACKEND_CPU);
  if (!ctx) return 1;
  if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
    perror(dir);
    return 1;
  }
  /* One random block per shape, shared by every expert: the reader's cost does not
     depend on the values. */
  size_t n13 = fused ? (size_t)E * 2 * I * H : (size_t)I * H, n2 = fused ? (size_t)E * H * I : (size_t)H * I;
  uint16_t *w13 = malloc(n13 * 2), *w2 = malloc(n2 * 2), *router = malloc((size_t)E * H * 2);
  if (!w13 || !w2 || !router) return 1;
  for (size_t i = 0; i < n13; i++) w13[i] = (uint16_t)(0x3c00 + (mix(i) & 0x3ff) - 0x200);
  for (size_t i = 0; i < n2; i++) w2[i] = (uint16_t)(0x3c00 + (mix(i + 7) & 0x3ff) - 0x200);
  for (size_t i = 0; i < (size_t)E * H; i++) router[i] = (uint16_t)(0x3c00 + (mix(i + 9) & 0x3ff) - 0x200);
  int nt = fused ? 3 : 3 * E + 1;
  lmoe_tensor_entry *t = calloc((size_t)nt, sizeof *t);
  char (*names)[128] = calloc((size_t)nt, sizeof *names);
  FILE *idx = NULL;
  char path[4096];
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  if (!t || !names || !(idx = fopen(path, "w"))) return 1;
  fprintf(idx, "{\"metadata\": {}, \"weight_map\": {");
  for (int L = 0; L < layers; L++) {
    int k = 0;
    snprintf(names[k], sizeof names[k], "model.layers.%d.mlp.gate.weight", L);
    entry(&t[k], names[k], 2, E, H, 0, router), k++;
    if (fused) {
      snprintf(names[k], sizeof names[k], "model.layers.%d.mlp.experts.gate_up_proj", L);
      entry(&t[k], names[k], 3, E, 2 * I, H, w13), k++;
      snprintf(names[k], sizeof names[k], "model.layers.%d.mlp.experts.down_proj", L);
      entry(&t[k], names[k], 3, E, H, I, w2), k++;
    } else {
      static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
      for (int e = 0; e < E; e++)
        for (int p = 0; p < 3; p++) {
          snprintf(names[k], sizeof names[k], "model.layers.%d.mlp.experts.%d.%s.weight", L, e, pn[p]);
          if (p < 2) entry(&t[k], names[k], 2, I, H, 0, w13);
          else entry(&t[k], names[k], 2, H, I, 0, w2);
          k++;
        }
    }
    char shard[64];
    snprintf(shard, sizeof shard, "model-%05d.safetensors", L);
    snprintf(path, sizeof path, "%s/%s", dir, shard);
    double t0 = now_s();
    lmoe_status st = lmoe_safetensors_write(ctx, path, k, t, 0, NULL, NULL);
    if (st) return fail("write", ctx, st);
    fprintf(stderr, "wrote %s (%d tensors) in %.1f s\n", shard, k, now_s() - t0);
    for (int i = 0; i < k; i++) fprintf(idx, "%s\"%s\": \"%s\"", L || i ? ", " : "", names[i], shard);
  }
  fprintf(idx, "}}\n");
  fclose(idx);
  free(t), free(names), free(w13), free(w2), free(router);
  lmoe_context_release(ctx);
  return 0;
}

/* memcpy bandwidth of one 1 GiB copy (best of 3), and the page cache's: read() of a
   shard into one buffer (best of 3). */
static void reference_bandwidths(const char *dir, double *copy_gbs, double *read_gbs) {
  size_t n = (size_t)1 << 30;
  char *a = malloc(n), *b = malloc(n);
  *copy_gbs = *read_gbs = 0;
  if (!a || !b) return;
  memset(a, 1, n), memset(b, 2, n);
  for (int r = 0; r < 3; r++) {
    double t0 = now_s();
    memcpy(b, a, n);
    double gbs = (double)n / (now_s() - t0) / 1e9;
    if (gbs > *copy_gbs) *copy_gbs = gbs;
  }
  free(b);
  char path[4096];
  snprintf(path, sizeof path, "%s/model-00000.safetensors", dir);
  for (int r = 0; r < 3; r++) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) break;
    double t0 = now_s();
    size_t total = 0;
    for (;;) {
      ssize_t got = read(fd, a, n);
      if (got <= 0) break;
      total += (size_t)got;
    }
    double gbs = (double)total / (now_s() - t0) / 1e9;
    if (gbs > *read_gbs) *read_gbs = gbs;
    close(fd);
  }
  free(a);
}

static int load_ckpt(const char *dir, int reps, int32_t backend) {
  struct rusage ru0;
  getrusage(RUSAGE_SELF, &ru0);
  lmoe_context *ctx = make_ctx(backend);
  if (!ctx) return 1;
  lmoe_checkpoint *ck = NULL;
  lmoe_status st = lmoe_checkpoint_open(ctx, dir, &ck);
  if (st) return fail("open", ctx, st);
  int layers = 0;
  lmoe_checkpoint_layer_info info;
  lmoe_checkpoint_layer_info_init(&info);
  while (lmoe_checkpoint_get_layer_info(ck, layers, &info) == LMOE_OK) layers++;
  if (!layers) return fail("no layers", ctx, LMOE_ERR_NOT_FOUND);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = info.num_experts, lc.hidden = info.hidden, lc.intermediate = info.intermediate;
  lc.max_tokens = 256;
  double bytes = 2.0 * 3 * lc.num_experts * (double)lc.hidden * lc.intermediate;
  int n = reps * layers;
  double *t = malloc(sizeof(double) * (size_t)n);
  lmoe_counters c0, c1;
  lmoe_context_counters(ctx, &c0);
  for (int r = 0; r < reps; r++)
    for (int L = 0; L < layers; L++) {
      /* a new layer each time, as a model load makes them: its memory is fresh */
      lmoe_layer *layer = NULL;
      if ((st = lmoe_layer_create(ctx, &lc, &layer))) return fail("layer", ctx, st);
      double t0 = now_s();
      st = lmoe_checkpoint_load_layer(ck, L, layer, NULL);
      if (!st) st = lmoe_context_synchronize(ctx, NULL);
      t[r * layers + L] = now_s() - t0;
      lmoe_layer_release(layer);
      if (st) return fail("load", ctx, st);
    }
  lmoe_context_counters(ctx, &c1);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru); /* before the reference copies below, which take 2 GB */
  double copy_gbs, read_gbs;
  reference_bandwidths(dir, &copy_gbs, &read_gbs);
  double med = median(t, n); /* sorts t */
  printf("checkpoint %s, %d layer(s) x %d, %s backend, %.2f GB of experts per layer\n", dir, layers, reps,
         backend == LMOE_BACKEND_CUDA ? "cuda" : "cpu", bytes / 1e9);
  printf("load_layer: median %.3f s (min %.3f, max %.3f) = %.2f GB/s (%.2f..%.2f)\n", med, t[0], t[n - 1],
         bytes / med / 1e9, bytes / t[n - 1] / 1e9, bytes / t[0] / 1e9);
  printf("host waits per layer: %.1f, uploads per layer: %.1f (synchronize included)\n",
         (double)(c1.host_waits - c0.host_waits) / n, (double)(c1.uploads - c0.uploads) / n);
  printf("peak resident memory: %.0f MB (%.0f MB before the context; the layer's weights are %.0f MB%s)\n",
         ru.ru_maxrss / 1024.0, ru0.ru_maxrss / 1024.0, bytes / 1048576.0,
         backend == LMOE_BACKEND_CUDA ? " on the device" : ", in host memory");
  printf("for scale: memcpy %.1f GB/s, read() of a shard from the page cache %.1f GB/s\n", copy_gbs, read_gbs);
  free(t);
  lmoe_checkpoint_close(ck);
  lmoe_context_release(ctx);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 3 && !strcmp(argv[1], "write"))
    return write_ckpt(argv[2], argc > 3 ? atoi(argv[3]) : 2, argc > 4 && !strcmp(argv[4], "fused"));
  if (argc >= 3 && !strcmp(argv[1], "load"))
    return load_ckpt(argv[2], argc > 3 ? atoi(argv[3]) : 3,
                     argc > 4 && !strcmp(argv[4], "cuda") ? LMOE_BACKEND_CUDA : LMOE_BACKEND_CPU);
  fprintf(stderr,
          "usage: bench_load write DIR [layers] [per-expert|fused]\n"
          "       bench_load load DIR [reps] [cpu|cuda]\n");
  return 2;
}
