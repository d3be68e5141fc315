"""Input errors know where they come from: every refusal of a user file names the file, the
line and the field, and the CLI turns it into exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable or invalid files become InputErrors that say where."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
