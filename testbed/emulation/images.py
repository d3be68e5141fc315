"""Build the images offline, as root: the stage image (`python -m testbed.emulation.images`)
and, FROM it, the k3s controller's image (`--target controller`, which builds the stage image
first; `make image` builds both).

Division of labour: this is a host-side build tool that lives next to the Dockerfile; it is
not copied into the image (only the agent and worker modules are). Starting and stopping the
Docker daemon is testbed/emulation/dockerd.py.

Steps, each cached under .cache/ (git-ignored) so a second run is quick and network-free:
  1. wheelhouse: `pip download` on the host of onnxruntime, pyzmq, numpy (+ deps, + pip) for
     the image's Python (cp311 manylinux), pinned as in requirements.txt. pip inside a container
     fails TLS here, and a host-side download keeps the build itself offline.
  2. base image: unless BASE is a registry image, `edgepipe-base:bookworm` is made locally:
     `debootstrap --variant=minbase --include=python3 bookworm`, trimmed (docs, man pages,
     locales, apt lists), tarred (the tar is cached) and `docker import`ed.
  3. `docker build --network none` of a context assembled in .cache/image-context.
The image carries a label with a digest of its inputs; an image with the same digest is not
rebuilt. A second label is the digest of the Python modules alone (`app_digest()`), so the
testbed can refuse to start Docker hosts from an image older than this checkout's agent and
worker. The size is printed at the end.

The controller image (Dockerfile.controller) adds to the stage image's layers what the k3s
control loop needs: the testbed/ and partitioner/ modules it imports (`controller_modules()`,
found by following the import statements from its entry points) and the wheels of
CONTROLLER_PACKAGES. Those are resolved together with the stage image's packages on the host
(one consistent set, in their own wheelhouse) and only the wheels the stage image lacks are
installed, into a second site directory ahead of the stage's. Its digest covers the stage
image's ID, so a rebuilt stage image rebuilds the controller image too.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.emulation.dockerd import APP_LABEL, Dockerd, DockerError, docker_cli, image_label

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "stage_image"    # the stage image: its Dockerfiles and runtime modules
DEFAULT_CACHE = REPO / ".cache"
LOCAL_BASE = "edgepipe-base:bookworm"
DEFAULT_TAG = "edgepipe-stage:latest"
# testbed.k8s.manifests.K8sSettings.controller_image names it too:
CONTROLLER_TAG = "edgepipe-controller:latest"
NODE_TAG = "edgepipe-node:latest"      # the emulated cluster's nodes (testbed.emulation.kubenodes)
DIGEST_LABEL = "edgepipe.inputs-sha256"
# What the image needs at run time; versions come from requirements.txt so the image runs the
# same onnxruntime/pyzmq/numpy as the host-side tests.
IMAGE_PACKAGES = ("onnxruntime", "pyzmq", "numpy")
# What the k3s control loop imports on top of those: the API client, onnx (cut analysis and
# splits), highspy (the optimal planner's flow bound) and PyYAML (manifests). Not ortools:
# nothing of the loop imports it.
CONTROLLER_PACKAGES = ("kubernetes", "onnx", "highspy", "PyYAML")
# The controller pod's command, and the child process its planner starts for each split
# (`python -m partitioner split`): every module they can import goes into the image.
CONTROLLER_ENTRIES = ("testbed.k8s.loop", "partitioner.__main__")
PROJECT_PACKAGES = ("formats", "testbed", "partitioner", "stage_image")
PIP_VERSION = "25.3"                 # the pip that installs the wheels inside the build
# Only these leave the image's rootfs smaller without breaking apt or Python.
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "usr/share/lintian", "var/cache/apt", "var/lib/apt/lists", "var/log")


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def pinned_requirements(packages: Sequence[str] = IMAGE_PACKAGES,
                        requirements: Path = REPO / "requirements.txt") -> list[str]:
    """`name==version` for each of `packages`, from the project's pinned requirements."""
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    missing = [p for p in packages if p.lower() not in pins]
    if missing:
        raise SystemExit(f"{requirements}: no pinned version for {', '.join(missing)}")
    return [f"{p}=={pins[p.lower()]}" for p in packages]


