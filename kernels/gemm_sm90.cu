/* The sm90 GEMM engine: gate_up and down of the forward on Hopper's asynchronous
   warpgroup MMA (wgmma m64n256k16, bf16 in, f32 accumulate), for sm_90a.

     gate_up   h = silu(x W13_e^T (+ t13 B13^T)) * (...)   (gate and up in one 256-wide tile)
     down      y = w * (h W2_e^T (+ t2 B2^T))

   One block per SM walks the device-built tile list (route.cu's ntiles / tile_expert,
   rows sorted by expert, then adapter group): persistent, so the grid is the SM count
   and nothing the host would have to read back sizes it. Warp specialised:
   - warpgroup 0, the producer, fills a ring of ST stages (BM x 64 of A, 256 x 64 of B,
     128-byte swizzle). The expert weights (B) come by TMA, from tensor maps of W13 / W2
     encoded on the host at launch (a pure host computation, so the forward stays
     stream-ordered and capturable); the token rows (A) of gate_up by TMA too where x
     was gathered into sorted order (lmoe_fwd.xg, route.cu's gather_x), else from x by
     token, by cp.async, whose completion arrives on the stage's barrier; down's A, h,
     whose rows are contiguous in sorted order, by TMA.
   - warpgroups 1..BM/64, the consumers, each own 64 rows: 4 wgmmas per stage with
     both operands in shared memory, one group kept in flight (the stage read two
     steps ago is released while the next one computes), the epilogue from registers.
   setmaxnreg hands the producer's registers to the consumers (128 accumulators each).

   LoRA stays inside the pipeline: after a tile's base K chunks come the expand's
   chunks, packed by rank: the adapter groups present in the tile put their rank
   columns side by side on one K axis (each rounded up to 8 columns), A the rows' shrink
   output in their own group's columns (zero elsewhere), B each group's slot's B matrix
   in its columns, both by cp.async; so an adapted tile costs its groups' real ranks
   (four rank-16 groups: one chunk), not a chunk per group.

   The shrinks (k_shrink, below) use the same packed layout on N: 64-row tiles, 128 or
   64 columns a pass (wgmma m64n128k16 or m64n64k16), two blocks an SM. */
#include "common.cuh"
#include "gemm_engine.h"
#include "ptx_sm90.cuh"
#include "sm90_walk.cuh"
#include "tma_host.cuh"

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>

