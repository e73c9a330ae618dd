"""What the MindSpore and PyTorch trainers share, so that the same YAML gives the same run on either: the config,
the learning-rate schedule, the data order, which parameters get weight decay, and the loss log.

Config (YAML, MindFormers-like sections; every key optional, an unknown key is an error):

    model:         preset: tiny | 7B | ...  or  path: an HF or MindSpore model folder to start from
                   dtype: fp32 | fp16 | bf16   compute dtype; parameters stay fp32 (master weights)
    train_dataset: data_dir: a prepare-data shard folder  or  mindrecord: a MindFormers .mindrecord file
    context:       mode: GRAPH (default) | PYNATIVE;  device_target: CPU | Ascend (default: the framework's)
                   [MindSpore only: the PyTorch trainer refuses them and takes --device]
    parallel:      data_parallel;  model_parallel (tensor parallel);  optimizer_shard: false | true;
                   pipeline_stage: 1 (pipeline parallelism is not implemented). Workers = data_parallel x
                   model_parallel. model_parallel > 1 or optimizer_shard is MindSpore semi-auto parallel: Ascend
                   only, GRAPH mode, gradient_accumulation_steps 1 (the PyTorch trainer shards with DeepSpeed ZeRO)
    optimizer:     type: AdamW;  lr;  betas: [0.9, 0.95];  eps: 1.0e-5;  weight_decay: 1.0e-4
    lr_schedule:   type: cosine;  warmup_ratio: 0.1  or  warmup_steps;  min_lr: 0.0
    runner:        epochs;  max_steps (overrides epochs);  batch_size (per device);  gradient_accumulation_steps;
                   seed;  log_every (console lines; the loss log gets every step);  save_steps;  output_dir;
                   keep_last (step checkpoints kept, 0 = all)
    recompute:     false | true  (recompute each decoder layer's activations in the backward pass)
    loss_scale:    type: dynamic | static;  value;  factor;  window.  Default: dynamic 65536 / 2 / 1000 for fp16,
                   static 1 otherwise
    clip_grad:     1.0  (max global gradient norm; null disables clipping)

Weight decay applies to every matrix (embedding, attention, MLP, lm_head) and to nothing one-dimensional: biases
and RMSNorm weights are excluded. (The published DeepSpeed script means to exclude norms too, but matches the name
"LayerNorm.weight", which TeleChat does not have, so it decays them; we exclude them deliberately.)

One optimizer step consumes a global batch of batch_size x data_parallel x gradient_accumulation_steps rows. Its
loss is the mean over all target tokens of the global batch (token-weighted, not a mean of per-row or per-device
means), so 1 worker x batch 4, 2 workers x batch 2 and 1 worker x batch 2 x accumulation 2 train identically.

Loss log: JSON lines, one object per optimizer step, written by rank 0:
    step          1, 2, ... (the number of optimizer steps done)
    loss          the global batch's mean loss per target token (null only on a skipped step that overflowed)
    lr            the learning rate the step used (cosine_lr)
    grad_norm     global norm of the gradient of that loss (all workers combined), before clipping (null on a
                  skipped step)
    tokens        non-padding tokens in the step's global batch
    samples_per_s, tokens_per_s   global batch rows and tokens over the step's wall time (all workers together)
    world_size    workers;  seq_len  tokens per row  (what `telechat-ascend bench` needs)
    skipped       present (true) only when the gradients overflowed and the update was skipped
On resume the log is cut back to the checkpoint's step, so an interrupted and resumed run leaves the same log as an
uninterrupted one (apart from the timing fields).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from telechat_ascend.config import PRESETS
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_text

IGNORE_INDEX = -100


# ---- config ---------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    preset: str | None = None
    path: str | None = None
    dtype: str = "fp32"

    def validate(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise TeleChatError("model: give exactly one of 'preset' (a new model) or 'path' (a folder to start from)")

        if self.preset is not None and self.preset not in PRESETS:
            raise TeleChatError(f"model.preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        _check_choice("model.dtype", self.dtype, ("fp32", "fp16", "bf16"))


@dataclass
class DatasetConfig:
    data_dir: str | None = None
    mindrecord: str | None = None

    def validate(self) -> None:
        if (self.data_dir is None) == (self.mindrecord is None):
            raise TeleChatError("train_dataset: give exactly one of 'data_dir' (prepare-data shards) or 'mindrecord'")


@dataclass
class ContextConfig:
    mode: str | None = None  # None: GRAPH
    device_target: str | None = None

    @property
    def graph(self) -> bool:
        return self.mode in (None, "GRAPH")

    def validate(self) -> None:
        if self.mode is not None:
            _check_choice("context.mode", self.mode, ("GRAPH", "PYNATIVE"))
        if self.device_target is not None:
            _check_choice("context.device_target", self.device_target, ("CPU", "Ascend"))


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    optimizer_shard: bool = False

    @property
    def semi_auto(self) -> bool:
        """Tensor parallelism or optimizer sharding: MindSpore (semi-)auto parallel, Ascend only."""
        return self.model_parallel > 1 or self.optimizer_shard

    @property
    def devices(self) -> int:
        return self.data_parallel * self.model_parallel

    def validate(self) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage"):
            _check_positive(f"parallel.{name}", getattr(self, name))
        if self.pipeline_stage > 1:
            raise TeleChatError(f"parallel.pipeline_stage = {self.pipeline_stage}: pipeline parallelism is not "
                                f"implemented; shard the model with model_parallel and optimizer_shard instead")

    def check_model(self, config) -> None:
        """Tensor parallelism splits heads, KV heads, the MLP and the vocabulary (lm_head) into model_parallel parts."""
        mp = self.model_parallel
        for name in ("n_head", "kv_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(config, name) % mp:
                raise TeleChatError(f"parallel.model_parallel = {mp} does not divide the model's {name} "
                                    f"({getattr(config, name)})")


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-5
    weight_decay: float = 1e-4

    def validate(self) -> None:
        _check_choice("optimizer.type", self.type, ("AdamW",))
        _check_positive("optimizer.lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise TeleChatError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        _check_positive("optimizer.eps", self.eps)
        if self.weight_decay < 0:
            raise TeleChatError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class LRScheduleConfig:
    type: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr: float = 0.0

    def validate(self) -> None:
        _check_choice("lr_schedule.type", self.type, ("cosine",))
        if not 0 <= self.warmup_ratio <= 1:
            raise TeleChatError(f"lr_schedule.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise TeleChatError(f"lr_schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0:
            raise TeleChatError(f"lr_schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass
class RunnerConfig:
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    log_every: int = 1
    save_steps: int = 100
    output_dir: str = "output"
    keep_last: int = 3

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every", "save_steps"):
            _check_positive(f"runner.{name}", getattr(self, name))
        if self.max_steps is not None:
            _check_positive("runner.max_steps", self.max_steps)
        if self.keep_last < 0:
            raise TeleChatError(f"runner.keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")


@dataclass
class LossScaleConfig:
    type: str | None = None  # None: dynamic for fp16 compute, static otherwise
    value: float | None = None  # None: 65536 when dynamic, 1 when static
    factor: float = 2.0
    window: int = 1000

    def validate(self) -> None:
        if self.type is not None:
            _check_choice("loss_scale.type", self.type, ("dynamic", "static"))
        if self.value is not None:
            _check_positive("loss_scale.value", self.value)
        if not self.factor > 1:
            raise TeleChatError(f"loss_scale.factor must be > 1, got {self.factor}")
        _check_positive("loss_scale.window", self.window)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    recompute: bool = False
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    clip_grad: float | None = 1.0

    def validate(self) -> None:
        """Checks every section and fills in the loss-scale defaults that depend on the dtype."""
        for section in (self.model, self.train_dataset, self.context, self.parallel, self.optimizer,
                        self.lr_schedule, self.runner, self.loss_scale):
            section.validate()
        if self.clip_grad is not None:
            _check_positive("clip_grad", self.clip_grad)
        if self.parallel.semi_auto:
            if not self.context.graph:
                raise TeleChatError("parallel.model_parallel > 1 / optimizer_shard (semi-auto parallel) needs "
                                    "context.mode GRAPH")
            if self.runner.gradient_accumulation_steps != 1:
                raise TeleChatError("parallel.model_parallel > 1 / optimizer_shard: the sharded step takes the whole "
                                    "global batch at once; set runner.gradient_accumulation_steps to 1 and raise "
                                    "runner.batch_size instead")
        scale = self.loss_scale
        scale.type = scale.type or ("dynamic" if self.model.dtype == "fp16" else "static")
        scale.value = scale.value or (65536.0 if scale.type == "dynamic" else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_run_arguments(parser) -> None:
    """The command-line options both trainers take."""
    parser.add_argument("--config", required=True, type=Path, help="training YAML (see telechat_ascend/training.py)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    runs.add_argument("--overwrite", action="store_true", help="delete the run already in output_dir and start over")
    parser.add_argument("--output-dir", help="overrides runner.output_dir")
    parser.add_argument("--max-steps", type=int, help="overrides runner.max_steps")


def run_config(args) -> TrainConfig:
    """The YAML of --config with the command line's overrides, validated."""
    config = load_train_config(args.config)
    if args.output_dir is not None:
        config.runner.output_dir = args.output_dir
    if args.max_steps is not None:
        config.runner.max_steps = args.max_steps
    config.validate()
    return config


