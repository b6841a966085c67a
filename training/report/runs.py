"""The run directory ``training.train`` writes (``run.json``, ``checkpoint.pth``, ``model.onnx``), as read back."""
from __future__ import annotations

import json
from pathlib import Path


def load_run(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: is {run_dir} a training.train output directory?")
    result: dict = json.loads(path.read_text())
    return result
