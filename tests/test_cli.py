import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint_files import load_safetensors_folder as load

from telechat_ascend.cli import main


@pytest.fixture(scope="module")
def tiny_seed0(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_init_is_deterministic_per_seed(tiny_seed0, tmp_path):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert main(["init", "--preset", "tiny", "--seed", "1", "--out", str(tmp_path / "other"), "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tiny_seed0 / "model.safetensors").read_bytes()
    a, b = load(tiny_seed0), load(tmp_path / "other")
    assert not np.array_equal(a["transformer.h.0.self_attention.query.weight"],
                              b["transformer.h.0.self_attention.query.weight"])


def test_init_follows_the_published_initialisation(tiny_seed0):
    tensors = load(tiny_seed0)
    assert len(tensors) == 1 + 2 * 10 + 2  # embeddings, 2 blocks, ln_f, untied head
    matrices = np.concatenate([t.ravel() for n, t in tensors.items() if t.ndim == 2])
    assert abs(matrices.mean()) < 1e-4
    assert matrices.std() == pytest.approx(0.02, rel=0.01)
    for name, tensor in tensors.items():
        assert tensor.dtype == np.float32
        if name.endswith(".bias"):
            assert not tensor.any(), name
        elif tensor.ndim == 1:
            assert (tensor == 1).all(), name
    config = json.loads((tiny_seed0 / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["model_type"] == "telechat"
    generation = json.loads((tiny_seed0 / "generation_config.json").read_text())
    assert (generation["user_token_id"], generation["bot_token_id"], generation["eos_token_id"]) == (20, 21, 2)
    assert (tiny_seed0 / "tokenizer.model").is_file()


def test_init_dtype_holds_the_same_values_rounded(tiny_seed0, tmp_path):
    assert main(["init", "--preset", "tiny", "--dtype", "fp16", "--out", str(tmp_path / "half"), "--quiet"]) == 0
    half, full = load(tmp_path / "half"), load(tiny_seed0)
    for name in full:
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name], full[name].astype(np.float16))


def test_published_files_get_group_and_other_read_permission(tiny_seed0):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_seed0.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tiny_seed0 / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_info_for_a_preset(capsys):
    assert main(["info", "7B"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 7_200_018_432
    assert (info["layers"], info["hidden"], info["heads"], info["head_dim"], info["kv_heads"], info["vocab"]) == \
        (30, 4096, 32, 128, 32, 160256)
    assert info["tied"] is True and info["key_style"] == "unprefixed"
    assert info["rope"]["4096"]["base"] == pytest.approx(30527.7, abs=0.06)
    assert info["rope"]["8192"]["base"] == pytest.approx(30527.7, abs=0.06)
    assert info["rope"]["16384"]["base"] == pytest.approx(72195.9, abs=0.06)
    assert info["rope"]["32768"]["base"] == pytest.approx(156588.3, abs=0.06)


def test_info_for_a_folder_reads_its_weights(tiny_seed0, capsys, tmp_path):
    assert main(["info", str(tiny_seed0)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key_style"] == "transformer.-prefixed" and info["weights_format"] == "safetensors"
    assert info["parameters"] == sum(t.size for t in load(tiny_seed0).values())
    assert main(["convert", "--to", "mindspore", "--quiet", str(tiny_seed0), str(tmp_path / "ms")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ms")]) == 0
    assert json.loads(capsys.readouterr().out)["key_style"] == "mindspore"


def test_info_of_an_unknown_model_fails_cleanly(capsys, tmp_path):
    assert main(["info", str(tmp_path)]) == 1
    assert "config.json: not found" in capsys.readouterr().err


def test_shared_core_works_without_torch_or_mindspore(tmp_path):
    """Blocks both frameworks, then runs the shared core end to end in a fresh interpreter."""
    script = f"""
import sys
sys.modules["torch"] = None
sys.modules["mindspore"] = None
import telechat_ascend
from telechat_ascend.cli import main
assert main(["init", "--preset", "tiny-7B", "--out", r"{tmp_path / 'hf'}", "--quiet"]) == 0
assert main(["convert", "--to", "mindspore", "--quiet", r"{tmp_path / 'hf'}", r"{tmp_path / 'ms'}"]) == 0
assert main(["convert", "--to", "hf", "--quiet", r"{tmp_path / 'ms'}", r"{tmp_path / 'back'}"]) == 0
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_console_script_is_installed():
    result = subprocess.run(["telechat-ascend", "info", "tiny"], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == 2


HELP_CHECK = """
import sys
from telechat_ascend.cli import build_parser, main
commands = [None, *build_parser()._subparsers._group_actions[0].choices]
for command in commands:
    try:
        main(["--help"] if command is None else [command, "--help"])
    except SystemExit as done:
        assert done.code == 0, command
heavy = [m for m in ("torch", "transformers", "mindspore") if m in sys.modules]
print(" ".join(c for c in commands if c), "|", " ".join(heavy))
"""


def test_every_help_answers_without_importing_a_framework():
    out = subprocess.run([sys.executable, "-c", HELP_CHECK], capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()[-1]
    commands, heavy = out.split("|")
    assert {"quantize", "eval-quant", "generate", "prepare-data"} <= set(commands.split())  # backends' commands too
    assert heavy.strip() == ""


def test_the_core_names_no_backend_and_backends_register_through_entry_points():
    from telechat_ascend.backends import backends
    core = Path(__file__).resolve().parents[1] / "telechat_ascend"
    for path in core.glob("*.py"):
        code = [line for line in path.read_text().splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in code if "pytorch_npu" in line or "mindspore_impl" in line], path
    found = backends()
    assert sorted(found) == ["mindspore", "torch"]
    assert found["torch"].trainer[:2] == ("-m", "pytorch_npu.train") and "quantize" in found["torch"].commands
    for name in ("pytorch_npu", "mindspore_impl"):
        for path in (core.parent / name).glob("*.py"):
            assert "telechat_ascend.cli" not in path.read_text(), path  # no backend imports the core's CLI