namespace {

enum { MODE_GATEUP = LMOE_OP_GATEUP, MODE_DOWN = LMOE_OP_DOWN };

/* What a launch may vary without another kernel (set once at init, below). */
struct sm90_tune {
  int group_m;    /* row tiles per group of the walk (sm90_tile_of) */
  int epi16;      /* the epilogue's 16-byte stores (0: 4-byte) */
  int tma_a;      /* down's A (h, rows contiguous by sorted row) by TMA instead of cp.async */
  int lora_align; /* columns a LoRA group's segment is rounded to: 64 (a chunk per group) or 8 */
  int expand_tma; /* the expand's t and B by TMA slices (set per launch where its maps exist) */
};

constexpr int BK = 64;  /* K chunk: one 128-byte swizzled row of bf16 */
constexpr int BN = 256; /* output tile columns (gate_up: 128 gate + 128 up) */
constexpr int SF_PASS = 128; /* a fused shrink's columns a pass (lmoe_fwd.s13f, s2f) */

template <int BM> struct shape {
  static constexpr int NC = BM / 64;              /* consumer warpgroups */
  static constexpr int THREADS = 128 * (NC + 1);
  static constexpr uint32_t A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE = A_BYTES + B_BYTES;
  /* registers after setmaxnreg: the block's pool is what the launch allocated,
     numRegs x THREADS (168 x 384 = 64512 for BM = 128); asking more than the pool
     blocks the warpgroup forever */
  static constexpr int PREG = BM == 128 ? 88 : 96;
  static constexpr int CREG = BM == 128 ? 208 : 232;
  static constexpr int POOL = 128 * PREG + 128 * NC * CREG;
};
static_assert(shape<128>::POOL <= 168 * 384, "setmaxnreg asks more than a 384-thread block holds");

/* What the shrinks' producer knows of a tile before loading it (in shared memory):
   each row's source (gate_up's side: its token; down's: its sorted row; -1: padding)
   and adapter group, the tile's expert, and the adapter groups present with their
   slots and ranks (their packed columns: cols). */
template <int BM> struct tile_plan {
  int32_t src[BM], grp[BM];
  int32_t g[BM], slot[BM], rank[BM]; /* the groups present, in row order (at most one a row) */
  int32_t e, ngroups, cols, pad;     /* expert; groups; their packed columns */
};

/* Dynamic shared memory: 1024 bytes of alignment slack, the stages, the barriers, the
   TMA expand's words (four slice groups a stage, two ints for each of a tile's groups),
   a fused shrink's B rows (a pointer a packed column of the pass). */
template <int BM, int ST> constexpr size_t smem_bytes(void) {
  return 1024 + (size_t)ST * shape<BM>::STAGE + 2 * ST * sizeof(uint64_t) + (4 * ST + 2 * BM) * sizeof(int32_t) +
         SF_PASS * sizeof(void *);
}

/* N tiles of an output */
template <int MODE> __host__ __device__ __forceinline__ int n_tiles(const lmoe_fwd &f) {
  return MODE == MODE_GATEUP ? (f.I + BN / 2 - 1) / (BN / 2) : (lmoe_k_down_cols(&f) + BN - 1) / BN;
}

#if LMOE_SM90_DEVICE /* the pipeline's device code exists in sm_90a code only */

/* The producer warpgroup's own barrier (the consumers never wait on it). */
__device__ __forceinline__ void producer_sync(void) { asm volatile("bar.sync 1, 128;" ::: "memory"); }

/* The fused shrinks' row-tile flags (lmoe_fwd.s13f, s2f: one array, zeroed by the scan;
   gate_up's shrink13 item sets a tile's to 1, down's shrink2 item to 2): the item's
   consumers publish t (each thread's stores ordered for the async proxy too, since the
   expand's TMA reads them; then every consumer at one barrier; then a release at GPU
   scope), and an N tile's producer waits for its phase (acquire; then the proxy fence
   before its TMA or cp.async reads). The wait has the pipeline's watchdog. */
__device__ __forceinline__ int ld_acquire_gpu(const int32_t *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void sf_wait(const int32_t *flag, int phase, uint64_t wd_ns) {
  /* the watchdog counts sleeps of at least 256 ns (the clock read kept more registers live
     in the producer than its 88 hold) */
  const uint32_t most = (uint32_t)min(wd_ns / 256, (uint64_t)0xffffffffu);
  for (uint32_t n = 0; ld_acquire_gpu(flag) < phase; n++) {
    __nanosleep(256);
    if (most && n > most) __trap();
  }
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
template <int NC> __device__ __forceinline__ void sf_publish(int32_t *flag, int phase) {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  asm volatile("bar.sync 4, %0;\n" ::"n"(NC * 128) : "memory");
  if (threadIdx.x == 128) asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(phase) : "memory");
}
/* A mode's fused shrink: its row-tile flags (NULL: the shrink is its own kernel) and
   the phase its item publishes. Down's at BM = 64 only: with 128-row tiles even an
   empty branch for the item made ptxas spill 20 bytes in down's consumers (128
   accumulators in 168 registers), so the plan leaves shrink2 to its kernel there. */
template <int MODE, int BM> __device__ __forceinline__ int32_t *shrink_flags(const lmoe_fwd &f) {
  return MODE == MODE_GATEUP ? f.s13f : BM == LMOE_SM90_FUSE_S2_BM ? f.s2f : nullptr;
}
__host__ __device__ constexpr int shrink_phase(int mode) { return mode == MODE_GATEUP ? 1 : 2; }
/* A shrink stage's four k16 steps, W columns wide (wgmma m64nWk16: 64 or 128), A's 64
   rows at as and B's W rows at bs, both 128-byte swizzled K-major tiles; the
   accumulators start from zero where first (k_shrink's passes and the fused shrinks'). */
template <int W> __device__ __forceinline__ void shrink_stage_mma(float *acc, uint32_t as, uint32_t bs, bool first) {
  static_assert(W == 64 || W == 128, "a shrink pass is 64 or 128 columns wide");
  const uint64_t da = desc_sw128(as), db = desc_sw128(bs);
#pragma unroll
  for (int i = 0; i < W / 2; i++) reg_fence(acc[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BK / 16; kk++) {
    if constexpr (W == 128)
      wgmma_m64n128k16(acc, da + 2 * kk, db + 2 * kk, !first || kk > 0);
    else
      wgmma_m64n64k16(acc, da + 2 * kk, db + 2 * kk, !first || kk > 0);
  }
  wgmma_commit();
#pragma unroll
  for (int i = 0; i < W / 2; i++) reg_fence(acc[i]);
}
/* The wgmma width of a fused shrink pass: the columns left, up to SF_PASS, rounded up
   to 64 or 128 */
__device__ __forceinline__ int sf_width(int cols_left) { return cols_left > 64 ? 128 : 64; }

/* The plan of the BM rows at sorted row p0 (expert of row tile me), written by the 128
   producer threads (barrier 1: the consumers never wait on it). GU: gate_up's side
   (rows are tokens of x, ranks r13); else down's (rows of h, ranks r2). */
template <bool GU, int BM>
__device__ __forceinline__ void plan_rows(const lmoe_fwd &f, int p0, int me, int align, tile_plan<BM> &P) {
  for (int r = threadIdx.x; r < BM; r += 128) {
    const int pair = f.sorted_pair[p0 + r];
    P.src[r] = pair < 0 ? -1 : GU ? pair / f.k : p0 + r;
    P.grp[r] = f.sorted_group[p0 + r];
  }
  if (threadIdx.x == 0) P.e = f.tile_expert[me];
  producer_sync(); /* the rows' groups, for warp 0 */
  if (threadIdx.x < 32) {
    /* the LoRA axis: the groups' rank columns side by side, each segment rounded up to
       align columns */
    int n = 0, cols = 0;
    sm90_for_groups<GU, BM>(f, [&](int r) { return P.grp[r]; }, [&](int g, int slot, int rk) {
      if (threadIdx.x == 0) {
        P.g[n] = g;
        P.slot[n] = slot;
        P.rank[n] = rk;
      }
      n++;
      cols += (rk + align - 1) / align * align;
    });
    if (threadIdx.x == 0) {
      P.ngroups = n;
      P.cols = cols;
    }
  }
}

template <int MODE, int BM, int ST>
__device__ __forceinline__ void producer(const lmoe_fwd &f, const CUtensorMap *tmb, const CUtensorMap *tma,
                                         const CUtensorMap *tmt, const CUtensorMap *tmp, int use_lora,
                                         uint8_t *smem, uint64_t *full, uint64_t *empty, volatile int32_t *sg,
                                         int32_t *gl, const uint16_t **btab, uint64_t wd, sm90_tune tn) {
  typedef shape<BM> S;
  constexpr int AR = BM / 16; /* A rows per thread */
  const int ptid = threadIdx.x, ch = ptid & 7, rb = ptid >> 3;
  const int H = f.H, I = f.I;
  const int K = MODE == MODE_GATEUP ? H : I, nbase = (K + BK - 1) / BK, hs = (I + 7) & ~7;
  /* the mode's shrink fused (f.s13f, f.s2f): each row tile's first item of the walk
     computes its t13 (t2) */
  int32_t *const sfl = shrink_flags<MODE, BM>(f);
  const bool fs = use_lora && sfl != nullptr;
  const int ntm = f.ntiles[0], ntn = n_tiles<MODE>(f) + (fs ? 1 : 0), total = ntm * ntn;
  /* A by TMA: down's (h, in sorted order) where tune.tma_a, gate_up's where x was
     gathered into sorted order (xg) */
  const bool a_tma = MODE == MODE_DOWN ? tn.tma_a != 0 : f.xg != nullptr;
  if (ptid == 0) prefetch_tensormap(tmb);
  if (ptid == 0 && a_tma) prefetch_tensormap(tma);
  const bool xtma = use_lora && tn.expand_tma;
  if (ptid == 0 && xtma) {
    prefetch_tensormap(tmt);
    prefetch_tensormap(tmp);
  }
  uint32_t it = 0;
#pragma unroll 1
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    int m, nt;
    sm90_tile_of(t, ntm, ntn, tn.group_m, m, nt);
    const bool shr = fs && nt == 0; /* the row tile's shrink */
    if (fs) nt--;
    const int e = f.tile_expert[m], p0 = m * BM;
    const int n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : f.n0 + nt * BN;
    /* the TMA expand's stages and the tile's groups, walked now (a walk inside the
       expand made ptxas spill): thread 0 keeps them in shared memory, two ints a group */
    int nlx = 0, ng = 0;
    if (xtma && !shr) {
      int cols = 0;
      sm90_for_groups<MODE == MODE_GATEUP, BM>(
          f, [&](int r) { return f.sorted_group[p0 + r]; }, [&](int g, int slot, int rk) {
        if (rk <= 0) return; /* an adapter without this side's parts: no slice (the
                                consumers' count, sm90_lora_chunks, gives it none) */
        if (ptid == 0) {
          gl[2 * ng] = g;
          gl[2 * ng + 1] = slot | (rk << 16);
        }
        ng++;
        cols += (rk + 15) & ~15;
      });
      nlx = (cols + BK - 1) / BK;
    }
    const uint16_t *arow[AR];
#pragma unroll
    for (int q = 0; q < AR; q++) {
      int r = rb + 16 * q, pair = f.sorted_pair[p0 + r];
      if (MODE == MODE_GATEUP)
        arow[q] = pair >= 0 ? f.x + (size_t)(pair / f.k) * H : nullptr;
      else
        arow[q] = pair >= 0 ? f.h + (size_t)(p0 + r) * hs : nullptr;
    }
    if (shr) {
      /* The row tile's shrink: its x or h (A as below) times its groups' A13 or A2 rows
         side by side (B, each group's rank rounded up to 8 columns, zeros past it), by
         cp.async from the pool, in passes of up to SF_PASS columns (btab: a pass's B
         rows). */
      constexpr bool GU = MODE == MODE_GATEUP;
      auto grp_of = [&](int r) { return f.sorted_group[p0 + r]; };
      int cols = 0;
      sm90_for_groups<GU, BM>(f, grp_of, [&](int, int, int rk) { cols += (rk + 7) & ~7; });
#pragma unroll 1
      for (int np = 0; np < cols; np += SF_PASS) {
        static_assert(SF_PASS == 128, "a producer thread a B row of the pass");
        producer_sync(); /* the previous pass's rows are no longer read */
        {
          /* this thread's row: packed column np + ptid, row q of a group's A (or zeros) */
          int off = 0, bslot = -1, bq = 0;
          sm90_for_groups<GU, BM>(f, grp_of, [&](int, int slot, int rk) {
            if (np + ptid >= off && np + ptid < off + rk) {
              bslot = slot;
              bq = np + ptid - off;
            }
            off += (rk + 7) & ~7;
          });
          const uint16_t *sb = f.pool + (size_t)bslot * f.slot_elems;
          btab[ptid] = bslot < 0 ? nullptr
                       : GU      ? sb + f.off_a13 + ((size_t)e * 2 * f.R + bq) * H
                                 : sb + f.off_a2 + ((size_t)e * f.R + bq) * I;
        }
        producer_sync();
        const int W = sf_width(cols - np);
#pragma unroll 1
        for (int c = 0; c < nbase; c++, it++) {
          const int s = it % ST;
          mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
          uint8_t *As = smem + s * S::STAGE, *Bs = As + S::A_BYTES;
          if (ptid == 0) {
            if (a_tma) {
              mbar_arrive_tx(&full[s], S::A_BYTES);
              tma_load_2d(As, tma, &full[s], c * BK, p0);
            } else {
              mbar_arrive(&full[s]);
            }
          }
          const int col = c * BK + ch * 8, nb = sm90_piece_bytes(col, K, 2);
          const uint32_t a0 = smem_u32(As), b0 = smem_u32(Bs);
          if (!a_tma) {
#pragma unroll
            for (int q = 0; q < AR; q++) {
              int r = rb + 16 * q;
              const uint16_t *src = arow[q] ? arow[q] + col : f.x;
              cp_async16_s(a0 + r * 128 + ((ch ^ (r & 7)) << 4), src, arow[q] ? nb : 0);
            }
          }
#pragma unroll 1
          for (int n = rb; n < W; n += 16) {
            const uint16_t *src = btab[n];
            cp_async16_s(b0 + n * 128 + ((ch ^ (n & 7)) << 4), src ? src + col : f.x, src ? nb : 0);
          }
          cp_async_mbar_arrive(&full[s]);
        }
      }
      continue;
    }
    int agrp[AR]; /* the rows' groups, for the cp.async expand */
#pragma unroll
    for (int q = 0; q < AR; q++) agrp[q] = use_lora ? f.sorted_group[p0 + rb + 16 * q] : 0;
#pragma unroll 1
    for (int c = 0; c < nbase; c++, it++) {
      const int s = it % ST;
      mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
      uint8_t *As = smem + s * S::STAGE, *Bs = As + S::A_BYTES;
      /* thread 0 arrives expecting the stage's TMA bytes (B's boxes, and A's where A
         comes by TMA) and issues B's boxes (and down's A box) */
      if (ptid == 0) {
        mbar_arrive_tx(&full[s], (a_tma ? S::A_BYTES : 0) + S::B_BYTES);
        if (a_tma) tma_load_2d(As, tma, &full[s], c * BK, p0);
        if (MODE == MODE_GATEUP) {
          const int row = e * 2 * I + n0;
          tma_load_2d(Bs, tmb, &full[s], c * BK, row);
          tma_load_2d(Bs + (BN / 2) * BK * 2, tmb, &full[s], c * BK, row + I);
        } else {
          tma_load_2d(Bs, tmb, &full[s], c * BK, e * H + n0);
        }
      }
      if (a_tma) {
        /* the threads' plain arrivals stand for the cp.async ones the barrier counts */
        mbar_arrive(&full[s]);
        continue;
      }
      const int col = c * BK + ch * 8, nb = sm90_piece_bytes(col, K, 2);
      const uint32_t a0 = smem_u32(As);
#pragma unroll
      for (int q = 0; q < AR; q++) {
        int r = rb + 16 * q;
        const uint16_t *src = arow[q] ? arow[q] + col : f.x;
        cp_async16_s(a0 + r * 128 + ((ch ^ (r & 7)) << 4), src, arow[q] ? nb : 0);
      }
      cp_async_mbar_arrive(&full[s]);
    }
    if (xtma) {
      /* The expand by TMA (the default; LMOE_SM90_EXPAND_TMA=0: the cp.async one
         below): as the FP8 engine's (gemm_sm90_fp8.cu, gpu-notes 43), each group's rank
         in 16-column slices, four a stage, t's box and B's by TMA from thread 0 with
         their bytes expected on the stage's barrier; the consumers zero the rows of
         another group and the unused slices' t. */
      constexpr int SLA = BM * 32, SLB = BN * 32;
      static_assert(4 * SLA == (int)S::A_BYTES && 4 * SLB == (int)S::B_BYTES, "four slices a stage");
      if (fs && nlx > 0) { /* t by this walk's item: a lane of warp 1 acquires it (in
                              thread 0, which issues the TMA, the wait made ptxas spill) */
        if (ptid == 32) sf_wait(sfl + m, shrink_phase(MODE), wd);
        producer_sync();
        if (ptid == 0) asm volatile("fence.proxy.async.global;\n" ::: "memory");
      }
      int gi = 0, k0 = 0;
#pragma unroll 1
      for (int stg = 0; stg < nlx; stg++, it++) {
        const int s = it % ST;
        mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
        if (ptid == 0) {
#pragma unroll 1
          for (int j = 0; j < 4; j++) {
            if (gi >= ng) {
              sg[s * 4 + j] = -1;
              continue;
            }
            const int g = gl[2 * gi], sr = gl[2 * gi + 1], slot = sr & 0xffff, rk = sr >> 16;
            uint8_t *as = smem + s * S::STAGE + j * SLA, *bs = smem + s * S::STAGE + S::A_BYTES + j * SLB;
            sg[s * 4 + j] = g;
            mbar_expect_tx(&full[s], SLA + SLB);
            tma_load_2d(as, tmt, &full[s], k0, p0);
            if (MODE == MODE_GATEUP) {
              tma_load_3d(bs, tmp, &full[s], k0, e * 2 * I + n0, slot);
              tma_load_3d(bs + (BN / 2) * 32, tmp, &full[s], k0, e * 2 * I + I + n0, slot);
            } else {
              tma_load_3d(bs, tmp, &full[s], k0, e * H + n0, slot);
            }
            k0 += 16;
            if (k0 >= rk) {
              gi++;
              k0 = 0;
            }
          }
          mbar_arrive(&full[s]);
        }
        mbar_arrive(&full[s]);
      }
    } else if (use_lora) {
      if (fs) { /* t by this walk's item: thread 0 acquires it for the producer */
        if (ptid == 0) sf_wait(sfl + m, shrink_phase(MODE), wd);
        producer_sync();
      }
      /* This thread's 16-byte piece of a stage (column col of group g's rank, nb bytes
         of it; pb NULL: zeros): for every A row its own group's t or zero, for every
         output column the slot's B. */
      auto load_piece = [&](uint32_t a0, uint32_t b0, int g, const uint16_t *pb, int col, int nb) {
#pragma unroll
        for (int q = 0; q < AR; q++) {
          int r = rb + 16 * q;
          const uint16_t *row = nullptr;
          if (pb && agrp[q] == g && arow[q])
            row = MODE == MODE_GATEUP ? f.t13 + (size_t)(p0 + r) * f.t13s : f.t2 + (size_t)(p0 + r) * f.t2s;
          cp_async16_s(a0 + r * 128 + ((ch ^ (r & 7)) << 4), row ? row + col : f.x, row ? nb : 0);
        }
#pragma unroll 4
        for (int q = 0; q < BN / 16; q++) {
          int n = rb + 16 * q;
          const uint16_t *row = nullptr;
          if (pb && MODE == MODE_GATEUP) {
            int j = n0 + (n & (BN / 2 - 1)), which = n / (BN / 2);
            if (j < I) row = pb + ((size_t)e * 2 * I + (size_t)which * I + j) * (2 * f.R);
          } else if (pb) {
            int o = n0 + n;
            if (o < H) row = pb + ((size_t)e * H + o) * f.R;
          }
          cp_async16_s(b0 + n * 128 + ((ch ^ (n & 7)) << 4), row ? row + col : f.x, row ? nb : 0);
        }
      };
      /* The groups' rank columns side by side on one K axis, each segment rounded up
         to lora_align columns, cut into 64-wide chunks (sm90_lora_chunks counts them). At
         lora_align 64 every group starts a chunk of its own (ceil(rank / 64) chunks a
         group); at 8, the packed expand, a tile with four rank-16 groups costs one
         chunk. The pieces past the last segment are zero (a stage keeps older data). */
      const int align = tn.lora_align;
      int off = 0, open = -1, s = 0;
      uint32_t a0 = 0, b0 = 0;
      sm90_for_groups<MODE == MODE_GATEUP, BM>(
          f, [&](int r) { return f.sorted_group[p0 + r]; }, [&](int g, int slot, int rk) {
        const uint16_t *pb = f.pool + (size_t)slot * f.slot_elems + (MODE == MODE_GATEUP ? f.off_b13 : f.off_b2);
        const int w = (rk + align - 1) / align * align;
#pragma unroll 1
        for (int c0 = off; c0 < off + w;) {
          const int cc = c0 / BK, cend = min(off + w, (cc + 1) * BK);
          if (cc != open) {
            if (open >= 0) {
              cp_async_mbar_arrive(&full[s]);
              it++;
            }
            open = cc;
            s = it % ST;
            mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
            if (ptid == 0) mbar_arrive(&full[s]);
            a0 = smem_u32(smem + s * S::STAGE);
            b0 = a0 + S::A_BYTES;
          }
          const int pc = cc * BK + ch * 8; /* this thread's piece, on the K axis */
          if (pc >= c0 && pc < cend) load_piece(a0, b0, g, pb, pc - off, sm90_piece_bytes(pc - off, rk, 2));
          c0 = cend;
        }
        off += w;
      });
      if (open >= 0) {
        if (open * BK + ch * 8 >= off) load_piece(a0, b0, -1, nullptr, 0, 0);
        cp_async_mbar_arrive(&full[s]);
        it++;
      }
    }
  }
}

template <int MODE, int BM, int ST>
__device__ __forceinline__ void consumer(const lmoe_fwd &f, int use_lora, uint8_t *smem, uint64_t *full,
                                         uint64_t *empty, const int32_t *sg, uint64_t wd, sm90_tune tn) {
  typedef shape<BM> S;
  const int wgc = threadIdx.x / 128 - 1, ltid = threadIdx.x & 127;
  const int warp = ltid >> 5, lane = ltid & 31;
  /* the TMA expand: every thread releases a stage (it wrote zeros into it), else one a
     warpgroup */
  const bool xtma = use_lora && tn.expand_tma, rel = ltid == 0 || xtma;
  const int H = f.H, I = f.I;
  const int K = MODE == MODE_GATEUP ? H : I, nbase = (K + BK - 1) / BK, hs = (I + 7) & ~7;
  int32_t *const sfl = shrink_flags<MODE, BM>(f);
  const bool fs = use_lora && sfl != nullptr; /* as the producer's */
  const int ntm = f.ntiles[0], ntn = n_tiles<MODE>(f) + (fs ? 1 : 0), total = ntm * ntn;
  float acc[128];
  uint32_t it = 0;
#pragma unroll 1
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    int m, nt;
    sm90_tile_of(t, ntm, ntn, tn.group_m, m, nt);
    const bool shr = fs && nt == 0;
    if (fs) nt--;
    const int p0 = m * BM;
    if (shr) {
      /* The row tile's shrink (the producer's passes): each of this thread's rows keeps
         its own group's columns, t = scale x acc, as the shrink kernels write it */
      constexpr bool GU = MODE == MODE_GATEUP;
      const int r0 = p0 + wgc * 64 + warp * 16 + (lane >> 2);
      const int pre_pair[2] = {f.sorted_pair[r0], f.sorted_pair[r0 + 8]};
      const int rg[2] = {f.sorted_group[r0], f.sorted_group[r0 + 8]};
      int cols = 0, roff[2] = {-1, -1}, rrk[2] = {0, 0}, rsl[2] = {0, 0};
      sm90_for_groups<GU, BM>(f, [&](int r) { return f.sorted_group[p0 + r]; }, [&](int g, int slot, int rk) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++)
          if (g == rg[hf] && pre_pair[hf] >= 0) {
            roff[hf] = cols;
            rrk[hf] = rk;
            rsl[hf] = slot;
          }
        cols += (rk + 7) & ~7;
      });
      /* a pass's main loop at one wgmma width (the width's branch outside the loop: inside
         it, ptxas merged three accumulator shapes at every step and spilled) */
      auto pass = [&](auto wtag) {
        constexpr int WW = decltype(wtag)::value;
#pragma unroll 1
        for (int c = 0; c < nbase; c++, it++) {
          const int s = it % ST;
          mbar_wait(&full[s], (it / ST) & 1, wd);
          fence_proxy_async();
          shrink_stage_mma<WW>(acc, smem_u32(smem + s * S::STAGE) + wgc * 64 * 128,
                               smem_u32(smem + s * S::STAGE + S::A_BYTES), c == 0);
          if (c > 0) {
            wgmma_wait<1>();
            if (rel) mbar_arrive(&empty[(it - 1) % ST]);
          }
        }
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < WW / 2; i++) reg_fence(acc[i]);
        if (rel) mbar_arrive(&empty[(it - 1) % ST]);
      };
#pragma unroll 1
      for (int np = 0; np < cols; np += SF_PASS) {
        const int W = sf_width(cols - np);
        if (W == 128)
          pass(std::integral_constant<int, 128>());
        else
          pass(std::integral_constant<int, 64>());
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
          if (roff[hf] < 0) continue;
          const int w = (rrk[hf] + 7) & ~7;
          const lmoe_dslot ds = f.slots[rsl[hf]];
          uint16_t *trow = GU ? f.t13 + (size_t)(r0 + 8 * hf) * f.t13s : f.t2 + (size_t)(r0 + 8 * hf) * f.t2s;
#pragma unroll
          for (int i = 0; i < SF_PASS / 8; i++) {
            const int cc = np + 8 * i + 2 * (lane & 3) - roff[hf];
            if (8 * i >= W || cc < 0 || cc >= w) continue;
            float s0 = ds.sd, s1 = ds.sd;
            if (GU) {
              s0 = cc >= ds.g_lo && cc < ds.g_hi ? ds.sg : cc >= ds.u_lo && cc < ds.u_hi ? ds.su : 0.0f;
              s1 = cc + 1 >= ds.g_lo && cc + 1 < ds.g_hi ? ds.sg : cc + 1 >= ds.u_lo && cc + 1 < ds.u_hi ? ds.su : 0.0f;
            }
            *(uint32_t *)(trow + cc) = pack2(s0 * acc[4 * i + 2 * hf], s1 * acc[4 * i + 2 * hf + 1]);
          }
        }
      }
      /* gate_up: the accumulators' values end here (as its epilogue does, so that the
         next tile's first wgmma does not keep them live through this item). Not in down,
         whose epilogue leaves them live: there the zeros made ptxas serialise every
         wgmma of the kernel (its C7515 remark) */
      if (MODE == MODE_GATEUP) {
#pragma unroll
        for (int i = 0; i < 128; i++) acc[i] = 0.0f;
      }
      sf_publish<S::NC>(sfl + m, shrink_phase(MODE));
      continue;
    }
    const int n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : f.n0 + nt * BN;
    /* this thread's two rows (r, r + 8): their pairs loaded now, down's weights after the
       first chunk's MMA is issued, so the epilogue does not wait on a dependent load
       chain (gpu-notes 26) */
    const int r0 = p0 + wgc * 64 + warp * 16 + (lane >> 2);
    const int pre_pair[2] = {f.sorted_pair[r0], f.sorted_pair[r0 + 8]};
    float pre_w[2] = {0.0f, 0.0f};
    /* shrink2 in this epilogue (f.t2p): the rows' groups and the tile's expert now,
       their slots after the first chunk's MMAs, ranks and A2's lines a few chunks on */
    const bool t2f = MODE == MODE_GATEUP && use_lora && f.t2p != nullptr;
    sm90_t2rows t2r = {{-1, -1}, {0, 0}, {0, 0}};
    int te = 0;
    if (t2f) {
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int g = f.sorted_group[r0 + 8 * hf];
        t2r.g[hf] = pre_pair[hf] >= 0 && g >= 1 && g != PAD_GROUP ? g : -1;
      }
      te = f.tile_expert[m];
    }
    int nch = nbase;
    if (use_lora) nch += sm90_lora_chunks<MODE == MODE_GATEUP, BM>(f, p0, xtma ? 16 : tn.lora_align, BK);
    /* the TMA expand: the group of the row whose slice rows this thread zeroes (row
       ltid / 2 of the warpgroup's 64, half ltid % 2 of its 32 bytes) */
    const int zg = xtma ? f.sorted_group[p0 + wgc * 64 + (ltid >> 1)] : 0;
