"""TeleChat tokenizers and the v1 chat rendering.

Two backends: SentencePiece `tokenizer.model` (1B, 12B, 12B-V2) and the HF `tokenizers` library's `tokenizer.json`
(7B, byte-level BPE). Prompts are built segment by segment: every text segment is tokenized on its own and the marker
ids are put around it, as the published `chat()`, the SFT pipeline and the MindSpore preprocessing do. Tokenizing
"<_user>q<_bot>" in one call would add a dummy-prefix `▁` before `<_user>` that training never saw.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers

from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object

# generation_config.json field -> (attribute, vocabulary piece used when the field is absent).
SPECIAL_IDS = {
    "user_token_id": ("user_id", "<_user>"),
    "bot_token_id": ("bot_id", "<_bot>"),
    "eos_token_id": ("eos_id", "<_end>"),
    "bos_token_id": ("bos_id", "<_start>"),
    "pad_token_id": ("pad_id", "<_pad>"),
}
# The only HF special tokens of the slow TelechatTokenizer, with its constructor defaults. HF cuts the text at these
# strings before SentencePiece sees it; `<_user>`/`<_bot>` are SentencePiece user-defined symbols instead.
HF_SPECIAL_TOKENS = {"bos_token": "<_start>", "eos_token": "<_end>", "unk_token": "<unk>", "pad_token": "<_pad>"}

TINY_CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
# The 12B model's fixed pieces after unk/bos/eos/pad (ids 4-122), all SentencePiece user-defined symbols. Byte
# pieces follow at 123-378 as in the real model, so ids 0-378 of a tiny model match it one to one.
USER_DEFINED_SYMBOLS = [
    *"0123456789", "_", "\n", "\t", "__", "___", "____", "<_user>", "<_bot>", "<_system>",
    *(f"<reserve{i}>" for i in range(1, 101)),
]


class TeleChatTokenizer:
    """Text <-> ids for one TeleChat model, plus the special ids chat rendering needs."""

    def __init__(self, backend: spm.SentencePieceProcessor | tokenizers.Tokenizer, *, user_id: int, bot_id: int,
                 eos_id: int, bos_id: int, pad_id: int, split_tokens: Iterable[str] = ()):
        self.backend = backend
        self.user_id, self.bot_id, self.eos_id, self.bos_id, self.pad_id = user_id, bot_id, eos_id, bos_id, pad_id
        self._sp = isinstance(backend, spm.SentencePieceProcessor)
        # SentencePiece only: HF special-token text -> id, and id -> the text decode writes back verbatim.
        self._split_ids = {text: backend.piece_to_id(text) for text in split_tokens} if self._sp else {}
        self._special_text = {i: backend.id_to_piece(i) for i in self._split_ids.values()}
        longest_first = sorted(self._split_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TeleChatTokenizer:
        """Load `tokenizer.model` (preferred) or `tokenizer.json` from a model folder. Special ids come from its
        generation_config.json where present, else from the pieces `<_user>`, `<_bot>`, `<_end>`, `<_start>`,
        `<_pad>`; the HF special-token strings from its tokenizer_config.json."""
        folder = Path(folder)
        sp_path, json_path = folder / "tokenizer.model", folder / "tokenizer.json"
        if sp_path.is_file():
            backend = spm.SentencePieceProcessor()
            try:
                backend.load(str(sp_path))
            except (OSError, RuntimeError) as e:
                raise TeleChatError(f"{sp_path}: not a SentencePiece model ({e})") from e
            config_path = folder / "tokenizer_config.json"
            config = _read_json_object(config_path)
            texts = [_token_text(config_path, key, config.get(key, default))
                     for key, default in HF_SPECIAL_TOKENS.items()]
            split_tokens = [text for text in texts if text is not None]
        elif json_path.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(json_path))
            except Exception as e:  # the Rust side raises plain Exception subclasses
                raise TeleChatError(f"{json_path}: not a tokenizers JSON file ({e})") from e
            split_tokens = []  # tokenizer.json carries its own added tokens
        else:
            raise TeleChatError(f"{folder}: no tokenizer.model (SentencePiece) or tokenizer.json (HF tokenizers)")

        gen_path = folder / "generation_config.json"
        gen = _read_json_object(gen_path)
        vocab_size = _vocab_size(backend)
        ids = {}
        for field, (attr, piece) in SPECIAL_IDS.items():
            if field in gen:
                value = gen[field]
                if type(value) is not int or not 0 <= value < vocab_size:
                    raise TeleChatError(f"{gen_path}: {field} = {value!r} is not an id of the "
                                        f"{vocab_size}-token vocabulary")
            else:
                value = _piece_id(backend, piece)
                if value is None:
                    raise TeleChatError(f"{folder}: {field} is not in generation_config.json and the vocabulary "
                                        f"has no piece {piece!r}")
            ids[attr] = value
        return cls(backend, split_tokens=split_tokens, **ids)

    @property
    def vocab_size(self) -> int:
        return _vocab_size(self.backend)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as the published slow HF tokenizer gives them, without BOS/EOS: cut at the HF special-token
        strings, each other chunk through SentencePiece, which gives every chunk its own dummy prefix `▁`.

        This is the split of transformers 4.30, the version Tele-AI pins. transformers >= 4.34 honours the
        `single_word: true` of the 12B tokenizer_config and leaves e.g. the `<_end>` of "a<_end>b" unsplit."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: "\ud800" in JSON, or undecodable bytes in argv
            raise TeleChatError(f"text is not valid Unicode: {text[error.start]!r} at character {error.start} (a "
                                f"lone surrogate, e.g. from bytes that are not UTF-8)") from None
        if not self._sp:
            return self.backend.encode(text, add_special_tokens=False).ids
        chunks = self._split_re.split(text) if self._split_re else [text]
        ids = []
        for chunk in chunks:
            if chunk in self._split_ids:
                ids.append(self._split_ids[chunk])
            elif chunk:
                ids.extend(self.backend.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: HF special tokens verbatim (or dropped), each run of other ids through SentencePiece."""
        ids, vocab_size = [int(i) for i in ids], self.vocab_size
        for i in ids:
            if not 0 <= i < vocab_size:
                raise TeleChatError(f"decode: id {i} is outside the {vocab_size}-token vocabulary")
        if not self._sp:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids:
            if i in self._special_text:
                parts.append(self.backend.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(self._special_text[i])
            else:
                run.append(i)
        parts.append(self.backend.decode(run))
        return "".join(parts)


def render_chat(tokenizer: TeleChatTokenizer, question: str, history: Sequence[Mapping[str, Any]] = (),
                max_length: int | None = None) -> list[int]:
    """Prompt ids for the next answer, built like the published v1 `chat()` (`build_inputs_for_chat`).

    `history` holds earlier messages oldest first, one dict per message as chat() takes and returns them:
    {"role": "user" | "bot", "content": str} ("assistant" is accepted for "bot"). No BOS, no system prompt.

    `max_length` is chat()'s budget (seq_length - max_new_tokens, or generation_config.max_length). As published,
    the question keeps its last max_length - 1 tokens (so a truncated prompt has max_length + 1), and messages are
    prepended newest first, one message at a time, until one would bring the prompt to max_length or more. The
    published code compares every message with the question's length only, so its history can overflow the budget;
    this counts the messages already taken. The two agree whenever the published prompt is shorter than max_length.
    """
    if not question:
        raise TeleChatError("render_chat: question is empty")
    if max_length is not None and max_length < 3:
        raise TeleChatError(f"render_chat: max_length = {max_length} leaves no room for <_user> q <_bot>")
    messages = [_check_message(i, m) for i, m in enumerate(history)]
    q = tokenizer.encode(question)
    if max_length is not None:
        q = q[-(max_length - 1):]
    ids = [tokenizer.user_id] + q + [tokenizer.bot_id]
    for role, content in reversed(messages):
        segment = _segment(tokenizer, role, content)
        if max_length is not None and len(ids) + len(segment) >= max_length:
            break
        ids = segment + ids
    return ids


def render_dialog(tokenizer: TeleChatTokenizer, turns: Sequence[Sequence[str]]) -> tuple[list[int], list[bool]]:
    """Training ids and loss mask for completed (question, answer) turns:
    [user] q [bot] a [eos] per turn. The mask is True on the answer tokens and on the `<_end>` that closes each one,
    the targets of the MindSpore port's SFT loss."""
    if not turns:
        raise TeleChatError("render_dialog: no turns")
    ids, mask = [], []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise TeleChatError(f"turns[{i}]: expected a (question, answer) pair of strings, got {_describe(turn)}")
        user = _segment(tokenizer, "user", turn[0])
        bot = _segment(tokenizer, "bot", turn[1])
        ids += user + bot
        mask += [False] * (len(user) + 1) + [True] * (len(bot) - 1)
    return ids, mask


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> Path:
    """Train a small SentencePiece BPE model on the bundled bilingual corpus, laid out like the real 12B model (ids
    0-378 hold the same pieces, same trainer and normalizer options), and write `tokenizer.model` plus
    `tokenizer_config.json` into `out_dir`. Returns `out_dir`, ready for `TeleChatTokenizer.from_pretrained`.
    One thread and no sampling or shuffling make the bytes identical on every build."""
    out_dir = Path(out_dir)
    lines = [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=100000, split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>", pad_piece="<_pad>",
            user_defined_symbols=USER_DEFINED_SYMBOLS, minloglevel=2,
        )
    except RuntimeError as e:
        raise TeleChatError(f"build_tiny_tokenizer: vocab_size = {vocab_size}: {e}") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tiny_tokenizer_config(), indent=2) + "\n")
    return out_dir


