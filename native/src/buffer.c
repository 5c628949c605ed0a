/* Typed buffers on host or device memory. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *lmoe_shape_str(const lmoe_buffer *b, char *tmp, size_t n) {
  size_t used = 0;
  used += (size_t)snprintf(tmp + used, n - used, "[");
  for (int i = 0; i < b->ndim && used < n; i++)
    used += (size_t)snprintf(tmp + used, n - used, i ? ", %lld" : "%lld", (long long)b->shape[i]);
  if (used < n) snprintf(tmp + used, n - used, "]");
  return tmp;
}

static lmoe_status check_shape(lmoe_context *ctx, int32_t dtype, int32_t memory, int32_t ndim,
                               const int64_t *shape, int64_t *numel) {
  if (!lmoe_valid_dtype(dtype))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "unknown dtype %d", (int)dtype);
  if (memory != LMOE_MEMORY_HOST && memory != LMOE_MEMORY_DEVICE)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "memory must be host (0) or device (1), got %d",
                     (int)memory);
  if (ndim < 1 || ndim > LMOE_MAX_DIMS)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "ndim must be 1..%d, got %d", LMOE_MAX_DIMS,
                     (int)ndim);
  if (!shape) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shape is NULL");
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shape[%d] is negative (%lld)", i,
                       (long long)shape[i]);
    if (shape[i] && n > INT64_MAX / 16 / shape[i])
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "shape is too large");
    n *= shape[i];
  }
  /* Unreachable with a 64-bit size_t (n <= INT64_MAX / 16); on wasm32 the byte count
     must fit 32 bits, or it wraps and the buffer is allocated too small. */
  if ((uint64_t)n > SIZE_MAX / lmoe_dtype_size(dtype))
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY,
                     "shape of %lld elements is more than this platform can address", (long long)n);
  *numel = n;
  return LMOE_OK;
}

static void buffer_destroy(lmoe_object *obj) {
  lmoe_buffer *b = (lmoe_buffer *)obj;
  lmoe_context *ctx = b->ctx;
  if (b->owned && b->data) ctx->ops->free(ctx, b->memory, b->data);
  free(b);
  lmoe_context_release(ctx);
}

static lmoe_status buffer_new(lmoe_context *ctx, int32_t dtype, int32_t memory, int32_t ndim,
                              const int64_t *shape, void *data, lmoe_buffer **out) {
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  int64_t numel = 0;
  lmoe_status st = check_shape(ctx, dtype, memory, ndim, shape, &numel);
  if (st) return st;
  lmoe_buffer *b = calloc(1, sizeof *b);
  if (!b) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&b->obj, LMOE_MAGIC_BUFFER, buffer_destroy);
  b->dtype = dtype;
  b->memory = memory;
  b->ndim = ndim;
  for (int i = 0; i < ndim; i++) b->shape[i] = shape[i];
  b->numel = numel;
  b->bytes = (size_t)numel * lmoe_dtype_size(dtype);
  if (data) {
    b->data = data;
    b->owned = false;
  } else if (b->bytes) {
    st = ctx->ops->alloc(ctx, memory, b->bytes, &b->data);
    if (st) {
      free(b);
      return st;
    }
    b->owned = true;
  }
  lmoe_context_retain(ctx);
  b->ctx = ctx;
  *out = b;
  return LMOE_OK;
}

lmoe_status lmoe_buffer_create(lmoe_context *ctx, int32_t dtype, int32_t memory, int32_t ndim,
                               const int64_t *shape, lmoe_buffer **out) {
  return buffer_new(ctx, dtype, memory, ndim, shape, NULL, out);
}

lmoe_status lmoe_buffer_wrap(lmoe_context *ctx, int32_t dtype, int32_t memory, int32_t ndim,
                             const int64_t *shape, void *data, lmoe_buffer **out) {
  if (!data) {
    if (out) *out = NULL;
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "data is NULL");
  }
  return buffer_new(ctx, dtype, memory, ndim, shape, data, out);
}

void lmoe_buffer_release(lmoe_buffer *b) {
  if (lmoe_object_is(b, LMOE_MAGIC_BUFFER)) lmoe_object_release(&b->obj);
}

lmoe_status lmoe_buffer_describe(const lmoe_buffer *b, lmoe_buffer_desc *out) {
  if (!b || !out || b->obj.magic != LMOE_MAGIC_BUFFER) return LMOE_ERR_INVALID_ARGUMENT;
  memset(out, 0, sizeof *out);
  out->dtype = b->dtype;
  out->memory = b->memory;
  out->ndim = b->ndim;
  for (int i = 0; i < b->ndim; i++) out->shape[i] = b->shape[i];
  out->numel = b->numel;
  out->bytes = b->bytes;
  out->data = b->data;
  return LMOE_OK;
}

static lmoe_status check_range(lmoe_buffer *b, int64_t offset, const void *p, int32_t dtype,
                               int64_t count) {
  if (!b || b->obj.magic != LMOE_MAGIC_BUFFER) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = b->ctx;
  if (!p) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "host pointer is NULL");
  if (!lmoe_valid_dtype(dtype))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "unknown dtype %d", (int)dtype);
  if (offset < 0 || count < 0 || offset > b->numel || count > b->numel - offset)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "range [%lld, %lld) is outside the buffer's %lld elements", (long long)offset,
                     (long long)(offset + count), (long long)b->numel);
  return LMOE_OK;
}

/* Host <-> buffer copies, through a host bounce when the buffer is on the device or
   needs conversion. */
