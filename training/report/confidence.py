"""The model card's "Confidence thresholds" section: per-class thresholds with their validation precision and
coverage (``calibration.json``, written by ``training.calibrate``) and what ``Prediction.confident`` gave through
Classify on the test set (``confident_eval`` of ``classify_eval.json``, written by ``training.evaluate``).

:func:`refresh` rewrites that one section of a published version's card in place: those cards carry hand-written
sections that re-rendering the whole card would lose.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CALIBRATION = "calibration.json"
CLASSIFY_EVAL = "classify_eval.json"
TITLE = "Confidence thresholds"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def confident_summary(correct: np.ndarray, confident: np.ndarray) -> dict:
    """Answers, confident answers, precision among the confident ones and the share confident."""
    answers, sure = int(len(correct)), int(confident.sum())
    return {"answers": answers, "confident": sure,
            "precision": float(correct[confident].mean()) if sure else None,
            "coverage": sure / answers if answers else 0.0, "top1": float(correct.mean()) if answers else None}


def confident_report(probabilities: np.ndarray, confident: np.ndarray, labels: np.ndarray,
                     classes: list[str] | tuple[str, ...]) -> dict:
    """Precision among confident top-1 answers and the share confident, per answered class and overall (what
    ``training.evaluate --gateway`` records from ``Prediction.confident``)."""
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    per_class = [{"class": name, **confident_summary(correct[predicted == i], confident[predicted == i])}
                 for i, name in enumerate(classes)]
    return {"per_class": per_class, "overall": confident_summary(correct, confident)}



def section(calibration: dict | None, confident_eval: dict | None) -> list[str]:
    """The section's Markdown lines; empty when there is neither a calibration nor a measurement."""
    if not calibration and not confident_eval:
        return []
    lines = [f"## {TITLE}", ""]
    test = (confident_eval or {}).get("test")
    measured = {row["class"]: row for row in test["per_class"]} if test else {}
    if calibration:
        lines += [_calibration_text(calibration), "", *_table(calibration, test, measured), ""]
    elif test:
        lines += ["| class | test via Classify: precision among confident | share confident |",
                  "| --- | ---: | ---: |",
                  *[f"| {row['class']} | {_ratio(row['precision'])} | {_pct(row['coverage'])} |"
                    for row in test["per_class"]],
                  f"| **all** | {_ratio(test['overall']['precision'])} | {_pct(test['overall']['coverage'])} |", ""]
    if confident_eval:
        lines += [_measured_text(confident_eval), ""]
    return lines


def _calibration_text(calibration: dict) -> str:
    overall = calibration["overall"]
    members = calibration.get("members", [])
    fused = (" (members " + ", ".join(f"`{m['classifier']}` v{m['version']} × {m['weight']:.3g}" for m in members)
             + ")") if len(members) > 1 else ""
    return (f"`Prediction.confident` is true when the top-1 score is at or above its class's threshold. Rule: "
            f"{calibration['rule']}. Chosen by `python -m training.calibrate` on the {calibration['split']}; "
            f"{calibration['computed']}{fused}. On validation {_pct(overall['coverage'])} of the answers are "
            f"confident, at precision {_pct(overall['precision'])} (top-1 of all answers "
            f"{_pct(overall.get('top1'))}). The drift reference (top-1 class shares and score histogram of the "
            f"same images) is in `{CALIBRATION}`.")


def _table(calibration: dict, test: dict | None, measured: dict[str, dict]) -> list[str]:
    header = "| class | threshold | validation answers | precision at threshold | coverage |"
    align = "| --- | ---: | ---: | ---: | ---: |"
    if measured:
        header += " test via Classify: precision among confident | share confident |"
        align += " ---: | ---: |"
    lines = [header, align]
    for row in calibration["per_class"]:
        threshold = (f"never (best precision {_ratio(row['best_precision'])})" if row["precision"] is None
                     else f"{row['threshold']:.4f}")
        cells = (f"| {row['class']} | {threshold} | {row['answers']} | {_ratio(row['precision'])} "
                 f"| {_pct(row['coverage'])} |")
        if measured:
            seen = measured.get(row["class"], {})
            cells += f" {_ratio(seen.get('precision'))} | {_pct(seen.get('coverage'))} |"
        lines.append(cells)
    overall = calibration["overall"]
    total = f"| **all** | | {overall['answers']} | {_ratio(overall['precision'])} | {_pct(overall['coverage'])} |"
    if measured and test:
        total += f" {_ratio(test['overall']['precision'])} | {_pct(test['overall']['coverage'])} |"
    return [*lines, total]


def _measured_text(confident_eval: dict) -> str:
    parts = []
    for name, what in (("test", "test set"), ("catalog", "catalog-style photos")):
        measured = confident_eval.get(name)
        if measured:
            overall = measured["overall"]
            parts.append(f"{what}: {_pct(overall['coverage'])} of {overall['answers']} answers confident, "
                         f"{_pct(overall['precision'])} of those right")
    versions = ", ".join(confident_eval.get("model_versions", [])) or "n/a"
    text = (f"Measured through Classify ({confident_eval.get('via', 'the gateway')}, model version {versions}; "
            f"`Prediction.confident` as the gateway answered it; `{CLASSIFY_EVAL}`): " + "; ".join(parts) + ".")
    if parts and all(confident_eval[name]["overall"]["confident"] == 0
                     for name in ("test", "catalog") if name in confident_eval):
        text += " No answer was confident: the gateway served no thresholds for this version when it was measured."
    return text


def update_section(card: str, title: str, lines: list[str]) -> str:
    """``card`` with its ``## title`` section (up to the next ``## `` heading) replaced by ``lines``, or
    ``lines`` appended when it has none; every other line stays as it was."""
    rows = card.splitlines()
    body = list(lines)
    while body and not body[-1].strip():
        body.pop()
    start = next((i for i, row in enumerate(rows) if row.strip() == f"## {title}"), None)
    if start is None:
        if not body:
            return card
        while rows and not rows[-1].strip():
            rows.pop()
        return "\n".join([*rows, "", *body]) + "\n"
    end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
    replacement = [*body, ""] if body and end < len(rows) else body
    return "\n".join([*rows[:start], *replacement, *rows[end:]]).rstrip("\n") + "\n"


def refresh(folder: Path) -> Path | None:
    """Rewrite the section in ``folder/MODEL_CARD.md`` (a published version) from the ``calibration.json`` and
    ``classify_eval.json`` beside it, touching nothing else; returns the card's path, None when there is
    nothing to show."""
    calibration_path, classify_path = folder / CALIBRATION, folder / CLASSIFY_EVAL
    calibration = json.loads(calibration_path.read_text()) if calibration_path.exists() else None
    confident_eval = json.loads(classify_path.read_text()).get("confident_eval") if classify_path.exists() else None
    lines = section(calibration, confident_eval)
    if not lines:
        return None
    path = folder / "MODEL_CARD.md"
    card = path.read_text() if path.exists() else f"# Model card: {folder.parent.name} v{folder.name}\n"
    updated = update_section(card, TITLE, lines)
    if updated != card:
        path.write_text(updated)
    return path