#pragma unroll 1
    for (int c = 0; c < nch; c++, it++) {
      const int s = it % ST;
      mbar_wait(&full[s], (it / ST) & 1, wd);
      fence_proxy_async();
      const uint32_t as = smem_u32(smem + s * S::STAGE) + wgc * 64 * 128, bs = smem_u32(smem + s * S::STAGE + S::A_BYTES);
      if (xtma && c >= nbase) {
        /* an expand stage of the TMA expand: as the FP8 engine's (t's rows of another
           group zeroed, then a k16 step a slice; an unused slice's t all zeroed, times the
           first slice's B) */
        const uint32_t st0 = smem_u32(smem + s * S::STAGE), sgu = smem_u32(sg + 4 * s);
        constexpr int SLA = BM * 32, SLB = BN * 32;
        int sl[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const int g = lds_s32(sgu + 4 * j);
          sl[j] = g >= 0 ? j : 0;
          if (g < 0 || g != zg) sts_zero16(st0 + j * SLA + (wgc * 64 + (ltid >> 1)) * 32 + (ltid & 1) * 16);
        }
        fence_proxy_async();
        asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wgc) : "memory");
#pragma unroll
        for (int i = 0; i < 128; i++) reg_fence(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; j++)
          wgmma_m64n256k16(acc, desc_sw32(st0 + j * SLA + wgc * 64 * 32), desc_sw32(st0 + S::A_BYTES + sl[j] * SLB), 1);
        wgmma_commit();
      } else {
        const uint64_t da = desc_sw128(as), db = desc_sw128(bs);
#pragma unroll
        for (int i = 0; i < 128; i++) reg_fence(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wgmma_m64n256k16(acc, da + 2 * kk, db + 2 * kk, c > 0 || kk > 0);
        wgmma_commit();
      }
#pragma unroll
      for (int i = 0; i < 128; i++) reg_fence(acc[i]);
      if (c > 0) {
        wgmma_wait<1>();
        if (rel) mbar_arrive(&empty[(it - 1) % ST]);
      } else if (MODE == MODE_DOWN) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) pre_w[hf] = pre_pair[hf] >= 0 ? f.tw[pre_pair[hf]] : 0.0f;
      }
      if (t2f && c == 0) sm90_t2rows_slots(f, t2r);
      if (t2f && c == min(2, nch - 1)) sm90_t2rows_ranks<16>(f, t2r, te, n0);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; i++) reg_fence(acc[i]);
    if (rel) mbar_arrive(&empty[(it - 1) % ST]);

    /* epilogue: thread holds rows r and r + 8, columns 8i + 2(lane % 4) + {0, 1};
       gate_up's h of them packed in bf16 (hp), for the stores and the fused shrink2 */
    uint32_t hp[2][16];
    if (MODE == MODE_GATEUP) {
#pragma unroll
      for (int hf = 0; hf < 2; hf++)
#pragma unroll
        for (int i = 0; i < 16; i++)
          hp[hf][i] = pack2(silu_mul(acc[4 * i + 2 * hf], acc[4 * (i + 16) + 2 * hf]),
                            silu_mul(acc[4 * i + 2 * hf + 1], acc[4 * (i + 16) + 2 * hf + 1]));
      /* the accumulators' values end here: the next tile's first wgmma ignores them
         (scale-d 0) but reads its registers, which would keep them live through the
         fused shrink2 below (ptxas spilled) */
#pragma unroll
      for (int i = 0; i < 128; i++) acc[i] = 0.0f;
    }
    if (t2f) sm90_shrink2_part<16>(f, hp, t2r, te, n0, nt, r0);
    if (tn.epi16) {
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int r = wgc * 64 + warp * 16 + (lane >> 2) + hf * 8;
        const int pair = pre_pair[hf];
        if (MODE == MODE_GATEUP) {
          store_row16<16>(f.h + (size_t)(p0 + r) * hs, n0, I, pair >= 0, [&](int i) { return hp[hf][i]; });
        } else {
          const float w = pre_w[hf];
          store_row16<32>(f.y + (size_t)(pair >= 0 ? pair : 0) * H, n0, H, pair >= 0,
                          [&](int i) { return pack2(w * acc[4 * i + 2 * hf], w * acc[4 * i + 2 * hf + 1]); });
        }
      }
      continue;
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = wgc * 64 + warp * 16 + (lane >> 2) + hf * 8;
      const int pair = pre_pair[hf];
      if (pair < 0) continue;
      if (MODE == MODE_GATEUP) {
        uint16_t *dst = f.h + (size_t)(p0 + r) * hs;
#pragma unroll
        for (int i = 0; i < 16; i++) {
          int j = n0 + 8 * i + 2 * (lane & 3);
          if (j + 1 < I)
            *(uint32_t *)(dst + j) = hp[hf][i];
          else if (j < I)
            dst[j] = (uint16_t)(hp[hf][i] & 0xffffu);
        }
      } else {
        const float w = pre_w[hf];
        uint16_t *dst = f.y + (size_t)pair * H;
#pragma unroll
        for (int i = 0; i < 32; i++) {
          int o = n0 + 8 * i + 2 * (lane & 3);
          uint16_t v0 = f2bf(w * acc[4 * i + 2 * hf]), v1 = f2bf(w * acc[4 * i + 2 * hf + 1]);
          if (o + 1 < H)
            *(uint32_t *)(dst + o) = (uint32_t)v0 | ((uint32_t)v1 << 16);
          else if (o < H)
            dst[o] = v0;
        }
      }
    }
  }
}

