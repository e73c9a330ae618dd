"""Int8 against float TeleChat on CPU, over the published Atlas 300I Pro case list: batch 1, input 100, 1000 and
2000 tokens, output 100 (telechat-format.md §16.2), with random weights saved in fp16 (as published checkpoints are),
run in fp32, W8A16, W8A8 and GPTQ int8 / int4 (group 128, the published folders' settings; gptq4-head also has
its output head in int4). Two shapes (--shape):
  7b-layers  the TeleChat 7B layer (hidden 4096, 32 heads of 128, ffn 12288), 2 of its 30 layers, vocab 4096: 470M
             parameters. Per layer, weights and KV cache stand in the 7B's proportion (fp32 weights 13x the 2000-token
             KV cache; 12B: 14x), which decides how much of a decode step int8 weights can speed up.
  narrow     hidden 1536, 12 layers, 12 heads of 128, ffn 4096, vocab 4096: 352M parameters, but per layer the KV
             cache weighs 3x more against the weights than in any published TeleChat, so attention over it (equal
             in float and int8) takes a larger share of each step.

Models are loaded with AutoModelForCausalLM.from_pretrained from the folders `quantize` wrote. Speed is measured with
all models in one process, interleaved: per case each prefills in turn, then decode steps go round-robin
(fp32, w8a16, w8a8, gptq8, gptq4, gptq4-head, fp32, ...), so load on this shared machine falls on all alike. Per model
and case: the prefill time, the decode rate over tokens 2-100 (KV cache, greedy), its median step, and the end-to-end
rate (100 tokens / (prefill + decode)). Peak RSS comes from a separate process per model (load, prefill the longest case,
a few decode steps). Then folder bytes (against the fp16 folder), in-memory state bytes, and accuracy against fp32 on
the bundled corpus: random weights make perplexity meaningless, so the comparison that counts is the relative error
of the logits and the share of positions whose argmax agrees.

    python benchmarks/int8_cpu.py [--shape 7b-layers|narrow] [--workdir runs/int8_bench] [--cases 100,1000,2000]
                                  [--new-tokens 100] [--threads N] [--models fp32,w8a16,...] [--json FILE]
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

SHAPES = {
    "7b-layers": dict(vocab_size=4096, hidden_size=4096, n_layer=2, n_head=32, ffn_hidden_size=12288,
                      tie_word_embeddings=False, seq_length=4096),
    "narrow": dict(vocab_size=4096, hidden_size=1536, n_layer=12, n_head=12, ffn_hidden_size=4096,
                   tie_word_embeddings=False, seq_length=4096),
}
MODELS = ("fp32", "w8a16", "w8a8", "gptq8", "gptq4", "gptq4-head")
# GPTQ folders made by quantize --method gptq, group 128: (bits, --lm-head). The published layout keeps the head fp16;
# gptq4-head quantizes it too (GPTQModel's lm_head: true).
GPTQ = {"gptq8": (8, False), "gptq4": (4, False), "gptq4-head": (4, True)}
RSS_DECODE_STEPS = 5


def build_folders(workdir: Path, config: dict, models) -> None:
    """The random fp32 model with the tiny tokenizer, a calibration file, and its quantized copies."""
    float_dir = workdir / "fp32"
    if not float_dir.is_dir():
        torch.manual_seed(0)
        TelechatForCausalLM(TelechatConfig(**config)).half().save_pretrained(float_dir)
        build_tiny_tokenizer(float_dir)
    calib = workdir / "calib.jsonl"
    lines = [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    calib.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines[-64:]),
                     encoding="utf-8")
    for method in models[1:]:
        if not (workdir / method).is_dir():
            start = time.perf_counter()
            if method in GPTQ:
                bits, lm_head = GPTQ[method]
                quantize_folder(float_dir, workdir / method, "gptq", calib, bits=bits, lm_head=lm_head)
            else:
                quantize_folder(float_dir, workdir / method, method, calib if method == "w8a8" else None)
            print(f"quantized {method} in {time.perf_counter() - start:.0f} s", flush=True)


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def timed(model, *args, **kwargs):
    start = time.perf_counter()
    out = model(*args, use_cache=True, **kwargs)
    return out, time.perf_counter() - start


@torch.no_grad()
def speed(workdir: Path, vocab_size: int, cases: list[int], new_tokens: int, names) -> dict:
    """Prefill and interleaved decode timings of the models, in this process."""
    models = {name: load(workdir / name) for name in names}
    results = {name: {"bytes": weight_bytes(model), "cases": {}} for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    for length in cases:
        prompt = torch.randint(4, vocab_size, (1, length), generator=generator)
        state, prefill, steps, tokens = {}, {}, {name: [] for name in names}, {name: [] for name in names}
        for name, model in models.items():
            out, prefill[name] = timed(model, prompt)
            state[name] = out
        for _ in range(new_tokens):
            for name, model in models.items():
                token = state[name].logits[:, -1].argmax(-1, keepdim=True)
                tokens[name].append(int(token))
                if len(tokens[name]) < new_tokens:
                    state[name], elapsed = timed(model, token, past_key_values=state[name].past_key_values)
                    steps[name].append(elapsed)
        for name in names:
            decode = sum(steps[name])
            results[name]["cases"][str(length)] = {
                "prefill_s": prefill[name], "decode_tokens_per_s": len(steps[name]) / decode,
                "decode_median_tokens_per_s": 1 / statistics.median(steps[name]),
                "end_to_end_tokens_per_s": new_tokens / (prefill[name] + decode), "tokens": tokens[name]}
            print(f"  {name} {length}: prefill {prefill[name]:.2f} s, decode {len(steps[name]) / decode:.2f} "
                  f"tokens/s", file=sys.stderr, flush=True)
    return results


@torch.no_grad()
def rss_run(folder: Path, length: int, vocab_size: int) -> int:
    """Peak RSS of one model alone (run in a child process): load, prefill `length` tokens, a few decode steps."""
    model = load(folder)
    out, _ = timed(model, torch.randint(4, vocab_size, (1, length)))
    for _ in range(RSS_DECODE_STEPS):
        out, _ = timed(model, out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=out.past_key_values)
    return peak_rss()


def peak_rss() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def accuracy(workdir: Path, names, tokens: int = 2048) -> dict:
    tokenizer = TeleChatTokenizer.from_pretrained(workdir / "fp32")
    ids = tokenizer.encode(TINY_CORPUS.read_text(encoding="utf-8"))[:tokens]
    float_model = AutoModelForCausalLM.from_pretrained(workdir / "fp32", dtype=torch.float32).eval()
    return {method: compare(float_model, AutoModelForCausalLM.from_pretrained(workdir / method).eval(), ids, 256)
            for method in names[1:]}


def report(workdir: Path, config: dict, results: dict, accuracy_results: dict, cases: list[int]) -> None:
    parameters = TelechatConfig(**config).telechat.num_parameters()
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
    figures = {}
    for name in list(results)[1:]:
        def speedup(key):
            return ", ".join(f"{results[name]['cases'][str(n)][key] / results['fp32']['cases'][str(n)][key]:.2f}x"
                             for n in cases)
        same = [sum(a == b for a, b in zip(results[name]["cases"][str(n)]["tokens"],
                                           results["fp32"]["cases"][str(n)]["tokens"])) for n in cases]
        prefill = ", ".join(f"{results['fp32']['cases'][str(n)]['prefill_s'] / results[name]['cases'][str(n)]['prefill_s']:.2f}x"
                            for n in cases)
        print(f"{name}: prefill speedup vs fp32 {prefill}; end-to-end {speedup('end_to_end_tokens_per_s')}")
        for n in cases:
            mine, fp32 = results[name]["cases"][str(n)], results["fp32"]["cases"][str(n)]
            figures[f"{name}_{n}"] = {"prefill_vs_fp32": fp32["prefill_s"] / mine["prefill_s"],
                                      "decode_vs_fp32": mine["decode_tokens_per_s"] / fp32["decode_tokens_per_s"],
                                      "end_to_end_vs_fp32": mine["end_to_end_tokens_per_s"]
                                      / fp32["end_to_end_tokens_per_s"]}
        print(f"{name}: decode speedup vs fp32 {speedup('decode_tokens_per_s')} (median step: "
              f"{speedup('decode_median_tokens_per_s')}); generated tokens equal to fp32's, position by position: "
              f"{same}; accuracy {json.dumps({k: round(v, 4) for k, v in accuracy_results[name].items()})}")
    for name, result in results.items():
        figures[f"{name}_folder_vs_fp16"] = folder_bytes(workdir / name) / fp16_bytes
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b-layers")
    parser.add_argument("--workdir", type=Path, default=Path("runs/int8_bench"))
    parser.add_argument("--cases", default="100,1000,2000", help="input lengths")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default=",".join(MODELS), help="fp32 first, then any of " + ", ".join(MODELS[1:]))
    parser.add_argument("--json", type=Path, help="also write the ratios here")
    parser.add_argument("--rss-run", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    config, workdir = SHAPES[args.shape], args.workdir / args.shape
    cases = [int(n) for n in args.cases.split(",")]
    torch.set_num_threads(args.threads)
    if args.rss_run:
        print(rss_run(args.rss_run, max(cases), config["vocab_size"]))
        return
    names = args.models.split(",")
    if names[0] != "fp32" or not set(names) <= set(MODELS):
        parser.error(f"--models: fp32 first, then any of {', '.join(MODELS[1:])}")
    build_folders(workdir, config, names)
    results = speed(workdir, config["vocab_size"], cases, args.new_tokens, names)
    for name in names:
        child = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--rss-run", str(workdir / name),
                                "--cases", args.cases, "--threads", str(args.threads)],
                               stdout=subprocess.PIPE, text=True, check=True)
        results[name]["peak_rss_bytes"] = int(child.stdout)
    figures = report(workdir, config, results, accuracy(workdir, names), cases)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
