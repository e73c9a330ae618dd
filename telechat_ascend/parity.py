"""Loss parity between two training runs, by the published NPU-vs-A100 criteria: mean relative loss error at most 1%
(Huawei's mismatch rule) and every per-step |Δloss| at most 0.02 (the TeleChat 910B-vs-A100 figure).

A loss log is either trainer's JSON lines (objects with "step" and "loss"; lines marked "skipped" are ignored) or the
console output of the published DeepSpeed SFT trainer, whose lines read
`epoch:1, global_step:5, step:20  cur_batch_loss: 2.3456` (the loss sometimes printed as `tensor(2.3456, ...)`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from telechat_ascend.backends import backends as installed_backends
from telechat_ascend.errors import TeleChatError

MAX_MEAN_RELATIVE_ERROR = 0.01
MAX_ABS_DIFFERENCE = 0.02

_DEEPSPEED_LINE = re.compile(r"global_step:\s*(\d+).*?cur_batch_loss:\s*(?:tensor\(\s*)?([-+]?(?:\d+\.?\d*|\.\d+)"
                             r"(?:[eE][-+]?\d+)?|nan|inf)")


def read_losses(path: str | Path) -> dict[int, float]:
    """step -> loss from a JSON-lines log or a DeepSpeed console log."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise TeleChatError(f"{path}: cannot read ({error.strerror})") from None
    first = next((line.strip() for line in lines if line.strip()), "")
    losses = _json_lines(path, lines) if first.startswith("{") else _deepspeed_lines(lines)
    if not losses:
        raise TeleChatError(f"{path}: no losses found (expected JSON lines with 'step' and 'loss', or DeepSpeed "
                            f"lines with 'global_step:N ... cur_batch_loss: X')")
    return losses


def _json_lines(path: Path, lines: list[str]) -> dict[int, float]:
    losses = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("skipped"):
                continue
            step, loss = int(record["step"]), float(record["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise TeleChatError(f"{path}:{number}: not a loss record ({type(error).__name__}: {error})") from None
        losses[step] = loss
    return losses


def _deepspeed_lines(lines: list[str]) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in map(_DEEPSPEED_LINE.search, lines) if m}


@dataclass
class ParityResult:
    steps: list[int]
    run: list[float]
    reference: list[float]
    abs_differences: list[float]
    mean_relative_error: float
    max_abs_difference: float
    only_in_run: int
    only_in_reference: int
    passed: bool

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {len(self.steps)} common steps; mean relative error {self.mean_relative_error:.3e} "
                f"(limit {MAX_MEAN_RELATIVE_ERROR}); max |Δloss| {self.max_abs_difference:.3e} "
                f"(limit {MAX_ABS_DIFFERENCE})"
                + (f"; {self.only_in_run} step(s) only in the run" if self.only_in_run else "")
                + (f"; {self.only_in_reference} step(s) only in the reference" if self.only_in_reference else ""))


def compare_losses(run: dict[int, float], reference: dict[int, float]) -> ParityResult:
    steps = sorted(set(run) & set(reference))
    if not steps:
        raise TeleChatError(f"the logs share no step (run: {_span(run)}, reference: {_span(reference)})")
    a, b = [run[s] for s in steps], [reference[s] for s in steps]
    differences = [abs(x - y) for x, y in zip(a, b)]
    relative = [d / abs(y) if y else math.inf for d, y in zip(differences, b)]
    mean_relative, worst = sum(relative) / len(relative), max(differences)
    finite = all(math.isfinite(x) for x in a + b)
    passed = finite and mean_relative <= MAX_MEAN_RELATIVE_ERROR and worst <= MAX_ABS_DIFFERENCE
    return ParityResult(steps, a, b, differences, mean_relative, worst, len(set(run) - set(reference)),
                        len(set(reference) - set(run)), passed)


def _span(losses: dict[int, float]) -> str:
    return f"steps {min(losses)}-{max(losses)}" if losses else "empty"


def write_json(result: ParityResult, path: str | Path, labels: tuple[str, str]) -> None:
    verdict = {"run": labels[0], "reference": labels[1], **asdict(result),
               "limits": {"mean_relative_error": MAX_MEAN_RELATIVE_ERROR, "max_abs_difference": MAX_ABS_DIFFERENCE}}
    Path(path).write_text(json.dumps(verdict, indent=2) + "\n", encoding="utf-8")


def plot(result: ParityResult, path: str | Path, labels: tuple[str, str]) -> None:
    """Both loss curves, and their difference against the ±0.02 band."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (curves, difference) = pyplot.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                   gridspec_kw={"height_ratios": [2, 1]})
    curves.plot(result.steps, result.run, label=labels[0])
    curves.plot(result.steps, result.reference, label=labels[1], linestyle="--")
    curves.set_ylabel("loss")
    curves.legend()
    curves.set_title(result.summary().split(";")[0] + f"; mean rel. error {result.mean_relative_error:.2e}")
    difference.plot(result.steps, [x - y for x, y in zip(result.run, result.reference)], color="tab:red")
    for bound in (MAX_ABS_DIFFERENCE, -MAX_ABS_DIFFERENCE):
        difference.axhline(bound, color="grey", linestyle=":")
    difference.set_xlabel("step")
    difference.set_ylabel("Δloss")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run_backends(model: str | Path, data: str | Path, steps: int, out: str | Path,
                 backends: tuple[str, str] = ("torch", "mindspore"), lr: float = 1e-4) -> ParityResult:
    """Trains `steps` steps from the same weights on the same batches with each backend's trainer (fp32, CPU, one
    process, the same AdamW and schedule), then compares their loss logs: (a) of the parity check."""
    import subprocess
    import sys

    import yaml

    installed = installed_backends()
    if len(backends) != 2 or set(backends) - set(installed):
        raise TeleChatError(f"--backends: give two of {', '.join(installed)}, got {','.join(backends)}")
    out = Path(out)
    logs = []
    for backend in backends:
        config = {"model": {"path": str(model), "dtype": "fp32"}, "train_dataset": {"data_dir": str(data)},
                  "context": {"device_target": "CPU"},
                  "optimizer": {"lr": lr}, "lr_schedule": {"warmup_ratio": 0.1},
                  "runner": {"max_steps": steps, "batch_size": 2, "seed": 42, "save_steps": steps,
                             "output_dir": str(out / backend), "keep_last": 1}}
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        done = subprocess.run([sys.executable, *installed[backend].trainer, "--config", str(path), "--overwrite"], capture_output=True,
                              text=True)
        if done.returncode:
            raise TeleChatError(f"the {backend} trainer failed (config {path}):\n{done.stdout[-2000:]}"
                                f"{done.stderr[-2000:]}")
        logs.append(out / backend / "loss_log.jsonl")
    return compare_losses(read_losses(logs[0]), read_losses(logs[1]))
