#!/usr/bin/env python3
"""Run one scenario end to end: sudo python run_scenario.py scenarios/NAME.yaml [--out DIR].

Exit codes: 0 the SLOs passed, 1 an SLO failed (or the run broke), 2 bad input, 130 / 143
ended by SIGINT / SIGTERM (after tearing everything down)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

# `sudo python run_scenario.py` usually means the system interpreter: move into the
# project's environment (made by `make setup`), which has onnxruntime, pyzmq and Mininet.
if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])

sys.path.insert(0, str(ROOT))

from testbed.experiment.driver import main  # noqa: E402  (after the interpreter check above)

if __name__ == "__main__":
    sys.exit(main())
