"""Load on `telechat-ascend serve` (PyTorch backend, CPU): a ~100M-parameter TeleChat (fp32, then its w8a16 copy)
served on loopback, asked by 1, 2, 4, 8 and 16 concurrent streaming clients (httpx + asyncio), a bounded number of
requests each. Prints, per model and concurrency: output tokens/s, requests/s, time to first token and
inter-token latency (p50 / p99), errors; then tokens/s at 8 streams over 1 stream (goal >= 4), p99 inter-token
latency at 8 streams over 1 stream (goal <= 3), tokens/s per stream at 8 streams, and the 8-stream tokens/s as a
fraction of the memory-bandwidth bound of batched decode (8 tokens per read of the weights, copy bandwidth measured
in this run; the server's HTTP and sampling work counts against it).

    python benchmarks/serve_load.py [--workdir /tmp/serve-load] [--max-tokens 48] [--requests-per-stream 2]
                                    [--streams 1,2,4,8,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=4096, hidden_size=768, n_layer=12, n_head=12, ffn_hidden_size=2048,
              tie_word_embeddings=False, seq_length=2048, training_seqlen=2048)
QUESTIONS = ["什么是5G？", "介绍一下中国电信", "hello, who are you?", "天气怎么样", "写一首诗", "1 2 3 4 5",
             "what is a large language model", "北京的冬天"]
CONCURRENCY = (1, 2, 4, 8, 16)


def make_models(workdir: Path) -> dict[str, Path]:
    """A random ~100M TeleChat with the project's tiny tokenizer, and its w8a16 copy."""
    import torch
    from pytorch_npu import TelechatConfig, TelechatForCausalLM
    from pytorch_npu.quantize import quantize_folder
    from telechat_ascend.initialize import init_checkpoint
    from telechat_ascend.config import TeleChatConfig
    fp32 = workdir / "fp32"
    if not fp32.is_dir():
        init_checkpoint("tiny", workdir / "tiny", seed=0, force=True)
        torch.manual_seed(0)
        values = {**TeleChatConfig.preset("tiny").to_dict(), **CONFIG}
        TelechatForCausalLM(TelechatConfig(**values)).save_pretrained(fp32)
        for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(workdir / "tiny" / name, fp32 / name)
    int8 = workdir / "w8a16"
    if not int8.is_dir():
        quantize_folder(fp32, int8, "w8a16")
    return {"fp32": fp32, "w8a16": int8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> dict:
    began = time.perf_counter()
    stamps = []
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    gaps = np.diff(stamps).tolist() if len(stamps) > 1 else []
    return {"tokens": tokens, "ttft": stamps[0] - began if stamps else None, "gaps": gaps,
            "seconds": time.perf_counter() - began}


async def load(url: str, streams: int, requests_per_stream: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        async def stream(index: int):
            return [await one_request(client, url, QUESTIONS[(index + k) % len(QUESTIONS)], max_tokens)
                    for k in range(requests_per_stream)]
        began = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(stream(i) for i in range(streams))) for r in batch]
        seconds = time.perf_counter() - began
    good = [r for r in results if "error" not in r]
    gaps = [g for r in good for g in r["gaps"]]
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    return {"streams": streams, "requests": len(results), "errors": len(results) - len(good),
            "tokens_per_s": sum(r["tokens"] for r in good) / seconds, "requests_per_s": len(good) / seconds,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.percentile(gaps, 50)), "itl_p99": float(np.percentile(gaps, 99))}


def serve(folder: Path, max_batch: int):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "telechat_ascend.cli", "serve", "--model", str(folder),
                                "--port", str(port), "--max-batch-size", str(max_batch), "--max-queue", "256"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, wait_until_healthy(process, port, f"the server for {folder}", 180)


def wait_until_healthy(process: subprocess.Popen, port: int, what: str, seconds: float) -> str:
    """The server's URL once its /health answers 200; exits if the process ends or `seconds` pass first."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.5)


def load_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-load"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--streams", default=",".join(map(str, CONCURRENCY)), help="concurrencies (1 and 8 needed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def bytes_read_per_step(folder: Path) -> int:
    """Bytes of the weights a decode step reads: every stored tensor but the (untied) embedding table."""
    from safetensors import safe_open
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "np") as f:
            for name in f.keys():
                if not name.endswith("word_embeddings.weight"):
                    total += f.get_tensor(name).nbytes
    return total


def main() -> None:
    args = load_arguments(__doc__)
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.workdir)
    print(f"{'model':6} {'streams':>7} {'req':>4} {'err':>4} {'tok/s':>8} {'req/s':>6} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}")
    summary, figures = {}, {}
    concurrency = [int(n) for n in args.streams.split(",")]
    from machine import copy_bandwidth  # torch, imported only once the servers' folders exist
    bandwidth = copy_bandwidth()
    for name, folder in models.items():
        process, url = serve(folder, max(concurrency))
        try:
            asyncio.run(load(url, 1, 1, 4))  # warm up
            rows = {}
            for streams in concurrency:
                row = asyncio.run(load(url, streams, args.requests_per_stream, args.max_tokens))
                rows[streams] = row
                print(f"{name:6} {streams:7d} {row['requests']:4d} {row['errors']:4d} {row['tokens_per_s']:8.1f} "
                      f"{row['requests_per_s']:6.2f} {row['ttft_p50']:9.3f} {row['ttft_p99']:9.3f} "
                      f"{row['itl_p50']:8.3f} {row['itl_p99']:8.3f}", flush=True)
        finally:
            process.terminate()
            process.wait()
        bound = 8 * bandwidth / bytes_read_per_step(folder)
        summary[name] = (rows[8]["tokens_per_s"] / rows[1]["tokens_per_s"], rows[8]["itl_p99"] / rows[1]["itl_p99"],
                         rows[8]["tokens_per_s"] / 8, rows[8]["tokens_per_s"] / bound)
        figures[name] = dict(zip(("speedup_8_vs_1", "itl_p99_8_vs_1", "tokens_per_s_per_stream_at_8",
                                  "at_8_vs_bound"), summary[name]))
    for name, (speedup, latency, per_stream, of_bound) in summary.items():
        print(f"{name}: tokens/s at 8 streams = {speedup:.2f}x 1 stream (goal >= 4); p99 inter-token latency at 8 "
              f"streams = {latency:.2f}x 1 stream (goal <= 3); {per_stream:.1f} tokens/s per stream at 8 streams, "
              f"{of_bound:.0%} of batched decode's bandwidth bound (copy {bandwidth / 1e9:.1f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