def load_train_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from YAML. Errors name the file and the key."""
    path = Path(path)
    try:
        values = yaml.safe_load(read_text(path, "training config"))
    except yaml.YAMLError as error:
        raise TeleChatError(f"{path}: not valid YAML: {error}") from None
    try:
        config = _build(TrainConfig, values or {}, None)
        config.validate()
    except TeleChatError as error:
        raise TeleChatError(f"{path}: {error}") from None
    return config


def _build(cls, values: Any, section: str | None):
    """A config dataclass from a YAML mapping, checking every key and value type against the annotations."""
    if not isinstance(values, dict):
        raise TeleChatError(f"{section or 'the file'} must be a mapping of keys to values, got {values!r}")
    prefix = f"{section}." if section else ""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
            raise TeleChatError(f"unknown key '{name}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, name)
        else:
            kwargs[key] = _convert(value, kind, name)
    return cls(**kwargs)


def _convert(value: Any, kind, name: str) -> Any:
    """`value` as the annotated type. PyYAML reads 1e-5 (no dot) as a string, so numeric strings pass as floats."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise TeleChatError(f"{name} must be a list, got {value!r}")
        return [_convert(v, typing.get_args(kind)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is float:
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise TeleChatError(f"{name} must be a finite number, got {value!r}")
        return number
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise TeleChatError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise TeleChatError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise TeleChatError(f"{name} must be positive, got {value}")


# ---- schedule ---------------------------------------------------------------------------------------------------

def cosine_lr(step: int, total: int, peak: float, warmup: int, min_lr: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warmup over `warmup` steps to `peak`,
    then a half cosine from `peak` down to `min_lr` at step `total`. The warmup starts at peak/warmup rather than 0
    (as HF's schedule does), so no step is wasted at lr 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decays(shape: tuple[int, ...]) -> bool:
    """Whether a parameter of this shape gets weight decay: matrices yes; biases and norm weights (1-D) no."""
    return len(shape) >= 2


# ---- data order -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataOrder:
    """Which dataset rows each worker reads at each optimizer step: deterministic, and a pure function of the step,
    so resuming needs only the step.

    Each epoch is a permutation of the rows seeded by (seed, epoch), cut into global batches of
    per_device_batch x world x grad_accum rows (an incomplete last batch is dropped). Within a global batch,
    micro step m of rank r takes the slice number m * world + r, so the global batch, and hence the loss, is the
    same for any split into workers and accumulation steps.
    """
    num_rows: int
    seed: int
    per_device_batch: int
    world: int
    grad_accum: int

    def __post_init__(self) -> None:
        if self.num_rows < self.global_batch:
            raise TeleChatError(f"the dataset has {self.num_rows} rows, fewer than one global batch of "
                                f"{self.global_batch} (batch_size {self.per_device_batch} x {self.world} workers x "
                                f"gradient_accumulation_steps {self.grad_accum})")

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.world * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global batch within the epoch) of optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def global_rows(self, step: int) -> np.ndarray:
        epoch, index = self.position(step)
        return _permutation(self.num_rows, self.seed, epoch)[index * self.global_batch:(index + 1) * self.global_batch]

    def micro_slices(self, rank: int) -> list[slice]:
        """Where each accumulation step of `rank` sits in the global batch (global_rows)."""
        b = self.per_device_batch
        return [slice((m * self.world + rank) * b, (m * self.world + rank + 1) * b) for m in range(self.grad_accum)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of each accumulation step of `rank` at optimizer step `step`."""
        rows = self.global_rows(step)
        return [rows[part].tolist() for part in self.micro_slices(rank)]


def dropout_row_keys(seed: int, step: int, rows) -> np.ndarray:
    """One 32-bit key per dataset row of an optimizer step, for keyed dropout masks (mindspore_impl.model): a
    function of (seed, step, row) alone, so the masks do not depend on how the global batch is split over workers
    and accumulation steps, and a resumed run draws those of the uninterrupted run."""
    return np.array([np.random.SeedSequence([seed, step, int(row)]).generate_state(1)[0] for row in rows], np.int64)


@functools.lru_cache(maxsize=2)
def _permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass(frozen=True)
class Plan:
    """The run's length, learning-rate schedule and data order, from the config and the dataset size."""
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    order: DataOrder

    @classmethod
    def make(cls, config: TrainConfig, num_rows: int) -> "Plan":
        runner, schedule = config.runner, config.lr_schedule
        order = DataOrder(num_rows, runner.seed, runner.batch_size, config.parallel.data_parallel,
                          runner.gradient_accumulation_steps)
        total = runner.max_steps or runner.epochs * order.steps_per_epoch
        warmup = schedule.warmup_steps if schedule.warmup_steps is not None \
            else int(schedule.warmup_ratio * total)  # floor, as the published scripts
        return cls(total, warmup, config.optimizer.lr, schedule.min_lr, order)

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.peak_lr, self.warmup_steps, self.min_lr)


def target_count(labels: np.ndarray) -> int:
    """Target tokens of rows whose labels are aligned with the inputs (the first position predicts nothing)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


# ---- loss log ---------------------------------------------------------------------------------------------------

LOG_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "samples_per_s", "tokens_per_s", "world_size", "seq_len")
_NULLABLE = ("loss", "grad_norm")  # only on skipped steps
_INTEGERS = ("step", "tokens", "world_size", "seq_len")


class LossLogWriter:
    """Appends one record per optimizer step. resume_step=None starts a new log; resume_step=s keeps the first s
    records of the existing log (which must have them) and continues after them."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = []
        if resume_step is not None:
            kept = [r for r in (read_loss_log(self.path) if self.path.exists() else []) if r["step"] <= resume_step]
            if len(kept) != resume_step:
                raise TeleChatError(f"{self.path}: has {len(kept)} records up to step {resume_step}, the step being "
                                    f"resumed; the log does not belong to this checkpoint")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, loss: float | None, lr: float, grad_norm: float | None, tokens: int,
              samples_per_s: float, tokens_per_s: float, world_size: int, seq_len: int,
              skipped: bool = False) -> dict[str, Any]:
        record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, samples_per_s=samples_per_s,
                      tokens_per_s=tokens_per_s, world_size=world_size, seq_len=seq_len)
        if skipped:
            record["skipped"] = True
        _check_record(record, "record")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        return record

    def close(self) -> None:
        self.file.close()


def read_loss_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a loss log, each checked against the schema; errors name file:line."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TeleChatError(f"{where}: not JSON ({error.msg})") from None
            _check_record(record, where)
            if record["step"] != len(records) + 1:
                raise TeleChatError(f"{where}: step {record['step']}, expected {len(records) + 1}")
            records.append(record)
    return records


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise TeleChatError(f"{where}: expected a JSON object")
    keys = set(record) - {"skipped"}
    if keys != set(LOG_KEYS):
        missing, extra = sorted(set(LOG_KEYS) - keys), sorted(keys - set(LOG_KEYS))
        raise TeleChatError(f"{where}: " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}", extra and f"unknown {', '.join(extra)}")
            if part))
    skipped = record.get("skipped", False)
    if skipped is not True and "skipped" in record:
        raise TeleChatError(f"{where}: 'skipped' must be true when present")
    for key in LOG_KEYS:
        value = record[key]
        if value is None and key in _NULLABLE and skipped:
            continue
        integral = key in _INTEGERS
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) \
                or not math.isfinite(value) or value < 0:
            kind = "a non-negative integer" if integral else "a finite non-negative number"
            raise TeleChatError(f"{where}: '{key}' must be {kind}, got {value!r}")


