"""JSON-lines files read with their line numbers, so every complaint about a record names `file:line`."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def text_lines(path: Path, error: type[Exception], what: str = "file") -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 file with their 1-based numbers; a byte that is not UTF-8 stops
    with its line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    lines = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line)") from None
        if text.strip():
            lines.append((lineno, text))
    return lines


def parse_line(path: Path, lineno: int, text: str, error: type[Exception]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def json_lines(path: Path, error: type[Exception], what: str = "file") -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value) for each non-blank line."""
    for lineno, text in text_lines(path, error, what):
        yield f"{path}:{lineno}", parse_line(path, lineno, text, error)
