"""prepare-data: parsing, rendering, loss targets, packing, weighting, errors, the shard format and MindRecord export.

Expected ids and labels are written out from the published rules (telechat-format.md §10-§12: [<_user>] q [<_bot>] a
[<_end>] per turn, each segment tokenized on its own) with the tokenizer's plain `encode`, not taken from data.py.
"""

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from telechat_ascend.data import (
    IGNORE_INDEX,
    PackedDataset,
    add_prepare_data_parser,
    export_mindrecord,
    parse_record,
    prepare_data,
)
from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat, render_dialog

DEMO = Path(__file__).resolve().parents[1] / "telechat_ascend" / "assets" / "demo_sft"
SEQ = 128


def write_jsonl(path: Path, records) -> Path:
    """One line per record: dicts as JSON, str and bytes as they are."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()
             for r in records]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def prepare(tmp_path, tiny_dir, sources, name="out", **kwargs):
    """sources: {file name: (records, weight)} -> (manifest, PackedDataset)."""
    for file, (records, _) in sources.items():
        write_jsonl(tmp_path / file, records)
    (tmp_path / "data.json").write_text(json.dumps({file: w for file, (_, w) in sources.items()}))
    kwargs = {"seq_len": SEQ, "workers": 1, "progress": False, **kwargs}
    manifest = prepare_data(tmp_path / "data.json", tiny_dir, tmp_path / name, **kwargs)
    return manifest, PackedDataset(tmp_path / name)


def expected(tiny_tokenizer, turns, loss="answer"):
    """(ids, labels) of one sample, from the published rule; labels aligned with ids. The sample's first token
    (<_user>) is never a target in per-sample packing."""
    ids, labels = [], []
    for q, a in turns:
        q_ids, a_ids = tiny_tokenizer.encode(q), tiny_tokenizer.encode(a)
        user, bot = (tiny_tokenizer.user_id, tiny_tokenizer.bot_id) if loss == "published" else (IGNORE_INDEX, IGNORE_INDEX)
        ids += [tiny_tokenizer.user_id, *q_ids, tiny_tokenizer.bot_id, *a_ids, tiny_tokenizer.eos_id]
        labels += [user, *[IGNORE_INDEX] * len(q_ids), bot, *a_ids, tiny_tokenizer.eos_id]
    labels[0] = IGNORE_INDEX
    return ids, labels


def segments(row):
    """[(ids, labels, position_ids)] of the samples of a per-sample row, in order."""
    out = []
    for s in range(1, row["segment_ids"].max() + 1):
        where = row["segment_ids"] == s
        out.append((row["input_ids"][where].tolist(), row["labels"][where].tolist(),
                    row["position_ids"][where].tolist()))
    return out


def all_segments(dataset):
    return [seg for i in range(len(dataset)) for seg in segments(dataset[i])]


def qa_turn(i):
    return f"问题{i}：今天天气怎么样？", f"回答{i}：今天天气很好，适合去公园散步。"


def qa(i):
    return {"input": "<_user>" + qa_turn(i)[0], "output": qa_turn(i)[1]}


# ---- parsing and rendering --------------------------------------------------------------------------------------

def test_parse_published_and_dialog_formats():
    assert parse_record({"input": "<_user>你好", "output": "你好！"}) == [("你好", "你好！")]
    # <_user> on input and <_bot> on output are optional, as in the published code
    assert parse_record({"input": "hi", "output": "<_bot>hello"}) == [("hi", "hello")]
    multi = {"input": "<_user>q1<_bot>a1<_user>q2<_bot>a2<_user>q3", "output": "a3"}
    assert parse_record(multi) == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    dialog = {"dialog": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "q2"}, {"role": "bot", "content": "a2"}]}
    assert parse_record(dialog) == [("q1", "a1"), ("q2", "a2")]


def test_rendering_equals_render_chat_and_render_dialog(tmp_path, tiny_dir, tiny_tokenizer):
    turns = [("你好，请介绍一下你自己。", "我是一个聊天助手。"), ("What can you do?", "I can answer questions."),
             ("今天星期几？", "我无法知道今天的日期。")]
    published = {"input": "".join(f"<_user>{q}<_bot>{a}" for q, a in turns[:-1]) + f"<_user>{turns[-1][0]}",
                 "output": turns[-1][1]}
    dialog = {"dialog": [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("bot", a))]}
    single = {"input": "<_user>你好", "output": "你好！有什么可以帮你？"}
    _, data = prepare(tmp_path, tiny_dir, {"a.jsonl": ([published, dialog, single], 1)}, seq_len=512)
    segs = Counter(tuple(ids) for ids, _, _ in all_segments(data))

    history = [{"role": r, "content": c} for q, a in turns[:-1] for r, c in (("user", q), ("bot", a))]
    multi_ids = render_chat(tiny_tokenizer, turns[-1][0], history) + tiny_tokenizer.encode(turns[-1][1]) + [tiny_tokenizer.eos_id]
    assert multi_ids == render_dialog(tiny_tokenizer, turns)[0] == expected(tiny_tokenizer, turns)[0]
    single_ids = render_chat(tiny_tokenizer, "你好") + tiny_tokenizer.encode("你好！有什么可以帮你？") + [tiny_tokenizer.eos_id]
    assert segs == {tuple(multi_ids): 2, tuple(single_ids): 1}  # both input formats give the same ids


# ---- labels, positions, segments --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["answer", "published"])
def test_labels_are_answer_and_end_per_sample(tmp_path, tiny_dir, tiny_tokenizer, loss):
    turns = [("第一个问题", "第一个回答"), ("second question", "second answer")]
    record = {"input": "<_user>第一个问题<_bot>第一个回答<_user>second question", "output": "second answer"}
    _, data = prepare(tmp_path, tiny_dir, {"a.jsonl": ([record, qa(1)], 1)}, seq_len=256, loss_targets=loss)
    want = {tuple(ids): labels for ids, labels in (expected(tiny_tokenizer, turns, loss), expected(tiny_tokenizer, [qa_turn(1)], loss))}
    segs = all_segments(data)
    assert len(segs) == 2
    for ids, labels, positions in segs:
        assert labels == want[tuple(ids)]
        assert positions == list(range(len(ids)))
    row = data[0]
    used = sum(len(ids) for ids, _, _ in segs)
    assert row["segment_ids"].tolist() == [1] * len(segs[0][0]) + [2] * len(segs[1][0]) + [0] * (256 - used)
    assert (row["input_ids"][used:] == tiny_tokenizer.pad_id).all() and (row["labels"][used:] == IGNORE_INDEX).all()
    assert (row["position_ids"][used:] == 0).all()
    assert data.manifest["targets"] == sum(label != IGNORE_INDEX for _, labels, _ in segs for label in labels)


@pytest.mark.parametrize("loss", ["answer", "published"])
def test_published_packing_left_pads_and_attends_everything(tmp_path, tiny_dir, tiny_tokenizer, loss):
    _, data = prepare(tmp_path, tiny_dir, {"a.jsonl": ([qa(1)], 1)}, seq_len=64, packing="published",
                      loss_targets=loss)
    ids, labels = expected(tiny_tokenizer, [qa_turn(1)], loss)
    if loss == "published":
        labels[0] = tiny_tokenizer.user_id  # left padding puts <_user> after a pad, and the reference trains it
    pad = 64 - len(ids)
    row = data[0]
    assert row["input_ids"].tolist() == [tiny_tokenizer.pad_id] * pad + ids
    assert row["labels"].tolist() == [IGNORE_INDEX] * pad + labels
    assert row["position_ids"].tolist() == list(range(64))
    assert row["segment_ids"].tolist() == [1] * 64


# ---- packing and weighting --------------------------------------------------------------------------------------

def test_packing_keeps_whole_samples(tmp_path, tiny_dir, tiny_tokenizer):
    rng = np.random.default_rng(0)
    records = [{"input": f"<_user>问题{i}", "output": "回答" + "很好" * int(rng.integers(1, 30)) + str(i)}
               for i in range(200)]
    manifest, data = prepare(tmp_path, tiny_dir, {"a.jsonl": (records, 1)}, rows_per_shard=7)
    want = {tuple(expected(tiny_tokenizer, [(r["input"][7:], r["output"])])[0]) for r in records}
    segs = all_segments(data)
    assert Counter(tuple(ids) for ids, _, _ in segs) == Counter(want)  # every sample exactly once, never split
    assert manifest["samples_packed"] == 200 and manifest["tokens"] == sum(len(ids) for ids, _, _ in segs)
    assert len(manifest["shards"]) == -(-manifest["rows"] // 7)
    fill = manifest["tokens"] / (manifest["rows"] * SEQ)
    assert fill > 0.9, fill  # first-fit over a window packs tightly


def test_weighting_integer_and_fractional_copies(tmp_path, tiny_dir, tiny_tokenizer):
    files = {"two.jsonl": 2.0, "quarter.jsonl": 0.25, "twohalf.jsonl": 2.5}
    sources = {f: ([{"input": f"{f} 问题{i}", "output": f"{f} 回答{i}"} for i in range(400)], w)
               for f, w in files.items()}
    manifest, data = prepare(tmp_path, tiny_dir, sources, seq_len=256)
    seen = Counter(tuple(ids) for ids, _, _ in all_segments(data))
    for c in manifest["sources"]:
        f = c["path"]
        counts = [seen[tuple(expected(tiny_tokenizer, [(f"{f} 问题{i}", f"{f} 回答{i}")])[0])] for i in range(400)]
        w = files[f]
        assert set(counts) <= {int(w), int(w) + 1} if w % 1 else set(counts) == {int(w)}
        assert c["copies"] == c["packed"] == sum(counts)
        mean, sd = 400 * w, (400 * (w % 1) * (1 - w % 1)) ** 0.5
        assert abs(sum(counts) - mean) <= 4 * sd, (f, sum(counts))
    # the same seed gives the same bytes; another seed another draw and order
    again, _ = prepare(tmp_path, tiny_dir, sources, name="again", seq_len=256)
    other, _ = prepare(tmp_path, tiny_dir, sources, name="other", seq_len=256, seed=7)
    assert again["content_sha256"] == manifest["content_sha256"] != other["content_sha256"]


def test_output_identical_for_any_worker_count(tmp_path, tiny_dir):
    records = [qa(i) for i in range(700)]  # several 256-line chunks
    sources = {"a.jsonl": (records, 1.5), "b.jsonl": (records[:300], 0.5)}
    prepare(tmp_path, tiny_dir, sources, name="w1", workers=1)
    prepare(tmp_path, tiny_dir, sources, name="w3", workers=3)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w3")) and "manifest.json" in names
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name


def test_num_samples_exhausted_and_repeat(tmp_path, tiny_dir):
    sources = {"a.jsonl": ([qa(i) for i in range(40)], 1)}
    manifest, data = prepare(tmp_path, tiny_dir, sources, name="short", num_samples=1000)
    assert manifest["exhausted"] and len(data) == manifest["rows"] < 1000 and manifest["epochs"] == 1
    manifest, data = prepare(tmp_path, tiny_dir, sources, name="repeat", num_samples=40, repeat=True)
    assert not manifest["exhausted"] and len(data) == 40 and manifest["epochs"] > 1
    assert manifest["sources"][0]["copies"] == 40 * manifest["epochs"]
    manifest, _ = prepare(tmp_path, tiny_dir, sources, name="few", num_samples=2)
    assert manifest["rows"] == 2 and manifest["unused_copies"] > 0
    assert manifest["samples_packed"] + manifest["unused_copies"] == manifest["sources"][0]["copies"] == 40
    with pytest.raises(TeleChatError, match="repeat needs num_samples"):
        prepare(tmp_path, tiny_dir, sources, name="bad", repeat=True)


# ---- over-long samples ------------------------------------------------------------------------------------------

def test_overlong_truncate_and_drop(tmp_path, tiny_dir, tiny_tokenizer):
    long_answer = "今天天气很好，适合去公园散步。" * 8
    turns = [("第一个问题", "第一个回答" * 5), ("第二个问题", "第二个回答"), ("第三个问题", "第三个回答")]
    multi = {"dialog": [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("bot", a))]}
    one_long = {"input": "请详细回答" * 10 + "这个问题", "output": long_answer}
    sources = {"a.jsonl": ([multi, one_long, {"input": "你好", "output": "你好！"}], 1)}
    seq = len(expected(tiny_tokenizer, turns[1:])[0]) + 2  # room for the last two turns only
    manifest, data = prepare(tmp_path, tiny_dir, sources, seq_len=seq)
    assert manifest["sources"][0]["truncated"] == 2 and manifest["sources"][0]["dropped_overlong"] == 0
    segs = {tuple(ids): labels for ids, labels, _ in all_segments(data)}
    assert tuple(expected(tiny_tokenizer, turns[1:])[0]) in segs  # the oldest turn went, the newer ones stayed whole
    # the single over-long turn keeps <_user>, then the end of its question, then the start of its answer
    q_ids, a_ids = tiny_tokenizer.encode(one_long["input"]), tiny_tokenizer.encode(long_answer)
    cut = [ids for ids in segs if ids[-1] != tiny_tokenizer.eos_id]
    assert len(cut) == 1 and len(cut[0]) == seq
    bot = cut[0].index(tiny_tokenizer.bot_id)
    assert list(cut[0][1:bot]) == q_ids[len(q_ids) - (bot - 1):] and list(cut[0][bot + 1:]) == a_ids[:seq - bot - 1]

    manifest, data = prepare(tmp_path, tiny_dir, sources, name="drop", seq_len=seq, overlong="drop")
    assert manifest["sources"][0]["dropped_overlong"] == 2 and manifest["sources"][0]["truncated"] == 0
    assert manifest["samples_packed"] == 1


# ---- bad input --------------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"input": "q", "output": ', "invalid JSON"),
    (b'{"input": "\xff", "output": "a"}', "not UTF-8 text"),
    ({"input": "q"}, "missing 'output'"),
    ({"question": "q", "answer": "a"}, "missing 'input'"),
    ({"input": ["q"], "output": "a"}, "'input' must be a string, got list"),
    ({"input": "q", "output": 3}, "'output' must be a string, got int"),
    ({"input": "<_bot>a<_user>q", "output": "a"}, "<_bot> without a preceding <_user>"),
    ({"input": "<_user>q1<_user>q2", "output": "a"}, "<_user> follows a question without a <_bot> answer"),
    ({"input": "<_user>q1<_bot>a1<_bot>a2<_user>q", "output": "a"}, "<_bot> without a preceding <_user>"),
    ({"input": "<_user>q1<_bot>a1", "output": "a"}, "ends with a <_bot> answer"),
    ({"input": "q", "output": "  "}, "empty answer"),
    ({"input": "<_user>q1<_bot><_user>q2", "output": "a"}, "empty answer in turn 1"),
    ({"input": "q", "output": "a<_end>b"}, "control token"),
    ({"dialog": [{"role": "system", "content": "s"}, {"role": "bot", "content": "a"}]}, "unknown role 'system'"),
    ({"dialog": [{"role": "user", "content": "q"}]}, "dialog ends with a user message"),
    ({"dialog": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}, "expected a bot message"),
    ({"dialog": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a<_user>b"}]}, "control token"),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, tiny_dir, line, message):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(1), qa(2), line, qa(4)])
    with pytest.raises(TeleChatError) as error:
        prepare_data(path, tiny_dir, tmp_path / "out", SEQ, workers=1, progress=False)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["a.jsonl"]  # nothing half-written


def test_bad_line_stops_a_worker_pool(tmp_path, tiny_dir):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(600)] + ["{oops"] + [qa(i) for i in range(600)])
    with pytest.raises(TeleChatError, match=re.escape(f"{path}:601: invalid JSON")):
        prepare_data(path, tiny_dir, tmp_path / "out", SEQ, workers=2, progress=False)
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tiny_dir, monkeypatch):
    import telechat_ascend.data as data
    tokenize = data._tokenize_chunk

    def dies_on_the_second_chunk(chunk):  # the workers are forked, so they run this
        if chunk[1] > 1:
            os._exit(3)
        return tokenize(chunk)

    monkeypatch.setattr(data, "_tokenize_chunk", dies_on_the_second_chunk)
    path = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(3000)])
    with pytest.raises(TeleChatError, match="a prepare-data worker process died"):
        prepare_data(path, tiny_dir, tmp_path / "out", SEQ, workers=2, progress=False)
    assert os.listdir(tmp_path) == ["a.jsonl"]


@pytest.mark.parametrize("kwargs,message", [
    ({"seq_len": 4}, "seq_len must be at least 8"), ({"num_samples": 0}, "num_samples must be at least 1"),
    ({"workers": 0}, "workers must be at least 1"), ({"rows_per_shard": 0}, "rows_per_shard must be at least 1"),
    ({"packing": "dense"}, "packing must be one of per-sample, published"),
    ({"loss_targets": "all"}, "loss_targets must be one of answer, published"),
])
def test_argument_errors(tmp_path, tiny_dir, kwargs, message):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(1)])
    with pytest.raises(TeleChatError, match=message):
        prepare_data(path, tiny_dir, tmp_path / "out", **{"seq_len": SEQ, "workers": 1, **kwargs})


def test_skip_bad_counts_every_line(tmp_path, tiny_dir):
    records = [qa(1), "not json", "", qa(2), {"input": "q"}, "   ", qa(3)]
    manifest, data = prepare(tmp_path, tiny_dir, {"a.jsonl": (records, 1)}, skip_bad=True)
    c = manifest["sources"][0]
    assert (c["lines"], c["bad"], c["blank"], c["samples"]) == (7, 2, 2, 3)
    assert c["first_bad"].startswith(f"{tmp_path / 'a.jsonl'}:2: invalid JSON")
    assert manifest["samples_packed"] == 3


def test_data_json_errors(tmp_path, tiny_dir):
    write_jsonl(tmp_path / "a.jsonl", [qa(1)])
    cases = [({"missing.jsonl": 1}, "'missing.jsonl' not found"), ({"a.jsonl": 0}, "must be a positive number"),
             ({"a.jsonl": -1.5}, "must be a positive number"), ({"a.jsonl": True}, "must be a positive number"),
             ({"a.jsonl": "2"}, "must be a positive number"), ([], "non-empty JSON object")]
    for mapping, message in cases:
        (tmp_path / "data.json").write_text(json.dumps(mapping))
        with pytest.raises(TeleChatError, match=message):
            prepare_data(tmp_path / "data.json", tiny_dir, tmp_path / "out", SEQ, workers=1, progress=False)
    with pytest.raises(TeleChatError, match="no usable samples"):
        write_jsonl(tmp_path / "bad.jsonl", ["{"])
        prepare_data(tmp_path / "bad.jsonl", tiny_dir, tmp_path / "out", SEQ, skip_bad=True, workers=1,
                     progress=False)


# ---- output folder, manifest, reader ----------------------------------------------------------------------------

def test_atomic_output_force_and_content_hash(tmp_path, tiny_dir, tiny_tokenizer):
    sources = {"a.jsonl": ([qa(i) for i in range(30)], 1)}
    first, data = prepare(tmp_path, tiny_dir, sources)
    data.verify()
    assert first["tokenizer"]["pad_id"] == tiny_tokenizer.pad_id and len(first["tokenizer"]["sha256"]) == 64
    with pytest.raises(TeleChatError, match="already exists"):
        prepare(tmp_path, tiny_dir, sources)
    same, _ = prepare(tmp_path, tiny_dir, sources, force=True)
    assert same["content_sha256"] == first["content_sha256"]
    changed, _ = prepare(tmp_path, tiny_dir, {"a.jsonl": ([qa(i) for i in range(29)] + [qa(99)], 1)}, force=True)
    assert changed["content_sha256"] != first["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "data.json", "out"]

    shard = tmp_path / "out" / "shard-00000.labels.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(TeleChatError, match="does not match"):
        PackedDataset(tmp_path / "out").verify()


def test_packed_dataset_validation(tmp_path, tiny_dir):
    prepare(tmp_path, tiny_dir, {"a.jsonl": ([qa(i) for i in range(30)], 1)})
    out = tmp_path / "out"
    data = PackedDataset(out)
    row = data[len(data) - 1]
    assert set(row) == {"input_ids", "labels", "position_ids", "segment_ids"} and row["labels"].dtype == np.int32
    assert all(isinstance(array, np.memmap) for array in row.values())  # views, nothing copied
    with pytest.raises(IndexError):
        data[len(data)]

    positions = out / "shard-00000.position_ids.npy"
    original = positions.read_bytes()
    np.save(positions, np.zeros((data.manifest["rows"], 7), np.int32))
    with pytest.raises(TeleChatError, match=re.escape(f"{positions}: expected int32 [{len(data)}, {SEQ}]")):
        PackedDataset(out)
    positions.unlink()
    with pytest.raises(TeleChatError, match=re.escape(f"{positions}: shard file missing")):
        PackedDataset(out)
    positions.write_bytes(original)

    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(TeleChatError, match="manifest.json: format_version 2"):
        PackedDataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(TeleChatError, match="manifest.json: no manifest"):
        PackedDataset(out)


def test_cli_subcommand(tmp_path, tiny_dir, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", "--data", str(DEMO / "data.json"), "--tokenizer", str(tiny_dir),
                              "--seq-len", "256", "--out", str(tmp_path / "demo"), "--workers", "1", "--quiet"])
    args.run(args)
    assert "rows x 256 tokens" in capsys.readouterr().out
    data = PackedDataset(tmp_path / "demo")
    sources = {c["path"]: c for c in data.manifest["sources"]}
    assert sources["single_turn.jsonl"]["lines"] >= 60 and sources["dialog.jsonl"]["lines"] >= 60
    assert all(c["bad"] == c["truncated"] == c["dropped_overlong"] == 0 for c in sources.values())
    assert data.manifest["samples_packed"] == sum(c["copies"] for c in sources.values())


# ---- the real published SFT examples ----------------------------------------------------------------------------

def test_real_published_sft_data(published, tmp_path):
    tok12b = TeleChatTokenizer.from_pretrained(published / "12B")
    manifest = prepare_data(published / "sft" / "data.json", published / "12B", tmp_path / "out", 1024,
                            num_samples=300, workers=2, progress=False)
    data = PackedDataset(tmp_path / "out")
    assert len(data) == 300 and not manifest["exhausted"]
    single, multi = manifest["sources"]
    assert (single["lines"], single["samples"], single["copies"], single["bad"]) == (1000, 1000, 2000, 0)
    assert (multi["lines"], multi["bad"], multi["copies"]) == (1000, 0, multi["samples"])
    assert manifest["tokenizer"]["sha256"] == \
        "b2c86d881f9a94b1c50bf25f8f987accea9ec2a1be74529f0240d8e13e66aa3d"

    # Every packed sample has the published structure, and labels exactly on the answers and <_end>s.
    segs = all_segments(data)
    for ids, labels, _ in segs:
        ids = np.array(ids)
        n_user, n_bot = (ids == tok12b.user_id).sum(), (ids == tok12b.bot_id).sum()
        assert ids[0] == tok12b.user_id and n_user == n_bot >= 1
        is_answer = np.cumsum((ids == tok12b.bot_id).astype(int) - (np.r_[0, ids[:-1]] == tok12b.eos_id)) == 1
        is_answer &= ids != tok12b.bot_id
        assert (np.array(labels) != IGNORE_INDEX).tolist() == is_answer.tolist()
    # ... and the ones that came through whole match render_chat exactly.
    rendered = Counter()
    for name in ("single_turn_example.jsonl", "multi_turn_example.jsonl"):
        lines = (published / "sft" / "datas" / name).read_text(encoding="utf-8").splitlines()[:100]
        for record in map(json.loads, lines):
            turns = parse_record(record)
            history = [{"role": r, "content": c} for q, a in turns[:-1] for r, c in (("user", q), ("bot", a))]
            ids = render_chat(tok12b, turns[-1][0], history) + tok12b.encode(turns[-1][1]) + [tok12b.eos_id]
            rendered[tuple(ids)] += 1
    matched = [ids for ids, _, _ in segs if tuple(ids) in rendered]
    assert len(matched) > 20


# ---- MindRecord -------------------------------------------------------------------------------------------------

def trained_pairs_hf(data):
    """(row, position, token, target) the HF shift trains: logits at t predict labels[t + 1]."""
    pairs = set()
    for r in range(len(data)):
        ids, labels = data[r]["input_ids"], data[r]["labels"]
        for t in np.flatnonzero(labels[1:] != IGNORE_INDEX):
            pairs.add((r, int(t), int(ids[t]), int(labels[t + 1])))
    return pairs


def trained_pairs_mindformers(path, pad_id):
    """The same from a MindRecord as MindFormers reads it: tokens = input_ids[:-1], labels = labels[1:], masked
    where the label is -100 or the input token is the pad id."""
    import mindspore.dataset as ds
    pairs = set()
    rows = ds.MindDataset([str(path)], columns_list=["input_ids", "labels"], shuffle=False)
    for r, row in enumerate(rows.create_dict_iterator(output_numpy=True)):
        assert row["input_ids"].dtype == row["labels"].dtype == np.int32
        tokens, labels = row["input_ids"][:-1], row["labels"][1:]
        for t in np.flatnonzero((labels != IGNORE_INDEX) & (tokens != pad_id)):
            pairs.add((r, int(t), int(tokens[t]), int(labels[t])))
    return pairs


@pytest.mark.parametrize("packing,loss", [("per-sample", "answer"), ("published", "answer"),
                                          ("per-sample", "published"), ("published", "published")])
def test_mindrecord_trains_the_same_pairs(tmp_path, tiny_dir, tiny_tokenizer, packing, loss):
    pytest.importorskip("mindspore")
    multi = {"input": "<_user>第一个问题<_bot>第一个回答<_user>第二个问题", "output": "第二个回答"}
    manifest, data = prepare(tmp_path, tiny_dir, {"a.jsonl": ([multi] + [qa(i) for i in range(20)], 1)},
                             packing=packing, loss_targets=loss, mindrecord=True)
    record = tmp_path / "out" / "dataset.mindrecord"
    assert record.is_file() and Path(f"{record}.db").is_file()
    hf, ms = trained_pairs_hf(data), trained_pairs_mindformers(record, tiny_tokenizer.pad_id)
    assert len(hf) == manifest["targets"]
    if (packing, loss) == ("published", "published"):
        # MindFormers' input mask drops exactly the pad -> <_user> pairs the DeepSpeed reference trains
        assert hf - ms == {p for p in hf if p[2] == tiny_tokenizer.pad_id and p[3] == tiny_tokenizer.user_id} != set() and ms <= hf
    else:
        assert hf == ms
    with pytest.raises(TeleChatError, match="already exists"):
        export_mindrecord(tmp_path / "out", record)
    export_mindrecord(tmp_path / "out", tmp_path / "again.mindrecord", progress=False)
    assert trained_pairs_mindformers(tmp_path / "again.mindrecord", tiny_tokenizer.pad_id) == ms