#endif /* LMOE_SM90_DEVICE */

template <int MODE, int BM, int ST>
__global__ void __launch_bounds__(shape<BM>::THREADS, 1)
    k_wgmma(const __grid_constant__ lmoe_fwd f, const __grid_constant__ CUtensorMap tmb,
            const __grid_constant__ CUtensorMap tma, const __grid_constant__ CUtensorMap tmt,
            const __grid_constant__ CUtensorMap tmp, int lora, unsigned long long wd, sm90_tune tn) {
#if LMOE_SM90_DEVICE
  typedef shape<BM> S;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t *smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
  uint64_t *full = (uint64_t *)(smem + ST * S::STAGE), *empty = full + ST;
  int32_t *sg = (int32_t *)(empty + ST); /* the TMA expand's slice groups, four a stage */
  int32_t *gl = sg + 4 * ST;             /* and its tile's groups (producer thread 0) */
  const uint16_t **btab = (const uint16_t **)(gl + 2 * BM); /* a fused shrink's B rows */
  const int use_lora = lora && f.meta && f.meta[1] > 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 128 + 1); /* the producer's cp.async arrivals + one (TMA tx) */
      /* one per consumer warpgroup; with the TMA expand, whose consumers write zeros
         into a stage, every consumer thread after its own writes (so that each write
         is ordered before the stage's refill by the barrier itself) */
      mbar_init(&empty[s], use_lora && tn.expand_tma ? S::NC * 128 : S::NC);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<S::PREG>();
    producer<MODE, BM, ST>(f, &tmb, &tma, &tmt, &tmp, use_lora, smem, full, empty, sg, gl, btab, wd, tn);
  } else {
    setmaxnreg_inc<S::CREG>();
    consumer<MODE, BM, ST>(f, use_lora, smem, full, empty, sg, wd, tn);
  }
