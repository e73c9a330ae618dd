"""Tokenizer loading, segment-by-segment chat rendering and the tiny training tokenizer.

Expectations come from the sentencepiece library run directly on the real 12B `tokenizer.model`, from the published
config files, and from the facts in shared/reference/telechat-format.md §9-§10, never from the code under test.
"""

import json
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import (
    TeleChatTokenizer,
    build_tiny_tokenizer,
    render_chat,
    render_dialog,
)

USER, BOT, EOS, BOS, PAD = 20, 21, 2, 1, 3
DUMMY_PREFIX = 111931  # "▁" alone in the 12B model
REAL_FIRST_PIECES = [
    "<_unk>", "<_start>", "<_end>", "<_pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "_", "\n", "\t", "__", "___", "____", "<_user>", "<_bot>", "<_system>",
]
SENTENCES = [
    "今天下午我们在会议室讨论了新产品的发布计划。",
    "The engineers replaced the old cables with optical fiber last spring.",
    "她说：“明天上午十点，在2号楼门口见。”",
    "Mixed 中英文 text, with numbers 3.14 and 2025-06-01!",
]


@pytest.fixture(scope="session")
def sp12b(published):
    return spm.SentencePieceProcessor(model_file=str(published / "12B" / "tokenizer.model"))


@pytest.fixture(scope="session")
def tok12b(published):
    return TeleChatTokenizer.from_pretrained(published / "12B")


# --- real 12B tokenizer -------------------------------------------------------------------------------------------

def test_12b_special_ids_from_generation_config(published, tok12b, sp12b):
    gen = json.loads((published / "12B" / "generation_config.json").read_text())
    assert (gen["user_token_id"], gen["bot_token_id"], gen["eos_token_id"], gen["bos_token_id"],
            gen["pad_token_id"]) == (USER, BOT, EOS, BOS, PAD)
    assert (tok12b.user_id, tok12b.bot_id, tok12b.eos_id, tok12b.bos_id, tok12b.pad_id) == (USER, BOT, EOS, BOS, PAD)
    assert tok12b.vocab_size == sp12b.get_piece_size() == 120000
    assert [sp12b.id_to_piece(i) for i in (USER, BOT, EOS, BOS, PAD)] == ["<_user>", "<_bot>", "<_end>", "<_start>",
                                                                        "<_pad>"]


def test_12b_tokenizer_config_unk_is_end(published, tok12b):
    config = json.loads((published / "12B" / "tokenizer_config.json").read_text())
    assert config["unk_token"]["content"] == "<_end>"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    # The HF special strings become single ids; `<_unk>` is not one of them in the 12B config.
    assert tok12b.encode("<_end>") == [EOS]
    assert tok12b.encode("<_start>") == [BOS]
    assert tok12b.encode("<_pad>") == [PAD]


def test_12b_published_encodings(tok12b):
    assert tok12b.encode("你好") == [50791]
    assert tok12b.encode("2024") == [DUMMY_PREFIX, 6, 4, 6, 8]
    assert tok12b.encode("") == []


def test_12b_encode_matches_sentencepiece_on_plain_text(tok12b, sp12b):
    for text in SENTENCES:
        assert tok12b.encode(text) == sp12b.encode(text)


def test_12b_encode_splits_on_hf_special_tokens(tok12b, sp12b):
    text = "你好<_end>再见"
    assert tok12b.encode(text) == sp12b.encode("你好") + [EOS] + sp12b.encode("再见")
    # SentencePiece alone treats "<_end>" (a control piece) as plain text.
    assert EOS not in sp12b.encode(text)
    assert tok12b.encode("a<_start>b<_pad>") == sp12b.encode("a") + [BOS] + sp12b.encode("b") + [PAD]


def test_12b_user_bot_markers_stay_sentencepiece_symbols(tok12b, sp12b):
    # Whole-string encoding keeps <_user>/<_bot> atomic but adds a dummy prefix before <_user>.
    assert sp12b.encode("<_user>你好<_bot>") == [DUMMY_PREFIX, USER, 22685, BOT]
    assert tok12b.encode("<_user>你好<_bot>") == [DUMMY_PREFIX, USER, 22685, BOT]


def test_12b_render_chat_builds_segments_separately(tok12b, sp12b):
    ids = render_chat(tok12b, "你好")
    assert ids == [USER] + sp12b.encode("你好") + [BOT] == [USER, 50791, BOT]
    assert ids[0] != DUMMY_PREFIX and BOS not in ids


