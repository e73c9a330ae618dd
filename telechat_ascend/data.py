"""SFT data: TeleChat jsonl -> packed, memory-mapped training shards, plus a MindRecord export for MindFormers.

Input. `--data` is a data.json mapping jsonl paths (relative to its folder) to weights, as in the published
deepspeed-telechat/sft, or a single .jsonl (weight 1). One record per line, in either format:
  published  {"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}  (history inline; the leading <_user> of
             input and a leading <_bot> of output are optional)
  messages   {"dialog": [{"role": "user", "content": "q1"}, {"role": "bot", "content": "a1"}, ...]}
             (roles user, bot or assistant, alternating, starting with user and ending with the answer)
Every turn renders as `render_dialog` renders it: [<_user>] q [<_bot>] a [<_end>], each text segment tokenized on its
own, so the ids of a record equal render_chat(q_last, history) + a_last + [<_end>]. Blank lines are skipped and
counted; a bad line raises TeleChatError "file:line: reason" unless skip_bad, which counts it instead.

Pipeline. (1) Every line is parsed, rendered and fitted to seq_len once, by worker processes over chunks of
lines, results taken in order, into a token store on disk (in the output's temporary folder), so the output is
byte-identical for any worker count and neither text nor tokens are held in memory. (2) Weighting as published:
weight w gives each sample floor(w) copies plus one more with probability frac(w) (w < 1: kept with probability
w). (3) A global seeded permutation of the copies' sample indices (a few bytes per copy, the only per-sample
state in memory). (4) First-fit packing of whole samples into at most `pack_window` open rows; a row is written
when it is full or when it is the oldest open row and a new one is needed. With num_samples the run stops at that
many rows; if the data runs out first the manifest says `exhausted` (or, with repeat, weighting and shuffling are
drawn again for another epoch). Nothing disappears without a count in the manifest.

Over-long samples (more than seq_len tokens) are dropped, or truncated: whole turns go first, oldest first; a last
turn that alone is too long keeps the end of its question (as chat() keeps the end of a prompt) and then the start
of its answer, losing the <_end> (so the model is not taught to stop mid-answer).

Shard format, version 1: a folder with manifest.json and, per shard k, shard-{k:05d}.{input_ids,labels,position_ids,
segment_ids}.npy, int32 of shape [rows, seq_len], read with np.load(mmap_mode="r") (see PackedDataset).
  labels        aligned with input_ids: labels[t] = input_ids[t] where token t is a training target, else -100.
                Models shift by one (HF convention: the logits at t-1 predict labels[t]).
  position_ids  restart at 0 for every packed sample (0 on padding).
  segment_ids   1, 2, 3 ... per sample within a row, 0 on padding: attend only within the same segment.
Packing modes:
  per-sample    (default) right padding with the tokenizer's pad id; a sample's first token is never a target
                (its predecessor belongs to another sample).
  published     as deepspeed-telechat process_data.py: left padding, segment_ids all 1 (the whole row, pads
                included, attends to itself causally), position_ids 0..seq_len-1.
Loss targets:
  answer        (default) the answer tokens and each <_end>, as the MindSpore port trains.
  published     also <_bot> and <_user>, as the DeepSpeed --with_loss_mask reference trains.
A row's first position is never a target (nothing predicts it). The manifest records the settings, counts per
source, the tokenizer's special ids and sha256, and a sha256 over all shard files in order.

MindRecord: export_mindrecord (or prepare_data(mindrecord=True), which writes dataset.mindrecord into the output
folder) writes the rows in the layout MindFormers' TeleChat finetuning reads; see its docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from telechat_ascend.checkpoint import atomic_output_dir
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import inside, read_json, read_json_object
from telechat_ascend.tokenizer import TeleChatTokenizer, render_dialog

FORMAT_VERSION = 1
IGNORE_INDEX = -100
ARRAYS = ("input_ids", "labels", "position_ids", "segment_ids")
PACKING_MODES = ("per-sample", "published")
LOSS_TARGETS = ("answer", "published")
OVERLONG = ("truncate", "drop")
MINDRECORD_FILE = "dataset.mindrecord"
USER, BOT = "<_user>", "<_bot>"
ROLES = {"user": "user", "bot": "bot", "assistant": "bot"}
CHUNK_LINES = 256  # lines per pool task: large enough to amortise pickling, small enough to keep workers busy
MIN_SEQ_LEN = 8
MAX_WEIGHT = 1000  # a source's weight is how many copies of it are drawn; the plan holds them all in memory


# ---- parsing and rendering one record ---------------------------------------------------------------------------

def parse_record(record: Any) -> list[tuple[str, str]]:
    """(question, answer) turns of one decoded jsonl record, in either input format."""
    if not isinstance(record, dict):
        raise TeleChatError(f"expected a JSON object, got {type(record).__name__}")
    turns = _parse_dialog(record["dialog"]) if "dialog" in record else _parse_published(record)
    for i, (_, answer) in enumerate(turns, 1):
        if not answer.strip():
            raise TeleChatError("empty answer" + (f" in turn {i}" if len(turns) > 1 else ""))
    return turns


def _parse_published(record: dict) -> list[tuple[str, str]]:
    for key in ("input", "output"):
        if key not in record:
            raise TeleChatError(f"missing '{key}' (expected 'input'/'output' or 'dialog')")
        if not isinstance(record[key], str):
            raise TeleChatError(f"'{key}' must be a string, got {type(record[key]).__name__}")
    answer = record["output"].removeprefix(BOT)
    pieces = re.split(f"({re.escape(USER)}|{re.escape(BOT)})", record["input"])
    # A plain question gets the <_user> the published code prepends; otherwise drop the empty text before it.
    pieces = [USER, *pieces] if pieces[0] or len(pieces) == 1 else pieces[1:]
    markers, texts = pieces[0::2], pieces[1::2]
    for i, marker in enumerate(markers):
        if i % 2 == 0 and marker == BOT:
            raise TeleChatError(f"'input': {BOT} without a preceding {USER} question (marker {i + 1})")
        if i % 2 == 1 and marker == USER:
            raise TeleChatError(f"'input': {USER} follows a question without a {BOT} answer (marker {i + 1})")
    if markers[-1] == BOT:
        raise TeleChatError(f"'input' ends with a {BOT} answer; its last turn must be a {USER} question")
    return list(zip(texts[0::2], texts[1::2])) + [(texts[-1], answer)]


def _parse_dialog(dialog: Any) -> list[tuple[str, str]]:
    if not isinstance(dialog, list) or not dialog:
        raise TeleChatError("'dialog' must be a non-empty list of {\"role\", \"content\"} messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict):
            raise TeleChatError(f"dialog[{i}]: expected an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TeleChatError(f"dialog[{i}]: unknown role {role!r} (expected 'user', 'bot' or 'assistant')")
        if not isinstance(content, str):
            raise TeleChatError(f"dialog[{i}]: 'content' must be a string, got {type(content).__name__}")
        expected = "user" if i % 2 == 0 else "bot"
        if ROLES[role] != expected:
            raise TeleChatError(f"dialog[{i}]: expected a {expected} message (user and bot alternate, user first), "
                                f"got {role!r}")
    if len(dialog) % 2:
        raise TeleChatError("dialog ends with a user message; the last message must be the answer")
    return [(q["content"], a["content"]) for q, a in zip(dialog[0::2], dialog[1::2])]


def render_turns(tokenizer: TeleChatTokenizer, turns: list[tuple[str, str]]) -> list[tuple[list[int], list[bool]]]:
    """(ids, answer mask) per turn, via render_dialog. A control token inside a text ("<_end>", "<_pad>", a stray
    "<_user>" ...) would corrupt the turn structure, so it is an error."""
    controls = {tokenizer.user_id, tokenizer.bot_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id}
    rendered = []
    for i, turn in enumerate(turns, 1):
        ids, mask = render_dialog(tokenizer, [turn])
        bot = mask.index(True) - 1  # the answer starts right after <_bot>; the closing <_end> is always masked in
        found = controls.intersection(ids[1:bot] + ids[bot + 1:-1])
        if found:
            names = ", ".join(repr(tokenizer.decode([t])) for t in sorted(found))
            raise TeleChatError(f"turn {i}: the text contains control token(s) {names}")
        rendered.append((ids, mask))
    return rendered


def fit_sample(turns: list[tuple[list[int], list[bool]]], seq_len: int, bot_id: int
               ) -> tuple[list[int], list[bool], bool]:
    """One sample of at most seq_len tokens: (ids, mask, truncated). Oldest turns go first; a last turn still too
    long keeps the end of its question and the start of its answer."""
    kept = turns
    while len(kept) > 1 and sum(len(ids) for ids, _ in kept) > seq_len:
        kept = kept[1:]
    ids, mask = [t for ids, _ in kept for t in ids], [m for _, mask in kept for m in mask]
    excess = len(ids) - seq_len
    if excess > 0:
        cut = 1 + min(excess, ids.index(bot_id) - 1)  # keep <_user>, drop the start of the question
        ids, mask = (ids[:1] + ids[cut:])[:seq_len], (mask[:1] + mask[cut:])[:seq_len]
    return ids, mask, len(kept) < len(turns) or excess > 0


# ---- tokenization workers ---------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_dir: Path, seq_len: int, loss_targets: str, overlong: str) -> None:
    _worker.update(tokenizer=TeleChatTokenizer.from_pretrained(tokenizer_dir), seq_len=seq_len,
                   loss_targets=loss_targets, overlong=overlong)


def _tokenize_chunk(chunk: tuple[int, int, list[bytes]]) -> tuple[int, int, list[tuple[int, str, Any]]]:
    """(file index, bytes read, [(line number, status, payload)]) for a chunk of lines. Status is ok, truncated
    (payload: ids, labels), dropped (over-long), blank, or bad (payload: the reason)."""
    file_index, first_line, lines = chunk
    tok, seq_len = _worker["tokenizer"], _worker["seq_len"]
    results = []
    for line_no, raw in enumerate(lines, first_line):
        if not raw.strip():
            results.append((line_no, "blank", None))
            continue
        try:
            turns = render_turns(tok, parse_record(json.loads(raw)))
        except json.JSONDecodeError as e:
            results.append((line_no, "bad", f"invalid JSON ({e})"))
            continue
        except UnicodeDecodeError as e:
            results.append((line_no, "bad", f"not UTF-8 text ({e})"))
            continue
        except TeleChatError as e:
            results.append((line_no, "bad", str(e)))
            continue
        if _worker["overlong"] == "drop" and sum(len(ids) for ids, _ in turns) > seq_len:
            results.append((line_no, "dropped", None))
            continue
        ids, mask, truncated = fit_sample(turns, seq_len, tok.bot_id)
        ids, mask = np.array(ids, np.int32), np.array(mask)
        if _worker["loss_targets"] == "published":
            mask |= (ids == tok.user_id) | (ids == tok.bot_id)
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
        results.append((line_no, "truncated" if truncated else "ok", (ids, labels)))
    return file_index, sum(map(len, lines)), results


def _read_chunks(files: list[Path]) -> Iterator[tuple[int, int, list[bytes]]]:
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            chunk, first = [], 1
            for line_no, raw in enumerate(f, 1):
                chunk.append(raw)
                if len(chunk) == CHUNK_LINES:
                    yield index, first, chunk
                    chunk, first = [], line_no + 1
            if chunk:
                yield index, first, chunk


def _tokenized(files: list[Path], workers: int, init_args: tuple) -> Iterator:
    """_tokenize_chunk over all lines, in order. Chunk i goes to worker i % workers over that worker's own pipe,
    and its next chunk only after its result is read, so at most one chunk per worker is in memory. No locks are
    shared with the workers (multiprocessing.Pool's terminate can hang on its queue locks when it is stopped early,
    e.g. at a bad line), and stopping kills them."""
    if workers == 1:
        _init_worker(*init_args)
        yield from map(_tokenize_chunk, _read_chunks(files))
        return
    context = multiprocessing.get_context("fork")
    pipes, processes = [], []
    try:
        for _ in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_loop, args=(theirs, pipes[:], init_args),
                                      daemon=True)
            process.start()
            theirs.close()  # so a dead worker reads as EOFError here
            pipes.append(ours)
            processes.append(process)
        pending = deque()  # the workers holding a chunk, in chunk order
        for i, chunk in enumerate(_read_chunks(files)):
            if len(pending) == workers:
                yield _result(pipes[pending.popleft()])
            pipes[i % workers].send(chunk)
            pending.append(i % workers)
        while pending:
            yield _result(pipes[pending.popleft()])
    finally:
        for process in processes:
            process.kill()
            process.join()
        for pipe in pipes:
            pipe.close()


def _worker_loop(pipe, other_workers_pipes: list, init_args: tuple) -> None:
    for inherited in other_workers_pipes:  # the fork copied the parent's ends; holding them would hide its exit
        inherited.close()
    _init_worker(*init_args)
    while True:
        try:
            chunk = pipe.recv()
        except EOFError:
            return
        try:
            result = ("ok", _tokenize_chunk(chunk))
        except Exception as error:  # re-raised in the parent, as Pool would
            result = ("error", error)
        pipe.send(result)


def _result(pipe):
    try:
        status, payload = pipe.recv()
    except EOFError:
        raise TeleChatError("a prepare-data worker process died (killed, or out of memory?)") from None
    if status == "error":
        raise payload
    return payload


class _TokenStore:
    """Rendered samples appended to two flat int32 files (ids, labels); only their lengths stay in memory."""

    def __init__(self, folder: Path):
        self.paths = folder / "store.ids.bin", folder / "store.labels.bin"
        self.files = [open(p, "wb") for p in self.paths]
        self.lengths = array("i")

    def append(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.files[0].write(ids.tobytes())
        self.files[1].write(labels.tobytes())
        self.lengths.append(len(ids))

    def finish(self) -> int:
        """Close the files and map them for reading; returns the number of samples (an empty store stays
        unmapped: an empty file cannot be mapped)."""
        for f in self.files:
            f.close()
        self.lengths = np.frombuffer(self.lengths, dtype=np.int32)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        if len(self.lengths):
            self.ids, self.labels = (np.memmap(p, dtype=np.int32, mode="r") for p in self.paths)
        return len(self.lengths)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.starts[i], self.starts[i + 1]
        return self.ids[start:stop], self.labels[start:stop]

    def remove(self) -> None:
        for p in self.paths:
            p.unlink()  # the maps stay valid until dropped


# ---- packing and writing ----------------------------------------------------------------------------------------

class _Packer:
    """First-fit of whole samples into a bounded window of open rows."""

    def __init__(self, seq_len: int, window: int):
        self.seq_len, self.window = seq_len, window
        self.rows: list[list[int]] = []
        self.free: list[int] = []

    def add(self, sample: int, length: int) -> list[list[int]]:
        """Place one sample; returns the rows this closes (a full row, or the oldest pushed out of the window)."""
        j = next((j for j, free in enumerate(self.free) if free >= length), None)
        closed = []
        if j is None:
            if len(self.rows) == self.window:
                closed.append(self._close(0))
            self.rows.append([])
            self.free.append(self.seq_len)
            j = len(self.rows) - 1
        self.rows[j].append(sample)
        self.free[j] -= length
        if self.free[j] == 0:
            closed.append(self._close(j))
        return closed

    def _close(self, j: int) -> list[int]:
        del self.free[j]
        return self.rows.pop(j)

    def flush(self) -> list[list[int]]:
        rows, self.rows, self.free = self.rows, [], []
        return rows


def build_row(samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, packing: str, pad_id: int
              ) -> dict[str, np.ndarray]:
    """The four arrays of one packed row from its samples' (ids, labels)."""
    row = {"input_ids": np.full(seq_len, pad_id, np.int32), "labels": np.full(seq_len, IGNORE_INDEX, np.int32)}
    used = sum(len(ids) for ids, _ in samples)
    t = 0 if packing == "per-sample" else seq_len - used  # published: left padding
    if packing == "per-sample":
        row["position_ids"], row["segment_ids"] = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
    else:
        row["position_ids"], row["segment_ids"] = np.arange(seq_len, dtype=np.int32), np.ones(seq_len, np.int32)
    for segment, (ids, labels) in enumerate(samples, 1):
        n = len(ids)
        row["input_ids"][t:t + n], row["labels"][t:t + n] = ids, labels
        if packing == "per-sample":
            row["labels"][t] = IGNORE_INDEX
            row["position_ids"][t:t + n] = np.arange(n)
            row["segment_ids"][t:t + n] = segment
        t += n
    row["labels"][0] = IGNORE_INDEX
    return row


