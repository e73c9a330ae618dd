"""vLLM with the project's plugin, in its own environment (.venv-vllm, built by scripts/setup-vllm.sh: vLLM needs
transformers 5, this one pins 4.57), against our PyTorch backend here: the same greedy tokens and raw logits on
published-style folders (the published config.json with sizes shrunk, nothing else changed), at head_dim 128 and
160, the sizes vLLM's CPU attention takes. vLLM runs in a child process, which a crash there cannot take down."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import PUBLISHED, REPO_ROOT, free_port

import pytorch_npu.modeling_telechat  # noqa: F401  (registers model_type "telechat")
from pytorch_npu import TelechatForCausalLM
from pytorch_npu.vllm_probe import VLLM_PYTHON
from pytorch_npu.vllm_probe import run as run_probe
from pytorch_npu.quantize import quantize_folder
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.tokenizer import TINY_CORPUS

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: run bash scripts/setup-vllm.sh "
                                                                  "(scripts/test.sh does)")
SHAPES = {  # the published config's fields that are changed, and the preset whose conventions it follows
    "12B": ("tiny", dict(vocab_size=4096, hidden_size=640, n_layer=2, n_head=4, ffn_hidden_size=1712)),  # head_dim 160
    "7B": ("tiny-7B", dict(vocab_size=4096, hidden_size=512, n_layer=2, n_head=4, ffn_hidden_size=1376,  # 128
                           hidden_dropout=0.0, attention_dropout=0.0)),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [400, 17, 2500, 33, 91, 1200, 7, 7, 3000, 14, 250, 61, 8, 999],
           [5, 6, 7, 8, 9, 10, 11, 12]]  # the last shares a prefix with the first (prefix caching)


def published_style(release: str, folder, **changes):
    """Random weights in the release's layout under its own config.json, unmodified but for the sizes."""
    preset, sizes = SHAPES[release]
    sizes = {**sizes, **changes}
    init_checkpoint(preset, folder, seed=3, **sizes)
    config = json.loads((PUBLISHED / release / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}, indent=2))
    return folder


def ours(folder, prompt: list[int], steps: int):
    """Greedy tokens and the raw logits of every step from our backend, one prompt at a time."""
    model = TelechatForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             eos_token_id=None, repetition_penalty=1.0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)


def assert_same(vllm_row: dict, tokens: list[int], logits: torch.Tensor, tolerance: float = 1e-4):
    assert vllm_row["tokens"] == tokens
    for step, top in enumerate(vllm_row["logits"]):
        for token, value in top.items():
            assert abs(value - float(logits[step, int(token)])) <= tolerance, (step, token)


@pytest.fixture(scope="module", params=["12B", "7B"])
def release(request, published):
    return request.param


@pytest.fixture(scope="module")
def folder(release, tmp_path_factory):
    return published_style(release, tmp_path_factory.mktemp("vllm") / release)


def test_published_style_folders_give_our_greedy_tokens_and_logits(release, folder):
    config = TeleChatConfig.from_file(folder)
    assert config.head_dim == (160 if release == "12B" else 128)
    assert config.tied == (release == "7B") and "tie_word_embeddings" not in json.loads(
        (PUBLISHED / "7B" / "config.json").read_text())
    if release == "7B":  # the published 7B NTK quirk is in play: base_seqlen 4096 below the training length
        assert config.rope_scaling(16)[0] == pytest.approx(10000 * 3 ** (128 / 126))
    rows = run_probe({"model": str(folder), "prompts": PROMPTS, "max_tokens": 12, "prefix_caching": True})
    for prompt, row in zip(PROMPTS, rows):
        assert_same(row, *ours(folder, prompt, 12))


@pytest.mark.parametrize("release, lm_head", [("12B", False), ("12B", True), ("7B", False)],
                         ids=["12B", "12B-lm-head", "7B-tied"])
