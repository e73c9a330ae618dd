"""Supervised fine-tuning of TeleChat with PyTorch: one process, or torchrun with DDP or DeepSpeed ZeRO-1/2/3.

    python -m pytorch_npu.train --device cpu --config configs/finetune_tiny.yaml
    torchrun --nproc_per_node 8 -m pytorch_npu.train --device npu --config CONFIG.yaml [--deepspeed ds.json]

The config, schedule, data order, weight-decay rule, loss scale and loss log are those of the MindSpore trainer
(telechat_ascend/training.py), so one YAML gives the same run on either backend. One optimizer step:
  1. each rank runs its accumulation steps; micro-batch i's mean loss is weighted by n_i / N (its share of the
     global batch's N target tokens, counted on the host from the labels every rank can read);
  2. DDP and DeepSpeed average gradients over ranks (and DeepSpeed over accumulation steps), so the backward loss is
     multiplied back by the world size (and the accumulation steps): the gradient is that of the token-weighted
     mean loss of the whole global batch, whatever the split into ranks and micro-batches;
  3. clipping to clip_grad on the global norm, AdamW (torch.optim.AdamW; decay on matrices only), the cosine
     learning rate of the step. fp16 (DDP) uses the shared dynamic loss scale and skips overflowing steps; with
     DeepSpeed its own fp16 loss scaler does.
Output (runner.output_dir): loss_log.jsonl, tensorboard/, checkpoints/step-NNNNNN/ (model/ as an HF folder,
optimizer.pt or the DeepSpeed checkpoint, trainer_state.json), checkpoints/latest, and final/hf.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pytorch_npu.configuration_telechat import TelechatConfig
from pytorch_npu.device import dist_backend, resolve_device, resolve_dtype
from pytorch_npu.modeling_telechat import TelechatForCausalLM
from telechat_ascend.checkpoint import atomic_output_dir
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.data import PackedDataset
from telechat_ascend.errors import TeleChatError
from telechat_ascend.throughput import PEAK_TFLOPS, flops_per_token
from telechat_ascend.training import (LossLogWriter, LossScaler, Plan, TrainConfig, add_run_arguments,
                                      checkpoint_name, decays, read_latest, run_config, target_count, write_latest)

ARRAYS = ("input_ids", "labels", "position_ids", "segment_ids")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ---- setup --------------------------------------------------------------------------------------------------------

def setup(device_spec: str, config: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world). Under torchrun (WORLD_SIZE set) joins the process group: hccl, nccl or gloo."""
    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.parallel.semi_auto:
        raise TeleChatError("parallel.model_parallel and optimizer_shard are MindSpore semi-auto parallel settings; "
                            "the PyTorch trainer shards with DeepSpeed ZeRO (--deepspeed configs/deepspeed_zero3.json)")
    if world != config.parallel.data_parallel:
        raise TeleChatError(f"parallel.data_parallel is {config.parallel.data_parallel} but {world} process(es) run "
                            f"(torchrun --nproc_per_node and parallel.data_parallel must agree)")
    if world > 1:
        dist.init_process_group(dist_backend(device))
    return device, (dist.get_rank() if world > 1 else 0), world


def open_dataset(config: TrainConfig) -> PackedDataset:
    if config.train_dataset.data_dir is None:
        raise TeleChatError("train_dataset.data_dir: the PyTorch trainer reads prepare-data shards (MindRecord input "
                            "is for the MindSpore trainer)")
    return PackedDataset(config.train_dataset.data_dir)


def build_model(config: TrainConfig, source: Path | None, device: torch.device) -> TelechatForCausalLM:
    """Parameters in fp32 (master weights); fp16/bf16 compute comes from autocast or DeepSpeed."""
    if source is not None:
        model = TelechatForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        torch.manual_seed(config.runner.seed)  # every rank draws the same initial weights
        model = TelechatForCausalLM(TelechatConfig(**TeleChatConfig.preset(config.model.preset).to_dict()))
    if config.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if decays(tuple(p.shape))], "weight_decay": config.optimizer.weight_decay},
              {"params": [p for p in params if not decays(tuple(p.shape))], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                             eps=config.optimizer.eps)


# ---- one optimizer step ------------------------------------------------------------------------------------------

def batch_arrays(dataset: PackedDataset, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.stack([dataset[i][name] for i in rows]).astype(np.int64)).to(device)
            for name in ARRAYS}


