/* Private to the file readers (safetensors.c, peft.c, checkpoint.c). */
#ifndef LMOE_FILES_H
#define LMOE_FILES_H

#include "internal.h"

#include <regex.h>
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

/* Elements [first, first + count) of tensor `index` (in range, of a supported dtype) into
   dst as dst_dtype: read in place when the dtypes agree, else converted through a
   bounded buffer. */
lmoe_status lmoe_st_read_range(lmoe_safetensors *st, int32_t index, int64_t first, int64_t count, void *dst,
                               int32_t dst_dtype);

/* Reads tensor `name` of `st` as f32 into dst, checking its shape equals shape[0..ndim). */
lmoe_status lmoe_st_read_f32(lmoe_safetensors *st, const char *name, int32_t ndim,
                             const int64_t *shape, float *dst);

/* The open files of a checkpoint (checkpoint.c), for the FP8 quantizer (fp8.c). */
lmoe_safetensors **lmoe_checkpoint_files(lmoe_checkpoint *ck, int32_t *n);

/* How messages show a path (as the caller gave it). */
const char *lmoe_short_path(const char *path);

/* dir/file, with one slash between them (malloc'd, NULL when out of memory). */
char *lmoe_path_join(const char *dir, const char *file);

/* The parts of an expert an adapter's tensors belong to (peft.c, peft_write.c). */
enum { LMOE_PART_GATE = 0, LMOE_PART_UP = 1, LMOE_PART_DOWN = 2, LMOE_PART_GATE_UP = 3, LMOE_PART_COUNT = 4 };

/* PEFT's rank_pattern / alpha_pattern keys (peft_pattern.c): why a key is refused
   before compiling it (NULL: usable), and the key compiled as PEFT matches it
   (suffix: "(.*\.)?(key)$" against a module name). False when refused or invalid. */
const char *lmoe_pattern_unusable(const char *key);
bool lmoe_pattern_compile(regex_t *re, const char *key, bool suffix);

/* A PEFT adapter from its two files' bytes (the fuzzer's entry). */
lmoe_status lmoe_peft_open_parts(lmoe_context *ctx, const char *config, size_t config_len,
                                 const void *model, size_t model_len, lmoe_peft **out);

#endif
