"""Training-step tokens/s of the MindSpore backend, GRAPH (ms.jit) against PYNATIVE, and against the PyTorch backend
on the same config, batch and weights, measured in one run (fp32, forward + backward + AdamW step). Then where the
difference comes from: the same matmul (the MLP's gate projection over the batch's tokens), forward and backward,
in each framework, as GFLOP/s: GEMMs are most of either step, so the step ratio follows the GEMM ratio.

    python benchmarks/mindspore_cpu.py [--steps 3] [--batch 2] [--seq-len 256] [--size 40m|110m] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import torch

from mindspore_impl.model import TelechatForCausalLM as MindSporeTelechat
from pytorch_npu import TelechatConfig, TelechatForCausalLM as TorchTelechat
from telechat_ascend.config import TeleChatConfig

SIZES = {  # --size: the ~40M default, or the ~110M config of benchmarks/torch_cpu.py
    "40m": dict(vocab_size=16000, hidden_size=512, n_layer=8, n_head=8, ffn_hidden_size=1376,
                tie_word_embeddings=False),
    "110m": dict(vocab_size=16000, hidden_size=768, n_layer=12, n_head=12, ffn_hidden_size=2048,
                 tie_word_embeddings=False),
}


def best_of(steps: int, fn) -> float:
    fn()  # warm up (and compile, for GRAPH)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mindspore_steps(config: TeleChatConfig, ids: np.ndarray):
    model = MindSporeTelechat(config)
    model.set_train(True)
    optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), 1e-4, beta1=0.9, beta2=0.95, eps=1e-5)
    cos, sin = model.rope(np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)), ids.shape[1])
    inputs = (ms.Tensor(ids), cos, sin, ms.Tensor(np.ones_like(ids)), ms.Tensor(ids))
    grad_fn = ms.value_and_grad(model, None, optimizer.parameters)

    def pynative():
        loss, grads = grad_fn(*inputs)
        optimizer(grads)
        return loss

    graph = ms.jit(pynative)
    return lambda: pynative().asnumpy(), lambda: graph().asnumpy()


def torch_step(config: TeleChatConfig, ids: np.ndarray):
    model = TorchTelechat(TelechatConfig(**config.to_dict())).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5)
    batch = torch.from_numpy(ids.astype(np.int64))

    def step():
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def gemm_rates(config: TeleChatConfig, tokens: int, steps: int) -> dict[str, float]:
    """GFLOP/s of x·Wᵀ forward + backward (both gradients) at [tokens, hidden] x [ffn, hidden], per framework."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, config.hidden_size), dtype=np.float32)
    w = rng.standard_normal((config.ffn_hidden_size, config.hidden_size), dtype=np.float32)
    flops = 3 * 2 * tokens * config.hidden_size * config.ffn_hidden_size

    def product_sum(a, b):
        return ms.ops.matmul(a, b.T).sum()

    ms_grad = ms.jit(ms.value_and_grad(product_sum, grad_position=(0, 1)))
    mx, mw = ms.Tensor(x), ms.Tensor(w)
    tx, tw = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()

    def torch_grad():
        (tx @ tw.t()).sum().backward()
        tx.grad = tw.grad = None

    return {"MindSpore": flops / best_of(steps, lambda: [g.asnumpy() for g in ms_grad(mx, mw)[1]]) / 1e9,
            "PyTorch": flops / best_of(steps, torch_grad) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--size", choices=SIZES, default="40m")
    parser.add_argument("--skip-pynative", action="store_true", help="GRAPH against PyTorch only (PYNATIVE is slow)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    config = TeleChatConfig(**SIZES[args.size])
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len), dtype=np.int32)
    tokens = ids.size
    print(f"{config.num_parameters() / 1e6:.1f}M parameters, batch {args.batch} x seq {args.seq_len}, fp32, "
          f"{torch.get_num_threads()} threads")
    pynative, graph = mindspore_steps(config, ids)
    results = {"MindSpore GRAPH": best_of(args.steps, graph)}
    if not args.skip_pynative:
        results["MindSpore PYNATIVE"] = best_of(args.steps, pynative)
    results["PyTorch"] = best_of(args.steps, torch_step(config, ids))
    for name, seconds in results.items():
        print(f"{name:20s} {seconds:6.2f} s/step  {tokens / seconds:8.0f} tokens/s")
    if "MindSpore PYNATIVE" in results:
        print(f"GRAPH / PYNATIVE speed: {results['MindSpore PYNATIVE'] / results['MindSpore GRAPH']:.2f}x")
    print(f"MindSpore GRAPH / PyTorch speed: {results['PyTorch'] / results['MindSpore GRAPH']:.2f}x")
    rates = gemm_rates(config, tokens, args.steps)
    print(f"one matmul [{tokens}, {config.hidden_size}] x [{config.ffn_hidden_size}, {config.hidden_size}]^T, forward "
          f"+ backward: MindSpore {rates['MindSpore']:.0f} GFLOP/s, PyTorch {rates['PyTorch']:.0f} GFLOP/s "
          f"({rates['MindSpore'] / rates['PyTorch']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"graph_s": results["MindSpore GRAPH"], "torch_s": results["PyTorch"],
                                         "graph_vs_torch": results["PyTorch"] / results["MindSpore GRAPH"],
                                         "gemm_gflops": rates, "gemm_ratio": rates["MindSpore"] / rates["PyTorch"]}))


if __name__ == "__main__":
    main()