def _tiny_tokenizer_config() -> dict[str, Any]:
    """The 12B tokenizer_config.json, except that unk is `<_unk>` (the 12B file says `<_end>`) and that there is no
    auto_map: it would send AutoTokenizer to a tokenization_telechat.py this folder does not ship (remote code)."""
    def token(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": True}

    return {
        "tokenizer_class": "TelechatTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "use_fast": False,
        "clean_up_tokenization_spaces": False,
        "eos_token": token("<_end>"),
        "model_max_length": 100000000,
        "sp_model_kwargs": {},
        "pad_token": token("<_pad>"),
        "unk_token": token("<_unk>"),
    }


def _segment(tokenizer: TeleChatTokenizer, role: str, text: str) -> list[int]:
    """One message framed as the published code frames it: [user] text, or [bot] text [eos]."""
    if role == "user":
        return [tokenizer.user_id] + tokenizer.encode(text)
    return [tokenizer.bot_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def _check_message(index: int, message: Any) -> tuple[str, str]:
    """(role, content) of history[index], with "assistant" read as "bot"."""
    if not isinstance(message, Mapping):
        raise TeleChatError(f"history[{index}]: expected a dict with 'role' and 'content', got {_describe(message)}")
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "bot", "assistant"):
        raise TeleChatError(f"history[{index}]: role must be 'user', 'bot' or 'assistant', got {role!r}")
    if not isinstance(content, str):
        raise TeleChatError(f"history[{index}]: content must be a string, got {_describe(content)}")
    return ("user" if role == "user" else "bot"), content


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _vocab_size(backend: spm.SentencePieceProcessor | tokenizers.Tokenizer) -> int:
    if isinstance(backend, spm.SentencePieceProcessor):
        return backend.get_piece_size()
    return backend.get_vocab_size(with_added_tokens=True)


def _piece_id(backend: spm.SentencePieceProcessor | tokenizers.Tokenizer, piece: str) -> int | None:
    if isinstance(backend, spm.SentencePieceProcessor):
        i = backend.piece_to_id(piece)  # unknown pieces map to the unk id, so check the way back
        return i if backend.id_to_piece(i) == piece else None
    return backend.token_to_id(piece)


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent."""
    return read_json_object(path, missing_ok=True)


def _token_text(path: Path, key: str, value: Any) -> str | None:
    """A tokenizer_config special token: a plain string or an AddedToken dict; None means the token is unset."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not (isinstance(value, str) and value):
        raise TeleChatError(f"{path}: {key} must be a non-empty string or an AddedToken dict, got {value!r}")
    return value
