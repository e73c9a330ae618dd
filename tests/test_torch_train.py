"""The PyTorch trainer under torchrun on the CPU (gloo): DDP and DeepSpeed ZeRO-2/3 against one process with the
same global batch, exact resume after a kill, and the same losses as the MindSpore trainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from telechat_ascend.data import prepare_data
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.training import read_loss_log

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("torch_train")
    init_checkpoint("tiny", base / "init", seed=0)
    prepare_data(REPO / "telechat_ascend/assets/demo_sft/data.json", base / "init", base / "data", 64, workers=1,
                 progress=False)
    return base


def write_config(workspace, name, world, batch, accumulation=1, **runner):
    config = {"model": {"path": str(workspace / "init")}, "train_dataset": {"data_dir": str(workspace / "data")},
              "parallel": {"data_parallel": world}, "optimizer": {"lr": 1e-3},
              "runner": {"max_steps": STEPS, "batch_size": batch, "gradient_accumulation_steps": accumulation,
                         "save_steps": 3, "output_dir": str(workspace / name), **runner}}
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config, world=1, *extra, background=False):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if world == 1:
        command = [sys.executable, "-m", "pytorch_npu.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)]
        command += ["-m", "pytorch_npu.train"]
    command += ["--device", "cpu", "--config", str(config), *extra]
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # so that kill_all reaches torchrun's workers too
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def kill_all(process):
    """kill -9 of the launcher and every worker it started."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def losses(folder):
    return [r["loss"] for r in read_loss_log(folder / "loss_log.jsonl")]


def final_weights(folder):
    return load_file(folder / "final" / "hf" / "model.safetensors")


def assert_same_run(a, b, atol):
    assert len(losses(a)) == len(losses(b)) == STEPS
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) < atol
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) < atol


@pytest.fixture(scope="module")
def single(workspace):
    launch(write_config(workspace, "single", 1, 4))
    return workspace / "single"


def test_one_process_trains_and_saves_a_model_both_backends_load(single):
    records = read_loss_log(single / "loss_log.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    assert {r["world_size"] for r in records} == {1} and records[0]["seq_len"] == 64
    import numpy as np
    import torch
    import pytorch_npu.modeling_telechat  # noqa: F401  (registers model_type "telechat")
    from transformers import AutoModelForCausalLM
    from mindspore_impl import from_pretrained
    # final/hf is the last checkpoint's model, and both backends load it to the same logits.
    last = load_file(single / "checkpoints" / "step-000006" / "model" / "model.safetensors")
    assert all(torch.equal(last[name], value) for name, value in final_weights(single).items())
    ids = np.array([[20, 300, 21, 7, 99]])
    torch_model = AutoModelForCausalLM.from_pretrained(single / "final" / "hf").eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(ids)).logits.numpy()
    ms_model = from_pretrained(single / "final" / "hf")
    ms_model.set_train(False)
    np.testing.assert_allclose(ms_model.forward(ids).asnumpy(), torch_logits, atol=1e-4)
    assert (single / "tensorboard").is_dir()


def test_gradient_accumulation_equals_the_big_batch(workspace, single):
    launch(write_config(workspace, "accumulated", 1, 2, accumulation=2))
    assert_same_run(single, workspace / "accumulated", 1e-5)


def test_ddp_two_processes_equal_one(workspace, single):
    launch(write_config(workspace, "ddp", 2, 2), 2)
    assert_same_run(single, workspace / "ddp", 1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equal_one(workspace, single, stage):
    name = f"zero{stage}"
    launch(write_config(workspace, name, 2, 2), 2, "--deepspeed", str(REPO / "configs" / f"deepspeed_zero{stage}.json"))
    assert_same_run(single, workspace / name, 1e-4)


def test_killed_and_resumed_run_ends_with_the_same_weights(workspace, single):
    config = write_config(workspace, "killed", 1, 4, save_steps=2)
    process = launch(config, background=True)
    latest = workspace / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_all(process)
    launch(config, 1, "--resume")
    assert losses(workspace / "killed") == pytest.approx(losses(single), abs=1e-6)
    assert_same_run(single, workspace / "killed", 1e-6)


def test_bf16_autocast_run_trains(workspace, single):
    """bf16 compute with fp32 master weights follows the fp32 run (same weights, batches and schedule) to bf16's
    precision."""
    config = write_config(workspace, "bf16", 1, 4, max_steps=2)
    values = yaml.safe_load(config.read_text())
    values["model"]["dtype"] = "bf16"
    config.write_text(yaml.safe_dump(values))
    launch(config)
    records = read_loss_log(workspace / "bf16" / "loss_log.jsonl")
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    assert losses(workspace / "bf16") == pytest.approx(losses(single)[:2], rel=1e-3)
    assert losses(workspace / "bf16") != losses(single)[:2]  # it did compute in bf16


def test_parity_across_backends_from_the_cli(workspace, capsys):
    from telechat_ascend.cli import main
    assert main(["parity", "--backends", "torch,mindspore", "--model", str(workspace / "init"), "--data",
                 str(workspace / "data"), "--steps", "3", "--out", str(workspace / "parity"), "--json",
                 str(workspace / "parity.json")]) == 0
    verdict = json.loads((workspace / "parity.json").read_text())
    assert verdict["passed"] and len(verdict["steps"]) == 3 and verdict["max_abs_difference"] < 1e-4


def test_mindspore_sharding_settings_are_refused_with_the_deepspeed_alternative(workspace, capsys):
    from pytorch_npu.train import main
    config = yaml.safe_load(write_config(workspace, "sharded", 1, 2).read_text())
    config["parallel"]["optimizer_shard"] = True
    path = workspace / "sharded.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--device", "cpu", "--config", str(path)]) == 1
    assert "the PyTorch trainer shards with DeepSpeed ZeRO" in capsys.readouterr().err


