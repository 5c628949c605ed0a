/* FP8 e4m3 experts with float32 block scales (docs/formats.md, "FP8"): the block
   quantizer, an FP8 layer's weight setters, and the checkpoint quantizer that writes
   the published HF format (`weight` in F8_E4M3, `weight_scale_inv` per 128x128 block).

   One quantization everywhere: per 128x128 block (the last blocks may be partial),
   scale = amax / 448 in float32 (1 when the block is all zero), code = e4m3(w / scale)
   rounded to nearest even and saturated, w / scale computed in double from the float32
   scale. Dequantized, w' = code * scale (exact in double: a 4-bit by 24-bit product). */
#include "files.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void lmoe_fp8_quantize(const double *w, int64_t rows, int64_t cols, uint8_t *codes, float *scales) {
  const int64_t B = LMOE_FP8_BLOCK, nbc = lmoe_fp8_blocks(cols);
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t r1 = r0 + B < rows ? r0 + B : rows, c1 = c0 + B < cols ? c0 + B : cols;
      double amax = 0;
      for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) {
          double a = fabs(w[r * cols + c]);
          if (a > amax || a != a) amax = a != a ? amax : a; /* NaN stays a code, not a scale */
        }
      float s = amax > 0 ? (float)(amax / 448.0) : 1.0f;
      if (!(s > 0) || isinf(s)) s = s > 0 ? 3.4028234663852886e38f : 1.0f; /* amax past f32, or underflow */
      scales[(r0 / B) * nbc + c0 / B] = s;
      for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) codes[r * cols + c] = lmoe_f64_to_f8e4m3(w[r * cols + c] / (double)s);
    }
}

/* One part (rows x cols of dtype at src) quantized into codes at element `first` of
   dst and scales at element `sfirst` of dsts; f8_e4m3 src: the codes copied, scales
   left as they are. */
