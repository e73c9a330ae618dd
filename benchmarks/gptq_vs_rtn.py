"""GPTQ against round-to-nearest (RTN) on a trained model: perplexity at 4 and 8 bits, group 128,
both written in the published GPTQ layout and loaded through AutoModelForCausalLM.

    python benchmarks/gptq_vs_rtn.py [--model FLOAT_DIR] [--workdir runs/gptq_bench] [--steps 300] [--size 17m|105m]
                                     [--calibration-lines 128]

Without --model it first trains a TeleChat on the bundled corpus: 17M (hidden 512, 4 layers, ffn 1536) or 105M
(hidden 768, 14 layers, ffn 2048); every input size a multiple of 128. A model this small and this briefly trained memorizes its text rather than generalizing
(held-out perplexity is above the vocabulary size), so the evaluation text is text it models: corpus lines after
the first 128, which are the calibration prompts (no line is both). RTN is GPTQ with an identity Hessian (no error
compensation: each weight rounds to its nearest grid point under the same symmetric per-group scales).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pytorch_npu.gptq import quantize_columns, quantize_model, write_folder
from pytorch_npu.modeling_telechat import TelechatConfig, TelechatForCausalLM
from pytorch_npu.quant import dequantize_weight, quantizable_linears
from pytorch_npu.quantize import calibration_ids, compare, load_float_model, read_prompts
from telechat_ascend.gptq_format import GPTQConfig
from telechat_ascend.tokenizer import TINY_CORPUS, TeleChatTokenizer, build_tiny_tokenizer

SIZES = {
    "17m": dict(vocab_size=4096, hidden_size=512, n_layer=4, n_head=8, ffn_hidden_size=1536, tie_word_embeddings=False,
                seq_length=1024),
    "105m": dict(vocab_size=4096, hidden_size=768, n_layer=14, n_head=12, ffn_hidden_size=2048,
                 tie_word_embeddings=False, seq_length=1024),
}


CALIBRATION_LINES = 128


def corpus_lines() -> list[str]:
    return [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(folder: Path, steps: int, shape: dict) -> None:
    build_tiny_tokenizer(folder)
    ids = torch.tensor(TeleChatTokenizer.from_pretrained(folder).encode("\n".join(corpus_lines())))
    torch.manual_seed(0)
    model = TelechatForCausalLM(TelechatConfig(**shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 257, (8,)).tolist()
        batch = torch.stack([ids[s:s + 256] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", flush=True)
    model.eval().half().save_pretrained(folder)


@torch.no_grad()
def rtn_folder(src: Path, out: Path, config: GPTQConfig) -> None:
    model, _ = load_float_model(src)
    quantized = {}
    for name in quantizable_linears(model):
        linear = model.get_submodule(name)
        codes, scales = quantize_columns(linear.weight, torch.eye(linear.in_features), config.bits,
                                         config.group_size, config.damp_percent)
        linear.weight.copy_(dequantize_weight(codes, scales))
        quantized[name] = codes, scales
    write_folder(model, quantized, config, src, out, force=True)


def gptq_folder(src: Path, out: Path, config: GPTQConfig, calib: Path) -> None:
    model, _ = load_float_model(src)
    batches = calibration_ids(TeleChatTokenizer.from_pretrained(src), read_prompts(calib, limit=None))
    with torch.no_grad():
        quantized = quantize_model(model, batches, config)
    write_folder(model, quantized, config, src, out, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained float TeleChat folder (default: train one)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/gptq_bench"))
    parser.add_argument("--steps", type=int, default=300, help="training steps when no --model is given")
    parser.add_argument("--size", choices=SIZES, default="17m", help="the model trained when no --model is given")
    parser.add_argument("--calibration-lines", type=int, default=CALIBRATION_LINES,
                        help="corpus lines for calibration; evaluation takes the lines after them")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.model or args.workdir / "float"
    if args.model is None and not (src / "config.json").is_file():
        start = time.perf_counter()
        train(src, args.steps, SIZES[args.size])
        print(f"trained in {time.perf_counter() - start:.0f} s")
    lines = corpus_lines()
    calib = args.workdir / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n"
                             for line in lines[:args.calibration_lines]), encoding="utf-8")
    ids = TeleChatTokenizer.from_pretrained(src).encode("\n".join(lines[args.calibration_lines:]))[:8192]
    float_model, _ = load_float_model(src)
    rows = []
    for bits in (8, 4):
        config = GPTQConfig(bits, 128)
        for method, build in (("rtn", lambda out: rtn_folder(src, out, config)),
                              ("gptq", lambda out: gptq_folder(src, out, config, calib))):
            out = args.workdir / f"{method}{bits}"
            start = time.perf_counter()
            build(out)
            seconds = time.perf_counter() - start
            result = compare(float_model, AutoModelForCausalLM.from_pretrained(out).eval(), ids, 256)
            rows.append((f"{method} {bits}-bit", result, seconds))
    print(f"\n{len(ids)} evaluation tokens; float perplexity {rows[0][1]['ppl_float']:.3f}")
    print("| quantization | perplexity | vs float | greedy agreement | logits rel. error | quantize s |")
    print("|---|---|---|---|---|---|")
    for name, r, seconds in rows:
        print(f"| {name} | {r['ppl_int8']:.3f} | {r['ppl_increase'] * 100:+.2f}% | {r['greedy_agreement']:.3f} | "
              f"{r['logits_rel_error']:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
