"""Int8 against float TeleChat on CPU, over the published Atlas 300I Pro case list: batch 1, input 100, 1000 and
2000 tokens, output 100 (telechat-format.md §16.2), for a 352M-parameter config (hidden 1536, 12 layers, head_dim 128,
ffn 4096, vocab 4096) with random weights saved in fp16 (as published checkpoints are), run in fp32, W8A16 and W8A8.

Each model runs in its own process (so peak RSS is its own), loaded with AutoModelForCausalLM.from_pretrained from
the folder `quantize` wrote. Per model: folder bytes (against the fp16 folder), in-memory state bytes, peak RSS, and
per case the prefill time, the decode rate over
tokens 2-100 (KV cache, greedy) and the end-to-end rate (100 tokens / (prefill + decode)). Then accuracy against
fp32 on the bundled corpus: random weights make perplexity meaningless, so the comparison that counts is the
relative error of the logits and the share of positions whose argmax agrees.

    python benchmarks/int8_cpu.py [--workdir runs/int8_bench] [--cases 100,1000,2000] [--new-tokens 100]
                                  [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pytorch_npu import TelechatConfig, TelechatForCausalLM
from pytorch_npu.quant import weight_bytes
from pytorch_npu.quantize import compare, quantize_folder
from telechat_ascend.tokenizer import TINY_CORPUS, TeleChatTokenizer, build_tiny_tokenizer

CONFIG = dict(vocab_size=4096, hidden_size=1536, n_layer=12, n_head=12, ffn_hidden_size=4096,
              tie_word_embeddings=False, seq_length=4096)
MODELS = ("fp32", "w8a16", "w8a8")


def build_folders(workdir: Path) -> None:
    """The random fp32 model with the tiny tokenizer, a calibration file, and its two int8 copies."""
    float_dir = workdir / "fp32"
    if not float_dir.is_dir():
        torch.manual_seed(0)
        TelechatForCausalLM(TelechatConfig(**CONFIG)).half().save_pretrained(float_dir)
        build_tiny_tokenizer(float_dir)
    calib = workdir / "calib.jsonl"
    lines = [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    calib.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines[-64:]),
                     encoding="utf-8")
    for method in MODELS[1:]:
        if not (workdir / method).is_dir():
            start = time.perf_counter()
            quantize_folder(float_dir, workdir / method, method, calib if method == "w8a8" else None)
            print(f"quantized {method} in {time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def run_model(folder: Path, cases: list[int], new_tokens: int) -> dict:
    """Speed of one model folder (run in a child process)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = {"bytes": weight_bytes(model), "cases": {}}
    generator = torch.Generator().manual_seed(0)
    for length in cases:
        prompt = torch.randint(4, CONFIG["vocab_size"], (1, length), generator=generator)
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefill = time.perf_counter() - start
        token, past, steps = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values, []
        tokens = [int(token)]
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - start)
            token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            tokens.append(int(token))
        decode = sum(steps)
        result["cases"][length] = {
            "prefill_s": prefill, "decode_tokens_per_s": len(steps) / decode,
            "decode_median_tokens_per_s": 1 / statistics.median(steps),
            "end_to_end_tokens_per_s": new_tokens / (prefill + decode), "tokens": tokens}
        print(f"  {folder.name} {length}: prefill {prefill:.2f} s, decode {len(steps) / decode:.2f} tokens/s",
              file=sys.stderr, flush=True)
    result["peak_rss_bytes"] = peak_rss()
    return result


def peak_rss() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def accuracy(workdir: Path, tokens: int = 2048) -> dict:
    tokenizer = TeleChatTokenizer.from_pretrained(workdir / "fp32")
    ids = tokenizer.encode(TINY_CORPUS.read_text(encoding="utf-8"))[:tokens]
    float_model = AutoModelForCausalLM.from_pretrained(workdir / "fp32", dtype=torch.float32).eval()
    return {method: compare(float_model, AutoModelForCausalLM.from_pretrained(workdir / method).eval(), ids, 256)
            for method in MODELS[1:]}


def report(workdir: Path, results: dict, accuracy_results: dict, cases: list[int]) -> None:
    parameters = TelechatConfig(**CONFIG).telechat.num_parameters()
    print(f"\n{parameters / 1e6:.0f}M parameters, {torch.get_num_threads()} threads")
    fp16_bytes = folder_bytes(workdir / "fp32")  # the float folder is fp16
    print("| model | folder MB | ÷ fp16 folder | in-memory state MB (int8 / scales / float) | peak RSS MB | " +
          " | ".join(f"{n}: prefill s / decode tok/s / e2e tok/s" for n in cases) + " |")
    print("|---" * (5 + len(cases)) + "|")
    for name, result in results.items():
        size, state = folder_bytes(workdir / name), result["bytes"]
        memory = " / ".join(f"{state[kind] / 1e6:.1f}" for kind in ("int8", "scales", "float"))
        cells = [f"{c['prefill_s']:.1f} / {c['decode_tokens_per_s']:.2f} / {c['end_to_end_tokens_per_s']:.2f}"
                 for c in (result["cases"][str(n)] for n in cases)]
        print(f"| {name} | {size / 1e6:.0f} | {size / fp16_bytes:.3f} | {memory} | "
              f"{result['peak_rss_bytes'] / 1e6:.0f} | " + " | ".join(cells) + " |")
    for name in MODELS[1:]:
        def speedup(key):
            return ", ".join(f"{results[name]['cases'][str(n)][key] / results['fp32']['cases'][str(n)][key]:.2f}x"
                             for n in cases)
        same = [sum(a == b for a, b in zip(results[name]["cases"][str(n)]["tokens"],
                                           results["fp32"]["cases"][str(n)]["tokens"])) for n in cases]
        print(f"{name}: decode speedup vs fp32 {speedup('decode_tokens_per_s')} (median step: "
              f"{speedup('decode_median_tokens_per_s')}); generated tokens equal to fp32's, position by position: "
              f"{same}; accuracy {json.dumps({k: round(v, 4) for k, v in accuracy_results[name].items()})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/int8_bench"))
    parser.add_argument("--cases", default="100,1000,2000", help="input lengths")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--run-model", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    cases = [int(n) for n in args.cases.split(",")]
    torch.set_num_threads(args.threads)
    if args.run_model:
        print(json.dumps(run_model(args.run_model, cases, args.new_tokens)))
        return
    build_folders(args.workdir)
    results = {}
    for name in MODELS:
        child = subprocess.run([sys.executable, __file__, "--run-model", str(args.workdir / name), "--cases",
                                args.cases, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                               stdout=subprocess.PIPE, text=True, check=True)
        results[name] = json.loads(child.stdout)
    report(args.workdir, results, accuracy(args.workdir), cases)


if __name__ == "__main__":
    main()
