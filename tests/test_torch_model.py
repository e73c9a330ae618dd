"""The PyTorch model against a plainly written, per-position reference of the published TeleChat forward."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import pytorch_npu.modeling_telechat  # noqa: F401  (registers model_type "telechat")
from pytorch_npu import TelechatConfig, TelechatForCausalLM
from checkpoint_files import write_bin_shards
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.initialize import init_checkpoint

# Small enough for a per-position float64 loop, with weights large enough that rounding differences show.
SHAPES = dict(vocab_size=96, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=112, seq_length=256)
STYLES = {
    "12B-style": dict(tie_word_embeddings=False),  # untied head, base_seqlen 8192
    "7B-style": dict(hidden_dropout=0.1, attention_dropout=0.1),  # tied head, base_seqlen 4096: NTK alpha 3
}


def make_model(style, **overrides):
    torch.manual_seed(0)
    model = TelechatForCausalLM(TelechatConfig(**SHAPES, **STYLES[style], **overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
    return model


def published_rope_tables(config, call_length, positions):
    """The published RotaryEmbedding: NTK alpha from max(call length, training_seqlen) against base_seqlen (the
    config's, else what the release hard-codes: 4096 for 7B, 8192 for 12B), fp32 frequencies, tables rounded to
    fp16, then times mscale (in fp16)."""
    d = config.hidden_size // config.n_head
    base_seqlen = config.base_seqlen or (4096 if config.tie_word_embeddings else 8192)
    seq_len = max(call_length, config.training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(seq_len / base_seqlen) + 1) - 1, 1)
    scale = seq_len / config.training_seqlen
    mscale = 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0
    base = 10000 * alpha ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.tensor(positions, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return (mscale * emb.cos().half()).double(), (mscale * emb.sin().half()).double()


def reference_logits(model, input_ids, rotations=None):
    """One sequence, float64, position by position. `rotations[t]` is the (cos, sin) that rotates position t; by
    default the tables of one published forward call over the whole sequence."""
    config = model.config
    p = {name: t.detach().double() for name, t in model.state_dict().items()}
    n, d, eps = config.n_head, config.hidden_size // config.n_head, config.layer_norm_epsilon
    if rotations is None:
        cos, sin = published_rope_tables(config, len(input_ids), list(range(len(input_ids))))
        rotations = list(zip(cos, sin))

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean() + eps))

    def rope(x, t):  # x: [heads, d]
        rotated = torch.cat([-x[:, d // 2:], x[:, :d // 2]], dim=-1)
        return x * rotations[t][0] + rotated * rotations[t][1]

    hidden = [p["transformer.word_embeddings.weight"][i] for i in input_ids]
    for layer in range(config.n_layer):
        w = {k.split(f"transformer.h.{layer}.")[1]: v for k, v in p.items() if k.startswith(f"transformer.h.{layer}.")}
        keys, values, after_attention = [], [], []
        for t, x in enumerate(hidden):
            a = rms(x, w["input_layernorm.weight"])
            q = rope((w["self_attention.query.weight"] @ a).view(n, d), t)
            kv = (w["self_attention.key_value.weight"] @ a).view(n, 2 * d)  # head j: rows [K_j; V_j]
            keys.append(rope(kv[:, :d], t))
            values.append(kv[:, d:])
            context = []
            for head in range(n):
                scores = torch.stack([q[head] @ keys[s][head] for s in range(t + 1)]) / math.sqrt(d)
                probs = torch.softmax(scores, dim=0)
                context.append(sum(probs[s] * values[s][head] for s in range(t + 1)))
            attention = w["self_attention.dense.weight"] @ torch.cat(context) + w["self_attention.dense.bias"]
            after_attention.append(x + attention)
        hidden = []
        for x in after_attention:
            m = rms(x, w["post_attention_layernorm.weight"])
            gate, up = w["mlp.gate_proj.weight"] @ m, w["mlp.up_proj.weight"] @ m
            hidden.append(x + w["mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up) + w["mlp.down_proj.bias"])
    head = p["transformer.word_embeddings.weight"] if config.tie_word_embeddings else p["lm_head.weight"]
    return torch.stack([head @ rms(x, p["transformer.ln_f.weight"]) for x in hidden])


PROMPT = [5, 17, 42, 3, 88, 61, 9, 33, 70, 2, 14, 95]


@pytest.mark.parametrize("style", STYLES)
def test_full_prompt_matches_the_reference(style):
    model = make_model(style)
    expected = reference_logits(model, PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].double()
    assert expected.abs().max() > 1  # the weights make logits large enough for rounding to matter
    assert (logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_token_by_token_decoding_matches_the_reference(style):
    model = make_model(style)
    expected = reference_logits(model, PROMPT)
    cache, steps = None, []
    with torch.no_grad():
        for t, token in enumerate(PROMPT):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1].double())
    assert (torch.stack(steps) - expected).abs().max() < 1e-5


def test_fp32_rope_tables_are_measurably_different():
    """The reference is sensitive enough to see the fp16 rounding of the published tables."""
    model = make_model("12B-style", rope_fp16_tables=False)
    expected = reference_logits(model, PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].double()
    assert (logits - expected).abs().max() > 1e-5


def test_left_padded_batch_equals_each_row_alone():
    model = make_model("12B-style")
    rows = [PROMPT, PROMPT[3:9], PROMPT[:4]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            assert (batched[i, width - len(row):] - alone).abs().max() < 1e-5


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = make_model("12B-style")
    ids = torch.tensor([PROMPT])
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        masked = model(ids, labels=ids, loss_mask=torch.tensor([[0] * 5 + [1] * (len(PROMPT) - 5)]))
    log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)
    expected = -torch.stack([log_probs[t - 1, PROMPT[t]] for t in range(5, len(PROMPT))]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert masked.loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-7B"])
def test_auto_model_loads_an_init_folder_and_saves_safetensors(tmp_path, preset):
    folder = init_checkpoint(preset, tmp_path / preset, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, TelechatForCausalLM)
    assert model.config.tie_word_embeddings is (preset == "tiny-7B")
    if preset == "tiny-7B":
        assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = make_model("12B-style").train()
    ids = torch.tensor([PROMPT])

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.equal(plain_loss, ckpt_loss)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], rtol=0, atol=1e-6), name


def test_dropout_is_active_in_training_only():
    model = make_model("7B-style")  # hidden and attention dropout 0.1, as the 7B release
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def rotations_when_decoding(config, prompt_length, total_length):
    """The documented rule for decoding with a cache: each call's NTK regime comes from the whole length so far, and
    a cached key keeps the rotation of the call that computed it (the prefill, or the decode step t + 1)."""
    rotations = []
    for t in range(total_length):
        cos, sin = published_rope_tables(config, prompt_length if t < prompt_length else t + 1, [t])
        rotations.append((cos[0], sin[0]))
    return rotations


def test_decoding_past_the_training_length():
    """A model trained at 16 tokens stands in for the 8192 of the releases: the published code slices a fixed table
    there; here positions keep counting and the NTK base and mscale grow with the length."""
    model = make_model("12B-style", training_seqlen=16, base_seqlen=16)
    prompt, continuation = PROMPT[:10], [7, 21, 40, 65, 11, 90, 33, 2, 58, 19, 44, 80, 26, 3, 67, 12, 9, 71, 30, 55]
    tokens = prompt + continuation
    rotations = rotations_when_decoding(model.config, len(prompt), len(tokens))
    expected = reference_logits(model, tokens, rotations)[len(prompt) - 1:-1]
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        steps, cache = [out.logits[0, -1]], out.past_key_values
        for token in continuation[:-1]:
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            steps.append(out.logits[0, -1])
    assert model.config.telechat.rope_scaling(30)[0] > model.config.telechat.rope_scaling(16)[0]  # the regime moves
    assert (torch.stack(steps).double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_model_loads_sharded_bin_and_sharded_safetensors(tmp_path, dtype):
    sharded = init_checkpoint("tiny", tmp_path / "sharded", seed=4, max_shard_size="2MB")
    write_bin_shards(sharded, tmp_path / "bin", dtype)
    from_safetensors = AutoModelForCausalLM.from_pretrained(sharded, dtype=dtype)
    from_bin = AutoModelForCausalLM.from_pretrained(tmp_path / "bin", dtype=dtype)
    for name, tensor in from_safetensors.state_dict().items():
        assert torch.equal(tensor, from_bin.state_dict()[name]), name
    assert len(list(sharded.glob("model-*.safetensors"))) > 1


def test_packed_samples_attend_only_within_their_segment():
    model = make_model("12B-style")
    a, b = PROMPT[:7], PROMPT[7:]
    with torch.no_grad():
        alone_a, alone_b = model(torch.tensor([a])).logits[0], model(torch.tensor([b])).logits[0]
        packed = model(torch.tensor([a + b]), attention_mask=torch.tensor([[1] * len(a) + [2] * len(b)]),
                       position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))])).logits[0]
    assert (packed[:len(a)] - alone_a).abs().max() < 1e-5
    assert (packed[len(a):] - alone_b).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "tiny-7B"])
def test_position_rope_tables_hold_the_published_decode_rotation_of_each_position(preset):
    """Row p of the table vLLM indexes by position (telechat_ascend.rope.position_rope_tables) is the rotation the
    published RotaryEmbedding gives position p in a forward call over p + 1 tokens: the token decoded there."""
    from telechat_ascend.rope import position_rope_tables
    config = TelechatConfig(**{**TeleChatConfig.preset(preset).to_dict(), "training_seqlen": 16})
    cos, sin = position_rope_tables(config.telechat, 80)
    for p in (0, 7, 15, 16, 17, 31, 32, 33, 63, 79):
        want_cos, want_sin = published_rope_tables(config, p + 1, [p])
        np.testing.assert_allclose(cos[p], want_cos[0].numpy(), rtol=0, atol=1e-7)
        np.testing.assert_allclose(sin[p], want_sin[0].numpy(), rtol=0, atol=1e-7)
    assert not np.allclose(cos[40], published_rope_tables(config, 80, [40])[0][0].numpy())  # not a prompt's table
