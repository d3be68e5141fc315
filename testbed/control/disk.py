"""Disk accounting: the stage models a host must keep on its disk (the agent's model cache)
against the disk it has. Pure functions; the controller asks before it places a standby or a
new stage on a host (testbed.control.contingency `fits`, `make_room`).

Division of labour: the planner instance carries each node's `disk_bytes` (optional, 0 = not
limited; from the topology's `disk`); the controller knows which workers (slots) it keeps on
each host and the exact size of each stage file; the agent deletes cached models no worker
holds (models of retired epochs) before it writes a new one, so only held models count here.
An ENOSPC that still happens (a disk filled by something else: `io.disk_full`) is reported by
the agent as a `disk` failure, which the controller records as `disk.fault` and plans around.
"""

from __future__ import annotations

from collections.abc import Iterable

# beside the models: worker configs and logs, and the partial file of a fetch in flight is
# the model itself (renamed when complete), so a few MiB of slack is enough
DISK_RESERVE_BYTES = 4 << 20


def held_model_bytes(models: Iterable[tuple[str, int]]) -> int:
    """Bytes of the distinct models (sha256, size) a host holds: two workers of the same
    stage model share one cached file."""
    return sum(dict(models).values())


def disk_holds(disk_bytes: int, models: Iterable[tuple[str, int]],
               reserve: int = DISK_RESERVE_BYTES) -> bool:
    """The models (sha256, size) and the reserve fit on the disk; an unlimited disk (0)
    holds anything."""
    return disk_bytes <= 0 or held_model_bytes(models) + reserve <= disk_bytes


def fits_disk(disk_bytes: int, held: Iterable[tuple[str, int]], new: tuple[str, int],
              reserve: int = DISK_RESERVE_BYTES) -> bool:
    """Room for one more model (sha256, size) beside the held ones; a model already held
    costs nothing."""
    models = dict(held)
    return new[0] in models or disk_holds(disk_bytes, [*models.items(), new], reserve)
