"""Unit tests of the training package's pure parts: IDX reading, splits, metrics, models, catalog renderer."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from services.preprocess.imaging import preprocess
from training.data.augment import Augment
from training.data.catalog import render
from training.data.datasets import fashion_mnist_raw, read_idx, stratified_split, stratified_subset
from training.nets.models import build_model, count_macs
from training.report.metrics import classification_report
from training.repository.recipe import read_spec

# The recipe of the committed fashion models, read from their config (its one home).
FASHION = read_spec(Path(__file__).resolve().parents[2] / "model_repository" / "fashion_cnn" / "config.pbtxt")


def test_read_idx_reads_gzipped_idx(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + array.tobytes())
    np.testing.assert_array_equal(read_idx(path), array)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 5) + array.tobytes())
    with pytest.raises(ValueError):
        read_idx(path)


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, val = stratified_split(labels, 0.1, seed=3)
    again_train, again_val = stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [10, 5, 3, 2]
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])
    subset = stratified_subset(labels, 40, seed=0)
    assert len(subset) == 40 and np.bincount(labels[subset]).tolist() == [10, 10, 10, 10]


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 500)
    scores = rng.random((500, 6)) + np.eye(6)[labels] * rng.random((500, 1))
    report = classification_report(scores, labels, [str(i) for i in range(6)])
    predictions = scores.argmax(1)
    assert report["top1"] == pytest.approx(float(np.mean(predictions == labels)))
    assert report["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5))
    np.testing.assert_array_equal(report["confusion_matrix"], sk_confusion(labels, predictions))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, zero_division=0)
    assert [row["f1"] for row in report["per_class"]] == pytest.approx(f1.tolist())
    assert report["macro_precision"] == pytest.approx(precision.mean())
    assert report["macro_recall"] == pytest.approx(recall.mean())


def test_student_has_at_least_5x_fewer_macs_than_the_teacher() -> None:
    teacher = build_model("efficientnet_lite0", FASHION, 10, net_size=112, pretrained=False)
    student = build_model("seed_cnn", FASHION, 10)
    assert count_macs(teacher, FASHION) >= 5 * count_macs(student, FASHION)


def test_resnet_small_exports_with_parity_and_a_128_dim_embedding(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.onnx.export import export

    torch.manual_seed(0)
    model = build_model("resnet_small", FASHION, 10).eval()
    assert 20e6 < count_macs(model, FASHION) < 60e6  # 3 basic blocks at 28, 14 and 7 px
    assert export(model, tmp_path / "resnet.onnx", 28, 28, 1) < 1e-4
    image = fashion_mnist_raw("test")[0][:3, :, :, None].copy()
    logits, embedding = ort.InferenceSession(str(tmp_path / "resnet.onnx")).run(None, {"image": image})
    assert logits.shape == (3, 10) and embedding.shape == (3, 128)


def test_contrast_stretch_makes_the_model_exposure_invariant() -> None:
    model = build_model("seed_cnn", FASHION, 10).eval()
    image = torch.from_numpy(fashion_mnist_raw("test")[0][:4, :, :, None].copy())
    dim = (image.float() * 0.4).round().to(torch.uint8)
    with torch.no_grad():
        bright, _ = model(image)
        dimmed, _ = model(dim)
    torch.testing.assert_close(bright, dimmed, atol=0.05, rtol=0.05)


def test_flip_tta_makes_the_exported_model_mirror_invariant(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.onnx.export import export

    torch.manual_seed(0)
    model = build_model("seed_cnn", FASHION, 10).eval()
    image = fashion_mnist_raw("test")[0][:4, :, :, None].copy()
    mirrored = image[:, :, ::-1].copy()
    with torch.no_grad():
        plain, _ = model(torch.from_numpy(image))
        plain_mirrored, _ = model(torch.from_numpy(mirrored))
    assert not torch.allclose(plain, plain_mirrored, atol=1e-3)  # the plain CNN is not mirror-invariant
    model.flip_tta = True
    assert export(model, tmp_path / "flip.onnx", 28, 28, 1) < 1e-4  # parity with PyTorch
    session = ort.InferenceSession(str(tmp_path / "flip.onnx"))
    logits, embedding = session.run(None, {"image": image})
    logits_m, embedding_m = session.run(None, {"image": mirrored})
    np.testing.assert_allclose(logits, logits_m, atol=1e-5)
    np.testing.assert_allclose(embedding, embedding_m, atol=1e-5)
    np.testing.assert_allclose(logits, ((plain + plain_mirrored) / 2).numpy(), atol=1e-4)


def test_float16_stored_weights_halve_the_file_and_keep_the_outputs(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from training.onnx.export import export, store_weights_as_float16

    torch.manual_seed(0)
    export(build_model("seed_cnn", FASHION, 10).eval(), tmp_path / "model.onnx", 28, 28, 1)
    store_weights_as_float16(tmp_path / "model.onnx", tmp_path / "model.fp16w.onnx")
    assert (tmp_path / "model.fp16w.onnx").stat().st_size < 0.6 * (tmp_path / "model.onnx").stat().st_size
    stored = {i.data_type for i in onnx.load(str(tmp_path / "model.fp16w.onnx")).graph.initializer
              if np.prod(i.dims) >= 1024}
    assert stored == {onnx.TensorProto.FLOAT16}
    image = fashion_mnist_raw("test")[0][:8, :, :, None].copy()
    (fp32, _), (fp16w, _) = (ort.InferenceSession(str(tmp_path / name)).run(None, {"image": image})
                             for name in ("model.onnx", "model.fp16w.onnx"))
    assert fp16w.dtype == np.float32
    np.testing.assert_allclose(fp16w, fp32, atol=1e-2)
    assert not np.array_equal(fp16w, fp32)  # the weights really were rounded


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    images = torch.randint(0, 256, (8, 28, 28, 1), dtype=torch.uint8)
    augment = Augment(shift_px=2, scale=0.1, hflip=True, gain=0.2)
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == (8, 28, 28, 1) and first.min() >= 0 and first.max() <= 255
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, images.float())
    identity = Augment(0, 0, False, 0)(images)
    torch.testing.assert_close(identity, images.float())


def test_random_erasing_blanks_one_rectangle_in_the_chosen_share_of_images() -> None:
    images = torch.full((200, 28, 28, 1), 200, dtype=torch.uint8)
    erased = Augment(0, 0, False, 0, erase=0.5)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(erased, Augment(0, 0, False, 0, erase=0.5)(images, torch.Generator().manual_seed(0)))
    blank = erased[..., 0] == 0
    hit = blank.flatten(1).any(dim=1)
    assert 70 <= int(hit.sum()) <= 130  # about half of the images
    assert bool(((erased == 0) | ((erased - 200).abs() < 1e-3)).all())  # erased to the background, rest kept
    for mask in blank[hit]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert bool(box.all())  # one solid rectangle
        assert 0.005 * 784 <= int(mask.sum()) <= 0.35 * 784


def test_catalog_rendering_is_seeded_light_and_recovered_by_the_object_recipe() -> None:
    items, _ = fashion_mnist_raw("test")
    first, again = render(items[0], seed=7), render(items[0], seed=7)
    assert first.data == again.data and first.data[:2] == b"\xff\xd8"
    photo = cv2.imdecode(np.frombuffer(first.data, np.uint8), cv2.IMREAD_COLOR)
    assert photo.shape[:2] == (first.height, first.width) and min(photo.shape[:2]) >= 320
    border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]])
    assert np.median(border) > 200  # light background, unlike the training data
    correlations = []
    for i in range(20):
        recovered = preprocess(render(items[i], seed=i).data, FASHION, 1 << 26).pixels[:, :, 0].astype(float)
        original = items[i].astype(float)
        correlations.append(np.corrcoef(recovered.ravel(), original.ravel())[0, 1])
    assert np.median(correlations) > 0.8