def test_12b_render_chat_with_history(tok12b, sp12b):
    history = [
        {"role": "user", "content": "你好"},
        {"role": "bot", "content": "你好！有什么可以帮你的吗？"},
        {"role": "user", "content": "What is 5G?"},
        {"role": "assistant", "content": "The fifth generation of mobile networks."},
    ]
    expected = (
        [USER] + sp12b.encode("你好") + [BOT] + sp12b.encode("你好！有什么可以帮你的吗？") + [EOS]
        + [USER] + sp12b.encode("What is 5G?") + [BOT] + sp12b.encode("The fifth generation of mobile networks.")
        + [EOS] + [USER] + sp12b.encode("今天天气怎么样？") + [BOT]
    )
    assert render_chat(tok12b, "今天天气怎么样？", history) == expected
    # The dicts chat() returns may carry extra keys (input_ids, attention_mask); content is what counts.
    with_extras = [dict(m, input_ids=[0], attention_mask=[1]) for m in history]
    assert render_chat(tok12b, "今天天气怎么样？", with_extras) == expected


def _history_segments(sp, history):
    segments = []
    for m in history:
        ids = sp.encode(m["content"])
        segments.append([USER] + ids if m["role"] == "user" else [BOT] + ids + [EOS])
    return segments


def test_12b_history_budget_keeps_newest_messages(tok12b, sp12b):
    history = [
        {"role": "user", "content": "第一个问题：北京有哪些景点？"},
        {"role": "bot", "content": "故宫、长城和颐和园都很有名。"},
        {"role": "user", "content": "第二个问题：去长城要带什么？"},
        {"role": "bot", "content": "穿舒适的鞋，带足饮用水。"},
        {"role": "user", "content": "第三个问题：坐高铁去上海要多久？"},
        {"role": "bot", "content": "大约四个半小时。"},
    ]
    question = "那从上海去杭州呢？"
    prompt = [USER] + sp12b.encode(question) + [BOT]
    s = _history_segments(sp12b, history)

    # Room for the newest turn only: the older ones are dropped, the newest kept whole.
    budget = len(prompt) + len(s[4]) + len(s[5]) + 1
    assert render_chat(tok12b, question, history, max_length=budget) == s[4] + s[5] + prompt
    # A message that would fill the budget exactly is left out (the published check is `>= max_length`).
    assert render_chat(tok12b, question, history, max_length=budget - 1) == s[5] + prompt
    # Messages are taken one at a time, newest first, so an answer can lose its question.
    assert render_chat(tok12b, question, history, max_length=len(prompt) + len(s[5]) + 1) == s[5] + prompt
    assert render_chat(tok12b, question, history, max_length=len(prompt) + 1) == prompt
    # Without a budget everything is kept.
    assert render_chat(tok12b, question, history) == sum(s, []) + prompt


def test_12b_history_budget_is_cumulative(tok12b, sp12b):
    # Each message alone fits next to the question; all of them together do not. The published code compares each
    # message with the question only and would take all six; the budget here counts what was already taken.
    history = [{"role": r, "content": "这是一条不太长的历史消息。"} for r in ("user", "bot") * 3]
    question = "最后的问题"
    prompt = [USER] + sp12b.encode(question) + [BOT]
    s = _history_segments(sp12b, history)
    budget = len(prompt) + len(s[4]) + len(s[5]) + 1
    ids = render_chat(tok12b, question, history, max_length=budget)
    assert ids == s[4] + s[5] + prompt
    assert len(ids) < budget


def test_12b_long_question_is_left_truncated(tok12b, sp12b):
    question = "请把下面这句话翻译成英文：今天的天气非常好，我们一起去公园散步，然后去图书馆看书。"
    q = sp12b.encode(question)
    max_length = 10
    assert len(q) > max_length
    history = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！"}]
    # As published: the last max_length - 1 question tokens between the markers (max_length + 1 in all), and no
    # room left for history.
    ids = render_chat(tok12b, question, history, max_length=max_length)
    assert ids == [USER] + q[-(max_length - 1):] + [BOT]
    assert len(ids) == max_length + 1


