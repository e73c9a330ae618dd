"""Generation, chat and the generate/chat CLI of the PyTorch backend, on a tiny model from `telechat-ascend init`."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from isolated import run_isolated

import pytorch_npu.modeling_telechat  # noqa: F401  (registers model_type "telechat")
from pytorch_npu import TelechatForCausalLM
from pytorch_npu.modeling_telechat import TelechatCache, TelechatCacheLayer
from pytorch_npu.chat import TextChunkStreamer
from telechat_ascend.cli import main
from telechat_ascend.initialize import init_checkpoint
from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("gen") / "tiny", seed=5)


@pytest.fixture(scope="module")
def model(folder):
    return TelechatForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return TeleChatTokenizer.from_pretrained(folder)


def greedy_by_recomputation(model, ids, steps):
    """argmax of a full forward over everything so far, no cache: what cached decoding must reproduce."""
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids


def test_cached_greedy_generation_equals_recomputation(model):
    prompt = [20, 300, 301, 302, 21]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=None, min_new_tokens=12)
    assert out[0].tolist() == greedy_by_recomputation(model, prompt, 12)


def test_decoding_on_onednn_gives_what_f_linear_gives(model, monkeypatch):
    """The CPU fp32 linear kernels (ops.linear_kernel) on a whole generation: the same tokens, scores within 1e-5."""
    from pytorch_npu import ops
    prompt = torch.tensor([[20, 300, 301, 302, 21]])
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                    output_scores=True, return_dict_in_generate=True)
    runs = []
    for onednn in (True, False):
        monkeypatch.setattr(ops, "CPU_ONEDNN_LINEAR", onednn)
        with torch.no_grad():
            runs.append(model.generate(prompt, **settings))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for scores, reference in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_like_each_prompt_alone(model):
    prompts = [[20, 300, 301, 302, 303, 304, 21], [20, 500, 21], [20, 700, 701, 21]]
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                    pad_token_id=3)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **settings)
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), **settings)
            assert batched[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats(model):
    prompt = torch.tensor([[20, 400, 401, 21]])
    common = dict(max_new_tokens=10, min_new_tokens=10, eos_token_id=None, repetition_penalty=1.0)
    with torch.no_grad():
        greedy = model.generate(prompt, do_sample=False, **common)
        top1 = model.generate(prompt, do_sample=True, top_k=1, temperature=0.7, **common)
        torch.manual_seed(1)
        first = model.generate(prompt, do_sample=True, top_k=50, top_p=0.9, temperature=1.5, **common)
        torch.manual_seed(1)
        second = model.generate(prompt, do_sample=True, top_k=50, top_p=0.9, temperature=1.5, **common)
    assert torch.equal(greedy, top1)
    assert torch.equal(first, second)


def test_generation_config_comes_from_the_model_folder(model):
    config = model.generation_config
    assert (config.repetition_penalty, config.top_k, config.top_p, config.temperature) == (1.01, 5, 0.85, 0.3)
    assert config.do_sample is False


def test_chat_returns_the_published_answer_and_history(model, tokenizer):
    history = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！"}]
    answer, new_history = model.chat(tokenizer, "今天天气怎么样？", history, max_new_tokens=6)
    prompt = render_chat(tokenizer, "今天天气怎么样？", history, max_length=model.config.seq_length - 6)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=tokenizer.eos_id)
    expected = tokenizer.decode([i for i in out[0, len(prompt):].tolist() if i != tokenizer.eos_id])
    assert answer == expected
    assert new_history == history + [{"role": "user", "content": "今天天气怎么样？"},
                                     {"role": "bot", "content": answer}]


def test_streamed_chat_ends_with_the_same_answer(model, tokenizer):
    answer, history = model.chat(tokenizer, "Hello", max_new_tokens=8)
    steps = list(model.chat(tokenizer, "Hello", stream=True, max_new_tokens=8))
    assert steps[-1] == (answer, history)
    assert all(answer.startswith(text) for text, _ in steps)


def test_streamer_never_splits_a_utf8_character(tokenizer):
    text = "天气🙂好"  # the emoji is not in the tiny vocabulary: it falls back to four byte pieces
    ids = tokenizer.encode(text)
    assert len(ids) > 4
    streamer = TextChunkStreamer(tokenizer, skip_ids={tokenizer.eos_id})
    streamer.put(torch.tensor([[20]]))  # the prompt
    for i in ids + [tokenizer.eos_id]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    pieces = list(streamer)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_cli_generate_and_chat(folder, capsys):
    assert main(["generate", "--model", str(folder), "--prompt", "今天", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["chat", "--model", str(folder), "--question", "你好", "--question", "Hi", "--max-new-tokens",
                 "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_cli_refuses_an_npu_it_cannot_load(folder, capsys):
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--device", "npu"]) == 1
    assert "torch-npu" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_telechat(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "'model_type' is 'llama'" in capsys.readouterr().err


def test_preallocated_cache_returns_what_concatenation_returns(monkeypatch):
    """TelechatCacheLayer against transformers' DynamicLayer (torch.cat), across buffer growth and a replaced
    `keys` (as beam reordering does), with no gradients."""
    monkeypatch.setattr(TelechatCacheLayer, "GROWTH", 3)
    ours, reference = TelechatCacheLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)
    for step, length in enumerate([5, 1, 1, 1, 4, 1, 1, 1, 1]):
        k, v = (torch.randn(2, 3, length, 4, generator=generator) for _ in range(2))
        with torch.no_grad():
            got, want = ours.update(k, v), reference.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {step}"
        if step == 5:
            ours.reorder_cache(torch.tensor([1, 0]))
            reference.reorder_cache(torch.tensor([1, 0]))
    assert ours.get_seq_length() == reference.get_seq_length() == 16


def test_generate_uses_the_preallocated_cache_and_beam_search_matches_dynamic_cache(model):
    prompt = torch.tensor([[20, 300, 301, 302, 21]])
    settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False, repetition_penalty=1.0,
                    eos_token_id=None, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(prompt, **settings)
        reference = model.generate(prompt, past_key_values=DynamicCache(), **settings)
    assert isinstance(ours.past_key_values, TelechatCache)
    assert torch.equal(ours.sequences, reference.sequences)


def test_cache_with_gradients_falls_back_to_concatenation(model):
    """With autograd on, in-place writes into the buffers would break backward; the cache concatenates instead."""
    ids = torch.tensor([[20, 300, 301, 302, 21, 40]])
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :4], use_cache=True)
    second = model(ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    stepwise = torch.cat([first.logits, second.logits], 1)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)
    key_value = model.transformer.h[0].self_attention.key_value.weight  # reaches later tokens through the cache
    grads = []
    for logits in (full, stepwise):
        model.zero_grad()
        logits.sum().backward()
        grads.append(key_value.grad.clone())
    model.zero_grad()
    assert grads[0].norm() > 0
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5  # fp32 rounding; the grads reach ~170


LONG_PROMPT = r"""
    import re, sys, torch
    from pytorch_npu import TelechatConfig, TelechatForCausalLM
    from pytorch_npu.inference import prefill
    from telechat_ascend.config import TeleChatConfig
    torch.manual_seed(0)
    values = {**TeleChatConfig.preset("tiny").to_dict(), "n_layer": 1, "hidden_size": 64, "n_head": 2,
              "ffn_hidden_size": 128, "training_seqlen": 4096, "base_seqlen": 4096}
    model = TelechatForCausalLM(TelechatConfig(**values)).eval()
    ids = torch.randint(4, 4000, (int(sys.argv[1]),)).tolist()
    chunk = int(sys.argv[2])
    with torch.no_grad():
        if chunk:
            logits, cache = prefill(model, ids, chunk)
            assert cache.get_seq_length() == len(ids)
        else:
            logits = model(torch.tensor([ids]), logits_to_keep=1, use_cache=False).logits[0, -1]
    # VmHWM: this program's own peak (ru_maxrss would include the forking parent's size at fork time)
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())[1]) // 1024
    print(peak, *logits.tolist())
"""


def test_chunked_prefill_of_a_32k_prompt_equals_one_forward_in_bounded_memory():
    """A 32768-token prompt, 8x the model's training length (so the NTK base and mscale are those of 32K), fed in
    chunks: the next-token logits equal one full forward's, and peak memory follows the chunk size, not the prompt
    length squared. Each run is a child process, for its own peak RSS."""
    runs = {}
    for chunk in (0, 2048, 256):
        peak, *logits = run_isolated(LONG_PROMPT, "32768", str(chunk), threads=2).split()
        runs[chunk] = int(peak), torch.tensor([float(v) for v in logits])
    for chunk in (2048, 256):
        torch.testing.assert_close(runs[chunk][1], runs[0][1], rtol=0, atol=1e-5)
    assert runs[256][0] < runs[2048][0] < runs[0][0], {c: r[0] for c, r in runs.items()}
