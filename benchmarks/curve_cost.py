"""What CurveZMQ costs (issue 15): CPU per MB and frames per second of one data hop, with and
without encryption, on loopback. Two processes (a PUSH sender, a PULL receiver with the ZAP
allow-list the workers use) exchange frames of a stage's size; each side's CPU time (user +
system, of the whole process: ZeroMQ's I/O thread does the encryption) is divided by the
megabytes moved. The end-to-end figure (the baseline scenario with and without `--plaintext`)
needs root: `--scenario scenarios/baseline.yaml` runs it too and prints both throughputs.

    .venv/bin/python benchmarks/curve_cost.py [--mb 400] [--frame-kb 588] [--port 24500]
    sudo .venv/bin/python benchmarks/curve_cost.py --scenario scenarios/baseline.yaml

The loopback figures are the cost per byte; how much a pipeline loses depends on its bytes per
request and its CPU shares (a 0.1-core host pays ten times the wall time per MB).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from stage_image.security import Gate, KeyPair, apply_client, apply_server, start_gates  # noqa: E402,I001


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _receiver(address: str, frames: int, curve: tuple[bytes, bytes] | None,
              allowed: bytes | None, out: mp.Queue) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    auth = None
    if curve is not None:
        apply_server(pull, KeyPair(*curve))
        auth = start_gates(ctx, {"upstream": Gate([allowed])})
        pull.zap_domain = b"upstream"
    pull.bind(address)
    out.put("ready")
    pull.recv()
    started, cpu = time.perf_counter(), _cpu_s()
    for _ in range(frames - 1):
        pull.recv(copy=False)
    out.put((time.perf_counter() - started, _cpu_s() - cpu))
    pull.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()


def _sender(address: str, frames: int, size: int, curve: tuple[bytes, bytes, bytes] | None,
            out: mp.Queue) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 8)
    if curve is not None:
        apply_client(push, KeyPair(curve[0], curve[1]), curve[2])
    push.connect(address)
    payload = os.urandom(size)
    cpu = _cpu_s()
    for _ in range(frames):
        push.send(payload, copy=False)
    push.close(-1)          # linger until everything is sent
    out.put(_cpu_s() - cpu)
    ctx.term()


def hop(curve: bool, mb: float, size: int, port: int) -> dict[str, float]:
    frames = max(2, int(mb * 1024**2 / size))
    address = f"tcp://127.0.0.1:{port}"
    server, client = KeyPair.generate(), KeyPair.generate()
    queue: mp.Queue = mp.Queue()
    receiver = mp.Process(target=_receiver, args=(
        address, frames, (server.public, server.secret) if curve else None,
        client.public if curve else None, queue))
    receiver.start()
    assert queue.get(timeout=30) == "ready"
    sender_out: mp.Queue = mp.Queue()
    sender = mp.Process(target=_sender, args=(
        address, frames, size,
        (client.public, client.secret, server.public) if curve else None, sender_out))
    sender.start()
    wall, receive_cpu = queue.get(timeout=600)
    send_cpu = sender_out.get(timeout=600)
    sender.join()
    receiver.join()
    moved = frames * size / 1024**2
    return {"curve": curve, "mb": round(moved, 1), "frames_per_s": round(frames / wall, 1),
            "mb_per_s": round(moved / wall, 1),
            "send_cpu_ms_per_mb": round(1000 * send_cpu / moved, 3),
            "receive_cpu_ms_per_mb": round(1000 * receive_cpu / moved, 3)}


def scenario(path: str, plaintext: bool) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix="tr-curve-"))
    argv = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "run_scenario.py"), path,
            "--out", str(out)] + (["--plaintext"] if plaintext else [])
    code = subprocess.run(argv, capture_output=True, text=True).returncode
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() \
        else {}
    return {"plaintext": plaintext, "exit": code,
            "throughput_rps": summary.get("throughput_rps"),
            "predicted_rps": summary.get("predicted_throughput_rps"),
            "p99_ms": summary.get("latency_ms", {}).get("p99"), "out": str(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400.0, help="megabytes per run")
    parser.add_argument("--frame-kb", type=float, default=588.0,
                        help="frame size (default: a 3x224x224 float32 image, 588 KiB)")
    parser.add_argument("--port", type=int, default=24500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenario", help="also run this scenario with and without "
                        "--plaintext (root)")
    args = parser.parse_args()
    size = int(args.frame_kb * 1024)
    rows = []
    for i in range(args.repeat):
        for curve in (False, True):
            rows.append(hop(curve, args.mb, size, args.port + 2 * i + curve))
    print(f"{'curve':<6} {'MB':>6} {'frames/s':>9} {'MB/s':>7} {'send ms/MB':>11} "
          f"{'recv ms/MB':>11}")
    for row in rows:
        print(f"{str(row['curve']):<6} {row['mb']:>6} {row['frames_per_s']:>9} "
              f"{row['mb_per_s']:>7} {row['send_cpu_ms_per_mb']:>11} "
              f"{row['receive_cpu_ms_per_mb']:>11}")

    def best(curve: bool, key: str) -> float:
        return min(r[key] for r in rows if r["curve"] == curve)

    extra = {k: round(best(True, k) - best(False, k), 3)
             for k in ("send_cpu_ms_per_mb", "receive_cpu_ms_per_mb")}
    print(f"encryption adds {extra['send_cpu_ms_per_mb']} ms CPU per MB sent and "
          f"{extra['receive_cpu_ms_per_mb']} ms per MB received (best of {args.repeat})")
    result = {"hop": rows, "added_cpu_ms_per_mb": extra}
    if args.scenario:
        result["scenario"] = [scenario(args.scenario, plaintext) for plaintext in (True, False)]
        for run in result["scenario"]:
            print(f"{'plaintext' if run['plaintext'] else 'curve':<10} exit {run['exit']} "
                  f"throughput {run['throughput_rps']} rps (predicted {run['predicted_rps']})"
                  f" p99 {run['p99_ms']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
