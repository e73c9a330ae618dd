"""The one training loop both backends run: output-folder policy and lock, resume, data order, token weighting,
loss scale, logging, checkpoint cadence and the final export. A backend supplies only what is its own (TrainBackend):
joining the process group, building its model and optimizer, one optimizer step over given micro-batches, saving
and loading its own state, and exporting the final model.

Output folder (runner.output_dir):
    .lock/rank-R         held (flock) by rank R while it runs: a second run on the folder is refused, naming the pid
    train_config.json    the validated config
    loss_log.jsonl       one record per optimizer step (telechat_ascend.training)
    tensorboard/         loss, learning rate, tokens/s, grad norm
    checkpoints/step-NNNNNN/  the backend's files, trainer_state.json (written last), published atomically
    checkpoints/latest   the newest complete checkpoint
    final/hf             the trained model as an HF folder (both backends), final/mindspore (MindSpore backend)

A folder that already holds a run is refused unless --resume (continue from `latest`) or --overwrite (start over).
Resuming refuses a checkpoint written with another backend, dataset, global batch split, seed, dtype or parallel
layout (naming the setting): any of them would silently train on other data or other numbers. The run's length
(max_steps, epochs) may change; the learning-rate schedule then changes from the checkpoint on.

Randomness: the dropout streams of step s on rank r are re-seeded from (seed, s, r) at every step (StepInputs.seed),
and MindSpore's keyed masks come from (seed, s, row) (StepInputs dropout_keys), so there is no RNG state to save and
a resumed run draws exactly the masks of an uninterrupted one on every rank.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from telechat_ascend.checkpoint import atomic_output_dir, publish_dir, remove_stale_partials
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.data import ARRAYS, PackedDataset
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object
from telechat_ascend.training import (LATEST, LossLogWriter, LossScaler, Plan, TrainConfig, checkpoint_name,
                                      dropout_row_keys, read_latest, target_count, write_latest)

STATE_FILE = "trainer_state.json"
RUN_FILES = ("loss_log.jsonl", "checkpoints", "final", "tensorboard", "train_config.json")
MAX_CONSECUTIVE_SKIPS = 25  # a dynamic fp16 scale falls from 65536 to 1 in 16 skipped steps


@dataclass
class StepInputs:
    """What one optimizer step consumes. Each micro-batch holds this rank's rows (input_ids, labels, position_ids,
    segment_ids, int32 [rows, seq_len]), `dropout_keys` (int64 [rows]) and `weight`: its share of the global batch's
    target tokens, so the sum of the weighted micro-batch mean losses over all ranks is the global token mean."""
    step: int  # 0-based
    lr: float
    update_number: int  # 1-based index of the optimizer update this step makes if its gradients are finite
    loss_scale: float
    seed: int  # seeds this rank's dropout streams for this step
    micro_batches: list[dict[str, Any]]
    global_batch: dict[str, Any]  # every rank's rows, for a backend that feeds the whole global batch


@dataclass
class StepResult:
    loss: float  # the global batch's token-weighted mean loss (all ranks)
    grad_norm: float  # global gradient norm before clipping; non-finite: the update was skipped


class TrainBackend(Protocol):
    name: str  # "torch", "mindspore": recorded in checkpoints, which only the same backend resumes
    manages_loss_scale: bool  # True when the backend's own scaler (DeepSpeed fp16) replaces the shared one

    def start(self, config: TrainConfig) -> tuple[int, int]:
        """Joins the process group (torchrun, msrun): (rank, world size)."""

    def open_dataset(self, config: TrainConfig, pad_id: int):
        """The rows of train_dataset when it is not a prepare-data folder (MindRecord); refuse what is not supported."""

    def build(self, config: TrainConfig, model_source: str | Path, checkpoint: Path | None) -> None:
        """Model and optimizer from `model_source` (a folder or a preset name); with `checkpoint`, also the
        backend's state saved there (moments, DeepSpeed shards)."""

    def step(self, inputs: StepInputs) -> StepResult:
        """One optimizer step; returns after the device has finished it."""

    def save(self, folder: Path, rank: int) -> None:
        """Writes this rank's part of a checkpoint into `folder` (rank 0 writes model/); called on every rank."""

    def export(self, checkpoint: Path, final: Path) -> None:
        """Rank 0: the trained model of `checkpoint` as final/hf (and any backend format) inside `final`."""

    def barrier(self) -> None: ...

    def finish(self) -> None:
        """Leaves the process group."""


