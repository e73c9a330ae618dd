"""Randomly initialised TeleChat checkpoints in HF layout, with numpy only: fixtures for tests, demos and benchmarks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from telechat_ascend.checkpoint import DTYPES, atomic_output_dir, hf_writer, parse_size
from telechat_ascend.config import GENERATION_PRESETS, TeleChatConfig
from telechat_ascend.convert import DEFAULT_SHARD_SIZE
from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import build_tiny_tokenizer
from telechat_ascend.weights import hf_name, tensor_specs


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, dtype: str = "fp32", force: bool = False,
                    max_shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = False, **overrides) -> Path:
    """Writes config.json, generation_config.json, safetensors weights and, for the tiny presets, the project's own
    tokenizer. Matrices ~ N(0, initializer_range²), biases 0, norms 1, drawn in checkpoint order from one seeded
    generator in float32 and then cast, so every dtype holds the same values up to rounding. `overrides` replace
    config fields of the preset (tests shrink or reshape real presets with them)."""
    if dtype not in DTYPES:
        raise TeleChatError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = dataclasses.replace(TeleChatConfig.preset(preset), **overrides)
    rng = np.random.default_rng(seed)
    with atomic_output_dir(out, force) as folder:
        writer = hf_writer(folder, parse_size(max_shard_size))
        for spec in tqdm(tensor_specs(config), unit="tensor", disable=not progress, desc=f"init {preset}"):
            if spec.kind == "matrix":
                values = rng.standard_normal(spec.shape, dtype=np.float32)
                values *= config.initializer_range
            else:
                values = np.full(spec.shape, 1.0 if spec.kind == "norm" else 0.0, dtype=np.float32)
            writer.add(hf_name(spec.hf_name, config.hf_key_prefix), values.astype(DTYPES[dtype], copy=False))
        writer.close()
        config.save(folder)
        (folder / "generation_config.json").write_text(json.dumps(GENERATION_PRESETS[preset], indent=2) + "\n",
                                                       encoding="utf-8")
        if preset.startswith("tiny"):
            build_tiny_tokenizer(folder, vocab_size=config.vocab_size)
    return Path(out)
