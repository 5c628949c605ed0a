/* The ABI rule for the structs that begin with struct_size (docs/api.md, "Struct
   sizes"), in one place. A struct may grow at its end; a caller built against an
   older header passes its older, smaller size:
   - input structs: any size from `oldest` (the end of the fields a call cannot do
     without) to this library's is taken; the fields past the caller's size keep the
     defaults the destination already holds (its *_init's);
   - output structs: the library writes only the caller's size;
   - a size above this library's (a newer header) is refused: the library cannot
     honour fields it does not know. So is one below oldest or not a multiple of 4
     (every field of these structs ends on one), which is how a struct that was never
     initialised usually shows.
   - initialising (the *_init functions): lmoe_X_init_sized(p, size) writes the caller's
     size and no more, so a program built against an older header can call a newer
     library's init on its shorter struct; the header spells lmoe_X_init(p) as a macro
     passing sizeof *(p). The symbols lmoe_X_init stay for programs built before the
     macros and for FFI bindings that call them by name: they write the struct as it
     was when they were frozen (below), never more, whatever it grows to. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

bool lmoe_struct_size_ok(uint32_t got, size_t size, size_t oldest, const char *what, const char *init,
                         char *msg, size_t n) {
  if (got >= oldest && got <= size && got % 4 == 0) return true;
  if (got > size)
    snprintf(msg, n,
             "%s struct_size is %u, larger than this library's %zu: the program was built against a "
             "newer loramoe.h than this library",
             what, (unsigned)got, size);
  else
    snprintf(msg, n, "%s struct_size is %u; this library takes %zu..%zu, a multiple of 4 (call %s)", what,
             (unsigned)got, oldest, size, init);
  return false;
}

lmoe_status lmoe_struct_in(lmoe_context *ctx, void *dst, size_t size, size_t oldest, const void *src,
                           const char *what, const char *init) {
  uint32_t got;
  memcpy(&got, src, sizeof got); /* read the size alone before trusting it */
  char msg[LMOE_ERRBUF];
  if (!lmoe_struct_size_ok(got, size, oldest, what, init, msg, sizeof msg))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s", msg);
  memcpy(dst, src, got);
  memcpy(dst, &(uint32_t){(uint32_t)size}, sizeof(uint32_t)); /* it is this library's struct now */
  return LMOE_OK;
}

lmoe_status lmoe_struct_out(lmoe_context *ctx, void *dst, const void *src, size_t size, const char *what,
                            const char *init) {
  uint32_t got;
  memcpy(&got, dst, sizeof got);
  char msg[LMOE_ERRBUF];
  if (!lmoe_struct_size_ok(got, size, sizeof(uint32_t), what, init, msg, sizeof msg))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s", msg);
  /* past the caller's struct_size field, up to its size; its struct_size stays */
  memcpy((char *)dst + sizeof got, (const char *)src + sizeof got, got - sizeof got);
  return LMOE_OK;
}

void lmoe_struct_init(void *dst, size_t size, void *defaults, size_t full, size_t oldest) {
  if (!dst || size < oldest || size < sizeof(uint32_t) || size > UINT32_MAX) return;
  uint32_t ss = (uint32_t)size;
  memcpy(defaults, &ss, sizeof ss);
  memcpy(dst, defaults, size < full ? size : full);
}

/* The *_init symbols as functions (the header's macros of the same names are not
   expanded here: the names are not followed by '('). Each writes the struct up to its
   last field as of the header that introduced *_init_sized (0.1.0), named here once and
   for all: when a struct grows, leave its line as it is. A program built against a
   header before the macros called these with a struct no larger than that, and a
   binding calling them by name gets a valid older size (the fields past it at their
   defaults); bindings should call *_init_sized with their struct's size instead. */
#define LMOE_FROZEN_INIT(type, last)                                                     \
  void(type##_init)(type * p) { type##_init_sized(p, LMOE_FIELD_END(type, last)); }
LMOE_FROZEN_INIT(lmoe_context_config, allocator)
LMOE_FROZEN_INIT(lmoe_layer_config, weight_dtype)
LMOE_FROZEN_INIT(lmoe_pool_config, max_rank)
LMOE_FROZEN_INIT(lmoe_adapter_desc, down)
LMOE_FROZEN_INIT(lmoe_random_adapter, scale)
LMOE_FROZEN_INIT(lmoe_batch_config, staging_depth)
LMOE_FROZEN_INIT(lmoe_forward_args, out)
LMOE_FROZEN_INIT(lmoe_peft_info, bytes)
LMOE_FROZEN_INIT(lmoe_peft_synthetic, alpha_pattern_value)
LMOE_FROZEN_INIT(lmoe_checkpoint_layer_info, weight_dtype)
