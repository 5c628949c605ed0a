/* The cpu backend's GEMM tile for WebAssembly SIMD128 (included by cpu_forward.c when
   __wasm_simd128__ is defined; nothing else includes it).

   Same contract as cpu_forward.c's LMOE_GEMM_TILE (read it first): OUT[r][lane] (=|+=)
   alpha * sum_h W[r][h] * XT[h][lane], W bf16 [rows][ldw] (or FP8 e4m3 codes with block
   scales S when S is set), XT and OUT feature-major fp32 tiles of TILE lanes;
   accumulate = 0 stores whole lane groups, 1 adds inside [lo, hi).
   Each output is summed in the same order as the generic tile (h upwards within a KC
   chunk, one multiply and one add per step, then * alpha into OUT), so the results are
   bit for bit those of the generic code.

   Why a tile of its own (docs/design.md, "SIMD128"):
   - register block of WASM_MR = 4 weight rows x 2 vectors (8 lanes): 8 accumulators,
     2 x vectors, the broadcast weight and the product, 12 registers. Engines map
     SIMD128 onto the 16 xmm registers and V8 keeps one (xmm15) as scratch, so the
     generic 6 x 2 block (12 accumulators + 4 = 16) spills 4 accumulators to the stack
     on every step of K (seen in V8's code, node --print-wasm-code).
   - bf16 -> fp32 widening of the weight rows with shuffles, 8 values per step,
     interleaving zero halves below the bf16 bits; the generic loop widens one value at
     a time. */
#ifndef LMOE_CPU_GEMM_WASM_H
#define LMOE_CPU_GEMM_WASM_H

#include <wasm_simd128.h>

enum { WASM_MR = 4, WASM_NV = 2, WASM_GW = 4 * WASM_NV /* lanes per group */ };
_Static_assert(WASM_MR <= MR, "wbuf holds MR * KC floats");

static inline __attribute__((always_inline)) void gemm_tile_wasm(
    const void *Wv, size_t ldw, int32_t rows, int32_t K, const float *XT, int32_t lo,
    int32_t hi, float *OUT, int accumulate, float alpha, float *wbuf, const float *S,
    int32_t lds, int32_t split) {
  if (hi <= lo || rows <= 0) return;
  const uint16_t *W = Wv;
  const uint8_t *W8 = Wv;
  const int32_t nbs = (split + 127) / 128; /* S: row blocks of the rows before split */
  const v128_t zero = wasm_i16x8_splat(0);
  for (int32_t k0 = 0; k0 < K; k0 += KC) {
    const int32_t kc = K - k0 < KC ? K - k0 : KC;
    const int add = accumulate || k0 > 0;
    for (int32_t r0 = 0; r0 < rows; r0 += WASM_MR) {
      const int32_t nr = rows - r0 < WASM_MR ? rows - r0 : WASM_MR;
      /* rows past nr repeat the last one: computed, never stored */
      for (int32_t i = 0; i < WASM_MR; i++) {
        const int32_t r = r0 + (i < nr ? i : nr - 1);
        float *d = wbuf + (size_t)i * KC;
        if (S) { /* FP8: code * its block's scale (KC = 128: one scale per chunk) */
          const int32_t br = r < split ? r / 128 : nbs + (r - split) / 128;
          const float sc = S[(size_t)br * (size_t)lds + (size_t)(k0 / 128)];
          const uint8_t *w8 = W8 + (size_t)r * ldw + k0;
          for (int32_t h = 0; h < kc; h++) d[h] = e4m3_lut[w8[h]] * sc;
          continue;
        }
        const uint16_t *w = W + (size_t)r * ldw + k0;
        int32_t h = 0;
        for (; h + 8 <= kc; h += 8) { /* bf16 -> fp32: each value becomes the high half */
          v128_t b = wasm_v128_load(w + h);
          wasm_v128_store(d + h, wasm_i16x8_shuffle(zero, b, 0, 8, 1, 9, 2, 10, 3, 11));
          wasm_v128_store(d + h + 4, wasm_i16x8_shuffle(zero, b, 4, 12, 5, 13, 6, 14, 7, 15));
        }
        for (; h < kc; h++) {
          uint32_t u = (uint32_t)w[h] << 16;
          memcpy(&d[h], &u, sizeof u);
        }
      }
      for (int32_t g0 = lo - lo % WASM_GW; g0 < hi; g0 += WASM_GW) {
        v128_t acc[WASM_MR][WASM_NV];
        _Pragma("unroll") for (int i = 0; i < WASM_MR; i++)
        _Pragma("unroll") for (int v = 0; v < WASM_NV; v++) acc[i][v] = wasm_f32x4_splat(0.0f);
        const float *xp = XT + (size_t)k0 * TILE + g0;
        for (int32_t h = 0; h < kc; h++) {
          v128_t x[WASM_NV];
          _Pragma("unroll") for (int v = 0; v < WASM_NV; v++)
            x[v] = wasm_v128_load(xp + (size_t)h * TILE + v * 4);
          _Pragma("unroll") for (int i = 0; i < WASM_MR; i++) {
            v128_t wv = wasm_v128_load32_splat(wbuf + (size_t)i * KC + h);
            _Pragma("unroll") for (int v = 0; v < WASM_NV; v++)
              acc[i][v] = wasm_f32x4_add(acc[i][v], wasm_f32x4_mul(wv, x[v]));
          }
        }
        int32_t l0 = lo > g0 ? lo - g0 : 0, l1 = hi < g0 + WASM_GW ? hi - g0 : WASM_GW;
        if (!accumulate) l0 = 0, l1 = WASM_GW; /* store mode owns whole groups */
        const v128_t va = wasm_f32x4_splat(alpha);
        for (int32_t i = 0; i < nr; i++) {
          float *o = OUT + (size_t)(r0 + i) * TILE + g0;
          _Pragma("unroll") for (int v = 0; v < WASM_NV; v++) {
            v128_t val = wasm_f32x4_mul(acc[i][v], va);
            if (!add) {
              wasm_v128_store(o + v * 4, val);
            } else if (l0 <= v * 4 && v * 4 + 4 <= l1) {
              wasm_v128_store(o + v * 4, wasm_f32x4_add(wasm_v128_load(o + v * 4), val));
            } else {
              float t[4];
              wasm_v128_store(t, val);
              for (int32_t c = 0; c < 4; c++)
                if (v * 4 + c >= l0 && v * 4 + c < l1) o[v * 4 + c] += t[c];
            }
          }
        }
      }
    }
  }
}

#endif