lmoe_status lmoe_buffer_write(lmoe_buffer *b, int64_t offset, const void *src, int32_t src_dtype,
                              int64_t count) {
  lmoe_status st = check_range(b, offset, src, src_dtype, count);
  if (st || count == 0) return st;
  lmoe_context *ctx = b->ctx;
  size_t esz = lmoe_dtype_size(b->dtype);
  char *dst = (char *)b->data + (size_t)offset * esz;
  if (lmoe_host_addressable(ctx, b->memory)) {
    lmoe_convert(dst, b->dtype, src, src_dtype, count);
    return LMOE_OK;
  }
  const void *from = src;
  void *tmp = NULL;
  if (src_dtype != b->dtype) {
    tmp = malloc((size_t)count * esz);
    if (!tmp) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    lmoe_convert(tmp, b->dtype, src, src_dtype, count);
    from = tmp;
  }
  st = ctx->ops->copy(ctx, dst, LMOE_MEMORY_DEVICE, from, LMOE_MEMORY_HOST, (size_t)count * esz,
                      ctx->stream, 1);
  ctx->counters.uploads++;
  ctx->counters.bytes_uploaded += (uint64_t)count * esz;
  ctx->counters.host_waits++;
  free(tmp);
  return st;
}

lmoe_status lmoe_buffer_read(lmoe_buffer *b, int64_t offset, void *dst, int32_t dst_dtype,
                             int64_t count) {
  lmoe_status st = check_range(b, offset, dst, dst_dtype, count);
  if (st || count == 0) return st;
  lmoe_context *ctx = b->ctx;
  size_t esz = lmoe_dtype_size(b->dtype);
  const char *src = (const char *)b->data + (size_t)offset * esz;
  if (lmoe_host_addressable(ctx, b->memory)) {
    if (!ctx->ops->caps.synchronous) { /* enqueued work may still write host buffers */
      ctx->counters.host_waits++;
      st = ctx->ops->synchronize(ctx, ctx->stream);
      if (st) return st;
    }
    lmoe_convert(dst, dst_dtype, src, b->dtype, count);
    return LMOE_OK;
  }
  void *tmp = dst;
  if (dst_dtype != b->dtype) {
    tmp = malloc((size_t)count * esz);
    if (!tmp) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  st = ctx->ops->copy(ctx, tmp, LMOE_MEMORY_HOST, src, LMOE_MEMORY_DEVICE, (size_t)count * esz,
                      ctx->stream, 1);
  ctx->counters.downloads++;
  ctx->counters.host_waits++;
  if (st == LMOE_OK && tmp != dst) lmoe_convert(dst, dst_dtype, tmp, b->dtype, count);
  if (tmp != dst) free(tmp);
  return st;
}

lmoe_status lmoe_buffer_fill_random(lmoe_buffer *b, uint64_t seed, float lo, float hi,
                                    void *stream) {
  if (!b || b->obj.magic != LMOE_MAGIC_BUFFER) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = b->ctx;
  if (!(lo <= hi) || !isfinite(lo) || !isfinite(hi))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "fill_random needs finite lo <= hi");
  if (b->numel == 0) return LMOE_OK;
  return ctx->ops->fill_random(ctx, b, seed, lo, hi, stream ? stream : ctx->stream);
}

lmoe_status lmoe_buffer_fill(lmoe_buffer *b, double value, void *stream) {
  if (!b || b->obj.magic != LMOE_MAGIC_BUFFER) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = b->ctx;
  if (b->numel == 0) return LMOE_OK;
  return ctx->ops->fill(ctx, b, value, stream ? stream : ctx->stream);
}

/* Reads a whole buffer into host doubles (for compare). */
static lmoe_status to_doubles(lmoe_buffer *b, double **out) {
  *out = malloc((size_t)(b->numel ? b->numel : 1) * sizeof(double));
  if (!*out) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_status st = lmoe_buffer_read(b, 0, *out, LMOE_DTYPE_F64, b->numel);
  if (st) {
    free(*out);
    *out = NULL;
  }
  return st;
}

lmoe_status lmoe_buffer_compare(lmoe_buffer *a, lmoe_buffer *ref, lmoe_compare_result *out) {
  if (!a || !ref || !out || a->obj.magic != LMOE_MAGIC_BUFFER || ref->obj.magic != LMOE_MAGIC_BUFFER)
    return LMOE_ERR_INVALID_ARGUMENT;
  memset(out, 0, sizeof *out);
  if (a->numel != ref->numel)
    return lmoe_fail(a->ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "compare needs equal element counts (%lld vs %lld)", (long long)a->numel,
                     (long long)ref->numel);
  double *va = NULL, *vr = NULL;
  lmoe_status st = to_doubles(a, &va);
  if (st) return st;
  st = to_doubles(ref, &vr);
  if (st) {
    free(va);
    return lmoe_fail(a->ctx, st, "%s", lmoe_context_last_error(ref->ctx));
  }
  double num = 0, den = 0, mx = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < a->numel; i++) {
    if (!isfinite(va[i])) {
      bad++;
      continue;
    }
    double d = va[i] - vr[i];
    num += d * d;
    den += vr[i] * vr[i];
    if (fabs(d) > mx) mx = fabs(d);
  }
  out->numel = a->numel;
  out->nonfinite = bad;
  out->max_abs = mx;
  out->ref_l2 = sqrt(den);
  out->rel_l2 = bad ? INFINITY : den > 0 ? sqrt(num / den) : sqrt(num);
  free(va);
  free(vr);
  return LMOE_OK;
}
