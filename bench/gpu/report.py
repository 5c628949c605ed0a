"""Summary of one bench/gpu/run.sh: ratios between loramoe and the peers measured in
the same run (CSV files from bench_gpu, ceilings.py and peer_torch.py).

  python3 bench/gpu/report.py OUTDIR
"""
import csv
import os
import sys


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in csv.reader(f) if r]


def main():
    out = sys.argv[1]
    grouped = {(r[0], int(r[1])): float(r[3]) for r in rows(os.path.join(out, "grouped.csv"))}
    gem = rows(os.path.join(out, "gemms.csv"))
    if gem:
        print("\n### expert GEMMs alone: loramoe vs torch._grouped_mm (CUTLASS), TFLOP/s\n")
        print("| preset | M | engine (row) | loramoe | CUTLASS | ratio |\n|---|---|---|---|---|---|")
        for p, M, eng, row, ms, tf in gem:
            ref = grouped.get((p, int(M)))
            ratio = f"{float(tf) / ref:.2f}x" if ref else "-"
            print(f"| {p} | {M} | {eng} ({row}) | {float(tf):.0f} | {ref or 0:.0f} | {ratio} |")
    lay = rows(os.path.join(out, "loramoe.csv"))
    peer = {(r[0], int(r[1]), r[2]): float(r[3]) for r in rows(os.path.join(out, "peer.csv"))}
    if lay:
        base = {(r[0], int(r[1])): float(r[4]) for r in lay if r[2] == "no adapter"}
        print("\n### layer: graph replay, % of floor, LoRA cost, torch peer / loramoe\n")
        print("| preset | M | case | eager ms | graph ms | % of floor | LoRA cost | peer/eager | peer/graph |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p, M, case, te, tg, tf, floor in lay:
            M, te, tg, floor = int(M), float(te), float(tg), float(floor)
            b = base.get((p, M))
            cost = f"{100 * (tg - b) / b:+.0f}%" if b and case != "no adapter" else "-"
            pr = peer.get((p, M, case))
            r1 = f"{pr / te:.2f}x" if pr else "-"
            r2 = f"{pr / tg:.2f}x" if pr else "-"
            print(f"| {p} | {M} | {case} | {te:.3f} | {tg:.3f} | {100 * floor / tg:.0f}% | {cost} | {r1} | {r2} |")
    fp8_tables(out, lay)


def peaks(out):
    """The ceilings ceilings.py wrote (export NAME=value lines)."""
    v = {}
    path = os.path.join(out, "peaks.env")
    if os.path.exists(path):
        for line in open(path):
            name, _, val = line.replace("export ", "").strip().partition("=")
            try:
                v[name] = float(val)
            except ValueError:
                pass
    return v


def fp8_tables(out, lay):
    """Issue 12's rows: the FP8 expert GEMMs against torch's FP8 grouped GEMM and the FP8
    ceiling; the FP8 layer beside the bf16 one (speed-up) and its LoRA cost over the FP8
    layer without adapters."""
    pk = peaks(out)
    ceil = pk.get("LMOE_PEAK_FLOPS_FP8")
    ceil_s = f"{ceil / 1e12:.0f} TFLOP/s" if ceil else "not measured"
    gem = rows(os.path.join(out, "gemms_fp8.csv"))
    ref = {(r[0], int(r[1])): float(r[3]) for r in rows(os.path.join(out, "grouped_fp8.csv"))}
    if gem:
        print(f"\n### FP8 expert GEMMs alone: loramoe vs torch._scaled_grouped_mm, TFLOP/s (FP8 ceiling {ceil_s})\n")
        print("| preset | M | loramoe | % of ceiling | torch | ratio |\n|---|---|---|---|---|---|")
        for p, M, _eng, _row, ms, tf in gem:
            tf = float(tf)
            r = ref.get((p, int(M)))
            pc = f"{100 * tf * 1e12 / ceil:.0f}%" if ceil else "-"
            print(f"| {p} | {M} | {tf:.0f} | {pc} | {f'{r:.0f}' if r else '-'} | {f'{tf / r:.2f}x' if r else '-'} |")
    f8 = rows(os.path.join(out, "loramoe_fp8.csv"))
    if not f8:
        return
    bf = {(r[0], int(r[1]), r[2]): float(r[4]) for r in lay}
    base8 = {(r[0], int(r[1])): float(r[4]) for r in f8 if r[2] == "fp8 no adapter"}
    print("\n### FP8 layer: graph replay against the bf16 layer and the FP8 layer without adapters\n")
    print("| preset | M | case | graph ms | TFLOP/s | bf16 graph ms | speed-up | LoRA cost (FP8) |")
    print("|---|---|---|---|---|---|---|---|")
    for p, M, case, _te, tg, tf, _floor in f8:
        M, tg = int(M), float(tg)
        b = bf.get((p, M, case.replace("fp8 ", "", 1)))
        b8 = base8.get((p, M))
        cost = f"{100 * (tg - b8) / b8:+.0f}%" if b8 and case != "fp8 no adapter" else "-"
        print(f"| {p} | {M} | {case} | {tg:.3f} | {float(tf):.0f} | {f'{b:.3f}' if b else '-'} | "
              f"{f'{b / tg:.2f}x' if b else '-'} | {cost} |")


if __name__ == "__main__":
    main()