def test_two_process_run_with_dropout_resumes_exactly(workspace, tmp_path):
    """Every rank's dropout stream is re-seeded from (seed, step, rank): a killed 2-process DDP run with dropout 0.1
    resumes to its uninterrupted twin's losses and weights (only rank 0's RNG used to be saved, and loaded by all)."""
    import shutil
    dropout = tmp_path / "dropout"
    shutil.copytree(workspace / "init", dropout)
    values = json.loads((dropout / "config.json").read_text())
    (dropout / "config.json").write_text(json.dumps({**values, "hidden_dropout": 0.1, "attention_dropout": 0.1}))
    runs = {}
    for name in ("whole", "killed"):
        path = write_config(tmp_path, name, 2, 2, save_steps=2, max_steps=12)
        config = yaml.safe_load(path.read_text())
        config["model"]["path"], config["train_dataset"]["data_dir"] = str(dropout), str(workspace / "data")
        path.write_text(yaml.safe_dump(config))
        runs[name] = path
    launch(runs["whole"], 2)
    process = launch(runs["killed"], 2, background=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    kill_all(process)
    launch(runs["killed"], 2, "--resume")
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    whole, killed = (load_file(tmp_path / n / "final" / "hf" / "model.safetensors") for n in ("whole", "killed"))
    assert set(whole) == set(killed) and all((whole[k] == killed[k]).all() for k in whole)


def test_deepspeed_takes_the_loss_scale_section_or_refuses_it(tmp_path):
    """The YAML's loss_scale reaches DeepSpeed's fp16 scaler (whose hysteresis 1 is the shared rule: every overflow
    halves); what DeepSpeed cannot do is refused rather than ignored."""
    import torch
    from pytorch_npu.train import deepspeed_settings
    from telechat_ascend.errors import TeleChatError
    from telechat_ascend.training import load_train_config
    base = "model:\n  preset: tiny\n  dtype: fp16\ntrain_dataset:\n  data_dir: d\nrunner:\n  batch_size: 2\n"
    path = tmp_path / "c.yaml"
    path.write_text(base + "loss_scale:\n  value: 1024\n  window: 50\n")
    fp16 = deepspeed_settings(load_train_config(path), 4, torch.float16)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 50,
                    "hysteresis": 1, "min_loss_scale": 1}
    path.write_text(base + "loss_scale:\n  type: static\n  value: 128\n")
    assert deepspeed_settings(load_train_config(path), 4, torch.float16)["fp16"] == {"enabled": True,
                                                                                     "loss_scale": 128.0}
    for section, message in (("  factor: 4\n", "changes the scale by a factor of 2 only"),
                             ("  value: 1000\n", "starts a dynamic scale at a power of 2")):
        path.write_text(base + "loss_scale:\n" + section)
        with pytest.raises(TeleChatError, match=message):
            deepspeed_settings(load_train_config(path), 4, torch.float16)


def test_mindspore_context_settings_are_refused_or_checked(workspace, capsys):
    from pytorch_npu.train import main
    for context, message in (({"mode": "PYNATIVE"}, "context.mode PYNATIVE: MindSpore's execution mode"),
                             ({"device_target": "Ascend"}, "context.device_target is Ascend, but --device cpu")):
        config = yaml.safe_load(write_config(workspace, "context", 1, 2).read_text())
        config["context"] = context
        path = workspace / "context.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["--device", "cpu", "--config", str(path)]) == 1
        assert message in capsys.readouterr().err
