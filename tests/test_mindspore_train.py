"""The MindSpore trainer on the CPU, by real runs of mindspore_impl.train on the tiny model and the demo SFT data:
in this process for one worker, and one 2-worker msrun job. The reference run (global batch 4, 6 steps) is compared
with an accumulated run, a resumed run and the msrun run; an fp16 run checks the overflow skip."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import yaml
from mindspore import Parameter, Tensor

from conftest import tiny_with_dropout
from mindspore_impl import from_pretrained
from mindspore_impl.train import AdamW, MindRecordRows, adamw_scalars, main
from telechat_ascend.data import PackedDataset, export_mindrecord
from telechat_ascend.training import LOG_KEYS, cosine_lr, read_loss_log

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "telechat_ascend" / "assets" / "demo_sft" / "data.json"
TIMING = ("samples_per_s", "tokens_per_s")
STEPS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model with dropout 0.1 and the demo data: with dropout, the runs below agree only if the masks are
    keyed by (seed, step, row)."""
    return tiny_with_dropout(tmp_path_factory.mktemp("train"))


def write_config(work: Path, name: str, **sections) -> Path:
    """configs/finetune_tiny.yaml pointed at the fixtures, a 6-step schedule with a checkpoint every 3 steps,
    and `sections` merged in."""
    config = yaml.safe_load((REPO / "configs" / "finetune_tiny.yaml").read_text())
    config["model"]["path"] = str(work / "init")
    config["train_dataset"]["data_dir"] = str(work / "data")
    config["lr_schedule"] = {"warmup_steps": 2}
    config["runner"].update(max_steps=STEPS, save_steps=3, keep_last=0, output_dir=str(work / name))
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(work: Path, name: str, *extra: str, **sections) -> Path:
    assert main(["--config", str(write_config(work, name, **sections)), *extra]) == 0
    return work / name


def losses(out: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_loss_log(out / "loss_log.jsonl")])


def without_timing(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_loss_log(out / "loss_log.jsonl")]


def weights(folder: Path) -> dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in from_pretrained(folder).parameters_and_names()}


@pytest.fixture(scope="module")
def reference(work):
    """One worker, batch 4, no accumulation."""
    return train(work, "reference")


# ---- optimizer ----------------------------------------------------------------------------------------------------

