/* `loramoe adapter inspect PATH` and `loramoe adapter make DIR [options]`: the PEFT
   adapter tools of the command line, over lmoe_peft_inspect and
   lmoe_peft_write_synthetic (docs/formats.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loramoe.h"

int lmoe_cli_adapter(int argc, char **argv);
lmoe_context *lmoe_cli_cpu_context(void);

static const char *adapter_usage =
    "usage:\n"
    "  loramoe adapter inspect PATH     summary of a PEFT adapter (its directory or adapter_config.json)\n"
    "  loramoe adapter make DIR [options]   write a synthetic PEFT adapter\n"
    "options of make (defaults in brackets):\n"
    "  --family qwen|mixtral [qwen]   --layout per-expert|fused [per-expert]\n"
    "  --experts E [4]  --hidden H [64]  --intermediate I [32]  --layers N [1]\n"
    "  --rank R [8]  --alpha A [16]  --rslora  --targets gate,up,down [all]\n"
    "  --dtype bf16|f16|f32 [bf16]  --seed S [1]  --scale X [0.1]\n";

/* A one-thread cpu context for the file commands (also checkpoint.c's); NULL after
   printing why. */
lmoe_context *lmoe_cli_cpu_context(void) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  cfg.threads = 1;
  lmoe_context *ctx = NULL;
  char err[256] = "";
  if (lmoe_context_create(&cfg, &ctx, err, sizeof err) != LMOE_OK) {
    fprintf(stderr, "loramoe: %s\n", err);
    return NULL;
  }
  return ctx;
}

static int inspect(const char *path) {
  lmoe_context *ctx = lmoe_cli_cpu_context();
  if (!ctx) return 1;
  lmoe_peft *peft = NULL;
  int rc = 1;
  if (lmoe_peft_open(ctx, path, &peft) != LMOE_OK) {
    fprintf(stderr, "loramoe: %s\n", lmoe_context_last_error(ctx));
  } else {
    size_t need = 0;
    lmoe_peft_inspect(peft, NULL, 0, &need);
    char *text = malloc(need);
    if (text && lmoe_peft_inspect(peft, text, need, NULL) == LMOE_OK) {
      fputs(text, stdout);
      rc = 0;
    }
    free(text);
  }
  lmoe_peft_close(peft);
  lmoe_context_release(ctx);
  return rc;
}

/* Parses an integer option value; returns 0 on a bad one. */
static int int_arg(const char *opt, const char *v, int32_t *out) {
  char *end;
  long x = v ? strtol(v, &end, 10) : 0;
  if (!v || *end || x < 0 || x > 1 << 20) {
    fprintf(stderr, "loramoe: %s wants a non-negative integer\n", opt);
    return 0;
  }
  *out = (int32_t)x;
  return 1;
}

static int make(int argc, char **argv) {
  const char *dir = NULL;
  lmoe_peft_synthetic sp;
  lmoe_peft_synthetic_init(&sp);
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int ok = 1, takes = 1;
    if (!strcmp(a, "--family")) {
      sp.family = v && !strcmp(v, "mixtral") ? LMOE_FAMILY_MIXTRAL : v && !strcmp(v, "qwen") ? LMOE_FAMILY_QWEN : 0;
      ok = sp.family != 0;
    } else if (!strcmp(a, "--layout")) {
      ok = v && (!strcmp(v, "fused") || !strcmp(v, "per-expert"));
      sp.layout = v && !strcmp(v, "fused") ? LMOE_PEFT_FUSED : LMOE_PEFT_PER_EXPERT;
    } else if (!strcmp(a, "--experts")) {
      ok = int_arg(a, v, &sp.num_experts);
    } else if (!strcmp(a, "--hidden")) {
      ok = int_arg(a, v, &sp.hidden);
    } else if (!strcmp(a, "--intermediate")) {
      ok = int_arg(a, v, &sp.intermediate);
    } else if (!strcmp(a, "--layers")) {
      ok = int_arg(a, v, &sp.num_layers);
    } else if (!strcmp(a, "--rank")) {
      ok = int_arg(a, v, &sp.rank);
    } else if (!strcmp(a, "--alpha")) {
      char *end;
      sp.alpha = v ? strtof(v, &end) : 0;
      ok = v && !*end;
    } else if (!strcmp(a, "--scale")) {
      char *end;
      sp.scale = v ? strtof(v, &end) : 0;
      ok = v && !*end;
    } else if (!strcmp(a, "--seed")) {
      char *end;
      sp.seed = v ? strtoull(v, &end, 0) : 0;
      ok = v && !*end;
    } else if (!strcmp(a, "--rslora")) {
      sp.use_rslora = 1;
      takes = 0;
    } else if (!strcmp(a, "--dtype")) {
      sp.dtype = !v ? -1 : !strcmp(v, "bf16") ? LMOE_DTYPE_BF16 : !strcmp(v, "f16") ? LMOE_DTYPE_F16
                 : !strcmp(v, "f32") ? LMOE_DTYPE_F32 : -1;
      ok = sp.dtype >= 0;
    } else if (!strcmp(a, "--targets")) {
      sp.targets = 0;
      ok = v != NULL;
      for (const char *p = v; ok && p && *p;) {
        size_t n = strcspn(p, ",");
        if (n == 4 && !strncmp(p, "gate", 4)) sp.targets |= LMOE_TARGET_GATE;
        else if (n == 2 && !strncmp(p, "up", 2)) sp.targets |= LMOE_TARGET_UP;
        else if (n == 4 && !strncmp(p, "down", 4)) sp.targets |= LMOE_TARGET_DOWN;
        else ok = 0;
        p += n + (p[n] == ',');
      }
    } else if (a[0] != '-' && !dir) {
      dir = a;
      takes = 0;
    } else {
      fprintf(stderr, "loramoe: unknown option '%s'\n%s", a, adapter_usage);
      return 2;
    }
    if (!ok) {
      fprintf(stderr, "loramoe: bad value for %s\n%s", a, adapter_usage);
      return 2;
    }
    i += takes;
  }
  if (!dir) {
    fprintf(stderr, "loramoe: adapter make needs a directory\n%s", adapter_usage);
    return 2;
  }
  lmoe_context *ctx = lmoe_cli_cpu_context();
  if (!ctx) return 1;
  int rc = 0;
  if (lmoe_peft_write_synthetic(ctx, dir, &sp) != LMOE_OK) {
    fprintf(stderr, "loramoe: %s\n", lmoe_context_last_error(ctx));
    rc = 1;
  } else {
    printf("wrote %s/adapter_config.json and adapter_model.safetensors\n", dir);
  }
  lmoe_context_release(ctx);
  return rc;
}

int lmoe_cli_adapter(int argc, char **argv) {
  if (argc >= 3 && !strcmp(argv[1], "inspect")) return inspect(argv[2]);
  if (argc >= 2 && !strcmp(argv[1], "make")) return make(argc - 2, argv + 2);
  fputs(adapter_usage, argc >= 2 && !strcmp(argv[1], "help") ? stdout : stderr);
  return argc >= 2 && !strcmp(argv[1], "help") ? 0 : 2;
}
