"""Fault injection: one test per class of bad input or fault a user can meet, each checking the error's type and a
message that names the file, line, tensor, field or setting, and that nothing half-written is left behind. (The
training loop's faults, kill -9 included, are in test_trainer.py; int8 kernel crashes in test_quant.py.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from isolated import run_isolated
from telechat_ascend.checkpoint import find_weights
from telechat_ascend.cli import main
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.convert import convert_checkpoint
from telechat_ascend.data import prepare_data
from telechat_ascend.errors import TeleChatError
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.tokenizer import TeleChatTokenizer

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "tiny"
    init_checkpoint("tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def int8(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-int8") / "w8a16"
    assert main(["quantize", "--method", "w8a16", "--model", str(tiny), "--out", str(out)]) == 0
    return out


def damaged_copy(folder: Path, tmp_path: Path, edit=None, config=None) -> Path:
    """A copy of `folder` whose tensors went through `edit` (a dict of numpy arrays, changed in place) and whose
    config.json through `config`."""
    copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    if edit:
        tensors = dict(load_file(copy / WEIGHTS))
        edit(tensors)
        save_file(tensors, copy / WEIGHTS, metadata={"format": "pt"})
    if config:
        values = json.loads((copy / "config.json").read_text())
        config(values)
        (copy / "config.json").write_text(json.dumps(values))
    return copy


def torch_load(folder):
    from pytorch_npu.pretrained import from_pretrained
    return from_pretrained(folder)


# ---- PyTorch loading: every tensor accounted for --------------------------------------------------------------------

EMBEDDING = "transformer.word_embeddings.weight"


@pytest.mark.parametrize("edit, config, message", [
    (lambda t: t.pop("transformer.h.0.mlp.up_proj.weight"), None, "missing tensor(s): transformer.h.0.mlp.up_proj"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), None, "unexpected tensor(s): extra"),
    (None, lambda c: c.update(tie_word_embeddings=True), "hold a separate lm_head.weight, but config.json ties"),
    (None, lambda c: c.pop("tie_word_embeddings"), "hold a separate lm_head.weight, but config.json ties"),
    (None, lambda c: c.update(vocab_size=c["vocab_size"] - 8), "wrong shape for config.json"),
    (None, lambda c: c.update(ffn_hidden_size=c["ffn_hidden_size"] * 2), "wrong shape for config.json"),
    (None, lambda c: c.update(tie_word_embeddings="false"), "'tie_word_embeddings' must be true or false"),
    (None, lambda c: c.update(embed_layernorm=True), "'embed_layernorm' is true: no TeleChat release uses it"),
])
def test_torch_loading_refuses_what_transformers_would_fill_in(tiny, tmp_path, edit, config, message):
    """transformers initialises a missing tensor randomly and only warns; here each case is an error."""
    with pytest.raises(TeleChatError) as error:
        torch_load(damaged_copy(tiny, tmp_path, edit, config))
    assert message in str(error.value)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.self_attention.query.weight_scale"), "missing tensor(s): "
     "transformer.h.1.self_attention.query.weight_scale"),
    (lambda t: t["transformer.h.0.mlp.down_proj.weight_scale"].__setitem__(3, np.nan), "not positive finite"),
    (lambda t: t["transformer.h.0.mlp.down_proj.weight_scale"].__setitem__(0, 0), "not positive finite"),
    (lambda t: t["transformer.h.0.mlp.down_proj.weight_scale"].__setitem__(1, -0.5), "not positive finite"),
    (lambda t: t["transformer.h.0.mlp.down_proj.weight_scale"].__setitem__(2, np.inf), "not positive finite"),
    (lambda t: t.update({"transformer.h.0.mlp.up_proj.weight":
                         t["transformer.h.0.mlp.up_proj.weight"].astype(np.int32)}), "is int32, the int8 format"),
])
def test_damaged_int8_folders_are_refused(int8, tmp_path, edit, message):
    with pytest.raises(TeleChatError) as error:
        torch_load(damaged_copy(int8, tmp_path, edit))
    assert message in str(error.value)


def test_truncated_weights_are_named_before_transformers_reads_them(tiny, tmp_path):
    copy = damaged_copy(tiny, tmp_path)
    data = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(TeleChatError, match=r"model\.safetensors: unreadable safetensors file \(truncated"):
        torch_load(copy)


# ---- text that is not what it should be -----------------------------------------------------------------------------

def test_non_utf8_files_name_the_file_and_line(tiny, tmp_path, capsys):
    copy = damaged_copy(tiny, tmp_path)
    (copy / "config.json").write_bytes(b'{\n "n_layer": 2,\n "x": "\xff"\n}')
    with pytest.raises(TeleChatError, match=r"config\.json:3: not UTF-8 text \(byte 0xff"):
        TeleChatConfig.from_file(copy)
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_bytes(b"model:\n  preset: tiny\n# \xfe\n")
    from telechat_ascend.training import load_train_config
    with pytest.raises(TeleChatError, match=r"train\.yaml:3: not UTF-8 text"):
        load_train_config(yaml_file)
    text = tmp_path / "eval.txt"
    text.write_bytes(b"ok\n\x80")
    assert main(["eval-quant", "--float", str(tiny), "--int8", str(tiny), "--text", str(text)]) == 1
    assert "eval.txt:2: not UTF-8 text" in capsys.readouterr().err
    calib = tmp_path / "calib.jsonl"
    calib.write_bytes(b'"fine"\n"\xc3"\n')
    assert main(["quantize", "--method", "w8a8", "--model", str(tiny), "--out", str(tmp_path / "q"), "--calib",
                 str(calib)]) == 1
    assert "calib.jsonl:2: not UTF-8 text" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_lone_surrogates_are_bad_lines_and_bad_prompts(tiny, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "hi", "output": "ok"}\n{"input": "\\ud800", "output": "x"}\n', encoding="utf-8")
    with pytest.raises(TeleChatError, match=r"data\.jsonl:2: .*not valid Unicode"):
        prepare_data(data, tiny, tmp_path / "strict", 32, workers=1, progress=False)
    manifest = prepare_data(data, tiny, tmp_path / "lenient", 32, workers=1, progress=False, skip_bad=True)
    assert manifest["sources"][0]["bad"] == 1 and manifest["sources"][0]["samples"] == 1
    with pytest.raises(TeleChatError, match="not valid Unicode"):
        TeleChatTokenizer.from_pretrained(tiny).encode("a\udcff")
    # Bytes that are not UTF-8 in argv reach Python as lone surrogates.
    out = subprocess.run([sys.executable, "-m", "telechat_ascend.cli", "generate", "--model", str(tiny), "--prompt",
                          b"a\xffb"], capture_output=True, cwd=REPO, timeout=300)
    assert out.returncode == 1 and b"text is not valid Unicode" in out.stderr


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
@pytest.mark.parametrize("argv, message", [
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1, got -1"),
    (["--prompt", "x", "--do-sample", "--temperature", "-0.5"], "--temperature must be a number > 0, got -0.5"),
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be a number > 0, got 0.0"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be a number > 0 and <= 1, got 1.5"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature must be a number > 0, got nan"),
])
def test_generation_settings_are_checked_for_both_backends(tiny, capsys, backend, argv, message):
    assert main(["generate", "--backend", backend, "--model", str(tiny), *argv]) == 1
    assert message in capsys.readouterr().err


def test_mindspore_generation_functions_check_their_settings(tiny):
    from mindspore_impl import inference
    from mindspore_impl.generate import chat
    model, tokenizer = inference.load_model(tiny)
    for kwargs, message in (({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
                            ({"temperature": -1.0, "do_sample": True}, "temperature must be a number > 0"),
                            ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0")):
        with pytest.raises(TeleChatError, match=message):
            inference.generate_text(model, tokenizer, "hi", **kwargs)
        with pytest.raises(TeleChatError, match=message):
            chat(model, tokenizer, "hi", [], **kwargs)
    assert inference.generate_text(model, tokenizer, "hi", max_new_tokens=1) is not None


def test_mindspore_npu_without_ascend_is_a_clear_error(tiny, capsys):
    assert main(["generate", "--backend", "mindspore", "--model", str(tiny), "--prompt", "x", "--device", "npu"]) == 1
    assert "--device npu: MindSpore cannot reach an Ascend device here" in capsys.readouterr().err


# ---- quantize and eval-quant -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--method", "w8a16", "--alpha", "nan"], "--alpha (smoothing strength) must be a number in [0, 1], got nan"),
    (["--method", "w8a16", "--alpha", "2"], "must be a number in [0, 1], got 2.0"),
    (["--method", "w8a16", "--keep-float", "-1"], "--keep-float must be >= 0"),
])
def test_quantize_refuses_bad_numbers_before_writing(tiny, tmp_path, capsys, argv, message):
    assert main(["quantize", "--model", str(tiny), "--out", str(tmp_path / "q"), *argv]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_eval_quant_checks_its_numbers_and_that_the_int8_folder_came_from_the_float_one(tiny, int8, tmp_path,
                                                                                       capsys):
    text = REPO / "telechat_ascend" / "assets" / "tiny_corpus.txt"
    assert main(["eval-quant", "--float", str(tiny), "--int8", str(int8), "--text", str(text), "--seq-len", "0"]) == 1
    assert "--seq-len must be >= 1" in capsys.readouterr().err
    other = tmp_path / "other"
    init_checkpoint("tiny", other, seed=1, progress=False)
    assert main(["eval-quant", "--float", str(other), "--int8", str(int8), "--text", str(text),
                 "--max-tokens", "64"]) == 1
    assert f"{int8} was not quantized from {other} (their word embeddings differ)" in capsys.readouterr().err


# ---- checkpoints and folders ---------------------------------------------------------------------------------------

def test_convert_refuses_foreign_dtypes_and_its_own_source(tiny, tmp_path):
    copy = damaged_copy(tiny, tmp_path, lambda t: t.update(
        {"transformer.ln_f.weight": t["transformer.ln_f.weight"].astype(np.float64)}))
    with pytest.raises(TeleChatError, match=r"tensor transformer\.ln_f\.weight is float64; TeleChat weights are"):
        convert_checkpoint(copy, tmp_path / "out", to="mindspore")
    assert not (tmp_path / "out").exists()
    before = (tiny / WEIGHTS).read_bytes()
    with pytest.raises(TeleChatError, match="is the source itself"):
        convert_checkpoint(tiny, tiny, to="hf", force=True)
    assert (tiny / WEIGHTS).read_bytes() == before


def test_index_and_data_json_paths_stay_inside_their_folder(tiny, tmp_path):
    secret = tmp_path / "secret.safetensors"
    shutil.copy(tiny / WEIGHTS, secret)
    copy = damaged_copy(tiny, tmp_path)
    (copy / WEIGHTS).unlink()
    names = list(load_file(secret))
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "../secret.safetensors")}))
    with pytest.raises(TeleChatError, match=r"names '\.\./secret\.safetensors', which lies outside"):
        find_weights(copy)
    sources = tmp_path / "sources"
    sources.mkdir()
    (tmp_path / "outside.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (sources / "data.json").write_text(json.dumps({"../outside.jsonl": 1}))
    with pytest.raises(TeleChatError, match=r"names '\.\./outside\.jsonl', which lies outside"):
        prepare_data(sources / "data.json", tiny, tmp_path / "d", 32, workers=1, progress=False)
    (sources / "data.json").write_text(json.dumps({"../outside.jsonl": 1e9}))
    with pytest.raises(TeleChatError, match="must be a positive number of at most 1000"):
        prepare_data(sources / "data.json", tiny, tmp_path / "d", 32, workers=1, progress=False)


def test_output_paths_that_are_files_or_cannot_be_written(tiny, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    for argv, message in ((["convert", "--to", "hf", str(tiny), str(tmp_path / "a-file"), "--force"],
                           "a-file is a file, not a folder"),
                          (["convert", "--to", "hf", str(tiny), str(tmp_path / "a-file" / "sub")], "cannot write there"),
                          (["init", "--preset", "tiny", "--out", str(tmp_path / "a-file"), "--force", "--quiet"],
                           "a-file is a file, not a folder")):
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "keep me"


FULL_DISK = """
import resource, signal, sys
from telechat_ascend.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_convert_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, "convert", "--to", "mindspore", "--quiet", str(tiny),
                           str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr
    assert f"{out}: writing failed (File too large); nothing was written there" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_convert_leaves_no_partial_folder_for_long(tiny, tmp_path):
    """A convert killed mid-write leaves `.NAME.partial-PID-*`; the next write into that folder removes it once
    that process is gone (and leaves one of a live process alone)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.partial-{dead}-x1y2"
    (stale / "half").mkdir(parents=True)
    live = tmp_path / f".other.partial-{subprocess.os.getpid()}-a"
    live.mkdir()
    convert_checkpoint(tiny, tmp_path / "out", to="hf")
    assert not stale.exists() and live.exists()


def test_legacy_bin_weights_load(tiny, tmp_path):
    """A pre-zip torch.save file (read whole: it cannot be memory-mapped), still with weights_only (malicious
    pickles: test_convert.test_bin_weights_are_never_unpickled)."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny / "config.json", legacy)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in load_file(tiny / WEIGHTS).items()}
    torch.save(tensors, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    convert_checkpoint(legacy, tmp_path / "from-legacy", to="hf")
    assert all(np.array_equal(v, load_file(tiny / WEIGHTS)[k])
               for k, v in load_file(tmp_path / "from-legacy" / WEIGHTS).items())


def test_init_tokenizer_config_points_at_no_remote_code(tiny):
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    from transformers import AutoTokenizer
    with pytest.raises(ValueError, match="TelechatTokenizer"):  # a clean refusal, never an interactive question
        AutoTokenizer.from_pretrained(tiny, trust_remote_code=False)


# ---- native memory ---------------------------------------------------------------------------------------------

def test_mindspore_parameters_own_their_memory(tiny, tmp_path):
    """The MindSpore backend copies weights out of the memory-mapped file (its CPU kernels then never see the
    file's alignment, and a file changed on disk after loading changes nothing)."""
    copy = damaged_copy(tiny, tmp_path)
    out = run_isolated(f"""
        import numpy as np
        from mindspore_impl import from_pretrained
        model = from_pretrained(r"{copy}")
        before = {{n: p.asnumpy().copy() for n, p in model.parameters_and_names()}}
        from telechat_ascend.checkpoint import _safetensors_header
        for tensor in _safetensors_header(__import__("pathlib").Path(r"{copy / WEIGHTS}")):
            mapped = np.memmap(r"{copy / WEIGHTS}", tensor.dtype, "r+", offset=tensor.offset, shape=tensor.shape)
            mapped[...] = 7
            mapped.flush()
        print(all(np.array_equal(before[n], p.asnumpy()) for n, p in model.parameters_and_names()))
    """)
    assert out.strip().endswith("True")
