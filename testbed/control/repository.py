"""The model repository: every version of the served model, immutable once published.

Layout (a plain directory; the controller watches it, the driver or a person publishes):

    REPO/v1/model.onnx   REPO/v1/manifest.json
    REPO/v2/model.onnx   REPO/v2/manifest.json   ...

manifest.json: {"format": 1, "version": N, "model": "model.onnx", "sha256": hex, "size": bytes,
"published": unix time, "source": text, "profile": {"segments": [{compute_ms, memory_bytes,
output_bytes, model_bytes}, ...], "input_bytes": int, "total_ms": float,
"activation_reserve_bytes": int}}.

Division of labour: profiling happens when a version is *published*, in the root namespace
with the whole machine (partitioner.profile), so the controller, CPU-limited on the
dispatcher host, only reads the segments from the manifest, checks the SHA-256, plans and
deploys (testbed.control.controller). `publish` writes a version into a hidden temporary directory
and
renames it into place, so a watcher sees a whole version or none. A version number is never
reused for other bytes. A model whose weights are in external-data files is published as one
self-contained file (weights inlined; its SHA-256 covers both).

The driver's calls for a scenario's `model.update {version: N}` step: `prepare_version`
before the run (builds and profiles; for a zoo model, version N is the same architecture
built with seed N, so each version's outputs differ and per-version checks mean something),
then `publish` at the step's time. `python -m testbed.control.repository publish|list` does the
same by
hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import EXIT_BAD_INPUT, InputError
from partitioner.instance import Segment

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    version: int
    directory: Path
    sha256: str
    size: int
    published: float
    source: str
    segments: list[Segment]
    input_bytes: int
    total_ms: float
    activation_reserve_bytes: int

    @property
    def model(self) -> Path:
        return self.directory / MODEL_FILE

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "model": MODEL_FILE,
                "sha256": self.sha256, "size": self.size, "published": self.published,
                "source": self.source,
                "profile": {"segments": [{"compute_ms": s.compute_ms,
                                          "memory_bytes": s.memory_bytes,
                                          "output_bytes": s.output_bytes,
                                          "model_bytes": s.model_bytes}
                                         for s in self.segments],
                            "input_bytes": self.input_bytes, "total_ms": self.total_ms,
                            "activation_reserve_bytes": self.activation_reserve_bytes}}


def version_dir(repo: Path, version: int) -> Path:
    return Path(repo) / f"v{version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """A version's manifest, validated (InputError naming the file and field otherwise). The
    model file's hash is not checked here: that is the reader's job, off its main loop."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not a format {FORMAT} manifest", file=path, field="format")
        profile = data["profile"]
        # model_bytes (the weights: disk accounting, deploy estimates) is absent from the
        # manifests of older publishers: 0, not counted
        segments = [Segment(float(s["compute_ms"]), int(s["memory_bytes"]),
                            int(s["output_bytes"]), int(s.get("model_bytes", 0)))
                    for s in profile["segments"]]
        if not segments:
            raise InputError("a version needs at least one segment", file=path,
                             field="profile.segments")
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1 or \
                Path(directory).name != f"v{version}":
            raise InputError(f"version {version!r} does not match the directory",
                             file=path, field="version")
        return Manifest(version, Path(directory), str(data["sha256"]), int(data["size"]),
                        float(data["published"]), str(data.get("source", "")), segments,
                        int(profile["input_bytes"]), float(profile.get("total_ms", 0.0)),
                        int(profile.get("activation_reserve_bytes", 0)))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"malformed manifest: {exc!r}", file=path) from exc


def list_versions(repo: Path) -> dict[int, Path]:
    """Published versions (directories `vN` holding a manifest), by number."""
    found: dict[int, Path] = {}
    try:
        entries = list(Path(repo).iterdir())
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if name.startswith("v") and name[1:].isdigit() and (entry / MANIFEST).is_file():
            found[int(name[1:])] = entry
    return found


def _inlined_model(model_path: Path) -> bytes | None:
    """The model with its external-data files read in, as one self-contained file (what the
    hosts are sent: a stage cannot fetch side files), or None when the model has none and
    is published as it is. The SHA-256 of these bytes covers graph and weights."""
    from partitioner.cuts import load
    from partitioner.profile import external_data_files

    if not external_data_files(model_path):
        return None
    model = load(model_path)
    if model.ByteSize() >= 2**31:
        raise InputError("the model with its weights inlined exceeds protobuf's 2 GB limit",
                         file=model_path)
    return model.SerializeToString()


def _weighed(profile: Any) -> list[Segment]:
    """The profile's segments with their weights' bytes (a ModelProfile keeps them apart, in
    `weight_bytes`; older cached profiles lack them: left at 0)."""
    weights = getattr(profile, "weight_bytes", None) or []
    if len(weights) != len(profile.segments):
        return list(profile.segments)
    return [dataclasses.replace(s, model_bytes=int(w)) for s, w in zip(profile.segments, weights)]