static lmoe_status put_part(lmoe_layer *l, const void *src, int32_t dtype, int64_t rows, int64_t cols,
                            lmoe_buffer *dst, int64_t first, lmoe_buffer *dsts, int64_t sfirst) {
  const int64_t n = rows * cols;
  if (dtype == LMOE_DTYPE_F8_E4M3) return lmoe_buffer_write(dst, first, src, dtype, n);
  const int64_t ns = lmoe_fp8_blocks(rows) * lmoe_fp8_blocks(cols);
  double *w = malloc((size_t)(n ? n : 1) * sizeof *w);
  uint8_t *q = malloc((size_t)(n ? n : 1));
  float *s = malloc((size_t)(ns ? ns : 1) * sizeof *s);
  lmoe_status st = LMOE_OK;
  if (!w || !q || !s) {
    st = lmoe_fail(l->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  } else {
    lmoe_convert(w, LMOE_DTYPE_F64, src, dtype, n);
    lmoe_fp8_quantize(w, rows, cols, q, s);
    st = lmoe_buffer_write(dst, first, q, LMOE_DTYPE_F8_E4M3, n);
    if (!st) st = lmoe_buffer_write(dsts, sfirst, s, LMOE_DTYPE_F32, ns);
  }
  free(w), free(q), free(s);
  return st;
}

lmoe_status lmoe_fp8_set_expert(lmoe_layer *l, int32_t e, const void *gate, const void *up, const void *down,
                                int32_t dtype) {
  const int64_t H = l->cfg.hidden, I = l->cfg.intermediate;
  const int64_t nbh = lmoe_fp8_blocks(H), nbi = lmoe_fp8_blocks(I);
  lmoe_status st = LMOE_OK;
  if (gate) st = put_part(l, gate, dtype, I, H, l->w13, (int64_t)e * 2 * I * H, l->w13s, (int64_t)e * 2 * nbi * nbh);
  if (!st && up)
    st = put_part(l, up, dtype, I, H, l->w13, ((int64_t)e * 2 + 1) * I * H, l->w13s, ((int64_t)e * 2 + 1) * nbi * nbh);
  if (!st && down) st = put_part(l, down, dtype, H, I, l->w2, (int64_t)e * H * I, l->w2s, (int64_t)e * nbh * nbi);
  return st;
}

lmoe_status lmoe_fp8_set_weights(lmoe_layer *l, const void *w13, const void *w2, int32_t dtype) {
  const int64_t H = l->cfg.hidden, I = l->cfg.intermediate, ih = I * H;
  const size_t es = lmoe_dtype_size(dtype);
  lmoe_status st = LMOE_OK;
  for (int32_t e = 0; e < l->cfg.num_experts && !st; e++) {
    const uint8_t *g = w13 ? (const uint8_t *)w13 + (size_t)(e * 2 * ih) * es : NULL;
    const uint8_t *u = w13 ? g + (size_t)ih * es : NULL;
    const uint8_t *d = w2 ? (const uint8_t *)w2 + (size_t)(e * ih) * es : NULL;
    st = lmoe_fp8_set_expert(l, e, g, u, d, dtype);
  }
  return st;
}

/* The bf16 values a bf16 layer's lmoe_layer_randomize gives (backend_cpu.c's
   fill_chunk: lo + span * u, rounded to float then bf16), quantized: an FP8 layer and a
   bf16 layer randomized with one seed hold the same weights up to the quantization. */
lmoe_status lmoe_fp8_randomize(lmoe_layer *l, uint64_t seed, float scale) {
  const int64_t E = l->cfg.num_experts, H = l->cfg.hidden, I = l->cfg.intermediate, ih = I * H;
  const float lo = -scale, span = scale - lo;
  uint16_t *img = malloc((size_t)(ih > 0 ? 3 * ih : 1) * sizeof *img);
  if (!img) return lmoe_fail(l->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  const uint64_t s13 = lmoe_mix64(seed * 2 + 1), s2 = lmoe_mix64(seed * 2 + 2);
  lmoe_status st = LMOE_OK;
  for (int64_t e = 0; e < E && !st; e++) {
    for (int64_t i = 0; i < 2 * ih; i++) {
      float prod = span * lmoe_uniform(s13, (uint64_t)(e * 2 * ih + i));
      img[i] = lmoe_f32_to_bf16(lo + prod);
    }
    for (int64_t i = 0; i < ih; i++) {
      float prod = span * lmoe_uniform(s2, (uint64_t)(e * ih + i));
      img[2 * ih + i] = lmoe_f32_to_bf16(lo + prod);
    }
    st = lmoe_fp8_set_expert(l, (int32_t)e, img, img + ih, img + 2 * ih, LMOE_DTYPE_BF16);
  }
  free(img);
  return st;
}

/* ---------------------------------------------------------------- the checkpoint quantizer */

/* Whether `name` is an MoE expert weight this quantizes; *fused: a 3-D fused one. */
static bool expert_weight(const char *name, const lmoe_tensor_info *ti, bool *fused) {
  const char *x = strstr(name, ".experts.");
  if (!x) return false;
  x += strlen(".experts.");
  *fused = false;
  if (!strcmp(x, "gate_up_proj") || !strcmp(x, "down_proj")) {
    *fused = true;
    return ti->ndim == 3;
  }
  if (*x < '0' || *x > '9') return false;
  while (*x >= '0' && *x <= '9') x++;
  static const char *const parts[] = {".gate_proj.weight", ".up_proj.weight", ".down_proj.weight",
                                      ".w1.weight",        ".w2.weight",      ".w3.weight"};
  for (size_t i = 0; i < sizeof parts / sizeof *parts; i++)
    if (!strcmp(x, parts[i])) return ti->ndim == 2;
  return false;
}

typedef struct qt {
  char *name;      /* the output tensor's */
  lmoe_tensor_entry ent;
  void *data;      /* owned */
} qt;

lmoe_status lmoe_checkpoint_quantize_fp8(lmoe_context *ctx, const char *src, const char *dst) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!src || !dst) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "src or dst is NULL");
  lmoe_checkpoint *ck = NULL;
  lmoe_status s = lmoe_checkpoint_open(ctx, src, &ck);
  if (s) return s;
  int32_t nf = 0;
  lmoe_safetensors **files = lmoe_checkpoint_files(ck, &nf);
  int32_t cap = 0, n = 0;
  for (int32_t f = 0; f < nf; f++) cap += 2 * lmoe_safetensors_count(files[f]);
  qt *out = calloc((size_t)(cap ? cap : 1), sizeof *out);
  if (!out) s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  for (int32_t f = 0; f < nf && !s; f++) {
    lmoe_safetensors *st = files[f];
    for (int32_t i = 0; i < lmoe_safetensors_count(st) && !s; i++) {
      lmoe_tensor_info ti;
      lmoe_safetensors_tensor(st, i, &ti);
      bool fused = false;
      if (!expert_weight(ti.name, &ti, &fused)) { /* copied as it is */
        if (ti.dtype < 0) {
          s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s': %s can't be copied by the writer",
                        lmoe_st_display_name(st), ti.name, ti.dtype_name);
          break;
        }
        qt *o = &out[n++];
        o->name = strdup(ti.name);
        o->data = malloc(ti.bytes ? (size_t)ti.bytes : 1);
        if (!o->name || !o->data) {
          s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
          break;
        }
        s = lmoe_safetensors_read(st, i, o->data, ti.dtype, ti.numel);
        o->ent.dtype = ti.dtype, o->ent.ndim = ti.ndim;
        memcpy(o->ent.shape, ti.shape, sizeof ti.shape);
        continue;
      }
      if (ti.dtype == LMOE_DTYPE_F8_E4M3 || ti.dtype < 0 || ti.dtype == LMOE_DTYPE_I32) {
        s = lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "%s: tensor '%s' is %s; the quantizer takes BF16, F16, F32, F64",
                      lmoe_st_display_name(st), ti.name, ti.dtype_name);
        break;
      }
      const int64_t lead = fused ? ti.shape[0] : 1, rows = ti.shape[ti.ndim - 2], cols = ti.shape[ti.ndim - 1];
      const int64_t nbr = lmoe_fp8_blocks(rows), nbc = lmoe_fp8_blocks(cols);
      qt *o = &out[n++], *os = &out[n++];
      size_t nl = strlen(ti.name);
      o->name = strdup(ti.name);
      os->name = malloc(nl + 16);
      double *w = malloc((size_t)(rows * cols > 0 ? rows * cols : 1) * sizeof *w);
      o->data = malloc((size_t)(ti.numel ? ti.numel : 1));
      os->data = malloc((size_t)(lead * nbr * nbc > 0 ? lead * nbr * nbc : 1) * sizeof(float));
      if (!o->name || !os->name || !w || !o->data || !os->data) {
        free(w);
        s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
        break;
      }
      /* per-expert: x.weight -> x.weight_scale_inv; fused: x -> x_scales_inv (transformers' FP8Expert) */
      if (fused) snprintf(os->name, nl + 16, "%s_scales_inv", ti.name);
      else snprintf(os->name, nl + 16, "%.*s.weight_scale_inv", (int)(nl - strlen(".weight")), ti.name);
      for (int64_t e = 0; e < lead && !s; e++) {
        s = lmoe_st_read_range(st, i, e * rows * cols, rows * cols, w, LMOE_DTYPE_F64);
        if (!s)
          lmoe_fp8_quantize(w, rows, cols, (uint8_t *)o->data + e * rows * cols,
                            (float *)os->data + e * nbr * nbc);
      }
      free(w);
      o->ent.dtype = LMOE_DTYPE_F8_E4M3, o->ent.ndim = ti.ndim;
      memcpy(o->ent.shape, ti.shape, sizeof ti.shape);
      os->ent.dtype = LMOE_DTYPE_F32, os->ent.ndim = ti.ndim;
      if (fused) os->ent.shape[0] = lead;
      os->ent.shape[ti.ndim - 2] = nbr, os->ent.shape[ti.ndim - 1] = nbc;
    }
  }
  lmoe_tensor_entry *ents = s ? NULL : calloc((size_t)(n ? n : 1), sizeof *ents);
  if (!s && !ents) s = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (!s) {
    for (int32_t i = 0; i < n; i++) {
      ents[i] = out[i].ent;
      ents[i].name = out[i].name;
      ents[i].data = out[i].data;
    }
    static const char *const keys[] = {"format", "quantization"};
    static const char *const vals[] = {"pt", "fp8 e4m3fn experts, float32 weight_scale_inv per 128x128 block "
                                             "(loramoe lmoe_checkpoint_quantize_fp8)"};
    s = lmoe_safetensors_write(ctx, dst, n, ents, 2, keys, vals);
  }
  free(ents);
  for (int32_t i = 0; out && i < n; i++) free(out[i].name), free(out[i].data);
  free(out);
  lmoe_checkpoint_close(ck);
  return s;
}
