/* The forward's host-side plan: the lmoe_fwd the kernels read, from the layer, the
   pool, the forward's buffers and the workspace (carved by lmoe_k_layout), with the
   GEMM configuration from the selector. Plain C, shared by the CUDA backend and the
   simulated device of the tests. */
#include "lmoe_kernels.h"

#include <assert.h>
#include <string.h>

void lmoe_k_plan_pool(int32_t H_, int32_t I_, int32_t num_slots, int32_t max_rank, const void *storage,
                      size_t slot_bytes, size_t off_a13, size_t off_b13, size_t off_a2, size_t off_b2,
                      const lmoe_dslot *slots, lmoe_k_pool_plan *o) {
  size_t H = (size_t)H_, I = (size_t)I_, R = (size_t)max_rank, sb = slot_bytes;
  o->slots = slots;
  o->storage = storage;
  o->num_slots = num_slots;
  o->max_rank = max_rank;
  o->slot_elems = sb / 2;
  o->off_a13 = off_a13 / 2;
  o->off_b13 = off_b13 / 2;
  o->off_a2 = off_a2 / 2;
  o->off_b2 = off_b2 / 2;
  /* each matrix's rows start 16-byte aligned in every slot and every expert */
  o->al_lora = (((off_a13 | sb | (2 * R * H * 2) | (H * 2)) % 16 == 0) ? LMOE_AL_A13 : 0) |
               (((off_b13 | sb | (2 * I * 2 * R * 2) | (2 * R * 2)) % 16 == 0) ? LMOE_AL_B13 : 0) |
               (((off_a2 | sb | (R * I * 2) | (I * 2)) % 16 == 0) ? LMOE_AL_A2 : 0) |
               (((off_b2 | sb | (H * R * 2) | (R * 2)) % 16 == 0) ? LMOE_AL_B2 : 0);
}

