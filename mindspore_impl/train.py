"""Supervised fine-tuning of TeleChat with MindSpore: one device, data parallel under msrun, or (on Ascend) tensor
parallel and optimizer sharding through MindSpore semi-auto parallel.

    python -m mindspore_impl.train --config configs/finetune_tiny.yaml [--resume] [--output-dir DIR] [--max-steps N]
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=output/msrun_log --join=True \\
        mindspore_impl/train.py --config configs/finetune_tiny.yaml

msrun runs a script path and starts each worker with the first `python` on PATH, so activate the environment
(or put .venv/bin first on PATH). parallel.data_parallel x parallel.model_parallel must equal --worker_num.

The config, schedule, data order, weight-decay rule and loss log are shared with the PyTorch trainer
(telechat_ascend/training.py); this file holds the MindSpore side. One optimizer step:
  1. every rank runs its accumulation steps; micro-batch i's mean loss is weighted by its share n_i / N of the
     global batch's N target tokens (and by the loss scale) and the gradients are summed over micro-batches;
  2. gradients and loss are summed over ranks (nn.DistributedGradReducer, mean=False: the weights already divide
     by the global N), so the loss is the token-weighted mean over the whole global batch;
  3. gradients are unscaled; a non-finite global norm skips the update (and lowers a dynamic loss scale);
     otherwise they are clipped to clip_grad and AdamW updates the fp32 master weights.
N is counted on the host from the global batch's labels, which every rank can read, so no collective is needed.

Output (runner.output_dir): loss_log.jsonl; checkpoints/step-NNNNNN/ with model/ (MindSpore folder, MindFormers
names), optimizer.ckpt (adam_m.* / adam_v.*) and trainer_state.json (step, data position, update count, loss
scale, seeds), plus checkpoints/latest; final/mindspore and final/hf (the shared converter's HF copy). Only rank 0
writes; the ranks hold identical weights.

Semi-auto parallel (parallel.model_parallel > 1 or optimizer_shard; Ascend, GRAPH mode): the model's matmuls carry
Megatron-style strategies (TelechatForCausalLM.shard) and the compiler shards the rest by propagation. The step is
one graph (ShardedStep) taking the whole global batch, with the same loss weighting, clipping, overflow skip and
AdamW; checkpoints hold each rank's slices plus the strategy file (save_shards), and final/ is merged from them with
ms.transform_checkpoints. MindSpore cannot run semi-auto parallel on CPU, so only ShardedStep's math (unsharded) and
the strategies are tested here; the sharded run itself has not been run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from mindspore_impl.model import TelechatForCausalLM
from mindspore_impl.pretrained import COMPUTE_DTYPES, from_pretrained, save_pretrained
from telechat_ascend.checkpoint import MS_CKPT, atomic_output_dir, publish_dir
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.convert import convert_checkpoint
from telechat_ascend.data import ARRAYS, PackedDataset
from telechat_ascend.errors import TeleChatError
from telechat_ascend.training import (IGNORE_INDEX, LossLogWriter, LossScaler, Plan, TrainConfig, checkpoint_name,
                                      add_run_arguments, decays, dropout_row_keys, read_latest, run_config,
                                      target_count, write_latest)


# ---- distributed setup --------------------------------------------------------------------------------------------

def setup(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size). Under msrun (MS_ROLE set) this joins the cluster: hccl on Ascend, mccl on CPU."""
    if config.context.device_target:
        ms.set_context(device_target=config.context.device_target)
    if config.model.dtype == "bf16" and ms.get_context("device_target") == "CPU":
        raise TeleChatError("model.dtype bf16: MindSpore has no bf16 CPU kernels (MatMul, Softmax ...); use fp16 or "
                            "fp32 on CPU")
    parallel = config.parallel
    if parallel.semi_auto and ms.get_context("device_target") != "Ascend":
        raise TeleChatError("parallel.model_parallel > 1 / optimizer_shard use MindSpore semi-auto parallel, which "
                            "runs on Ascend only (on CPU MindSpore refuses it: 'Invalid backend: CPU'); on CPU use "
                            "data_parallel alone")
    if parallel.semi_auto and "MS_ROLE" not in os.environ:
        raise TeleChatError("parallel.model_parallel > 1 / optimizer_shard: launch with msrun (--worker_num="
                            f"{parallel.devices}); semi-auto parallel needs the cluster")
    rank, world = 0, 1
    if "MS_ROLE" in os.environ:  # msrun also runs this script as its scheduler, whose init() never returns
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, world = get_rank(), get_group_size()
        if parallel.semi_auto:
            setup_semi_auto(config, rank, world)
        else:  # the gradient mean is ours (token-weighted), so the reducer sums
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=False,
                                         device_num=world)
    if world != parallel.devices:
        raise TeleChatError(f"parallel.data_parallel x model_parallel is {parallel.devices} but {world} worker(s) "
                            f"are running; launch msrun with --worker_num={parallel.devices}")
    return rank, world


