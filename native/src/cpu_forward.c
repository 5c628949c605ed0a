#include "internal.h"
lmoe_status lmoe_cpu_forward(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream){(void)plan;(void)stream;return lmoe_fail(ctx,LMOE_ERR_UNSUPPORTED,"x");}
size_t lmoe_cpu_workspace_bytes(const lmoe_context *ctx, const lmoe_layer_config *cfg, const lmoe_pool_config *p){return 0;}

