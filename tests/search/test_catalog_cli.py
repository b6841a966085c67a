"""The catalog CLIs: catalog sources, and ``python -m tools.categorize`` against the running gateway."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import REPO_ROOT, Stack
from tests.conftest import photo_bytes
from tools import categorize
from tools.catalog import read_catalog


def test_folder_and_manifest_sources(tmp_path: Path) -> None:
    (tmp_path / "mugs").mkdir()
    (tmp_path / "mugs" / "m1.png").write_bytes(photo_bytes("coffee.png"))
    (tmp_path / "loose.jpg").write_bytes(photo_bytes("china.jpg"))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = read_catalog(str(tmp_path))
    assert [(i.product_id, i.category) for i in folder] == [("loose", ""), ("mugs/m1", "mugs")]
    assert folder[1].read() == photo_bytes("coffee.png")

    manifest = tmp_path / "catalog.csv"
    manifest.write_text("path,product_id,category,brand\nmugs/m1.png,SKU-1,cups,acme\nloose.jpg,,,\n")
    items = read_catalog(str(manifest))
    assert [(i.product_id, i.category, i.metadata) for i in items] == [
        ("SKU-1", "cups", {"brand": "acme"}), ("loose", "", {})]
    (tmp_path / "train.csv").write_text("mugs/m1.png,cups\n")  # the training manifest: no header
    assert [(i.product_id, i.category) for i in read_catalog(str(tmp_path / "train.csv"))] == [("m1", "cups")]
    (tmp_path / "dupes.csv").write_text("path,product_id\nloose.jpg,A\nmugs/m1.png,A\n")
    with pytest.raises(ValueError, match="twice"):
        read_catalog(str(tmp_path / "dupes.csv"))


def test_cli_help_states_defaults() -> None:
    for module, concurrency in (("tools.index_catalog", 3), ("tools.categorize", 8), ("tools.reembed", 8)):
        text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout
        assert f"(default: {concurrency})" in text, module
        if module != "tools.reembed":
            assert "(default: 127.0.0.1:50051)" in text, module


def test_categorize_writes_top_k_flags_and_resumes(stack: Stack, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "categories.csv"
    summary_path = tmp_path / "summary.json"
    argv = ["fashion-mnist:test:20", "--gateway", stack.gateway_address, "--output", str(output), "--top-k", "3",
            "--threshold", "0.5", "--summary", str(summary_path), "--no-progress"]
    assert categorize.main(categorize.get_args_parser().parse_args(argv)) == 0
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 20
    assert list(rows[0]) == categorize.csv_columns(3)
    for row in rows:
        scores = [float(row[f"score_{r}"]) for r in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True)
        assert row["needs_review"] == ("true" if scores[0] < 0.5 else "false")
        assert row["given_category"] and row["model"] == "efficientnet_lite0_imagenet"
    summary = json.loads(summary_path.read_text())
    assert sum(s["products"] for s in summary.values()) == 20
    assert sum(s["needs_review"] for s in summary.values()) == sum(r["needs_review"] == "true" for r in rows)
    assert "total" in capsys.readouterr().out

    # A rerun resumes: nothing new is classified, and the file keeps its 20 rows.
    assert categorize.main(categorize.get_args_parser().parse_args(argv)) == 0
    assert len(list(csv.DictReader(output.open()))) == 20
    # A longer catalog only adds the missing products.
    argv[0] = "fashion-mnist:test:30"
    assert categorize.main(categorize.get_args_parser().parse_args(argv)) == 0
    assert len({r["product_id"] for r in csv.DictReader(output.open())}) == 30

    jsonl = tmp_path / "categories.jsonl"
    argv = ["fashion-mnist:test:10", "--gateway", stack.gateway_address, "--output", str(jsonl), "--top-k", "2",
            "--threshold", "0.99", "--no-progress"]
    assert categorize.main(categorize.get_args_parser().parse_args(argv)) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 10 and all(len(r["predictions"]) == 2 for r in records)
    assert all(r["needs_review"] == (r["predictions"][0]["score"] < 0.99) for r in records)


def test_categorize_by_default_flags_the_answers_the_gateway_does_not_call_confident(stack: Stack,
                                                                                   tmp_path: Path) -> None:
    import grpc
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    output = tmp_path / "categories.jsonl"
    argv = ["fashion-mnist:test:12", "--gateway", stack.gateway_address, "--output", str(output), "--top-k", "2",
            "--no-progress"]
    assert categorize.main(categorize.get_args_parser().parse_args(argv)) == 0
    records = {r["product_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        for item in read_catalog("fashion-mnist:test:12"):
            reply = stub.Classify(recognition_pb2.ClassifyRequest(image=item.read(), top_k=2), timeout=60)
            assert records[item.product_id]["needs_review"] == (not reply.predictions[0].confident), item.product_id
