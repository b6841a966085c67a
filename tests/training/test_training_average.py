"""Checkpoint weight averaging (training.average) on a tiny real run of the small ResNet (it has batch norm)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import average, evaluate
from training.nets.models import load_checkpoint


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory, train_run) -> Path:
    out = tmp_path_factory.mktemp("average") / "resnet"
    train_run(out, "--arch", "resnet_small", "--epochs", "2", "--limit-train", "128", "--limit-val", "64",
              "--keep-epoch-checkpoints", "--no-export")
    return out


def _average(*argv: str) -> dict:
    return average.main(average.get_args_parser().parse_args([*argv, "--no-progress"]))


def test_average_is_the_mean_of_the_weights_with_batch_norm_recomputed(tmp_path: Path, two_epochs: Path) -> None:
    first, second = two_epochs / "checkpoint_0.pth", two_epochs / "checkpoint_1.pth"
    result = _average("--checkpoints", str(first), str(second), "--output-dir", str(tmp_path / "avg"),
                      "--bn-images", "96", "--float16-weights")
    states = [torch.load(p, map_location="cpu", weights_only=False)["model"] for p in (first, second)]
    model, checkpoint = load_checkpoint(tmp_path / "avg" / "checkpoint.pth")
    averaged = checkpoint["model"]
    conv = next(k for k, v in averaged.items() if k.endswith("weight") and v.dim() == 4)
    torch.testing.assert_close(averaged[conv], (states[0][conv] + states[1][conv]) / 2)
    means = [k for k in averaged if k.endswith("running_mean")]
    assert means and result["bn_layers"] == len(means) and result["bn_images"] == 96
    # Re-estimated, so not the mean of the members' running statistics.
    assert not torch.allclose(averaged[means[0]], (states[0][means[0]] + states[1][means[0]]) / 2)
    assert [m["checkpoint"] for m in result["members"]] == [str(first), str(second)]
    assert result["gain_over_best_member_pt"] == pytest.approx(
        100 * (result["val_top1"] - max(m["val_top1"] for m in result["members"])))
    run = json.loads((tmp_path / "avg" / "run.json").read_text())
    assert run["average"]["val_top1"] == result["val_top1"] and run["val_top1"] == result["val_top1"]
    assert run["onnx_parity_max_abs_diff"] < 1e-4
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "avg" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(pixels))
    np.testing.assert_allclose(session.run(None, {"image": pixels})[0], expected.numpy(), atol=1e-4)
    assert (tmp_path / "avg" / "model.fp16w.onnx").exists()
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--run-dir", str(tmp_path / "avg"), "--limit-test", "50", "--catalog-count", "10", "--no-benchmark"]))
    card = (tmp_path / "avg" / "MODEL_CARD.md").read_text()
    assert "weights averaged with `python -m training.average" in card and str(first) in card


def test_averaging_a_checkpoint_with_itself_keeps_the_model(tmp_path: Path, two_epochs: Path) -> None:
    last = two_epochs / "checkpoint_1.pth"
    result = _average("--checkpoints", str(last), str(last), "--output-dir", str(tmp_path / "same"),
                      "--bn-images", "0", "--no-export")
    assert result["bn_layers"] == 0
    assert result["val_top1"] == result["members"][0]["val_top1"]
    before = torch.load(last, map_location="cpu", weights_only=False)["model"]
    after = torch.load(tmp_path / "same" / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)


def test_average_refuses_checkpoints_of_another_split(tmp_path: Path, two_epochs: Path, train_run) -> None:
    train_run(tmp_path / "other", "--arch", "resnet_small", "--epochs", "1", "--limit-train", "128", "--limit-val",
              "64", "--seed", "1", "--no-export")
    with pytest.raises(SystemExit, match="different splits"):
        _average("--checkpoints", str(two_epochs / "checkpoint_1.pth"), str(tmp_path / "other" / "checkpoint.pth"),
                 "--output-dir", str(tmp_path / "x"), "--no-export")
    with pytest.raises(SystemExit, match="two or more"):
        _average("--checkpoints", str(two_epochs / "checkpoint_1.pth"), "--output-dir", str(tmp_path / "x"))
