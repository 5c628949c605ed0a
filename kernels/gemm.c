/* The GEMM stages' launchers and the kernels' per-device setup. A stage runs on the
   forward's engine (lmoe_fwd.engine) with the row of the table the plan selected
   (gemm_cfg for gate_up and down, shrink13_cfg and shrink2_cfg for the shrinks). */
#include "gemm_engine.h"

#include <stdlib.h>
#include <string.h>

/* A fused shrink's switch: "1" on wherever it can be, "0" off, "shape" by the shape,
   unset or empty the default (gemm_config.h's LMOE_SM90_FUSE_DEFAULT) */
static int32_t fuse_mode(const char *v) {
  if (!v || !*v) return LMOE_SM90_FUSE_DEFAULT;
  if (strcmp(v, "shape") == 0) return LMOE_FUSE_BY_SHAPE;
  return atoi(v) != 0 ? LMOE_FUSE_ON : LMOE_FUSE_OFF;
}

cudaError_t lmoe_k_init(lmoe_gemm_device *dev) {
  int d = 0, limit = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&d);
  if (!e) e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, d);
  if (!e) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
  if (!e) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
  if (e) return e;
  /* every engine sets up its rows that fit */
  if ((e = lmoe_sm80_init(limit))) return e;
  int32_t sm90 = 0;
  if ((e = lmoe_sm90_init(major * 10 + minor, limit, &sm90))) return e;
  const char *env = getenv("LMOE_GEMM_CFG");
  const char *eng = getenv("LMOE_ENGINE"); /* "sm80": the mma.sync engine everywhere */
  dev->sm90 = sm90 && !(eng && strcmp(eng, "sm80") == 0);
  dev->cc = major * 10 + minor;
  dev->smem_optin = limit;
  dev->force_cfg = env ? atoi(env) : -1;
  const char *sp = getenv("LMOE_SMALL_TILE_PAIRS"); /* for measuring: see gemm_config.h */
  dev->small_tile_pairs = sp && atoi(sp) > 0 ? atoi(sp) : 0;
  /* LMOE_SM90_SHRINK (for measuring): 1 both shrinks on the sm90 engine's rows, 0 both
     on sm80 rows; unset, each by its K (gemm_config.h) */
  const char *sh = getenv("LMOE_SM90_SHRINK");
  dev->shrink_mode = !sh || !*sh ? LMOE_SHRINK_BY_K : atoi(sh) != 0 ? LMOE_SHRINK_SM90 : LMOE_SHRINK_SM80;
  /* LMOE_SM90_GATHER (for measuring): 1 x gathered into sorted order for every bf16 sm90
     gate_up, 0 never; unset, by the shape (gemm_config.h) */
  const char *ga = getenv("LMOE_SM90_GATHER");
  dev->gather_x = !ga || !*ga ? LMOE_GATHER_BY_SHAPE : atoi(ga) != 0 ? LMOE_GATHER_ON : LMOE_GATHER_OFF;
  /* LMOE_SM90_SHRINK_SN (for measuring): 64 or 128, the sm90 shrinks' pass width
     whatever the shape (gemm_config.h) */
  const char *sw = getenv("LMOE_SM90_SHRINK_SN");
  dev->shrink_sn = sw && (atoi(sw) == 64 || atoi(sw) == 128) ? atoi(sw) : 0;
  /* LMOE_SM90_FUSE_T2=1 (for measuring): shrink2 in the bf16 sm90 gate_up's epilogue
     wherever it can be (lmoe_fwd.t2p) */
  const char *ft = getenv("LMOE_SM90_FUSE_T2");
  dev->fuse_t2 = ft && atoi(ft) != 0;
  /* LMOE_SM90_FUSE_S13 (for measuring): 1 shrink13 inside the bf16 sm90 gate_up wherever
     it can be, 0 never, "shape" by the shape (gemm_config.h); unset, LMOE_SM90_FUSE_DEFAULT */
  dev->fuse_s13 = fuse_mode(getenv("LMOE_SM90_FUSE_S13"));
  /* LMOE_SM90_FUSE_S2 (for measuring): the same for shrink2 inside the bf16 sm90 down */
  dev->fuse_s2 = fuse_mode(getenv("LMOE_SM90_FUSE_S2"));
  /* LMOE_SHARD_CHUNKS (for measuring): a sharded layer's column chunks (lmoe_k_shard_chunks) */
  const char *sc = getenv("LMOE_SHARD_CHUNKS");
  dev->shard_chunks = sc && atoi(sc) > 0 ? atoi(sc) : 0;
  if (!lmoe_gemm_supported(dev)) return cudaErrorInvalidConfiguration; /* under ~70 KB: not a supported GPU */
  return cudaSuccess;
}

/* The engine hook: every GEMM stage goes through here, to the engine of its row. An
   engine added to the table adds its case. */
static cudaError_t run_gemm(int32_t op, const lmoe_fwd *f, int lora, cudaStream_t s) {
  /* an FP8 layer's gate_up and down: the FP8 engine, whatever the table's row (its row
     tile, f->bm, is the plan's); its shrinks read the bf16 activations on their row */
  if (f->fp8 && (op == LMOE_OP_GATEUP || op == LMOE_OP_DOWN)) return lmoe_fp8_run(op, f, lora, s);
  int32_t cfg = op == LMOE_OP_SHRINK13 ? f->shrink13_cfg : op == LMOE_OP_SHRINK2 ? f->shrink2_cfg : f->gemm_cfg;
  if (cfg < 0 || cfg >= lmoe_gemm_nconfigs) return cudaErrorInvalidValue;
  switch (lmoe_gemm_configs[cfg].engine) {
  case LMOE_ENGINE_SM80: return lmoe_sm80_run(op, cfg, f, lora, s);
  case LMOE_ENGINE_SM90: return lmoe_sm90_run(op, cfg, f, lora, s);
  default: return cudaErrorInvalidValue;
  }
}

cudaError_t lmoe_k_fp8_init(int32_t *available) {
  int d = 0, limit = 0, major = 0, minor = 0;
  *available = 0;
  cudaError_t e = cudaGetDevice(&d);
  if (!e) e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, d);
  if (!e) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
  if (!e) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
  return e ? e : lmoe_fp8_init(major * 10 + minor, limit, available);
}

cudaError_t lmoe_k_shrink13(const lmoe_fwd *f, cudaStream_t s) { return run_gemm(LMOE_OP_SHRINK13, f, 1, s); }
cudaError_t lmoe_k_gateup(const lmoe_fwd *f, int lora, cudaStream_t s) {
  return run_gemm(LMOE_OP_GATEUP, f, lora, s);
}
cudaError_t lmoe_k_shrink2(const lmoe_fwd *f, cudaStream_t s) { return run_gemm(LMOE_OP_SHRINK2, f, 1, s); }
cudaError_t lmoe_k_down(const lmoe_fwd *f, int lora, cudaStream_t s) { return run_gemm(LMOE_OP_DOWN, f, lora, s); }
