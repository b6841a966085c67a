"""Render a model card (Markdown) from the training summary and the evaluation report.

Optional measurements found next to ``eval.json`` are added as sections:
``classify_eval.json`` (training.evaluate --gateway: the same report through the
real Classify call), ``quantization.json`` (training.quantize),
``distillation.json`` and ``fusion.json`` (training.compare). ``calibration.json`` (training.calibrate) and
the ``confident_eval`` of ``classify_eval.json`` make the "Confidence thresholds" section
(:mod:`training.report.confidence`, which also rewrites it in place in a published, hand-edited card).
"""
from __future__ import annotations

import json
from pathlib import Path

from training.report import confidence

EXTRAS = {"classify_eval.json": "Through the real Classify path", "quantization.json": "INT8 quantization",
          "distillation.json": "Knowledge distillation", "fusion.json": "Fusion with another classifier"}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _per_class_table(section: dict) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in section["per_class"]:
        lines.append(f"| {row['class']} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
                     f"| {row['support']} |")
    lines.append(f"| **macro** | {section['macro_precision']:.3f} | {section['macro_recall']:.3f} "
                 f"| {section['macro_f1']:.3f} | {section['count']} |")
    return lines


def _json_block(title: str, data: dict) -> list[str]:
    summary = data.get("markdown")
    if summary:
        return [f"## {title}", "", *summary, ""]
    return [f"## {title}", "", "```json", json.dumps(data, indent=2), "```", ""]


