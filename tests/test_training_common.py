"""The framework-neutral training pieces (telechat_ascend/training.py): the YAML config, the cosine schedule, the
data order, the loss log, the loss scaler and the checkpoint pointer. No framework needed."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.training import (DataOrder, LossLogWriter, LossScaler, Plan, TrainConfig, checkpoint_name,
                                      cosine_lr, decays, load_train_config, read_latest, read_loss_log, write_latest)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = "model:\n  preset: tiny\ntrain_dataset:\n  data_dir: data\n"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


# ---- config -----------------------------------------------------------------------------------------------------

def test_minimal_config_gets_the_published_defaults(tmp_path):
    config = load_train_config(write(tmp_path, MINIMAL))
    assert (config.optimizer.lr, config.optimizer.betas, config.optimizer.eps, config.optimizer.weight_decay) \
        == (3e-5, [0.9, 0.95], 1e-5, 1e-4)
    assert (config.lr_schedule.type, config.lr_schedule.warmup_ratio, config.clip_grad) == ("cosine", 0.1, 1.0)
    assert (config.runner.batch_size, config.runner.gradient_accumulation_steps, config.runner.seed) == (1, 1, 42)
    assert (config.context.mode, config.context.graph, config.recompute) == (None, True, False)
    assert (config.loss_scale.type, config.loss_scale.value) == ("static", 1.0)


def test_fp16_defaults_to_a_dynamic_loss_scale(tmp_path):
    config = load_train_config(write(tmp_path, MINIMAL.replace("tiny\n", "tiny\n  dtype: fp16\n")))
    assert (config.loss_scale.type, config.loss_scale.value, config.loss_scale.factor, config.loss_scale.window) \
        == ("dynamic", 65536.0, 2.0, 1000)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-5` as a string (YAML 1.1 wants 1.0e-5); a float field accepts it anyway.
    config = load_train_config(write(tmp_path, MINIMAL + "optimizer:\n  lr: 1e-5\n  eps: 1.0e-6\n"))
    assert (config.optimizer.lr, config.optimizer.eps) == (1e-5, 1e-6)


@pytest.mark.parametrize("name", ["finetune_tiny.yaml", "finetune_telechat_7b.yaml", "finetune_telechat_12b.yaml"])
def test_shipped_configs_load(name):
    config = load_train_config(CONFIGS / name)
    if name != "finetune_tiny.yaml":  # one Atlas 800T A2, global batch 32, sharded to fit 64 GB devices
        parallel = config.parallel
        assert parallel.devices == 8 and parallel.optimizer_shard and config.context.device_target == "Ascend"
        assert config.model.dtype in ("bf16", "fp16") and config.recompute
        assert config.runner.batch_size * parallel.data_parallel * config.runner.gradient_accumulation_steps == 32
        parallel.check_model(TeleChatConfig.preset("7B" if "7b" in name else "12B"))


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "optimizer:\n  betass: [0.9, 0.95]\n",
     "unknown key 'optimizer.betass' (did you mean 'optimizer.betas'?)"),
    (MINIMAL + "trainer:\n  seed: 1\n", "unknown key 'trainer'"),
    (MINIMAL + "runner:\n  batch_size: two\n", "runner.batch_size must be an int, got 'two'"),
    (MINIMAL + "runner:\n  batch_size: 0\n", "runner.batch_size must be positive, got 0"),
    (MINIMAL + "optimizer:\n  lr: fast\n", "optimizer.lr must be a finite number, got 'fast'"),
    (MINIMAL + "optimizer:\n  lr: .inf\n", "optimizer.lr must be a finite number, got inf"),
    (MINIMAL + "optimizer:\n  lr: .nan\n", "optimizer.lr must be a finite number, got nan"),
    (MINIMAL + "clip_grad: .inf\n", "clip_grad must be a finite number, got inf"),
    (MINIMAL + "optimizer:\n  betas: [0.9]\n", "optimizer.betas must be two numbers in [0, 1)"),
    (MINIMAL + "optimizer: 3\n", "optimizer must be a mapping of keys to values, got 3"),
    (MINIMAL + "recompute: yes please\n", "recompute must be a bool"),
    (MINIMAL + "parallel:\n  pipeline_stage: 4\n", "parallel.pipeline_stage = 4: pipeline parallelism is not implemented"),
    (MINIMAL + "parallel:\n  model_parallel: 2\ncontext:\n  mode: PYNATIVE\n", "needs context.mode GRAPH"),
    (MINIMAL + "parallel:\n  optimizer_shard: true\nrunner:\n  gradient_accumulation_steps: 2\n",
     "set runner.gradient_accumulation_steps to 1 and raise runner.batch_size"),
    (MINIMAL + "amp_level: O2\n", "unknown key 'amp_level'"),  # model.dtype says it; nothing would read it

    (MINIMAL + "loss_scale:\n  type: adaptive\n", "loss_scale.type must be one of dynamic, static"),
    (MINIMAL + "loss_scale:\n  factor: 1\n", "loss_scale.factor must be > 1"),
    (MINIMAL + "context:\n  mode: EAGER\n", "context.mode must be one of GRAPH, PYNATIVE"),
    ("model:\n  preset: tiny\n  path: x\ntrain_dataset:\n  data_dir: d\n", "give exactly one of 'preset'"),
    ("model:\n  preset: huge\ntrain_dataset:\n  data_dir: d\n", "model.preset: unknown preset 'huge'"),
    ("model:\n  preset: tiny\n", "train_dataset: give exactly one of 'data_dir'"),
    ("model: [tiny\n", "not valid YAML"),
])
def test_config_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TeleChatError) as error:
        load_train_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_model_parallel_must_divide_heads_mlp_and_vocabulary():
    parallel = TrainConfig().parallel
    parallel.model_parallel = 3
    with pytest.raises(TeleChatError, match=r"model_parallel = 3 does not divide the model's n_head \(32\)"):
        parallel.check_model(TeleChatConfig.preset("7B"))
    parallel.model_parallel = 8
    parallel.check_model(TeleChatConfig.preset("7B"))  # 32 heads, 32 KV heads, ffn 12288, vocab 160256
    grouped = dataclasses.replace(TeleChatConfig.preset("7B"), num_key_value_heads=4)
    with pytest.raises(TeleChatError, match=r"does not divide the model's kv_heads \(4\)"):
        parallel.check_model(grouped)


def test_missing_config_file(tmp_path):
    with pytest.raises(TeleChatError, match=r"nope\.yaml: not found \(the training config\)"):
        load_train_config(tmp_path / "nope.yaml")


# ---- schedule and weight decay ----------------------------------------------------------------------------------

def test_cosine_lr_is_the_plain_formula():
    peak, min_lr, total, warmup = 3e-4, 1e-5, 20, 4
    for step in range(total):
        if step < warmup:
            expected = peak * (step + 1) / warmup
        else:
            expected = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert cosine_lr(step, total, peak, warmup, min_lr) == pytest.approx(expected, rel=1e-15)
    lrs = [cosine_lr(s, total, peak, warmup, min_lr) for s in range(total)]
    assert lrs[warmup - 1] == lrs[warmup] == peak  # the warmup ends at the peak, where the cosine starts
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])) and lrs[-1] > min_lr
    assert cosine_lr(0, 5, 1.0, 0, 0.0) == 1.0  # no warmup


def test_plan_warmup_from_ratio_or_steps(tmp_path):
    config = load_train_config(write(tmp_path, MINIMAL + "runner:\n  epochs: 2\n  batch_size: 2\n"))
    plan = Plan.make(config, num_rows=101)  # 50 steps per epoch
    assert (plan.total_steps, plan.warmup_steps) == (100, 10)
    assert plan.lr(9) == pytest.approx(config.optimizer.lr, rel=1e-12)
    config.lr_schedule.warmup_steps = 3
    config.runner.max_steps = 7
    assert (Plan.make(config, 101).total_steps, Plan.make(config, 101).warmup_steps) == (7, 3)


def test_weight_decay_skips_biases_and_norms():
    assert decays((4096, 4096)) and decays((160256, 4096))
    assert not decays((4096,))


# ---- data order -------------------------------------------------------------------------------------------------

def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(num_rows=50, seed=7, per_device_batch=2, world=2, grad_accum=3)  # global batch 12
    assert order.steps_per_epoch == 4
    epoch0 = np.concatenate([order.global_rows(s) for s in range(4)])
    epoch1 = np.concatenate([order.global_rows(s) for s in range(4, 8)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48  # no row twice in an epoch
    assert not np.array_equal(epoch0, epoch1)
    again = DataOrder(50, 7, 2, 2, 3)
    assert all(np.array_equal(order.global_rows(s), again.global_rows(s)) for s in range(8))
    assert not np.array_equal(order.global_rows(0), DataOrder(50, 8, 2, 2, 3).global_rows(0))
    assert order.position(9) == (2, 1)


def test_any_split_of_the_global_batch_reads_the_same_rows():
    one = DataOrder(40, 1, per_device_batch=4, world=1, grad_accum=1)
    two = DataOrder(40, 1, per_device_batch=2, world=2, grad_accum=1)
    accumulated = DataOrder(40, 1, per_device_batch=2, world=1, grad_accum=2)
    four = DataOrder(40, 1, per_device_batch=1, world=2, grad_accum=2)
    for step in range(15):  # crosses epoch boundaries
        rows = one.micro_batches(step, 0)[0]
        assert two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0] == rows
        assert sum(accumulated.micro_batches(step, 0), []) == rows
        ranks = [four.micro_batches(step, r) for r in range(2)]
        assert [ranks[r][m][0] for m in range(2) for r in range(2)] == rows  # micro step m of rank r: slice 2m + r


def test_data_order_needs_one_global_batch():
    with pytest.raises(TeleChatError, match="has 5 rows, fewer than one global batch of 8"):
        DataOrder(5, 0, per_device_batch=2, world=2, grad_accum=2)


# ---- loss log ---------------------------------------------------------------------------------------------------

def log_step(writer, step, **overrides):
    values = dict(loss=2.0 + 1 / step, lr=1e-4, grad_norm=0.5, tokens=100, samples_per_s=3.0, tokens_per_s=300.0,
                  world_size=2, seq_len=64)
    values.update(overrides)
    return writer.write(step, **values)


def test_loss_log_round_trip_and_schema(tmp_path):
    path = tmp_path / "loss_log.jsonl"
    writer = LossLogWriter(path)
    written = [log_step(writer, 1), log_step(writer, 2, loss=None, grad_norm=None, skipped=True), log_step(writer, 3)]
    writer.close()
    assert read_loss_log(path) == written
    assert list(written[0]) == ["step", "loss", "lr", "grad_norm", "tokens", "samples_per_s", "tokens_per_s",
                                "world_size", "seq_len"]
    assert written[1]["skipped"] is True and "skipped" not in written[2]


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    path = tmp_path / "loss_log.jsonl"
    writer = LossLogWriter(path)
    for step in range(1, 6):
        log_step(writer, step)
    writer.close()
    writer = LossLogWriter(path, resume_step=3)
    log_step(writer, 4, loss=9.0)
    writer.close()
    records = read_loss_log(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["loss"] == 9.0
    with pytest.raises(TeleChatError, match="has 4 records up to step 6"):
        LossLogWriter(path, resume_step=6)
    assert LossLogWriter(path).file.close() is None and path.read_text() == ""  # a new run starts a new log


GOOD = dict(step=1, loss=2.0, lr=1e-4, grad_norm=0.5, tokens=100, samples_per_s=1.0, tokens_per_s=100.0,
            world_size=1, seq_len=64)


@pytest.mark.parametrize("second_line, message", [
    ("not json", "not JSON"),
    ('{"step": 2}', "missing grad_norm, loss, lr"),
    (json.dumps({**GOOD, "step": 2, "epoch": 0}), "unknown epoch"),
    (json.dumps({**GOOD, "step": 2, "loss": None}), "'loss' must be a finite non-negative number, got None"),
    (json.dumps({**GOOD, "step": 2, "tokens": 1.5}), "'tokens' must be a non-negative integer, got 1.5"),
    (json.dumps({**GOOD, "step": 2, "skipped": False}), "'skipped' must be true when present"),
    (json.dumps({**GOOD, "step": 3}), "step 3, expected 2"),
])
def test_read_loss_log_names_file_and_line(tmp_path, second_line, message):
    path = tmp_path / "loss_log.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + second_line + "\n")
    with pytest.raises(TeleChatError) as error:
        read_loss_log(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


# ---- loss scale and checkpoint pointer --------------------------------------------------------------------------

def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_a_window():
    scaler = LossScaler(scale=2.0 ** 16, dynamic=True, factor=2.0, window=3)
    scaler.update(False)
    assert scaler.scale == 2.0 ** 15
    for _ in range(3):
        scaler.update(True)
    assert (scaler.scale, scaler.good_steps) == (2.0 ** 16, 0)
    scaler.update(True)
    scaler.update(False)
    assert (scaler.scale, scaler.good_steps) == (2.0 ** 15, 0)
    tiny = LossScaler(scale=2.0, dynamic=True, factor=4.0, window=10)
    tiny.update(False)
    assert tiny.scale == 1.0  # never below 1
    static = LossScaler(scale=1.0, dynamic=False, factor=2.0, window=1)
    static.update(False)
    static.update(True)
    assert static.scale == 1.0


def test_latest_pointer_and_keep_last(tmp_path):
    assert read_latest(tmp_path) is None
    for step in (10, 20, 30):
        (tmp_path / checkpoint_name(step)).mkdir()
        write_latest(tmp_path, checkpoint_name(step), keep_last=2)
    assert read_latest(tmp_path) == tmp_path / "step-000030"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000020", "step-000030"]
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(TeleChatError, match="names step-000099, which does not exist"):
        read_latest(tmp_path)


def test_train_config_round_trips_through_its_dict(tmp_path):
    """train_config.json (to_dict) read back as YAML gives the same config, every section and value."""
    config = load_train_config(write(tmp_path, MINIMAL + "optimizer:\n  lr: 2.0e-4\nrunner:\n  seed: 7\n"))
    again = load_train_config(write(tmp_path, yaml.safe_dump(config.to_dict())))
    assert again == config and again.optimizer.lr == 2e-4 and again.runner.seed == 7


def test_shared_module_imports_no_framework():
    code = "import sys; sys.modules['torch'] = sys.modules['mindspore'] = None; import telechat_ascend.training, telechat_ascend.trainer"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
