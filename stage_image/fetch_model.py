"""Fetch one stage model over HTTP and verify its SHA-256: the init container of a Kubernetes
stage pod (`python -m stage_image.fetch_model URL SHA256 DEST`).

Division of labour: in the embedded backend the agent fetches models over the ZeroMQ control
channel (stage_image.agent); under Kubernetes there is no agent, so this init container does
the same job against the controller's HTTP model server (testbed/k8s/backend.py), and the
worker container starts only once the verified file is in the shared volume. The file is
written under a temporary name and renamed after the check, so the worker never sees a partial
or corrupt model. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class FetchError(RuntimeError):
    pass


def fetch(url: str, sha256: str, dest: str | Path, timeout: float = 30.0) -> int:
    """Download `url` to `dest` if the SHA-256 matches; returns the size. A valid file already
    at `dest` is kept (a restarted pod does not download again)."""
    dest = Path(dest)
    expected = sha256.lower()
    if dest.exists() and _sha256(dest) == expected:
        return dest.stat().st_size
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(f"cannot fetch {url}: {exc}") from exc
    if digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{url}: SHA-256 {digest.hexdigest()} is not the expected {expected}")
    os.replace(partial, dest)
    return size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] in ("-h", "--help"):
        print("usage: python -m stage_image.fetch_model URL SHA256 DEST", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    url, sha256, dest = args
    # The controller may come up after the pod: retry with back-off, the pod's restart
    # policy takes over if it never answers.
    delay = 0.5
    for attempt in range(8):
        try:
            size = fetch(url, sha256, dest)
            print(f"fetched {url} ({size} bytes, sha256 ok)", file=sys.stderr)
            return 0
        except FetchError as exc:
            print(f"attempt {attempt + 1}: {exc}", file=sys.stderr)
            if "SHA-256" in str(exc):
                return 1        # the server has the wrong bytes: retrying will not help
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    return 1


if __name__ == "__main__":
    sys.exit(main())