def test_adamw_matches_torch_adamw_with_decay_on_matrices_only():
    rng = np.random.default_rng(0)
    matrix, bias = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    grads = [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32))
             for _ in range(3)]
    lr, wd, betas, eps = 1e-2, 0.1, [0.9, 0.95], 1e-5
    params = [Parameter(Tensor(matrix), name="w.weight"), Parameter(Tensor(bias), name="w.bias")]
    optimizer = AdamW(params, betas, eps)
    assert optimizer.decay == (True, False)
    for t, (gm, gb) in enumerate(grads, start=1):
        optimizer((Tensor(gm), Tensor(gb)), *adamw_scalars(lr, wd, betas, t))
    tm, tb = torch.nn.Parameter(torch.tensor(matrix)), torch.nn.Parameter(torch.tensor(bias))
    reference = torch.optim.AdamW([{"params": [tm], "weight_decay": wd}, {"params": [tb], "weight_decay": 0.0}],
                                  lr=lr, betas=tuple(betas), eps=eps)
    for gm, gb in grads:
        tm.grad, tb.grad = torch.tensor(gm), torch.tensor(gb)
        reference.step()
    np.testing.assert_allclose(params[0].asnumpy(), tm.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(params[1].asnumpy(), tb.detach().numpy(), atol=1e-6)
    assert [m.name for m in optimizer.moments1] == ["adam_m.w.weight", "adam_m.w.bias"]


def test_tiny_model_decays_matrices_not_biases_or_norms(work):
    model = from_pretrained(work / "init")
    optimizer = AdamW(model.trainable_params(), [0.9, 0.95], 1e-5)
    excluded = {p.name for p, decay in zip(optimizer.params, optimizer.decay) if not decay}
    expected = {p.name for p in model.trainable_params() if p.name.endswith(".bias") or "norm" in p.name}
    assert excluded == expected and len(expected) == 4 * model.config.n_layer + 1


# ---- the reference run ----------------------------------------------------------------------------------------------

def test_reference_run_logs_checkpoints_and_final_model(reference):
    records = read_loss_log(reference / "loss_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(set(r) == set(LOG_KEYS) for r in records)  # no skipped steps in fp32
    assert [r["lr"] for r in records] == [cosine_lr(s, STEPS, 1e-3, 2, 0.0) for s in range(STEPS)]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert all(r["world_size"] == 1 and r["seq_len"] == 64 and r["tokens"] > 100 for r in records)

    checkpoints = reference / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000006\n"
    state = json.loads((checkpoints / "step-000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["optimizer_updates"]) == (3, 0, 3, 3)
    settings = state["settings"]
    assert (settings["backend"], settings["rows"], settings["global_batch"], settings["seed"]) == \
        ("mindspore", 145, 4, 42)
    assert settings["data_fingerprint"] == json.loads((reference.parent / "data" / "manifest.json").read_text())[
        "content_sha256"]
    moments = ms.load_checkpoint(str(checkpoints / "step-000003" / "optimizer.ckpt"))
    names = [name for name, _ in from_pretrained(checkpoints / "step-000003" / "model").parameters_and_names()]
    assert sorted(moments) == sorted([f"adam_m.{n}" for n in names] + [f"adam_v.{n}" for n in names])

    final = weights(reference / "final" / "mindspore")
    assert all(np.array_equal(final[k], v) for k, v in weights(reference / "final" / "hf").items())
    assert all(np.array_equal(final[k], v) for k, v in weights(checkpoints / "step-000006" / "model").items())
    start = weights(reference.parent / "init")
    assert not np.array_equal(final["model.norm_out.weight"], start["model.norm_out.weight"])


def test_resume_continues_exactly(work, reference):
    """A crash after the step-3 checkpoint: later checkpoints are gone, the log ran further. Resuming gives the
    uninterrupted run's log and weights."""
    crashed = work / "resumed"
    shutil.copytree(reference, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000006")
    shutil.rmtree(crashed / "final")
    (crashed / "checkpoints" / "latest").write_text("step-000003\n")
    records = (crashed / "loss_log.jsonl").read_text().splitlines()
    (crashed / "loss_log.jsonl").write_text("\n".join(records[:5]) + "\n")  # died during step 6

    train(work, "resumed", "--resume")
    assert without_timing(crashed) == without_timing(reference)
    expected = weights(reference / "final" / "mindspore")
    assert all(np.array_equal(expected[k], v) for k, v in weights(crashed / "final" / "mindspore").items())


def test_gradient_accumulation_equals_the_bigger_batch(work, reference):
    accumulated = train(work, "accumulated", runner={"batch_size": 2, "gradient_accumulation_steps": 2})
    np.testing.assert_allclose(losses(accumulated), losses(reference), rtol=0, atol=1e-5)
    expected = weights(reference / "final" / "mindspore")
    for name, value in weights(accumulated / "final" / "mindspore").items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-5, err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_under_msrun_match_one_worker(work, reference):
    """Batch 2 on each of 2 workers = the reference's global batch 4: same losses, identical weights on both ranks."""
    config = write_config(work, "msrun", runner={"batch_size": 2}, parallel={"data_parallel": 2})
    bin_dir = Path(sys.executable).parent
    logs = work / "msrun_log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # msrun's workers run the first `python` on PATH
    subprocess.run([str(bin_dir / "msrun"), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                    f"--log_dir={logs}", "--join=True", "--cluster_time_out=120",
                    "mindspore_impl/train.py", "--config", str(config)],
                   cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    out = work / "msrun"
    np.testing.assert_allclose(losses(out), losses(reference), rtol=0, atol=1e-5)
    assert all(r["world_size"] == 2 for r in read_loss_log(out / "loss_log.jsonl"))
    digests = [next(line.split()[-1] for line in (logs / f"worker_{rank}.log").read_text().splitlines()
                    if line.startswith(f"rank {rank}: final weights sha256")) for rank in (0, 1)]
    assert digests[0] == digests[1]
    expected = weights(reference / "final" / "mindspore")
    for name, value in weights(out / "final" / "mindspore").items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-5, err_msg=name)


# ---- fp16 and loss scaling ------------------------------------------------------------------------------------------

def test_fp16_overflow_steps_are_skipped_and_the_scale_drops(work):
    """Scale 2^40 overflows fp16 at once; factor 2^20 brings it to 2^20 (still too large here), then to 1."""
    out = train(work, "fp16", "--max-steps", "3", model={"dtype": "fp16"},
                loss_scale={"type": "dynamic", "value": 2 ** 40, "factor": 2 ** 20}, runner={"save_steps": 1})
    records = read_loss_log(out / "loss_log.jsonl")
    assert [r.get("skipped", False) for r in records] == [True, True, False]
    assert records[0]["grad_norm"] is None and records[2]["grad_norm"] > 0
    assert all(0 < r["loss"] < 10 for r in records)
    scales = [json.loads((out / "checkpoints" / f"step-{s:06d}" / "trainer_state.json").read_text())
              for s in (1, 2, 3)]
    assert [s["loss_scale"]["scale"] for s in scales] == [2.0 ** 20, 1.0, 1.0]
    assert [s["optimizer_updates"] for s in scales] == [0, 0, 1]
    start = weights(work / "init")
    for step, changed in ((2, False), (3, True)):
        after = weights(out / "checkpoints" / f"step-{step:06d}" / "model")
        assert any(not np.array_equal(after[k], v) for k, v in start.items()) == changed


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, extra, message", [
    ({"parallel": {"data_parallel": 2}}, [],
     "parallel.data_parallel x model_parallel is 2 but 1 worker(s) are running"),
    ({"model": {"dtype": "bf16"}}, [], "model.dtype bf16: MindSpore has no bf16 CPU kernels"),
    ({"runner": {"batch_size": 200}}, [], "the dataset has 145 rows, fewer than one global batch of 200"),
    ({}, ["--resume"], "--resume: no checkpoint in"),
    ({"model": {"path": "/nonexistent/model"}}, [], "/nonexistent/model"),
])
def test_bad_setups_fail_with_a_clear_message(work, capsys, sections, extra, message):
    config = write_config(work, "bad", **sections)
    assert main(["--config", str(config), *extra]) == 1
    assert message in capsys.readouterr().err


def test_existing_run_needs_resume_and_the_same_data_order(work, reference, capsys):
    config = write_config(work, "reference")
    assert main(["--config", str(config)]) == 1
    assert "already holds a training run" in capsys.readouterr().err
    config = write_config(work, "reference", runner={"batch_size": 2})
    assert main(["--config", str(config), "--resume"]) == 1
    assert "written with global_batch 4, this run has 2" in capsys.readouterr().err


# ---- MindRecord input ---------------------------------------------------------------------------------------------

def test_mindrecord_rows_are_the_packed_rows_plus_the_trailing_pair(work, tmp_path):
    export_mindrecord(work / "data", tmp_path / "data.mindrecord", progress=False)
    packed = PackedDataset(work / "data")
    pad = packed.manifest["tokenizer"]["pad_id"]
    rows = MindRecordRows(tmp_path / "data.mindrecord", pad)
    assert len(rows) == len(packed)
    for i in (0, 1, len(rows) - 1):
        row, expected = rows[i], packed[i]
        np.testing.assert_array_equal(row["input_ids"], np.append(expected["input_ids"], pad))
        np.testing.assert_array_equal(row["labels"], np.append(expected["labels"], -100))
        np.testing.assert_array_equal(row["position_ids"], np.arange(65))
        assert (row["segment_ids"] == 1).all()


# ---- semi-auto parallel: what can be checked without Ascend ---------------------------------------------------------

def test_sharded_step_equals_the_data_parallel_step_functions(work, tmp_path):
    """ShardedStep (the semi-auto step: one graph from loss to update) runs unsharded on CPU: two steps give the
    weights of grad -> finish -> update, and a step with non-finite gradients leaves weights and moments alone."""
    script = f"""
import numpy as np, mindspore as ms
from mindspore import Tensor
ms.set_context(mode=ms.GRAPH_MODE)
from mindspore_impl import from_pretrained
from mindspore_impl.train import AdamW, ShardedStep, StepFunctions, adamw_scalars
from telechat_ascend.data import PackedDataset
from telechat_ascend.trainer import stack_rows
dataset = PackedDataset(r"{work / 'data'}")
batch = stack_rows(dataset, [0, 1, 2, 3])
results = {{}}
for kind in ("sharded", "functions"):
    model = from_pretrained(r"{work / 'init'}")
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), [0.9, 0.95], 1e-5)
    cos, sin = model.rope(batch["position_ids"], 64)
    inputs = (Tensor(batch["input_ids"]), cos, sin, Tensor(batch["segment_ids"]), Tensor(batch["labels"]),
              Tensor(np.array([11, 12, 13, 14], np.int64)))
    step = ShardedStep(model, optimizer, 1.0) if kind == "sharded" else StepFunctions(model, optimizer, 1, 1.0, True)
    for t in (1, 2):
        scalars = adamw_scalars(1e-3, 1e-4, [0.9, 0.95], t)
        if kind == "sharded":
            loss, norm = step(*inputs, Tensor(1.0, ms.float32), Tensor(1.0, ms.float32), *scalars)
        else:
            loss, grads = step.grad(*inputs, Tensor(1.0, ms.float32))
            loss, grads, norm = step.finish(loss, grads, Tensor(1.0, ms.float32))
            step.update(grads, *scalars)
        results[f"{{kind}}_loss_{{t}}"], results[f"{{kind}}_norm_{{t}}"] = float(loss), float(norm)
    for p in (*model.get_parameters(), *optimizer.moments1):
        results[f"{{kind}}:{{p.name}}"] = p.asnumpy()
    if kind == "sharded":
        loss, norm = step(*inputs, Tensor(float("inf"), ms.float32), Tensor(1.0, ms.float32),
                          *adamw_scalars(1e-3, 1e-4, [0.9, 0.95], 3))
        results["overflow_norm"] = float(norm)
        results["unchanged"] = all(np.array_equal(p.asnumpy(), results[f"sharded:{{p.name}}"])
                                   for p in (*model.get_parameters(), *optimizer.moments1))
np.savez(r"{tmp_path / 'steps.npz'}", **results)
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=REPO)
    results = np.load(tmp_path / "steps.npz")
    for t in (1, 2):
        assert abs(results[f"sharded_loss_{t}"] - results[f"functions_loss_{t}"]) < 1e-6
        assert abs(results[f"sharded_norm_{t}"] - results[f"functions_norm_{t}"]) < 1e-5
    names = [key.split(":", 1)[1] for key in results.files if key.startswith("functions:")]
    assert len(names) > 20
    for name in names:
        np.testing.assert_allclose(results[f"sharded:{name}"], results[f"functions:{name}"], rtol=0, atol=1e-6,
                                   err_msg=name)
    assert not np.isfinite(results["overflow_norm"]) and bool(results["unchanged"])


def test_shard_sets_megatron_strategies_on_the_key_operators(work):
    model = from_pretrained(work / "init")
    model.shard(data_parallel=2, model_parallel=4)
    column, row, heads = ((2, 1), (4, 1)), ((2, 4), (1, 4)), ((2, 4, 1, 1), (2, 4, 1, 1))
    layer = model.model.layers[0]
    assert layer.attention.wq.matmul.in_strategy == column
    assert layer.attention.wk_v.matmul.in_strategy == column
    assert layer.feed_forward.w1.matmul.in_strategy == column
    assert layer.feed_forward.w3.matmul.in_strategy == column
    assert layer.attention.wo.matmul.in_strategy == row
    assert layer.feed_forward.w2.matmul.in_strategy == row
    assert layer.attention.scores_matmul.in_strategy == heads
    assert layer.attention.context_matmul.in_strategy == heads
    assert model.matmul_head.in_strategy == column
    assert model.model.tok_embeddings.gather.in_strategy == ((4, 1), (1, 1))  # vocabulary split as in the head
    assert model.model.layers[-1].attention.wo.matmul.in_strategy == row


def test_semi_auto_parallel_is_refused_on_cpu_with_the_reason(work, capsys):
    config = write_config(work, "semi_auto", parallel={"data_parallel": 1, "model_parallel": 2})
    assert main(["--config", str(config)]) == 1
    assert "runs on Ascend only (on CPU MindSpore refuses it: 'Invalid backend: CPU')" in capsys.readouterr().err
    assert not (work / "semi_auto").exists()
