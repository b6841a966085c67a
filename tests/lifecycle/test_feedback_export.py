"""python -m training.feedback export on feedback sent through the real stack: images named by hash, manifest.csv
and holdout.csv that training reads, --since, de-duplication, a hold-out that re-exports agree on; and the
exported manifest trains (training.train --extra-data, smoke scale)."""
from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import pytest
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import Stack
from tests.lifecycle.feedback_helpers import database_now, fashion_photos, noisy, submit
from training import feedback, train
from training.data.datasets import FASHION_LABELS, manifest_items

pytestmark = pytest.mark.stack
MODEL = "fashion_effnet"  # the RPC tests write fashion_cnn's feedback; this one reads a model of its own


def export(stack: Stack, out: Path, *extra: str) -> dict:
    args = feedback.get_args_parser().parse_args(
        ["export", "--model", MODEL, "--output", str(out), "--database-url", stack.postgres_url, *extra])
    summary: dict = feedback.main(args)
    return summary


def rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        found = [tuple(row) for row in csv.reader(f)]
    assert found[0] == ("path", "label"), f"{path} has no path,label header"
    return found[1:]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def submitted(stack: Stack, gateway: recognition_pb2_grpc.ProductRecognitionStub) -> dict:
    """40 photos of MODEL's feedback in two rounds, with a duplicate and a relabelled photo in the second."""
    photos = [(noisy(photo, 100 + i), label) for i, (photo, label) in enumerate(fashion_photos(40, seed=21))]
    first, second = photos[:25], photos[25:]
    for photo, label in first:
        submit(gateway, photo, label, MODEL)
    time.sleep(0.05)
    midpoint = database_now(stack.postgres_url)
    for photo, label in second:
        submit(gateway, photo, label, MODEL)
    assert submit(gateway, *second[0], MODEL).duplicate
    relabelled_photo, old_label = second[1]
    new_label = next(name for name in FASHION_LABELS if name != old_label)
    submit(gateway, relabelled_photo, new_label, MODEL)
    expected = {hashlib.sha256(photo).hexdigest(): label for photo, label in photos}
    expected[hashlib.sha256(relabelled_photo).hexdigest()] = new_label  # the later correction wins
    later = {hashlib.sha256(photo).hexdigest() for photo, _ in second}
    return {"expected": expected, "later": later, "midpoint": midpoint}


def test_export_writes_images_manifest_and_holdout(stack: Stack, submitted: dict, tmp_path: Path) -> None:
    summary = export(stack, tmp_path / "all")
    exported = {}
    for manifest in ("manifest.csv", "holdout.csv"):
        for path, label in rows(tmp_path / "all" / manifest):
            data = (tmp_path / "all" / path).read_bytes()
            assert Path(path).stem == hashlib.sha256(data).hexdigest(), "an image is not named by its hash"
            assert path not in exported, f"{path} exported twice"
            exported[Path(path).stem] = (label, manifest)
    assert {digest: label for digest, (label, _) in exported.items()} == submitted["expected"]
    held = {digest for digest, (_, manifest) in exported.items() if manifest == "holdout.csv"}
    assert held == {d for d in submitted["expected"] if feedback.held_out(bytes.fromhex(d), 0.2)}
    assert 0 < len(held) < len(exported)
    assert summary["feedback_rows"] == 41 and summary["photos"] == 40 and summary["label_conflicts"] == 1
    assert summary["train"] + summary["holdout"] == 40
    assert json.loads((tmp_path / "all" / "export.json").read_text())["photos"] == 40
    items, classes = manifest_items(tmp_path / "all" / "manifest.csv")  # what training.train reads
    assert len(items) == summary["train"] and set(classes) <= set(FASHION_LABELS)
    assert all(path.exists() for path, _ in items)


def test_since_exports_the_later_feedback_and_the_holdout_agrees(stack: Stack, submitted: dict,
                                                                 tmp_path: Path) -> None:
    full = export(stack, tmp_path / "all")
    later = export(stack, tmp_path / "later", "--since", submitted["midpoint"].isoformat())
    assert later["photos"] == len(submitted["later"]) < full["photos"]
    names = {Path(p).stem: m for m in ("manifest.csv", "holdout.csv") for p, _ in rows(tmp_path / "later" / m)}
    assert set(names) == submitted["later"]
    sides = {Path(p).stem: m for m in ("manifest.csv", "holdout.csv") for p, _ in rows(tmp_path / "all" / m)}
    assert all(sides[digest] == side for digest, side in names.items()), "a re-export moved a photo across"
    again = export(stack, tmp_path / "all")  # into the same folder: the same files, nothing doubled
    assert again["photos"] == full["photos"]
    assert len(list((tmp_path / "all" / "images").iterdir())) == full["photos"]


def test_count_reports_feedback_per_label(stack: Stack, submitted: dict) -> None:
    args = feedback.get_args_parser().parse_args(["count", "--model", MODEL, "--database-url", stack.postgres_url])
    counts = feedback.main(args)
    assert set(counts) == {MODEL} and sum(counts[MODEL].values()) == 41  # 40 photos, one relabelled
    assert set(submitted["expected"].values()) <= set(counts[MODEL])


def test_the_exported_manifest_trains(stack: Stack, submitted: dict, tmp_path: Path) -> None:
    exported = export(stack, tmp_path / "feedback")
    argv = ["--arch", "seed_cnn", "--data", "fashion-mnist", "--extra-data", str(tmp_path / "feedback" /
            "manifest.csv"), "--limit-train", "300", "--limit-val", "100", "--epochs", "1", "--batch-size", "32",
            "--no-progress", "--no-export", "--output-dir", str(tmp_path / "run")]
    summary = train.main(train.get_args_parser().parse_args(argv))
    assert summary["train_images"] == 300 + exported["train"]
    assert summary["meta"]["extra_data"].endswith("manifest.csv") and summary["meta"]["data"] == "fashion-mnist"
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_a_manifest_with_a_label_the_base_data_lacks_fails_clearly(tmp_path: Path) -> None:
    photo, _ = fashion_photos(10, seed=22)[0]
    (tmp_path / "x.png").write_bytes(photo)
    (tmp_path / "manifest.csv").write_text("path,label\nx.png,Hat\n")
    argv = ["--extra-data", str(tmp_path / "manifest.csv"), "--limit-train", "50", "--limit-val", "10",
            "--epochs", "1", "--no-progress", "--no-export", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"--extra-data: .*\['Hat'\] are not classes of the base data"):
        train.main(train.get_args_parser().parse_args(argv))