# ---- loss scale -------------------------------------------------------------------------------------------------

@dataclass
class LossScaler:
    """Host-side loss-scale state. Every step multiplies the loss by `scale` and divides the gradients by it; a step
    whose gradients overflow (inf or nan on any worker) is skipped. Dynamic: an overflow divides the scale by `factor`
    (not below 1), `window` good steps in a row multiply it by `factor`. Static: the scale never changes."""
    scale: float
    dynamic: bool
    factor: float
    window: int
    good_steps: int = 0

    @classmethod
    def from_config(cls, config: LossScaleConfig) -> "LossScaler":
        return cls(config.value, config.type == "dynamic", config.factor, config.window)

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale, self.good_steps = max(self.scale / self.factor, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps == self.window:
            self.scale, self.good_steps = self.scale * self.factor, 0


# ---- checkpoint folders -----------------------------------------------------------------------------------------

LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def read_latest(checkpoints: Path) -> Path | None:
    """The checkpoint folder the `latest` pointer names, or None when there is no pointer."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoints / pointer.read_text(encoding="utf-8").strip()
    if not folder.is_dir():
        raise TeleChatError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def write_latest(checkpoints: Path, name: str, keep_last: int) -> None:
    """Points `latest` at checkpoint `name` (atomically: a crash leaves the old or the new pointer), then deletes
    all but the newest keep_last step checkpoints (0 keeps all)."""
    tmp = checkpoints / f".{LATEST}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, checkpoints / LATEST)
    if keep_last:
        for old in sorted(checkpoints.glob("step-*"))[:-keep_last]:
            if old.name != name:
                shutil.rmtree(old)
