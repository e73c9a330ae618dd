"""Every benchmark at a size that finishes in under 15 minutes on 2 cores (about 6 measured), and one table of the ratios they measure
against a peer or a physical limit, with the machine's measured fp32 GEMM rate and copy bandwidth beside them.
Each benchmark runs in its own process (its figures come back as JSON); one that fails is reported and the rest go
on. --plot writes the table as a PNG.

    python benchmarks/run_all.py [--workdir runs/bench] [--plot runs/bench/summary.png] [--published DIR]

--published: the folder of Tele-AI's modeling code for the training-step comparison (see train_step.py); without
it (or TELECHAT_PUBLISHED_CODE) that row is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from machine import copy_bandwidth, gemm_rate

HERE = Path(__file__).resolve().parent


def benchmarks(workdir: Path, published: str | None) -> dict[str, list[str]]:
    return {
        "train_step": ["train_step.py", *(["--published", published] if published else [])],
        "torch_cpu": ["torch_cpu.py", "--steps", "2", "--new-tokens", "48"],
        "int8_cpu": ["int8_cpu.py", "--workdir", str(workdir / "int8"), "--models", "fp32,w8a16,w8a8"],
        "mindspore_cpu": ["mindspore_cpu.py", "--skip-pynative", "--size", "40m", "--seq-len", "512"],
        "serve_load": ["serve_load.py", "--workdir", str(workdir / "serve"), "--streams", "1,8"],
    }


# (label, benchmark, key path in its JSON, goal or None (reported only), how to print)
ROWS = [
    ("train step: ours / published code", "train_step", ("ours_vs_published",), 1.25, "{:.2f}x"),
    ("train step: of the GEMM roofline", "train_step", ("ours_vs_roofline",), 0.90, "{:.0%}"),
    ("decode fp32, batch 1: of the bandwidth bound", "torch_cpu", ("decode_fp32_vs_bound",), 0.75, "{:.0%}"),
    ("decode fp32: its linear layers alone, of the bound (why)", "torch_cpu", ("decode_fp32_linears_alone_vs_bound",),
     None, "{:.0%}"),
    ("decode bf16, batch 1: of its bandwidth bound", "torch_cpu", ("decode_bf16_vs_bound",), None, "{:.0%}"),
    ("decode w8a16, batch 1: of its bandwidth bound", "torch_cpu", ("decode_w8a16_vs_bound",), None, "{:.0%}"),
    *[(f"{m} prefill {n} tokens: / fp32", "int8_cpu", (f"{m}_{n}", "prefill_vs_fp32"),
       {"w8a8": 1.2, "w8a16": 1.0}[m] if n >= 1000 else None, "{:.2f}x")
      for m in ("w8a8", "w8a16") for n in (100, 1000, 2000)],
    *[(f"{m} end to end {n} in, 100 out: / fp32", "int8_cpu", (f"{m}_{n}", "end_to_end_vs_fp32"), 1.5, "{:.2f}x")
      for m in ("w8a8", "w8a16") for n in (100, 1000, 2000)],
    *[(f"{m} decode after {n} tokens: / fp32", "int8_cpu", (f"{m}_{n}", "decode_vs_fp32"), 1.0, "{:.2f}x")
      for m in ("w8a8", "w8a16") for n in (100, 2000)],
    ("MindSpore GRAPH step / PyTorch", "mindspore_cpu", ("graph_vs_torch",), 0.9, "{:.2f}x"),
    ("MindSpore matmul fwd+bwd / PyTorch's (why)", "mindspore_cpu", ("gemm_ratio",), None, "{:.2f}x"),
    ("serve fp32: tokens/s per stream at 8 streams", "serve_load", ("fp32", "tokens_per_s_per_stream_at_8"), None,
     "{:.1f}"),
    ("serve fp32: 8 streams / 1 stream tokens/s", "serve_load", ("fp32", "speedup_8_vs_1"), 4.0, "{:.2f}x"),
    ("serve fp32 at 8 streams: of the bandwidth bound", "serve_load", ("fp32", "at_8_vs_bound"), None, "{:.0%}"),
    ("serve w8a16: tokens/s per stream at 8 streams", "serve_load", ("w8a16", "tokens_per_s_per_stream_at_8"), None,
     "{:.1f}"),
]


def run(name: str, command: list[str], workdir: Path) -> tuple[dict | None, float, str]:
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    began = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as log:
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:], "--json", str(out)],
                              stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - began
    if done.returncode or not out.is_file():
        return None, seconds, f"failed (exit {done.returncode}); see {workdir / (name + '.log')}"
    return json.loads(out.read_text()), seconds, ""


def lookup(figures: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(figures, dict) or key not in figures:
            return None
        figures = figures[key]
    return figures


def table(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for label, bench, path, goal, form in ROWS:
        value = lookup(results.get(bench), path)
        if value is None:
            continue
        shown_goal = "" if goal is None else "≥ " + form.format(goal)
        verdict = "" if goal is None else ("met" if value >= goal else "missed")
        rows.append((label, form.format(value), shown_goal, verdict))
    return rows


def plot(rows, machine: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(11, 0.3 * len(rows) + 0.8))
    axes.axis("off")
    cells = axes.table(cellText=[list(r) for r in rows], colLabels=["figure", "measured", "goal", ""],
                       loc="center", cellLoc="left", colWidths=[0.58, 0.14, 0.14, 0.1])
    cells.auto_set_font_size(False)
    cells.set_fontsize(9)
    for (row, column), cell in cells.get_celld().items():
        if row and column == 3:
            cell.set_facecolor({"met": "#d8f0d8", "missed": "#f6d5d5"}.get(rows[row - 1][3], "white"))
    axes.set_title(machine, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--plot", type=Path, help="write the table as a PNG here")
    parser.add_argument("--published", default=os.environ.get("TELECHAT_PUBLISHED_CODE"))
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results, notes = {}, []
    chosen = benchmarks(args.workdir, args.published)
    for name, command in chosen.items():
        if args.only and name not in args.only.split(","):
            continue
        figures, seconds, problem = run(name, command, args.workdir)
        print(f"{name}: {seconds:.0f} s {problem}", flush=True)
        if figures is None:
            notes.append(f"{name}: {problem}")
        else:
            results[name] = figures
    machine = (f"{torch.get_num_threads()} threads; fp32 GEMM {gemm_rate() / 1e9:.0f} GFLOP/s; "
               f"copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s")
    rows = table(results)
    print(f"\n{machine}\n")
    print("| figure | measured | goal | |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(note)
    if args.plot:
        plot(rows, machine, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
