"""PyTorch backend on one device (CPU by default), a config of about 110M parameters:
(a) training-step tokens/s (forward + backward + AdamW step, fp32) at sequence length 512;
(b) batch-1 decode tokens/s with the KV cache (the steps after the prefill), in fp32 (also against full
    recomputation), bf16 and w8a16, each as a fraction of its memory-bandwidth bound: the bytes of weights read per
    token (everything but the embedding table, of which one row is read) over the copy bandwidth measured between
    the timed generate() calls: a shared machine's memory bandwidth swings with its neighbours' load (36-58 GB/s
    within seconds on a 2-core cloud VM, measured), so rate and bound come from the same seconds.

    python benchmarks/torch_cpu.py [--device cpu|cuda|npu] [--steps 3] [--new-tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from machine import copy_bandwidth, timed
from pytorch_npu import TelechatConfig, TelechatForCausalLM
from pytorch_npu.device import resolve_device
from pytorch_npu.quant import weight_bytes
from pytorch_npu.quantize import quantize_model

CONFIG = dict(vocab_size=16000, hidden_size=768, n_layer=12, n_head=12, ffn_hidden_size=2048,
              tie_word_embeddings=False, seq_length=2048)


def bytes_read_per_token(model) -> int:
    """The whole state (weight_bytes counts a tied head once) but the rows of an untied embedding table: one is read."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    unread = 0 if tied else embedding.nbytes - embedding[0].nbytes
    return sum(weight_bytes(model).values()) - unread


def decode_rate(device, model, prompt, new_tokens: int, use_cache: bool = True) -> tuple[float, float, float]:
    """(tokens/s of the decode steps alone, tokens/s of their linear layers alone, copy bandwidth), each the best of
    3 rounds. The decode steps: generate() of new_tokens less generate() of one (the prefill, which gives the first
    token). The linear layers: every one of the model's, in model order, on one row each, back to back: the rate
    the kernels allow with nothing else in the step."""
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=use_cache)
    dtype = model.get_input_embeddings().weight.dtype
    layers = [(m, torch.randn(1, 1, m.in_features, device=device, dtype=dtype))
              for m in model.modules() if hasattr(m, "in_features")]

    def seconds(tokens: int) -> float:
        return timed(device, lambda: model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **settings))

    def linears_alone():
        for layer, row in layers:
            layer(row)

    with torch.no_grad():
        seconds(4)  # warm up
        rounds = [(copy_bandwidth(device), timed(device, linears_alone), seconds(new_tokens), seconds(1))
                  for _ in range(3)]
    bandwidth, linears, many, one = (f(column) for f, column in zip((max, min, min, min), zip(*rounds)))
    return (new_tokens - 1) / (many - one), 1 / linears, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = TelechatForCausalLM(TelechatConfig(**CONFIG)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"device {device}, {torch.get_num_threads()} threads, {parameters / 1e6:.1f}M parameters")
    figures = {}

    # (a) training step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5)
    batch = torch.randint(0, CONFIG["vocab_size"], (1, args.seq_len), device=device)

    def train_step():
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm up
    step_seconds = min(timed(device, train_step) for _ in range(args.steps))
    figures["train_tokens_per_s"] = args.seq_len / step_seconds
    print(f"(a) train step, fp32, seq {args.seq_len}: {step_seconds:.2f} s = {args.seq_len / step_seconds:.0f} tokens/s")

    # (b) decoding
    model.eval()
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt_len), device=device)
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    if device.type == "cpu":  # the int8 kernels of pytorch_npu.quant
        variants["w8a16"] = copy.deepcopy(model)
        quantize_model(variants["w8a16"], "w8a16")
    print(f"(b) decode, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    for name, variant in variants.items():
        rate, linears_rate, bandwidth = decode_rate(device, variant, prompt, args.new_tokens)
        weight_bytes = bytes_read_per_token(variant)
        bound = bandwidth / weight_bytes
        figures[f"decode_{name}_tokens_per_s"] = rate
        figures[f"decode_{name}_vs_bound"] = rate / bound
        figures[f"decode_{name}_linears_alone_vs_bound"] = linears_rate / bound
        figures[f"decode_{name}_copy_bandwidth_gb_s"] = bandwidth / 1e9
        print(f"    {name:6s} {rate:6.1f} tokens/s; {weight_bytes / 1e6:4.0f} MB of weights per token at "
              f"{bandwidth / 1e9:.1f} GB/s: bound {bound:.1f} tokens/s, reached {rate / bound:.0%}; its linear "
              f"layers alone {linears_rate:.1f} tokens/s, {linears_rate / bound:.0%} of the bound")
    recomputed, _, _ = decode_rate(device, model, prompt, args.new_tokens, use_cache=False)
    print(f"    fp32 with full recomputation instead of the cache: {recomputed:.1f} tokens/s (the cache's speed-up "
          f"{figures['decode_fp32_tokens_per_s'] / recomputed:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