def wheel_platforms(arch: str, glibc_minor: int = 36) -> list[str]:
    """Every manylinux tag a glibc 2.36 system (bookworm) runs. pip download --platform takes
    the tags literally (no expansion to older glibc), so list them all, newest first."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def download_wheelhouse(dest: Path, requirements: list[str], python_version: str,
                        arch: str) -> Path:
    """pip download the wheels for the image's interpreter (not the host's) into `dest`.
    Skipped when `dest` already holds exactly this request (stamp file)."""
    request = "\n".join([*requirements, f"pip=={PIP_VERSION}",
                         f"python={python_version} arch={arch}"]) + "\n"
    stamp = dest / ".request"
    if stamp.exists() and stamp.read_text() == request:
        log(f"wheelhouse cached in {dest}")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
           "--dest", str(dest), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "--abi", abi,
           *[arg for tag in wheel_platforms(arch) for arg in ("--platform", tag)],
           *requirements, f"pip=={PIP_VERSION}"]
    log(f"downloading wheels for {abi}/{arch}: {' '.join(requirements)}")
    subprocess.run(cmd, check=True)
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    stamp.write_text(request)
    return dest


def debian_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def make_rootfs_tar(tar_path: Path, suite: str, mirror: str, arch: str) -> Path:
    """debootstrap a minimal Debian with python3 and tar it (cached: ~35 s + python)."""
    if tar_path.exists():
        log(f"base rootfs cached in {tar_path}")
        return tar_path
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap not found: apt-get install debootstrap")
    rootfs = tar_path.with_suffix(".rootfs")
    if rootfs.exists():
        shutil.rmtree(rootfs)
    log(f"debootstrap --variant=minbase {suite} (python3 included) from {mirror}")
    started = time.monotonic()
    # python3 goes into the base so that the image build needs no network at all.
    subprocess.run(["debootstrap", "--variant=minbase", f"--arch={debian_arch(arch)}",
                    "--include=python3", suite, str(rootfs), mirror],
                   check=True, stdout=subprocess.DEVNULL)
    log(f"debootstrap took {time.monotonic() - started:.0f} s")
    for rel in TRIM:
        target = rootfs / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    # Keep apt usable for derived images, but never ship lists or caches.
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    partial = tar_path.with_suffix(".tar.partial")

    def skip_pseudo(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # Docker provides /dev, /proc and /sys at run time; device nodes made by debootstrap
        # would only add noise (and cannot be created by an unprivileged import).
        parts = Path(info.name).parts
        if len(parts) > 2 and parts[1] in ("dev", "proc", "sys"):
            return None
        return info

    with tarfile.open(partial, "w") as tar:
        tar.add(str(rootfs), arcname=".", filter=skip_pseudo)
    partial.rename(tar_path)
    shutil.rmtree(rootfs)
    return tar_path


def import_base(daemon: Dockerd, tar_path: Path, name: str) -> None:
    log(f"docker import {tar_path.name} -> {name}")
    with open(tar_path, "rb") as stream:
        proc = subprocess.run(
            [docker_cli(), "-H", daemon.host, "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8",
             "--change", 'CMD ["/bin/bash"]',
             "-", name], stdin=stream, capture_output=True)
    if proc.returncode != 0:
        raise DockerError(f"docker import failed: {proc.stderr.decode(errors='replace')}")


def app_files() -> list[Path]:
    """The modules that run in the image: stage_image/*.py."""
    return sorted(HERE.glob("*.py"))


def files_digest(files: dict[str, Path]) -> str:
    """SHA-256 of modules by their path in the image's app/ and their contents."""
    digest = hashlib.sha256()
    for name, module in files.items():
        digest.update(name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


def stage_app() -> dict[str, Path]:
    """The stage image's modules by their path under app/stage_image/."""
    return {module.name: module for module in app_files()}


def app_digest() -> str:
    """SHA-256 of the modules the stage image carries (names and contents), as in APP_LABEL."""
    return files_digest(stage_app())


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def controller_modules(entries: Sequence[str] = CONTROLLER_ENTRIES) -> dict[str, Path]:
    """Module name -> file of every project module reachable from `entries` by import
    statements anywhere in a module, also inside functions: those run later (a re-plan's
    split, a model update), when a missing module would fail the controller mid-run. The
    project uses absolute imports only."""
    found: dict[str, Path] = {}
    pending = list(entries)
    while pending:
        name = pending.pop()
        if name in found or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = _module_file(name)
        if path is None:
            continue                     # `from package import name` of a non-module
        found[name] = path
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pending += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return dict(sorted(found.items()))


def controller_app() -> dict[str, Path]:
    """What the controller image adds under app/: path -> file. The stage_image modules the
    controller imports are in the stage image already (and checked to be)."""
    files = {path.relative_to(REPO).as_posix(): path for path in controller_modules().values()}
    in_stage = {f"{HERE.name}/{name}" for name in stage_app()}
    missing = [name for name in files if name.startswith(f"{HERE.name}/")
               and name not in in_stage]
    if missing:
        raise SystemExit(f"the controller imports {', '.join(missing)}, which the stage image "
                         "does not carry")
    return {name: path for name, path in files.items() if name not in in_stage}


def wheel_pin(wheel: Path) -> str:
    """`name==version` from a wheel's file name (PEP 427: name-version-...)."""
    name, version = wheel.name.split("-")[:2]
    return f"{name}=={version}"


def controller_wheels(controller_house: Path, stage_house: Path) -> list[Path]:
    """The wheels of the controller's set that the stage image has not installed. A package
    both sets hold at different versions would be installed twice (the controller's copy
    shadowing the stage's): refused, to be pinned in requirements.txt."""
    in_stage = {wheel.name for wheel in stage_house.glob("*.whl")}
    stage_names = {wheel_pin(Path(name)).split("==")[0].lower() for name in in_stage}
    extra = [w for w in sorted(controller_house.glob("*.whl")) if w.name not in in_stage]
    clash = [w.name for w in extra if wheel_pin(w).split("==")[0].lower() in stage_names]
    if clash:
        raise SystemExit(f"the controller's wheels {', '.join(clash)} are other versions of "
                         "packages in the stage image: pin them in requirements.txt")
    return extra


def assemble_context(context: Path, dockerfile: Path, wheels: Sequence[Path],
                     app: dict[str, Path]) -> str:
    """Write a build context (Dockerfile, wheelhouse/, app/) and return a digest of
    everything in it. Wheels count by name: the name carries the version and the build."""
    if context.exists():
        shutil.rmtree(context)
    (context / "wheelhouse").mkdir(parents=True)
    (context / "app").mkdir()
    digest = hashlib.sha256()
    shutil.copy2(dockerfile, context / "Dockerfile")
    digest.update(dockerfile.read_bytes())
    for wheel in wheels:
        target = context / "wheelhouse" / wheel.name
        try:
            os.link(wheel, target)          # same filesystem: no copy of ~40 MB of wheels
        except OSError:
            shutil.copy2(wheel, target)
        digest.update(wheel.name.encode())
    for name, module in app.items():
        (context / "app" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, context / "app" / name)
        digest.update(name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


def image_size(daemon: Dockerd, tag: str) -> int:
    return int(daemon.docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.decode())


def ensure_image(daemon: Dockerd, args: argparse.Namespace, tag: str, context: Path,
                 digest: str, app: str, source: str, offline: bool) -> None:
    """`docker build` the context as `tag` FROM `source`, unless an image of these inputs
    (digest) and modules (app digest) is there already."""
    current = (image_label(daemon, tag, DIGEST_LABEL) == digest
               and image_label(daemon, tag, APP_LABEL) == app)
    if not args.force and current:
        log(f"{tag} is up to date")
        return
    log(f"docker build {tag} FROM {source}")
    network = ["--network", "none"] if offline else []
    daemon.docker("build", *network, "--build-arg", f"BASE={source}",
                  "--label", f"{DIGEST_LABEL}={digest}", "--label", f"{APP_LABEL}={app}",
                  "-t", tag, *(["-q"] if args.quiet else []), str(context),
                  capture=args.quiet, timeout=1800)
    # Intermediate stages (the wheel files) are left dangling by the classic builder.
    # Prune only in our private daemon: a shared one's dangling images are not ours.
    if daemon.private:
        daemon.docker("image", "prune", "-f", "--filter", "dangling=true", check=False)


def build_controller(daemon: Dockerd, args: argparse.Namespace, stage_house: Path,
                     controller_house: Path) -> None:
    """The controller image FROM the stage image `args.tag` (built just before)."""
    wheels = controller_wheels(controller_house, stage_house)
    context = args.cache / "controller-context"
    app = controller_app()
    # pip installs the wheels inside the build, as for the stage image; it is not installed.
    digest = assemble_context(context, HERE / "Dockerfile.controller",
                              [*wheels, *stage_house.glob("pip-*.whl")], app)
    (context / "wheelhouse" / "requirements.txt").write_text(
        "".join(f"{wheel_pin(wheel)}\n" for wheel in wheels))
    stage_id = daemon.docker("image", "inspect", "-f", "{{.Id}}", args.tag).stdout.decode()
    digest = hashlib.sha256(f"{digest}:{stage_id.strip()}".encode()).hexdigest()
    # FROM a local image only: no network, whatever the stage image's base was.
    ensure_image(daemon, args, args.controller_tag, context, digest, files_digest(app),
                 args.tag, offline=True)


def download_debs(dest: Path, packages: Sequence[str]) -> list[Path]:
    """`apt-get download` the node image's packages on the host (the build has no network);
    cached: the same request is not downloaded again."""
    request = "\n".join(packages) + "\n"
    stamp = dest / ".request"
    if stamp.exists() and stamp.read_text() == request:
        log(f"node packages cached in {dest}")
        return sorted(dest.glob("*.deb"))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    log(f"apt-get download {' '.join(packages)}")
    # as root into our own cache directory (apt's _apt user cannot write there)
    subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages],
                   cwd=dest, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(request)
    return sorted(dest.glob("*.deb"))


def build_node(daemon: Dockerd, args: argparse.Namespace) -> None:
    """The Kubernetes node image FROM the stage image `args.tag` (built just before), and the
    tarballs of the images every node imports (testbed.emulation.kubenodes)."""
    from testbed.emulation import kubenodes

    kubelet = kubenodes.kube_bin() / "kubelet"
    if not kubelet.is_file():
        raise SystemExit(f"{kubelet} is missing: build the Kubernetes binaries first "
                         "(`make kube-bin`)")
    debs = download_debs(args.cache / "node-debs", kubenodes.NODE_PACKAGES)
    context = args.cache / "node-context"
    if context.exists():
        shutil.rmtree(context)
    (context / "debs").mkdir(parents=True)
    digest = hashlib.sha256()
    for source, name in [(HERE / "Dockerfile.node", "Dockerfile"), (kubelet, "kubelet"),
                         (HERE / "node-entry.sh", "node-entry.sh"),
                         *((deb, f"debs/{deb.name}") for deb in debs)]:
        try:
            os.link(source, context / name)
        except OSError:
            shutil.copy2(source, context / name)
        digest.update(name.encode() + b"\0" + (source.read_bytes() if source.suffix != ".deb"
                                                 else b""))
    stage_id = daemon.docker("image", "inspect", "-f", "{{.Id}}", args.tag).stdout.decode()
    digest.update(stage_id.strip().encode())
    ensure_image(daemon, args, NODE_TAG, context, digest.hexdigest(), app_digest(),
                 args.tag, offline=True)
    for tar in kubenodes.image_tarballs(daemon, args.tag, args.controller_tag):
        log(f"node import: {tar}")


def build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cache: Path = args.cache
    arch = args.arch
    house = cache / "wheelhouse" / f"cp{args.python.replace('.', '')}-{arch}"
    wheelhouse = download_wheelhouse(house, pinned_requirements(), args.python, arch)
    # Resolved together with the stage image's packages, so the shared ones agree.
    controller_house = None if args.target == "stage" else download_wheelhouse(
        house.with_name(f"{house.name}-controller"),
        pinned_requirements((*IMAGE_PACKAGES, *CONTROLLER_PACKAGES)), args.python, arch)
    local_base = args.base == LOCAL_BASE
    daemon = Dockerd(iptables=not local_base)
    daemon.start()
    try:
        if local_base and (args.rebuild_base or not daemon.image_exists(LOCAL_BASE)):
            tar_path = cache / "base" / f"{args.suite}-{arch}.tar"
            if args.rebuild_base and tar_path.exists():
                tar_path.unlink()
            make_rootfs_tar(tar_path, args.suite, args.mirror, arch)
            import_base(daemon, tar_path, LOCAL_BASE)
        context = cache / "image-context"
        digest = assemble_context(context, HERE / "Dockerfile",
                                  [*sorted(wheelhouse.glob("*.whl")),
                                   wheelhouse / "requirements.txt"], stage_app())
        digest = hashlib.sha256(f"{digest}:{args.base}".encode()).hexdigest()
        # A local base needs nothing from outside; a registry base needs apt's network.
        ensure_image(daemon, args, args.tag, context, digest, app_digest(), args.base,
                     offline=local_base)
        tags = [args.tag]
        if controller_house is not None:
            build_controller(daemon, args, wheelhouse, controller_house)
            tags.append(args.controller_tag)
        if args.target == "node":
            build_node(daemon, args)
            tags.append(NODE_TAG)
        for tag in tags:
            size = image_size(daemon, tag)
            log(f"{tag}: {size / 1e6:.0f} MB ({size} bytes)")
        log(f"done in {time.monotonic() - started:.0f} s on {daemon.host}")
    finally:
        if not args.keep_daemon:
            daemon.stop()
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m testbed.emulation.images",
                                 description="Build the images without any registry.")
    ap.add_argument("--base", default=os.environ.get("BASE", LOCAL_BASE),
                    help=f"base image (default {LOCAL_BASE}, made locally with debootstrap; "
                         "a registry image such as debian:bookworm-slim needs network)")
    ap.add_argument("--target", choices=("stage", "controller", "node"), default="stage",
                    help="controller: also the k3s controller's image, FROM the stage image; "
                         "node: both and the emulated cluster's node image (make kube-bin "
                         "first)")
    ap.add_argument("--tag", default=DEFAULT_TAG, help="the stage image's tag")
    ap.add_argument("--controller-tag", default=CONTROLLER_TAG)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--python", default="3.11", help="the image's Python (bookworm: 3.11)")
    ap.add_argument("--arch", default=platform.machine())
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    ap.add_argument("--rebuild-base", action="store_true", help="debootstrap again")
    ap.add_argument("--force", action="store_true", help="build even if up to date")
    ap.add_argument("--keep-daemon", action="store_true",
                    help="leave a dockerd we started running (default: stop it by PID)")
    ap.add_argument("--quiet", action="store_true", help="no docker build output")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print("building the image needs root (dockerd, debootstrap)", file=sys.stderr)
        return 2
    try:
        return build(args)
    except (DockerError, subprocess.CalledProcessError) as exc:
        print(f"image build failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
