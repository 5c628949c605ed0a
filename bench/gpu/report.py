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


if __name__ == "__main__":
    main()
