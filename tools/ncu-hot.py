#!/usr/bin/env python3
"""Summarises ncu's source page (SASS, one or more kernels) to where the warps wait.

    ncu --set full --import-source no -o rep <app>          # on the GPU machine
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 tools/ncu-hot.py src.csv[.gz] [--top 25] [--bins 100] [--around ADDR_INDEX]

For each kernel: its stall samples and instructions, the stall reasons summed over the
kernel, the instructions with the most samples (index, samples, executions, the two
largest reasons), and the samples per run of --bins instructions, which separates the
producer's loop, the consumers' main loop and the epilogue of a warp-specialised kernel.
--around N prints the instructions N-20 .. N+20 of each kernel (a hot branch's loop).
The indices are positions in the kernel's SASS listing. Standard library only."""
import argparse
import csv
import gzip
import io
import sys


def kernels(path):
    """(name, header, rows) per kernel of the CSV: ncu prints a "Kernel Name" line, then
    the table's header and rows, for every kernel profiled."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        text = fh.read()
    blocks, cur = [], None
    for line in text.split("\n"):
        if line.startswith('"Kernel Name"'):
            cur = [line]
            blocks.append(cur)
        elif cur is not None:
            cur.append(line)
    for b in blocks:
        name = next(csv.reader([b[0]]))[1]
        rows = list(csv.reader(io.StringIO("\n".join(b[1:]))))
        if not rows:
            continue
        head = rows[0]
        yield name, head, [r for r in rows[1:] if len(r) == len(head)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--bins", type=int, default=100)
    ap.add_argument("--around", type=int, default=-1)
    a = ap.parse_args()
    seen = set()
    for name, head, rows in kernels(a.csv):
        key = (name, len(rows))
        if key in seen:  # ncu repeats a kernel's page for each launch profiled
            continue
        seen.add(key)
        try:
            i_s = head.index("Warp Stall Sampling (All Samples)")
            i_e = head.index("Instructions Executed")
            i_src = head.index("Source")
        except ValueError:
            print(f"{name}: no source counters (profile with --set full)", file=sys.stderr)
            continue
        reasons = [(i, h) for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]
        num = lambda r, i: int(float(r[i] or 0))
        samples = sum(num(r, i_s) for r in rows)
        print(f"== {name[:110]}")
        print(f"   {samples} samples, {sum(num(r, i_e) for r in rows)} warp instructions, {len(rows)} in the listing")
        total = sorted(((sum(num(r, i) for r in rows), h) for i, h in reasons), reverse=True)
        print("   reasons: " + ", ".join(f"{h[6:]} {v * 100.0 / max(samples, 1):.0f}%" for v, h in total[:8]))
        print("   hottest:")
        for idx in sorted(range(len(rows)), key=lambda k: -num(rows[k], i_s))[: a.top]:
            r = rows[idx]
            why = sorted(((num(r, i), h[6:]) for i, h in reasons), reverse=True)[:2]
            print(f"   {idx:6d} {num(r, i_s):7d} {num(r, i_e):10d}  {r[i_src].strip()[:58]:58s} "
                  + " ".join(f"{h} {v}" for v, h in why if v))
        print(f"   by {a.bins} instructions (start, samples, executions, first instruction):")
        for b in range(0, len(rows), a.bins):
            part = rows[b : b + a.bins]
            s = sum(num(r, i_s) for r in part)
            if s * 100 >= samples:  # runs with at least 1% of the samples
                print(f"   {b:6d} {s:7d} {sum(num(r, i_e) for r in part):11d}  {part[0][i_src].strip()[:50]}")
        if a.around >= 0:
            for idx in range(max(0, a.around - 20), min(len(rows), a.around + 21)):
                r = rows[idx]
                print(f"   {idx:6d} {num(r, i_s):7d} {num(r, i_e):10d}  {r[i_src].strip()[:80]}")


if __name__ == "__main__":
    main()
