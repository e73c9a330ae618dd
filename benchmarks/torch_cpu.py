"""PyTorch backend on one device (CPU by default), a config of about 100M parameters, fp32:
(a) training-step tokens/s (forward + backward + AdamW step) at sequence length 512;
(b) batch-1 decode tokens/s with the KV cache against full recomputation, and decode speed as a fraction of the
    memory-bandwidth bound (weight bytes read per token ÷ a copy bandwidth measured in the same run).

    python benchmarks/torch_cpu.py [--device cpu|cuda|npu] [--steps 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from pytorch_npu import TelechatConfig, TelechatForCausalLM
from pytorch_npu.device import resolve_device

CONFIG = dict(vocab_size=16000, hidden_size=768, n_layer=12, n_head=12, ffn_hidden_size=2048,
              tie_word_embeddings=False, seq_length=2048)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def timed(device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device, megabytes: int = 1024) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once)."""
    source = torch.ones(megabytes * 2 ** 20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm up (page faults)
    seconds = min(timed(device, lambda: target.copy_(source)) for _ in range(3))
    return 2 * source.numel() * 4 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = TelechatForCausalLM(TelechatConfig(**CONFIG)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"device {device}, {torch.get_num_threads()} threads, {parameters / 1e6:.1f}M parameters, fp32")

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
    print(f"(a) train step, seq {args.seq_len}: {step_seconds:.2f} s = {args.seq_len / step_seconds:.0f} tokens/s")

    # (b) decoding
    model.eval()
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt_len), device=device)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None,
                       pad_token_id=0)  # warm up
        cached = timed(device, lambda: model.generate(prompt, use_cache=True, **settings))
        recomputed = timed(device, lambda: model.generate(prompt, use_cache=False, **settings))
    cached_rate, recomputed_rate = args.new_tokens / cached, args.new_tokens / recomputed
    # Per token the whole model is read once; of the embedding table only one row.
    weight_bytes = (parameters - CONFIG["vocab_size"] * CONFIG["hidden_size"]) * 4
    bandwidth = copy_bandwidth(device)
    bound = bandwidth / weight_bytes
    print(f"(b) decode, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens:")
    print(f"    with KV cache:        {cached_rate:.1f} tokens/s")
    print(f"    full recomputation:   {recomputed_rate:.1f} tokens/s  (cache speed-up {cached_rate / recomputed_rate:.2f}x)")
    print(f"    copy bandwidth {bandwidth / 1e9:.1f} GB/s, {weight_bytes / 1e6:.0f} MB of weights per token: "
          f"bound {bound:.1f} tokens/s; cached decode reaches {cached_rate / bound:.0%} of it")


if __name__ == "__main__":
    main()
