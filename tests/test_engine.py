"""The serving engine (telechat_ascend.engine) on the PyTorch backend's runner, fp32 on CPU: continuous batching
must not change a request's tokens. References: transformers' generate() one request at a time, and the engine
serving one request at a time."""

import json
from pathlib import Path

import pytest
import torch

from pytorch_npu.inference import load_model
from pytorch_npu.serving import TorchBatchRunner
from telechat_ascend.engine import Engine, QueueFull, SamplingParams
from telechat_ascend.errors import TeleChatError
from telechat_ascend.initialize import init_checkpoint

TEXTS = ["你好", "什么是5G？请详细说明一下", "a b c d e f g", "hello world, this is", "中国电信的网络", "x",
         "1 2 3 4 5 6 7 8 9 10 11 12", "天气怎么样"]
MAX_TOKENS = [40, 27, 60, 13, 35, 29, 31, 25]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A randomly initialised tiny model (it rarely emits the end token, so answers run to max_tokens) whose
    training length is 48, so that the longer requests below run past it and into the NTK regime."""
    folder = tmp_path_factory.mktemp("engine") / "tiny"
    init_checkpoint("tiny", folder, seed=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "training_seqlen": 48, "base_seqlen": 48}))
    model, tokenizer = load_model(folder)
    return model, tokenizer


def hf_greedy(model, tokenizer, ids, max_new_tokens):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return out[0, len(ids):].tolist()


def arriving_one_per_step(engine, prompts, limits) -> list[list[int]]:
    """Greedy answers of requests submitted one per engine step, served to the end."""
    requests = []
    for prompt, n in zip(prompts, limits):
        requests.append(engine.submit(prompt, SamplingParams(max_tokens=n)))
        engine.step()
    while engine.busy:
        engine.step()
    return [r.output for r in requests]


def engine_for(served, **kwargs):
    model, tokenizer = served
    return Engine(TorchBatchRunner(model, kwargs.pop("rows", 8)), tokenizer, **kwargs)


def test_batched_greedy_answers_equal_one_at_a_time(served):
    """Eight requests arriving one per step, prefilled 3 tokens at a time between decode steps, joining and leaving
    the batch: each gets generate()'s greedy tokens, also the ones that run past the training length."""
    model, tokenizer = served
    prompts = [tokenizer.encode(text) for text in TEXTS]
    expected = [hf_greedy(model, tokenizer, p, n) for p, n in zip(prompts, MAX_TOKENS)]
    engine = engine_for(served, prefill_chunk=3)
    assert arriving_one_per_step(engine, prompts, MAX_TOKENS) == expected
    assert max(engine.batch_sizes) >= 6 and engine.batch_sizes.count(1) < len(engine.batch_sizes) // 2
    assert max(len(p) + n for p, n in zip(prompts, MAX_TOKENS)) > 48  # some rows decode in the NTK regime
    alone = [engine_for(served).generate(p, SamplingParams(max_tokens=n)).output for p, n in zip(prompts, MAX_TOKENS)]
    assert alone == expected


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    _, tokenizer = served
    params = dict(max_tokens=20, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
    prompt = tokenizer.encode("天气怎么样")
    alone = engine_for(served).generate(prompt, SamplingParams(**params, seed=7)).output
    engine = engine_for(served)
    others = [engine.submit(tokenizer.encode(t), SamplingParams(**params, seed=i)) for i, t in enumerate(TEXTS[:5])]
    engine.step()
    mine = engine.submit(prompt, SamplingParams(**params, seed=7))
    while engine.busy:
        engine.step()
    assert mine.output == alone
    assert len({tuple(r.output) for r in others}) > 1  # different seeds, different draws


def test_streamed_events_add_up_and_stop_strings_cut(served):
    _, tokenizer = served
    prompt = tokenizer.encode("hello world, this is")
    full = engine_for(served).generate(prompt, SamplingParams(max_tokens=30))
    stop = full.text[10:13]
    engine = engine_for(served)
    request = engine.submit(prompt, SamplingParams(max_tokens=30, stop=(stop,)))
    streamed, reasons = "", []
    while engine.busy:
        engine.step()
        for event in request.next_events(timeout=0):
            streamed += event.text
            reasons.append(event.finish_reason)
    assert request.finish_reason == "stop" and reasons[-1] == "stop" and reasons.count("stop") == 1
    assert request.text == streamed == full.text[:full.text.index(stop)]
    assert full.finish_reason == "length" and len(full.output) == 30


def test_a_cancelled_request_frees_its_row_and_leaves_the_others_alone(served):
    model, tokenizer = served
    prompts = [tokenizer.encode(t) for t in TEXTS[:3]]
    engine = engine_for(served)
    requests = [engine.submit(p, SamplingParams(max_tokens=25)) for p in prompts]
    for _ in range(12):
        engine.step()
    assert len(engine.running) == 3
    engine.cancel(requests[0])
    engine.step()
    assert len(engine.running) == 2 and requests[0].finish_reason == "cancelled"
    while engine.busy:
        engine.step()
    assert [r.output for r in requests[1:]] == [hf_greedy(model, tokenizer, p, 25) for p in prompts[1:]]


def test_queue_and_length_limits(served):
    _, tokenizer = served
    engine = engine_for(served, max_queue=2, max_model_len=64)
    engine.submit([5, 6], SamplingParams(max_tokens=4))
    engine.submit([5, 6], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull, match=r"2 requests are waiting \(max_queue 2\)"):
        engine.submit([5, 6], SamplingParams(max_tokens=4))
    with pytest.raises(TeleChatError, match="the prompt has 60 tokens and max_tokens is 10: 70 is more than the "
                                            "server's max_model_len 64"):
        engine.submit([5] * 60, SamplingParams(max_tokens=10))


@pytest.mark.parametrize("method", ["w8a16", "w8a8"])
def test_int8_models_batch_without_changing_their_answers(served, tmp_path, method):
    """An int8 folder served: batched greedy answers against the same requests one at a time. The int8 layers
    themselves are batch-invariant per kernel, but on CPU the kernel depends on the rows of a call: prefill chunks of
    up to 16 rows take the int8-weight kernel, a whole prompt the prefill GEMM (pytorch_npu.quant), which round
    differently in bf16; and w8a8 rounds every activation to its int8 grid, where a difference of rounding can move
    a value to the next grid point. On this random model's near-ties either can flip a later token: the answers must
    start alike and agree on at least 90% of the tokens."""
    from pytorch_npu.quantize import quantize_folder
    model, tokenizer = served
    folder = Path(model.config._name_or_path)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(t) for t in TEXTS) + "\n", encoding="utf-8")
    quantize_folder(folder, tmp_path / method, method, calib if method == "w8a8" else None)
    int8, _ = load_model(tmp_path / method)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    alone = [Engine(TorchBatchRunner(int8, 8), tokenizer).generate(p, SamplingParams(max_tokens=24)).output
             for p in prompts]
    engine = Engine(TorchBatchRunner(int8, 8), tokenizer, prefill_chunk=8)
    requests = [engine.submit(p, SamplingParams(max_tokens=24)) for p in prompts]
    while engine.busy:
        engine.step()
    assert max(engine.batch_sizes) >= 6
    assert [r.output[:2] for r in requests] == [ref[:2] for ref in alone]
    same = sum(a == b for r, ref in zip(requests, alone) for a, b in zip(r.output, ref))
    assert same >= 0.9 * 24 * len(prompts), same


def test_mindspore_runner_batches_to_the_same_tokens_as_pytorch(served):
    """The same folder on the MindSpore backend: batched greedy answers equal the PyTorch backend's (fp32 logits
    agree to ~1e-6), past the training length included."""
    from mindspore_impl import inference as ms_inference
    model, tokenizer = served
    ms_model, _ = ms_inference.load_model(Path(model.config._name_or_path))
    prompts = [tokenizer.encode(text) for text in TEXTS[:5]]
    limits = MAX_TOKENS[:5]
    expected = [hf_greedy(model, tokenizer, p, n) for p, n in zip(prompts, limits)]
    engine = Engine(ms_inference.batch_runner(ms_model, 8), tokenizer, prefill_chunk=4)
    assert arriving_one_per_step(engine, prompts, limits) == expected and max(engine.batch_sizes) >= 4
