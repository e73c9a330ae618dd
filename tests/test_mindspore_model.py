"""The MindSpore backend against the PyTorch backend on the same weights (fp32, CPU, PYNATIVE; GRAPH in a subprocess)."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import mindspore
import numpy as np
import pytest
import torch
from mindspore import ops

import pytorch_npu.modeling_telechat  # noqa: F401  (registers model_type "telechat")
from checkpoint_files import load_safetensors_folder
from mindspore_impl import from_pretrained, save_pretrained
from mindspore_impl.generate import chat as ms_chat
from mindspore_impl.generate import generate
from pytorch_npu import TelechatForCausalLM as TorchTelechat
from telechat_ascend import convert_checkpoint
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.tokenizer import TeleChatTokenizer

PROMPT = [5, 17, 42, 3, 88, 61, 9, 33, 70, 2, 14, 95]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["tiny", "tiny-7B"])
def folder(request, tmp_path_factory):
    """An HF folder whose weights are large enough (std 0.1) for rounding differences to show in the logits."""
    base = tmp_path_factory.mktemp("ms")
    init_checkpoint(request.param, base / "init", seed=7)
    model = TorchTelechat.from_pretrained(base / "init")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(base / "hf")
    for side_file in ("tokenizer.model", "tokenizer_config.json"):
        (base / "hf" / side_file).write_bytes((base / "init" / side_file).read_bytes())
    return base / "hf"


@pytest.fixture(scope="module")
def torch_model(folder):
    return TorchTelechat.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def ms_model(folder):
    model = from_pretrained(folder)
    model.set_train(False)
    return model


def test_full_prompt_logits_match_the_pytorch_backend(torch_model, ms_model):
    with torch.no_grad():
        expected = torch_model(torch.tensor([PROMPT])).logits.numpy()
    got = ms_model.forward(np.array([PROMPT])).asnumpy()
    assert np.abs(expected).max() > 1
    assert np.abs(got - expected).max() < 1e-4


def test_token_by_token_decoding_matches_the_pytorch_backend(torch_model, ms_model):
    with torch.no_grad():
        expected = torch_model(torch.tensor([PROMPT])).logits[0].numpy()
    past, steps = [(None, None)] * ms_model.config.n_layer, []
    for t, token in enumerate(PROMPT):
        cos, sin = ms_model.rope(np.array([[t]]), t + 1)
        logits, past = ms_model.decode(mindspore.Tensor([[token]], mindspore.int32), cos, sin,
                                       mindspore.Tensor(np.ones((1, t + 1), np.int32)), past)
        steps.append(logits.asnumpy()[0, -1])
    assert np.abs(np.stack(steps) - expected).max() < 1e-4


def test_loss_matches_the_pytorch_backend(torch_model, ms_model):
    labels = np.array([[-100] * 4 + PROMPT[4:]])
    with torch.no_grad():
        expected = torch_model(torch.tensor([PROMPT]), labels=torch.tensor(labels)).loss.item()
    assert ms_model.forward(np.array([PROMPT]), labels=labels).asnumpy() == pytest.approx(expected, abs=1e-5)


def test_left_padded_rows_and_packed_segments_equal_each_sequence_alone(ms_model):
    a, b = PROMPT[:7], PROMPT[7:]
    alone_a = ms_model.forward(np.array([a])).asnumpy()[0]
    alone_b = ms_model.forward(np.array([b])).asnumpy()[0]
    padded = ms_model.forward(np.array([[3, 3] + b]), attention_mask=np.array([[0, 0] + [1] * len(b)])).asnumpy()[0]
    packed = ms_model.forward(np.array([a + b]), attention_mask=np.array([[1] * len(a) + [2] * len(b)]),
                              position_ids=np.array([list(range(len(a))) + list(range(len(b)))])).asnumpy()[0]
    assert np.abs(padded[2:] - alone_b).max() < 1e-5
    assert np.abs(packed[:len(a)] - alone_a).max() < 1e-5
    assert np.abs(packed[len(a):] - alone_b).max() < 1e-5


def test_greedy_tokens_equal_the_pytorch_backend(torch_model, ms_model):
    prompts = [[20, 300, 301, 302, 21], [20, 500, 21]]
    settings = dict(max_new_tokens=10, eos_id=None, pad_id=3, repetition_penalty=1.03)
    ms_tokens = np.stack(list(generate(ms_model, prompts, **settings)), axis=1)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                                       do_sample=False, repetition_penalty=1.03, eos_token_id=None, pad_token_id=3)
        assert ms_tokens[row].tolist() == out[0, len(prompt):].tolist()


def test_chat_answers_like_the_pytorch_backend(folder, torch_model, ms_model):
    tokenizer = TeleChatTokenizer.from_pretrained(folder)
    history = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！"}]
    expected = torch_model.chat(tokenizer, "今天天气怎么样？", history, max_new_tokens=8)
    generation_config = torch_model.generation_config.to_dict()
    assert ms_chat(ms_model, tokenizer, "今天天气怎么样？", history, generation_config, max_new_tokens=8) == expected
    *_, last = ms_chat(ms_model, tokenizer, "今天天气怎么样？", history, generation_config, stream=True,
                       max_new_tokens=8)
    assert last == expected


def test_sampling_is_seeded_and_top_k_1_is_greedy(ms_model):
    prompt = [[20, 400, 401, 21]]
    greedy = list(generate(ms_model, prompt, 6, None, 3))
    top1 = list(generate(ms_model, prompt, 6, None, 3, do_sample=True, top_k=1, temperature=0.7, seed=3))
    first = list(generate(ms_model, prompt, 6, None, 3, do_sample=True, top_p=0.9, temperature=1.5, seed=3))
    second = list(generate(ms_model, prompt, 6, None, 3, do_sample=True, top_p=0.9, temperature=1.5, seed=3))
    assert [t.tolist() for t in greedy] == [t.tolist() for t in top1]
    assert [t.tolist() for t in first] == [t.tolist() for t in second]


def test_save_pretrained_round_trips_through_the_converter(folder, ms_model, tmp_path):
    save_pretrained(ms_model, tmp_path / "ms")
    names = set(mindspore.load_checkpoint(str(tmp_path / "ms" / "mindspore_model.ckpt")))
    assert "model.layers.1.attention.wk_v.weight" in names and "model.norm_out.weight" in names
    convert_checkpoint(tmp_path / "ms", tmp_path / "hf", to="hf")
    # transformers saves every model `transformer.`-prefixed; MindSpore -> HF uses the release's style (7B: none).
    original = {n.removeprefix("transformer."): t for n, t in load_safetensors_folder(folder).items()}
    back = {n.removeprefix("transformer."): t for n, t in load_safetensors_folder(tmp_path / "hf").items()}
    assert set(original) == set(back)
    assert all(original[n].tobytes() == back[n].tobytes() for n in original)
    reloaded = from_pretrained(tmp_path / "ms")
    reloaded.set_train(False)
    assert np.array_equal(reloaded.forward(np.array([PROMPT])).asnumpy(),
                          ms_model.forward(np.array([PROMPT])).asnumpy())


def test_fp16_compute_on_cpu_stays_close(folder, ms_model):
    half = from_pretrained(folder, dtype="fp16")
    half.set_train(False)
    full = ms_model.forward(np.array([PROMPT])).asnumpy()
    assert np.abs(half.forward(np.array([PROMPT])).asnumpy() - full).max() < 0.05 * np.abs(full).max()


def test_graph_mode_gives_the_pynative_logits(folder, ms_model, tmp_path):
    script = f"""
