"""HF ⇄ MindSpore conversion on tiny checkpoints, checked with the frameworks' own loaders."""

import json
import shutil

import mindspore
import numpy as np
import pytest
import torch
from checkpoint_files import load_safetensors_folder, write_bin_shards

from telechat_ascend import TeleChatError, convert_checkpoint
from telechat_ascend.cli import main
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.mindspore_ckpt import Checkpoint, CkptWriter, read_ckpt

# Layer 0 of the MindFormers research/telechat names, written out by hand (not taken from the code's table).
MINDFORMERS_LAYER_0 = {
    "h.0.input_layernorm.weight": "model.layers.0.attention_norm.weight",
    "h.0.self_attention.query.weight": "model.layers.0.attention.wq.weight",
    "h.0.self_attention.key_value.weight": "model.layers.0.attention.wk_v.weight",
    "h.0.self_attention.dense.weight": "model.layers.0.attention.wo.weight",
    "h.0.self_attention.dense.bias": "model.layers.0.attention.wo.bias",
    "h.0.post_attention_layernorm.weight": "model.layers.0.ffn_norm.weight",
    "h.0.mlp.gate_proj.weight": "model.layers.0.feed_forward.w1.weight",
    "h.0.mlp.up_proj.weight": "model.layers.0.feed_forward.w3.weight",
    "h.0.mlp.down_proj.weight": "model.layers.0.feed_forward.w2.weight",
    "h.0.mlp.down_proj.bias": "model.layers.0.feed_forward.w2.bias",
    "word_embeddings.weight": "model.tok_embeddings.embedding_weight",
    "ln_f.weight": "model.norm_out.weight",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12B-style: untied head, `transformer.` keys, sharded safetensors."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("init") / "tiny", seed=1, max_shard_size="3MB")


@pytest.fixture(scope="module")
def tiny_7b(tmp_path_factory):
    """7B-style: tied head, unprefixed keys, one safetensors file."""
    return init_checkpoint("tiny-7B", tmp_path_factory.mktemp("init") / "tiny-7B", seed=2)


def load_mindspore_folder(folder):
    files = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("*.safetensors"))
    fmt = "ckpt" if files[0].suffix == ".ckpt" else "safetensors"
    params = {}
    for path in files:
        params.update(mindspore.load_checkpoint(str(path), format=fmt))
    return params


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)  # the same tensor names (file formats order them differently)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("model", ["tiny", "tiny_7b"])
def test_hf_to_mindspore_to_hf_is_bit_exact(request, tmp_path, model, fmt):
    source = request.getfixturevalue(model)
    convert_checkpoint(source, tmp_path / "ms", to="mindspore", fmt=fmt, max_shard_size="2MB")
    convert_checkpoint(tmp_path / "ms", tmp_path / "hf", to="hf")
    assert_bit_identical(load_safetensors_folder(source), load_safetensors_folder(tmp_path / "hf"))
    for side_file in ("config.json", "generation_config.json", "tokenizer.model"):
        assert (tmp_path / "hf" / side_file).read_bytes() == (source / side_file).read_bytes()
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_mindspore_load_checkpoint_reads_the_converted_model(tiny, tmp_path, fmt):
    convert_checkpoint(tiny, tmp_path / "ms", to="mindspore", fmt=fmt, max_shard_size="2MB")
    params = load_mindspore_folder(tmp_path / "ms")
    hf = load_safetensors_folder(tiny)
    assert len(params) == len(hf) == 2 + 2 * 10 + 1
    for hf_name, ms_name in {**MINDFORMERS_LAYER_0, "lm_head.weight": "lm_head.weight"}.items():
        key = hf_name if hf_name == "lm_head.weight" else "transformer." + hf_name
        np.testing.assert_array_equal(params[ms_name].asnumpy(), hf[key])


def test_seven_b_style_round_trip_has_no_prefix_and_no_head(tiny_7b, tmp_path):
    convert_checkpoint(tiny_7b, tmp_path / "ms", to="mindspore")
    assert "lm_head.weight" not in load_mindspore_folder(tmp_path / "ms")
    convert_checkpoint(tmp_path / "ms", tmp_path / "hf", to="hf")
    names = set(load_safetensors_folder(tmp_path / "hf"))
    assert "word_embeddings.weight" in names and "lm_head.weight" not in names
    assert not any(name.startswith("transformer.") for name in names)