class _ShardWriter:
    """Rows into shard-NNNNN.<array>.npy files of rows_per_shard rows (the last one shorter)."""

    def __init__(self, folder: Path, seq_len: int, rows_per_shard: int):
        self.folder = folder
        self.buffer = {name: np.empty((rows_per_shard, seq_len), np.int32) for name in ARRAYS}
        self.n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, row: dict[str, np.ndarray]) -> None:
        for name in ARRAYS:
            self.buffer[name][self.n] = row[name]
        self.n += 1
        if self.n == len(self.buffer["input_ids"]):
            self.close()

    def close(self) -> None:
        if self.n:
            name = f"shard-{len(self.shards):05d}"
            for array_name in ARRAYS:
                np.save(self.folder / f"{name}.{array_name}.npy", self.buffer[array_name][:self.n])
            self.shards.append({"name": name, "rows": self.n})
            self.n = 0


def shard_files(folder: Path, shards: list[dict[str, Any]]) -> list[Path]:
    """Every shard file, in the order the content hash reads them."""
    return [Path(folder) / f"{shard['name']}.{name}.npy" for shard in shards for name in ARRAYS]


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# ---- the pipeline -----------------------------------------------------------------------------------------------

def read_sources(data: str | Path) -> list[tuple[str, Path, float]]:
    """(name, jsonl path, weight) per source of a data.json (paths relative to its folder), or of one .jsonl."""
    data = Path(data)
    if not data.is_file():
        raise TeleChatError(f"{data}: no such file")
    if data.suffix == ".jsonl":
        return [(data.name, data, 1.0)]
    mapping = read_json(data, "data.json")
    if not isinstance(mapping, dict) or not mapping:
        raise TeleChatError(f"{data}: expected a non-empty JSON object mapping jsonl paths to weights")
    sources = []
    for name, weight in mapping.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
            raise TeleChatError(f"{data}: weight of {name!r} must be a positive number of at most {MAX_WEIGHT} "
                                f"(copies of the source), got {weight!r}")
        path = inside(data.parent, name, data)
        if not path.is_file():
            raise TeleChatError(f"{data}: {name!r} not found (looked for {path})")
        sources.append((name, path, float(weight)))
    return sources


