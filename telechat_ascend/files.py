"""Reading the small text files a user hands over (config.json, generation_config.json, indexes, data.json, YAML,
prompt and evaluation text) with errors that name the file, and keeping the paths they name inside their folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from telechat_ascend.errors import TeleChatError


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing, unreadable or non-UTF-8 file is an error naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TeleChatError(f"{path}: not found (the {what})") from None
    except IsADirectoryError:
        raise TeleChatError(f"{path}: is a folder, expected a {what}") from None
    except OSError as error:
        raise TeleChatError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise TeleChatError(f"{path}:{line}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                            f"{error.start})") from None


def read_json(path: str | Path, what: str = "JSON file", missing_ok: bool = False) -> Any:
    """The JSON value in `path` ({} for an absent file with missing_ok); errors name the file and the line."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TeleChatError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def read_json_object(path: str | Path, what: str = "JSON file", missing_ok: bool = False) -> dict[str, Any]:
    value = read_json(path, what, missing_ok)
    if not isinstance(value, dict):
        raise TeleChatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def inside(folder: Path, name: str, source: Path) -> Path:
    """folder / name, refused when `name` (from an index or data.json) is absolute or climbs out of `folder`."""
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise TeleChatError(f"{source}: names {name!r}, which lies outside {folder}; paths there must stay inside "
                            f"the folder")
    return folder / name
