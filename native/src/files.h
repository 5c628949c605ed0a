/* Private to the file readers (safetensors.c, peft.c, checkpoint.c). */
#ifndef LMOE_FILES_H
#define LMOE_FILES_H

#include "internal.h"

#include <stdio.h>

enum {
  LMOE_MAGIC_SAFETENSORS = 0x4c4d5354, /* "LMST" */
  LMOE_MAGIC_PEFT = 0x4c4d5046,
  LMOE_MAGIC_CHECKPOINT = 0x4c4d434b
};

/* The file's path as shown in messages (its last two components: enough to tell
   files apart without printing a machine's directories). */
const char *lmoe_st_display_name(const lmoe_safetensors *st);
lmoe_context *lmoe_st_context(const lmoe_safetensors *st);

/* Whole small file into a NUL-terminated buffer (for JSON); limit in bytes. */
lmoe_status lmoe_read_text_file(lmoe_context *ctx, const char *path, size_t limit, char **out,
                                size_t *len);

/* Reads tensor `name` of `st` as f32 into dst, checking its shape equals shape[0..ndim). */
lmoe_status lmoe_st_read_f32(lmoe_safetensors *st, const char *name, int32_t ndim,
                             const int64_t *shape, float *dst);

/* How messages show a path (as the caller gave it). */
const char *lmoe_short_path(const char *path);

/* A PEFT adapter from its two files' bytes (the fuzzer's entry). */
lmoe_status lmoe_peft_open_parts(lmoe_context *ctx, const char *config, size_t config_len,
                                 const void *model, size_t model_len, lmoe_peft **out);

/* Last error of the context a PEFT adapter was opened with. */
const char *lmoe_peft_context_error(const lmoe_peft *p);

#endif
