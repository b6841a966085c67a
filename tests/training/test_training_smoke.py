"""CI smoke of the training pipeline: train a few hundred images for one epoch, export, check parity,
resume, distil, quantize, evaluate. Catches rot in every step; says nothing about accuracy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import compare, evaluate, quantize
from training.data.datasets import FASHION_LABELS, FASHION_MNIST, load_dataset, source_labels, stratified_subset
from training.nets.models import load_checkpoint
from training.onnx.quantization import is_depthwise
from training.repository.recipe import spec_from_dict


def _run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_cnn_smoke_exports_a_checked_onnx_that_matches_pytorch(smoke_runs: dict[str, Path]) -> None:
    run = _run_json(smoke_runs["cnn"])
    assert run["train_images"] == 300 and run["val_images"] == 100
    assert run["onnx_parity_max_abs_diff"] < 1e-4
    model = onnx.load(str(smoke_runs["cnn"] / "model.onnx"))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(smoke_runs["cnn"] / "model.onnx"), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.type == "tensor(uint8)" and image.shape[1:] == [28, 28, 1]
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    torch_model, _ = load_checkpoint(smoke_runs["cnn"] / "checkpoint.pth")
    for batch in (1, 5):  # dynamic batch axis
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
        logits, embedding = session.run(None, {"image": pixels})
        assert logits.shape == (batch, 10) and embedding.shape == (batch, 64)
        with torch.no_grad():
            expected, _ = torch_model(torch.from_numpy(pixels))
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    assert (smoke_runs["cnn"] / "curves.png").stat().st_size > 1000


def test_efficientnet_smoke_freezes_then_unfreezes_with_a_lower_backbone_lr(smoke_runs: dict[str, Path]) -> None:
    run = _run_json(smoke_runs["effnet"])
    assert [h["frozen_backbone"] for h in run["history"]] == [True, False]
    assert run["onnx_parity_max_abs_diff"] < 1e-4
    checkpoint = torch.load(smoke_runs["effnet"] / "checkpoint.pth", map_location="cpu", weights_only=False)
    head_group, backbone_group = checkpoint["optimizer"]["param_groups"]
    assert backbone_group["initial_lr"] == head_group["initial_lr"] * 0.25
    session = ort.InferenceSession(str(smoke_runs["effnet"] / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(None, {"image": np.zeros((2, 28, 28, 1), dtype=np.uint8)})
    assert logits.shape == (2, 10) and embedding.shape == (2, 1280)


def test_training_is_seeded_and_resume_continues_the_same_run(tmp_path: Path, train_run) -> None:
    small = ("--limit-train", "96", "--limit-val", "32", "--no-export", "--epochs", "2")
    straight = train_run(tmp_path / "straight", *small, "--keep-epoch-checkpoints")
    again = train_run(tmp_path / "again", *small)
    assert again["history"][-1]["train_loss"] == straight["history"][-1]["train_loss"]  # seeded
    resumed = train_run(tmp_path / "resumed", *small, "--resume", str(tmp_path / "straight" / "checkpoint_0.pth"))
    assert len(resumed["history"]) == 2
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])
    final = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)["model"]
    continued = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=False)["model"]
    for name, tensor in final.items():
        torch.testing.assert_close(continued[name], tensor)


def _predictions(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(images))
    return logits.argmax(1).numpy()


def test_distillation_learns_the_teachers_answers(tmp_path: Path, smoke_runs: dict[str, Path], train_run) -> None:
    """Pure distillation (``--kd-alpha 1``: the labels do not count) from a teacher and from the same teacher with
    its classes permuted (its head's rows rolled by one): each student agrees with its own teacher far more than with
    the other. A student that ignored its teacher would come out the same from both, seeded alike."""
    teacher = smoke_runs["cnn"] / "checkpoint.pth"
    checkpoint = torch.load(teacher, map_location="cpu", weights_only=False)
    roll = np.roll(np.arange(10), 1)  # a derangement: no class keeps its index
    for name in ("head.1.weight", "head.1.bias"):
        checkpoint["model"][name] = checkpoint["model"][name][roll]
    permuted = tmp_path / "permuted.pth"
    torch.save(checkpoint, permuted)
    spec = spec_from_dict(checkpoint["meta"]["spec"])
    labels, _ = source_labels(FASHION_MNIST, "test")
    images = load_dataset(FASHION_MNIST, spec, split="test", indices=stratified_subset(labels, 300, 5)).images
    answers = {"teacher": _predictions(teacher, images), "permuted": _predictions(permuted, images)}
    assert not np.any(answers["teacher"] == answers["permuted"])

    kd = ("--kd-alpha", "1", "--kd-temperature", "1", "--epochs", "3", "--no-export")
    agreement = {}
    for name, source in (("teacher", teacher), ("permuted", permuted)):
        run = train_run(tmp_path / name, *kd, "--teacher", str(source))
        assert run["meta"]["teacher"] == str(source)
        student = _predictions(tmp_path / name / "checkpoint.pth", images)
        agreement[name] = {other: float(np.mean(student == answer)) for other, answer in answers.items()}
    # Measured: 0.83 with its teacher vs 0.03 with the permuted one; 0.73 vs 0.00 for the permuted teacher's student.
    assert agreement["teacher"]["teacher"] > agreement["teacher"]["permuted"] + 0.3, agreement
    assert agreement["permuted"]["permuted"] > agreement["permuted"]["teacher"] + 0.3, agreement


def test_quantize_writes_an_int8_model_and_a_side_by_side_report(tmp_path: Path, smoke_runs: dict[str, Path]) -> None:
    run_dir = tmp_path / "cnn"
    shutil.copytree(smoke_runs["cnn"], run_dir)
    result = quantize.main(quantize.get_args_parser().parse_args(
        ["--run-dir", str(run_dir), "--calibration-count", "64", "--limit-test", "200", "--rounds", "1",
         "--seconds", "0.2"]))
    int8 = onnx.load(str(run_dir / "model.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)
    assert result["test_images"] == 200 and result["calibration_images"] == 64
    assert set(result["speedup"]) == {"batch_1", "batch_64"}
    # Measured on this smoke run (200 test images, FP32 35.5 %): INT8 changes top-1 by +1.0 pt with 8-bit weights
    # and by 0.0 pt with 7-bit (the VNNI and non-VNNI paths), over 32 / 64 / 128 calibration images between 0.0 and
    # +1.0 pt, i.e. at most 2 of 200 images. Twice that is the tolerance; a broken calibration costs far more.
    assert abs(result["top1_change_pt"]) <= 2.0, result["top1_change_pt"]
    assert result["excluded_nodes"] == [] and len(result["worst_activations_sqnr_db"]) > 0


def _weight_peaks(int8_path: Path) -> dict[str, tuple[bool, int]]:
    """Conv node -> (depthwise?, largest |quantized weight|)."""
    from onnx import numpy_helper

    int8 = onnx.load(str(int8_path))
    initializers = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    dequantized = {n.output[0]: initializers.get(n.input[0])
                   for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    peaks = {}
    for node in int8.graph.node:
        weight = dequantized.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None:
            peaks[node.name] = (is_depthwise(node), int(np.abs(weight.astype(np.int32)).max()))
    return peaks


@pytest.mark.slow  # quantizes the EfficientNet smoke run and scans its GEMMs (~13 s)
def test_quantize_reduced_range_gives_8_bits_only_where_vpmaddubsw_cannot_saturate(
        tmp_path: Path, smoke_runs: dict[str, Path]) -> None:
    """7-bit weights where VPMADDUBSW could saturate; 8-bit depthwise weights (ONNX Runtime computes them without
    it), and 8-bit GEMM weights where no pair sum left int16 on the calibration images."""
    run_dir = tmp_path / "effnet"
    shutil.copytree(smoke_runs["effnet"], run_dir)
    args = ["--run-dir", str(run_dir), "--calibration-count", "32", "--limit-test", "50", "--rounds", "1",
            "--seconds", "0.1", "--batch-sizes", "1", "--reduce-range", "on"]
    result = quantize.main(quantize.get_args_parser().parse_args([*args, "--saturation-tolerance", "-1"]))
    peaks = _weight_peaks(run_dir / "model.int8.onnx")
    depthwise = [peak for dw, peak in peaks.values() if dw]
    assert result["weight_bits"] == 7 and result["depthwise_8bit_weights"] == len(depthwise) > 0
    assert result["safe_8bit_weights"] == 0 and len(result["saturated_pair_fraction"]) > 0
    assert max(peak for dw, peak in peaks.values() if not dw) <= 64 < min(depthwise), peaks

    result = quantize.main(quantize.get_args_parser().parse_args([*args, "--saturation-tolerance", "1"]))
    assert result["safe_8bit_weights"] == len(result["saturated_pair_fraction"]) > 0  # a tolerance of 1 admits all
    pre = onnx.load(str(run_dir / "model.pre.onnx"))
    one_by_one = {n.name for n in pre.graph.node if n.op_type == "Conv" and n.input[1] in
                  result["saturated_pair_fraction"]}
    for name, (dw, peak) in _weight_peaks(run_dir / "model.int8.onnx").items():
        assert (peak > 64) == (dw or name in one_by_one), (name, peak)  # the k×k stem conv stays 7-bit


def test_quantize_keeps_the_readers_of_the_noisiest_activations_in_float(tmp_path: Path,
                                                                        smoke_runs: dict[str, Path]) -> None:
    run_dir = tmp_path / "cnn"
    shutil.copytree(smoke_runs["cnn"], run_dir)
    result = quantize.main(quantize.get_args_parser().parse_args(
        ["--run-dir", str(run_dir), "--calibration-count", "64", "--limit-test", "100", "--rounds", "1",
         "--seconds", "0.1", "--batch-sizes", "1", "--exclude-worst", "1"]))
    worst, sqnr = next(iter(result["worst_activations_sqnr_db"].items()))
    assert sqnr == min(result["worst_activations_sqnr_db"].values())
    pre = onnx.load(str(run_dir / "model.pre.onnx"))
    readers = [n.name for n in pre.graph.node if worst in n.input]
    assert result["excluded_nodes"] == (readers or [n.name for n in pre.graph.node if worst in n.output]) != []
    int8 = onnx.load(str(run_dir / "model.int8.onnx"))
    dequantized = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    assert worst not in quantized  # the noisiest activation stays float
    for node in int8.graph.node:
        if node.name in readers:  # reads float tensors, not dequantized INT8 ones
            assert not dequantized & set(node.input), node.name


def test_evaluate_writes_the_model_card(tmp_path: Path, smoke_runs: dict[str, Path]) -> None:
    out = tmp_path / "eval"
    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--run-dir", str(smoke_runs["cnn"]), "--output-dir", str(out), "--limit-test", "200",
         "--catalog-count", "20", "--compare-recipes", "--compare-count", "20", "--no-benchmark"]))
    assert report["test"]["count"] == 200 and report["catalog"]["count"] == 20
    assert len(report["test"]["per_class"]) == 10 and len(report["recipes"]) == 6
    assert sum(map(sum, report["test"]["confusion_matrix"])) == 200
    card = (out / "MODEL_CARD.md").read_text()
    for label in FASHION_LABELS:
        assert f"| {label} |" in card
    assert "catalog-style photos top-1" in card
    assert (out / "confusion_test.png").exists() and (out / "confusion_catalog.png").exists()


def test_fusion_weights_chosen_on_validation_beat_or_match_each_member(tmp_path: Path,
                                                                       smoke_runs: dict[str, Path]) -> None:
    members = [compare.Scored(smoke_runs[name], 1) for name in ("cnn", "resnet")]
    images, labels = compare._validation_images(members[0])
    assert len(labels) == 100
    for member in members:  # the split rebuilt from run.json is the one training validated on
        top1 = float((member.probabilities(images).argmax(1) == labels).mean())
        assert top1 == pytest.approx(_run_json(member.run_dir)["val_top1"], abs=0.011)
    weights, fused_top1 = compare.validation_weights(members)
    assert weights.sum() == pytest.approx(1.0) and round(float(weights[0]) / 0.05, 6).is_integer()
    assert fused_top1 >= max(_run_json(m.run_dir)["val_top1"] for m in members) - 0.011
    result = compare.main(compare.get_args_parser().parse_args(
        ["fusion", "--members", f"{smoke_runs['cnn']},{smoke_runs['resnet']}", "--weights", "val",
         "--output-dir", str(tmp_path), "--limit-test", "200", "--catalog-count", "0"]))
    assert result["weights"] == pytest.approx(weights.tolist()) and result["weights_validation_top1"] == fused_top1
    assert "chosen on the validation split" in result["markdown"][0]


def test_init_from_carries_the_weights_to_another_net_size_and_refuses_another_arch(
        tmp_path: Path, smoke_runs: dict[str, Path], train_run) -> None:
    source = smoke_runs["effnet"] / "checkpoint.pth"
    run = train_run(tmp_path / "resized", "--arch", "efficientnet_lite0", "--net-size", "48", "--init-from",
                    str(source), "--epochs", "0", "--limit-train", "64", "--limit-val", "32")
    assert run["meta"]["init_from"] == str(source) and run["meta"]["net_size"] == 48 and run["history"] == []
    model, _ = load_checkpoint(source)
    model.net_size = 48  # the same weights, resized input (progressive resizing)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(pixels))
    session = ort.InferenceSession(str(tmp_path / "resized" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": pixels})[0], expected.numpy(), atol=1e-4)
    with pytest.raises(SystemExit, match="not a seed_cnn"):
        train_run(tmp_path / "wrong", "--init-from", str(source), "--epochs", "0")