def test_12b_render_dialog_ids_and_mask(tok12b, sp12b):
    turns = [("你好", "你好！很高兴见到你。"), ("How are you?", "I am fine, thank you.")]
    ids, mask = render_dialog(tok12b, turns)
    expected, expected_mask = [], []
    for q, a in turns:
        qi, ai = sp12b.encode(q), sp12b.encode(a)
        expected += [USER] + qi + [BOT] + ai + [EOS]
        expected_mask += [False] * (len(qi) + 2) + [True] * (len(ai) + 1)
    assert ids == expected
    assert mask == expected_mask
    assert [i for i, m in zip(ids, mask) if m].count(EOS) == len(turns)
    # The prompt for turn 2 is exactly the start of the training sequence.
    history = [{"role": "user", "content": turns[0][0]}, {"role": "bot", "content": turns[0][1]}]
    prompt = render_chat(tok12b, turns[1][0], history)
    assert ids[:len(prompt)] == prompt


def test_12b_decode(tok12b, sp12b):
    for text in SENTENCES:
        assert tok12b.decode(tok12b.encode(text)) == text
    assert tok12b.decode(tok12b.encode("你好<_end>再见")) == "你好<_end>再见"
    assert tok12b.decode(tok12b.encode("你好<_end>再见"), skip_special_tokens=True) == "你好再见"
    # <_user>/<_bot> are not HF special tokens: SentencePiece writes them out itself.
    assert tok12b.decode([USER] + sp12b.encode("你好") + [BOT]) == "<_user> 你好<_bot>"
    with pytest.raises(TeleChatError, match="120000"):
        tok12b.decode([120000])


# --- tokenizer.json backend (7B) ----------------------------------------------------------------------------------