def setup_semi_auto(config: TrainConfig, rank: int, world: int) -> None:
    """Auto parallel with sharding propagation: the model's key operators carry strategies (model.shard) and the
    compiler derives the rest; every rank feeds the whole global batch (full_batch) and the compiler takes each
    rank's part. optimizer_shard splits the AdamW moments and update over the data-parallel ranks. The strategy
    file (needed to merge the sharded checkpoints) goes to output_dir/strategy/; merging reads every rank's slices,
    so on several nodes output_dir must be shared storage."""
    ms.set_context(mode=ms.GRAPH_MODE)
    strategy = Path(config.runner.output_dir) / "strategy" / f"rank_{rank}.ckpt"
    strategy.parent.mkdir(parents=True, exist_ok=True)
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.AUTO_PARALLEL, search_mode="sharding_propagation",
                                 device_num=world, full_batch=True, gradients_mean=False,
                                 enable_parallel_optimizer=config.parallel.optimizer_shard,
                                 strategy_ckpt_config={"save_file": str(strategy), "only_trainable_params": False})


# ---- data ---------------------------------------------------------------------------------------------------------

class MindRecordRows:
    """A MindFormers .mindrecord (int32 input_ids and labels of seq_len + 1, as `prepare-data --mindrecord` writes)
    as rows like PackedDataset's, held in memory. MindFormers trains token t on labels[t + 1] unless token t is
    padding, and attends across the whole row. The rows keep all seq_len + 1 tokens (the last one predicts nothing),
    so every one of those pairs is trained: labels stay aligned, masked after a pad token; one segment per row."""

    def __init__(self, path: str | Path, pad_id: int):
        from mindspore.mindrecord import FileReader
        if not Path(path).is_file():
            raise TeleChatError(f"train_dataset.mindrecord: {path} not found")
        reader = FileReader(str(path), num_consumer=1, columns=["input_ids", "labels"])
        rows = list(reader.get_next())
        reader.close()
        ids = np.stack([r["input_ids"] for r in rows]).astype(np.int32)
        labels = np.stack([r["labels"] for r in rows]).astype(np.int32)
        after_pad = np.concatenate([np.zeros_like(ids[:, :1], bool), ids[:, :-1] == pad_id], 1)
        self.arrays = {"input_ids": ids, "labels": np.where(after_pad, IGNORE_INDEX, labels),
                       "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape),
                       "segment_ids": np.ones_like(ids)}

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {name: array[i] for name, array in self.arrays.items()}


def open_dataset(config: TrainConfig, pad_id: int):
    if config.train_dataset.data_dir is not None:
        return PackedDataset(config.train_dataset.data_dir)
    return MindRecordRows(config.train_dataset.mindrecord, pad_id)


def stack_rows(dataset, rows) -> dict[str, np.ndarray]:
    return {name: np.stack([dataset[i][name] for i in rows]) for name in ARRAYS}


# ---- model --------------------------------------------------------------------------------------------------------

