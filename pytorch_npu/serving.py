"""The PyTorch side of the serving engine (telechat_ascend.engine.BatchRunner): prompts are prefilled chunk by chunk
into a cache of their own (inference.prefill's path), then copied into a row of one shared SlotCache, where every
running request decodes one token per step in a single forward.

SlotCache holds, per layer, key and value buffers [rows, capacity, heads, head_dim] (the layout attention reads).
Rows have their own lengths: a decode step writes each row's new key at that row's length, attends over the
first max(length) + 1 positions with the positions beyond each row's own length masked out, and rotates each row
with its own position and NTK regime, so a row's numbers do not depend on what else is in the batch."""

from __future__ import annotations

import numpy as np
import torch

from pytorch_npu.modeling_telechat import TelechatCache


class SlotCache:
    """The KV cache of the engine's batch rows, in the interface the model's attention uses (update,
    get_seq_length) while a decode step over rows 0 .. batch - 1 is under way."""

    GROWTH = 256  # positions added when a row outgrows the buffers

    def __init__(self, layers: int, rows: int):
        self.layers, self.rows = layers, rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * rows
        self.batch = 0
        self.width = 0

    def _ensure(self, like: torch.Tensor, capacity: int) -> None:
        """Buffers shaped after `like` [1, heads, S, dim] with room for `capacity` positions per row."""
        if self.keys and self.keys[0].shape[1] >= capacity:
            return
        _, heads, _, dim = like.shape
        size = capacity + self.GROWTH
        for store in (self.keys, self.values):
            for layer in range(self.layers):
                grown = like.new_zeros(self.rows, size, heads, dim)
                if len(store) > layer:
                    grown[:, :store[layer].shape[1]] = store[layer]
                    store[layer] = grown
                else:
                    store.append(grown)

    def load(self, row: int, cache: TelechatCache) -> None:
        """Row `row` takes a prefilled request's cache."""
        length = cache.get_seq_length()
        self._ensure(cache.layers[0].keys, length + 1)
        for layer in range(self.layers):
            self.keys[layer][row, :length] = cache.layers[layer].keys[0].transpose(0, 1)
            self.values[layer][row, :length] = cache.layers[layer].values[0].transpose(0, 1)
        self.lengths[row] = length

    def move(self, src: int, dst: int) -> None:
        length = self.lengths[src]
        for store in (self.keys, self.values):
            for buffer in store:
                buffer[dst, :length] = buffer[src, :length]
        self.lengths[dst], self.lengths[src] = length, 0

    def begin(self, batch: int) -> None:
        self.batch = batch
        self.width = max(self.lengths[:batch]) + 1
        self._ensure(self.keys[0][:1].transpose(1, 2), self.width)

    def end(self) -> None:
        for row in range(self.batch):
            self.lengths[row] += 1

    # -- what the attention layers call --
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        rows = torch.arange(self.batch, device=key_states.device)
        at = torch.tensor(self.lengths[:self.batch], device=key_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, at] = key_states[:, :, 0]
        values[rows, at] = value_states[:, :, 0]
        return (keys[:self.batch, :self.width].transpose(1, 2), values[:self.batch, :self.width].transpose(1, 2))


class TorchBatchRunner:
    def __init__(self, model, rows: int):
        self.model = model
        self.cache = SlotCache(model.config.n_layer, rows)
        self.pending: dict[int, TelechatCache] = {}

    @torch.no_grad()
    def prefill(self, key: int, ids: list[int], start: int, stop: int) -> np.ndarray | None:
        cache = self.pending.setdefault(key, TelechatCache())
        device = self.model.device
        chunk = torch.tensor([ids[start:stop]], device=device)
        positions = torch.arange(start, stop, device=device)[None]
        out = self.model(chunk, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                         rope_length=len(ids))
        return out.logits[0, -1].float().cpu().numpy() if stop == len(ids) else None

    def admit(self, key: int, row: int) -> None:
        self.cache.load(row, self.pending.pop(key))

    @torch.no_grad()
    def decode(self, tokens: list[int]) -> np.ndarray:
        cache, device = self.cache, self.model.device
        cache.begin(len(tokens))
        lengths = torch.tensor(cache.lengths[:len(tokens)], device=device)
        mask = (torch.arange(cache.width, device=device)[None] > lengths[:, None])[:, None, None]  # beyond a row
        out = self.model(torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                         position_ids=lengths[:, None], past_key_values=cache, use_cache=True,
                         rope_length=[n + 1 for n in cache.lengths[:len(tokens)]])
        cache.end()
        return out.logits[:, -1].float().cpu().numpy()

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def release(self, key: int) -> None:
        self.pending.pop(key, None)