def micro_loss(model, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    with autocast:
        return model(batch["input_ids"], attention_mask=batch["segment_ids"], position_ids=batch["position_ids"],
                     labels=batch["labels"], use_cache=False).loss


class Trainer:
    def __init__(self, config: TrainConfig, device: torch.device, rank: int, world: int, deepspeed_config: Path | None,
                 resume: bool):
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.dataset = open_dataset(config)
        self.plan = Plan.make(config, len(self.dataset))
        self.out = Path(config.runner.output_dir)
        self.checkpoints = self.out / "checkpoints"
        resume_from = read_latest(self.checkpoints) if resume else None
        if resume and resume_from is None:
            raise TeleChatError(f"--resume: no checkpoint in {self.checkpoints}")
        self.state = json.loads((resume_from / "trainer_state.json").read_text()) if resume_from else {"step": 0}
        dtype = resolve_dtype(device, config.model.dtype)
        source = resume_from / "model" if resume_from else (Path(config.model.path) if config.model.path else None)
        self.model_folder = Path(config.model.path) if config.model.path else None
        model = build_model(config, source, device)
        self.optimizer = build_optimizer(model, config)
        self.scaler = LossScaler.from_config(config.loss_scale)
        self.deepspeed = deepspeed_config is not None
        half = dtype != torch.float32
        self.autocast = torch.autocast(device.type, dtype=dtype) if half and not self.deepspeed \
            else contextlib.nullcontext()
        self.use_scaler = dtype == torch.float16 and not self.deepspeed
        if self.deepspeed:
            self.engine = self._deepspeed(model, deepspeed_config, dtype)
            self.model = self.engine.module
            if resume_from:
                self.engine.load_checkpoint(str(resume_from / "deepspeed"), tag="state",
                                            load_module_strict=True)
        else:
            self.model = model
            self.engine = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
            if resume_from:
                self.optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=True))
        if resume_from:
            self.scaler = LossScaler(**self.state["loss_scale"])
            torch.set_rng_state(torch.load(resume_from / "rng.pt", weights_only=True))

    def _deepspeed(self, model, path: Path, dtype: torch.dtype):
        import deepspeed
        try:
            ds_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TeleChatError(f"--deepspeed {path}: {error}") from None
        runner = self.config.runner
        # The YAML owns batch sizes, precision and clipping; the JSON owns ZeRO (stage, offload, buckets).
        ds_config.update(train_micro_batch_size_per_gpu=runner.batch_size,
                         gradient_accumulation_steps=runner.gradient_accumulation_steps,
                         train_batch_size=self.plan.order.global_batch, gradient_clipping=self.config.clip_grad or 0.0,
                         bf16={"enabled": dtype == torch.bfloat16},
                         fp16={"enabled": dtype == torch.float16, "initial_scale_power": 16,
                               "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
                         steps_per_print=10 ** 9)
        ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.optimizer = engine.optimizer
        return engine

    def step(self, step: int) -> dict:
        """One optimizer step (0-based); returns what the loss log records."""
        order, lr = self.plan.order, self.plan.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        global_rows = order.global_rows(step).tolist()
        labels = np.stack([self.dataset[i]["labels"] for i in global_rows])
        targets = max(target_count(labels), 1)
        tokens = int(sum((self.dataset[i]["segment_ids"] != 0).sum() for i in global_rows))
        micro_batches = order.micro_batches(step, self.rank)
        # Undo the averaging the frameworks do, so the gradient is that of the global token-weighted mean.
        factor = self.world * (order.grad_accum if self.deepspeed else 1)
        scale = self.scaler.scale if self.use_scaler else 1.0
        total = torch.zeros((), device=self.device)
        for index, rows in enumerate(micro_batches):
            batch = batch_arrays(self.dataset, rows, self.device)
            weight = target_count(batch["labels"].cpu().numpy()) / targets
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.deepspeed or self.world == 1 else self.engine.no_sync()
            with sync:
                loss = micro_loss(self.engine, batch, self.autocast) * weight
                if self.deepspeed:
                    self.engine.backward(loss * factor)
                else:
                    (loss * factor * scale).backward()
            total += loss.detach()
        if self.world > 1:
            dist.all_reduce(total)
        if self.deepspeed:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            skipped = bool(getattr(self.optimizer, "overflow", False))
        else:
            norm, skipped = self._clip_and_update(scale)
        return dict(loss=None if skipped else total.item(), lr=lr, grad_norm=None if skipped else float(norm),
                    tokens=tokens, skipped=skipped, rows=len(global_rows))

    def _clip_and_update(self, scale: float) -> tuple[float, bool]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if scale != 1.0:
            for p in params:
                p.grad.div_(scale)
        clip = self.config.clip_grad if self.config.clip_grad is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)  # global: DDP already all-reduced the gradients
        finite = bool(torch.isfinite(norm))
        if self.use_scaler:
            self.scaler.update(finite)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), not finite

    def save(self, step: int) -> None:
        """A checkpoint folder, written atomically; `latest` moves to it only when it is complete."""
        state_dict = None
        if self.deepspeed:  # every rank writes its ZeRO shards (and, under ZeRO-3, gathers the weights for rank 0)
            staging = self.checkpoints / f".staging-{checkpoint_name(step)}"
            self.engine.save_checkpoint(str(staging / "deepspeed"), tag="state")
            if self.engine.zero_optimization_stage() == 3:
                state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            with atomic_output_dir(self.checkpoints / checkpoint_name(step), force=True) as folder:
                self.model.save_pretrained(folder / "model", state_dict=state_dict)
                if self.model_folder is not None:
                    for name in TOKENIZER_FILES:
                        if (self.model_folder / name).is_file():
                            shutil.copy2(self.model_folder / name, folder / "model" / name)
                if self.deepspeed:
                    (staging / "deepspeed").rename(folder / "deepspeed")
                    staging.rmdir()
                else:
                    torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                torch.save(torch.get_rng_state(), folder / "rng.pt")
                state = {"step": step, "loss_scale": self.scaler.__dict__}
                (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            write_latest(self.checkpoints, checkpoint_name(step), self.config.runner.keep_last)
        if self.world > 1:
            dist.barrier()


def train(config: TrainConfig, device_spec: str, deepspeed_config: Path | None = None, resume: bool = False) -> None:
    device, rank, world = setup(device_spec, config)
    trainer = Trainer(config, device, rank, world, deepspeed_config, resume)
    plan, runner, start = trainer.plan, config.runner, trainer.state["step"]
    seq_len = trainer.dataset.manifest["seq_len"]
    log = tensorboard = None
    if rank == 0:
        trainer.out.mkdir(parents=True, exist_ok=True)
        log = LossLogWriter(trainer.out / "loss_log.jsonl", resume_step=start if resume else None)
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(str(trainer.out / "tensorboard"))
    peak = PEAK_TFLOPS.get({"npu": "910b", "cuda": "a100"}.get(device.type, ""))
    per_token = flops_per_token(trainer.model.config.telechat, seq_len)
    progress = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps, disable=rank != 0,
                    unit="step", desc="train (torch)")
    for step in progress:
        began = time.perf_counter()
        result = trainer.step(step)
        seconds = time.perf_counter() - began
        if rank == 0:
            record = log.write(step + 1, result["loss"], result["lr"], result["grad_norm"], result["tokens"],
                               result["rows"] / seconds, result["tokens"] / seconds, world, seq_len,
                               skipped=result["skipped"])
            if result["loss"] is not None:
                tensorboard.add_scalar("train/loss", result["loss"], step + 1)
            tensorboard.add_scalar("train/lr", result["lr"], step + 1)
            tensorboard.add_scalar("train/tokens_per_s", record["tokens_per_s"], step + 1)
            mfu = f", MFU {record['tokens_per_s'] / world * per_token / (peak * 1e12):.1%}" if peak else ""
            progress.set_postfix_str(f"loss {result['loss'] if result['loss'] is None else round(result['loss'], 4)}"
                                     f", {record['tokens_per_s'] / world:.0f} tok/s/dev{mfu}")
        if runner.save_steps and (step + 1) % runner.save_steps == 0 and step + 1 < plan.total_steps:
            trainer.save(step + 1)
    trainer.save(plan.total_steps)
    if rank == 0:
        log.close()
        tensorboard.close()
        final = trainer.out / "final" / "hf"
        with atomic_output_dir(final, force=True) as folder:
            for path in (read_latest(trainer.checkpoints) / "model").iterdir():
                os.link(path, folder / path.name)
        print(f"trained {plan.total_steps} steps; final HF model in {final}")
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytorch_npu.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or npu (the index comes from LOCAL_RANK)")
    parser.add_argument("--deepspeed", type=Path, help="a DeepSpeed JSON config (ZeRO stage, offload)")
    args = parser.parse_args(argv)
    try:
        train(run_config(args), args.device, args.deepspeed, args.resume)
    except TeleChatError as error:
        print(f"pytorch_npu.train: error: {error}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
