"""Training step (forward + backward, fp32) of the PyTorch backend against Tele-AI's published modeling code on the
same weights and batch, and against the machine's GEMM roofline measured in the same run.

The model is the 12B preset shrunk to ~34M parameters (head_dim 160, untied head, the 12B's ffn/hidden ratio 2.4),
batch 2 x 512 tokens. Steps alternate between the two implementations, so load on a shared machine falls on both;
the figure is the best step of each. Roofline: the step's matmul FLOPs (telechat_ascend.throughput.
matmul_flops_per_token) over the fp32 GEMM rate measured here.

The published code is not part of this project: pass the folder of a TeleChat download (models/12B of
Tele-AI/Telechat, or any 12B folder from a model hub), which holds modeling_telechat.py, configuration_telechat.py
and generation_utils.py, or set TELECHAT_PUBLISHED_CODE. This runs that code: only pass a folder you trust. Its
attention asks for flash-attn at construction even when config.flash_attn is false; the eager path used here never
calls it, so a stand-in that raises is put in its place.

    python benchmarks/train_step.py [--published DIR] [--steps 4] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch

from machine import gemm_rate, timed
from pytorch_npu import TelechatConfig, TelechatForCausalLM
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.throughput import matmul_flops_per_token

SHAPE = dict(vocab_size=12000, hidden_size=640, n_layer=4, n_head=4, ffn_hidden_size=1536)
BATCH, SEQ_LEN = 2, 512
PUBLISHED_FILES = ("configuration_telechat", "generation_utils", "modeling_telechat")


def load_published_code(folder: Path) -> types.ModuleType:
    """Tele-AI's modeling_telechat module from `folder`, imported as the package it expects to live in."""
    missing = [name for name in PUBLISHED_FILES if not (folder / f"{name}.py").is_file()]
    if missing:
        raise SystemExit(f"{folder}: no {', '.join(n + '.py' for n in missing)}; pass the folder of a TeleChat "
                         f"download (--published or TELECHAT_PUBLISHED_CODE)")
    package = types.ModuleType("telechat_published")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    for name in PUBLISHED_FILES:
        spec = importlib.util.spec_from_file_location(f"{package.__name__}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)

    def no_flash_attention(*args, **kwargs):
        raise RuntimeError("flash-attn is not installed; the benchmark runs config.flash_attn = false")

    module.flash_attn_unpadded_func = no_flash_attention
    return module


def step_of(model, ids):
    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        loss = loss.detach()
        for parameter in model.parameters():
            parameter.grad = None
        return loss.item()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=os.environ.get("TELECHAT_PUBLISHED_CODE"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(TeleChatConfig.preset("12B"), **SHAPE)
    torch.manual_seed(0)
    ours = TelechatForCausalLM(TelechatConfig(**config.to_dict())).train()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))
    steps = {"ours": step_of(ours, ids)}
    losses = {"ours": steps["ours"]()}
    if args.published:
        modeling = load_published_code(Path(args.published))
        published_config = modeling.TelechatConfig(**{**config.to_dict(), "flash_attn": False})
        published = modeling.TelechatForCausalLM(published_config).train()
        published.load_state_dict(ours.state_dict())
        steps["published"] = step_of(published, ids)
        losses["published"] = steps["published"]()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(torch.device("cpu"), step))
    best = {name: min(t) for name, t in times.items()}
    rate = gemm_rate()
    roofline = matmul_flops_per_token(config, SEQ_LEN) * BATCH * SEQ_LEN / rate
    print(f"{config.num_parameters() / 1e6:.1f}M parameters (12B shape), batch {BATCH} x {SEQ_LEN}, fp32, "
          f"{torch.get_num_threads()} threads; forward + backward, best of {args.steps} alternated steps")
    print(f"fp32 GEMM rate {rate / 1e9:.0f} GFLOP/s: the step's matmul FLOPs "
          f"({matmul_flops_per_token(config, SEQ_LEN) * BATCH * SEQ_LEN / 1e9:.0f} G) take {roofline:.3f} s")
    for name, seconds in best.items():
        print(f"{name:10s} {seconds:.3f} s/step ({BATCH * SEQ_LEN / seconds:.0f} tokens/s), {roofline / seconds:.0%} "
              f"of the roofline, loss {losses[name]:.6f}")
    figures = {"gemm_gflops": rate / 1e9, "roofline_s": roofline, "ours_s": best["ours"],
               "ours_vs_roofline": roofline / best["ours"]}
    if "published" in best:
        figures.update(published_s=best["published"], ours_vs_published=best["published"] / best["ours"],
                       loss_difference=abs(losses["ours"] - losses["published"]))
        print(f"ours / published speed: {figures['ours_vs_published']:.2f}x; |Δloss| {figures['loss_difference']:.1e}")
    else:
        print("published code: not given (--published DIR or TELECHAT_PUBLISHED_CODE); ratio not measured")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