def build_model(config: TrainConfig, checkpoint: Path | None, sharded_checkpoint: bool) -> TelechatForCausalLM:
    """The model to train: the checkpoint's when resuming, else the config's folder or a new preset model (seeded,
    so every rank draws the same initial weights)."""
    dtype = config.model.dtype
    if sharded_checkpoint:
        # The weights are the checkpoint's per-rank slices, loaded once the sharded step is compiled (load_shards).
        model = TelechatForCausalLM(TeleChatConfig.load(checkpoint / "model"), COMPUTE_DTYPES[dtype])
    elif checkpoint is not None:
        model = from_pretrained(checkpoint / "model", dtype)
    elif config.model.path is not None:
        model = from_pretrained(config.model.path, dtype)
    else:
        ms.set_seed(config.runner.seed)
        model = TelechatForCausalLM(TeleChatConfig.preset(config.model.preset), COMPUTE_DTYPES[dtype])
    config.parallel.check_model(model.config)
    if config.parallel.semi_auto:
        model.shard(config.parallel.data_parallel, config.parallel.model_parallel)
    if config.recompute:
        for layer in model.model.layers:
            layer.recompute()
    model.set_train(True)
    return model


# ---- optimizer ----------------------------------------------------------------------------------------------------

class AdamW(nn.Cell):
    """torch.optim.AdamW's update: bias-corrected moments, decoupled weight decay. (nn.AdamWeightDecay has no bias
    correction, so its first steps are ~0.45x as large with beta2 0.95, and the PyTorch trainer would differ.)
    Moments are named as MindFormers names them: adam_m.<param>, adam_v.<param>. The scalars that depend on the
    step come from the host, computed as torch computes them (adamw_scalars). `apply` (a bool tensor) makes the
    update conditional inside a graph: where it is false, parameters and moments keep their values."""

    def __init__(self, params, betas: list[float], eps: float):
        super().__init__()
        self.params = ParameterTuple(params)
        self.moments1 = self.params.clone(prefix="adam_m", init="zeros")
        self.moments2 = self.params.clone(prefix="adam_v", init="zeros")
        self.decay = tuple(decays(p.shape) for p in params)
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps

    def construct(self, grads, decay_factor, step_size, bias_correction2_sqrt, apply=None):
        for param, m, v, grad, decay in zip(self.params, self.moments1, self.moments2, grads, self.decay):
            m_new = m + (grad - m) * (1.0 - self.beta1)
            v_new = v * self.beta2 + grad * grad * (1.0 - self.beta2)
            p_new = param * decay_factor if decay else param
            p_new = p_new - step_size * m_new / (ops.sqrt(v_new) / bias_correction2_sqrt + self.eps)
            if apply is not None:
                m_new, v_new, p_new = ops.select(apply, m_new, m), ops.select(apply, v_new, v), \
                    ops.select(apply, p_new, param)
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(param, p_new)


def adamw_scalars(lr: float, weight_decay: float, betas: list[float], t: int) -> tuple[Tensor, Tensor, Tensor]:
    """(1 - lr·wd, lr / (1 - β1^t), sqrt(1 - β2^t)) for the t-th update (1-based), in float64 as torch does."""
    values = 1.0 - lr * weight_decay, lr / (1.0 - betas[0] ** t), math.sqrt(1.0 - betas[1] ** t)
    return tuple(Tensor(v, ms.float32) for v in values)


# ---- the step -----------------------------------------------------------------------------------------------------

class WeightedLoss(nn.Cell):
    """The model's mean loss times `weight` (a micro-batch's share of the global batch's target tokens, times the
    loss scale). A Cell rather than a closure over the model, which is what MindSpore's graph compiler parses best."""

    def __init__(self, model: TelechatForCausalLM):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, cos, sin, segment_ids, labels, dropout_keys, weight):
        return self.model(input_ids, cos, sin, segment_ids, labels, None, dropout_keys) * weight


