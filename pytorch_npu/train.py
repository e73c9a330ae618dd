"""Supervised fine-tuning of TeleChat with PyTorch: one process, or torchrun with DDP or DeepSpeed ZeRO-1/2/3.

    python -m pytorch_npu.train --device cpu --config configs/finetune_tiny.yaml [--resume | --overwrite]
    torchrun --nproc_per_node 8 -m pytorch_npu.train --device npu --config CONFIG.yaml [--deepspeed ds.json]

The loop, output folder, resume and loss log are the shared ones (telechat_ascend/trainer.py); this file is the
PyTorch side: the process group, the model and optimizer, one optimizer step and its checkpoint files. One step:
  1. each rank runs its accumulation steps; micro-batch i's mean loss is weighted by n_i / N (its share of the
     global batch's N target tokens, counted by the shared loop);
  2. DDP and DeepSpeed average gradients over ranks (and DeepSpeed over accumulation steps), so the backward loss is
     multiplied back by the world size (and the accumulation steps): the gradient is that of the token-weighted
     mean loss of the whole global batch, whatever the split into ranks and micro-batches;
  3. clipping to clip_grad on the global norm, AdamW (torch.optim.AdamW; decay on matrices only), the cosine
     learning rate of the step. fp16 (DDP) uses the shared dynamic loss scale and skips overflowing steps; with
     DeepSpeed its own fp16 loss scaler does, configured from the YAML's loss_scale section.
Checkpoint files (checkpoints/step-NNNNNN/): model/ (an HF folder with the tokenizer), optimizer.pt or deepspeed/.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pytorch_npu.configuration_telechat import TelechatConfig
from pytorch_npu.device import dist_backend, resolve_device, resolve_dtype
from pytorch_npu.modeling_telechat import TelechatForCausalLM
from pytorch_npu.pretrained import from_pretrained
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object
from telechat_ascend.trainer import StepInputs, StepResult, train
from telechat_ascend.training import TrainConfig, add_run_arguments, decays, run_config

ARRAYS = ("input_ids", "labels", "position_ids", "segment_ids")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if decays(tuple(p.shape))], "weight_decay": config.optimizer.weight_decay},
              {"params": [p for p in params if not decays(tuple(p.shape))], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                             eps=config.optimizer.eps)


def deepspeed_settings(config: TrainConfig, global_batch: int, dtype: torch.dtype) -> dict:
    """What the YAML decides in a DeepSpeed config: batch sizes, precision, clipping and the fp16 loss scale (the
    JSON owns ZeRO: stage, offload, buckets). DeepSpeed grows and shrinks its scale by 2 only; its hysteresis 1 is
    the shared scaler's rule (every overflow halves)."""
    runner, scale = config.runner, config.loss_scale
    fp16 = {"enabled": dtype == torch.float16}
    if dtype == torch.float16:
        if scale.factor != 2:
            raise TeleChatError(f"loss_scale.factor {scale.factor}: DeepSpeed's fp16 loss scaler changes the scale by "
                                f"a factor of 2 only; set loss_scale.factor to 2 or train without --deepspeed")
        if scale.type == "dynamic":
            power = math.log2(scale.value)
            if power != int(power):
                raise TeleChatError(f"loss_scale.value {scale.value:g}: DeepSpeed starts a dynamic scale at a power "
                                    f"of 2 (initial_scale_power); choose e.g. 65536")
            fp16.update(loss_scale=0, initial_scale_power=int(power), loss_scale_window=scale.window, hysteresis=1,
                        min_loss_scale=1)
        else:
            fp16.update(loss_scale=scale.value)
    return dict(train_micro_batch_size_per_gpu=runner.batch_size,
                gradient_accumulation_steps=runner.gradient_accumulation_steps, train_batch_size=global_batch,
                gradient_clipping=config.clip_grad or 0.0, bf16={"enabled": dtype == torch.bfloat16}, fp16=fp16,
                steps_per_print=10 ** 9)


