import json
import math

import pytest

from telechat_ascend import TeleChatError
from telechat_ascend.cli import main
from telechat_ascend.parity import compare_losses, read_losses
from telechat_ascend.throughput import flops_per_token, matmul_flops_per_token
from telechat_ascend.config import TeleChatConfig


def write_json_log(path, losses, **extra):
    path.write_text("".join(json.dumps({"step": s, "loss": l, **extra}) + "\n" for s, l in losses.items()))
    return path


def test_reads_the_published_deepspeed_console_format(tmp_path):
    log = tmp_path / "ds.log"
    log.write_text(
        "[2024-01-01 10:00:00] [INFO] Beginning of Epoch 1/1, Total Micro Batches 80\n"
        "epoch:1, global_step:1, step:4  cur_batch_loss: 2.7512\n"
        "some other line with loss: 9.9\n"
        "epoch:1, global_step:2, step:8  cur_batch_loss: tensor(2.5031, device='cuda:0')\n"
        "epoch:1, global_step:3, step:12  cur_batch_loss: 1.5e+00\n")
    assert read_losses(log) == {1: 2.7512, 2: 2.5031, 3: 1.5}


def test_json_lines_skip_overflow_steps_and_name_bad_lines(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 9.0, "skipped": true}\n{"step": 3, "loss": 1.0}\n')
    assert read_losses(log) == {1: 2.0, 3: 1.0}
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2}\n')
    with pytest.raises(TeleChatError, match=r"run.jsonl:2: not a loss record"):
        read_losses(log)
    (tmp_path / "empty.log").write_text("nothing here\n")
    with pytest.raises(TeleChatError, match="empty.log: no losses found"):
        read_losses(tmp_path / "empty.log")


def test_thresholds_follow_the_published_criteria():
    reference = {s: 2.0 for s in range(1, 11)}
    # mean relative error: (0.015 / 2) = 0.75% and max |Δ| 0.015: pass
    assert compare_losses({s: 2.015 for s in reference}, reference).passed
    # one step 0.03 off: max |Δ| over 0.02 fails although the mean relative error is small
    one_off = {**{s: 2.0 for s in reference}, 5: 2.03}
    result = compare_losses(one_off, reference)
    assert not result.passed and result.max_abs_difference == pytest.approx(0.03)
    assert result.mean_relative_error == pytest.approx(0.03 / 2 / 10)
    # small absolute differences on a small loss: 0.015 / 1.0 = 1.5% relative: fails on the mean
    assert not compare_losses({s: 1.015 for s in reference}, {s: 1.0 for s in reference}).passed
    assert not compare_losses({**reference, 3: math.nan}, reference).passed
    with pytest.raises(TeleChatError, match="share no step"):
        compare_losses({1: 1.0}, {2: 1.0})


def test_parity_cli_writes_plot_and_verdict_and_sets_the_exit_code(tmp_path, capsys):
    reference = write_json_log(tmp_path / "a100.jsonl", {s: 3.0 - 0.1 * s for s in range(1, 21)})
    good = write_json_log(tmp_path / "npu.jsonl", {s: 3.0 - 0.1 * s + 0.005 for s in range(1, 21)})
    bad = write_json_log(tmp_path / "bad.jsonl", {s: 3.0 - 0.09 * s for s in range(1, 21)})
    assert main(["parity", "--log", str(good), "--reference", str(reference), "--plot", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "v.json")]) == 0
    assert capsys.readouterr().out.startswith("PASS: 20 common steps")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] is True and verdict["max_abs_difference"] == pytest.approx(0.005)
    assert main(["parity", "--log", str(bad), "--reference", str(reference)]) == 1
    assert capsys.readouterr().out.startswith("FAIL")
    # --steps N compares the first N steps only (the bad log drifts by 0.01 a step)
    assert main(["parity", "--log", str(bad), "--reference", str(reference), "--steps", "1"]) == 0
    assert capsys.readouterr().out.startswith("PASS: 1 common steps")
    assert main(["parity", "--log", str(bad), "--reference", str(reference), "--steps", "0"]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_bench_scales_the_published_figures_and_computes_mfu(tmp_path, capsys):
    # 8 devices at seq 2048, 7.98 samples/s: the published MindSpore 7B figure, so the ratio is 1.
    records = [{"step": s, "loss": 1.0, "samples_per_s": 7.98, "tokens_per_s": 7.98 * 2048, "world_size": 8,
                "seq_len": 2048} for s in range(1, 5)]
    records[0]["samples_per_s"] = 1.0  # compilation step, left out
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["bench", "--log", str(log), "--model", "7B", "--compare", "7B", "--peak-tflops", "313"]) == 0
    out = capsys.readouterr().out
    assert "7.980 samples/s" in out
    ms_row = next(line for line in out.splitlines() if "MindSpore" in line)
    assert ms_row.split()[-1] == "1.000"
    seven = TeleChatConfig.preset("7B")
    per_token = 6 * 7_200_018_432 + 12 * 30 * 4096 * 2048
    assert flops_per_token(seven, 2048) == per_token
    assert f"MFU {7.98 * 2048 / 8 * per_token / 313e12:.1%}" in out
    # On 4 devices at seq 1024 the published 8×2048 rate scales by 4/8 × 2048/1024 = 1.
    assert main(["bench", "--log", str(log), "--model", "7B", "--devices", "4", "--seq-len", "1024",
                 "--compare", "7B"]) == 0
    assert "8.860" in capsys.readouterr().out


def test_matmul_flops_count_the_published_parameters_in_linear_layers():
    """From the published parameter counts (telechat/README): all but the norms, the biases and, untied, the input
    embedding (a lookup) are matmul weights; a tied 7B head is the embedding, multiplied once."""
    seven, twelve = TeleChatConfig.preset("7B"), TeleChatConfig.preset("12B")
    seven_matmul = 7_200_018_432 - (2 * 30 + 1) * 4096 - 2 * 30 * 4096
    assert matmul_flops_per_token(seven, 2048) == 6 * seven_matmul + 12 * 30 * 4096 * 2048
    twelve_matmul = 12_386_432_000 - 120000 * 5120 - (2 * 38 + 1) * 5120 - 2 * 38 * 5120
    assert matmul_flops_per_token(twelve, 1024) == 6 * twelve_matmul + 12 * 38 * 5120 * 1024


def test_bench_needs_device_count_and_sequence_length(tmp_path, capsys):
    log = write_json_log(tmp_path / "run.jsonl", {1: 1.0}, samples_per_s=1.0, tokens_per_s=100.0)
    assert main(["bench", "--log", str(log), "--model", "tiny"]) == 1
    assert "pass --devices and --seq-len" in capsys.readouterr().err