def _tokenizer_info(folder: Path, tok: TeleChatTokenizer) -> dict[str, Any]:
    """Special ids and the sha256 of the file from_pretrained loads (tokenizer.model before tokenizer.json)."""
    file = next(f for f in (folder / "tokenizer.model", folder / "tokenizer.json") if f.is_file())
    return {"file": file.name, "sha256": _sha256([file]), "vocab_size": tok.vocab_size,
            **{name: getattr(tok, name) for name in ("user_id", "bot_id", "eos_id", "bos_id", "pad_id")}}


def prepare_data(data: str | Path, tokenizer: str | Path, out: str | Path, seq_len: int, *,
                 num_samples: int | None = None, packing: str = "per-sample", loss_targets: str = "answer",
                 overlong: str = "truncate", skip_bad: bool = False, repeat: bool = False, seed: int = 42,
                 workers: int | None = None, pack_window: int = 32, rows_per_shard: int | None = None,
                 mindrecord: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize, weight, shuffle and pack the sources of `data` into a shard folder at `out` (see the module
    docstring); with mindrecord also `out`/dataset.mindrecord. Returns the manifest."""
    for name, value, choices in (("packing", packing, PACKING_MODES), ("loss_targets", loss_targets, LOSS_TARGETS),
                                 ("overlong", overlong, OVERLONG)):
        if value not in choices:
            raise TeleChatError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    for name, value, least in (("seq_len", seq_len, MIN_SEQ_LEN), ("num_samples", num_samples, 1),
                               ("workers", workers, 1), ("pack_window", pack_window, 1),
                               ("rows_per_shard", rows_per_shard, 1)):
        if value is not None and value < least:
            raise TeleChatError(f"{name} must be at least {least}, got {value}")
    if rows_per_shard is None:
        rows_per_shard = max(1, (1 << 22) // seq_len)  # ~4M tokens, 16 MB per array file
    if repeat and num_samples is None:
        raise TeleChatError("repeat needs num_samples (the number of rows to stop at)")
    if mindrecord:
        _filewriter()  # fail before the work, not after it
    sources = read_sources(data)
    tokenizer = Path(tokenizer)
    tok = TeleChatTokenizer.from_pretrained(tokenizer)
    counts = [{"path": name, "weight": weight, "lines": 0, "blank": 0, "bad": 0, "first_bad": None, "samples": 0,
               "truncated": 0, "dropped_overlong": 0, "copies": 0, "packed": 0} for name, _, weight in sources]

    with atomic_output_dir(out, force) as tmp:
        store = _TokenStore(tmp)
        _tokenize_sources(store, [path for _, path, _ in sources], counts, workers,
                          (tokenizer, seq_len, loss_targets, overlong), skip_bad, progress)
        if not store.finish():
            raise TeleChatError(f"{data}: no usable samples ({_summary(counts)})")

        # Samples are stored file after file, so each source owns a contiguous range of sample indices.
        ends = np.cumsum([c["samples"] for c in counts])
        ranges = [(int(stop) - c["samples"], int(stop)) for c, stop in zip(counts, ends)]
        rng = np.random.default_rng(seed)
        writer = _ShardWriter(tmp, seq_len, rows_per_shard)
        packer = _Packer(seq_len, pack_window)
        stats = {"rows": 0, "tokens": 0, "targets": 0, "samples_packed": 0}
        bar = tqdm(total=num_samples, unit="row", desc="pack", disable=not progress)

        def emit(rows: list[list[int]]) -> None:
            for row_samples in rows[:(num_samples - stats["rows"]) if num_samples else None]:
                row = build_row([store.sample(s) for s in row_samples], seq_len, packing, tok.pad_id)
                writer.add(row)
                for source in np.searchsorted(ends, row_samples, side="right"):
                    counts[source]["packed"] += 1
                stats["rows"] += 1
                stats["tokens"] += int(sum(store.lengths[s] for s in row_samples))
                stats["targets"] += int((row["labels"] != IGNORE_INDEX).sum())
                stats["samples_packed"] += len(row_samples)
                bar.update()

        epochs, full = 0, False
        while not full and (epochs == 0 or repeat):
            epochs += 1
            order, copies = weighted_order(rng, ranges, [w for _, _, w in sources])
            for c, n in zip(counts, copies):
                c["copies"] += n
            for s in order:
                emit(packer.add(int(s), int(store.lengths[s])))
                if full := num_samples is not None and stats["rows"] == num_samples:
                    break
        if not full:
            emit(packer.flush())
        bar.close()
        writer.close()
        store.remove()

        manifest = {
            "format_version": FORMAT_VERSION,
            "seq_len": seq_len,
            **stats,
            "packing": packing,
            "loss_targets": loss_targets,
            "overlong": overlong,
            "seed": seed,
            "pack_window": pack_window,
            "num_samples": num_samples,
            "repeat": repeat,
            "epochs": epochs,
            "exhausted": num_samples is not None and stats["rows"] < num_samples,
            "unused_copies": sum(c["copies"] for c in counts) - stats["samples_packed"],
            "sources": counts,
            "tokenizer": _tokenizer_info(tokenizer, tok),
            "shards": writer.shards,
            "content_sha256": _sha256(shard_files(tmp, writer.shards)),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if mindrecord:
            export_mindrecord(tmp, tmp / MINDRECORD_FILE, progress=progress)
    return manifest


def _tokenize_sources(store: _TokenStore, files: list[Path], counts: list[dict[str, Any]], workers: int,
                      init_args: tuple, skip_bad: bool, progress: bool) -> None:
    """Render every line of `files` into `store`, counting each line in its source's counts."""
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress)
    with bar, contextlib.closing(_tokenized(files, workers, init_args)) as chunks:  # closing stops the workers at once
        for file_index, nbytes, results in chunks:
            c = counts[file_index]
            for line_no, status, payload in results:
                c["lines"] += 1
                if status == "bad":
                    where = f"{files[file_index]}:{line_no}: {payload}"
                    if not skip_bad:
                        raise TeleChatError(where)
                    c["bad"] += 1
                    c["first_bad"] = c["first_bad"] or where
                elif status in ("ok", "truncated"):
                    store.append(*payload)
                    c["samples"] += 1
                    c["truncated"] += status == "truncated"
                else:
                    c["blank" if status == "blank" else "dropped_overlong"] += 1
            bar.update(nbytes)


