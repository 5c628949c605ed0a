/* The FP8 engine: an FP8 layer's gate_up and down on Hopper's e4m3 wgmma
   (m64n128k32, f32 accumulate), for sm_90a (docs/design.md, "FP8 layers").

     gate_up   h = silu(xq Wq13_e^T (+ t13 B13^T)) * (...)   (128 gate + 128 up columns a tile)
     down      y = w * (hq Wq2_e^T (+ t2 B2^T))

   The structure is the bf16 sm90 engine's (gemm_sm90.cu): one block per SM walks the
   device-built tile list, a producer warpgroup fills a ring of stages, BM / 64 consumer
   warpgroups compute from shared memory. Both operands of a base chunk come by TMA, one
   box each: the weights, and A, whose rows are in sorted order for both GEMMs (quant.cu
   writes x's codes to each pair's sorted row, h is in sorted order), so the producer
   issues three TMA copies and BM 4-byte scale copies a chunk (docs/gpu-notes.md 34: with
   A gathered by cp.async, 8 x BM 16-byte copies a chunk, the producer was the limit).
   What FP8 changes:

   - A K chunk is 128 e4m3 = one 128-byte swizzled row, so one chunk is one scale block
     along K: x's (or h's) rows carry one float32 scale per 128-wide group (quant.cu),
     the weights one per 128x128 block. A stage holds the A and B tiles of a chunk and
     its scales: BM row scales and the tile's block scales (gate's and up's; down's
     one), copied by the producer with the tile (cp.async, on the same barrier).
   - Promotion (as DeepGEMM): each chunk's four wgmmas go into a fresh accumulator,
     then acc += partial * (a_scale[row] * b_scale[block]) in fp32. A tile is 256
     columns wide (gate_up: 128 gate + 128 up), computed by each consumer warpgroup in
     two 128-column halves promoted in turn: 128 accumulators and one partial of 64,
     setmaxnreg handing the producer's registers to the consumers at 128 rows. Against
     128-column tiles (LMOE_FP8_BN=128: one half) a chunk moves 48 KB for 8.4 MFLOP
     instead of 32 KB for 4.2, and the FP8 GEMMs run 1.16-1.45x faster from M = 2048
     (gpu-notes 38).
   - The LoRA expand stays bf16: after the base chunks come the expand's, a stage of 64
     bf16 K columns (also 128 bytes a row), as bf16 wgmmas (m64n128k16) straight into
     acc: the same packed chunks of the groups' ranks as the bf16 engine, added before
     SiLU exactly as there. The shrinks (sm80 engine) read the bf16 x and h.
   - No setmaxnreg: the consumers need about 150 registers, within the launch's share.

   What is left for speed (not needed for correct numbers): the consumers wait for each
   chunk's wgmmas before promoting (wgmma_wait<0>), so a warpgroup's tensor work and its
   promotion do not overlap (the other consumer warpgroup's do); two partial
   accumulators in turn would overlap them. */
#include "common.cuh"
#include "fp8_quot.h"
#include "gemm_engine.h"
#include "ptx_sm90.cuh"
#include "sm90_walk.cuh"
#include "tma_host.cuh"

#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

enum { MODE_GATEUP = LMOE_OP_GATEUP, MODE_DOWN = LMOE_OP_DOWN };
enum { FL_FUSE_H = 1, FL_EPI16 = 2, FL_XTMA = 4 }; /* k_fp8's flags */

constexpr int BKQ = 128; /* base K chunk: 128 e4m3, one 128-byte row, one scale block */
constexpr int BKL = 64;  /* expand K chunk: 64 bf16, one 128-byte row */
static_assert(BKL * 2 == BKQ, "an expand chunk of bf16 is one 128-byte row, as a base chunk of e4m3");
constexpr int QB = 128;  /* scale block */

/* A tile is BM rows by BN output columns, BN 128 (gate_up: 64 gate + 64 up) or 256
   (128 + 128; down: two scale blocks). A consumer warpgroup computes a 256-wide tile in
   two 128-column halves, each into the one partial and promoted in turn, so it holds
   128 accumulators and 64 partials (setmaxnreg at 128 rows); the wider tile moves 48
   KB for 8.4 MFLOP a chunk where the narrow one moves 32 KB for 4.2. */
template <int BM, int BN> struct shape {
  static_assert(BN == 128 || BN == 256, "FP8 tiles are 128 or 256 columns");
  static constexpr int NC = BM / 64; /* consumer warpgroups */
  static constexpr int NH = BN / 128; /* 128-column halves a consumer computes in turn */
  static constexpr int THREADS = 128 * (NC + 1);
  static constexpr uint32_t A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
  static constexpr int ST = BN == 128 ? (BM == 128 ? 6 : 8) : (BM == 128 ? 4 : 5);
  static constexpr int SC = BM + 4; /* floats of a stage's scales: BM rows, then B's two */
  /* 256 columns on 128 rows: 384 threads share 168 x 384 registers; setmaxnreg moves
     them from the producer (TMA and scale copies; the expand's cp.async) to the
     consumers (128 accumulators, 64 partials) */
  static constexpr bool REALLOC = BN == 256 && BM == 128;
  static constexpr int PREG = 56, CREG = 224;
  static constexpr int POOL = 128 * PREG + 128 * NC * CREG;
};
static_assert(shape<128, 256>::POOL <= 168 * 384, "setmaxnreg asks more than a 384-thread block holds");

