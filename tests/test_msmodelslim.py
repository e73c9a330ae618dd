"""msModelSlim folders (MindIE's and vllm-ascend's int8 format): written by `quantize --format msmodelslim` and
`convert --to msmodelslim`, checked tensor by tensor against the layout written out here and against what
vllm-ascend's own W8A8 / W8A16 schemes declare (read from its release source), loaded back by our backend with the
logits of our int8 folder, and bad folders refused by name."""

import ast
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import pytorch_npu.modeling_telechat  # noqa: F401  (registers TeleChat with transformers)
import vllm_ascend_source
from pytorch_npu.quantize import quantize_folder
from telechat_ascend.cli import main
from telechat_ascend.errors import TeleChatError
from telechat_ascend.initialize import init_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPT = torch.tensor([[5, 17, 400, 33, 250, 7, 91, 120, 8, 14, 25, 61, 99, 300, 12, 13, 40, 41, 42, 43]])
LINEARS = ("self_attention.query", "self_attention.key_value", "self_attention.dense", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """fp16 float folders in the 12B layout (prefixed, untied) and the 7B one (unprefixed, tied), a calibration file,
    and for each: our int8 folder and the msModelSlim one quantize writes, per method."""
    base = tmp_path_factory.mktemp("msmodelslim")
    (base / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                              ("hello world, this is calibration", "more text 123 and some words")))
    out = {}
    for layout, preset in (("12B", "tiny"), ("7B", "tiny-7B")):
        src = init_checkpoint(preset, base / f"{layout}-float", seed=2, dtype="fp16")
        for method in ("w8a8", "w8a16"):
            calib = base / "calib.jsonl" if method == "w8a8" else None
            ours = base / f"{layout}-{method}"
            quantize_folder(src, ours, method, calib)
            quantize_folder(src, base / f"{layout}-{method}-ms", method, calib, fmt="msmodelslim")
            out[layout, method] = src, ours, base / f"{layout}-{method}-ms"
    return out


