"""The benchmark summary's bookkeeping (the measurements themselves are benchmarks, not tests)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402
import train_step  # noqa: E402


def test_summary_table_judges_each_goal_and_leaves_out_what_did_not_run(tmp_path):
    results = {"train_step": {"ours_vs_published": 1.3, "ours_vs_roofline": 0.71},
               "int8_cpu": {"w8a8_1000": {"prefill_vs_fp32": 2.0}, "w8a16_100": {"prefill_vs_fp32": 0.8}}}
    rows = {label: (value, goal, verdict) for label, value, goal, verdict in run_all.table(results)}
    assert rows["train step: ours / published code"] == ("1.30x", "≥ 1.25x", "met")
    assert rows["train step: of the GEMM roofline"] == ("71%", "≥ 90%", "missed")
    assert rows["w8a8 prefill 1000 tokens: / fp32"] == ("2.00x", "≥ 1.20x", "met")
    assert rows["w8a16 prefill 100 tokens: / fp32"] == ("0.80x", "", "")  # reported, no goal at 100 tokens
    assert len(rows) == 4  # rows of benchmarks that did not run (or lack the figure) are left out
    run_all.plot(run_all.table(results), "test machine", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_code_folder_must_hold_the_published_files(tmp_path):
    (tmp_path / "modeling_telechat.py").write_text("")
    with pytest.raises(SystemExit, match=r"no configuration_telechat.py, generation_utils.py; pass the folder"):
        train_step.load_published_code(tmp_path)