def weighted_order(rng: np.random.Generator, ranges: list[tuple[int, int]], weights: list[float]
                   ) -> tuple[np.ndarray, list[int]]:
    """One epoch: the shuffled sample indices, where each sample of source k (indices ranges[k]) appears
    floor(w) times plus once more with probability frac(w), and the number of copies per source."""
    extra = [rng.random(stop - start) < w % 1 for (start, stop), w in zip(ranges, weights)]
    copies = [np.repeat(np.arange(start, stop), int(w) + e) for (start, stop), w, e in zip(ranges, weights, extra)]
    return rng.permutation(np.concatenate(copies)), [len(c) for c in copies]


def _summary(counts: list[dict[str, Any]]) -> str:
    return "; ".join(f"{c['path']}: {c['lines']} lines, {c['blank']} blank, {c['bad']} bad, "
                     f"{c['dropped_overlong']} dropped as over-long" for c in counts)


# ---- reading ----------------------------------------------------------------------------------------------------

class PackedDataset:
    """Rows of a shard folder as dicts of int32 arrays (views into memory maps)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise TeleChatError(f"{path}: no manifest; not a prepare-data output folder")
        try:
            self.manifest = read_json_object(path, "manifest")
            version, seq_len, shards = (self.manifest[k] for k in ("format_version", "seq_len", "shards"))
            rows = [int(shard["rows"]) for shard in shards]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TeleChatError(f"{path}: not a valid manifest ({type(e).__name__}: {e})") from e
        if version != FORMAT_VERSION:
            raise TeleChatError(f"{path}: format_version {version!r}; this reader knows {FORMAT_VERSION}")
        self.shards = []
        for shard, n in zip(shards, rows):
            arrays = {}
            for name in ARRAYS:
                file = self.folder / f"{shard['name']}.{name}.npy"
                if not file.is_file():
                    raise TeleChatError(f"{file}: shard file missing")
                try:
                    arrays[name] = np.load(file, mmap_mode="r")
                except (ValueError, OSError) as e:
                    raise TeleChatError(f"{file}: not a .npy array ({e})") from e
                if arrays[name].dtype != np.int32 or arrays[name].shape != (n, seq_len):
                    raise TeleChatError(f"{file}: expected int32 [{n}, {seq_len}], got {arrays[name].dtype} "
                                        f"{list(arrays[name].shape)}")
            self.shards.append(arrays)
        self.starts = np.cumsum([0, *rows])
        if self.starts[-1] != self.manifest.get("rows"):
            raise TeleChatError(f"{path}: the shards hold {self.starts[-1]} rows, the manifest says "
                                f"{self.manifest.get('rows')}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return {name: array[i - self.starts[k]] for name, array in self.shards[k].items()}

    def verify(self) -> None:
        """Recompute the content hash over all shard files and compare it with the manifest's."""
        digest = _sha256(shard_files(self.folder, self.manifest["shards"]))
        if digest != self.manifest.get("content_sha256"):
            raise TeleChatError(f"{self.folder}: shard content sha256 {digest} does not match the manifest's "
                                f"{self.manifest.get('content_sha256')}")