def test_gptq_folders_run_on_vllms_gptq_kernels(tmp_path, published, release, lm_head):
    """`quantize --method gptq` folders (4-bit, group 128; with --lm-head the head too; the 7B's head tied to its
    fp16 embedding) under vLLM's AutoGPTQ method and int4 kernels (--quantization gptq: published folders say it
    in quantize_config.json only), with the bf16 activations those kernels take: the first token's logits within
    bf16 rounding of our fp32 backend on the same folder, and the same first token. Wrong packing, zeros or a
    head read as float would be off by the logits' size."""
    ffn = {"12B": 1664, "7B": 1408}[release]  # group 128 divides every input size
    src = published_style(release, tmp_path / "float", ffn_hidden_size=ffn)
    calib = tmp_path / "calib.jsonl"
    lines = [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:16]
    calib.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines),
                     encoding="utf-8")
    folder = tmp_path / "gptq"
    quantize_folder(src, folder, "gptq", calib, bits=4, lm_head=lm_head)
    assert json.loads((folder / "quantize_config.json").read_text()).get("lm_head", False) == lm_head
    rows = run_probe({"model": str(folder), "prompts": PROMPTS, "max_tokens": 1, "dtype": "bfloat16",
                      "quantization": "gptq"})
    model = TelechatForCausalLM.from_pretrained(folder).eval()
    for prompt, row in zip(PROMPTS, rows):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        assert row["tokens"] == [int(logits.argmax())]
        tolerance = 0.05 * float(logits.abs().max())  # bf16 activations: measured 0.017 of it
        for token, value in row["logits"][0].items():
            assert abs(value - float(logits[int(token)])) <= tolerance, token


def test_decoding_past_the_training_length_is_exact(tmp_path, published):
    """A prompt inside the training length, decoded to 3.5x it: every decoded token is rotated under the NTK regime
    (base, mscale) of its own sequence length, as the published code rotates it."""
    folder = published_style("12B", tmp_path / "long", training_seqlen=32, seq_length=256)
    prompt = PROMPTS[1]
    assert TeleChatConfig.from_file(folder).rope_scaling(112) != TeleChatConfig.from_file(folder).rope_scaling(32)
    [row] = run_probe({"model": str(folder), "prompts": [prompt], "max_tokens": 98, "max_model_len": 256})
    assert_same(row, *ours(folder, prompt, 98))


def test_tensor_parallel_2_gives_the_same_tokens(tmp_path, published):
    folder = published_style("12B", tmp_path / "tp")
    # vLLM's CPU workers each bind to their own cores; with one NUMA node they must be told which.
    rows = run_probe({"model": str(folder), "prompts": PROMPTS[:2], "max_tokens": 8, "tensor_parallel_size": 2},
                     env={"VLLM_CPU_OMP_THREADS_BIND": f"0|{min(1, os.cpu_count() - 1)}"})
    for prompt, row in zip(PROMPTS, rows):
        assert_same(row, *ours(folder, prompt, 8))


def test_the_plugin_imports_neither_our_transformers_model_nor_torch_npu():
    code = ("import sys, pytorch_npu.vllm_plugin as p; p.register(); import pytorch_npu.vllm_telechat; "
            "print(sorted(m for m in sys.modules if m.startswith(('pytorch_npu', 'torch_npu', 'mindspore'))))")
    done = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(sorted(
        ["pytorch_npu", "pytorch_npu.configuration_telechat", "pytorch_npu.vllm_plugin", "pytorch_npu.vllm_telechat"]))


def test_main_environment_has_no_vllm():
    """The plugin's entry point is inert here: vLLM is only in .venv-vllm."""
    assert subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0


