/* Element conversions between the library's dtypes. */
#include "internal.h"

#include <math.h>
#include <string.h>

float lmoe_bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t lmoe_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
  return (uint16_t)(u >> 16);
}

float lmoe_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else { /* subnormal: renormalise */
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t lmoe_f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);            /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);           /* overflow: Inf */
  if (a < 0x38800000u) {                                            /* subnormal or 0 */
    if (a < 0x33000000u) return (uint16_t)sign;                     /* < half the least subnormal */
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(a >> 23); /* 14..24 */
    uint32_t half = 1u << (shift - 1 + 0);
    uint32_t r = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((a >> 13) - (112u << 10));
  uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}

/* FP8 e4m3 (e4m3fn): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
   subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities; largest finite 448. */
float lmoe_f8e4m3_to_f32(uint8_t v) {
  float sign = (v & 0x80u) ? -1.0f : 1.0f;
  uint32_t e = (v >> 3) & 0xfu, m = v & 7u;
  if (e == 15 && m == 7) return (v & 0x80u) ? -NAN : NAN;
  if (e == 0) return sign * ldexpf((float)m, -9); /* m/8 * 2^-6 */
  return sign * ldexpf((float)(8 + m), (int)e - 10); /* (1 + m/8) * 2^(e-7) */
}

uint8_t lmoe_f32_to_f8e4m3(float f) { return lmoe_f64_to_f8e4m3((double)f); }

/* Round to nearest even on the e4m3 grid, saturating to +-448 (Inf too); NaN -> 0x7f
   (sign kept). Every e4m3 value and every midpoint between two is exact in double, so
   comparing the scaled magnitude decides exactly. */
uint8_t lmoe_f64_to_f8e4m3(double d) {
  if (d != d) return signbit(d) ? 0xffu : 0x7fu;
  uint8_t sign = signbit(d) ? 0x80u : 0;
  double a = fabs(d);
  if (a >= 448.0) return sign | 0x7eu;
  /* quantum of a's binade: 2^-9 below 2^-6 (subnormals), else 2^(exp-3) */
  int ex;
  frexp(a, &ex);            /* a = f * 2^ex, f in [0.5, 1): a's binade is 2^(ex-1) */
  int q = ex - 1 - 3;       /* log2 of the spacing */
  if (q < -9) q = -9;
  double n = ldexp(a, -q);  /* a in units of the spacing: exact */
  double r = floor(n), rem = n - r;
  if (rem > 0.5 || (rem == 0.5 && fmod(r, 2.0) != 0)) r += 1;
  double v = ldexp(r, q);   /* the rounded magnitude */
  if (v > 448.0) return sign | 0x7eu;
  if (v == 0) return sign;
  int e2;
  frexp(v, &e2);
  int e = e2 - 1 + 7; /* biased exponent */
  if (e <= 0) return sign | (uint8_t)(v * 512.0); /* subnormal: m = v / 2^-9 */
  uint32_t m = (uint32_t)(ldexp(v, -(e2 - 1)) * 8.0) - 8u;
  return sign | (uint8_t)((uint32_t)e << 3) | (uint8_t)m;
}

double lmoe_load_elem(const void *p, int32_t dtype, int64_t i) {
  switch (dtype) {
  case LMOE_DTYPE_BF16: return lmoe_bf16_to_f32(((const uint16_t *)p)[i]);
  case LMOE_DTYPE_F16: return lmoe_f16_to_f32(((const uint16_t *)p)[i]);
  case LMOE_DTYPE_F32: return ((const float *)p)[i];
  case LMOE_DTYPE_F64: return ((const double *)p)[i];
  case LMOE_DTYPE_I32: return ((const int32_t *)p)[i];
  case LMOE_DTYPE_F8_E4M3: return lmoe_f8e4m3_to_f32(((const uint8_t *)p)[i]);
  default: return NAN;
  }
}

void lmoe_store_elem(void *p, int32_t dtype, int64_t i, double v) {
  switch (dtype) {
  case LMOE_DTYPE_BF16: ((uint16_t *)p)[i] = lmoe_f32_to_bf16((float)v); break;
  case LMOE_DTYPE_F16: ((uint16_t *)p)[i] = lmoe_f32_to_f16((float)v); break;
  case LMOE_DTYPE_F32: ((float *)p)[i] = (float)v; break;
  case LMOE_DTYPE_F64: ((double *)p)[i] = v; break;
  case LMOE_DTYPE_F8_E4M3: ((uint8_t *)p)[i] = lmoe_f64_to_f8e4m3(v); break;
  case LMOE_DTYPE_I32: {
    double f = floor(v);
    ((int32_t *)p)[i] = f >= 2147483647.0 ? INT32_MAX : f <= -2147483648.0 ? INT32_MIN : (int32_t)f;
    break;
  }
  default: break;
  }
}

void lmoe_convert(void *dst, int32_t dst_dtype, const void *src, int32_t src_dtype, int64_t n) {
  if (dst_dtype == src_dtype) {
    memcpy(dst, src, (size_t)n * lmoe_dtype_size(dst_dtype));
    return;
  }
  if (dst_dtype == LMOE_DTYPE_BF16 && src_dtype == LMOE_DTYPE_F32) {
    const float *s = src;
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = lmoe_f32_to_bf16(s[i]);
    return;
  }
  if (dst_dtype == LMOE_DTYPE_F32 && src_dtype == LMOE_DTYPE_BF16) {
    const uint16_t *s = src;
    float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = lmoe_bf16_to_f32(s[i]);
    return;
  }
  for (int64_t i = 0; i < n; i++) lmoe_store_elem(dst, dst_dtype, i, lmoe_load_elem(src, src_dtype, i));
}

size_t lmoe_dtype_size(int32_t dtype) {
  switch (dtype) {
  case LMOE_DTYPE_BF16:
  case LMOE_DTYPE_F16: return 2;
  case LMOE_DTYPE_F32:
  case LMOE_DTYPE_I32: return 4;
  case LMOE_DTYPE_F64: return 8;
  case LMOE_DTYPE_F8_E4M3: return 1;
  default: return 0;
  }
}

const char *lmoe_dtype_name(int32_t dtype) {
  switch (dtype) {
  case LMOE_DTYPE_BF16: return "bf16";
  case LMOE_DTYPE_F16: return "f16";
  case LMOE_DTYPE_F32: return "f32";
  case LMOE_DTYPE_F64: return "f64";
  case LMOE_DTYPE_I32: return "i32";
  case LMOE_DTYPE_F8_E4M3: return "f8_e4m3";
  default: return "unknown";
  }
}

bool lmoe_valid_dtype(int32_t dtype) { return lmoe_dtype_size(dtype) != 0; }
