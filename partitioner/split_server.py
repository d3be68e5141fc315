"""A warm splitter: `python -m partitioner.split_server` reads one JSON request a line on
stdin, `{"model": PATH, "cuts": [i, ...], "out": DIR}`, writes the stages like
`python -m partitioner split --cuts` and answers `{"ok": true}` or `{"error": "..."}` a line
on stdout.

Why: the controller splits the model for every plan with new cuts (contingency plans, re-plans
under churn). A fresh child process spends most of its time importing onnx and parsing and
shape-inferring the model, on the dispatcher host's small CPU share while the controller and
the dispatcher run beside it: 4.5-6.8 s a split under churn. This process pays that once per
model and keeps its interpreter lock away from the controller's, like the one-shot child.
testbed.control.planning starts it on first use and falls back to the one-shot child if it
fails.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from partitioner import split as splitlib


def serve(lines: Any, out: Any) -> None:
    prepared: dict[str, Any] = {}       # model path -> (shape-inferred model, cut analysis)
    for line in lines:
        try:
            request = json.loads(line)
            path = str(request["model"])
            if path not in prepared:
                prepared = {path: splitlib.prepare(path)}     # one model at a time
            model, analysis = prepared[path]
            cuts = [int(c) for c in request["cuts"]]
            splitlib.write_stages(splitlib.extract_stages(model, cuts, analysis),
                                  request["out"])
            reply: dict[str, Any] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who falls back
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
