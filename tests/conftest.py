"""Shared test fixtures. The real published TeleChat files live beside the checkout in `../shared/telechat`; tests
that need them skip cleanly on a machine that lacks the folder."""

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