size_t lmoe_k_plan(const lmoe_k_plan_args *a, lmoe_fwd *f) {
  const lmoe_k_pool_plan *pool = a->pool;
  lmoe_ws_layout L;
  lmoe_k_layout_fp8(a->max_tokens, a->E, a->H, a->I, a->k, pool ? pool->num_slots : 0,
                    pool ? pool->max_rank : 0, a->fp8, &L);
  if (L.total > a->workspace_bytes || !a->workspace) return L.total;
  uint8_t *ws = a->workspace;

  size_t H = (size_t)a->H, I = (size_t)a->I;
  int32_t al_x = ((((uintptr_t)a->x) | (H * 2)) % 16 == 0 ? LMOE_AL_X : 0) | (H % 8 == 0 ? LMOE_AL_W13 : 0) |
                 (I % 8 == 0 ? LMOE_AL_W2 : 0);
  int lora = a->lora && pool;
  /* the sm90 engine reads x, W13, W2 rows (and with LoRA the pool's B13, B2 rows) in
     16-byte pieces and the weights by TMA (16-byte aligned base and row pitch) */
  int aligned16 = al_x == (LMOE_AL_X | LMOE_AL_W13 | LMOE_AL_W2) && ((uintptr_t)a->w13 | (uintptr_t)a->w2) % 16 == 0 &&
                  (!lora || ((pool->al_lora & (LMOE_AL_B13 | LMOE_AL_B2)) == (LMOE_AL_B13 | LMOE_AL_B2) &&
                             (uintptr_t)pool->storage % 16 == 0));
  lmoe_gemm_choice g;
  int sel = lmoe_gemm_select(a->dev, a->M * a->k, a->E, a->H, a->I, aligned16, &g);
  assert(sel == 0); /* lmoe_k_init accepted the device: every problem finds its rows */
  (void)sel;
  /* the sm90 shrinks read the pool's A13 (A2) rows in 16-byte pieces too: where they
     are not aligned, that shrink on sm80 */
  if (lora) {
    lmoe_gemm_device d80 = *a->dev;
    lmoe_gemm_choice g80;
    d80.shrink_mode = LMOE_SHRINK_SM80;
    if (lmoe_gemm_select(&d80, a->M * a->k, a->E, a->H, a->I, aligned16, &g80) == 0) {
      if (lmoe_gemm_configs[g.shrink13_cfg].engine != LMOE_ENGINE_SM80 && !(pool->al_lora & LMOE_AL_A13))
        g.shrink13_cfg = g80.shrink13_cfg;
      if (lmoe_gemm_configs[g.shrink2_cfg].engine != LMOE_ENGINE_SM80 && !(pool->al_lora & LMOE_AL_A2))
        g.shrink2_cfg = g80.shrink2_cfg;
    }
  }

  /* the sm90 shrinks' pass width, by the rows an expert and active group average; in
     64-column passes shrink2 joins shrink13 on the sm90 row where its K alone would
     keep it on sm80 (gemm_config.h) */
  const int64_t groups = a->groups > 1 ? a->groups : 1;
  const int32_t sn = a->dev->shrink_sn == 64 || a->dev->shrink_sn == 128
                         ? a->dev->shrink_sn
                         : a->M * a->k >= (int64_t)LMOE_SM90_SHRINK_NARROW_ROWS * a->E * groups ? 64 : 128;
  if (lora && sn == 64 && a->dev->shrink_mode == LMOE_SHRINK_BY_K &&
      lmoe_gemm_configs[g.shrink13_cfg].engine == LMOE_ENGINE_SM90 &&
      lmoe_gemm_configs[g.shrink2_cfg].engine == LMOE_ENGINE_SM80 && (pool->al_lora & LMOE_AL_A2))
    g.shrink2_cfg = g.shrink13_cfg;

  memset(f, 0, sizeof *f);
  f->shrink_sn = sn;
  f->M = (int32_t)a->M;
  f->H = a->H;
  f->I = a->I;
  f->E = a->E;
  f->k = a->k;
  f->renorm = a->renorm;
  f->bm = g.bm;
  f->mt_max = (int32_t)((a->M * a->k + (int64_t)a->E * (f->bm - 1)) / f->bm);
  f->h_rows = f->mt_max * f->bm; /* within the workspace's rows (layout.c) */
  f->engine = g.engine;
  f->gemm_cfg = g.gemm_cfg;
  f->shrink13_cfg = g.shrink13_cfg;
  f->shrink2_cfg = g.shrink2_cfg;
  f->gstride = pool ? pool->num_slots + 1 : 1;
  f->cstride = lmoe_k_cnt_stride(f->E, f->gstride);
  f->R = pool ? pool->max_rank : 0;
  f->t13s = L.t13s;
  f->t2s = L.t2s;
  f->x = a->x;
  f->out = a->out;
  f->w13 = a->w13;
  f->w2 = a->w2;
  f->al_x = al_x;
  if (a->logits) {
    f->logits = a->logits;
    f->logits_bf16 = a->logits_bf16;
    f->ids = (int32_t *)(ws + L.ids);
    f->tw = (float *)(ws + L.tw);
  } else {
    f->ids = a->topk_ids;
    f->tw = a->topk_w;
  }
  f->tok_group = (int32_t *)(ws + L.tok_group);
  f->cnt = (int32_t *)(ws + L.cnt);
  f->off = (int32_t *)(ws + L.off);
  f->tile_expert = (int32_t *)(ws + L.tile_expert);
  f->ntiles = (int32_t *)(ws + L.ntiles);
  f->any = (int32_t *)(ws + L.any);
  f->sorted_pair = (int32_t *)(ws + L.sorted_pair);
  f->sorted_group = (int32_t *)(ws + L.sorted_group);
  f->h = (uint16_t *)(ws + L.h);
  f->y = (uint16_t *)(ws + L.y);
  /* x's rows in sorted order for the bf16 sm90 gate_up (gemm_config.h's gather_x) */
  if (!a->fp8 && g.engine == LMOE_ENGINE_SM90 &&
      (a->dev->gather_x == LMOE_GATHER_ON ||
       (a->dev->gather_x == LMOE_GATHER_BY_SHAPE && a->M * a->k >= LMOE_SM90_GATHER_MIN_PAIRS &&
        a->I >= LMOE_SM90_GATHER_MIN_I)))
    f->xg = f->y;
  if (f->xg || a->fp8) f->pair_row = (int32_t *)(ws + L.pair_row);
  f->t13 = (uint16_t *)(ws + L.t13);
  f->t2 = (uint16_t *)(ws + L.t2);
  if (lora) {
    f->slots = pool->slots;
    f->pool = pool->storage;
    f->slot_elems = pool->slot_elems;
    f->off_a13 = pool->off_a13;
    f->off_b13 = pool->off_b13;
    f->off_a2 = pool->off_a2;
    f->off_b2 = pool->off_b2;
    f->al_lora = pool->al_lora;
    f->lora = 1;
    /* shrink2 in the bf16 sm90 gate_up's epilogue (LMOE_SM90_FUSE_T2=1; gemm_config.h):
       its partials in y's region, which nothing reads before down writes it where x is
       not gathered there; A2's rows read 4 bytes at a time (16-byte aligned rows) */
    const size_t planes = (size_t)lmoe_k_t2p_planes(a->I);
    if (a->dev->fuse_t2 && !a->fp8 && g.engine == LMOE_ENGINE_SM90 && !f->xg && f->t2s > 0 &&
        (pool->al_lora & LMOE_AL_A2) && planes <= LMOE_K_T2P_MAX &&
        planes * (size_t)f->h_rows * (size_t)f->t2s * 4 <= L.t13 - L.y /* y's region */)
      f->t2p = (float *)(ws + L.y);
  }
  /* shrink13 inside the bf16 sm90 gate_up, shrink2 inside its down (gemm_config.h's
     fuse_s13, fuse_s2): their B, the pool's A13 (A2) rows, read in 16-byte pieces; by
     the shape where the batch's active adapters' ranks on that side (or, not known,
     groups x the pool's widest) fit LMOE_SM90_FUSE_S13_MAX_COLS columns; shrink2 only
     in 64-row tiles (LMOE_SM90_FUSE_S2_BM) and not where gate_up's epilogue computes it
     (t2p) */
  if (lora && !a->fp8 && g.engine == LMOE_ENGINE_SM90) {
    const int64_t c13 = a->cols13 > 0 ? a->cols13 : groups * (((int64_t)2 * pool->max_rank + 7) / 8 * 8);
    const int64_t c2 = a->cols2 > 0 ? a->cols2 : groups * (((int64_t)pool->max_rank + 7) / 8 * 8);
    if ((pool->al_lora & LMOE_AL_A13) && (a->dev->fuse_s13 == LMOE_FUSE_ON ||
                                          (a->dev->fuse_s13 == LMOE_FUSE_BY_SHAPE && c13 <= LMOE_SM90_FUSE_S13_MAX_COLS)))
      f->s13f = (int32_t *)(ws + L.s13f);
    if ((pool->al_lora & LMOE_AL_A2) && !f->t2p && f->bm == LMOE_SM90_FUSE_S2_BM &&
        (a->dev->fuse_s2 == LMOE_FUSE_ON ||
         (a->dev->fuse_s2 == LMOE_FUSE_BY_SHAPE && c2 <= LMOE_SM90_FUSE_S13_MAX_COLS)))
      f->s2f = (int32_t *)(ws + L.s13f);
  }
  if (a->fp8) { /* gate_up and down go to the FP8 engine (gemm.c); the shrinks as above */
    f->fp8 = 1;
    f->nbh = (a->H + 127) / 128;
    f->nbi = (a->I + 127) / 128;
    f->w13s = a->w13s;
    f->w2s = a->w2s;
    f->xq = (uint8_t *)f->y;
    f->xs = (float *)(ws + L.xs);
    f->hq = ws + L.hq;
    f->hsc = (float *)(ws + L.hsc);
  }
  return L.total;
}

int32_t lmoe_k_shard_chunks(int64_t M, int32_t H, int32_t ranks, int32_t forced, int32_t *bounds) {
  int32_t n = forced > 0 ? forced : ranks < 2 ? 1 : M >= 4096 ? 4 : M >= 1024 ? 2 : 1;
  int32_t blocks = H > 0 ? (H + 255) / 256 : 1; /* of 256 columns, the last maybe narrower */
  if (n > LMOE_K_CHUNKS_MAX) n = LMOE_K_CHUNKS_MAX;
  if (n > blocks) n = blocks;
  for (int32_t c = 0; c < n; c++) { /* blocks shared out evenly, none left empty */
    int64_t at = (int64_t)c * blocks / n * 256;
    bounds[c] = at < H ? (int32_t)at : H;
  }
  bounds[n] = H;
  return n;
}
