"""Loading a TeleChat folder for inference and the `generate` / `chat` commands of the CLI (--backend torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from pytorch_npu.device import resolve_device, resolve_dtype
from pytorch_npu.modeling_telechat import TelechatCache
from pytorch_npu.pretrained import from_pretrained
from telechat_ascend.chat import chat_session as shared_chat_session
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import TeleChatTokenizer


def load_model(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) on the resolved device, in the dtype the chip allows (see device.resolve_dtype)."""
    TeleChatConfig.from_file(folder)  # a clear error for a folder that is not TeleChat, before anything else
    tokenizer = TeleChatTokenizer.from_pretrained(folder)
    target = resolve_device(device)
    model = from_pretrained(folder, resolve_dtype(target, dtype)).to(target).eval()
    return model, tokenizer


@torch.no_grad()
def prefill(model, ids: list[int], chunk_size: int = 512):
    """(next-token logits [vocab], cache) of one prompt, fed `chunk_size` tokens at a time into the KV cache: the
    attention scores of a step are at most chunk_size x prompt length, instead of prompt length squared. Every chunk
    takes the whole prompt's NTK regime (rope_length), so the result is one full forward's."""
    if chunk_size < 1 or not ids:
        raise TeleChatError(f"prefill needs a prompt and a chunk size >= 1, got {len(ids)} tokens, chunk {chunk_size}")
    cache = TelechatCache()
    for start in range(0, len(ids), chunk_size):
        chunk = torch.tensor([ids[start:start + chunk_size]], device=model.device)
        positions = torch.arange(start, start + chunk.shape[1], device=model.device)[None]
        out = model(chunk, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    rope_length=len(ids))
    return out.logits[0, -1], cache


def generate_text(model, tokenizer: TeleChatTokenizer, prompt: str, **generate_kwargs) -> str:
    """Raw continuation of `prompt` (no chat markers)."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id, **generate_kwargs)
    return tokenizer.decode([i for i in output[0, ids.shape[1]:].tolist() if i != tokenizer.eos_id])


def chat_session(model, tokenizer: TeleChatTokenizer, questions, out=None, **generate_kwargs) -> list[dict]:
    return shared_chat_session(lambda question, history: model.chat(tokenizer, question, history, stream=True,
                                                                   **generate_kwargs), questions, out)


def batch_runner(model, rows: int):
    """The serving engine's runner over this model (telechat_ascend.engine.BatchRunner)."""
    from pytorch_npu.serving import TorchBatchRunner
    return TorchBatchRunner(model, rows)
