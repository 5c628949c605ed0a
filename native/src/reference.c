#include "internal.h"
lmoe_status lmoe_reference_forward(lmoe_context *ctx, const lmoe_forward_args *args) {
  (void)args;
  return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED, "reference not written yet");
}
