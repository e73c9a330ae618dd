"""Greedy tokens and raw logits of a model folder under vLLM with the TeleChat plugin, as JSON: what the tests and
benchmarks compare with our PyTorch backend (which cannot be imported beside vLLM: transformers 4 against 5).

    python -m pytorch_npu.vllm_probe '{"model": DIR, "prompts": [[ids...], ...], "max_tokens": 16}'

Optional keys: tensor_parallel_size (1), block_size (32), max_model_len (1024), top (how many raw logits per step,
default 8), prompt_logits (false: also the raw logits at every prompt position, top of them), dtype (float32),
quantization (none: what config.json says; "gptq" for folders that say it in quantize_config.json only). Prints one line
`{"outputs": [{"tokens": [...], "logits": [{id: logit, ...} per step], "prompt_logits": [...]}, ...]}`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # what scripts/setup-vllm.sh builds


def probe(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), quantization=spec.get("quantization"),
              enforce_eager=True, seed=0,
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), block_size=spec.get("block_size", 32),
              max_model_len=spec.get("max_model_len", 1024), kv_cache_memory_bytes=1 << 28,
              logprobs_mode="raw_logits", enable_prefix_caching=spec.get("prefix_caching", False))
    top = spec.get("top", 8)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=top,
                            prompt_logprobs=top if spec.get("prompt_logits") else None)
    results = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
    outputs = []
    for result in results:
        completion = result.outputs[0]
        row = {"tokens": list(completion.token_ids),
               "logits": [{str(i): p.logprob for i, p in step.items()} for step in completion.logprobs]}
        if spec.get("prompt_logits"):  # position 0 has none
            row["prompt_logits"] = [{str(i): p.logprob for i, p in step.items()} for step in result.prompt_logprobs[1:]]
        outputs.append(row)
    return {"outputs": outputs}


def run(spec: dict, env: dict | None = None, timeout: float = 600) -> list[dict]:
    """probe(spec) in .venv-vllm, from any environment (the main one has no vLLM); a failure raises with the
    errors vLLM's processes reported (the first is the cause) and its last output."""
    done = subprocess.run([str(VLLM_PYTHON), "-m", "pytorch_npu.vllm_probe", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if done.returncode:
        output = done.stdout + done.stderr
        errors = dict.fromkeys(m.group(0) for m in re.finditer(r"\b\w*(Error|Exception): .*", output))
        raise RuntimeError(f"vLLM exited {done.returncode}: " + "\n".join(errors) + f"\n{output[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))["outputs"]


if __name__ == "__main__":
    print("PROBE " + json.dumps(probe(json.loads(sys.argv[1]))), flush=True)