def tensors(folder):
    index = json.loads((folder / "quant_model_weights.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / file))
    assert set(state) == set(index["weight_map"])
    return state


@pytest.mark.parametrize("layout", ["12B", "7B"])
@pytest.mark.parametrize("method", ["w8a8", "w8a16"])
def test_round_trip_gives_our_int8_logits(folders, layout, method):
    _, ours, ms = folders[layout, method]
    a, b = AutoModelForCausalLM.from_pretrained(ours), AutoModelForCausalLM.from_pretrained(ms)
    with torch.no_grad():
        assert torch.equal(a(PROMPT).logits, b(PROMPT).logits)  # prefill (dequant path)
        assert torch.equal(a(PROMPT[:, :3]).logits, b(PROMPT[:, :3]).logits)  # decode-sized: the int8 kernel


@pytest.mark.parametrize("method", ["w8a8", "w8a16"])
def test_convert_writes_the_same_folder_as_quantize(folders, tmp_path, method):
    _, ours, ms = folders["12B", method]
    main(["convert", "--to", "msmodelslim", str(ours), str(tmp_path / "c")])
    assert (tmp_path / "c" / "quant_model_description.json").read_text() == \
        (ms / "quant_model_description.json").read_text()
    converted, written = tensors(tmp_path / "c"), tensors(ms)
    assert converted.keys() == written.keys() and all(np.array_equal(converted[k], written[k]) for k in written)


@pytest.mark.parametrize("layout", ["12B", "7B"])
def test_w8a8_layout_as_documented(folders, layout):
    src, ours, ms = folders[layout, "w8a8"]
    state, description = tensors(ms), json.loads((ms / "quant_model_description.json").read_text())
    config = json.loads((ms / "config.json").read_text())
    assert config["quantize"] == "w8a8" and "quantization" not in config and config["torch_dtype"] == "float16"
    assert description["model_quant_type"] == "W8A8"
    assert all(name.startswith(("transformer.", "lm_head")) for name in state)  # vLLM's module names
    assert ("lm_head.weight" in state) == (layout == "12B")  # the tied 7B head is stored once
    assert set(description) - {"model_quant_type", "version", "group_size"} == set(state)
    ours_state = load_file(ours / "model.safetensors")  # save_pretrained writes our model's (prefixed) names
    for i in range(2):
        for linear in LINEARS:
            m = f"transformer.h.{i}.{linear}"
            o = m
            n, k = ours_state[o + ".weight"].shape
            assert all(description[m + f] == "W8A8" for f in (".weight", ".weight_scale", ".deq_scale", ".quant_bias"))
            assert np.array_equal(state[m + ".weight"], ours_state[o + ".weight"])
            assert state[m + ".weight_scale"].dtype == np.float16 and state[m + ".weight_scale"].shape == (n, 1)
            assert not state[m + ".weight_offset"].any() and not state[m + ".input_offset"].any()
            input_scale = float(ours_state[o + ".input_scale"])
            assert state[m + ".input_scale"].tolist() == [input_scale]  # fp16-representable, so exact
            deq = np.float32(input_scale) * ours_state[o + ".weight_scale"].astype(np.float32)
            stored = state[m + ".deq_scale"]
            assert stored.dtype == np.int64
            decoded = [struct.unpack("<f", struct.pack("<I", int(v)))[0] for v in stored]  # the fp32 bit pattern
            assert np.array_equal(np.float32(decoded), deq)
            bias = ours_state.get(o + ".bias", np.zeros(n, np.float16)).astype(np.float32)
            assert np.array_equal(state[m + ".quant_bias"], np.round(bias / deq).astype(np.int32))
            assert (m + ".bias" in state) == linear.endswith(("dense", "down_proj"))
            if m + ".bias" in state:
                assert description[m + ".bias"] == "FLOAT"


@pytest.mark.parametrize("chip, method", [("a2", "w8a8"), ("a2", "w8a16"), ("310p", "w8a8")])
def test_tensors_are_what_vllm_ascend_declares(folders, chip, method):
    """Every tensor of every quantized linear has the name, dtype and shape vllm-ascend's scheme creates for it
    (fp16 model), and vllm-ascend's own description lookup gives each of our vLLM model's layers the scheme,
    including the fused gate_up_proj through the model's packed_modules_mapping."""
    try:
        vllm_ascend_source.sdist_path()
    except vllm_ascend_source.SourceUnavailable as error:
        pytest.skip(str(error))
    _, _, ms = folders["12B", method]
    state, description = tensors(ms), json.loads((ms / "quant_model_description.json").read_text())
    scheme = method.upper()
    for i in range(2):
        for linear in LINEARS:
            m = f"transformer.h.{i}.{linear}"
            n, k = state[m + ".weight"].shape
            declared = vllm_ascend_source.declared_parameters(chip, scheme, k, n, torch.float16)
            ours = {name.removeprefix(m + "."): (torch.from_numpy(np.asarray(v)).dtype, v.shape)
                    for name, v in state.items() if name.startswith(m + ".") and name != m + ".bias"}
            assert ours == declared, m
    packed = packed_modules_mapping()
    assert packed == {"gate_up_proj": ["gate_proj", "up_proj"]}
    for prefix in ("self_attention.query", "self_attention.key_value", "self_attention.dense", "mlp.gate_up_proj",
                   "mlp.down_proj"):
        assert vllm_ascend_source.linear_quant_type(description, f"transformer.h.1.{prefix}", packed) == scheme


def packed_modules_mapping():
    """TelechatForCausalLM.packed_modules_mapping of our vLLM model, read from its source (vLLM is not installed in
    this environment)."""
    tree = ast.parse((REPO / "pytorch_npu" / "vllm_telechat.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TelechatForCausalLM")
    node = next(n for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == "packed_modules_mapping")
    return ast.literal_eval(node.value)


def rewrite(folder, edit):
    index = json.loads((folder / "quant_model_weights.safetensors.index.json").read_text())
    file = folder / next(iter(set(index["weight_map"].values())))
    state = load_file(file)
    edit(state)
    save_file(state, file)


def test_bad_msmodelslim_folders_are_refused_by_name(folders, tmp_path):
    _, _, ms = folders["12B", "w8a8"]
    cases = [
        (lambda s: s.__setitem__("transformer.h.0.mlp.up_proj.input_offset", np.ones(1, np.int8)),
         "transformer.h.0.mlp.up_proj.input_offset is 1: asymmetric activations are not supported"),
        (lambda s: s.__setitem__("transformer.h.1.self_attention.dense.deq_scale",
                                 s["transformer.h.1.self_attention.dense.deq_scale"] + (1 << 23)),  # ×2
         "transformer.h.1.self_attention.dense.deq_scale is not input_scale · weight_scale"),
        (lambda s: s.pop("transformer.h.0.self_attention.query.quant_bias"),
         "transformer.h.0.self_attention.query lacks quant_bias"),
    ]
    for i, (edit, message) in enumerate(cases):
        folder = tmp_path / str(i)
        shutil.copytree(ms, folder)
        rewrite(folder, edit)
        if "quant_bias" in message:  # the index must agree with the file for the loader to reach the module
            index = folder / "quant_model_weights.safetensors.index.json"
            data = json.loads(index.read_text())
            del data["weight_map"]["transformer.h.0.self_attention.query.quant_bias"]
            index.write_text(json.dumps(data))
        with pytest.raises(TeleChatError, match=message):
            AutoModelForCausalLM.from_pretrained(folder)
    folder = tmp_path / "w4a8"
    shutil.copytree(ms, folder)
    path = folder / "quant_model_description.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_quant_type": "W4A8_DYNAMIC"}))
    with pytest.raises(TeleChatError, match="model_quant_type 'W4A8_DYNAMIC' is not supported"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_msmodelslim_options_are_checked_before_any_work(folders, tmp_path, capsys):
    src, ours, _ = folders["12B", "w8a16"]
    with pytest.raises(TeleChatError, match="--format msmodelslim takes --method w8a8 or w8a16 per channel"):
        quantize_folder(src, tmp_path / "a", "w8a16", group_size=32, fmt="msmodelslim")
    with pytest.raises(TeleChatError, match="already exists; pass --force"):
        quantize_folder(src, ours, "w8a16", fmt="msmodelslim")
    assert main(["convert", "--to", "msmodelslim", str(src), str(tmp_path / "b")]) == 1
    assert "not an int8 folder of `telechat-ascend quantize`" in capsys.readouterr().err
    grouped = tmp_path / "grouped"  # as quantize --group-size 32 records it (the tensors are not reached)
    shutil.copytree(ours, grouped)
    config = json.loads((grouped / "config.json").read_text())
    config["quantization"]["group_size"] = 32
    (grouped / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--to", "msmodelslim", str(grouped), str(tmp_path / "c")]) == 1
    assert "group_size 32: vllm-ascend's W8A16 takes per-channel scales only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("chip, method, group, fmt, refused", [
    ("310p", "w8a16", 0, "ours", None), ("310p", "w8a8", 0, "ours", None), ("310p", "w8a8", 0, "msmodelslim", None),
    ("310p", "w8a16", 128, "gptq", "takes no antiquant_group_size"), ("310p", "w4a16", 128, "gptq", "no int4"),
    ("310p", "w8a16", 0, "msmodelslim", "W8A8, W8A8_DYNAMIC, W8A8S and W8A8SC only"),
    ("910b", "w4a16", 128, "gptq", None), ("910b", "w8a16", 0, "msmodelslim", None), (None, "w8a16", 32, "ours", None),
])
def test_chip_policy(chip, method, group, fmt, refused):
    from telechat_ascend.chips import check_quantization_for_chip
    if refused is None:
        check_quantization_for_chip(chip, method, group, fmt)
    else:
        with pytest.raises(TeleChatError, match=refused):
            check_quantization_for_chip(chip, method, group, fmt)


def test_quantize_for_310p_in_msmodelslim_takes_w8a8_only(folders, tmp_path):
    src, _, _ = folders["12B", "w8a16"]
    with pytest.raises(TeleChatError, match="vllm-ascend on Atlas 300I \\(310P\\) loads"):
        quantize_folder(src, tmp_path / "a", "w8a16", soc="310p", fmt="msmodelslim")
    assert not (tmp_path / "a").exists()
