"""What the decision core asks its backend to do that every backend does the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """A line of events.jsonl: `kind` is a name of testbed.control.events."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