/* Dynamic shared memory: 1024 bytes of alignment slack, the stages, the scales, the
   barriers, and a word a stage (set when the stage holds its tile's last K chunk). */
template <int BM, int BN> constexpr size_t smem_bytes(void) {
  typedef shape<BM, BN> S;
  return 1024 + (size_t)S::ST * S::STAGE + (size_t)S::ST * S::SC * 4 + 2 * S::ST * sizeof(uint64_t) +
         S::ST * sizeof(int32_t) + 2 * BM * sizeof(int32_t) + 4 * S::ST * sizeof(int32_t);
}
static_assert(smem_bytes<128, 128>() <= 232448 && smem_bytes<64, 128>() <= 232448 &&
                  smem_bytes<128, 256>() <= 232448 && smem_bytes<64, 256>() <= 232448,
              "fits an H100/H200's 227 KB");

template <int MODE, int BN> __host__ __device__ __forceinline__ int n_tiles(const lmoe_fwd &f) {
  return MODE == MODE_GATEUP ? (f.I + BN / 2 - 1) / (BN / 2) : (lmoe_k_down_cols(&f) + BN - 1) / BN;
}

#if LMOE_SM90_DEVICE

/* the producer warpgroup's 128 threads (named barrier 1; the consumers never use it) */
__device__ __forceinline__ void producer_sync(void) { asm volatile("bar.sync 1, 128;" ::: "memory"); }

/* As gemm_sm90.cu's walk: groups of 8 row tiles take the N tiles together (L2 reuse);
   the packed expand (lora_align 8): each group's rank rounded up to 8 columns. */
constexpr int GROUP_M = 8, LORA_ALIGN = 8;

