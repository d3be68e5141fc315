"""Input errors know where they come from: every refusal of a user file names the file, the
line and the field, and the CLI turns it into exit code 2. `decode_text` and `read_json` are
the input boundary for text and JSON files: an unreadable file, bytes that are not UTF-8,
invalid JSON, NaN or Infinity, or nesting past formats.limits.MAX_NESTING all become
InputErrors naming the file (and the line where known), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formats.limits import MAX_NESTING

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """A user-supplied file or argument is wrong; the message says where and why."""

    def __init__(self, message: str, *, file: str | Path | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.reason = message
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.reason}"


def decode_text(path: str | Path) -> str:
    """A user file's text; unreadable files and bytes that are not UTF-8 become InputErrors
    (the latter with the line of the first bad byte)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}",
                         file=path, line=line) from exc


def _depth(text: str) -> int:
    """How deep the brackets of a JSON text nest (brackets inside strings count too: an upper
    bound, which is all the check needs)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable or invalid files become InputErrors that say where."""
    text = decode_text(path)
    if _depth(text) > MAX_NESTING:
        raise InputError(f"nested more than {MAX_NESTING} levels deep", file=path)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
    except (ValueError, RecursionError) as exc:
        raise InputError(f"not valid JSON: {exc}", file=path) from exc