def render(run: dict, report: dict, extras: dict[str, dict] | None = None) -> str:
    meta = run["meta"]
    spec = meta["spec"]
    test = report.get("test", {})
    catalog = report.get("catalog")
    history = run.get("history", [])
    lines = [
        f"# Model card: {report['name']}",
        "",
        f"{meta['arch']} classifier for {len(meta['classes'])} categories, "
        f"{meta['params']:,} parameters, {meta['macs'] / 1e6:.1f} M multiply-accumulates per image.",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| test top-1 ({test.get('source', '')}, {test.get('count', 0)} images) | {_pct(test.get('top1'))} |",
        f"| test top-5 | {_pct(test.get('top5'))} |",
        f"| test macro F1 | {test.get('macro_f1', 0):.4f} |",
    ]
    if catalog:
        lines += [f"| catalog-style photos top-1 ({catalog['count']} JPEGs) | {_pct(catalog['top1'])} |",
                  f"| catalog-style photos top-5 | {_pct(catalog['top5'])} |"]
    if report.get("feedback_holdout") is not None:
        feedback = report["feedback_holdout"]
        lines.append(f"| held-out feedback top-1 ({feedback['count']} photos) | {_pct(feedback.get('top1'))} |")
    throughput = report.get("cpu_throughput")
    if throughput:
        lines += [f"| ONNX Runtime CPU, {throughput['threads']} thread(s), batch 1 | "
                  f"{throughput['batch_1_img_s']:.0f} img/s |",
                  f"| ONNX Runtime CPU, {throughput['threads']} thread(s), batch 64 | "
                  f"{throughput['batch_64_img_s']:.0f} img/s |"]
    lines += [
        "",
        f"Evaluated {report['via']}; model file `{report['model_file']}`.",
        "",
        "## Input and preprocessing recipe",
        "",
        f"Served input `image`: uint8 [{spec['height']}, {spec['width']}, {spec['channels']}] (NHWC with batch). "
        f"Recipe (the ensemble's `preprocess.*` parameters, read by training and by the preprocess service): "
        f"crop `{spec['crop']}`, background `{spec['background']}`, resize_shorter `{spec['resize_shorter']}`. "
        + ("The graph scales each image so its brightest pixel is 255 (contrast stretch). "
           if meta.get("stretch_contrast") else "")
        + (f"The graph resizes to {meta['net_size']}×{meta['net_size']} and repeats gray to 3 channels. "
           if meta["arch"] != "seed_cnn" else ""),
        "",
    ]
    if report.get("recipes"):
        lines += ["Catalog-style top-1 of this model under each recipe (the measurement behind the choice):", "",
                  "| crop | background | catalog top-1 | served |", "| --- | --- | ---: | :---: |"]
        for row in report["recipes"]:
            lines.append(f"| {row['crop']} | {row['background']} | {_pct(row['catalog_top1'])} | "
                         f"{'yes' if row['served'] else ''} |")
        lines.append("")
    lines += [
        "## Training",
        "",
        f"- command: `{run.get('command', '')}`",
        f"- machine: {', '.join(f'{k} {v}' for k, v in run.get('machine', {}).items())}",
        f"- wall time: {run.get('wall_s', 0):.0f} s; {len(history)} epochs; "
        f"{run.get('train_images', 0)} training / {run.get('val_images', 0)} validation images "
        f"(stratified, seeded split of the training data)",
        f"- data: `{meta.get('data', '')}`; recipe read from `{meta.get('recipe', '')}`",
    ]
    export = run.get("export")
    if export:
        lines.append(f"- exported from run `{export['from_run']}` with `{export['command']}`"
                     + (" (test-time flip averaging in the graph: the backbone runs on the image and its mirror "
                        "image, MACs doubled)" if export.get("flip_tta") else ""))
    if meta.get("init_from"):
        lines.append(f"- started from the weights of `{meta['init_from']}` (fresh optimizer and schedule; the wall "
                     "time above is this run's alone)")
    average = run.get("average")
    if average:
        members = ", ".join(f"`{m['checkpoint']}` {_pct(m['val_top1'])}" for m in average["members"])
        lines.append(f"- weights averaged with `{average['command']}` over {members} (validation top-1); "
                     f"batch-norm statistics re-estimated on {average['bn_images']} training images; "
                     f"average: validation top-1 {_pct(average['val_top1'])}")
    if meta.get("teacher"):
        lines.append(f"- distilled from teacher `{meta['teacher']}`")
    if history:
        last = history[-1]
        lines.append(f"- last epoch: validation top-1 {_pct(last['val_top1'])}, loss {last['val_loss']:.4f}; "
                     f"{last['images_per_s']:.0f} training img/s")
    lines += ["", "![training curves](curves.png)", "",
              "## Test set: per class", "", *_per_class_table(test), "",
              "![confusion matrix, test set](confusion_test.png)", ""]
    if catalog:
        lines += ["## Catalog-style photos: per class", "",
                  "Fashion-MNIST test items rendered as colour product photos (light background, random tint, "
                  f"scale and offset, 320-1280 px canvas, JPEG quality {catalog.get('jpeg_qualities')}; "
                  f"seed {catalog.get('seed')}); see `training/data/catalog.py`.", "",
                  *_per_class_table(catalog), "", "![confusion matrix, catalog-style photos](confusion_catalog.png)",
                  ""]
    lines += _feedback_lines(meta, report.get("feedback_holdout"))
    extras = dict(extras or {})
    calibration = extras.pop(confidence.CALIBRATION, None)
    for name, data in extras.items():
        lines += _json_block(EXTRAS.get(name, name.removesuffix(".json")), data)
    lines += confidence.section(calibration, report.get("confident_eval")
                                or extras.get("classify_eval.json", {}).get("confident_eval"))
    return "\n".join(lines)


def _feedback_lines(meta: dict, holdout: dict | None) -> list[str]:
    """Retraining on callers' feedback (training.retrain): what was added to training, how the held-out
    feedback scores."""
    if not meta.get("extra_data") and holdout is None:
        return []
    lines = ["## Callers' feedback", ""]
    if meta.get("extra_data"):
        lines += [f"Trained on `{meta.get('data', '')}` plus the feedback photos of `{meta['extra_data']}` "
                  "(SubmitFeedback, exported by `python -m training.feedback export`); the test set above is "
                  "untouched by it.", ""]
    if holdout is not None and holdout["count"]:
        lines += [f"Feedback held out of training (`{holdout['source']}`, chosen by image hash): top-1 "
                  f"{_pct(holdout['top1'])}, top-5 {_pct(holdout.get('top5'))}.", "", *_per_class_table(holdout), ""]
    elif holdout is not None:
        lines += [f"No feedback was held out (`{holdout['source']}` is empty): too few photos yet.", ""]
    return lines


def write_model_card(out: Path, run: dict, report: dict) -> Path:
    extras = {name: json.loads((out / name).read_text()) for name in (*EXTRAS, confidence.CALIBRATION)
              if (out / name).exists()}
    path = out / "MODEL_CARD.md"
    path.write_text(render(run, report, extras))
    return path