#endif
}

/* ------------------------------------------------------------------ the shrinks

     shrink13  t13 = scale * (x A13^T)        shrink2  t2 = sd * (h A2^T)

   Tiles of SBM = 64 sorted rows (a forward's row tile holds one or two). A tile computes
   the adapter groups present side by side on N, in the expand's packed layout (each
   group's rank rounded up to 8 columns), in passes of W = 128 columns (wgmma
   m64n128k16, 4 stages) or, where the plan says a tile holds few groups
   (lmoe_fwd.shrink_sn), of 64 (m64n64k16, 6 stages: more rows in flight, gpu-notes 45);
   each row keeps its own group's columns. One producer warpgroup loads A
   (the rows of x or h that have a group) and B (the groups' A13 or A2 rows) by
   cp.async; one consumer warpgroup. The stage opening a pass carries what the
   consumer's epilogue needs (the rows' segments), the stage closing it says so, and a
   last stage tells the consumer to stop, so the consumer never reads the producer's
   plan; every consumer thread releases a stage itself, after its own reads of those
   words. Two blocks an SM. */
constexpr int SBM = 64, SN = 128; /* SN: the wide pass (rows 8, 9); lmoe_fwd.shrink_sn picks 64 or it */
constexpr int SHRINK_NARROW_ST = 6;  /* stages of the 64-column passes (17 KB each) */
struct shrink_meta {
  int32_t p0, n0, flags, pad;
  int32_t off[SBM], rank[SBM], slot[SBM]; /* the row's group's segment start (-1: none), rank, slot */
};
enum { SH_PASS_END = 1, SH_EXIT = 2 };
template <int W> struct shrink_shape {
  static constexpr uint32_t A_BYTES = SBM * BK * 2, B_BYTES = W * BK * 2;
  static constexpr uint32_t META = (sizeof(shrink_meta) + 1023) / 1024 * 1024; /* stages stay 1024-aligned */
  static constexpr uint32_t STAGE = A_BYTES + B_BYTES + META;
};
template <int ST, int W = SN> __host__ __device__ constexpr size_t shrink_smem_bytes(void) {
  return 1024 + (size_t)ST * shrink_shape<W>::STAGE + 2 * ST * sizeof(uint64_t) + sizeof(tile_plan<SBM>);
}

