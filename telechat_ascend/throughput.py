"""Training throughput from a loss log, next to the published TeleChat figures: samples/s, tokens/s per device and
MFU (model FLOPs utilisation: 6·N + 12·L·H·S FLOPs per trained token, forward and backward, over the device peak)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError


@dataclass(frozen=True)
class PublishedRun:
    model: str
    setup: str
    devices: int
    seq_len: int
    samples_per_s: float


# Tele-AI/Telechat README: 8 devices, samples/s.
PUBLISHED = (
    PublishedRun("7B", "8×A100-40G, DeepSpeed", 8, 2048, 8.86),
    PublishedRun("12B", "8×A100-40G, DeepSpeed", 8, 1024, 6.85),
    PublishedRun("12B", "8×A100-40G, DeepSpeed", 8, 2048, 5.24),
    PublishedRun("7B", "8×Atlas 800T A2, MindSpore", 8, 2048, 7.98),
    PublishedRun("7B", "8×Atlas 800T A2, PyTorch", 8, 2048, 8.99),
    PublishedRun("12B", "8×Atlas 800T A2, MindSpore", 8, 1024, 8.22),
)

# Dense fp16/bf16 peak TFLOP/s per device. A100 and H100 from NVIDIA's datasheets; 910A from Huawei's Hot Chips 2019
# talk; Huawei publishes no single figure for 910B (third-party sources give 256-400 by variant): 313 is an
# assumption, pass --peak-tflops for your chip.
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "910a": 256.0, "910b": 313.0}


@dataclass
class RunThroughput:
    steps: int
    samples_per_s: float
    tokens_per_s: float
    devices: int
    seq_len: int

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.devices


def read_throughput(path: str | Path, devices: int | None, seq_len: int | None) -> RunThroughput:
    """Mean samples/s and tokens/s over a JSON-lines log, leaving out the first step (compilation, warm-up) when
    there are more. devices / seq_len default to the log's `world_size` / `seq_len` fields."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TeleChatError(f"{path}:{number}: not JSON ({error.msg})") from None
    timed = [r for r in records if "samples_per_s" in r and "tokens_per_s" in r]
    if not timed:
        raise TeleChatError(f"{path}: no records with samples_per_s and tokens_per_s")
    timed = timed[1:] if len(timed) > 1 else timed
    devices = devices or timed[-1].get("world_size")
    seq_len = seq_len or timed[-1].get("seq_len")
    if not devices or not seq_len:
        raise TeleChatError(f"{path}: the log does not say the device count and sequence length; pass --devices "
                            f"and --seq-len")
    mean = lambda key: sum(float(r[key]) for r in timed) / len(timed)  # noqa: E731
    return RunThroughput(len(timed), mean("samples_per_s"), mean("tokens_per_s"), int(devices), int(seq_len))


def flops_per_token(config: TeleChatConfig, seq_len: int) -> float:
    return 6.0 * config.num_parameters() + 12.0 * config.n_layer * config.hidden_size * seq_len


def matmul_flops_per_token(config: TeleChatConfig, seq_len: int) -> float:
    """The matmul FLOPs of forward + backward per token: 6 per weight of a linear layer (the head included, the input
    embedding, a lookup, not) plus 12·L·H·S for the attention scores and their weighted sum (unmasked). What a
    step would cost at the machine's GEMM rate; flops_per_token (the published 6·N formula, for MFU) also counts the
    embedding table."""
    h = config.hidden_size
    linears = config.n_layer * config.block_linear_weights() + config.vocab_size * h
    return 6.0 * linears + 12.0 * config.n_layer * h * seq_len


def report(run: RunThroughput, config: TeleChatConfig, peak_tflops: float | None, compare: str | None) -> str:
    lines = [f"run: {run.devices} device(s), seq {run.seq_len}, {run.steps} timed steps: "
             f"{run.samples_per_s:.3f} samples/s, {run.tokens_per_s_per_device:.1f} tokens/s per device"]
    if peak_tflops:
        mfu = run.tokens_per_s_per_device * flops_per_token(config, run.seq_len) / (peak_tflops * 1e12)
        lines.append(f"MFU {mfu:.1%} of {peak_tflops:g} TFLOP/s per device "
                     f"({flops_per_token(config, run.seq_len) / 1e9:.2f} GFLOP per token)")
    rows = [p for p in PUBLISHED if compare in (None, p.model)]
    lines.append(f"{'published':34s} {'seq':>5s} {'samples/s':>10s} {'scaled':>10s} {'run/scaled':>10s}")
    for p in rows:
        # Same tokens/s per device: samples/s grows with the device count and shrinks with the sequence length.
        scaled = p.samples_per_s * (run.devices / p.devices) * (p.seq_len / run.seq_len)
        lines.append(f"{p.model + ' ' + p.setup:34s} {p.seq_len:5d} {p.samples_per_s:10.2f} {scaled:10.3f} "
                     f"{run.samples_per_s / scaled:10.3f}")
    return "\n".join(lines)
