/* Scaling of one sharded MoE layer over the GPUs of this machine (issue 13; docs/design.md,
   "Sharding"):
     bench_shard [preset ...] [--m 2048,16384] [--gpus 1,2,4,8] [--modes tp,ep] [--iters N]
                 [--csv file]
   presets: qwen3 (E128 H2048 I768 k8), mixtral (E8 H4096 I14336 k2).
   Per preset, mode (tensor or expert parallel), rank count n and M: n cuda contexts on
   devices 0..n-1, the communicator lmoe_comm_create_local makes over them (NCCL), each
   rank's shard of the same random layer and of 4 adapters r16, and the batch once per
   rank; the forward of all ranks through lmoe_forward_group, eager, cases "no adapter"
   and "4 adapters r16" (8 requests, each on an adapter). Time of a forward: CUDA events
   on each rank's stream around it, the largest of the ranks; the median of --iters
   after 5 warm-up forwards. Reported: ms, the speed-up over the run with one GPU of the
   same table and the scaling efficiency t(1) / (n t(n)). Rank counts above the devices
   present are skipped, and n > 1 needs a build with NCCL (LMOE_NCCL).
   The output all-reduce (ncclAllReduce of M x H float32 on each rank's stream) is inside
   the timed forward; to see it apart, profile a run with ncu or nsys and read the NCCL
   kernel's time (`ncu -k regex:nccl --metrics gpu__time_duration.sum bench_shard ...`). */
#include "../bench_common.h"
#include "bench_gpu_common.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXG 8

/* One rank: its context (device dev), shard of the layer and the adapters, batch and
   buffers. */
typedef struct rank_state {
  lmoe_context *ctx;
  int dev;
  lmoe_layer *layer;
  lmoe_pool *pool;
  lmoe_batch *batch;
  lmoe_buffer *x, *logits, *out;
  lmoe_forward_args args;
} rank_state;

static lmoe_context *gpu_context(int dev) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  cfg.device = dev;
  char err[256];
  lmoe_context *c = NULL;
  if (lmoe_context_create(&cfg, &c, err, sizeof err)) {
    fprintf(stderr, "context on device %d: %s\n", dev, err);
    exit(1);
  }
  return c;
}

/* rank `rank` of n on r->ctx (made already): comm is its communicator where n > 1 */
static void make_rank(rank_state *r, const preset *p, int mode, int rank, int n, lmoe_comm *comm, int M) {
  lmoe_context *c = r->ctx;
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = p->E, lc.hidden = p->H, lc.intermediate = p->I, lc.top_k = p->k, lc.max_tokens = M;
  if (n > 1) lc.shard_mode = mode, lc.shard_rank = rank, lc.shard_size = n, lc.comm = comm;
  CK(c, lmoe_layer_create(c, &lc, &r->layer));
  CK(c, lmoe_layer_randomize(r->layer, 7, 0.02f)); /* a shard keeps its part of the same values */
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 4, pc.max_rank = 16;
  CK(c, lmoe_pool_create(r->layer, &pc, &r->pool));
  for (int s = 0; s < 4; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.targets = LMOE_TARGET_ALL, ra.rank = 16, ra.alpha = 32, ra.seed = 100 + (uint64_t)s;
    CK(c, lmoe_pool_load_random(r->pool, s, &ra));
  }
  CK(c, lmoe_batch_create(c, &r->batch));
  int64_t sx[2] = {M, p->H}, sl[2] = {M, p->E};
  CK(c, lmoe_buffer_create(c, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &r->x));
  CK(c, lmoe_buffer_create(c, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &r->logits));
  CK(c, lmoe_buffer_create(c, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &r->out));
  /* the same tokens and logits on every rank (each computes its part of all of them) */
  CK(c, lmoe_buffer_fill_random(r->x, 11, -1, 1, NULL));
  CK(c, lmoe_buffer_fill_random(r->logits, 21, -2, 2, NULL));
  lmoe_forward_args_init(&r->args);
  r->args.layer = r->layer, r->args.batch = r->batch, r->args.x = r->x, r->args.router_logits = r->logits;
  r->args.out = r->out;
  CK(c, lmoe_context_synchronize(c, NULL));
}

static void free_rank(rank_state *r) {
  lmoe_buffer_release(r->x), lmoe_buffer_release(r->logits), lmoe_buffer_release(r->out);
  lmoe_batch_release(r->batch);
  lmoe_pool_release(r->pool);
  lmoe_layer_release(r->layer);
  lmoe_context_release(r->ctx);
}

