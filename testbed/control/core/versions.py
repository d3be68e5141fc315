"""Model versions: which version the system should serve (the target), the order in which
versions served (for a rollback), and what a switch means.

A version published later than the target becomes the target at once when `auto_rollout`
is on; `rollout(N)` makes any known version the target; `rollback` goes back to the last
version that served before the one serving now. The backend plans and deploys the target
beside the running version; when an epoch of another version starts serving, that is a
`version.switched`.
"""

from __future__ import annotations

from testbed.control import events as ev
from testbed.control.core.actions import Event


class VersionError(ValueError):
    """A rollout or rollback that cannot be done (the driver's command gets the reason)."""


class Versions:
    def __init__(self, target: int, auto_rollout: bool = True) -> None:
        self.target = target
        self.auto_rollout = auto_rollout
        self.known: set[int] = set()
        self.history: list[int] = []        # versions in the order they served

    def set_target(self, version: int, why: str) -> list[Event]:
        out = [Event(ev.ROLLOUT_REQUESTED, {"version": version, "previous": self.target,
                                           "reason": why})]
        self.target = version
        return out

    def ready(self, version: int) -> list[Event]:
        """A version is loaded and checked: with auto_rollout, a newer one is the target."""
        self.known.add(version)
        if self.auto_rollout and version > self.target:
            return self.set_target(version, "new version published")
        return []

    def rollout(self, version: object) -> list[Event]:
        if version not in self.known:
            raise VersionError(f"version {version!r} is not known (known: "
                               f"{sorted(self.known)})")
        assert isinstance(version, int)
        return self.set_target(version, "requested by the driver")

    def previous(self, serving: int | None) -> int | None:
        return next((v for v in reversed(self.history) if v != serving), None)

    def rollback(self, serving: int | None) -> tuple[int, list[Event]]:
        previous = self.previous(serving)
        if previous is None:
            raise VersionError("no earlier version has served: nothing to roll back to")
        return previous, [Event(ev.VERSION_ROLLBACK, {"version": previous,
                                                      "current": serving}),
                          *self.set_target(previous, "rollback")]

    def served(self, version: int, epoch: int) -> list[Event]:
        """An epoch of `version` serves now."""
        if self.history and self.history[-1] == version:
            return []
        out = []
        if self.history:
            out.append(Event(ev.VERSION_SWITCHED, {"version": version,
                                                   "previous": self.history[-1],
                                                   "epoch": epoch}))
        self.history.append(version)
        return out