# ---- the output folder ------------------------------------------------------------------------------------------

class FolderLock:
    """An exclusive flock on output_dir/.lock/rank-R for as long as the process lives: the kernel drops it when the
    process ends, however it ends, so a killed run never leaves a stale lock, and workers that outlive their
    launcher (kill -9 of msrun) still hold theirs. (flock is per host: on shared storage, one node per output_dir.)"""

    def __init__(self, out: Path, rank: int):
        folder = out / ".lock"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank}"
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise TeleChatError(f"{out} is in use by a running training job ({holder} holds {self.path}); wait for "
                                f"it or stop it first") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Rank 0, under the lock: refuses a used folder unless resuming or overwriting; clears it for --overwrite and
    removes what killed writers left behind."""
    used = [name for name in RUN_FILES if (out / name).exists()]
    if used and not resume and not overwrite:
        raise TeleChatError(f"{out} already holds a training run ({', '.join(used)}); pass --resume to continue it, "
                            f"--overwrite to start over, or choose another runner.output_dir")
    if overwrite and not resume:
        for name in used:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for folder in (out, out / "checkpoints"):
        remove_stale_partials(folder, everything=True)


# ---- trainer state ----------------------------------------------------------------------------------------------

def run_settings(config: TrainConfig, backend: str, fingerprint: str, plan: Plan, world: int) -> dict[str, Any]:
    """What a checkpoint can only be resumed with: any change trains on other data or other numbers."""
    parallel = config.parallel
    return {"backend": backend, "data_fingerprint": fingerprint, "rows": plan.order.num_rows,
            "global_batch": plan.order.global_batch, "batch_size": config.runner.batch_size,
            "gradient_accumulation_steps": config.runner.gradient_accumulation_steps, "world_size": world,
            "data_parallel": parallel.data_parallel, "model_parallel": parallel.model_parallel,
            "optimizer_shard": parallel.optimizer_shard, "seed": config.runner.seed, "dtype": config.model.dtype}


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise TeleChatError(f"{path}: missing; {folder} is not a complete checkpoint")
    state = read_json_object(path, "trainer state")
    try:
        int(state["step"]), state["settings"], state["loss_scale"]
    except (KeyError, TypeError, ValueError) as error:
        raise TeleChatError(f"{path}: unreadable trainer state ({type(error).__name__}: {error})") from None
    return state


def check_resume(folder: Path, state: dict[str, Any], settings: dict[str, Any], total_steps: int) -> None:
    for key, now in settings.items():
        then = state["settings"].get(key)
        if then != now:
            raise TeleChatError(f"{folder}: the checkpoint was written with {key} {then!r}, this run has {now!r}; "
                                f"resume with the same settings, or start a new run in another output_dir")
    if state["step"] > total_steps:
        raise TeleChatError(f"{folder}: the checkpoint is at step {state['step']}, beyond this run's {total_steps} "
                            f"steps (--max-steps / runner.max_steps); nothing to resume")


def dataset_fingerprint(dataset) -> str:
    manifest = getattr(dataset, "manifest", None)
    return manifest["content_sha256"] if manifest else dataset.fingerprint


# ---- the loop ---------------------------------------------------------------------------------------------------

def stack_rows(dataset, rows) -> dict[str, np.ndarray]:
    return {name: np.stack([dataset[int(i)][name] for i in rows]) for name in ARRAYS}


def step_inputs(dataset, plan: Plan, step: int, rank: int, updates: int, scale: float, seed: int) -> StepInputs:
    order = plan.order
    global_rows = order.global_rows(step)
    global_batch = stack_rows(dataset, global_rows)
    global_batch["dropout_keys"] = dropout_row_keys(seed, step, global_rows)
    total_targets = max(target_count(global_batch["labels"]), 1)
    micro_batches = []
    for part in order.micro_slices(rank):  # views of the global batch: its rows are read once
        batch = {name: array[part] for name, array in global_batch.items()}
        batch["weight"] = target_count(batch["labels"]) / total_targets
        micro_batches.append(batch)
    step_seed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]) % 2 ** 31
    return StepInputs(step, plan.lr(step), updates + 1, scale, step_seed, micro_batches, global_batch)


def open_dataset(config: TrainConfig, backend: TrainBackend, pad_id: int):
    if config.train_dataset.data_dir is None:
        return backend.open_dataset(config, pad_id)
    dataset = PackedDataset(config.train_dataset.data_dir)
    dataset.verify()
    return dataset


def check_vocabulary(dataset, model: TeleChatConfig, where: str) -> None:
    """Token ids at or beyond the model's vocabulary would index past the embedding (an IndexError deep inside a
    step); refuse them up front, naming both."""
    if isinstance(dataset, PackedDataset):
        largest = max(int(shard["input_ids"].max()) for shard in dataset.shards)
    else:
        largest = int(max(dataset[i]["input_ids"].max() for i in range(len(dataset))))
    if largest >= model.vocab_size:
        raise TeleChatError(f"{where}: holds token id {largest}, but the model's vocabulary has {model.vocab_size} "
                            f"ids; prepare the data with the model's own tokenizer")


def train(config: TrainConfig, backend: TrainBackend, resume: bool = False, overwrite: bool = False) -> None:
    rank, world = backend.start(config)
    out = Path(config.runner.output_dir)
    if out.exists() and not out.is_dir():
        raise TeleChatError(f"runner.output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out, rank)
    except OSError as error:
        raise TeleChatError(f"runner.output_dir {out}: cannot write there ({error.strerror})") from None
    try:
        _run(config, backend, rank, world, out, resume, overwrite)
    finally:
        lock.release()
        backend.finish()


def _run(config, backend, rank, world, out, resume, overwrite) -> None:
    checkpoints = out / "checkpoints"
    if rank == 0:
        prepare_output(out, resume, overwrite)
    backend.barrier()
    resume_from = read_latest(checkpoints) if resume else None
    if resume and resume_from is None:
        raise TeleChatError(f"--resume: no checkpoint in {checkpoints} (no {LATEST} pointer)")
    state = read_state(resume_from) if resume_from else None
    model_source = resume_from / "model" if resume_from else config.model.path or config.model.preset
    if config.model.path and not Path(model_source).is_dir():
        raise TeleChatError(f"model.path: {model_source} is not a model folder (nothing is downloaded: give a local "
                            f"folder with config.json and the weights)")
    model_config = TeleChatConfig.load(model_source)
    dataset = open_dataset(config, backend, model_config.pad_token_id)
    check_vocabulary(dataset, model_config, config.train_dataset.data_dir or config.train_dataset.mindrecord)
    seq_len = len(dataset[0]["input_ids"])
    plan = Plan.make(config, len(dataset))
    settings = run_settings(config, backend.name, dataset_fingerprint(dataset), plan, world)
    scaler = LossScaler.from_config(config.loss_scale)
    start = updates = 0
    if state:
        check_resume(resume_from, state, settings, plan.total_steps)
        start, updates = state["step"], state["optimizer_updates"]
        scaler = LossScaler(**state["loss_scale"])
        if rank == 0 and state["total_steps"] != plan.total_steps:
            print(f"note: the checkpoint's run was {state['total_steps']} steps, this one is {plan.total_steps}: "
                  f"the learning-rate schedule changes from here", flush=True)
    backend.build(config, model_source, resume_from)

    log = tensorboard = None
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        log = LossLogWriter(out / "loss_log.jsonl", start if state else None)
        tensorboard = _tensorboard(out)
        print(f"training {plan.total_steps} steps on {backend.name} ({plan.order.steps_per_epoch} per epoch, global "
              f"batch {plan.order.global_batch} = {config.runner.batch_size} x {world} workers x "
              f"{config.runner.gradient_accumulation_steps} accumulation), from step {start}", flush=True)

    skipped_in_a_row = 0
    for step in range(start, plan.total_steps):
        began = time.perf_counter()
        inputs = step_inputs(dataset, plan, step, rank, updates, scaler.scale, config.runner.seed)
        result = backend.step(inputs)
        elapsed = time.perf_counter() - began
        finite = math.isfinite(result.grad_norm)  # the reduction over ranks carries any worker's inf/nan to all
        updates += finite
        if not backend.manages_loss_scale:
            scaler.update(finite)
        skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
        done = step + 1
        tokens = int((inputs.global_batch["segment_ids"] > 0).sum())
        if rank == 0:
            loss = result.loss if math.isfinite(result.loss) else None
            log.write(done, loss, inputs.lr, result.grad_norm if finite else None, tokens,
                      plan.order.global_batch / elapsed, tokens / elapsed, world, seq_len, skipped=not finite)
            if tensorboard:
                for name, value in (("loss", loss), ("lr", inputs.lr), ("grad_norm", result.grad_norm),
                                    ("tokens_per_s", tokens / elapsed)):
                    if value is not None and math.isfinite(value):
                        tensorboard.add_scalar(f"train/{name}", value, done)
            if done % config.runner.log_every == 0 or done == plan.total_steps or not finite:
                print(f"step {done}/{plan.total_steps} loss {result.loss:.4f} lr {inputs.lr:.3e} grad_norm "
                      f"{result.grad_norm:.3f} {tokens / elapsed:.0f} tokens/s {elapsed:.3f} s/step"
                      + (f" skipped (non-finite gradients; loss scale now {scaler.scale:g})" if not finite else ""),
                      flush=True)
        if skipped_in_a_row == MAX_CONSECUTIVE_SKIPS:
            raise TeleChatError(f"steps {done - skipped_in_a_row + 1}-{done}: {skipped_in_a_row} optimizer steps in a "
                                f"row had non-finite gradients (loss {result.loss}), so no update was made; the run "
                                f"diverged or its data or learning rate is broken. Stopped (the last checkpoint "
                                f"is kept)")
        if done % config.runner.save_steps == 0 or done == plan.total_steps:
            save(backend, checkpoints, done, rank, config.runner.keep_last,
                 {"step": done, **dict(zip(("epoch", "batch_in_epoch"), plan.order.position(done))),
                  "total_steps": plan.total_steps,
                  "optimizer_updates": updates, "loss_scale": dataclasses.asdict(scaler), "settings": settings})

    if rank == 0:
        log.close()
        if tensorboard:
            tensorboard.close()
        final = out / "final"
        with atomic_output_dir(final, force=True) as tmp:
            backend.export(read_latest(checkpoints), tmp)
        print(f"trained {plan.total_steps} steps; final model in {final} ({', '.join(sorted(p.name for p in final.iterdir()))})",
              flush=True)
    backend.barrier()


def save(backend: TrainBackend, checkpoints: Path, step: int, rank: int, keep_last: int, state: dict) -> None:
    """Every rank writes its part into one hidden folder; rank 0 adds trainer_state.json, publishes the folder and
    moves `latest` only when all are done, so a checkpoint is either complete or absent."""
    name = checkpoint_name(step)
    partial = checkpoints / f".{name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    backend.barrier()
    try:
        backend.save(partial, rank)
    except Exception as error:  # each framework reports a full disk its own way (OSError, RuntimeError, ...)
        shutil.rmtree(partial, ignore_errors=True)
        reason = str(error) if isinstance(error, TeleChatError) else error.strerror \
            if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
        raise TeleChatError(f"{partial}: writing the step {step} checkpoint failed ({reason}); the previous "
                            f"checkpoint is kept") from None
    backend.barrier()
    if rank == 0:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        publish_dir(partial, checkpoints / name)
        write_latest(checkpoints, name, keep_last)
    backend.barrier()


def _tensorboard(out: Path):
    try:
        from tensorboard.summary import Writer
    except ImportError:  # an optional extra: the loss log has everything
        return None
    return Writer(str(out / "tensorboard"))