class StepFunctions:
    """The device side of an optimizer step, compiled with ms.jit unless context.mode is PYNATIVE:
    grad(inputs..., dropout_keys, weight) -> (weighted loss, grads); accumulate; finish (sum over ranks, unscale,
    norm, clip); update (AdamW)."""

    def __init__(self, model: TelechatForCausalLM, optimizer: AdamW, world: int, clip: float | None, graph: bool):
        hyper_map = ops.HyperMap()

        grad_fn = ms.value_and_grad(WeightedLoss(model), None, optimizer.params)
        if world > 1:
            from mindspore.communication import GlobalComm
            reducer = nn.DistributedGradReducer(optimizer.params, mean=False, group=GlobalComm.WORLD_COMM_GROUP)
            all_reduce = ops.AllReduce(group=GlobalComm.WORLD_COMM_GROUP)

            def sum_over_ranks(loss, grads):
                return all_reduce(loss), reducer(grads)
        else:
            def sum_over_ranks(loss, grads):
                return loss, grads

        def grad(input_ids, cos, sin, segment_ids, labels, dropout_keys, weight):
            return grad_fn(input_ids, cos, sin, segment_ids, labels, dropout_keys, weight)

        def accumulate(loss, grads, more_loss, more_grads):
            return loss + more_loss, hyper_map(ops.add, grads, more_grads)

        def finish(loss, grads, inv_scale):
            return unscale_and_clip(*sum_over_ranks(loss, grads), inv_scale, clip, hyper_map)

        def update(grads, decay_factor, step_size, bias_correction2_sqrt):
            optimizer(grads, decay_factor, step_size, bias_correction2_sqrt)

        compile_ = _compiled if graph else (lambda f: f)
        self.grad, self.accumulate, self.finish, self.update = map(compile_, (grad, accumulate, finish, update))


def unscale_and_clip(loss, grads, inv_scale, clip: float | None, hyper_map):
    """(loss, grads, global norm before clipping), unscaled by inv_scale, grads clipped to norm `clip`."""
    grads = hyper_map(ops.partial(ops.mul, inv_scale), grads)
    norm = ops.sqrt(ops.addn([ops.square(g).sum() for g in grads]))
    if clip is not None:
        grads = hyper_map(ops.partial(ops.mul, ops.minimum(clip / (norm + 1e-6), 1.0)), grads)
    return loss * inv_scale, grads, norm


class ShardedStep(nn.Cell):
    """The whole optimizer step as one graph, for semi-auto parallel: loss, gradients, norm, clipping and the AdamW
    update (applied only when the norm is finite). Gradients never leave the graph, since outside it a sharded
    gradient is only this rank's slice; inside it the compiler adds the collectives (gradient sums over data-parallel
    ranks, norm sums over shards). Takes the whole global batch (full_batch) with weight = loss scale; returns the
    unscaled loss and the norm. The same math as StepFunctions; on CPU it runs unsharded (tested there)."""

    def __init__(self, model: TelechatForCausalLM, optimizer: AdamW, clip: float | None):
        super().__init__(auto_prefix=False)
        self.loss, self.optimizer, self.clip = WeightedLoss(model), optimizer, clip
        self.grad_fn = ms.value_and_grad(self.loss, None, optimizer.params)
        self.hyper_map = ops.HyperMap()

    def construct(self, input_ids, cos, sin, segment_ids, labels, dropout_keys, weight, inv_scale, decay_factor,
                  step_size, bias_correction2_sqrt):
        loss, grads = self.grad_fn(input_ids, cos, sin, segment_ids, labels, dropout_keys, weight)
        loss, grads, norm = unscale_and_clip(loss, grads, inv_scale, self.clip, self.hyper_map)
        self.optimizer(grads, decay_factor, step_size, bias_correction2_sqrt, ops.isfinite(norm))
        return loss, norm


def _compiled(fn):
    """ms.jit(fn), with tuple arguments (the gradients) passed as variables: a plain tuple of tensors is a constant
    of the graph, which would recompile it at every call."""
    compiled = ms.jit(fn)
    return lambda *args: compiled(*(ms.mutable(a) if isinstance(a, tuple) else a for a in args))


# ---- checkpointing ------------------------------------------------------------------------------------------------