def run_in_vllm_env(code: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([str(VLLM_PYTHON), "-c", code, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


CHATS = [
    [{"role": "user", "content": "你好，请介绍一下中国电信。"}],
    [{"role": "system", "content": "你是星辰语义大模型。"}, {"role": "user", "content": "1+1=?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "再加 3 呢？<_end>"}],
]
TEXTS = ["Hello world", "  两个空格 and\ttabs\n换行", "数字 12345 和符号 !@#", "a<_end>b<_pad>c", "<_user>问<_bot>答"]


def test_the_12b_tokenizer_and_chat_template_give_the_published_chat_ids(published, tmp_path):
    """The real 12B tokenizer folder, unmodified, under transformers 5 through AutoTokenizer (no remote code): text
    encodes as our tokenizer (the published split) does, and the chat template renders a conversation to the ids
    the published chat() builds segment by segment (system text first, as Tele-AI's later template puts it)."""
    from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat
    code = """
import json, sys
import pytorch_npu.vllm_plugin as plugin
plugin.register()
from transformers import AutoTokenizer
from vllm.transformers_utils.chat_templates.registry import get_chat_template_fallback_path
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
template = get_chat_template_fallback_path("telechat", sys.argv[1]).read_text()
chats, texts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps({"class": type(tok).__name__,
                  "texts": [tok.encode(t, add_special_tokens=False) for t in texts],
                  "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in texts],
                  "chats": [tok.apply_chat_template(c, chat_template=template, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False) for c in chats]}))
"""
    got = json.loads(run_in_vllm_env(code, str(published / "12B"), json.dumps(CHATS), json.dumps(TEXTS)))
    tokenizer = TeleChatTokenizer.from_pretrained(published / "12B")
    assert got["class"] == "TelechatTokenizer"
    for text, ids, decoded in zip(TEXTS[:4], got["texts"], got["decoded"]):
        assert ids == tokenizer.encode(text), text
        assert decoded == tokenizer.decode(tokenizer.encode(text))
    assert got["texts"][4] == [tokenizer.user_id, *tokenizer.encode("问"), tokenizer.bot_id, *tokenizer.encode("答")]
    first, second = got["chats"]
    assert first == render_chat(tokenizer, CHATS[0][0]["content"])
    history = [{"role": "user", "content": "1+1=?"}, {"role": "bot", "content": "2"}]
    assert second == tokenizer.encode("你是星辰语义大模型。") + render_chat(tokenizer, "再加 3 呢？<_end>", history)


def test_vllm_serve_answers_the_openai_client_with_our_greedy_answer(published, tmp_path):
    """`vllm serve FOLDER` on an unmodified published-style 12B folder (the project's tiny tokenizer in the 12B
    layout): the chat answer at temperature 0 is our backend's greedy answer to the same chat, and a bad request
    gets a 4xx while the server stays up."""
    import httpx
    import openai
    from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat
    folder = published_style("12B", tmp_path / "served")
    port = free_port()
    server = subprocess.Popen([str(REPO_ROOT / ".venv-vllm" / "bin" / "vllm"), "serve", str(folder), "--port",
                               str(port), "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
                               str(1 << 28), "--enforce-eager", "--served-model-name", "telechat"],
                              cwd=tmp_path, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None and time.time() < deadline, "vllm serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="telechat", messages=[{"role": "user", "content": "你好"}],
                                                temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="telechat", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=-1)
        assert len(client.completions.create(model="telechat", prompt="你好", max_tokens=2).choices) == 1
    finally:
        server.terminate()
        server.wait(timeout=60)
    log = (tmp_path / "serve.log").read_text()
    tokenizer = TeleChatTokenizer.from_pretrained(folder)
    tokens, _ = ours(folder, render_chat(tokenizer, "你好"), 12)
    assert answer.usage.completion_tokens == 12, log[-3000:]
    assert answer.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_tensor_the_model_does_not_have_is_refused_by_name(tmp_path, published):
    from safetensors.numpy import load_file, save_file
    folder = published_style("12B", tmp_path / "extra")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.self_attention.rotary_emb.inv_freq"] = tensors["transformer.ln_f.weight"][:80].copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="checkpoint tensor transformer.h.0.self_attention.rotary_emb.inv_freq "
                                           "is not part of TeleChat"):
        run_probe({"model": str(folder), "prompts": [[5]], "max_tokens": 1})