def test_dtype_cast_rounds_like_torch(tiny, tmp_path):
    convert_checkpoint(tiny, tmp_path / "ms", to="mindspore", dtype="bf16")
    params = load_mindspore_folder(tmp_path / "ms")
    hf = load_safetensors_folder(tiny)
    name = "transformer.h.1.mlp.down_proj.weight"
    expected = torch.from_numpy(hf[name]).to(torch.bfloat16).float().numpy()
    got = params["model.layers.1.feed_forward.w2.weight"]
    assert got.dtype == mindspore.bfloat16
    np.testing.assert_array_equal(got.float().asnumpy(), expected)


def test_large_tensors_are_split_as_mindspore_does(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("telechat_ascend.mindspore_ckpt.SLICE_BYTES", 100_000)
    convert_checkpoint(tiny, tmp_path / "ms", to="mindspore")
    params = load_mindspore_folder(tmp_path / "ms")
    np.testing.assert_array_equal(params["model.tok_embeddings.embedding_weight"].asnumpy(),
                                  load_safetensors_folder(tiny)["transformer.word_embeddings.weight"])


def test_ckpt_records_are_framed_as_protobuf_would(tmp_path):
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    writer = CkptWriter(tmp_path / "one.ckpt")
    writer.add("model.norm_out.weight", array)
    writer.close()
    message = Checkpoint()
    value = message.value.add(tag="model.norm_out.weight")
    value.tensor.dims.extend([3, 4])
    value.tensor.tensor_type = "Float16"
    value.tensor.tensor_content = array.tobytes()
    assert (tmp_path / "one.ckpt").read_bytes() == message.SerializeToString()


def test_reads_checkpoints_written_by_mindspore(tmp_path):
    weights = {"a": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
               "b": np.arange(4, dtype=np.int32)}
    mindspore.save_checkpoint([{"name": k, "data": mindspore.Tensor(v)} for k, v in weights.items()],
                              str(tmp_path / "ms.ckpt"))
    read = dict(read_ckpt(tmp_path / "ms.ckpt"))
    assert set(read) == {"a", "b"}
    for name, array in weights.items():
        np.testing.assert_array_equal(read[name], array)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_bin_folder_converts_to_safetensors_and_mindspore(tiny, tmp_path, dtype):
    expected = write_bin_shards(tiny, tmp_path / "bin", dtype)
    convert_checkpoint(tmp_path / "bin", tmp_path / "hf", to="hf")
    converted = load_safetensors_folder(tmp_path / "hf")
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert converted[name].tobytes() == tensor.numpy().tobytes() if dtype == torch.float16 else \
            converted[name].tobytes() == tensor.view(torch.int16).numpy().tobytes()
    convert_checkpoint(tmp_path / "bin", tmp_path / "ms", to="mindspore")
    ms = load_mindspore_folder(tmp_path / "ms")
    assert ms["model.layers.0.attention.wk_v.weight"].float().asnumpy().tobytes() == \
        expected["transformer.h.0.self_attention.key_value.weight"].float().numpy().tobytes()


def test_bin_weights_are_never_unpickled(tiny, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder)
    torch.save({"transformer.word_embeddings.weight": Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(TeleChatError, match=r"pytorch_model.bin: unreadable pytorch weights file"):
        convert_checkpoint(folder, tmp_path / "out", to="hf")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def rewrite_without(source, folder, drop=(), add=None):
    """A single-file HF folder holding the source's tensors minus `drop`, plus `add`."""
    from safetensors.numpy import save_file
    folder.mkdir()
    tensors = {n: t for n, t in load_safetensors_folder(source).items() if n not in drop}
    save_file({**tensors, **(add or {})}, folder / "model.safetensors")
    shutil.copy(source / "config.json", folder)
    return folder


def convert_fails(src, dst, match, **kwargs):
    with pytest.raises(TeleChatError, match=match):
        convert_checkpoint(src, dst, **{"to": "mindspore", **kwargs})
    assert not dst.exists()
    assert no_leftovers(dst.parent) == []


def test_missing_tensor_is_named(tiny, tmp_path):
    src = rewrite_without(tiny, tmp_path / "src", drop={"transformer.h.1.mlp.up_proj.weight"})
    convert_fails(src, tmp_path / "out", r"missing tensor\(s\): transformer.h.1.mlp.up_proj.weight")


def test_unexpected_tensor_is_named(tiny, tmp_path):
    src = rewrite_without(tiny, tmp_path / "src", add={"transformer.h.0.extra.weight": np.zeros(2, np.float32)})
    convert_fails(src, tmp_path / "out", r"unexpected tensor\(s\): transformer.h.0.extra.weight")


def test_tied_config_with_a_head_explains_itself(tiny_7b, tmp_path):
    src = rewrite_without(tiny_7b, tmp_path / "src", add={"lm_head.weight": np.zeros((4096, 256), np.float32)})
    convert_fails(src, tmp_path / "out", r"unexpected tensor\(s\): lm_head.weight \(config.json ties lm_head")


def test_shape_disagreeing_with_config_is_named(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "ffn_hidden_size": 700}))
    convert_fails(src, tmp_path / "out", r"tensor transformer.h.0.mlp.gate_proj.weight has shape \[688, 256\] but "
                                         r"config.json implies \[700, 256\]")


def test_truncated_safetensors_shard_is_named(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    convert_fails(src, tmp_path / "out", f"{shard.name}: unreadable safetensors file")


def test_truncated_and_corrupt_ckpt_are_named(tiny, tmp_path):
    convert_checkpoint(tiny, tmp_path / "ms", to="mindspore")
    ckpt = tmp_path / "ms" / "mindspore_model.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-5000])
    convert_fails(tmp_path / "ms", tmp_path / "out", r"mindspore_model.ckpt: truncated at offset \d+", to="hf")
    ckpt.write_bytes(b"\x00garbage" + data)
    convert_fails(tmp_path / "ms", tmp_path / "out", r"mindspore_model.ckpt: not a MindSpore checkpoint", to="hf")


def test_index_naming_a_missing_shard_is_named(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    convert_fails(src, tmp_path / "out", f"model.safetensors.index.json: names shard {shard.name}, which does not "
                                         f"exist")


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(TeleChatError, match="already exists; pass --force"):
        convert_checkpoint(tiny, out, to="mindspore")
    assert (out / "keep.txt").read_text() == "precious"
    convert_checkpoint(tiny, out, to="mindspore", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "mindspore_model.ckpt",
                                                    "tokenizer.model", "tokenizer_config.json"]
    assert no_leftovers(tmp_path) == []


def test_failed_forced_conversion_keeps_the_old_output(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = rewrite_without(tiny, tmp_path / "src", drop={"transformer.ln_f.weight"})
    with pytest.raises(TeleChatError, match="transformer.ln_f.weight"):
        convert_checkpoint(src, out, to="mindspore", force=True)
    assert (out / "keep.txt").read_text() == "precious"


def test_training_state_in_a_mindspore_checkpoint_is_dropped_and_counted(tiny, tmp_path, capsys):
    convert_checkpoint(tiny, tmp_path / "ms", to="mindspore")
    ckpt = tmp_path / "ms" / "mindspore_model.ckpt"
    params = list(read_ckpt(ckpt))
    writer = CkptWriter(ckpt)
    for name, array in params:
        writer.add(name, array)
        writer.add("adam_m." + name, np.zeros_like(array))
    writer.add("global_step", np.array([7], dtype=np.int32))
    writer.close()
    assert main(["convert", "--to", "hf", "--quiet", str(tmp_path / "ms"), str(tmp_path / "hf")]) == 0
    assert f"dropped {len(params) + 1} training-state entries" in capsys.readouterr().out
    assert_bit_identical(load_safetensors_folder(tiny), load_safetensors_folder(tmp_path / "hf"))


def test_cli_reports_errors_with_nonzero_exit(tiny, tmp_path, capsys):
    assert main(["convert", "--to", "mindspore", "--quiet", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    assert main(["convert", "--to", "mindspore", "--quiet", str(tiny), str(tmp_path / "out")]) == 0
    assert main(["convert", "--to", "mindspore", "--quiet", str(tiny), str(tmp_path / "out")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