template <int MODE, int BM, int BN>
__device__ __forceinline__ void producer(const lmoe_fwd &f, const CUtensorMap *tmb, const CUtensorMap *tma,
                                         const CUtensorMap *tmt, const CUtensorMap *tmp, int use_lora, int flags,
                                         uint8_t *smem, float *scl, uint64_t *full, uint64_t *empty,
                                         volatile int32_t *last, int32_t *rowg, volatile int32_t *sg, uint64_t wd) {
  typedef shape<BM, BN> S;
  constexpr int ST = S::ST;
  constexpr int AR = BM / 16; /* A rows per thread (the expand's loads) */
  const int ptid = threadIdx.x, ch = ptid & 7, rb = ptid >> 3;
  const int H = f.H, I = f.I;
  const int K = MODE == MODE_GATEUP ? H : I, nbase = (K + BKQ - 1) / BKQ;
  const int nsb = MODE == MODE_GATEUP ? f.nbh : f.nbi; /* scale blocks a row */
  const int ntm = f.ntiles[0], ntn = n_tiles<MODE, BN>(f), total = ntm * ntn;
  const bool xtma = use_lora && (flags & FL_XTMA);
  if (ptid == 0) {
    prefetch_tensormap(tmb);
    prefetch_tensormap(tma);
    if (xtma) {
      prefetch_tensormap(tmt);
      prefetch_tensormap(tmp);
    }
  }
  uint32_t it = 0, tk = 0;
#pragma unroll 1
  for (int t = blockIdx.x; t < total; t += gridDim.x, tk++) {
    int m, nt;
    sm90_tile_of(t, ntm, ntn, GROUP_M, m, nt);
    const int e = f.tile_expert[m], p0 = m * BM;
    const int n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : f.n0 + nt * BN;
    /* the expand's view of the tile's rows, its group or -2 (padding), written here and
       read after the base chunks (one barrier among the producer's threads): one shared
       load a row a piece where two dependent global loads were (gpu-notes 42). Two
       buffers by tile parity; a tile's writes follow the previous tile's barrier, which
       follows every read of the tile before that */
    int32_t *rg = rowg + (tk & 1) * BM;
    /* the expand's stages: 64 packed rank columns each, or (xtma) four 16-column slices,
       whose groups thread 0 keeps in shared memory for the expand (the row-group copy's
       space, unused on that path: two ints a group, at most BM groups) */
    int nlc = 0, ng = 0;
    if (xtma) {
      int cols = 0;
      sm90_for_groups<MODE == MODE_GATEUP, BM>(
          f, [&](int r) { return f.sorted_group[p0 + r]; }, [&](int g, int slot, int rk) {
        if (rk <= 0) return; /* an adapter without this side's parts: no slice (the
                                consumers' count, sm90_lora_chunks, gives it none) */
        if (ptid == 0) {
          rowg[2 * ng] = g;
          rowg[2 * ng + 1] = slot | (rk << 16);
        }
        ng++;
        cols += (rk + 15) & ~15;
      });
      nlc = (cols + BKL - 1) / BKL;
    } else if (use_lora) {
      nlc = sm90_lora_chunks<MODE == MODE_GATEUP, BM>(f, p0, LORA_ALIGN, BKL);
    }
    const int nch = nbase + nlc;
    /* A's codes come by TMA (x's and h's rows are both in sorted order: quant.cu);
       this thread copies the scale of row ptid (NULL: a padding row, or none) */
    const float *asc = nullptr;
    if (ptid < BM) {
      const int pair = f.sorted_pair[p0 + ptid];
      if (pair >= 0) asc = (MODE == MODE_GATEUP ? f.xs : f.hsc) + (size_t)(p0 + ptid) * nsb;
      if (use_lora && !xtma) rg[ptid] = pair >= 0 ? f.sorted_group[p0 + ptid] : -2;
    }
    /* the tile's weight scale rows: gate's and up's row block (BN / 2 rows of one
       block: n0 is a multiple of BN / 2), or down's (BN rows from n0, a multiple of BN:
       one block, or two at BN 256, the second past H at the edge: never used then) */
    const float *bsc0, *bsc1;
    if (MODE == MODE_GATEUP) {
      bsc0 = f.w13s + ((size_t)e * 2 * f.nbi + n0 / QB) * f.nbh;
      bsc1 = f.w13s + ((size_t)e * 2 * f.nbi + f.nbi + n0 / QB) * f.nbh;
    } else {
      bsc0 = bsc1 = f.w2s + ((size_t)e * f.nbh + n0 / QB) * f.nbi;
      if (BN == 256 && n0 / QB + 1 < f.nbh) bsc1 = bsc0 + f.nbi;
    }
#pragma unroll 1
    for (int c = 0; c < nbase; c++, it++) {
      const int s = it % ST;
      mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
      uint8_t *As = smem + s * S::STAGE, *Bs = As + S::A_BYTES;
      const uint32_t sc = smem_u32(scl + s * S::SC);
      if (ptid == 0) {
        last[s] = c == nch - 1;
        mbar_arrive_tx(&full[s], S::A_BYTES + S::B_BYTES);
        tma_load_2d(As, tma, &full[s], c * BKQ, p0);
        if (MODE == MODE_GATEUP) {
          int row = e * 2 * I + n0;
          tma_load_2d(Bs, tmb, &full[s], c * BKQ, row);
          tma_load_2d(Bs + (BN / 2) * 128, tmb, &full[s], c * BKQ, row + I);
        } else {
          tma_load_2d(Bs, tmb, &full[s], c * BKQ, e * H + n0);
        }
        cp_async4_s(sc + BM * 4, bsc0 + c, 4);
        cp_async4_s(sc + BM * 4 + 4, bsc1 + c, 4);
      }
      if (ptid < BM) cp_async4_s(sc + ptid * 4, asc ? asc + c : bsc0, asc ? 4 : 0);
      cp_async_mbar_arrive(&full[s]);
    }
    if (use_lora && !xtma) producer_sync();
    if (nlc > 0 && xtma) {
      /* The expand by TMA (the default; LMOE_FP8_EXPAND_TMA=0: cp.async): each group's
         rank in slices of 16 columns, a slice t's box (the tile's BM rows, every
         group's) and B's (BN rows of the group's slot), 32-byte rows with the 32-byte
         swizzle, four slices a stage where the packed expand has one 64-column chunk.
         Thread 0 issues the slices of the groups it noted at the tile's start (those
         with columns on this side), each with its bytes expected on the stage's
         barrier; every thread waits for each stage and arrives once for it (thread 0
         twice: the arrival a base chunk's arrive_tx makes). The consumers zero the rows
         of t's box that belong to another group before their MMAs; a stage's unused
         slices (group -1) are not loaded: the consumers zero their t rows and multiply
         them by the first slice's B. */
      constexpr int SLA = BM * 32, SLB = BN * 32;
      static_assert(4 * SLA == (int)S::A_BYTES && 4 * SLB == (int)S::B_BYTES, "four slices a stage");
      int gi = 0, k0 = 0;
#pragma unroll 1
      for (int stg = 0; stg < nlc; stg++, it++) {
        const int s = it % ST;
        mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
        if (ptid == 0) {
          last[s] = stg == nlc - 1;
#pragma unroll 1
          for (int j = 0; j < 4; j++) {
            if (gi >= ng) {
              sg[s * 4 + j] = -1;
              continue;
            }
            const int g = rowg[2 * gi], sr = rowg[2 * gi + 1], slot = sr & 0xffff, rk = sr >> 16;
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
    } else if (nlc > 0) {
      /* unrolled where registers allow: not where setmaxnreg leaves the producer 56 */
      constexpr int UA = S::REALLOC ? 1 : AR, UB = S::REALLOC ? 1 : 4;
      /* gemm_sm90.cu's expand, with a BN-wide tile: this thread's 16-byte piece of a
         stage (column col of group g's rank, nb bytes of it; pb NULL: zeros), for every A
         row its own group's t or zero, for every output column the slot's B. */
      auto load_piece = [&](uint32_t a0, uint32_t b0, int g, const uint16_t *pb, int col, int nb) {
#pragma unroll UA
        for (int q = 0; q < AR; q++) {
          int r = rb + 16 * q;
          const uint16_t *row = nullptr;
          if (pb && rg[r] == g)
            row = MODE == MODE_GATEUP ? f.t13 + (size_t)(p0 + r) * f.t13s : f.t2 + (size_t)(p0 + r) * f.t2s;
          cp_async16_s(a0 + r * 128 + ((ch ^ (r & 7)) << 4), row ? row + col : f.x, row ? nb : 0);
        }
#pragma unroll UB
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
      int off = 0, open = -1, s = 0;
      uint32_t a0 = 0, b0 = 0;
      sm90_for_groups<MODE == MODE_GATEUP, BM>(
          f, [&](int r) { return f.sorted_group[p0 + r]; }, [&](int g, int slot, int rk) {
        const uint16_t *pb = f.pool + (size_t)slot * f.slot_elems + (MODE == MODE_GATEUP ? f.off_b13 : f.off_b2);
        const int w = (rk + LORA_ALIGN - 1) / LORA_ALIGN * LORA_ALIGN;
#pragma unroll 1
        for (int c0 = off; c0 < off + w;) {
          const int cc = c0 / BKL, cend = min(off + w, (cc + 1) * BKL);
          if (cc != open) {
            if (open >= 0) {
              cp_async_mbar_arrive(&full[s]);
              it++;
            }
            open = cc;
            s = it % ST;
            mbar_wait(&empty[s], ((it / ST) & 1) ^ 1, wd);
            if (ptid == 0) {
              last[s] = cc == nlc - 1;
              mbar_arrive(&full[s]);
            }
            a0 = smem_u32(smem + s * S::STAGE);
            b0 = a0 + S::A_BYTES;
          }
          const int pc = cc * BKL + ch * 8; /* this thread's piece, on the K axis */
          if (pc >= c0 && pc < cend) load_piece(a0, b0, g, pb, pc - off, sm90_piece_bytes(pc - off, rk, 2));
          c0 = cend;
        }
        off += w;
      });
      if (open >= 0) {
        if (open * BKL + ch * 8 >= off) load_piece(a0, b0, -1, nullptr, 0, 0);
        cp_async_mbar_arrive(&full[s]);
        it++;
      }
    }
  }
}

/* two e4m3 codes, x0's in the low byte (one cvt.rn.satfinite.e4m3x2 on sm_89+) */
static __device__ __forceinline__ uint16_t cvt_e4m3x2(float x0, float x1) {
  return (uint16_t)__nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
}

template <int MODE, int BM, int BN>
__device__ __forceinline__ void consumer(const lmoe_fwd &f, uint8_t *smem, const float *scl, uint64_t *full,
                                         uint64_t *empty, const int32_t *sg, int use_lora, int flags, uint64_t wd) {
  typedef shape<BM, BN> S;
  constexpr int NH = S::NH;
  constexpr int ST = S::ST;
  const int wgc = threadIdx.x / 128 - 1, ltid = threadIdx.x & 127;
  const int warp = ltid >> 5, lane = ltid & 31;
  const int H = f.H, I = f.I;
  const int hs = (I + 7) & ~7;
  const int K = MODE == MODE_GATEUP ? H : I, nbase = (K + BKQ - 1) / BKQ;
  const int ntm = f.ntiles[0], ntn = n_tiles<MODE, BN>(f), total = ntm * ntn;
  /* this thread's rows of the warpgroup's 64: r and r + 8 */
  const int r0 = wgc * 64 + warp * 16 + (lane >> 2);
  float acc[64 * NH], part[64];
  const uint32_t scl_u32 = smem_u32(scl), last_u32 = smem_u32(empty + ST); /* the scales, the producer's last[] */
  uint32_t it = 0;
#pragma unroll 1
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    int m, nt;
    sm90_tile_of(t, ntm, ntn, GROUP_M, m, nt);
    const int p0 = m * BM;
    const int n0 = MODE == MODE_GATEUP ? nt * (BN / 2) : f.n0 + nt * BN;
    /* the epilogue's rows' pairs now, down's routing weights once the first chunk's
       MMAs are issued: not a dependent load chain after the last wait */
    const int pre_pair[2] = {f.sorted_pair[p0 + r0], f.sorted_pair[p0 + r0 + 8]};
    float pre_w[2] = {0.0f, 0.0f};
    /* the TMA expand: the group of the row whose slice rows this thread zeroes (row
       ltid / 2 of the warpgroup's 64, half ltid % 2 of its 32 bytes) */
    const int zg = use_lora && (flags & FL_XTMA) ? f.sorted_group[p0 + wgc * 64 + (ltid >> 1)] : 0;
#pragma unroll
    for (int i = 0; i < 64 * NH; i++) acc[i] = 0.0f;
#pragma unroll 1
    for (int c = 0;; c++, it++) {
      const int s = it % ST;
      mbar_wait(&full[s], (it / ST) & 1, wd);
      fence_proxy_async();
      const uint32_t as = smem_u32(smem + s * S::STAGE) + wgc * 64 * 128, bs = smem_u32(smem + s * S::STAGE + S::A_BYTES);
      const uint64_t da = desc_sw128(as);
      const bool lastc = lds_s32(last_u32 + 4 * s) != 0; /* the producer's last[s] */
      if (c < nbase) {
        /* a base chunk: per 128-column half, 4 e4m3 k32 steps into a fresh partial, then
           promoted */
        float sa0 = 0.0f, sa1 = 0.0f, sb0 = 0.0f, sb1 = 0.0f;
#pragma unroll
        for (int hh = 0; hh < NH; hh++) {
          const uint64_t db = desc_sw128(bs + hh * 128 * 128);
#pragma unroll
          for (int i = 0; i < 64; i++) reg_fence(part[i]);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BKQ / 32; kk++) wgmma_m64n128k32_e4m3(part, da + 2 * kk, db + 2 * kk, kk > 0);
          wgmma_commit();
          if (hh == 0) {
            /* the stage's scales read while the wgmmas run (their latency hidden) */
            const uint32_t sc = scl_u32 + s * S::SC * 4;
            sa0 = lds_f32(sc + 4 * r0);
            sa1 = lds_f32(sc + 4 * (r0 + 8));
            const float2 sb = lds_f32x2(sc + 4 * BM);
            sb0 = sb.x;
            sb1 = sb.y;
            if (MODE == MODE_DOWN && c == 0) {
#pragma unroll
              for (int hf = 0; hf < 2; hf++) pre_w[hf] = pre_pair[hf] >= 0 ? f.tw[pre_pair[hf]] : 0.0f;
            }
          }
          wgmma_wait<0>();
#pragma unroll
          for (int i = 0; i < 64; i++) reg_fence(part[i]);
          /* the stage's data is in registers now: hand it back before the last
             promotion. Every thread arrives itself, after its own reads of the stage's
             scales and word (one thread arriving for the warpgroup would free the stage
             while another warp of it may still read them: racecheck's WAR hazard against
             the producer's writes) */
          if (hh == NH - 1) mbar_arrive(&empty[s]);
          float *ac = acc + 64 * hh;
#pragma unroll
          for (int i = 0; i < 16; i++) {
            /* columns 8i..8i+7 of the half: at BN 128 gate_up's first 64 are gate (sb0),
               the rest up (sb1); at BN 256 the halves are gate and up (down: its two
               blocks) */
            const float sbx = NH == 2 ? (hh ? sb1 : sb0) : (MODE == MODE_GATEUP && i >= 8 ? sb1 : sb0);
            const float lo_s = sa0 * sbx, hi_s = sa1 * sbx;
            ac[4 * i + 0] = fmaf(part[4 * i + 0], lo_s, ac[4 * i + 0]);
            ac[4 * i + 1] = fmaf(part[4 * i + 1], lo_s, ac[4 * i + 1]);
            ac[4 * i + 2] = fmaf(part[4 * i + 2], hi_s, ac[4 * i + 2]);
            ac[4 * i + 3] = fmaf(part[4 * i + 3], hi_s, ac[4 * i + 3]);
          }
        }
      } else if (flags & FL_XTMA) {
        /* an expand stage of four 16-column slices (the producer's TMA expand): the rows
           of t's box of another group than the slice's zeroed first (this warpgroup's
           64; the 32-byte swizzle keeps a row's bytes in the row), made visible to the
           MMAs' proxy and to the warpgroup; then per slice and half one bf16 k16 step
           added to acc. An unused slice (group -1): its t rows all zeroed, times the
           first slice's B (finite, so the products are zeros). */
        const uint32_t st0 = smem_u32(smem + s * S::STAGE), sgu = smem_u32(sg + 4 * s);
        constexpr int SLA = BM * 32, SLB = BN * 32;
        int sl[4]; /* the slice whose B each slice multiplies: its own, or (unused) the first */
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const int g = lds_s32(sgu + 4 * j);
          sl[j] = g >= 0 ? j : 0;
          if (g < 0 || g != zg) sts_zero16(st0 + j * SLA + (wgc * 64 + (ltid >> 1)) * 32 + (ltid & 1) * 16);
        }
        fence_proxy_async();
        asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wgc) : "memory");
#pragma unroll
        for (int i = 0; i < 64 * NH; i++) reg_fence(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const uint64_t da = desc_sw32(st0 + j * SLA + wgc * 64 * 32);
#pragma unroll
          for (int hh = 0; hh < NH; hh++)
            wgmma_m64n128k16(acc + 64 * hh, da, desc_sw32(st0 + S::A_BYTES + sl[j] * SLB + hh * 128 * 32), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 64 * NH; i++) reg_fence(acc[i]);
        mbar_arrive(&empty[s]);
      } else {
        /* an expand chunk: per half, 4 bf16 k16 steps added to acc as they are */
#pragma unroll
        for (int i = 0; i < 64 * NH; i++) reg_fence(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int hh = 0; hh < NH; hh++) {
          const uint64_t db = desc_sw128(bs + hh * 128 * 128);
#pragma unroll
          for (int kk = 0; kk < BKL / 16; kk++) wgmma_m64n128k16(acc + 64 * hh, da + 2 * kk, db + 2 * kk, 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 64 * NH; i++) reg_fence(acc[i]);
        mbar_arrive(&empty[s]);
      }
      if (lastc) {
        it++;
        break;
      }
    }

    /* epilogue: thread holds rows r0 and r0 + 8, columns 8i + 2(lane % 4) + {0, 1} */
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = r0 + hf * 8;
      const int pair = pre_pair[hf];
      if (MODE == MODE_GATEUP && BN == 256 && (flags & FL_FUSE_H)) {
        /* h's quantization here (quant.cu's rule on the same bf16 values): the tile's
           128 h columns are one 128-wide group of the row, spread over the quad's four
           lanes; their maximum by two shuffles. Every lane of the warp goes on to the
           exchanges below, a padding row's too (its values computed, not stored) */
        const bool whole = n0 + BN / 2 <= I; /* the tile's 128 h columns all exist */
        uint32_t hb[BN / 16];
        float amax = 0.0f;
#pragma unroll
        for (int i = 0; i < BN / 16; i++) {
          const int j = n0 + 8 * i + 2 * (lane & 3);
          hb[i] = (uint32_t)f2bf(silu_mul(acc[4 * i + 2 * hf], acc[4 * i + BN / 4 + 2 * hf])) |
                  ((uint32_t)f2bf(silu_mul(acc[4 * i + 2 * hf + 1], acc[4 * i + BN / 4 + 2 * hf + 1])) << 16);
          const float a0 = __uint_as_float(hb[i] << 16), a1 = __uint_as_float(hb[i] & 0xffff0000u);
          if (whole || j < I) amax = fmaxf(amax, fabsf(a0));
          if (whole || j + 1 < I) amax = fmaxf(amax, fabsf(a1));
        }
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const float sc = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f, rc = __frcp_rn(sc);
        const bool exact = pair >= 0 && sc < LMOE_FP8_QUOT_MIN_S; /* fp8_quot.h */
        uint8_t *q = f.hq + (size_t)(p0 + r) * I;
        uint16_t *dst = f.h + (size_t)(p0 + r) * hs;
        if (whole && (flags & FL_EPI16) && __all_sync(0xffffffffu, !exact)) {
          /* the common case, without a column test or a division: each quad's codes of four
             8-column blocks exchanged (quad_transpose) so a lane stores a block's 8 codes
             at once (I % 16 == 0: 8-byte aligned), and LoRA's bf16 h 16 bytes a lane */
#pragma unroll
          for (int g = 0; g < BN / 64; g++) {
            uint32_t pk[4];
#pragma unroll
            for (int b = 0; b < 4; b++) {
              const int i = 4 * g + b;
              pk[b] = cvt_e4m3x2(lmoe_fp8_quot(__uint_as_float(hb[i] << 16), sc, rc),
                                 lmoe_fp8_quot(__uint_as_float(hb[i] & 0xffff0000u), sc, rc));
            }
            const uint4 o = quad_transpose(pk[0], pk[1], pk[2], pk[3]);
            const int c = n0 + 8 * (4 * g + (lane & 3));
            if (pair >= 0) *(uint2 *)(q + c) = make_uint2(o.x | (o.y << 16), o.z | (o.w << 16));
          }
          if (use_lora) /* shrink2 reads the bf16 h */
            store_row16<BN / 16>(dst, n0, I, pair >= 0, [&](int i) { return hb[i]; });
        } else {
          if (pair < 0) continue;
#pragma unroll
          for (int i = 0; i < BN / 16; i++) {
            const int j = n0 + 8 * i + 2 * (lane & 3);
            const float v0 = __uint_as_float(hb[i] << 16), v1 = __uint_as_float(hb[i] & 0xffff0000u);
            const float x0 = exact ? __fdiv_rn(v0, sc) : lmoe_fp8_quot(v0, sc, rc);
            const float x1 = exact ? __fdiv_rn(v1, sc) : lmoe_fp8_quot(v1, sc, rc);
            const uint16_t c2 = cvt_e4m3x2(x0, x1);
            if (j + 1 < I) {
              *(uint16_t *)(q + j) = c2;
              if (use_lora) *(uint32_t *)(dst + j) = hb[i];
            } else if (j < I) {
              q[j] = (uint8_t)(c2 & 0xffu);
              if (use_lora) dst[j] = (uint16_t)(hb[i] & 0xffffu);
            }
          }
        }
        if (pair < 0) continue;
        if ((lane & 3) == 0) f.hsc[(size_t)(p0 + r) * f.nbi + n0 / QB] = sc;
        continue;
      }
      if (MODE == MODE_GATEUP && (flags & FL_EPI16)) {
        /* a quad's rows leave as 16-byte stores (sm90_walk.cuh, as the bf16 engine's);
           every lane of the warp takes part in the exchange, stored or not */
        store_row16<BN / 16>(f.h + (size_t)(p0 + r) * hs, n0, I, pair >= 0, [&](int i) {
          return pack2(silu_mul(acc[4 * i + 2 * hf], acc[4 * i + BN / 4 + 2 * hf]),
                       silu_mul(acc[4 * i + 2 * hf + 1], acc[4 * i + BN / 4 + 2 * hf + 1]));
        });
        continue;
      }
      if (MODE == MODE_DOWN && (flags & FL_EPI16)) {
        const float w = pre_w[hf];
        store_row16<BN / 8>(f.y + (size_t)(pair >= 0 ? pair : 0) * H, n0, H, pair >= 0,
                            [&](int i) { return pack2(w * acc[4 * i + 2 * hf], w * acc[4 * i + 2 * hf + 1]); });
        continue;
      }
      if (pair < 0) continue;
      if (MODE == MODE_GATEUP) {
        uint16_t *dst = f.h + (size_t)(p0 + r) * hs;
#pragma unroll
        for (int i = 0; i < BN / 16; i++) { /* gate's columns, then up's BN / 4 accumulators on */
          int j = n0 + 8 * i + 2 * (lane & 3);
          float g0 = acc[4 * i + 2 * hf], g1 = acc[4 * i + 2 * hf + 1];
          float u0 = acc[4 * i + BN / 4 + 2 * hf], u1 = acc[4 * i + BN / 4 + 2 * hf + 1];
          uint16_t v0 = f2bf(silu_mul(g0, u0)), v1 = f2bf(silu_mul(g1, u1));
          if (j + 1 < I)
            *(uint32_t *)(dst + j) = (uint32_t)v0 | ((uint32_t)v1 << 16);
          else if (j < I)
            dst[j] = v0;
        }
      } else {
        const float w = pre_w[hf];
        uint16_t *dst = f.y + (size_t)pair * H;
#pragma unroll
        for (int i = 0; i < BN / 8; i++) {
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

template <int MODE, int BM, int BN>
__global__ void __launch_bounds__(shape<BM, BN>::THREADS, 1)
    k_fp8(const __grid_constant__ lmoe_fwd f, const __grid_constant__ CUtensorMap tmb,
          const __grid_constant__ CUtensorMap tma, const __grid_constant__ CUtensorMap tmt,
          const __grid_constant__ CUtensorMap tmp, int lora, int flags, unsigned long long wd) {
#if LMOE_SM90_DEVICE
  typedef shape<BM, BN> S;
  constexpr int ST = S::ST;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t *smem = (uint8_t *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
  float *scl = (float *)(smem + ST * S::STAGE);
  uint64_t *full = (uint64_t *)(scl + ST * S::SC), *empty = full + ST;
  int32_t *last = (int32_t *)(empty + ST), *rowg = last + ST, *sg = rowg + 2 * BM;
  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 128 + 1); /* the producer's cp.async arrivals + one (TMA tx) */
      mbar_init(&empty[s], S::NC * 128); /* every consumer thread (each after its own reads) */
    }
    fence_barrier_init();
  }
  __syncthreads();
  const int use_lora = lora && f.meta && f.meta[1] > 0;
  if (threadIdx.x < 128) {
    if constexpr (S::REALLOC) setmaxnreg_dec<S::PREG>();
    producer<MODE, BM, BN>(f, &tmb, &tma, &tmt, &tmp, use_lora, flags, smem, scl, full, empty, last, rowg, sg, wd);
  } else {
    if constexpr (S::REALLOC) setmaxnreg_inc<S::CREG>();
    consumer<MODE, BM, BN>(f, smem, scl, full, empty, sg, use_lora, flags, wd);
  }
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
int ready; /* lmoe_fp8_init found the kernels usable */
int tile_n = 256; /* the tiles' columns (LMOE_FP8_BN=128 for the narrow ones, read at init) */
int fuse_h = 1;   /* gate_up quantizes h itself (256-column tiles only; LMOE_FP8_FUSE_H=0: quant_h does) */
int epi16 = 1;    /* the epilogue by 16-byte stores (LMOE_SM90_EPI=0: 4-byte ones) */
int expand_tma = 1; /* the expand's t and B by TMA slices (LMOE_FP8_EXPAND_TMA=0: cp.async pieces) */
unsigned long long watchdog_ns = 10ull * 1000 * 1000 * 1000;

/* A tensor map of a row-major e4m3 matrix [rows][cols] (cols a multiple of 16): boxes of
   128 columns (128 bytes, swizzled) by box_rows rows; outside the matrix reads zero. */
cudaError_t make_map(CUtensorMap *m, const void *base, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  cuuint64_t dims[2] = {cols, rows}, strides[1] = {cols};
  cuuint32_t box[2] = {BKQ, box_rows}, es[2] = {1, 1};
  CUresult r = lmoe_tma_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void *)base, dims, strides, box, es,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <int MODE, int BM, int BN> cudaError_t launch(const lmoe_fwd *f, int lora, cudaStream_t s) {
  CUtensorMap m; /* B: gate's and up's BN / 2 rows, or down's BN (a box has at most 256) */
  cudaError_t e = MODE == MODE_GATEUP ? make_map(&m, f->w13, (uint64_t)f->E * 2 * f->I, (uint64_t)f->H, BN / 2)
                                      : make_map(&m, f->w2, (uint64_t)f->E * f->H, (uint64_t)f->I, BN);
  if (e) return e;
  CUtensorMap ma; /* A: x's codes (gate_up) or h's (down), rows in sorted order */
  e = MODE == MODE_GATEUP ? make_map(&ma, f->xq, (uint64_t)f->h_rows, (uint64_t)f->H, BM)
                          : make_map(&ma, f->hq, (uint64_t)f->h_rows, (uint64_t)f->I, BM);
  if (e) return e;
  int grid = f->mt_max * n_tiles<MODE, BN>(*f);
  if (grid > num_sms) grid = num_sms;
  if (grid < 1) grid = 1;
  int flags = (MODE == MODE_GATEUP && BN == 256 && fuse_h ? FL_FUSE_H : 0) | (epi16 ? FL_EPI16 : 0);
  CUtensorMap mt, mp; /* the TMA expand's t and pool B (unused otherwise) */
  memset(&mt, 0, sizeof mt);
  memset(&mp, 0, sizeof mp);
  if (expand_tma && lora && f->pool && f->R > 0 && f->gstride > 1) {
    cudaError_t et = lmoe_tma_maps_expand<MODE == MODE_GATEUP>(f, BM, MODE == MODE_GATEUP ? BN / 2 : BN, &mt, &mp);
    if (!et) flags |= FL_XTMA; /* else (a stride TMA cannot take) the cp.async expand */
  }
  k_fp8<MODE, BM, BN>
      <<<grid, shape<BM, BN>::THREADS, smem_bytes<BM, BN>(), s>>>(*f, m, ma, mt, mp, lora, flags, watchdog_ns);
  return cudaGetLastError();
}

template <int MODE, int BM, int BN> cudaError_t setup(int smem_limit, int *usable) {
  typedef shape<BM, BN> S;
  void (*k)(lmoe_fwd, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, int, int, unsigned long long) =
      k_fp8<MODE, BM, BN>;
  if ((int)smem_bytes<BM, BN>() > smem_limit) {
    *usable = 0;
    return cudaSuccess;
  }
  cudaError_t e =
      cudaFuncSetAttribute((void *)k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes<BM, BN>());
  if (e) return e;
  cudaFuncAttributes a;
  if ((e = cudaFuncGetAttributes(&a, (void *)k))) return e;
  if (a.binaryVersion != 90) *usable = 0; /* no sm_90a code: the body is empty */
  /* the registers setmaxnreg redistributes must exist, else the consumers wait for ever */
  if (S::REALLOC && ((a.numRegs + 7) & ~7) * S::THREADS < S::POOL) *usable = 0;
  return cudaSuccess;
}

template <int BN> cudaError_t setup_all(int smem_limit, int *usable) {
  cudaError_t e;
  if ((e = setup<MODE_GATEUP, 128, BN>(smem_limit, usable))) return e;
  if ((e = setup<MODE_DOWN, 128, BN>(smem_limit, usable))) return e;
  if ((e = setup<MODE_GATEUP, 64, BN>(smem_limit, usable))) return e;
  return setup<MODE_DOWN, 64, BN>(smem_limit, usable);
}

template <int BN> cudaError_t run_bn(int32_t op, const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (f->bm == 128)
    return op == MODE_GATEUP ? launch<MODE_GATEUP, 128, BN>(f, lora, s) : launch<MODE_DOWN, 128, BN>(f, lora, s);
  if (f->bm == 64)
    return op == MODE_GATEUP ? launch<MODE_GATEUP, 64, BN>(f, lora, s) : launch<MODE_DOWN, 64, BN>(f, lora, s);
  return cudaErrorInvalidValue;
}

} /* namespace */

extern "C" cudaError_t lmoe_fp8_init(int32_t cc, int32_t smem_limit, int32_t *available) {
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
  int usable = 1;
  /* LMOE_FP8_BN (for measuring): the tiles' columns, 256 (the default) or 128 (docs/
     gpu-notes.md 38 measured both) */
  const char *bn = getenv("LMOE_FP8_BN");
  if (bn && *bn) tile_n = atoi(bn) == 128 ? 128 : 256;
  /* LMOE_FP8_FUSE_H=0 (for measuring): h quantized by its own kernel (gpu-notes 39) */
  const char *fh = getenv("LMOE_FP8_FUSE_H");
  fuse_h = (!fh || atoi(fh) != 0) && tile_n == 256;
  const char *ep = getenv("LMOE_SM90_EPI");
  epi16 = !ep || atoi(ep) != 0;
  const char *xt = getenv("LMOE_FP8_EXPAND_TMA"); /* gpu-notes 43 */
  if (xt) expand_tma = atoi(xt) != 0;
  if ((e = tile_n == 256 ? setup_all<256>(smem_limit, &usable) : setup_all<128>(smem_limit, &usable))) return e;
  ready = usable;
  *available = usable;
#else
  (void)cc;
  (void)smem_limit;
#endif
  return cudaSuccess;
}

extern "C" int lmoe_fp8_fuses_quant_h(void) { return ready && fuse_h; }

extern "C" cudaError_t lmoe_fp8_run(int32_t op, const lmoe_fwd *f, int lora, cudaStream_t s) {
  if (!ready || !f->fp8 || f->H % 16 || f->I % 16) return cudaErrorInvalidValue;
  return tile_n == 256 ? run_bn<256>(op, f, lora, s) : run_bn<128>(op, f, lora, s);
}

extern "C" cudaError_t lmoe_fp8_dense(int32_t M, int32_t N, int32_t K, const uint8_t *a, const float *as,
                                      const uint8_t *b, const float *bs, uint16_t *c, void *ws, cudaStream_t s) {
  if (M < 1 || K % 16 || N % 16 || K < 16 || N < 16) return cudaErrorInvalidValue;
  const int bm = LMOE_K_BM, mt = (M + bm - 1) / bm;
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
  f.fp8 = 1;
  f.nbh = (N + QB - 1) / QB;
  f.nbi = (K + QB - 1) / QB;
  f.hq = (uint8_t *)a;
  f.hsc = (float *)as;
  f.h_rows = M; /* A's tensor map: rows past M read zero */
  f.w2 = (const uint16_t *)b;
  f.w2s = bs;
  f.y = c;
  f.x = (const uint16_t *)a; /* a valid address for the zero-byte copies of padding rows */
  f.xs = (float *)as;
  k_dense_setup<<<grid_for((int64_t)rows, 256), 256, 0, s>>>(f.sorted_pair, f.tw, f.tile_expert, f.ntiles, M,
                                                              (int)rows, mt);
  cudaError_t e = cudaGetLastError();
  return e ? e : lmoe_fp8_run(LMOE_OP_DOWN, &f, 0, s);
}
