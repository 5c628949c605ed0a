/* Errors: status names and the per-context message of the last failure. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

const char *lmoe_status_string(lmoe_status status) {
  switch (status) {
  case LMOE_OK: return "ok";
  case LMOE_ERR_INVALID_ARGUMENT: return "invalid argument";
  case LMOE_ERR_OUT_OF_MEMORY: return "out of memory";
  case LMOE_ERR_UNSUPPORTED: return "unsupported";
  case LMOE_ERR_BACKEND: return "backend error";
  case LMOE_ERR_STATE: return "invalid state";
  case LMOE_ERR_NOT_FOUND: return "not found";
  case LMOE_ERR_FULL: return "full";
  case LMOE_ERR_IO: return "i/o error";
  case LMOE_ERR_FORMAT: return "format error";
  }
  return "unknown status";
}

lmoe_status lmoe_fail(lmoe_context *ctx, lmoe_status st, const char *fmt, ...) {
  if (ctx) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
  }
  return st;
}

void lmoe_clear_error(lmoe_context *ctx) {
  if (ctx) ctx->error[0] = '\0';
}

const char *lmoe_context_last_error(const lmoe_context *ctx) {
  if (!ctx) return "context is NULL";
  if (ctx->obj.magic != LMOE_MAGIC_CONTEXT) return "not a loramoe context";
  return ctx->error;
}