#if LMOE_SM90_DEVICE

template <int MODE, int ST, int W>
__device__ __forceinline__ void shrink_producer(const lmoe_fwd &f, uint8_t *smem, uint64_t *full, uint64_t *empty,
                                                tile_plan<SBM> &P, uint64_t wd) {
  typedef shrink_shape<W> S;
  constexpr bool GU = MODE == LMOE_OP_SHRINK13;
  const int ptid = threadIdx.x, ch = ptid & 7, rb = ptid >> 3;
  const int H = f.H, I = f.I, R = f.R, K = GU ? H : I, nbase = (K + BK - 1) / BK, hs = (I + 7) & ~7;
  const int total = f.ntiles[0] * (f.bm / SBM);
  uint32_t it = 0;
#pragma unroll 1
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int p0 = t * SBM;
    producer_sync(); /* the previous tile's plan is no longer read */
    plan_rows<GU, SBM>(f, p0, p0 / f.bm, 8, P);
    producer_sync();
    const int cols = P.cols, ng = P.ngroups, e = P.e;
    if (cols == 0) continue;
    const uint16_t *arow[SBM / 16]; /* this thread's A rows: the rows with a group (NULL: zeros) */
#pragma unroll
    for (int q = 0; q < SBM / 16; q++) {
      const int r = rb + 16 * q, src = P.src[r], g = P.grp[r];
      arow[q] = src >= 0 && g >= 1 && g != PAD_GROUP ? (GU ? f.x + (size_t)src * H : f.h + (size_t)src * hs) : nullptr;
    }
#pragma unroll 1
    for (int n0 = 0; n0 < cols; n0 += W) {
      const uint16_t *brow[W / 16]; /* this thread's B rows: packed column n0 + n of a group's A */
#pragma unroll
      for (int q = 0; q < W / 16; q++) {
        const int pc = n0 + rb + 16 * q;
        brow[q] = nullptr;
        int off = 0;
#pragma unroll 1
        for (int j = 0; j < ng; j++) {
          const int rk = P.rank[j], w = (rk + 7) & ~7;
          if (pc < off + w) {
            const int q2 = pc - off;
            if (q2 < rk) {
              const uint16_t *base = f.pool + (size_t)P.slot[j] * f.slot_elems;
              brow[q] = GU ? base + f.off_a13 + ((size_t)e * 2 * R + q2) * H : base + f.off_a2 + ((size_t)e * R + q2) * I;
            }
            break;
          }
          off += w;
        }
      }
#pragma unroll 1
      for (int c = 0; c < nbase; c++, it++) {
        const int s = it % ST;
        mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
        uint8_t *As = smem + s * S::STAGE, *Bs = As + S::A_BYTES;
        if (ptid == 0) {
          shrink_meta *M = (shrink_meta *)(Bs + S::B_BYTES);
          if (c == 0) {
            M->p0 = p0;
            M->n0 = n0;
            for (int r = 0; r < SBM; r++) {
              const int g = P.grp[r];
              int off = 0, o = -1, rk = 0, sl = 0;
              for (int j = 0; j < ng; j++) {
                if (P.g[j] == g) {
                  o = off;
                  rk = P.rank[j];
                  sl = P.slot[j];
                  break;
                }
                off += (P.rank[j] + 7) & ~7;
              }
              M->off[r] = P.src[r] >= 0 ? o : -1;
              M->rank[r] = rk;
              M->slot[r] = sl;
            }
          }
          M->flags = c == nbase - 1 ? SH_PASS_END : 0;
          mbar_arrive(&full[s]);
        }
        const int col = c * BK + ch * 8, nb = sm90_piece_bytes(col, K, 2);
        const uint32_t a0 = smem_u32(As), b0 = smem_u32(Bs);
#pragma unroll
        for (int q = 0; q < SBM / 16; q++) {
          const int r = rb + 16 * q;
          cp_async16_s(a0 + r * 128 + ((ch ^ (r & 7)) << 4), arow[q] ? arow[q] + col : f.x, arow[q] ? nb : 0);
        }
#pragma unroll
        for (int q = 0; q < W / 16; q++) {
          const int n = rb + 16 * q;
          cp_async16_s(b0 + n * 128 + ((ch ^ (n & 7)) << 4), brow[q] ? brow[q] + col : f.x, brow[q] ? nb : 0);
        }
        cp_async_mbar_arrive(&full[s]);
      }
    }
  }
  /* the last stage: the consumer stops */
  const int s = it % ST;
  mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
  if (ptid == 0) {
    ((shrink_meta *)(smem + s * S::STAGE + S::A_BYTES + S::B_BYTES))->flags = SH_EXIT;
    mbar_arrive(&full[s]);
  }
  mbar_arrive(&full[s]);
}

template <int MODE, int ST, int W>
__device__ __forceinline__ void shrink_consumer(const lmoe_fwd &f, uint8_t *smem, uint64_t *full, uint64_t *empty,
                                                uint64_t wd) {
  typedef shrink_shape<W> S;
  const int ltid = threadIdx.x - 128, warp = ltid >> 5, lane = ltid & 31;
  uint16_t *tb = MODE == LMOE_OP_SHRINK13 ? f.t13 : f.t2;
  const int ts = MODE == LMOE_OP_SHRINK13 ? f.t13s : f.t2s;
  float acc[W / 2];
  uint32_t it = 0;
#pragma unroll 1
  for (;;) {
    int s = it % ST;
    mbar_wait(&full[s], (it / ST) & 1, wd);
    const shrink_meta *M = (const shrink_meta *)(smem + s * S::STAGE + S::A_BYTES + S::B_BYTES);
    if (M->flags & SH_EXIT) break;
    const int p0 = M->p0, n0 = M->n0;
    int off[2], rank[2], slot[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = warp * 16 + (lane >> 2) + hf * 8;
      off[hf] = M->off[r];
      rank[hf] = M->rank[r];
      slot[hf] = M->slot[r];
    }
#pragma unroll 1
    for (int c = 0;; c++, it++) {
      s = it % ST;
      if (c > 0) mbar_wait(&full[s], (it / ST) & 1, wd);
      fence_proxy_async();
      const uint32_t as = smem_u32(smem + s * S::STAGE);
      shrink_stage_mma<W>(acc, as, as + S::A_BYTES, c == 0);
      if (c > 0) {
        wgmma_wait<1>();
        mbar_arrive(&empty[(it - 1) % ST]);
      }
      const int fl = ((const volatile shrink_meta *)(smem + s * S::STAGE + S::A_BYTES + S::B_BYTES))->flags;
      if (fl & SH_PASS_END) {
        it++;
        break;
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < W / 2; i++) reg_fence(acc[i]);
    mbar_arrive(&empty[(it - 1) % ST]);
    /* each row keeps its group's columns of the pass: t = scale * acc (zero past the
       rank, where B's rows are zero) */
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      if (off[hf] < 0) continue;
      const int r = warp * 16 + (lane >> 2) + hf * 8, w = (rank[hf] + 7) & ~7;
      const lmoe_dslot ds = f.slots[slot[hf]];
      uint16_t *trow = tb + (size_t)(p0 + r) * ts;
#pragma unroll
      for (int i = 0; i < W / 8; i++) {
        const int cc = n0 + 8 * i + 2 * (lane & 3) - off[hf];
        if (cc < 0 || cc >= w) continue;
        float s0, s1;
        if (MODE == LMOE_OP_SHRINK13) {
          s0 = cc >= ds.g_lo && cc < ds.g_hi ? ds.sg : cc >= ds.u_lo && cc < ds.u_hi ? ds.su : 0.0f;
          s1 = cc + 1 >= ds.g_lo && cc + 1 < ds.g_hi ? ds.sg : cc + 1 >= ds.u_lo && cc + 1 < ds.u_hi ? ds.su : 0.0f;
        } else {
          s0 = s1 = ds.sd;
        }
        *(uint32_t *)(trow + cc) = pack2(s0 * acc[4 * i + 2 * hf], s1 * acc[4 * i + 2 * hf + 1]);
      }
    }
  }
}