static void forward_all(rank_state *rs, int n) {
  lmoe_context *ctxs[MAXG];
  const lmoe_forward_args *args[MAXG];
  for (int r = 0; r < n; r++) ctxs[r] = rs[r].ctx, args[r] = &rs[r].args;
  if (n == 1) CK(rs[0].ctx, lmoe_forward(rs[0].ctx, args[0], NULL));
  else CK(rs[0].ctx, lmoe_forward_group(n, ctxs, args, NULL));
}

/* Median over iters of the slowest rank's event time around a forward of all ranks. */
static double time_ranks(rank_state *rs, int n, int iters) {
  enum { MAXI = 200 };
  if (iters > MAXI) iters = MAXI;
  cudaEvent_t ev[MAXG][2 * MAXI];
  for (int r = 0; r < n; r++) {
    CU(cudaSetDevice(rs[r].dev));
    for (int i = 0; i < 2 * iters; i++) CU(cudaEventCreate(&ev[r][i]));
  }
  for (int w = 0; w < 5; w++) forward_all(rs, n);
  for (int i = 0; i < iters; i++) {
    for (int r = 0; r < n; r++) {
      CU(cudaSetDevice(rs[r].dev));
      CU(cudaEventRecord(ev[r][2 * i], (cudaStream_t)lmoe_context_stream(rs[r].ctx)));
    }
    forward_all(rs, n);
    for (int r = 0; r < n; r++) {
      CU(cudaSetDevice(rs[r].dev));
      CU(cudaEventRecord(ev[r][2 * i + 1], (cudaStream_t)lmoe_context_stream(rs[r].ctx)));
    }
  }
  double t[MAXI];
  for (int i = 0; i < iters; i++) t[i] = 0;
  for (int r = 0; r < n; r++) {
    CU(cudaSetDevice(rs[r].dev));
    CK(rs[r].ctx, lmoe_context_synchronize(rs[r].ctx, NULL));
    for (int i = 0; i < iters; i++) {
      float ms;
      CU(cudaEventElapsedTime(&ms, ev[r][2 * i], ev[r][2 * i + 1]));
      if (ms > t[i]) t[i] = ms;
    }
    for (int i = 0; i < 2 * iters; i++) cudaEventDestroy(ev[r][i]);
  }
  return median(t, iters);
}

