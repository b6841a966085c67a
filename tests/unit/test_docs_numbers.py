"""README.md and docs/MODELS.md show the model numbers the model repository's files hold (tools.docs_numbers).

A figure changed in a card file, or typed into a block by hand, fails here until `make docs` rewrites the block.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tools import docs_numbers

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"


def card_copy(tmp_path: Path) -> Path:
    """The model repository's configs, labels and card files (no ONNX files), to change freely."""
    copy = tmp_path / "model_repository"
    for path in REPOSITORY.rglob("*"):
        if path.is_file() and path.suffix in {".pbtxt", ".txt", ".json"}:
            target = copy / path.relative_to(REPOSITORY)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        elif path.is_dir() and path.name.isdigit():
            (copy / path.relative_to(REPOSITORY)).mkdir(parents=True, exist_ok=True)
    return copy


def rewrite_json(path: Path, change: dict[str, dict[str, float]]) -> None:
    data = json.loads(path.read_text())
    for section, values in change.items():
        data[section].update(values)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("document", sorted(docs_numbers.BLOCKS))
def test_the_blocks_are_up_to_date_with_the_model_repository(document: str) -> None:
    text = (ROOT / document).read_text()
    assert docs_numbers.render(document, text, docs_numbers.read_models(REPOSITORY), REPOSITORY) == text, (
        f"{document} is out of date with model_repository/: run make docs"
    )


def test_the_blocks_show_the_served_versions_figures() -> None:
    """The rendered figures are the card files' own (a renderer that printed nothing would pass the test above)."""
    models = {m.name: m for m in docs_numbers.read_models(REPOSITORY)}
    assert set(models) == {"efficientnet_lite0_imagenet", "fashion_cnn", "fashion_effnet", "fashion_fused"}
    effnet = models["fashion_effnet"]
    classify = json.loads((REPOSITORY / "fashion_effnet" / effnet.version / "classify_eval.json").read_text())
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `fashion_effnet` |"))
    assert f"| {effnet.version} |" in row
    assert f"{100 * classify['test']['top1']:.2f} %" in row
    assert f"{100 * classify['catalog']['top1']:.2f} %" in row
    assert models["efficientnet_lite0_imagenet"].test is None  # no card files: "not measured", never a guess


def test_a_changed_card_file_makes_the_docs_stale_until_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for document in docs_numbers.BLOCKS:
        (root / document).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / document, root / document)
    repository = card_copy(root)
    args = docs_numbers.get_args_parser().parse_args(["--root", str(root), "--check"])
    assert docs_numbers.main(args) == 0

    effnet = repository / "fashion_effnet" / docs_numbers.latest_version(repository / "fashion_effnet")
    rewrite_json(effnet / "classify_eval.json", {"test": {"top1": 0.9601}, "catalog": {"top1": 0.8899}})
    assert docs_numbers.main(args) == 1

    docs_numbers.main(docs_numbers.get_args_parser().parse_args(["--root", str(root)]))
    assert docs_numbers.main(args) == 0
    readme = (root / "README.md").read_text()
    assert "| `fashion_effnet` | 4 | 10 | 96.01 % (10 000) | 88.99 % (2 000) |" in readme
    served = (root / "docs/MODELS.md").read_text()
    row = next(line for line in served.splitlines() if line.startswith("| `fashion_effnet` |"))
    assert "96.01 %" in row and "| missed |" in row  # the catalog figure fell under the 90 % target


def test_without_classify_eval_the_in_process_evaluation_is_shown_as_such(tmp_path: Path) -> None:
    repository = card_copy(tmp_path)
    effnet = repository / "fashion_effnet" / docs_numbers.latest_version(repository / "fashion_effnet")
    (effnet / "classify_eval.json").unlink()
    rewrite_json(effnet / "eval.json", {"test": {"top1": 0.9333}})
    row = next(
        line
        for line in docs_numbers.readme_models(docs_numbers.read_models(repository)).splitlines()
        if line.startswith("| `fashion_effnet` |")
    )
    assert "93.33 %" in row and "in-process" in row


def test_a_missing_marker_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(ValueError, match="docs-numbers:models:begin"):
        docs_numbers.replace_block("no markers here\n", "models", "body")


def test_readme_prose_does_not_restate_the_card_figures() -> None:
    """Outside the generated block README.md names no accuracy of a served model: such a copy would go stale."""
    prose = docs_numbers.outside_blocks((ROOT / "README.md").read_text())
    for model in docs_numbers.read_models(REPOSITORY):
        for score in (model.test, model.catalog):
            if score is not None:
                figure = f"{100 * score.top1:.2f}"
                assert figure not in prose, f"README.md restates {model.name}'s {figure} % outside the block"


MEASUREMENT = re.compile(r"\d[\d.,  ]*\s?(?:%|ms\b|img/s|MB\b|M MACs|pt\b|h\b|min\b)")


def test_models_prose_states_no_measurement_outside_the_generated_blocks() -> None:
    """docs/MODELS.md: accuracies, latencies, speeds, sizes and durations only inside blocks `make docs` writes."""
    prose = docs_numbers.outside_blocks((ROOT / "docs/MODELS.md").read_text())
    found = [match.group(0) for match in MEASUREMENT.finditer(prose)]
    assert found == [], f"docs/MODELS.md states measurements by hand outside the generated blocks: {found}"


def test_the_made_block_shows_how_the_served_versions_were_trained() -> None:
    """From run.json: the exact training command and its wall time; from chain.json, once a recipe rebuilt it."""
    models = docs_numbers.read_models(REPOSITORY)
    block = docs_numbers.models_made(models, REPOSITORY)
    effnet = next(m for m in models if m.name == "fashion_effnet")
    run = json.loads((REPOSITORY / "fashion_effnet" / effnet.version / "run.json").read_text())
    assert run["command"] in block and run["average"]["command"] in block and run["export"]["command"] in block
    assert f"{round(run['wall_s']):,} s".replace(",", " ") in block


def test_a_chain_json_in_the_version_folder_puts_the_rebuild_time_in_the_docs(tmp_path: Path) -> None:
    repository = card_copy(tmp_path)
    models = docs_numbers.read_models(repository)
    cnn = next(m for m in models if m.name == "fashion_cnn")
    (repository / "fashion_cnn" / cnn.version / "chain.json").write_text(json.dumps({
        "command": "python -m training.recipes fashion_cnn", "date": "2026-12-02T00:00:00+00:00", "wall_s": 4321.0,
        "machine": {"cpu": "Some CPU", "cores": 2},
        "stages": [{"name": "train", "wall_s": 4000.0}, {"name": "publish", "wall_s": 321.0}]}))
    block = docs_numbers.models_made(models, repository)
    assert "python -m training.recipes fashion_cnn` on Some CPU (2 cores)" in block
    assert "4 321 s (1.2 h) in all (train 4 000 s (1.1 h), publish 321 s)" in block