def save_checkpoint(checkpoints: Path, step: int, keep_last: int, model, optimizer: AdamW, state: dict) -> None:
    name = checkpoint_name(step)
    with atomic_output_dir(checkpoints / name, force=True) as tmp:
        save_pretrained(model, tmp / "model")
        moments = [{"name": p.name, "data": p} for p in (*optimizer.moments1, *optimizer.moments2)]
        ms.save_checkpoint(moments, str(tmp / "optimizer.ckpt"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    write_latest(checkpoints, name, keep_last)


def save_shards(checkpoints: Path, step: int, keep_last: int, model, optimizer: AdamW, state: dict, rank: int,
                strategy: Path) -> None:
    """Semi-auto parallel checkpoint, MindFormers' layout: every rank saves the slices it holds
    (model_shards/rank_{r}/model.ckpt, optimizer_shards/rank_{r}/optimizer.ckpt); rank 0 adds model/config.json,
    the strategy file that maps slices to full tensors, and trainer_state.json. All write into a hidden folder that
    rank 0 renames, and `latest` moves, only once every rank has finished."""
    from mindspore.communication.comm_func import barrier
    name = checkpoint_name(step)
    partial = checkpoints / f".{name}.partial"
    for kind, parameters in (("model", model.get_parameters()),
                             ("optimizer", (*optimizer.moments1, *optimizer.moments2))):
        folder = partial / f"{kind}_shards" / f"rank_{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], str(folder / f"{kind}.ckpt"),
                           integrated_save=False)
    barrier()
    if rank == 0:
        (partial / "model").mkdir()
        model.config.save(partial / "model")
        shutil.copy(strategy, partial / "strategy.ckpt")
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        publish_dir(partial, checkpoints / name)
        write_latest(checkpoints, name, keep_last)
    barrier()


def load_shards(folder: Path, model, optimizer: AdamW, rank: int) -> None:
    """This rank's slices from a semi-auto checkpoint, into parameters already sliced by compiling the step."""
    for kind, cell in (("model", model), ("optimizer", optimizer)):
        path = folder / f"{kind}_shards" / f"rank_{rank}" / f"{kind}.ckpt"
        if not path.is_file():
            raise TeleChatError(f"{path} not found: resume with the parallel settings the checkpoint was written with")
        not_loaded, _ = ms.load_param_into_net(cell, ms.load_checkpoint(str(path)), strict_load=True)
        if not_loaded:
            raise TeleChatError(f"{path}: no {not_loaded[0]} (and {len(not_loaded) - 1} more)")


def export_shards(folder: Path, out: Path) -> None:
    """out/final from a semi-auto checkpoint: its slices merged into one MindSpore checkpoint by
    ms.transform_checkpoints (through the strategy file), then the HF copy."""
    with atomic_output_dir(out, force=True) as tmp:
        merged = tmp / "merged"
        ms.transform_checkpoints(str(folder / "model_shards"), str(merged), "telechat",
                                 str(folder / "strategy.ckpt"), None)
        (tmp / "mindspore").mkdir()
        os.replace(merged / "rank_0" / "telechat0.ckpt", tmp / "mindspore" / MS_CKPT)
        shutil.rmtree(merged)
        shutil.copy(folder / "model" / "config.json", tmp / "mindspore" / "config.json")
        convert_checkpoint(tmp / "mindspore", tmp / "hf", to="hf")


def trainer_state(step: int, plan: Plan, updates: int, scaler: LossScaler, world: int,
                  config: TrainConfig) -> dict:
    """What resuming needs besides weights and moments. The data position follows from the step (DataOrder is a
    pure function of it); epoch and batch_in_epoch are recorded for people."""
    epoch, index = plan.order.position(step)
    return {"step": step, "epoch": epoch, "batch_in_epoch": index, "total_steps": plan.total_steps,
            "optimizer_updates": updates, "loss_scale": dataclasses.asdict(scaler), "world_size": world,
            "parallel": dataclasses.asdict(config.parallel),
            "data": {"rows": plan.order.num_rows, "global_batch": plan.order.global_batch, "seed": plan.order.seed}}


def load_trainer_state(folder: Path, plan: Plan) -> dict:
    """The checkpoint's trainer state, checked against this run's data order (rows, global batch, seed): resuming
    with another order would silently train on other data."""
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    order = plan.order
    for key, now in (("rows", order.num_rows), ("global_batch", order.global_batch), ("seed", order.seed)):
        if state["data"][key] != now:
            raise TeleChatError(f"{folder}: the checkpoint was trained with data {key} {state['data'][key]}, this "
                                f"run has {now}; resume with the same dataset, global batch and seed")
    return state


def load_moments(folder: Path, optimizer: AdamW) -> None:
    saved = ms.load_checkpoint(str(folder / "optimizer.ckpt"))
    for moment in (*optimizer.moments1, *optimizer.moments2):
        if moment.name not in saved:
            raise TeleChatError(f"{folder / 'optimizer.ckpt'}: no {moment.name}")
        moment.set_data(saved[moment.name])


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for parameter in model.get_parameters():
        digest.update(parameter.name.encode())
        digest.update(parameter.asnumpy().tobytes())
    return digest.hexdigest()


# ---- the loop -----------------------------------------------------------------------------------------------------

def train(config: TrainConfig, resume: bool = False) -> None:
    rank, world = setup(config)
    out = Path(config.runner.output_dir)
    checkpoints = out / "checkpoints"
    resume_from = read_latest(checkpoints)
    if resume and resume_from is None:
        raise TeleChatError(f"--resume: no checkpoint in {checkpoints}")
    if not resume and resume_from is not None:
        raise TeleChatError(f"{out} already holds checkpoints; pass --resume to continue, or choose another "
                            f"runner.output_dir")

    model_source = resume_from / "model" if resume_from else config.model.path or config.model.preset
    dataset = open_dataset(config, TeleChatConfig.load(model_source).pad_token_id)
    seq_len = len(dataset[0]["input_ids"])
    plan = Plan.make(config, len(dataset))
    state = load_trainer_state(resume_from, plan) if resume_from else None
    if state and state["total_steps"] != plan.total_steps:
        print(f"note: the checkpoint's run was {state['total_steps']} steps, this one is {plan.total_steps}: the "
              f"learning-rate schedule changes from here")

    parallel = config.parallel
    sharded_checkpoint = resume_from is not None and (resume_from / "model_shards").is_dir()
    if sharded_checkpoint and state["parallel"] != dataclasses.asdict(parallel):
        raise TeleChatError(f"{resume_from} holds per-rank slices written with parallel settings {state['parallel']}; "
                            f"resume with those (or merge the slices with ms.transform_checkpoints)")
    model = build_model(config, resume_from, sharded_checkpoint)
    optimizer = AdamW(model.trainable_params(), config.optimizer.betas, config.optimizer.eps)
    scaler = LossScaler.from_config(config.loss_scale)
    start, updates = 0, 0
    if state:
        if not sharded_checkpoint:
            load_moments(resume_from, optimizer)
        start, updates = state["step"], state["optimizer_updates"]
        scaler = LossScaler(**state["loss_scale"])
    # Dropout masks are keyed by (seed, step, row) (dropout_row_keys), except on Ascend, where the device kernels draw
    # them from a stream seeded here per rank and (re)start: those kernels keep a state no API saves, so there a
    # resumed run with dropout differs from an uninterrupted one.
    ms.set_seed(int(np.random.SeedSequence([config.runner.seed, rank, start]).generate_state(1)[0]) % 2 ** 31)
    if parallel.semi_auto:
        sharded = ShardedStep(model, optimizer, config.clip_grad)
        strategy = out / "strategy" / f"rank_{rank}.ckpt"  # written by the compiler (setup_semi_auto)
    else:
        steps = StepFunctions(model, optimizer, world, config.clip_grad, config.context.mode == "GRAPH")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        log = LossLogWriter(out / "loss_log.jsonl", start if state else None)
        print(f"training {plan.total_steps} steps ({plan.order.steps_per_epoch} per epoch, global batch "
              f"{plan.order.global_batch} = {config.runner.batch_size} x {world} workers x "
              f"{config.runner.gradient_accumulation_steps} accumulation), from step {start}", flush=True)

    for step in range(start, plan.total_steps):
        began = time.perf_counter()
        global_row_ids = plan.order.global_rows(step)
        global_rows = stack_rows(dataset, global_row_ids)
        total_targets = max(target_count(global_rows["labels"]), 1)
        tokens = int((global_rows["segment_ids"] > 0).sum())
        lr = plan.lr(step)
        inv_scale = Tensor(1.0 / scaler.scale, ms.float32)
        # The scalars of the update this step makes if its gradients are finite.
        scalars = adamw_scalars(lr, config.optimizer.weight_decay, config.optimizer.betas, updates + 1)
        if parallel.semi_auto:  # every rank feeds the whole global batch; its weight is the loss scale alone
            cos, sin = model.rope(global_rows["position_ids"], seq_len)
            inputs = (Tensor(global_rows["input_ids"]), cos, sin, Tensor(global_rows["segment_ids"]),
                      Tensor(global_rows["labels"]), Tensor(dropout_row_keys(config.runner.seed, step, global_row_ids)),
                      Tensor(scaler.scale, ms.float32), inv_scale, *scalars)
            if sharded_checkpoint and step == start:  # parameters take their sliced shapes when the step compiles
                sharded.compile(*inputs)
                load_shards(resume_from, model, optimizer, rank)
            loss, norm = sharded(*inputs)  # updates the weights itself when the norm is finite
        else:
            loss = grads = None
            for rows in plan.order.micro_batches(step, rank):
                batch = stack_rows(dataset, rows)
                cos, sin = model.rope(batch["position_ids"], seq_len)
                weight = Tensor(target_count(batch["labels"]) / total_targets * scaler.scale, ms.float32)
                micro = steps.grad(Tensor(batch["input_ids"]), cos, sin, Tensor(batch["segment_ids"]),
                                   Tensor(batch["labels"]), Tensor(dropout_row_keys(config.runner.seed, step, rows)),
                                   weight)
                loss, grads = micro if grads is None else steps.accumulate(loss, grads, *micro)
            loss, grads, norm = steps.finish(loss, grads, inv_scale)
        loss, norm = float(loss), float(norm)
        finite = math.isfinite(norm)  # the sum over ranks carries any worker's inf/nan into every rank's norm
        if finite:
            updates += 1
            if not parallel.semi_auto:
                steps.update(grads, *scalars)
        scaler.update(finite)
        if ms.get_context("device_target") != "CPU":  # CPU kernels run synchronously; elsewhere time the whole step
            ms.runtime.synchronize()
        elapsed = time.perf_counter() - began
        done = step + 1

        if rank == 0:
            log.write(done, loss if math.isfinite(loss) else None, lr, norm if finite else None, tokens,
                      plan.order.global_batch / elapsed, tokens / elapsed, world, seq_len, skipped=not finite)
            if done % config.runner.log_every == 0 or done == plan.total_steps:
                print(f"step {done}/{plan.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
                      f"{tokens / elapsed:.0f} tokens/s {elapsed:.3f} s/step"
                      + (f" skipped (overflow; loss scale now {scaler.scale:g})" if not finite else ""), flush=True)
        if done % config.runner.save_steps == 0 or done == plan.total_steps:
            saved = trainer_state(done, plan, updates, scaler, world, config)
            if parallel.semi_auto:  # every rank saves its slices
                save_shards(checkpoints, done, config.runner.keep_last, model, optimizer, saved, rank, strategy)
            elif rank == 0:
                save_checkpoint(checkpoints, done, config.runner.keep_last, model, optimizer, saved)

    print(f"rank {rank}: final weights sha256 {weights_digest(model)}", flush=True)
    if rank == 0:
        log.close()
        if parallel.semi_auto:
            export_shards(read_latest(checkpoints), out / "final")
        else:
            with atomic_output_dir(out / "final", force=True) as tmp:
                save_pretrained(model, tmp / "mindspore")
                convert_checkpoint(tmp / "mindspore", tmp / "hf", to="hf")
        print(f"saved {out / 'final'} (mindspore/ and hf/)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mindspore_impl.train", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        train(run_config(args), args.resume)
    except TeleChatError as error:
        print(f"mindspore_impl.train: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