int main(int argc, char **argv) {
  const preset *ps[2];
  int np = 0, Ms[8] = {2048, 16384}, nM = 2, gs[8] = {1, 2, 4, 8}, ng = 4, iters = 20;
  int modes[2] = {LMOE_SHARD_TP, LMOE_SHARD_EP}, nmodes = 2;
  FILE *csv = NULL;
  for (int i = 1; i < argc; i++) {
    if ((!strcmp(argv[i], "qwen3") || !strcmp(argv[i], "mixtral")) && np < 2)
      ps[np++] = &PRESETS[!strcmp(argv[i], "mixtral")];
    else if (!strcmp(argv[i], "--m") && i + 1 < argc) nM = parse_ints(argv[++i], Ms, 8);
    else if (!strcmp(argv[i], "--gpus") && i + 1 < argc) ng = parse_ints(argv[++i], gs, 8);
    else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--modes") && i + 1 < argc) {
      const char *m = argv[++i];
      nmodes = 0;
      if (strstr(m, "tp")) modes[nmodes++] = LMOE_SHARD_TP;
      if (strstr(m, "ep")) modes[nmodes++] = LMOE_SHARD_EP;
    } else if (!strcmp(argv[i], "--csv") && i + 1 < argc) {
      if (!(csv = fopen(argv[++i], "w"))) {
        perror(argv[i]);
        return 1;
      }
    } else {
      fprintf(stderr, "usage: bench_shard [qwen3] [mixtral] [--m 2048,16384] [--gpus 1,2,4,8] "
                      "[--modes tp,ep] [--iters N] [--csv file]\n");
      return 2;
    }
  }
  if (np == 0) ps[np++] = &PRESETS[0], ps[np++] = &PRESETS[1];
  if (iters < 1) iters = 1;
  int ndev = 0;
  CU(cudaGetDeviceCount(&ndev));
  printf("devices: %d, NCCL: %s\n", ndev, lmoe_has_nccl() ? "yes" : "no");
  if (csv) fprintf(csv, "preset,mode,gpus,M,case,ms,speedup,efficiency\n");
  static const char *cases[2] = {"no adapter", "4 adapters r16"};
  for (int pi = 0; pi < np; pi++) {
    const preset *p = ps[pi];
    for (int mi = 0; mi < nmodes; mi++) {
      const char *mode = modes[mi] == LMOE_SHARD_TP ? "tensor parallel" : "expert parallel";
      printf("\n### %s (E%d H%d I%d k%d), %s\n\n", p->name, p->E, p->H, p->I, p->k, mode);
      printf("| GPUs | M | case | ms | speed-up | efficiency |\n|---|---|---|---|---|---|\n");
      double base[8][2] = {{0}};
      for (int gi = 0; gi < ng; gi++) {
        const int n = gs[gi];
        if (n < 1 || n > MAXG || n > ndev || (n > 1 && !lmoe_has_nccl())) {
          printf("| %d | - | - | skipped (%s) | | |\n", n, n > ndev ? "not that many devices" : "no NCCL");
          continue;
        }
        if (modes[mi] == LMOE_SHARD_EP && p->E % n) {
          printf("| %d | - | - | skipped (%d experts on %d ranks) | | |\n", n, p->E, n);
          continue;
        }
        int maxM = 0;
        for (int j = 0; j < nM; j++) maxM = Ms[j] > maxM ? Ms[j] : maxM;
        /* the contexts (one a device), their communicators, then the ranks' layers */
        rank_state rs[MAXG];
        memset(rs, 0, sizeof rs);
        lmoe_comm *comms[MAXG] = {0};
        lmoe_context *ctxs[MAXG];
        for (int r = 0; r < n; r++) rs[r].dev = r, ctxs[r] = rs[r].ctx = gpu_context(r);
        char err[256];
        if (n > 1 && lmoe_comm_create_local(n, ctxs, comms, err, sizeof err)) {
          fprintf(stderr, "communicator over %d devices: %s\n", n, err);
          return 1;
        }
        for (int r = 0; r < n; r++) {
          make_rank(&rs[r], p, modes[mi], r, n, comms[r], maxM);
          if (comms[r]) lmoe_comm_release(comms[r]); /* the layer keeps it alive */
        }
        for (int j = 0; j < nM; j++) {
          const int M = Ms[j];
          for (int ci = 0; ci < 2; ci++) {
            int tok[8], slots[8];
            for (int q = 0; q < 8; q++) tok[q] = M / 8 + (q < M % 8), slots[q] = ci ? q % 4 : LMOE_NO_ADAPTER;
            for (int r = 0; r < n; r++) {
              CK(rs[r].ctx, lmoe_batch_set(rs[r].batch, ci ? rs[r].pool : NULL, 8, tok, slots));
              rs[r].args.pool = ci ? rs[r].pool : NULL;
            }
            /* views of the first M rows */
            lmoe_buffer *vx[MAXG], *vl[MAXG], *vo[MAXG];
            for (int r = 0; r < n; r++) {
              lmoe_buffer_desc d;
              int64_t sx[2] = {M, p->H}, sl[2] = {M, p->E};
              lmoe_buffer_describe(rs[r].x, &d);
              CK(rs[r].ctx, lmoe_buffer_wrap(rs[r].ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, d.data, &vx[r]));
              lmoe_buffer_describe(rs[r].logits, &d);
              CK(rs[r].ctx, lmoe_buffer_wrap(rs[r].ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, d.data, &vl[r]));
              lmoe_buffer_describe(rs[r].out, &d);
              CK(rs[r].ctx, lmoe_buffer_wrap(rs[r].ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, d.data, &vo[r]));
              rs[r].args.x = vx[r], rs[r].args.router_logits = vl[r], rs[r].args.out = vo[r];
            }
            const double ms = time_ranks(rs, n, iters);
            if (n == 1) base[j][ci] = ms;
            const double b1 = base[j][ci];
            if (b1 > 0)
              printf("| %d | %d | %s | %.3f | %.2fx | %.0f%% |\n", n, M, cases[ci], ms, b1 / ms, 100.0 * b1 / (n * ms));
            else
              printf("| %d | %d | %s | %.3f | - | - |\n", n, M, cases[ci], ms);
            fflush(stdout);
            if (csv)
              fprintf(csv, "%s,%s,%d,%d,%s,%.4f,%.3f,%.3f\n", p->name, modes[mi] == LMOE_SHARD_TP ? "tp" : "ep", n,
                      M, cases[ci], ms, b1 > 0 ? b1 / ms : 0.0, b1 > 0 ? b1 / (n * ms) : 0.0);
            for (int r = 0; r < n; r++) {
              lmoe_buffer_release(vx[r]), lmoe_buffer_release(vl[r]), lmoe_buffer_release(vo[r]);
              rs[r].args.x = rs[r].x, rs[r].args.router_logits = rs[r].logits, rs[r].args.out = rs[r].out;
            }
          }
        }
        for (int r = 0; r < n; r++) free_rank(&rs[r]);
      }
    }
  }
  if (csv) fclose(csv);
  return 0;
}
