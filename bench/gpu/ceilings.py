"""The card's ceilings and the CUTLASS grouped-GEMM reference, measured in the same run
as loramoe's benchmark (bench/gpu/run.sh):

- a cuBLAS bf16 GEMM 8192^3 (torch.mm) and a device-to-device copy (bytes read +
  written): the floor of the layer is max(FLOPs / GEMM rate, bytes / copy rate);
- the two expert GEMMs alone (gate_up then down) through torch._grouped_mm on each
  preset's shapes, routed as the layer benchmark routes (random logits, top-k);
- FP8 e4m3 (issue 12's rows): the card's FP8 ceiling, torch._scaled_mm 8192^3 with
  fast accumulation (cuBLAS), and the two expert GEMMs through torch._scaled_grouped_mm
  (CUTLASS; row-wise scales, the nearest torch has to 128x128 blocks), where this torch
  has them; a missing one is said and skipped, the rest still runs.

  python3 bench/gpu/ceilings.py [--m 512,2048] [--iters 50] [--env peaks.env] [--csv grouped.csv]
                                [--csv-fp8 grouped_fp8.csv]
"""
import argparse

import torch

PRESETS = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    evs = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in evs)
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])


def route_offsets(M, E, k):
    """Group ends of the M x k pairs, routed as the layer benchmark routes them."""
    logits = torch.rand(M, E, device="cuda") * 4 - 2
    ids = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices.flatten()
    return torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)


def gemm_row(name, M, k, H, I, ms, csv):
    """A table row (and CSV line) of the two expert GEMMs: ms and TFLOP/s."""
    tf = M * k * 6.0 * H * I / (ms * 1e-3) / 1e12
    print(f"| {M} | {ms:.3f} | {tf:.0f} |")
    if csv:
        csv.write(f"{name},{M},{ms:.4f},{tf:.1f}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="512,2048,8192,16384")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--env")
    ap.add_argument("--csv")
    ap.add_argument("--csv-fp8")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b.t()), args.iters)
    flops = 2.0 * n ** 3 / (ms * 1e-3)
    del a, b
    src = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    cms = median_ms(lambda: dst.copy_(src), args.iters)
    bw = 2.0 * src.numel() / (cms * 1e-3)
    del src, dst
    print(f"card: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"ceilings: cuBLAS bf16 8192^3 {ms:.3f} ms = {flops / 1e12:.0f} TFLOP/s; "
          f"device copy 1 GiB {cms:.3f} ms = {bw / 1e12:.2f} TB/s (read + write)")
    fp8_flops = fp8_ceiling(n, args.iters)
    if args.env:
        with open(args.env, "w") as f:
            f.write(f"export LMOE_PEAK_FLOPS={flops:.4e}\nexport LMOE_PEAK_BYTES={bw:.4e}\n")
            if fp8_flops:
                f.write(f"export LMOE_PEAK_FLOPS_FP8={fp8_flops:.4e}\n")
    csv = open(args.csv, "w") if args.csv else None
    Ms = [int(v) for v in args.m.split(",")]
    for name, (E, H, I, k) in PRESETS.items():
        w13t = (torch.randn(E, 2 * I, H, device=dev) * 0.02).bfloat16().transpose(1, 2)
        w2t = (torch.randn(E, H, I, device=dev) * 0.02).bfloat16().transpose(1, 2)
        print(f"\n### expert GEMMs alone through torch._grouped_mm (CUTLASS): {name}\n")
        print("| M | ms | TFLOP/s |\n|---|---|---|")
        for M in Ms:
            offs = route_offsets(M, E, k)
            xs = torch.randn(M * k, H, device=dev).bfloat16()
            h = torch.randn(M * k, I, device=dev).bfloat16()
            run = lambda: (torch._grouped_mm(xs, w13t, offs=offs), torch._grouped_mm(h, w2t, offs=offs))
            gemm_row(name, M, k, H, I, median_ms(run, args.iters), csv)
        del w13t, w2t
        torch.cuda.empty_cache()
    if csv:
        csv.close()
    if fp8_flops:
        fp8_grouped(Ms, args.iters, args.csv_fp8)


E4M3 = getattr(torch, "float8_e4m3fn", None)


def fp8_ceiling(n, iters):
    """cuBLAS e4m3 8192^3 (torch._scaled_mm, fast accumulation): FLOP/s, or None."""
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        print("FP8 ceiling: this torch has no float8_e4m3fn / _scaled_mm")
        return None
    try:
        a = torch.randn(n, n, device="cuda").clamp(-8, 8).to(E4M3)
        b = torch.randn(n, n, device="cuda").clamp(-8, 8).to(E4M3)
        one = torch.ones((), device="cuda", dtype=torch.float32)
        run = lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                       use_fast_accum=True)
        ms = median_ms(run, iters)
    except Exception as e:  # an older torch or card: say so, keep the bf16 figures
        print(f"FP8 ceiling: torch._scaled_mm failed: {e}")
        return None
    fl = 2.0 * n ** 3 / (ms * 1e-3)
    print(f"ceiling: cuBLAS e4m3 8192^3 (torch._scaled_mm, fast accumulation) {ms:.3f} ms = {fl / 1e12:.0f} TFLOP/s")
    del a, b
    torch.cuda.empty_cache()
    return fl


def fp8_grouped(Ms, iters, csv_path):
    """The two expert GEMMs in e4m3 through torch._scaled_grouped_mm (row-wise scales)."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        print("\nFP8 grouped reference: this torch has no _scaled_grouped_mm")
        return
    csv = open(csv_path, "w") if csv_path else None
    for name, (E, H, I, k) in PRESETS.items():
        print(f"\n### FP8 expert GEMMs alone through torch._scaled_grouped_mm (CUTLASS, row-wise scales): {name}\n")
        try:
            w13t = (torch.randn(E, 2 * I, H, device="cuda")).clamp(-8, 8).to(E4M3).transpose(1, 2)
            w2t = (torch.randn(E, H, I, device="cuda")).clamp(-8, 8).to(E4M3).transpose(1, 2)
            s13 = torch.rand(E, 2 * I, device="cuda") * 0.01
            s2 = torch.rand(E, H, device="cuda") * 0.01
        except Exception as e:
            print(f"FP8 weights could not be made: {e}")
            break
        print("| M | ms | TFLOP/s |\n|---|---|---|")
        for M in Ms:
            offs = route_offsets(M, E, k)
            xs = torch.randn(M * k, H, device="cuda").clamp(-8, 8).to(E4M3)
            h = torch.randn(M * k, I, device="cuda").clamp(-8, 8).to(E4M3)
            sx = torch.rand(M * k, device="cuda") * 0.01
            sh = torch.rand(M * k, device="cuda") * 0.01
            run = lambda: (torch._scaled_grouped_mm(xs, w13t, sx, s13, offs=offs, out_dtype=torch.bfloat16),
                           torch._scaled_grouped_mm(h, w2t, sh, s2, offs=offs, out_dtype=torch.bfloat16))
            try:
                gms = median_ms(run, iters)
            except Exception as e:
                print(f"| {M} | failed: {str(e).splitlines()[0][:200]} | - |")
                continue
            gemm_row(name, M, k, H, I, gms, csv)
        del w13t, w2t
        torch.cuda.empty_cache()
    if csv:
        csv.close()


if __name__ == "__main__":
    main()
