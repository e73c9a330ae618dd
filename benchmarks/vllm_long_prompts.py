"""How far vLLM with the plugin is from the published RoPE rule for prompts longer than the training length.

The published code rotates a whole prompt under the NTK regime (base, mscale) of the prompt's length; the plugin's
table rotates each token under the regime of its own position + 1 (exact for decoding, and for any prompt up to
the training length). For a 12B-style model (head_dim 160) with training_seqlen T, prompts of 2T and 4T: the
largest |logit difference| against our PyTorch backend (the published rule) over the prompt positions and the
first decoded token, relative to the logits' spread, and how many of 16 greedy tokens agree.

    python benchmarks/vllm_long_prompts.py [--training-length 64] [--workdir /tmp/vllm-long]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pytorch_npu.vllm_probe import run

STEPS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-length", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vllm-long"))
    args = parser.parse_args()
    from pytorch_npu import TelechatForCausalLM
    from telechat_ascend.initialize import init_checkpoint
    length = args.training_length
    folder = init_checkpoint("tiny", args.workdir / "model", seed=3, force=True, hidden_size=640, n_head=4,
                             ffn_hidden_size=1712, training_seqlen=length, seq_length=8 * length)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(400, 4000, size=k * length).tolist() for k in (2, 4)]
    rows = run({"model": str(folder), "prompts": prompts, "max_tokens": STEPS, "max_model_len": 8 * length,
                "prompt_logits": True, "top": 1})
    model = TelechatForCausalLM.from_pretrained(folder).eval()
    print(f"training length {length}; |Δ logit| of the token vLLM ranks first, against our backend (published rule)")
    print(f"{'prompt':>8} {'max |Δ| prompt':>15} {'spread':>8} {'relative':>9} {'greedy agree':>13}")
    for prompt, row in zip(prompts, rows):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
            ours = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                  do_sample=False, eos_token_id=None, repetition_penalty=1.0)[0, len(prompt):]
        # prompt_logits[i] scores prompt token i + 1 from position i; the first decoded token scores position -1
        steps = row["prompt_logits"] + row["logits"][:1]
        diffs = [abs(value - float(logits[i, int(token)])) for i, step in enumerate(steps)
                 for token, value in step.items()]
        spread = float(logits.std())
        agree = sum(int(a == b) for a, b in zip(row["tokens"], ours.tolist()))
        print(f"{len(prompt):8d} {max(diffs):15.5f} {spread:8.4f} {max(diffs) / spread:9.4f} {agree:>10d}/{STEPS}")


if __name__ == "__main__":
    main()
