"""Supervised fine-tuning of TeleChat with MindSpore: one device, data parallel under msrun, or (on Ascend) tensor
parallel and optimizer sharding through MindSpore semi-auto parallel.

    python -m mindspore_impl.train --config configs/finetune_tiny.yaml [--resume] [--output-dir DIR] [--max-steps N]
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=output/msrun_log --join=True \\
        mindspore_impl/train.py --config configs/finetune_tiny.yaml

msrun runs a script path and starts each worker with the first `python` on PATH, so activate the environment
(or put .venv/bin first on PATH). parallel.data_parallel x parallel.model_parallel must equal --worker_num.

The loop, output folder, resume, data order and loss log are the shared ones (telechat_ascend/trainer.py, run by
both trainers); this file holds the MindSpore side. One optimizer step:
  1. every rank runs its accumulation steps; micro-batch i's mean loss is weighted by its share n_i / N of the
     global batch's N target tokens (and by the loss scale) and the gradients are summed over micro-batches;
  2. gradients and loss are summed over ranks (nn.DistributedGradReducer, mean=False: the weights already divide
     by the global N), so the loss is the token-weighted mean over the whole global batch;
  3. gradients are unscaled; a non-finite global norm skips the update (and lowers a dynamic loss scale);
     otherwise they are clipped to clip_grad and AdamW updates the fp32 master weights.
N is counted on the host from the global batch's labels, which every rank can read, so no collective is needed.

Checkpoint files (checkpoints/step-NNNNNN/): model/ (MindSpore folder, MindFormers names) and optimizer.ckpt
(adam_m.* / adam_v.*), written by rank 0 (the ranks hold identical weights); final/mindspore beside final/hf.

Semi-auto parallel (parallel.model_parallel > 1 or optimizer_shard; Ascend, GRAPH mode): the model's matmuls carry
Megatron-style strategies (TelechatForCausalLM.shard) and the compiler shards the rest by propagation. The step is
one graph (ShardedStep) taking the whole global batch, with the same loss weighting, clipping, overflow skip and
AdamW; checkpoints hold each rank's slices plus the strategy file (save_shards), and final/ is merged from them with
ms.transform_checkpoints. MindSpore cannot run semi-auto parallel on CPU, so only ShardedStep's math (unsharded) and
the strategies are tested here; the sharded run itself has not been run.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from mindspore_impl.model import TelechatForCausalLM
from mindspore_impl.pretrained import COMPUTE_DTYPES, from_pretrained, save_pretrained
from telechat_ascend.checkpoint import MS_CKPT
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.convert import convert_checkpoint
from telechat_ascend.errors import TeleChatError
from telechat_ascend.trainer import StepInputs, StepResult, train
from telechat_ascend.training import IGNORE_INDEX, TrainConfig, add_run_arguments, decays, run_config


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
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        self.fingerprint = digest.hexdigest()  # what a resumed run must train on again
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


# ---- model --------------------------------------------------------------------------------------------------------

def build_model(config: TrainConfig, source, sharded_checkpoint: Path | None) -> TelechatForCausalLM:
    """The model to train: from a folder (a checkpoint's model/ when resuming) or a new preset model (seeded, so
    every rank draws the same initial weights)."""
    dtype = config.model.dtype
    if sharded_checkpoint is not None:
        # The weights are the checkpoint's per-rank slices, loaded once the sharded step is compiled (load_shards).
        model = TelechatForCausalLM(TeleChatConfig.load(source), COMPUTE_DTYPES[dtype])
    elif Path(source).is_dir():
        model = from_pretrained(source, dtype)
    else:
        ms.set_seed(config.runner.seed)
        model = TelechatForCausalLM(TeleChatConfig.preset(source), COMPUTE_DTYPES[dtype])
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

def save_shards(folder: Path, model, optimizer: AdamW, rank: int, strategy: Path) -> None:
    """Semi-auto parallel checkpoint, MindFormers' layout: every rank saves the slices it holds
    (model_shards/rank_{r}/model.ckpt, optimizer_shards/rank_{r}/optimizer.ckpt); rank 0 adds model/config.json and
    the strategy file that maps slices to full tensors."""
    for kind, parameters in (("model", model.get_parameters()),
                             ("optimizer", (*optimizer.moments1, *optimizer.moments2))):
        shard = folder / f"{kind}_shards" / f"rank_{rank}"
        shard.mkdir(parents=True, exist_ok=True)
        ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], str(shard / f"{kind}.ckpt"),
                           integrated_save=False)
    if rank == 0:
        (folder / "model").mkdir()
        model.config.save(folder / "model")
        shutil.copy(strategy, folder / "strategy.ckpt")


def load_shards(folder: Path, model, optimizer: AdamW, rank: int) -> None:
    """This rank's slices from a semi-auto checkpoint, into parameters already sliced by compiling the step."""
    for kind, cell in (("model", model), ("optimizer", optimizer)):
        path = folder / f"{kind}_shards" / f"rank_{rank}" / f"{kind}.ckpt"
        if not path.is_file():
            raise TeleChatError(f"{path} not found: resume with the parallel settings the checkpoint was written with")
        not_loaded, _ = ms.load_param_into_net(cell, _read_ckpt(path), strict_load=True)
        if not_loaded:
            raise TeleChatError(f"{path}: no {not_loaded[0]} (and {len(not_loaded) - 1} more)")


