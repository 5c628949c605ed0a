/* libFuzzer target for the file readers. An input is either
     - a safetensors file (anything not starting with '{'): opened from memory, every
       readable tensor read; or
     - a PEFT adapter: adapter_config.json text, a NUL byte, then the bytes of
       adapter_model.safetensors: opened, inspected, and every layer mapped for the
       layer shapes its tensors suggest.
   Failures are expected; crashes, leaks and out-of-bounds reads are the bugs. */
#include "files.h"

#include <stdlib.h>
#include <string.h>

static lmoe_context *ctx;

static void fuzz_safetensors(const uint8_t *data, size_t size) {
  lmoe_safetensors *st = NULL;
  if (lmoe_safetensors_open_memory(ctx, data, size, "fuzz", &st) != LMOE_OK) return;
  for (int32_t i = 0; i < lmoe_safetensors_count(st); i++) {
    lmoe_tensor_info ti;
    if (lmoe_safetensors_tensor(st, i, &ti) != LMOE_OK || ti.numel > (1 << 22)) continue;
    float *f = malloc((size_t)(ti.numel ? ti.numel : 1) * sizeof(float));
    if (f) lmoe_safetensors_read(st, i, f, LMOE_DTYPE_F32, ti.numel);
    if (f && ti.dtype == LMOE_DTYPE_F8_E4M3) lmoe_safetensors_read(st, i, f, LMOE_DTYPE_F8_E4M3, ti.numel); /* raw codes */
    free(f);
  }
  for (int32_t i = 0; i < lmoe_safetensors_metadata_count(st); i++) {
    const char *k, *v;
    lmoe_safetensors_metadata(st, i, &k, &v);
  }
  lmoe_safetensors_find(st, "a", NULL);
  lmoe_safetensors_close(st);
}

static void fuzz_peft(const uint8_t *data, size_t size) {
  const uint8_t *nul = memchr(data, 0, size);
  if (!nul) return;
  size_t cl = (size_t)(nul - data);
  lmoe_peft *p = NULL;
  if (lmoe_peft_open_parts(ctx, (const char *)data, cl, nul + 1, size - cl - 1, &p) != LMOE_OK) return;
  lmoe_peft_info info;
  lmoe_peft_info_init(&info);
  lmoe_peft_get_info(p, &info);
  char text[512];
  size_t need;
  lmoe_peft_inspect(p, text, sizeof text, &need);
  int32_t layers[4];
  int32_t nl = lmoe_peft_layers(p, layers, 4);
  /* Shapes to try: the layer a synthetic seed was made for, and the expert count the
     adapter implies with small hidden/intermediate sizes. */
  static const int32_t shapes[][3] = {{4, 16, 8}, {2, 8, 4}, {0, 16, 8}, {0, 8, 16}};
  for (int32_t l = 0; l < nl; l++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      int32_t E = shapes[s][0] ? shapes[s][0] : info.num_experts;
      if (E < 1 || E > 64) continue;
      lmoe_adapter_desc d;
      lmoe_adapter_desc_init(&d);
      lmoe_peft_layer_desc(p, layers[l], E, shapes[s][1], shapes[s][2], &d);
    }
  lmoe_peft_close(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!ctx) {
    lmoe_context_config cfg;
    lmoe_context_config_init(&cfg);
    cfg.backend = LMOE_BACKEND_CPU;
    cfg.threads = 1;
    if (lmoe_context_create(&cfg, &ctx, NULL, 0) != LMOE_OK) abort();
  }
  if (size > 0 && data[0] == '{')
    fuzz_peft(data, size);
  else
    fuzz_safetensors(data, size);
  return 0;
}