# ---- MindRecord -------------------------------------------------------------------------------------------------

def _filewriter():
    try:
        from mindspore.mindrecord import FileWriter
    except ImportError as e:
        raise TeleChatError(f"MindRecord export needs mindspore (pip install 'telechat-ascend[mindspore]'): {e}") \
            from None
    return FileWriter


def export_mindrecord(folder: str | Path, out_file: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Write a shard folder as the MindRecord MindFormers' TeleChat finetuning reads ("lm-schema", int32 columns
    input_ids and labels, seq_len + 1 tokens a row; out_file plus out_file.db).

    MindFormers slices tokens = input_ids[:, :-1] and labels = labels[:, 1:], so each row gets one trailing pad
    (input) and -100 (label): tokens are then our input_ids and token t's target is our labels[t + 1], exactly the
    pairs of the HF shift. MindFormers also masks positions whose input token is the pad id; only the published
    packing + published loss mode has such pairs (left pad -> <_user>), which MindFormers therefore does not train.
    MindRecord has no segment or position columns: MindFormers attends across packed samples as the published
    pipeline does."""
    FileWriter = _filewriter()
    dataset, out_file = PackedDataset(folder), Path(out_file)
    for path in (out_file, Path(f"{out_file}.db")):
        if path.exists() and not force:
            raise TeleChatError(f"{path} already exists; pass --force to overwrite it")
    pad_id = dataset.manifest["tokenizer"]["pad_id"]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(str(out_file), shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
                      "lm-schema")
    batch = []
    for i in tqdm(range(len(dataset)), unit="row", desc="mindrecord", disable=not progress):
        row = dataset[i]
        batch.append({"input_ids": np.append(row["input_ids"], np.int32(pad_id)),
                      "labels": np.append(row["labels"], np.int32(IGNORE_INDEX))})
        if len(batch) == 1024:
            writer.write_raw_data(batch)
            batch = []
    if batch:
        writer.write_raw_data(batch)
    writer.commit()
    return out_file


# ---- command line -----------------------------------------------------------------------------------------------

def add_prepare_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prepare-data", help="tokenize and pack SFT jsonl into training shards",
                              description="Tokenize, weight, shuffle and pack TeleChat SFT jsonl into memory-mapped "
                                          ".npy shards (see telechat_ascend/data.py for the format).")
    p.add_argument("--data", required=True, type=Path, help="data.json (jsonl path -> weight) or one .jsonl file")
    p.add_argument("--tokenizer", required=True, type=Path, help="folder with tokenizer.model or tokenizer.json")
    p.add_argument("--seq-len", required=True, type=int, help="tokens per packed row")
    p.add_argument("--num-samples", type=int, default=None,
                   help="packed rows to produce (default: everything from one pass over the weighted data)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--packing", choices=PACKING_MODES, default="per-sample",
                   help="per-sample: attention kept within each packed sample (default); published: as "
                        "deepspeed-telechat, left padding, the whole row attends to itself")
    p.add_argument("--loss-targets", choices=LOSS_TARGETS, default="answer",
                   help="answer: answer tokens and <_end> (default); published: also <_bot> and <_user>")
    p.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="samples longer than --seq-len: truncate (oldest turns first) or drop; counted either way")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad lines instead of stopping")
    p.add_argument("--repeat", action="store_true",
                   help="with --num-samples: start another reshuffled epoch when the data runs out")
    p.add_argument("--seed", type=int, default=42, help="seed of the weighting draws and the shuffle")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--pack-window", type=int, default=32, help="open rows the first-fit packer keeps")
    p.add_argument("--rows-per-shard", type=int, default=None, help="default: about 4M tokens per shard")
    p.add_argument("--mindrecord", action="store_true",
                   help=f"also write {MINDRECORD_FILE} for MindFormers (needs mindspore)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_prepare_data)
    return p


def _run_prepare_data(args: argparse.Namespace) -> None:
    m = prepare_data(args.data, args.tokenizer, args.out, args.seq_len, num_samples=args.num_samples,
                     packing=args.packing, loss_targets=args.loss_targets, overlong=args.overlong,
                     skip_bad=args.skip_bad, repeat=args.repeat, seed=args.seed, workers=args.workers,
                     pack_window=args.pack_window, rows_per_shard=args.rows_per_shard, mindrecord=args.mindrecord,
                     force=args.force, progress=not args.quiet)
    fill = m["tokens"] / (m["rows"] * m["seq_len"])
    print(f"wrote {m['rows']} rows x {m['seq_len']} tokens ({fill:.1%} filled, {m['targets']} targets, "
          f"{m['samples_packed']} samples, {m['epochs']} epoch(s)) to {args.out}")
    for c in m["sources"]:
        print(f"  {c['path']} (weight {c['weight']:g}): {c['lines']} lines, {c['samples']} samples, "
              f"{c['copies']} copies, {c['packed']} packed; {c['bad']} bad, {c['blank']} blank, "
              f"{c['truncated']} truncated, {c['dropped_overlong']} dropped as over-long")
        if c["first_bad"]:
            print(f"    first bad line: {c['first_bad']}")
    if m["exhausted"]:
        print(f"note: the data ran out after {m['rows']} of {m['num_samples']} rows (--repeat reuses it)")
    if m["unused_copies"]:
        print(f"note: {m['unused_copies']} weighted copies were not needed for {m['rows']} rows")
