"""Torch peer of the loramoe layer benchmark, run in the same command on the same card.

The same MoE layer with LoRA adapters written the way a Python serving stack writes it:
torch._grouped_mm (CUTLASS grouped GEMM) for the expert GEMMs and for the LoRA shrink /
expand per adapter, torch ops for routing, SiLU*up, the routed weights and the
reduction. Data-dependent shapes (nonzero, bincount) make it uncapturable and put host
waits in it, as in the engines it stands for; it is timed eagerly, with CUDA events,
median of --iters, input sets rotated. LoRA ranks below 8 are zero-padded to 8 (the
grouped GEMM wants 16-byte rows).

  python3 bench/peer_torch.py [qwen3|mixtral ...] --m 512,2048 --iters 50 [--csv file]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

PRESETS = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}
CASES = [
    ("no adapter", [-1] * 8, [0, 0, 0, 0]),
    ("4 adapters r16", [0, 1, 2, 3, 0, 1, 2, 3], [16] * 4),
    ("half without", [0, -1, 1, -1, 2, -1, 3, -1], [16] * 4),
    ("mixed ranks 4-32", [0, 1, 2, 3, 0, 1, 2, 3], [4, 8, 16, 32]),
]
NSETS = 3
# the floor's ceilings: measured in the same run by bench/gpu/run.sh (ceilings.py), else
# an H200's (PERFORMANCE.md)
PEAK_FLOPS = float(os.environ.get("LMOE_PEAK_FLOPS", "771e12"))
PEAK_BYTES = float(os.environ.get("LMOE_PEAK_BYTES", "4.27e12"))


def rnd(*shape, scale, dev):
    return ((torch.rand(*shape, device=dev) * 2 - 1) * scale).bfloat16()


def make_adapter(E, H, I, r, dev):
    rp = max(r, 8)
    a13 = torch.zeros(E, 2 * rp, H, device=dev, dtype=torch.bfloat16)  # [E, N, K] then transposed
    b13 = torch.zeros(E, 2 * I, 2 * rp, device=dev, dtype=torch.bfloat16)
    a13[:, :r] = rnd(E, r, H, scale=0.05, dev=dev)
    a13[:, rp:rp + r] = rnd(E, r, H, scale=0.05, dev=dev)
    b13[:, :I, :r] = rnd(E, I, r, scale=0.05, dev=dev)
    b13[:, I:, rp:rp + r] = rnd(E, I, r, scale=0.05, dev=dev)
    a2 = torch.zeros(E, rp, I, device=dev, dtype=torch.bfloat16)
    b2 = torch.zeros(E, H, rp, device=dev, dtype=torch.bfloat16)
    a2[:, :r] = rnd(E, r, I, scale=0.05, dev=dev)
    b2[:, :, :r] = rnd(E, H, r, scale=0.05, dev=dev)
    # grouped_mm takes B as [G, K, N]; the transposed views keep K contiguous
    return dict(a13=a13.transpose(1, 2), b13=b13.transpose(1, 2), a2=a2.transpose(1, 2),
                b2=b2.transpose(1, 2), scale=32.0 / r)


def forward(x, logits, w13t, w2t, k, tok_adapter, adapters, active):
    M, H = x.shape
    E = w13t.shape[0]
    I = w2t.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    tw, ids = torch.topk(probs, k, dim=-1)
    tw = tw / tw.sum(-1, keepdim=True)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    gu = torch._grouped_mm(xs, w13t, offs=offs)
    lora_sets = []
    if active:
        pair_ad = tok_adapter[tok]
        for a in active:
            idx = (pair_ad == a).nonzero().squeeze(1)
            offs_a = torch.cumsum(torch.bincount(sorted_e[idx], minlength=E), 0).to(torch.int32)
            lora_sets.append((a, idx, offs_a))
            ad = adapters[a]
            t = torch._grouped_mm(xs[idx], ad["a13"], offs=offs_a)
            d = torch._grouped_mm(t, ad["b13"], offs=offs_a) * ad["scale"]
            gu.index_add_(0, idx, d)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, w2t, offs=offs)
    for a, idx, offs_a in lora_sets:
        ad = adapters[a]
        t = torch._grouped_mm(h[idx], ad["a2"], offs=offs_a)
        y.index_add_(0, idx, torch._grouped_mm(t, ad["b2"], offs=offs_a) * ad["scale"])
    y = y * tw.flatten()[order].unsqueeze(1).to(y.dtype)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(M, k, H).float().sum(1).bfloat16()


def flops(E, H, I, k, M, slots, ranks):
    pairs = M * k
    f = pairs * 6.0 * H * I
    for s in slots:
        if s >= 0:
            f += pairs / 8 * 6.0 * ranks[s] * (H + I)
    return f


def nbytes(E, H, I, k, M, slots, ranks):
    b = E * 3.0 * H * I * 2 + 2.0 * M * H * 2 + M * E * 4.0
    for s in sorted(set(x for x in slots if x >= 0)):
        b += E * 6.0 * ranks[s] * (H + I)
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("presets", nargs="*")
    ap.add_argument("--m", default="512,2048,8192,16384")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--csv")
    args = ap.parse_args()
    dev = "cuda"
    Ms = [int(v) for v in args.m.split(",")]
    print("card:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    csv = open(args.csv, "w") if args.csv else None
    for name, (E, H, I, k) in PRESETS.items():
        if args.presets and not any(p in name for p in args.presets):
            continue
        torch.manual_seed(0)
        w13t = rnd(E, 2 * I, H, scale=0.02, dev=dev).transpose(1, 2)
        w2t = rnd(E, H, I, scale=0.02, dev=dev).transpose(1, 2)
        maxM = max(Ms)
        xs = [rnd(maxM, H, scale=1.0, dev=dev) for _ in range(NSETS)]
        lgs = [torch.rand(maxM, E, device=dev) * 4 - 2 for _ in range(NSETS)]
        print(f"\n### peer: {name} (E{E} H{H} I{I} k{k})\n")
        print("| M | case | eager ms | TFLOP/s | floor ms | % of floor |\n|---|---|---|---|---|---|")
        for M in Ms:
            for cname, slots, ranks in CASES:
                adapters = [make_adapter(E, H, I, r, dev) if r else None for r in ranks]
                per = [M // 8 + (i < M % 8) for i in range(8)]
                tok_adapter = torch.cat([torch.full((n,), s, device=dev, dtype=torch.int32)
                                         for n, s in zip(per, slots)])
                active = sorted(set(s for s in slots if s >= 0))
                run = lambda i: forward(xs[i % NSETS][:M], lgs[i % NSETS][:M], w13t, w2t, k,
                                        tok_adapter, adapters, active)
                for i in range(3):
                    run(i)
                torch.cuda.synchronize()
                ts = []
                for i in range(args.iters):
                    s0 = torch.cuda.Event(enable_timing=True)
                    s1 = torch.cuda.Event(enable_timing=True)
                    s0.record()
                    run(i)
                    s1.record()
                    ts.append((s0, s1))
                torch.cuda.synchronize()
                ms = sorted(a.elapsed_time(b) for a, b in ts)
                med = ms[len(ms) // 2] if len(ms) % 2 else 0.5 * (ms[len(ms) // 2 - 1] + ms[len(ms) // 2])
                fl = flops(E, H, I, k, M, slots, ranks)
                fm = max(fl / PEAK_FLOPS, nbytes(E, H, I, k, M, slots, ranks) / PEAK_BYTES) * 1e3
                print(f"| {M} | {cname} | {med:.3f} | {fl / med / 1e9:.0f} | {fm:.3f} | {100 * fm / med:.0f}% |")
                sys.stdout.flush()
                if csv:
                    csv.write(f"{name},{M},{cname},{med:.4f},{fl / med / 1e9:.1f},{fm:.4f}\n")
                del adapters
        del w13t, w2t, xs, lgs
        torch.cuda.empty_cache()
    if csv:
        csv.close()


if __name__ == "__main__":
    main()
