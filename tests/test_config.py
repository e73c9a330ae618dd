import json
import math

import pytest

from telechat_ascend import TeleChatConfig, TeleChatError
from telechat_ascend.weights import hf_name, tensor_specs

RELEASES = ["7B", "12B", "12B-V2"]
CONFIG_FOLDERS = ["7B", "12B", "12B-V2", "7B_8bit", "7B_4bit", "12B_8bit", "12B_4bit"]


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("folder", CONFIG_FOLDERS)
def test_real_config_round_trips_every_field(published, folder, tmp_path):
    original = read_json(published / folder / "config.json")
    config = TeleChatConfig.from_file(published / folder)
    config.save(tmp_path)
    assert read_json(tmp_path / "config.json") == original


def test_unused_fields_are_kept_in_extra(published):
    config = TeleChatConfig.from_file(published / "7B_8bit")
    assert config.extra["logn"] is False
    assert config.extra["torch_dtype"] == "float16"


@pytest.mark.parametrize("release, parameters", [("7B", 7_200_018_432), ("12B", 12_386_432_000),
                                                 ("12B-V2", 12_386_432_000)])
def test_parameter_count_matches_published_index(published, release, parameters):
    config = TeleChatConfig.from_file(published / release)
    index = read_json(published / release / "pytorch_model.bin.index.json")
    assert config.num_parameters() == parameters == index["metadata"]["total_size"] // 2  # fp16 storage
    assert sum(math.prod(spec.shape) for spec in tensor_specs(config)) == parameters


@pytest.mark.parametrize("release, count, prefixed", [("7B", 302, False), ("12B", 383, True), ("12B-V2", 383, True)])
def test_generated_names_equal_published_index_keys(published, release, count, prefixed):
    config = TeleChatConfig.from_file(published / release)
    names = [hf_name(spec.hf_name, config.hf_key_prefix) for spec in tensor_specs(config)]
    index_keys = set(read_json(published / release / "pytorch_model.bin.index.json")["weight_map"])
    assert len(names) == len(set(names)) == count
    assert set(names) == index_keys
    assert ("transformer.h.0.mlp.up_proj.weight" in index_keys) is prefixed
    assert ("lm_head.weight" in index_keys) is prefixed  # the prefixed releases are the untied ones


@pytest.mark.parametrize("release", RELEASES)
def test_presets_agree_with_published_configs(published, release):
    real = TeleChatConfig.from_file(published / release)
    preset = TeleChatConfig.preset(release)
    for field in ("vocab_size", "hidden_size", "n_layer", "n_head", "ffn_hidden_size", "hidden_dropout",
                  "attention_dropout", "training_seqlen", "layer_norm_epsilon"):
        assert getattr(preset, field) == getattr(real, field), field
    assert (preset.tied, preset.hf_key_prefix, preset.rope_base_seqlen) == \
           (real.tied, real.hf_key_prefix, real.rope_base_seqlen)
    assert preset.num_parameters() == real.num_parameters()


def test_derived_values():
    seven, twelve, one = (TeleChatConfig.preset(p) for p in ("7B", "12B", "1B"))
    assert (seven.head_dim, seven.kv_heads, seven.tied, seven.hf_key_prefix) == (128, 32, True, "")
    assert (twelve.head_dim, twelve.kv_heads, twelve.tied, twelve.hf_key_prefix) == (160, 32, False, "transformer.")
    assert one.head_dim == 64
    assert 1.29e9 < one.num_parameters() < 1.30e9  # ≈ 1.297e9 (published estimate from the shapes)
    gqa = TeleChatConfig(hidden_size=8192, n_head=64, num_key_value_heads=8, n_layer=1)
    assert gqa.kv_heads == 8
    kv_rows = 2 * 8 * 128
    assert dict((s.hf_name, s.shape) for s in tensor_specs(gqa))["h.0.self_attention.key_value.weight"] == \
        (kv_rows, 8192)


def test_tiny_preset_is_a_few_million_parameters():
    assert 1e6 < TeleChatConfig.preset("tiny").num_parameters() < 1e7


# The published NTK rule, written out: L_eff = max(L, 8192); c = log2(L_eff / base_seqlen) + 1;
# alpha = max(2^ceil(c) - 1, 1); base = 10000 alpha^(d / (d - 2)); mscale = 1 + 0.1 ln(L_eff / 8192) above 8192.
# Expected bases are the published table's figures (telechat-format.md §6.3).
@pytest.mark.parametrize("release, seq_len, base, mscale", [
    ("7B", 1, 30527.7, 1.0),
    ("7B", 4096, 30527.7, 1.0),
    ("7B", 8192, 30527.7, 1.0),
    ("7B", 16384, 72195.9, 1 + 0.1 * math.log(2)),
    ("7B", 32768, 156588.3, 1 + 0.1 * math.log(4)),
    ("12B", 4096, 10000.0, 1.0),
    ("12B", 8192, 10000.0, 1.0),
    ("12B", 8193, 30420.1, 1 + 0.1 * math.log(8193 / 8192)),
    ("12B", 16384, 30420.1, 1 + 0.1 * math.log(2)),
    ("12B", 32768, 71745.6, 1 + 0.1 * math.log(4)),
])
def test_rope_scaling_follows_published_ntk_rule(release, seq_len, base, mscale):
    got_base, got_mscale = TeleChatConfig.preset(release).rope_scaling(seq_len)
    assert got_base == pytest.approx(base, abs=0.06)
    assert got_mscale == pytest.approx(mscale, rel=1e-12)


def test_rope_base_seqlen_from_real_files(published):
    assert TeleChatConfig.from_file(published / "7B").rope_base_seqlen == 4096
    assert TeleChatConfig.from_file(published / "12B").rope_base_seqlen == 8192
    assert TeleChatConfig.preset("1B").rope_base_seqlen == 8192


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=100, n_head=3), "hidden_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(ffn_hidden_size=2.5), "ffn_hidden_size"),
    (dict(num_key_value_heads=5), "num_key_value_heads"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
    (dict(model_type="llama"), "model_type"),
])
def test_inconsistent_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        TeleChatConfig.from_dict({**TeleChatConfig.preset("tiny").to_dict(), **changes})


def test_unknown_preset_is_refused():
    with pytest.raises(TeleChatError, match=r"unknown preset '13B'.*7B"):
        TeleChatConfig.preset("13B")


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"n_layer": "two"', encoding="utf-8")
    with pytest.raises(TeleChatError, match=r"config.json:1: not valid JSON"):
        TeleChatConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"n_layer": "two"}', encoding="utf-8")
    with pytest.raises(TeleChatError, match=r"config.json: config field 'n_layer' must be a positive integer"):
        TeleChatConfig.from_file(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeleChatError, match="empty/config.json: not found"):
        TeleChatConfig.from_file(tmp_path / "empty")