def publish(repo: Path, model_path: Path, version: int, profile: Any,
            source: str = "") -> Manifest:
    """Publish `model_path` as `version` with its profile (a partitioner.profile.ModelProfile,
    or anything with `segments`, `input_bytes`, `total_ms`, `activation_reserve_bytes`).
    A model with external data is published with its weights inlined. Publishing the same
    bytes again is a no-op; other bytes under a published number are refused (versions are
    immutable)."""
    repo, model_path = Path(repo), Path(model_path)
    if version < 1:
        raise InputError(f"versions start at 1, got {version}", field="version")
    inlined = _inlined_model(model_path)
    sha = hashlib.sha256(inlined).hexdigest() if inlined is not None else sha256_file(model_path)
    target = version_dir(repo, version)
    if target.exists():
        existing = read_manifest(target)
        if existing.sha256 != sha:
            raise InputError(f"version {version} is already published with other bytes "
                             f"({existing.sha256[:12]}); publish a new number",
                             file=target, field="version")
        return existing
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".v{version}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if inlined is not None:
            (staging / MODEL_FILE).write_bytes(inlined)
        else:
            shutil.copyfile(model_path, staging / MODEL_FILE)
        manifest = Manifest(version, target, sha, (staging / MODEL_FILE).stat().st_size,
                            time.time(), source or str(model_path), _weighed(profile),
                            int(profile.input_bytes), float(profile.total_ms),
                            int(getattr(profile, "activation_reserve_bytes", 0)))
        (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
        os.replace(staging, target)        # the version appears whole, or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@dataclass(frozen=True)
class Prepared:
    """A version built and profiled, ready to publish at a scenario step's time."""

    version: int
    model: Path
    profile: Any
    source: str


def prepare_version(model_spec: str, version: int, work_dir: Path,
                    input_shapes: dict[str, tuple[int, ...]] | None = None) -> Prepared:
    """Build (zoo models: seed = version; version 1 is the zoo's own model) and profile a
    version of the scenario's model at `input_shapes` (the zoo model's own if None), in the
    root namespace, before the run."""
    from partitioner.profile import profile_model
    from partitioner.zoo import (
        BUILDERS,
        build_model,
        default_input_shapes,
        resolve_model,
        write_model,
    )

    if model_spec in BUILDERS:
        if version == 1:
            path = resolve_model(model_spec)
        else:
            path = Path(work_dir) / f"{model_spec}-v{version}.onnx"
            if not path.is_file():
                write_model(build_model(model_spec, seed=version), path)
        source = f"zoo:{model_spec} seed {0 if version == 1 else version}"
    elif version == 1:
        path, source = resolve_model(model_spec), str(model_spec)
    else:
        raise InputError(f"model.update to version {version} needs a zoo model (a file model "
                         f"has no other versions to build; publish one with "
                         f"`python -m testbed.control.repository publish`)", field="model")
    shapes = input_shapes or default_input_shapes(model_spec)
    return Prepared(version, path, profile_model(path, progress=False,
                                                 input_shapes=shapes or None), source)


def publish_prepared(repo: Path, prepared: Prepared) -> Manifest:
    return publish(repo, prepared.model, prepared.version, prepared.profile, prepared.source)


class Watcher:
    """New versions in a repository, each reported once (by number and hash)."""

    def __init__(self, repo: Path) -> None:
        self.repo = Path(repo)
        self.seen: dict[int, float] = {}        # version -> directory mtime when read

    def poll(self) -> tuple[list[Manifest], list[InputError]]:
        found, problems = [], []
        for version, directory in sorted(list_versions(self.repo).items()):
            try:
                stamp = directory.stat().st_mtime
            except OSError:
                continue
            if self.seen.get(version) == stamp:
                continue
            self.seen[version] = stamp
            try:
                found.append(read_manifest(directory))
            except InputError as exc:
                problems.append(exc)
        return found, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.control.repository",
                                     description="publish and list model versions")
    verbs = parser.add_subparsers(dest="verb", required=True)
    pub = verbs.add_parser("publish", help="profile a model and publish it as a version")
    pub.add_argument("repo", help="repository directory (the run's: RESULTS/repository)")
    pub.add_argument("model", help="ONNX file, or a zoo name (version N = seed N)")
    pub.add_argument("--version", type=int, required=True)
    pub.add_argument("--input-shape", action="append", metavar="NAME=DxD...",
                     help="shape of a model input for profiling, e.g. input_ids=1x128")
    lst = verbs.add_parser("list", help="list published versions")
    lst.add_argument("repo")
    args = parser.parse_args(argv)
    try:
        if args.verb == "publish":
            from partitioner.inputs import parse_shape_args
            from partitioner.profile import profile_model
            from partitioner.zoo import BUILDERS

            shapes = parse_shape_args(args.input_shape) or None
            if args.model in BUILDERS:
                prepared = prepare_version(args.model, args.version, Path(args.repo).parent,
                                           shapes)
            else:
                path = Path(args.model)
                prepared = Prepared(args.version, path,
                                    profile_model(path, input_shapes=shapes), str(path))
            manifest = publish_prepared(Path(args.repo), prepared)
            print(f"published v{manifest.version}: {manifest.sha256[:12]} "
                  f"({manifest.size / 1e6:.1f} MB) in {manifest.directory}")
        else:
            for version, directory in sorted(list_versions(Path(args.repo)).items()):
                m = read_manifest(directory)
                print(f"v{version}  {m.sha256[:12]}  {m.size / 1e6:7.1f} MB  "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.published))}  "
                      f"{m.source}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
