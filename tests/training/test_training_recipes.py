"""The one-command rebuild of each served model (``training.recipes``): the chain mirrors what made the served
version, and runs end to end at smoke scale into a scratch repository."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from training import recipes, train
from training.onnx.inference import session
from training.repository.recipe import read_config

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
EFFNET_STAGES = ["train", "restart1", "restart2", "average", "export", "quantize", "evaluate", "publish"]


def _stages(model: str, tmp_path: Path, smoke: bool = False) -> dict[str, recipes.Stage]:
    chain = recipes.Chain(tmp_path / "runs", tmp_path / "repo", smoke, "cpu", 1, "")
    return {stage.name: stage for stage in recipes.RECIPES[model](chain)}


def _train_args(stage: recipes.Stage) -> argparse.Namespace:
    return train.get_args_parser().parse_args(stage.argv())


def _served_version(model: str) -> Path:
    return max((p for p in (REPOSITORY / model).iterdir() if p.name.isdigit() and (p / "run.json").exists()),
               key=lambda p: int(p.name))


def test_effnet_recipe_replays_the_chain_recorded_in_the_served_card(tmp_path: Path) -> None:
    stages = _stages("fashion_effnet", tmp_path)
    assert list(stages) == EFFNET_STAGES
    served = _served_version("fashion_effnet")
    run = json.loads((served / "run.json").read_text())
    last_cycle = _train_args(stages["restart2"])
    recorded = run["args"]
    for key in ("arch", "net_size", "epochs", "batch_size", "lr", "backbone_lr_scale", "freeze_epochs",
                "warmup_epochs", "seed", "weight_decay", "label_smoothing", "aug_scale"):
        assert str(getattr(last_cycle, key)) == recorded[key], key
    # Each restart starts from the cycle before it; the average is over the last two cycle ends, as recorded.
    assert _train_args(stages["restart1"]).init_from == tmp_path / "runs/fashion_effnet/train/checkpoint.pth"
    assert last_cycle.init_from == tmp_path / "runs/fashion_effnet/restart1/checkpoint.pth"
    averaged = stages["average"].argv()
    assert len(run["average"]["members"]) == 2
    assert averaged[averaged.index("--checkpoints") + 1:][:2] == [
        str(tmp_path / "runs/fashion_effnet" / name / "checkpoint.pth") for name in ("restart1", "restart2")]
    assert averaged[averaged.index("--bn-images") + 1] == str(run["average"]["bn_images"])
    export = stages["export"].argv()
    assert ("--flip-tta" in export) == run["export"]["flip_tta"] and "--float16-weights" in export
    publish = stages["publish"].argv()
    spec = json.loads((served / "spec.json").read_text())
    assert publish[publish.index("--model-file") + 1] == spec["model_file"]
    assert publish[publish.index("--repository") + 1] == str(tmp_path / "repo")


def test_cnn_recipe_replays_the_served_training_command(tmp_path: Path) -> None:
    stages = _stages("fashion_cnn", tmp_path)
    assert list(stages) == ["train", "quantize", "evaluate", "publish"]
    recorded = json.loads((_served_version("fashion_cnn") / "run.json").read_text())["args"]
    args = _train_args(stages["train"])
    for key in ("arch", "epochs", "batch_size", "lr", "aug_scale", "seed", "weight_decay", "label_smoothing"):
        assert str(getattr(args, key)) == recorded[key], key


def test_smoke_scale_keeps_every_stage_and_shrinks_the_data(tmp_path: Path) -> None:
    full, smoke = _stages("fashion_fused", tmp_path), _stages("fashion_fused", tmp_path, smoke=True)
    assert list(full) == list(smoke)
    args = _train_args(smoke["fashion_effnet: train"])
    assert (args.limit_train, args.limit_val, args.epochs) == (300, 100, 1)
    assert _train_args(full["fashion_effnet: train"]).limit_train == 0


def test_the_default_repository_is_a_staging_copy_not_the_served_one() -> None:
    args = recipes.get_args_parser().parse_args(["fashion_effnet"])
    assert args.repository.resolve() != REPOSITORY.resolve()
    assert args.seed_from.resolve() == REPOSITORY.resolve()


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@pytest.mark.slow
def test_effnet_chain_runs_end_to_end_at_smoke_scale_and_resumes(tmp_path: Path) -> None:
    repo, runs = tmp_path / "staging" / "model_repository", tmp_path / "runs"
    argv = ["fashion_effnet", "--smoke", "--output-dir", str(runs), "--repository", str(repo)]
    record = recipes.main(recipes.get_args_parser().parse_args(argv))

    assert [s["name"] for s in record["stages"]] == EFFNET_STAGES
    assert all(s["ran"] and s["wall_s"] >= 0 and s["command"].startswith("python -m training.")
               for s in record["stages"])
    assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1
    assert record["wall_s"] == pytest.approx(sum(s["wall_s"] for s in record["stages"]), abs=0.2)
    assert json.loads((runs / "fashion_effnet" / "chain.json").read_text()) == record

    # The staging repository started as a copy of the served one; the chain added one version beside them.
    assert (repo / "postprocess_softmax" / "config.pbtxt").exists()
    published = json.loads((runs / "fashion_effnet" / recipes.PUBLISHED).read_text())
    version = str(published["version"])
    assert (repo / "fashion_effnet" / version).is_dir() and (repo / "fashion_effnet_onnx" / version).is_dir()
    for name in ("fashion_effnet", "fashion_effnet_onnx"):
        assert read_config(repo / name / "config.pbtxt").name == name
    card = repo / "fashion_effnet" / version
    assert {"MODEL_CARD.md", "eval.json", "quantization.json", "chain.json"} <= {p.name for p in card.iterdir()}
    assert json.loads((card / "spec.json").read_text())["model_file"] == "model.fp16w.onnx"

    # The served file: float16-stored weights, flip averaging in the graph (the backbone runs twice).
    graph = onnx.load(str(repo / "fashion_effnet_onnx" / version / "model.onnx")).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert json.loads((card / "run.json").read_text())["export"]["flip_tta"] is True
    probe = np.zeros((2, 28, 28, 1), dtype=np.uint8)
    logits, _ = session(repo / "fashion_effnet_onnx" / version / "model.onnx").run(None, {"image": probe})
    assert logits.shape == (2, 10)

    versions = _versions(repo / "fashion_effnet")
    again = recipes.main(recipes.get_args_parser().parse_args(argv))
    assert not any(s["ran"] for s in again["stages"])
    assert [s["wall_s"] for s in again["stages"]] == [s["wall_s"] for s in record["stages"]]
    assert _versions(repo / "fashion_effnet") == versions


def test_an_interrupted_training_resumes_from_its_checkpoint_and_a_finished_one_is_skipped(tmp_path: Path) -> None:
    stage = _stages("fashion_cnn", tmp_path)["train"]
    run = tmp_path / "runs" / "fashion_cnn" / "train"
    assert _train_args(stage).resume is None and not stage.done()
    run.mkdir(parents=True)
    (run / "checkpoint.pth").write_bytes(b"")
    assert _train_args(stage).resume == run / "checkpoint.pth"
    (run / "run.json").write_text("{}")
    assert stage.done() and _train_args(stage).resume is None  # --force trains afresh


def test_smoke_runs_never_publish_into_the_served_repository(tmp_path: Path) -> None:
    argv = ["fashion_cnn", "--smoke", "--output-dir", str(tmp_path), "--repository", str(REPOSITORY)]
    with pytest.raises(SystemExit, match="not for serving"):
        recipes.main(recipes.get_args_parser().parse_args(argv))


def test_full_scale_stages_do_not_resume_on_smoke_scale_runs(tmp_path: Path) -> None:
    (tmp_path / "fashion_cnn").mkdir()
    (tmp_path / "fashion_cnn" / "chain.json").write_text(json.dumps({"model": "fashion_cnn", "smoke": True}))
    argv = ["fashion_cnn", "--output-dir", str(tmp_path), "--repository", str(tmp_path / "repo")]
    with pytest.raises(SystemExit, match="smoke-scale runs"):
        recipes.main(recipes.get_args_parser().parse_args(argv))