#endif /* LMOE_SM90_DEVICE */

template <int MODE, int ST, int W>
__global__ void __launch_bounds__(256, 2) k_shrink(const __grid_constant__ lmoe_fwd f, unsigned long long wd) {
#if LMOE_SM90_DEVICE
  if (!f.meta || f.meta[1] == 0) return; /* nothing active: exit at once */
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t *smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
  uint64_t *full = (uint64_t *)(smem + ST * shrink_shape<W>::STAGE), *empty = full + ST;
  tile_plan<SBM> *plan = (tile_plan<SBM> *)(empty + ST);
  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 128 + 1); /* the producer's cp.async arrivals + thread 0's (the stage's words) */
      mbar_init(&empty[s], 128);    /* every consumer thread (each after its own reads of the stage's words) */
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128)
    shrink_producer<MODE, ST, W>(f, smem, full, empty, *plan, wd);
  else
    shrink_consumer<MODE, ST, W>(f, smem, full, empty, wd);
#endif
}

/* Fills what a dense GEMM through the down kernel reads: identity pairs (padding
   rows -1), weights 1, one expert, the tile count. */
__global__ void k_dense_setup(int32_t *pair, float *tw, int32_t *tile_expert, int32_t *ntiles, int M, int rows,
                              int mt) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows; i += gridDim.x * blockDim.x) {
    pair[i] = i < M ? i : -1;
    if (i < M) tw[i] = 1.0f;
    if (i < mt) tile_expert[i] = 0;
    if (i == 0) ntiles[0] = mt;
  }
}

/* ------------------------------------------------------------------ host side */

int num_sms;
unsigned long long watchdog_ns = 10ull * 1000 * 1000 * 1000;
/* LMOE_SM90_GROUP (row tiles per group of the walk), LMOE_SM90_EPI=0 (the
   4-byte-store epilogue), LMOE_SM90_TMA_A=0 (down's A by cp.async), LMOE_SM90_LORA_PACK=0
   (a chunk per LoRA group), LMOE_SM90_EXPAND_TMA=0 (the expand by cp.async): knobs for
   measuring the alternatives, read once at init (docs/gpu-notes.md 13-16, 24-26 and 43
   have the measurements behind the defaults). */
sm90_tune tune = {8, 1, 1, 8, 1};

/* A tensor map of a row-major bf16 matrix [rows][cols] whose rows lie ld elements
   apart (ld >= cols, a multiple of 8): boxes of 64 columns (128 bytes, swizzled) by
   box_rows rows; outside the matrix reads zero. */
cudaError_t make_map(CUtensorMap *m, const void *base, uint64_t rows, uint64_t cols, uint32_t box_rows,
                     uint64_t ld = 0) {
  cuuint64_t dims[2] = {cols, rows}, strides[1] = {(ld ? ld : cols) * 2};
  cuuint32_t box[2] = {BK, box_rows}, es[2] = {1, 1};
  CUresult r = lmoe_tma_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)base, dims, strides, box, es,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <int MODE, int BM, int ST> cudaError_t launch(const lmoe_fwd *f, int lora, cudaStream_t s) {
  CUtensorMap m;
  cudaError_t e = MODE == MODE_GATEUP ? make_map(&m, f->w13, (uint64_t)f->E * 2 * f->I, (uint64_t)f->H, BN / 2)
                                      : make_map(&m, f->w2, (uint64_t)f->E * f->H, (uint64_t)f->I, BN);
  if (e) return e;
  CUtensorMap ma; /* A by TMA: down's h (I columns of hs), gate_up's xg; rows by sorted row */
  memset(&ma, 0, sizeof ma);
  if (MODE == MODE_DOWN && tune.tma_a &&
      (e = make_map(&ma, f->h, (uint64_t)f->h_rows, (uint64_t)f->I, BM, (uint64_t)((f->I + 7) & ~7))))
    return e;
  if (MODE == MODE_GATEUP && f->xg && (e = make_map(&ma, f->xg, (uint64_t)f->h_rows, (uint64_t)f->H, BM)))
    return e;
  int grid = f->mt_max * n_tiles<MODE>(*f);
  if (grid > num_sms) grid = num_sms;
  sm90_tune tn = tune;
  CUtensorMap mt, mp; /* the TMA expand's t and pool B (unused otherwise) */
  memset(&mt, 0, sizeof mt);
  memset(&mp, 0, sizeof mp);
  tn.expand_tma = 0;
  if (tune.expand_tma && lora && f->pool && f->R > 0 && f->gstride > 1) {
    cudaError_t et = lmoe_tma_maps_expand<MODE == MODE_GATEUP>(f, BM, MODE == MODE_GATEUP ? BN / 2 : BN, &mt, &mp);
    tn.expand_tma = !et; /* else (a stride TMA cannot take) the cp.async expand */
  }
  k_wgmma<MODE, BM, ST>
      <<<grid, shape<BM>::THREADS, smem_bytes<BM, ST>(), s>>>(*f, m, ma, mt, mp, lora, watchdog_ns, tn);
  return cudaGetLastError();
}

/* One row of the table (gemm_config.h): its gate_up and down kernels. Rows of other
   engines compile to nothing here. */