import numpy as np, mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE)
from mindspore_impl import from_pretrained
model = from_pretrained(r"{folder}")
model.set_train(False)
np.save(r"{tmp_path / 'graph.npy'}", model.forward(np.array([{PROMPT}])).asnumpy())
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    graph = np.load(tmp_path / "graph.npy")
    assert np.abs(graph - ms_model.forward(np.array([PROMPT])).asnumpy()).max() < 1e-6


def test_fused_ascend_calls_bind_to_the_mindspore_signatures():
    """Ascend kernels cannot run here: check each `ops.X(...)` call in the backend binds to mindspore's own
    signature of ops.X (argument count and keyword names)."""
    calls = 0
    for path in (REPO / "mindspore_impl").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ops"):
                continue
            target = getattr(ops, node.func.attr)
            if not inspect.isfunction(target):
                continue  # primitives such as ops.MatMul are classes
            placeholders = [None] * len(node.args)
            inspect.signature(target).bind(*placeholders, **{k.arg: None for k in node.keywords})
            calls += 1
    assert calls > 10
    with pytest.raises(TypeError):  # the check can fail: a misspelled keyword does not bind
        inspect.signature(ops.flash_attention_score).bind(None, None, None, 4, scale_value=0.1)


def test_cli_generate_and_chat_with_the_mindspore_backend(folder, torch_model, capsys):
    from telechat_ascend.cli import main
    common = ["--model", str(folder), "--max-new-tokens", "6"]
    assert main(["generate", "--backend", "mindspore", "--prompt", "今天", *common]) == 0
    ms_text = capsys.readouterr().out
    assert main(["generate", "--backend", "torch", "--prompt", "今天", *common]) == 0
    assert capsys.readouterr().out == ms_text  # greedy decoding: the same tokens on both backends
    assert main(["chat", "--backend", "mindspore", "--question", "你好", *common]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["generate", "--backend", "mindspore", "--prompt", "x", "--dtype", "bf16", *common]) == 1
    assert "no bf16 compute kernels on CPU" in capsys.readouterr().err


def lowbias32_reference(x: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32, written with uint32 shifts and wrapping multiplies."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def test_keyed_dropout_masks_are_the_hash_of_row_key_site_and_index():
    from mindspore_impl.model import keyed_dropout
    p, site = 0.25, 5
    keys = np.array([7, 2 ** 32 - 1, 7], np.int64)  # rows 0 and 2 share a key, so they share a mask
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    out = keyed_dropout(mindspore.Tensor(x), p, mindspore.Tensor(keys), site).asnumpy()
    salt = np.uint32((site + 1) * 0x9E3779B9 % 2 ** 32)
    row_seeds = lowbias32_reference(keys.astype(np.uint32) ^ salt)
    with np.errstate(over="ignore"):
        bits = lowbias32_reference(np.arange(20, dtype=np.uint32)[None, :] + row_seeds[:, None]).reshape(x.shape)
    np.testing.assert_array_equal(out, np.where(bits >= p * 2 ** 32, x / np.float32(1 - p), 0))
    assert np.array_equal(out[0] == 0, out[2] == 0) and not np.array_equal(out[0] == 0, out[1] == 0)

    other_site = keyed_dropout(mindspore.Tensor(x), p, mindspore.Tensor(keys), site + 1).asnumpy()
    assert not np.array_equal(out == 0, other_site == 0)
    big = keyed_dropout(ops.ones((4, 64, 1024), mindspore.float32), 0.1, mindspore.Tensor(np.arange(4)), 0)
    assert abs(float((big.asnumpy() == 0).mean()) - 0.1) < 0.005
