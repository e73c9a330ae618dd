"""Tensor names and shapes of a TeleChat checkpoint, and the one table that maps HF names to MindFormers names.

HF names are kept canonical here: without the optional `transformer.` prefix that the 12B/1B releases add (7B has
none). The head (`lm_head.weight`, or a GPTQ folder's packed `lm_head.qweight`, ...) is top level in every
release, so the prefix never applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from telechat_ascend.config import HF_KEY_PREFIX, TeleChatConfig
from telechat_ascend.errors import TeleChatError

LM_HEAD_MODULE = "lm_head"
LM_HEAD = f"{LM_HEAD_MODULE}.weight"

# (HF name, MindFormers research/telechat name, shape in terms of the config's sizes). A pure rename: both store
# Linear weights [out, in], and wk_v keeps HF's per-head interleaved [K_j; V_j] rows.
GLOBAL_TENSORS = (
    ("word_embeddings.weight", "model.tok_embeddings.embedding_weight", ("vocab", "hidden")),
    ("ln_f.weight", "model.norm_out.weight", ("hidden",)),
    (LM_HEAD, "lm_head.weight", ("vocab", "hidden")),
)
LAYER_TENSORS = (
    ("h.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight", ("hidden",)),
    ("h.{i}.self_attention.query.weight", "model.layers.{i}.attention.wq.weight", ("hidden", "hidden")),
    ("h.{i}.self_attention.key_value.weight", "model.layers.{i}.attention.wk_v.weight", ("kv_rows", "hidden")),
    ("h.{i}.self_attention.dense.weight", "model.layers.{i}.attention.wo.weight", ("hidden", "hidden")),
    ("h.{i}.self_attention.dense.bias", "model.layers.{i}.attention.wo.bias", ("hidden",)),
    ("h.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight", ("hidden",)),
    ("h.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight", ("ffn", "hidden")),
    ("h.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight", ("ffn", "hidden")),
    ("h.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight", ("hidden", "ffn")),
    ("h.{i}.mlp.down_proj.bias", "model.layers.{i}.feed_forward.w2.bias", ("hidden",)),
)


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str  # canonical, unprefixed
    ms_name: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        """How `init` fills it: norms start at one, biases at zero, matrices from N(0, initializer_range²)."""
        if self.hf_name.endswith(".bias"):
            return "bias"
        return "norm" if len(self.shape) == 1 else "matrix"


def tensor_specs(config: TeleChatConfig) -> list[TensorSpec]:
    """Every tensor of the model in checkpoint order: embeddings, blocks, final norm, head (absent when tied)."""
    sizes = {"vocab": config.vocab_size, "hidden": config.hidden_size, "ffn": config.ffn_hidden_size,
             "kv_rows": 2 * config.kv_heads * config.head_dim}

    def spec(hf: str, ms: str, dims: tuple[str, ...]) -> TensorSpec:
        return TensorSpec(hf, ms, tuple(sizes[d] for d in dims))

    embedding, final_norm, head = (spec(*row) for row in GLOBAL_TENSORS)
    layers = [spec(hf.format(i=i), ms.format(i=i), dims) for i in range(config.n_layer) for hf, ms, dims in LAYER_TENSORS]
    return [embedding, *layers, final_norm] + ([] if config.tied else [head])


def is_lm_head(name: str) -> bool:
    return name.partition(".")[0] == LM_HEAD_MODULE


def hf_name(canonical: str, prefix: str) -> str:
    return canonical if is_lm_head(canonical) else prefix + canonical


def canonical_hf_name(name: str) -> str:
    return name.removeprefix(HF_KEY_PREFIX)


def detect_hf_prefix(names: list[str]) -> str:
    """'transformer.' or '' from a checkpoint's keys; a mixture is an error."""
    body = [n for n in names if not is_lm_head(n)]
    prefixed = {n.startswith(HF_KEY_PREFIX) for n in body}
    if len(prefixed) > 1:
        sample = next(n for n in body if not n.startswith(HF_KEY_PREFIX))
        raise TeleChatError(f"checkpoint mixes '{HF_KEY_PREFIX}'-prefixed and unprefixed keys (e.g. {sample!r})")
    return HF_KEY_PREFIX if prefixed == {True} else ""


def check_names(found: list[str], expected: list[str], source: str, hint: str = "") -> None:
    """Missing and unexpected tensors, named, in one error."""
    missing = [n for n in expected if n not in set(found)]
    unexpected = [n for n in found if n not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {some_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {some_names(unexpected)}")
        raise TeleChatError(f"{source}: {'; '.join(parts)}{hint}")


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...], source: str) -> None:
    if tuple(shape) != tuple(expected):
        raise TeleChatError(f"{source}: tensor {name} has shape {list(shape)} but config.json implies {list(expected)}")


def some_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
