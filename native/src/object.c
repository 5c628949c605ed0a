/* Object lifetime: every handle starts with an lmoe_object, and its life ends here,
   whatever its kind. A holder of a reference (a child, a backend, a graph) drops it with
   lmoe_object_release and needs nothing of the file that made the object. */
#include "internal.h"

void lmoe_object_init(lmoe_object *obj, uint32_t magic, void (*destroy)(lmoe_object *obj)) {
  obj->magic = magic;
  atomic_init(&obj->refs, 1);
  obj->destroy = destroy;
}

bool lmoe_object_is(const void *handle, uint32_t magic) {
  return handle && ((const lmoe_object *)handle)->magic == magic;
}

void lmoe_object_retain(lmoe_object *obj) { atomic_fetch_add(&obj->refs, 1); }

/* The magic goes first, so the handle is refused by every entry point from here on,
   even while destroy runs. */
void lmoe_object_release(lmoe_object *obj) {
  if (atomic_fetch_sub(&obj->refs, 1) != 1) return;
  obj->magic = 0;
  obj->destroy(obj);
}
