"""`vllm serve` with the project's plugin against `telechat-ascend serve`, on the CPU, in one run: the ~100M TeleChat
of serve_load.py (fp32), 8 concurrent streaming chat clients, a bounded number of requests each. Prints output
tokens/s and time to first token (p50 / p99) of both servers and their ratios (vLLM / ours).

vLLM runs from .venv-vllm (bash scripts/setup-vllm.sh); run this with the main environment's python:

    python benchmarks/vllm_vs_serve.py [--workdir /tmp/serve-load] [--max-tokens 48] [--requests-per-stream 2]
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from serve_load import REPO, free_port, load, load_arguments, make_models, serve, wait_until_healthy

STREAMS = 8
VLLM = REPO / ".venv-vllm" / "bin" / "vllm"


def serve_vllm(folder: Path):
    """`vllm serve` as a user would start it on a CPU box, eager mode (no compile step) and fp32 like ours."""
    port = free_port()
    process = subprocess.Popen([str(VLLM), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                                "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes",
                                str(1 << 30), "--max-num-seqs", "16", "--enforce-eager", "--disable-log-stats"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, wait_until_healthy(process, port, f"vllm serve {folder}", 600)


def measure(start, folder: Path, args) -> dict:
    process, url = start(folder)
    try:
        asyncio.run(load(url, 1, 1, 4))  # warm up
        return asyncio.run(load(url, STREAMS, args.requests_per_stream, args.max_tokens))
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    args = load_arguments(__doc__)
    if not VLLM.exists():
        raise SystemExit("no .venv-vllm: run bash scripts/setup-vllm.sh")
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = make_models(args.workdir)["fp32"]
    rows = {"telechat-ascend": measure(lambda f: serve(f, 16), folder, args), "vllm": measure(serve_vllm, folder, args)}
    print(f"{'server':16} {'streams':>7} {'req':>4} {'err':>4} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9}")
    for name, row in rows.items():
        print(f"{name:16} {row['streams']:7d} {row['requests']:4d} {row['errors']:4d} {row['tokens_per_s']:8.1f} "
              f"{row['ttft_p50']:9.3f} {row['ttft_p99']:9.3f}")
    ours, vllm = rows["telechat-ascend"], rows["vllm"]
    print(f"vllm / telechat-ascend at {STREAMS} streams: output tokens/s {vllm['tokens_per_s'] / ours['tokens_per_s']:.2f}x, "
          f"time to first token p50 {vllm['ttft_p50'] / ours['ttft_p50']:.2f}x")


if __name__ == "__main__":
    main()
