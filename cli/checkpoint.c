/* `loramoe checkpoint quantize SRC DST`: a bf16 checkpoint to FP8 e4m3 in the HF format
   (lmoe_checkpoint_quantize_fp8; docs/formats.md, "FP8"), and `loramoe checkpoint
   info PATH [LAYER]`: a layer's family, shapes and weight dtype. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loramoe.h"

int lmoe_cli_checkpoint(int argc, char **argv);
lmoe_context *lmoe_cli_cpu_context(void); /* adapter.c */

static const char *checkpoint_usage =
    "usage:\n"
    "  loramoe checkpoint quantize SRC DST   expert weights of SRC (a .safetensors, an index or a\n"
    "                                        directory) to FP8 e4m3 with 128x128 block scales, in one\n"
    "                                        .safetensors DST (weight + weight_scale_inv, as HF publishes)\n"
    "  loramoe checkpoint info PATH [LAYER]  family, E, H, I, router and weight dtype of a layer [0]\n";

int lmoe_cli_checkpoint(int argc, char **argv) {
  bool quantize = argc == 4 && !strcmp(argv[1], "quantize");
  bool info = (argc == 3 || argc == 4) && !strcmp(argv[1], "info");
  if (!quantize && !info) {
    fputs(checkpoint_usage, argc >= 2 && !strcmp(argv[1], "--help") ? stdout : stderr);
    return argc >= 2 && !strcmp(argv[1], "--help") ? 0 : 2;
  }
  lmoe_context *ctx = lmoe_cli_cpu_context();
  if (!ctx) return 1;
  int rc = 1;
  if (quantize) {
    if (lmoe_checkpoint_quantize_fp8(ctx, argv[2], argv[3]) != LMOE_OK) {
      fprintf(stderr, "loramoe: %s\n", lmoe_context_last_error(ctx));
    } else {
      printf("wrote %s (FP8 e4m3 experts, float32 scale per 128x128 block)\n", argv[3]);
      rc = 0;
    }
  } else {
    char *end = NULL;
    long layer = argc == 4 ? strtol(argv[3], &end, 10) : 0;
    lmoe_checkpoint *ck = NULL;
    lmoe_checkpoint_layer_info li;
    lmoe_checkpoint_layer_info_init(&li);
    if (argc == 4 && (!*argv[3] || *end || layer < 0 || layer > 1 << 30)) {
      fprintf(stderr, "loramoe: LAYER must be a non-negative integer, got '%s'\n", argv[3]);
      rc = 2;
    } else if (lmoe_checkpoint_open(ctx, argv[2], &ck) != LMOE_OK ||
               lmoe_checkpoint_get_layer_info(ck, (int32_t)layer, &li) != LMOE_OK) {
      fprintf(stderr, "loramoe: %s\n", lmoe_context_last_error(ctx));
    } else {
      static const char *fam[] = {"unknown", "qwen", "mixtral"};
      printf("layer %ld: family %s, experts %d, hidden %d, intermediate %d, router %s, weights %s\n", layer,
             li.family >= 0 && li.family <= 2 ? fam[li.family] : "?", li.num_experts, li.hidden, li.intermediate,
             li.has_router ? "yes" : "no", lmoe_dtype_name(li.weight_dtype));
      rc = 0;
    }
    lmoe_checkpoint_close(ck);
  }
  lmoe_context_release(ctx);
  return rc;
}
