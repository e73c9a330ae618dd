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
