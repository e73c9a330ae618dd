"""Shared test fixtures. The real published TeleChat files live beside the checkout in `../shared/telechat`; tests
that need them skip cleanly on a machine that lacks the folder."""

import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = REPO_ROOT.parent / "shared" / "telechat"


@pytest.fixture(scope="session")
def published() -> Path:
    """Folder of real published TeleChat configs, indexes and the 12B tokenizer."""
    if not PUBLISHED.is_dir():
        pytest.skip(f"published TeleChat files not found at {PUBLISHED}")
    return PUBLISHED


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The project's own tiny tokenizer (tokenizer.model + tokenizer_config.json)."""
    from telechat_ascend.tokenizer import build_tiny_tokenizer
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from telechat_ascend.tokenizer import TeleChatTokenizer
    return TeleChatTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module", params=("2.13.0", "2.5.1"))
def version(request):
    """A torch-npu release whose op schemas the NPU call sites are checked against (its wheel is downloaded once)."""
    import npu_schema
    try:
        npu_schema.schema_strings(request.param)
    except npu_schema.WheelUnavailable as exc:
        pytest.skip(f"torch-npu {request.param} wheel not cached and not downloadable: {exc}")
    return request.param


def tiny_with_dropout(base: Path) -> Path:
    """A tiny HF checkpoint with hidden and attention dropout 0.1 (as the 7B release) in base/init, and the demo SFT
    data packed into 64-token rows in base/data: runs with it agree only if dropout is reproducible."""
    import json
    from telechat_ascend.data import prepare_data
    from telechat_ascend.initialize import init_checkpoint
    init_checkpoint("tiny", base / "init", seed=0)
    config = json.loads((base / "init" / "config.json").read_text())
    (base / "init" / "config.json").write_text(json.dumps({**config, "hidden_dropout": 0.1, "attention_dropout": 0.1}))
    prepare_data(REPO_ROOT / "telechat_ascend" / "assets" / "demo_sft" / "data.json", base / "init", base / "data",
                 64, workers=1, progress=False)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on(model, ids: list[int], steps: int, lr: float = 1e-2):
    """`steps` AdamW steps on random 64-token windows of ids (repeated once so windows near the end are full)."""
    import torch
    data = torch.tensor(ids * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.stack([data[s:s + 64] for s in torch.randint(0, len(ids), (8,)).tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
