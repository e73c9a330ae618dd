"""Device strings, read the same way by both backends: cpu, auto, npu, npu:N, cuda, cuda:N; a bare npu or cuda
takes its index from LOCAL_RANK, as torchrun and msrun set it for each worker."""

from __future__ import annotations

import re
from collections.abc import Mapping

from telechat_ascend.errors import TeleChatError


def parse_device(spec: str, env: Mapping[str, str]) -> tuple[str, int | None]:
    """Split a device spec into (kind, index); bare "npu"/"cuda" take the index from LOCAL_RANK (default 0).

    kind is "npu", "cuda", "cpu" or "auto"; the index is None for "cpu" and "auto".
    """
    spec = spec.strip().lower()
    if spec in ("cpu", "auto"):
        return spec, None
    match = re.fullmatch(r"(npu|cuda)(?::(\d+))?", spec)
    if match is None:
        raise TeleChatError(f"unknown device {spec!r}: expected npu, npu:N, cuda, cuda:N, cpu or auto")
    if match[2] is not None:
        return match[1], int(match[2])
    local_rank = env.get("LOCAL_RANK", "0")
    if not local_rank.isdigit():
        raise TeleChatError(f"LOCAL_RANK={local_rank!r} is not a device index (a non-negative integer)")
    return match[1], int(local_rank)
