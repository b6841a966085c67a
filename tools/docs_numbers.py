"""Write the served models' numbers into README.md and docs/MODELS.md from the files their cards are made of.

Each public model's latest version folder in the model repository holds what `training.evaluate`, `training.quantize`
and `training.compare` wrote: `classify_eval.json` (measured through the real `Classify` call), `eval.json`
(in-process), `quantization.json` and, for a fused model, `fusion.json`; `run.json` (training: command, machine,
wall time) and, for a version `training.recipes` rebuilt, `chain.json` (each stage's wall time). This command
renders them into the blocks between `<!-- docs-numbers:NAME:begin -->` and `<!-- docs-numbers:NAME:end -->` of
each document, so no figure in those blocks is typed by hand:

    python -m tools.docs_numbers            # rewrite the blocks (make docs)
    python -m tools.docs_numbers --check    # exit 1 naming each block that is out of date (the unit test does this)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger("tools.docs_numbers")

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = re.compile(r'key:\s*"shopvision\.public"\s*value:\s*\{\s*string_value:\s*"true"\s*\}')
SOURCE_NOTE = (
    "Written by `make docs` (`python -m tools.docs_numbers`) from `model_repository/<model>/<version>/`:\n"
    "`classify_eval.json` (through the real `Classify` call) where it exists, else `eval.json` (in-process)"
)
# The model pipeline's targets (issue 3): test and catalog-style top-1 a fashion model must reach; the floors of
# tests/training/test_training_serving.py.
TARGET_TEST_TOP1 = 0.950
TARGET_CATALOG_TOP1 = 0.90


@dataclass(frozen=True)
class Score:
    """Accuracy on one evaluation set."""

    count: int
    top1: float
    top5: float
    macro_f1: float


@dataclass(frozen=True)
class Quantization:
    """INT8 against FP32, side by side in one `training.quantize` run."""

    test_images: int
    fp32_top1: float
    int8_top1: float
    change_pt: float
    speedup_batch_1: float
    speedup_batch_64: float


@dataclass(frozen=True)
class ModelNumbers:
    """What the files of one public model's latest version say."""

    name: str
    version: str
    classes: int
    via: str  # "Classify", "in-process" or "" (not measured)
    test: Score | None
    catalog: Score | None
    quantization: Quantization | None
    fusion_weights: tuple[float, ...]


def _score(section: dict[str, Any] | None) -> Score | None:
    if not section:
        return None
    return Score(int(section["count"]), float(section["top1"]), float(section["top5"]), float(section["macro_f1"]))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def latest_version(model_dir: Path) -> str:
    """The highest numbered version folder (what `version_policy: latest 1` serves)."""
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ValueError(f"{model_dir} has no version folder")
    return str(versions[-1])


def public_models(repository: Path) -> list[str]:
    """Models whose config.pbtxt marks them public (what ListModels shows), by name."""
    return sorted(
        config.parent.name for config in repository.glob("*/config.pbtxt") if PUBLIC.search(config.read_text())
    )


def read_model(repository: Path, name: str) -> ModelNumbers:
    model_dir = repository / name
    version = latest_version(model_dir)
    folder = model_dir / version
    labels = model_dir / "labels.txt"
    classes = len([line for line in labels.read_text().splitlines() if line.strip()]) if labels.is_file() else 0
    evaluation, via = _read_json(folder / "classify_eval.json"), "Classify"
    if evaluation is None:
        evaluation, via = _read_json(folder / "eval.json"), "in-process"
    if evaluation is None:
        evaluation, via = {}, ""
    quant = _read_json(folder / "quantization.json")
    quantization = None
    if quant is not None:
        quantization = Quantization(
            test_images=int(quant["test_images"]),
            fp32_top1=float(quant["fp32_top1"]),
            int8_top1=float(quant["int8_top1"]),
            change_pt=float(quant["top1_change_pt"]),
            speedup_batch_1=float(quant["speedup"]["batch_1"]),
            speedup_batch_64=float(quant["speedup"]["batch_64"]),
        )
    fusion = _read_json(folder / "fusion.json") or {}
    return ModelNumbers(
        name=name,
        version=version,
        classes=classes,
        via=via,
        test=_score(evaluation.get("test")),
        catalog=_score(evaluation.get("catalog")),
        quantization=quantization,
        fusion_weights=tuple(float(w) for w in fusion.get("weights", ())),
    )