class TorchBackend:
    """The PyTorch side of the shared training loop (telechat_ascend.trainer.TrainBackend)."""
    name = "torch"

    def __init__(self, device_spec: str, deepspeed_config: Path | None):
        self.device_spec, self.deepspeed_config = device_spec, deepspeed_config
        self.deepspeed = deepspeed_config is not None
        self.manages_loss_scale = False

    def start(self, config: TrainConfig) -> tuple[int, int]:
        if config.parallel.semi_auto:
            raise TeleChatError("parallel.model_parallel and optimizer_shard are MindSpore semi-auto parallel "
                                "settings; the PyTorch trainer shards with DeepSpeed ZeRO (--deepspeed "
                                "configs/deepspeed_zero3.json)")
        if config.context.mode is not None:
            raise TeleChatError(f"context.mode {config.context.mode}: MindSpore's execution mode; the PyTorch trainer "
                                f"runs eagerly (remove context.mode; GRAPH is MindSpore's default)")
        if config.train_dataset.data_dir is None:
            raise TeleChatError("train_dataset.mindrecord: the PyTorch trainer reads prepare-data shards "
                                "(train_dataset.data_dir); MindRecord input is for the MindSpore trainer")
        self.config = config
        self.device = resolve_device(self.device_spec)
        target = {"cpu": "CPU", "npu": "Ascend"}.get(self.device.type)
        if config.context.device_target not in (None, target):
            raise TeleChatError(f"context.device_target is {config.context.device_target}, but --device "
                                f"{self.device_spec} runs on {self.device.type}; make them agree")
        self.dtype = resolve_dtype(self.device, config.model.dtype)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world != config.parallel.data_parallel:
            raise TeleChatError(f"parallel.data_parallel is {config.parallel.data_parallel} but {self.world} "
                                f"process(es) run (torchrun --nproc_per_node and parallel.data_parallel must agree)")
        if self.world > 1:
            dist.init_process_group(dist_backend(self.device))
        self.rank = dist.get_rank() if self.world > 1 else 0
        return self.rank, self.world

    def open_dataset(self, config: TrainConfig, pad_id: int):
        raise AssertionError("start() refuses MindRecord input")

    def build(self, config: TrainConfig, model_source, checkpoint: Path | None) -> None:
        """Parameters in fp32 (master weights); fp16/bf16 compute comes from autocast or DeepSpeed."""
        source = Path(model_source) if not isinstance(model_source, str) or Path(model_source).is_dir() else None
        if source is not None:
            model = from_pretrained(source, torch.float32)
        else:
            torch.manual_seed(config.runner.seed)  # every rank draws the same initial weights
            model = TelechatForCausalLM(TelechatConfig(**TeleChatConfig.preset(model_source).to_dict()))
        self.source = source
        if config.recompute:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(self.device).train()
        self.optimizer = build_optimizer(model, config)
        half = self.dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if half and not self.deepspeed \
            else contextlib.nullcontext()
        self.use_scaler = self.dtype == torch.float16 and not self.deepspeed
        self.manages_loss_scale = self.dtype == torch.float16 and self.deepspeed
        if self.deepspeed:
            self.engine = self._deepspeed(model, config)
            self.model = self.engine.module
            if checkpoint:
                self.engine.load_checkpoint(str(checkpoint / "deepspeed"), tag="state", load_module_strict=True)
        else:
            self.model = model
            self.engine = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
            if checkpoint:
                self.optimizer.load_state_dict(_load_state(checkpoint / "optimizer.pt"))

    def _deepspeed(self, model, config: TrainConfig):
        import deepspeed
        path = self.deepspeed_config
        ds_config = read_json_object(path, "DeepSpeed config (--deepspeed)")
        order = config.runner.batch_size * self.world * config.runner.gradient_accumulation_steps
        ds_config.update(deepspeed_settings(config, order, self.dtype))
        ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.optimizer = engine.optimizer
        return engine

    def step(self, inputs: StepInputs) -> StepResult:
        torch.manual_seed(inputs.seed)  # dropout: a function of (seed, step, rank), so a resumed run draws the same
        for group in self.optimizer.param_groups:
            group["lr"] = inputs.lr
        grad_accum = len(inputs.micro_batches)
        # Undo the averaging the frameworks do, so the gradient is that of the global token-weighted mean.
        factor = self.world * (grad_accum if self.deepspeed else 1)
        scale = inputs.loss_scale if self.use_scaler else 1.0
        total = torch.zeros((), device=self.device)
        for index, micro in enumerate(inputs.micro_batches):
            batch = {name: torch.from_numpy(micro[name].astype("int64")).to(self.device) for name in ARRAYS}
            last = index == grad_accum - 1
            sync = contextlib.nullcontext() if last or self.deepspeed or self.world == 1 else self.engine.no_sync()
            with sync:
                with self.autocast:
                    loss = self.engine(batch["input_ids"], attention_mask=batch["segment_ids"],
                                       position_ids=batch["position_ids"], labels=batch["labels"],
                                       use_cache=False).loss * micro["weight"]
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
            norm = float("inf") if getattr(self.optimizer, "overflow", False) or norm is None else float(norm)
        else:
            norm = self._clip_and_update(scale)
        return StepResult(total.item(), norm)

    def _clip_and_update(self, scale: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if scale != 1.0:
            for p in params:
                p.grad.div_(scale)
        clip = self.config.clip_grad if self.config.clip_grad is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))  # global: DDP already all-reduced the gradients
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, folder: Path, rank: int) -> None:
        state_dict = None
        if self.deepspeed:  # every rank writes its ZeRO shards (and, under ZeRO-3, gathers the weights for rank 0)
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
            if self.engine.zero_optimization_stage() == 3:
                state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            self.model.save_pretrained(folder / "model", state_dict=state_dict)
            if self.source is not None:
                for name in TOKENIZER_FILES:
                    if (self.source / name).is_file():
                        shutil.copy2(self.source / name, folder / "model" / name)
            if not self.deepspeed:
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def export(self, checkpoint: Path, final: Path) -> None:
        (final / "hf").mkdir()
        for path in (checkpoint / "model").iterdir():
            os.link(path, final / "hf" / path.name)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def finish(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise TeleChatError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a damaged file
        raise TeleChatError(f"{path}: unreadable ({type(error).__name__}: {error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytorch_npu.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or npu (the index comes from LOCAL_RANK)")
    parser.add_argument("--deepspeed", type=Path, help="a DeepSpeed JSON config (ZeRO stage, offload)")
    args = parser.parse_args(argv)
    try:
        train(run_config(args), TorchBackend(args.device, args.deepspeed), args.resume, args.overwrite)
    except TeleChatError as error:
        print(f"pytorch_npu.train: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