def export_shards(folder: Path, final: Path) -> None:
    """final/mindspore from a semi-auto checkpoint: its slices merged into one MindSpore checkpoint by
    ms.transform_checkpoints (through the strategy file); final/hf is converted from it."""
    merged = final / "merged"
    ms.transform_checkpoints(str(folder / "model_shards"), str(merged), "telechat", str(folder / "strategy.ckpt"),
                             None)
    (final / "mindspore").mkdir()
    os.replace(merged / "rank_0" / "telechat0.ckpt", final / "mindspore" / MS_CKPT)
    shutil.rmtree(merged)
    shutil.copy(folder / "model" / "config.json", final / "mindspore" / "config.json")


def _read_ckpt(path: Path) -> dict:
    try:
        return ms.load_checkpoint(str(path))
    except (RuntimeError, ValueError, OSError) as error:  # MindSpore's error for a damaged or truncated file
        raise TeleChatError(f"{path}: unreadable MindSpore checkpoint ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None


def load_moments(folder: Path, optimizer: AdamW) -> None:
    saved = _read_ckpt(folder / "optimizer.ckpt")
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


# ---- the backend --------------------------------------------------------------------------------------------------

class MindSporeBackend:
    """The MindSpore side of the shared training loop (telechat_ascend.trainer.TrainBackend)."""
    name = "mindspore"
    manages_loss_scale = False

    def start(self, config: TrainConfig) -> tuple[int, int]:
        self.config = config
        self.rank, self.world = setup(config)
        self.model = None
        return self.rank, self.world

    def open_dataset(self, config: TrainConfig, pad_id: int) -> MindRecordRows:
        return MindRecordRows(config.train_dataset.mindrecord, pad_id)

    def build(self, config: TrainConfig, model_source, checkpoint: Path | None) -> None:
        sharded = checkpoint if checkpoint is not None and (checkpoint / "model_shards").is_dir() else None
        self.model = build_model(config, model_source, sharded)
        self.optimizer = AdamW(self.model.trainable_params(), config.optimizer.betas, config.optimizer.eps)
        self.pending_shards = sharded
        if checkpoint is not None and sharded is None:
            load_moments(checkpoint, self.optimizer)
        self.seeded = False
        if config.parallel.semi_auto:
            self.sharded = ShardedStep(self.model, self.optimizer, config.clip_grad)
            self.strategy = Path(config.runner.output_dir) / "strategy" / f"rank_{self.rank}.ckpt"  # setup_semi_auto
        else:
            self.steps = StepFunctions(self.model, self.optimizer, self.world, config.clip_grad, config.context.graph)

    def step(self, inputs: StepInputs) -> StepResult:
        if not self.seeded:
            # Dropout masks are keyed by (seed, step, row) (dropout_keys), except on Ascend, where the device kernels
            # draw them from this stream: they keep a state no API saves, so there a resumed run with dropout
            # differs from an uninterrupted one.
            ms.set_seed(inputs.seed)
            self.seeded = True
        config, model = self.config, self.model
        optimizer_config = config.optimizer
        inv_scale = Tensor(1.0 / inputs.loss_scale, ms.float32)
        # The scalars of the update this step makes if its gradients are finite.
        scalars = adamw_scalars(inputs.lr, optimizer_config.weight_decay, optimizer_config.betas, inputs.update_number)
        if config.parallel.semi_auto:  # every rank feeds the whole global batch; its weight is the loss scale alone
            batch = inputs.global_batch
            cos, sin = model.rope(batch["position_ids"], batch["input_ids"].shape[1])
            args = (Tensor(batch["input_ids"]), cos, sin, Tensor(batch["segment_ids"]), Tensor(batch["labels"]),
                    Tensor(batch["dropout_keys"]), Tensor(inputs.loss_scale, ms.float32), inv_scale, *scalars)
            if self.pending_shards is not None:  # parameters take their sliced shapes when the step compiles
                self.sharded.compile(*args)
                load_shards(self.pending_shards, model, self.optimizer, self.rank)
                self.pending_shards = None
            loss, norm = self.sharded(*args)  # updates the weights itself when the norm is finite
        else:
            loss = grads = None
            for batch in inputs.micro_batches:
                cos, sin = model.rope(batch["position_ids"], batch["input_ids"].shape[1])
                micro = self.steps.grad(Tensor(batch["input_ids"]), cos, sin, Tensor(batch["segment_ids"]),
                                        Tensor(batch["labels"]), Tensor(batch["dropout_keys"]),
                                        Tensor(batch["weight"] * inputs.loss_scale, ms.float32))
                loss, grads = micro if grads is None else self.steps.accumulate(loss, grads, *micro)
            loss, grads, norm = self.steps.finish(loss, grads, inv_scale)
            if math.isfinite(float(norm)):
                self.steps.update(grads, *scalars)
        if ms.get_context("device_target") != "CPU":  # CPU kernels run synchronously; elsewhere time the whole step
            ms.runtime.synchronize()
        return StepResult(float(loss), float(norm))

    def save(self, folder: Path, rank: int) -> None:
        if self.config.parallel.semi_auto:  # every rank saves its slices
            save_shards(folder, self.model, self.optimizer, rank, self.strategy)
        elif rank == 0:
            save_pretrained(self.model, folder / "model")
            moments = [{"name": p.name, "data": p} for p in (*self.optimizer.moments1, *self.optimizer.moments2)]
            ms.save_checkpoint(moments, str(folder / "optimizer.ckpt"))

    def export(self, checkpoint: Path, final: Path) -> None:
        if (checkpoint / "model_shards").is_dir():
            export_shards(checkpoint, final)
        else:
            shutil.copytree(checkpoint / "model", final / "mindspore")
        convert_checkpoint(final / "mindspore", final / "hf", to="hf")

    def barrier(self) -> None:
        if self.world > 1:  # MindSpore's Barrier op has no CPU kernel; a one-element all-reduce waits for all as well
            from mindspore.communication import GlobalComm
            ops.AllReduce(group=GlobalComm.WORLD_COMM_GROUP)(Tensor(np.zeros(1, np.float32))).asnumpy()

    def finish(self) -> None:
        if self.model is not None:
            print(f"rank {self.rank}: final weights sha256 {weights_digest(self.model)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mindspore_impl.train", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        train(run_config(args), MindSporeBackend(), args.resume, args.overwrite)
    except TeleChatError as error:
        print(f"mindspore_impl.train: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