def read_models(repository: Path) -> list[ModelNumbers]:
    return [read_model(repository, name) for name in public_models(repository)]


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def count(value: int) -> str:
    return f"{value:,}".replace(",", " ")


def signed(value: float, unit: str) -> str:
    return f"{value:+.2f} {unit}".replace("-", "−")


def _accuracy(score: Score | None) -> str:
    return f"{percent(score.top1)} ({count(score.count)})" if score else "not measured"


def _measured(model: ModelNumbers) -> str:
    return {"Classify": "through `Classify`", "in-process": "in-process"}.get(model.via, "—")


def _target(model: ModelNumbers) -> str:
    if model.test is None or model.catalog is None:
        return "—"
    met = model.test.top1 >= TARGET_TEST_TOP1 and model.catalog.top1 >= TARGET_CATALOG_TOP1
    return "met" if met else "missed"


def readme_models(models: Sequence[ModelNumbers]) -> str:
    lines = [
        "| model | version | classes | test top-1 (images) | catalog-style top-1 (photos) | measured |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in models:
        lines.append(
            f"| `{m.name}` | {m.version} | {count(m.classes)} | {_accuracy(m.test)} | {_accuracy(m.catalog)} "
            f"| {_measured(m)} |"
        )
    lines += ["", SOURCE_NOTE + "."]
    return "\n".join(lines)


def _int8(q: Quantization | None) -> str:
    if q is None:
        return "—"
    return (
        f"{percent(q.fp32_top1)} → {percent(q.int8_top1)} ({signed(q.change_pt, 'pt')}, {count(q.test_images)}), "
        f"×{q.speedup_batch_1:.2f} / ×{q.speedup_batch_64:.2f}"
    )


def models_served(models: Sequence[ModelNumbers]) -> str:
    lines = [
        "| model | version | test top-1 (images) | top-5 | macro F1 | catalog-style top-1 (photos) | measured "
        f"| target (≥ {percent(TARGET_TEST_TOP1)} test, ≥ {percent(TARGET_CATALOG_TOP1)} catalog) | fusion weights "
        "| INT8 file (not served): FP32 → INT8 top-1 (test images), speed-up batch 1 / 64 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for m in models:
        weights = " / ".join(f"{w:.2f}" for w in m.fusion_weights) or "—"
        lines.append(
            f"| `{m.name}` | {m.version} | {_accuracy(m.test)} | {percent(m.test.top5) if m.test else '—'} "
            f"| {f'{m.test.macro_f1:.3f}' if m.test else '—'} | {_accuracy(m.catalog)} | {_measured(m)} "
            f"| {_target(m)} | {weights} | {_int8(m.quantization)} |"
        )
    lines += [
        "",
        SOURCE_NOTE + ";\n`fusion.json` (weights) and `quantization.json` (INT8 against FP32 side by side in one "
        "run,\non one CPU).",
    ]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{count(round(value))} s" + (f" ({value / 3600:.1f} h)" if value >= 3600 else "")


def _training_line(run: dict[str, Any]) -> str:
    history = run.get("history", [])
    speeds = [h["images_per_s"] for h in history if h.get("images_per_s")]
    machine = run.get("machine", {})
    where = machine.get("gpu") or f"{machine.get('processor', '?')}, {machine.get('cpus', '?')} CPUs"
    line = (f"- last training run: `{run['command']}`: {len(history)} epochs of {count(run.get('train_images', 0))} "
            f"images, {_seconds(float(run['wall_s']))} on {where} (torch {machine.get('torch', '?')})")
    if speeds:
        line += f", {min(speeds):.0f}-{max(speeds):.0f} training img/s"
    return line


def _made_lines(repository: Path, model: ModelNumbers) -> list[str]:
    """How one served version was made, from its run.json / fusion.json / chain.json."""
    folder = repository / model.name / model.version
    run, fusion, chain = (_read_json(folder / name) for name in ("run.json", "fusion.json", "chain.json"))
    if run is None and fusion is None:
        return []
    lines = [f"**`{model.name}` v{model.version}**", ""]
    if run is not None:
        meta = run["meta"]
        lines.append(f"- {meta['arch']}: {count(int(meta['params']))} parameters, "
                     f"{meta['macs'] / 1e6:.1f} M multiply-accumulates per image")
        lines.append(_training_line(run))
        average = run.get("average")
        if average:
            members = ", ".join(f"`{m['checkpoint']}` {percent(m['val_top1'])}" for m in average["members"])
            lines.append(f"- weights averaged: `{average['command']}` over {members} (validation top-1); "
                         f"average {percent(average['val_top1'])}, {_seconds(float(average['wall_s']))}")
        export = run.get("export")
        if export:
            lines.append(f"- exported: `{export['command']}`" + (" (test-time flip averaging in the graph)"
                                                                 if export.get("flip_tta") else ""))
    if fusion is not None:
        lines += [f"- {fusion['markdown'][0]}", "", *(line for line in fusion["markdown"][1:] if line), ""]
    if chain is not None:
        stages = ", ".join(f"{s['name']} {_seconds(float(s['wall_s'] or 0))}" for s in chain["stages"])
        lines.append(f"- rebuilt by `{chain['command']}` on {chain['machine']['cpu']} "
                     f"({chain['machine']['cores']} cores), {chain['date']}: {_seconds(float(chain['wall_s']))} "
                     f"in all ({stages})")
    else:
        lines.append("- the whole chain has not been timed as one run (no `chain.json` in the version folder)")
    return [*lines, ""]


def models_made(models: Sequence[ModelNumbers], repository: Path) -> str:
    lines = [line for m in models for line in _made_lines(repository, m)]
    lines.append("Written by `make docs` from each served version's `run.json`, `fusion.json` and `chain.json`.")
    return "\n".join(lines)


def recipe_comparison(models: Sequence[ModelNumbers], repository: Path) -> str:
    lines = ["| model | crop | background | catalog-style top-1 (photos) | served |",
             "| --- | --- | --- | ---: | --- |"]
    for m in models:
        evaluation = _read_json(repository / m.name / m.version / "eval.json") or {}
        for row in sorted(evaluation.get("recipes", []), key=lambda r: -r["catalog_top1"]):
            served = "yes" if row["served"] else ""
            lines.append(f"| `{m.name}` v{m.version} | `{row['crop']}` | `{row['background']}` "
                         f"| {percent(row['catalog_top1'])} ({count(row['photos'])}) | {served} |")
    lines += ["", "Written by `make docs` from `eval.json` (`training.evaluate --compare-recipes`)."]
    return "\n".join(lines)


Renderer = Callable[[Sequence[ModelNumbers], Path], str]
# document (relative to the repository root) -> block name -> renderer (models, repository)
BLOCKS: dict[str, dict[str, Renderer]] = {
    "README.md": {"models": lambda models, _: readme_models(models)},
    "docs/MODELS.md": {"served": lambda models, _: models_served(models), "made": models_made,
                       "recipes": recipe_comparison},
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- docs-numbers:{name}:begin -->", f"<!-- docs-numbers:{name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between the block's markers replaced by ``body``; the markers must be there once."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one {begin} ... {end} pair")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def outside_blocks(text: str) -> str:
    """``text`` without any docs-numbers block (what prose may not fill with card figures)."""
    return re.sub(r"<!-- docs-numbers:(\w+):begin -->.*?<!-- docs-numbers:\1:end -->", "", text, flags=re.S)


def render(document: str, text: str, models: Sequence[ModelNumbers], repository: Path) -> str:
    for name, renderer in BLOCKS[document].items():
        text = replace_block(text, name, renderer(models, repository))
    return text


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument(
        "--repository", type=Path, default=None, help="model repository (default: ROOT/model_repository)"
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    return parser


def main(args: argparse.Namespace) -> int:
    repository = args.repository or args.root / "model_repository"
    models = read_models(repository)
    texts = {document: (args.root / document).read_text() for document in BLOCKS}
    # Render every document before writing any, so a missing marker changes nothing.
    wanted = {document: render(document, text, models, repository) for document, text in texts.items()}
    stale = [document for document in BLOCKS if wanted[document] != texts[document]]
    if not args.check:
        for document in stale:
            (args.root / document).write_text(wanted[document])
            LOG.info("rewrote the model numbers in %s", document)
        return 0
    if stale:
        LOG.error("out of date with the model repository: %s (run make docs)", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(get_args_parser().parse_args()))
