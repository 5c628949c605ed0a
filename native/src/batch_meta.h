/* The batch's encoded form: what lmoe_batch_set computes, once, on the host, in the
   layout the device reads. One int32 array:

     [0]                  n, the number of requests
     [1]                  A, the number of active slots
     [2 .. 2+n]           segment offsets (n + 1): request r has tokens [off[r], off[r+1])
     [3+n .. 3+2n)        group of each request: 0 = no adapter, g > 0 = active slot g-1
     [3+2n .. 3+2n+A)     the active slots, increasing

   A group is a dense index into the active slots, so a kernel counts and sorts
   (expert, group) pairs with E * (A + 1) counters however large the slot numbers are.

   Every consumer decodes through these accessors: the cpu backend and the reference
   (host), the cuda backend's staging (a copy, byte for byte), the simulated device
   (tests/sim). They are plain C, and usable from CUDA (LMOE_META_FN), so kernels can
   share them; kernels/lmoe_kernels.h still spells the layout out by hand (its
   lmoe_meta_ints, and the index arithmetic in the kernels), and backend_cuda.c checks
   at compile time that the two agree. */
#ifndef LMOE_BATCH_META_H
#define LMOE_BATCH_META_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define LMOE_META_FN static inline __host__ __device__
#else
#define LMOE_META_FN static inline
#endif

/* Words of the encoding of n requests and a active slots (a constant expression for
   constant arguments). */
#define LMOE_META_WORDS(n, a) (3 + 2 * (size_t)(n) + (size_t)(a))

LMOE_META_FN int32_t lmoe_meta_requests(const int32_t *m) { return m[0]; }
LMOE_META_FN int32_t lmoe_meta_active_count(const int32_t *m) { return m[1]; }
LMOE_META_FN size_t lmoe_meta_words(const int32_t *m) { return LMOE_META_WORDS(m[0], m[1]); }
LMOE_META_FN const int32_t *lmoe_meta_offsets(const int32_t *m) { return m + 2; }
LMOE_META_FN const int32_t *lmoe_meta_groups(const int32_t *m) { return m + 3 + m[0]; }
LMOE_META_FN const int32_t *lmoe_meta_active(const int32_t *m) { return m + 3 + 2 * m[0]; }
/* The slot of a group, -1 for group 0 (no adapter). */
LMOE_META_FN int32_t lmoe_meta_group_slot(const int32_t *m, int32_t group) {
  return group > 0 ? lmoe_meta_active(m)[group - 1] : -1;
}
/* The slot request r uses, -1 for none (or a request without tokens whose slot no
   other request makes active: it reads no adapter either way). */
LMOE_META_FN int32_t lmoe_meta_request_slot(const int32_t *m, int32_t r) {
  return lmoe_meta_group_slot(m, lmoe_meta_groups(m)[r]);
}

#endif