def _write_byte_level_tokenizer(folder, vocab_size):
    """A byte-level BPE tokenizer.json with the 7B special-token layout when the vocabulary is big enough."""
    tokens = [f"<filler{i}>" for i in range(vocab_size)]
    tokens[0], tokens[3] = "<unk>", "<pad>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens[4:4 + len(alphabet)] = alphabet
    tokens[4 + len(alphabet)] = "he"
    specials = ["<unk>", "<pad>"]
    if vocab_size > 160133:
        tokens[160130:160134] = ["<_user>", "<_bot>", "<_start>", "<_end>"]
        specials += tokens[160130:160134]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_tokenizer_json_with_7b_generation_config(published, tmp_path):
    folder = tmp_path / "7B"
    reference = _write_byte_level_tokenizer(folder, 160256)
    shutil.copy(published / "7B" / "generation_config.json", folder)
    tok = TeleChatTokenizer.from_pretrained(folder)
    assert (tok.user_id, tok.bot_id, tok.bos_id, tok.eos_id, tok.pad_id) == (160130, 160131, 160132, 160133, 3)
    assert tok.vocab_size == 160256
    text = "<_user>hello 你好<_bot>"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok.encode(text)[0] == 160130 and tok.encode(text)[-1] == 160131
    assert tok.decode(tok.encode("hello 你好")) == "hello 你好"
    ids = render_chat(tok, "hello", [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hey"}])
    hi, hey, hello = (reference.encode(t).ids for t in ("hi", "hey", "hello"))
    assert ids == [160130] + hi + [160131] + hey + [160133] + [160130] + hello + [160131]


def test_tokenizer_json_rejects_7b_ids_outside_a_small_vocab(published, tmp_path):
    folder = tmp_path / "small"
    _write_byte_level_tokenizer(folder, 1000)
    shutil.copy(published / "7B" / "generation_config.json", folder)
    with pytest.raises(TeleChatError, match=r"generation_config\.json: user_token_id = 160130"):
        TeleChatTokenizer.from_pretrained(folder)


# --- tiny training tokenizer --------------------------------------------------------------------------------------

def test_tiny_layout_matches_real_12b_literally(tiny_dir, tiny_tokenizer):
    sp = tiny_tokenizer.backend
    assert sp.get_piece_size() == tiny_tokenizer.vocab_size == 4096
    assert [sp.id_to_piece(i) for i in range(23)] == REAL_FIRST_PIECES
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == 3
    assert all(sp.is_byte(i) for i in range(123, 379)) and sp.id_to_piece(123) == "<0x00>"
    # No generation_config.json: the ids come from the pieces.
    assert (tiny_tokenizer.user_id, tiny_tokenizer.bot_id, tiny_tokenizer.eos_id, tiny_tokenizer.bos_id, tiny_tokenizer.pad_id) == (USER, BOT, EOS, BOS, PAD)
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["unk_token"]["content"] == "<_unk>" and config["eos_token"]["content"] == "<_end>"


def test_tiny_layout_matches_real_12b_file(tiny_tokenizer, sp12b):
    def kinds(sp, i):
        return sp.id_to_piece(i), sp.is_unknown(i), sp.is_control(i), sp.is_byte(i)

    assert [kinds(tiny_tokenizer.backend, i) for i in range(379)] == [kinds(sp12b, i) for i in range(379)]


def test_tiny_trainer_options_match_real_12b(published, tiny_dir):
    def spec(path):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        t, n = proto.trainer_spec, proto.normalizer_spec
        return (t.model_type, t.split_digits, t.byte_fallback, t.allow_whitespace_only_pieces, n.name,
                n.remove_extra_whitespaces, n.add_dummy_prefix)

    real = spec(published / "12B" / "tokenizer.model")
    assert real == (sentencepiece_model_pb2.TrainerSpec.BPE, True, True, True, "identity", False, True)
    assert spec(tiny_dir / "tokenizer.model") == real


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    assert (again / "tokenizer_config.json").read_bytes() == (tiny_dir / "tokenizer_config.json").read_bytes()


def test_tiny_round_trips_and_tokenizes_reasonably(tiny_tokenizer):
    for text in SENTENCES:
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
        # Ordinary text needs no byte fallback and fewer tokens than characters.
        assert not any(tiny_tokenizer.backend.is_byte(i) for i in ids)
        assert len(ids) < len(text)
    assert tiny_tokenizer.encode("2024")[1:] == [6, 4, 6, 8]  # split digits, as in the 12B model
    assert tiny_tokenizer.decode(render_chat(tiny_tokenizer, "你好")) == "<_user> 你好<_bot>"


def test_tiny_unknown_characters_fall_back_to_bytes(tiny_tokenizer):
    for text in ("🙂", "龘"):
        ids = tiny_tokenizer.encode(text)
        assert [tiny_tokenizer.backend.is_byte(i) for i in ids[1:]] == [True] * len(text.encode("utf-8"))
        assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("天气🙂很好 ok")) == "天气🙂很好 ok"


# --- errors -------------------------------------------------------------------------------------------------------

def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(TeleChatError, match="no tokenizer.model .* or tokenizer.json") as info:
        TeleChatTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_files(tmp_path, tiny_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TeleChatError, match=r"tokenizer\.model: not a SentencePiece model"):
        TeleChatTokenizer.from_pretrained(tmp_path)
    folder = build_tiny_tokenizer(tmp_path / "tiny")
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(TeleChatError, match=r"generation_config\.json:1: not valid JSON"):
        TeleChatTokenizer.from_pretrained(folder)


def test_special_id_out_of_range(tmp_path):
    folder = build_tiny_tokenizer(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"bot_token_id": 4096}))
    with pytest.raises(TeleChatError, match=r"bot_token_id = 4096 is not an id of the 4096-token vocabulary"):
        TeleChatTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("entry, message", [
    (("user", "hi"), r"history\[1\]: expected a dict"),
    ({"role": "system", "content": "hi"}, r"history\[1\]: role must be"),
    ({"role": "user", "content": None}, r"history\[1\]: content must be a string"),
    ({"content": "hi"}, r"history\[1\]: role must be"),
])
def test_bad_history_entry(tiny_tokenizer, entry, message):
    history = [{"role": "user", "content": "ok"}, entry]
    with pytest.raises(TeleChatError, match=message):
        render_chat(tiny_tokenizer, "question", history)


def test_bad_chat_and_dialog_arguments(tiny_tokenizer):
    with pytest.raises(TeleChatError, match="question is empty"):
        render_chat(tiny_tokenizer, "")
    with pytest.raises(TeleChatError, match="max_length = 2"):
        render_chat(tiny_tokenizer, "hi", max_length=2)
    with pytest.raises(TeleChatError, match=r"turns\[1\]: expected a \(question, answer\) pair"):
        render_dialog(tiny_tokenizer, [("q", "a"), ("only a question",)])
    with pytest.raises(TeleChatError, match="no turns"):
        render_dialog(tiny_tokenizer, [])