template <int ENGINE, int KIND, int BM, int BN_, int WM, int WN, int ST, int SMEM> struct row {
  /* shared-memory limit of kernel k, and whether its registers and code can run */
  static cudaError_t setup(void *k, int smem, int threads, int pool, int *usable) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncAttributes a;
    if (!e) e = cudaFuncGetAttributes(&a, k);
    if (e) return e;
    /* the registers setmaxnreg redistributes must exist (else the consumers would wait
       forever), and the binary must hold sm_90a code (else the body is empty) */
    int regs = (a.numRegs + 7) & ~7; /* allocated per thread in steps of 8 */
    if (regs * threads < pool || a.binaryVersion != 90) *usable = 0;
    return cudaSuccess;
  }
  static cudaError_t init(int smem_limit, int *usable) {
    if constexpr (ENGINE != LMOE_ENGINE_SM90) {
      return cudaSuccess;
    } else if constexpr (KIND == LMOE_GEMM_SHRINK) {
      static_assert(BN_ == SN && WM == 4 && WN == 1 && (BM == 64 || BM == 128),
                    "sm90 shrink rows: 128 columns, 4 consumer warps, 64 or 128-row tiles of the forward");
      static_assert(shrink_smem_bytes<ST>() == SMEM, "the table's SMEM is not this row's need");
      if (SMEM > smem_limit) return cudaSuccess;
      cudaError_t e = setup((void *)k_shrink<LMOE_OP_SHRINK13, ST, SN>, SMEM, 256, 0, usable);
      if (!e) e = setup((void *)k_shrink<LMOE_OP_SHRINK2, ST, SN>, SMEM, 256, 0, usable);
      /* the narrow passes (LMOE_SM90_SHRINK_SN=64): two blocks an SM still fit */
      static_assert(2 * (shrink_smem_bytes<SHRINK_NARROW_ST, 64>() + 1024) <= 233472, "two narrow blocks an SM");
      if (!e && shrink_smem_bytes<SHRINK_NARROW_ST, 64>() <= (size_t)smem_limit) {
        e = setup((void *)k_shrink<LMOE_OP_SHRINK13, SHRINK_NARROW_ST, 64>, (int)shrink_smem_bytes<SHRINK_NARROW_ST, 64>(),
                  256, 0, usable);
        if (!e)
          e = setup((void *)k_shrink<LMOE_OP_SHRINK2, SHRINK_NARROW_ST, 64>,
                    (int)shrink_smem_bytes<SHRINK_NARROW_ST, 64>(), 256, 0, usable);
      }
      return e;
    } else {
      static_assert(KIND == LMOE_GEMM_EXPERT && BN_ == BN && WM == BM / 16 && WN == 1,
                    "sm90 rows: expert GEMMs, 256 columns, BM / 16 consumer warps x 1");
      static_assert(smem_bytes<BM, ST>() == SMEM, "the table's SMEM is not this row's need");
      if (SMEM > smem_limit) return cudaSuccess;
      cudaError_t e = setup((void *)k_wgmma<MODE_GATEUP, BM, ST>, SMEM, shape<BM>::THREADS, shape<BM>::POOL, usable);
      return e ? e : setup((void *)k_wgmma<MODE_DOWN, BM, ST>, SMEM, shape<BM>::THREADS, shape<BM>::POOL, usable);
    }
  }
  static cudaError_t run(int op, const lmoe_fwd *f, int lora, cudaStream_t s) {
    if constexpr (ENGINE != LMOE_ENGINE_SM90) {
      return cudaErrorInvalidValue;
    } else if constexpr (KIND == LMOE_GEMM_SHRINK) {
      if (f->bm != BM || (op != LMOE_OP_SHRINK13 && op != LMOE_OP_SHRINK2)) return cudaErrorInvalidValue;
      int grid = f->mt_max * (BM / SBM);
      if (grid > 2 * num_sms) grid = 2 * num_sms;
      constexpr int NS = (int)shrink_smem_bytes<SHRINK_NARROW_ST, 64>();
      /* the pass width the plan chose (lmoe_fwd.shrink_sn, gemm_config.h) */
      if (f->shrink_sn == 64 && op == LMOE_OP_SHRINK13)
        k_shrink<LMOE_OP_SHRINK13, SHRINK_NARROW_ST, 64><<<grid, 256, NS, s>>>(*f, watchdog_ns);
      else if (f->shrink_sn == 64)
        k_shrink<LMOE_OP_SHRINK2, SHRINK_NARROW_ST, 64><<<grid, 256, NS, s>>>(*f, watchdog_ns);
      else if (op == LMOE_OP_SHRINK13)
        k_shrink<LMOE_OP_SHRINK13, ST, SN><<<grid, 256, SMEM, s>>>(*f, watchdog_ns);
      else
        k_shrink<LMOE_OP_SHRINK2, ST, SN><<<grid, 256, SMEM, s>>>(*f, watchdog_ns);
      return cudaGetLastError();
    } else {
      if (op == MODE_GATEUP) return launch<MODE_GATEUP, BM, ST>(f, lora, s);
      if (op == MODE_DOWN) return launch<MODE_DOWN, BM, ST>(f, lora, s);
      return cudaErrorInvalidValue;
    }
  }
};

typedef struct row_fns {
  cudaError_t (*init)(int smem_limit, int *usable);
  cudaError_t (*run)(int op, const lmoe_fwd *f, int lora, cudaStream_t s);
} row_fns;

#define LMOE_SM90_ROW(engine, kind, bm, bn, wm, wn, st, smem) \
  {row<engine, kind, bm, bn, wm, wn, st, smem>::init, row<engine, kind, bm, bn, wm, wn, st, smem>::run},
const row_fns rows[] = {LMOE_GEMM_TABLE(LMOE_SM90_ROW)};
#undef LMOE_SM90_ROW

} /* namespace */

extern "C" cudaError_t lmoe_sm90_init(int32_t cc, int32_t smem_limit, int32_t *available) {
  *available = 0;
#ifdef LMOE_SM90A
  if (cc != 90) return cudaSuccess;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (!e) e = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
  if (e) return e;
  if (!lmoe_tma_encoder()) return cudaSuccess; /* no TMA encoder in this driver: the sm80 engine serves */
  const char *wd = getenv("LMOE_SM90_WATCHDOG_MS");
  if (wd) watchdog_ns = strtoull(wd, nullptr, 10) * 1000000ull;
  const char *ep = getenv("LMOE_SM90_EPI");
  if (ep) tune.epi16 = atoi(ep) != 0;
  const char *gm = getenv("LMOE_SM90_GROUP");
  if (gm && atoi(gm) >= 1 && atoi(gm) <= 1024) tune.group_m = atoi(gm);
  const char *ta = getenv("LMOE_SM90_TMA_A");
  if (ta) tune.tma_a = atoi(ta) != 0;
  const char *lp = getenv("LMOE_SM90_LORA_PACK");
  if (lp) tune.lora_align = atoi(lp) != 0 ? 8 : BK;
  const char *xt = getenv("LMOE_SM90_EXPAND_TMA"); /* gpu-notes 43 */
  if (xt) tune.expand_tma = atoi(xt) != 0;
  int usable = 1;
  for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
    if ((e = rows[i].init(smem_limit, &usable))) return e;
  *available = usable;
#else
  (void)cc;
  (void)smem_limit;
#endif
  return cudaSuccess;
}

extern "C" cudaError_t lmoe_sm90_run(int32_t op, int32_t cfg, const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (cfg < 0 || (size_t)cfg >= sizeof rows / sizeof rows[0]) return cudaErrorInvalidValue;
  return rows[cfg].run(op, f, lora, s);
}

extern "C" size_t lmoe_sm90_dense_ws(int64_t M) {
  /* pairs and groups of M + BM rows, M weights, the tile list and its count */
  return ((size_t)M + 2 * LMOE_K_BM) * 13 + 1024;
}

extern "C" cudaError_t lmoe_sm90_dense(int32_t cfg, int32_t M, int32_t N, int32_t K, const uint16_t *a,
                                       const uint16_t *b, uint16_t *c, void *ws, cudaStream_t s) {
  if (cfg < 0 || cfg >= lmoe_gemm_nconfigs || lmoe_gemm_configs[cfg].engine != LMOE_ENGINE_SM90 || K % 8 ||
      N % 8)
    return cudaErrorInvalidValue;
  const int bm = lmoe_gemm_configs[cfg].bm, mt = (M + bm - 1) / bm;
  lmoe_fwd f;
  memset(&f, 0, sizeof f);
  size_t rows = (size_t)mt * bm;
  uint8_t *w = (uint8_t *)ws;
  f.sorted_pair = (int32_t *)w;
  f.sorted_group = (int32_t *)(w + rows * 4);
  f.tw = (float *)(w + rows * 8);
  f.tile_expert = (int32_t *)(w + rows * 8 + (size_t)M * 4);
  f.ntiles = f.tile_expert + mt;
  f.M = M;
  f.k = 1;
  f.E = 1;
  f.H = N;
  f.I = K;
  f.bm = bm;
  f.mt_max = mt;
  f.h = (uint16_t *)a;
  f.h_rows = M;
  f.w2 = b;
  f.y = c;
  k_dense_setup<<<grid_for((int64_t)rows, 256), 256, 0, s>>>(f.sorted_pair, f.tw, f.tile_expert, f.ntiles, M,
                                                              (int)rows, mt);
  cudaError_t e = cudaGetLastError();
  return e ? e : lmoe_sm90_run(LMOE_OP_DOWN, cfg, &f, 0, s);
}
