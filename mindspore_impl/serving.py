"""The MindSpore side of the serving engine (telechat_ascend.engine.BatchRunner), on the model's decode():
each row keeps its own cache ([1, length, heads, head_dim] per layer); a decode step right-pads the rows' caches
to the longest, appends every row's new token at the end, and masks each row's padding through its segment ids
(0 = not a key), while positions and the NTK regime are each row's own. The new keys are then cut back onto each
row. The padding is rebuilt every step: simple and exact, at the cost of one copy of the caches per step."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from telechat_ascend.rope import rope_tables


class MindSporeBatchRunner:
    def __init__(self, model, rows: int):
        self.model, self.rows = model, rows
        self.pending: dict[int, list] = {}  # request key -> its prompt's cache so far
        self.caches: list[list | None] = [None] * rows

    def _rope(self, positions: list[list[int]], totals: list[int]) -> tuple[Tensor, Tensor]:
        tables = [rope_tables(self.model.config, np.array([p]), n, self.model.config.fp16_rope_tables)
                  for p, n in zip(positions, totals)]
        cos, sin = (np.concatenate(parts)[:, :, None, :] for parts in zip(*tables))
        return Tensor(cos), Tensor(sin)

    def prefill(self, key: int, ids: list[int], start: int, stop: int) -> np.ndarray | None:
        past = self.pending.get(key) or [(None, None)] * self.model.config.n_layer
        cos, sin = self._rope([list(range(start, stop))], [len(ids)])
        logits, present = self.model.decode(Tensor(np.array([ids[start:stop]], np.int32)), cos, sin,
                                            Tensor(np.ones((1, stop), np.int32)), past)
        self.pending[key] = present
        return logits.asnumpy()[0, -1] if stop == len(ids) else None

    def admit(self, key: int, row: int) -> None:
        self.caches[row] = self.pending.pop(key)

    def decode(self, tokens: list[int]) -> np.ndarray:
        rows = self.caches[:len(tokens)]
        lengths = [cache[0][0].shape[1] for cache in rows]
        width = max(lengths)
        past = []
        for layer in range(self.model.config.n_layer):
            keys, values = (ops.concat([self._pad(cache[layer][kind], width) for cache in rows], 0)
                            for kind in (0, 1))
            past.append((keys, values))
        segments = np.array([[1] * n + [0] * (width - n) + [1] for n in lengths], np.int32)
        cos, sin = self._rope([[n] for n in lengths], [n + 1 for n in lengths])
        logits, present = self.model.decode(Tensor(np.array(tokens, np.int32)[:, None]), cos, sin,
                                            Tensor(segments), past)
        for row, cache in enumerate(rows):  # the new key and value sit after the padding, at index `width`
            self.caches[row] = [tuple(ops.concat((held, new[row:row + 1, width:]), 1) for held, new in
                                      zip(cache[layer], present[layer])) for layer in range(len(cache))]
        return logits.asnumpy()[:, -1]

    @staticmethod
    def _pad(tensor, width: int):
        missing = width - tensor.shape[1]
        if not missing:
            return tensor
        return ops.concat((tensor, ops.zeros((1, missing, *tensor.shape[2:]), tensor.dtype)), 1)

    def move(self, src: int, dst: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None

    def release(self, key: int) -> None:
        self.pending.pop(key, None)
