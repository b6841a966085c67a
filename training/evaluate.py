"""Evaluate an exported model: the held-out test set and catalog-style photos; write the model card.

    python -m training.evaluate --run-dir runs/fashion_cnn
    python -m training.evaluate --run-dir runs/fashion_cnn --gateway 127.0.0.1:50051 --model-name fashion_cnn
    python -m training.evaluate --published model_repository/fashion_effnet/4 --gateway 127.0.0.1:50051

Reports top-1 / top-5, per-class precision / recall / F1, macro averages and
confusion matrices (PNG) for

* the test set (Fashion-MNIST ``t10k``, or ``--test-data`` for a folder / CSV),
  after the model's own recipe, as the service would see a 28×28 upload;
* catalog-style renderings of test items (see :mod:`training.data.catalog`): colour
  JPEGs of any size, light background, off-centre. Each goes through the real
  preprocessing code (``services.preprocess.imaging.preprocess``) with the
  model's recipe, or, with ``--gateway``, through the real ``Classify`` call;
* optionally (``--compare-recipes``) the catalog set under other recipes, the
  measurement the served recipe was chosen from;
* optionally (``--feedback-holdout``) the feedback held out of retraining
  (``python -m training.feedback export``'s ``holdout.csv``): callers' own photos
  with the labels they said were right, never trained on.

Writes ``eval.json``, ``MODEL_CARD.md`` and the plots into ``--output-dir``
(default: the run directory). The test set is used only here. Through Classify
the report also has ``confident_eval``: precision among the top-1 answers the
gateway marked ``confident`` and the share so marked, per class and overall.

``--published <repository>/<model>/<version>`` measures a published version on a
running stack instead: it writes ``classify_eval.json`` into that folder and
rewrites only the "Confidence thresholds" section of its (hand-edited) card.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from services.common.spec import CROPS, Spec
from training.calibrate import model_labels, version_spec
from training.data.catalog import render_set
from training.data.datasets import (
    FASHION_MNIST,
    fashion_mnist_raw,
    load_dataset,
    load_extra,
    source_labels,
    stratified_subset,
)
from training.data.uploads import encode_png, preprocess_all
from training.onnx import inference
from training.report import confidence, plots
from training.report.metrics import classification_report, softmax
from training.report.model_card import write_model_card
from training.report.runs import load_run
from training.repository.layout import write_atomic
from training.repository.recipe import spec_from_dict, spec_to_dict

LOG = logging.getLogger("evaluate")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="output directory of training.train")
    parser.add_argument("--published", type=Path, default=None,
                        help="instead of --run-dir: a published version folder <repository>/<model>/<version> to "
                             "measure through --gateway; writes its classify_eval.json and the card's confidence "
                             "section (default: none)")
    parser.add_argument("--model-file", default="model.onnx",
                        help="ONNX file inside the run directory (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None, help="(default: the run directory)")
    parser.add_argument("--name", default="", help="model name shown in the card (default: the run directory's)")
    parser.add_argument("--test-data", default="",
                        help="test set for folder / CSV runs (default: the Fashion-MNIST test set)")
    parser.add_argument("--limit-test", type=int, default=0, help="use N test images; 0 = all (default: %(default)s)")
    parser.add_argument("--catalog-count", type=int, default=2000,
                        help="catalog-style photos to render from test items; 0 = none (default: %(default)s)")
    parser.add_argument("--catalog-seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--compare-recipes", action="store_true",
                        help="also score catalog photos under every crop × background recipe")
    parser.add_argument("--compare-count", type=int, default=1000,
                        help="catalog photos used by --compare-recipes (default: %(default)s)")
    parser.add_argument("--feedback-holdout", default="",
                        help="holdout.csv of python -m training.feedback export: also report on the feedback held "
                             "out of retraining (default: none)")
    parser.add_argument("--gateway", default="",
                        help="gateway address: send every image through the real Classify call (default: in-process)")
    parser.add_argument("--model-name", default="",
                        help="served model name for --gateway (default: the --published folder's model)")
    parser.add_argument("--concurrency", type=int, default=8, help="in-flight Classify calls (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default: %(default)s)")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the CPU throughput measurement")
    return parser


@dataclass(frozen=True)
class Answers:
    """What Classify answered: scores (N, classes), whether each top-1 answer was ``confident``, and the model
    versions that answered."""

    scores: np.ndarray
    confident: np.ndarray
    versions: list[str]


def classify_all(address: str, model: str, photos: list[bytes], num_classes: int, concurrency: int) -> np.ndarray:
    """Scores (N, classes) from the real Classify call; classes outside the returned top-k score 0."""
    return classify_answers(address, model, photos, num_classes, concurrency).scores


def classify_answers(address: str, model: str, photos: list[bytes], num_classes: int, concurrency: int) -> Answers:
    """:class:`Answers` of the real Classify call for each photo."""
    import grpc
    from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

    scores = np.zeros((len(photos), num_classes), dtype=np.float32)
    confident = np.zeros(len(photos), dtype=bool)
    versions: set[str] = set()
    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

        def one(i: int) -> None:
            reply = stub.Classify(recognition_pb2.ClassifyRequest(image=photos[i], model=model,
                                                                  top_k=min(5, num_classes)), timeout=60)
            for p in reply.predictions:
                scores[i, p.class_id] = p.score
            confident[i] = bool(reply.predictions) and reply.predictions[0].confident
            versions.add(reply.model_version)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(len(photos))))
    return Answers(scores, confident, sorted(versions))


def record_confident(report: dict, section: str, answers: Answers, labels: np.ndarray,
                     classes: tuple[str, ...]) -> None:
    """``report["confident_eval"][section]``: precision among the confident top-1 answers and the share confident."""
    measured = report.setdefault("confident_eval", {"via": report["via"], "model_versions": []})
    measured["model_versions"] = sorted({*measured["model_versions"], *answers.versions})
    measured[section] = confidence.confident_report(answers.scores, answers.confident, labels, classes)
    overall = measured[section]["overall"]
    LOG.info("%s through Classify: %.1f%% of answers confident, %s of those right", section,
             100 * overall["coverage"], "n/a" if overall["precision"] is None else f"{100 * overall['precision']:.2f}%")


def score_test_set(args: argparse.Namespace, sess: ort.InferenceSession | None, spec: Spec,
                   classes: tuple[str, ...], source: str, report: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) on the held-out test set: Fashion-MNIST's as 28×28 uploads (PNG through the service's
    preprocessing or the real Classify call, which also records ``confident_eval`` in ``report``), or
    ``--test-data`` after the recipe."""
    if source == FASHION_MNIST:
        raw, labels = fashion_mnist_raw("test")
        pick = stratified_subset(labels, args.limit_test, 0)
        raw, labels = raw[pick], labels[pick]
        if args.gateway:
            answers = classify_answers(args.gateway, args.model_name, [encode_png(x) for x in raw], len(classes),
                                       args.concurrency)
            if report is not None:
                record_confident(report, "test", answers, labels, classes)
            return answers.scores, labels
        assert sess is not None
        return softmax(inference.logits(sess, preprocess_all([encode_png(x) for x in raw], spec))), labels
    if not args.test_data:
        raise SystemExit(f"the run trained on {source}: give its held-out test set with --test-data")
    all_labels, _ = source_labels(source, "test", classes)
    dataset = load_dataset(source, spec, classes=classes, indices=stratified_subset(all_labels, args.limit_test, 0))
    return softmax(inference.logits(sess, dataset.images)), dataset.labels


def compare_recipes(args: argparse.Namespace, sess: ort.InferenceSession, spec: Spec, classes: tuple[str, ...],
                    photo_bytes: list[bytes], labels: np.ndarray) -> list[dict]:
    """Catalog top-1 of a subset of the photos under every crop × background recipe."""
    subset = stratified_subset(labels, args.compare_count, 0)
    results = []
    for crop in CROPS:
        for background in ("keep", "dark"):
            variant = replace(spec, crop=crop, background=background)
            top1 = classification_report(
                softmax(inference.logits(sess, preprocess_all([photo_bytes[i] for i in subset], variant))),
                labels[subset], classes)["top1"]
            results.append({"crop": crop, "background": background, "catalog_top1": top1,
                            "served": variant == spec, "photos": len(subset)})
            LOG.info("recipe crop=%s background=%s: catalog top-1 %.2f%%", crop, background, 100 * top1)
    return results


def evaluate_catalog(args: argparse.Namespace, sess: ort.InferenceSession | None, spec: Spec,
                     classes: tuple[str, ...], report: dict, out: Path) -> None:
    """Catalog-style photos of test items, scored in-process or through Classify; fills ``report["catalog"]``
    (and ``report["recipes"]`` with ``--compare-recipes``)."""
    raw, labels = fashion_mnist_raw("test")
    pick = stratified_subset(labels, args.catalog_count, args.catalog_seed)
    start = time.perf_counter()
    photos = render_set(raw[pick], args.catalog_seed)
    photo_bytes = [p.data for p in photos]
    LOG.info("rendered %d catalog photos in %.1f s", len(photos), time.perf_counter() - start)
    if args.gateway:
        answers = classify_answers(args.gateway, args.model_name, photo_bytes, len(classes), args.concurrency)
        record_confident(report, "catalog", answers, labels[pick], classes)
        scores = answers.scores
    else:
        assert sess is not None
        scores = softmax(inference.logits(sess, preprocess_all(photo_bytes, spec)))
    report["catalog"] = classification_report(scores, labels[pick], classes)
    report["catalog"]["seed"] = args.catalog_seed
    report["catalog"]["jpeg_qualities"] = sorted({p.quality for p in photos})
    plots.confusion_matrix(np.array(report["catalog"]["confusion_matrix"]), classes,
                           out / "confusion_catalog.png", f"{report['name']}: catalog-style photos")
    LOG.info("catalog top-1 %.2f%% (%d photos)", 100 * report["catalog"]["top1"], len(photos))
    if args.compare_recipes:
        assert sess is not None
        report["recipes"] = compare_recipes(args, sess, spec, classes, photo_bytes, labels[pick])


def evaluate_feedback(args: argparse.Namespace, sess: ort.InferenceSession, spec: Spec, classes: tuple[str, ...],
                      report: dict, out: Path) -> None:
    """The held-out feedback photos through the recipe, in-process; fills ``report["feedback_holdout"]`` (only
    its ``count`` of 0 when the export held nothing out)."""
    try:
        dataset = load_extra(args.feedback_holdout, spec, classes)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"--feedback-holdout: {error}") from None
    section: dict = {"count": 0}
    if len(dataset):
        section = classification_report(softmax(inference.logits(sess, dataset.images)), dataset.labels, classes)
        plots.confusion_matrix(np.array(section["confusion_matrix"]), classes, out / "confusion_feedback.png",
                               f"{report['name']}: held-out feedback")
    section["source"] = args.feedback_holdout
    report["feedback_holdout"] = section
    LOG.info("held-out feedback: %s", f"top-1 {100 * section['top1']:.2f}% ({len(dataset)} photos)" if len(dataset)
             else "none held out")


def summary_markdown(report: dict) -> list[str]:
    catalog = report.get("catalog")
    feedback = report.get("feedback_holdout")
    return [
        f"Evaluated {report['via']}: test top-1 {100 * report['test']['top1']:.2f} % ({report['test']['count']} "
        "images)"
        + (f", catalog-style photos top-1 {100 * catalog['top1']:.2f} % ({catalog['count']} JPEGs)" if catalog else "")
        + (f", held-out feedback top-1 {100 * feedback['top1']:.2f} % ({feedback['count']} photos)"
           if feedback and feedback["count"] else "")
        + "."]


def evaluate_published(args: argparse.Namespace) -> dict:
    """``--published``: the version's test set and catalog photos through the running gateway's Classify; writes
    ``classify_eval.json`` into the version folder and refreshes its card's confidence section."""
    folder = args.published
    model, repository = folder.parent.name, folder.parent.parent
    if not args.gateway:
        raise SystemExit("--published measures through the running stack: give --gateway")
    if args.compare_recipes or args.feedback_holdout or args.test_data:
        raise SystemExit("--published sends the Fashion-MNIST test set and catalog photos through Classify; "
                         "--compare-recipes, --feedback-holdout and --test-data run in-process: use --run-dir")
    args = argparse.Namespace(**{**vars(args), "model_name": args.model_name or model})
    spec = version_spec(repository, model, int(folder.name))
    classes = model_labels(repository, model)
    spec_file = folder / "spec.json"
    model_file = json.loads(spec_file.read_text()).get("model_file", "") if spec_file.exists() else ""
    report: dict = {"name": f"{model} v{folder.name}", "model_file": model_file,
                    "via": f"Classify via {args.gateway} (model {args.model_name})",
                    "recipe": spec_to_dict(spec),
                    "classes": list(classes)}
    test_source = FASHION_MNIST
    # The plots of a published version are its in-process evaluation's; these go to a scratch folder.
    with tempfile.TemporaryDirectory() as scratch:
        scores, labels = score_test_set(args, None, spec, classes, test_source, report)
        report["test"] = classification_report(scores, labels, classes)
        report["test"]["source"] = test_source
        if args.catalog_count:
            evaluate_catalog(args, None, spec, classes, report, Path(scratch))
    LOG.info("test top-1 through Classify %.2f%% (%d images)", 100 * report["test"]["top1"], len(labels))
    report["markdown"] = summary_markdown(report)
    write_atomic(folder / "classify_eval.json", json.dumps(report, indent=2) + "\n")
    card = confidence.refresh(folder)
    LOG.info("wrote %s%s", folder / "classify_eval.json", f" and the confidence section of {card}" if card else "")
    return report


def main(args: argparse.Namespace) -> dict:
    cv2.setNumThreads(args.threads)
    if args.published:
        return evaluate_published(args)
    if not args.run_dir:
        raise SystemExit("give --run-dir (a training.train output directory) or --published")
    run = load_run(args.run_dir)
    meta = run["meta"]
    spec = spec_from_dict(meta["spec"])
    classes = tuple(meta["classes"])
    out = args.output_dir or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    sess = inference.session(args.run_dir / args.model_file, args.threads)
    via = f"Classify via {args.gateway} (model {args.model_name})" if args.gateway else \
        "in-process: services.preprocess.imaging + ONNX Runtime"
    report: dict = {"name": args.name or args.run_dir.name, "model_file": args.model_file, "via": via,
                    "recipe": meta["spec"], "classes": list(classes)}

    test_source = args.test_data or meta.get("data", FASHION_MNIST)
    scores, labels = score_test_set(args, sess, spec, classes, test_source, report)
    report["test"] = classification_report(scores, labels, classes)
    report["test"]["source"] = test_source
    plots.confusion_matrix(np.array(report["test"]["confusion_matrix"]), classes, out / "confusion_test.png",
                           f"{report['name']}: test set")
    LOG.info("test top-1 %.2f%% top-5 %.2f%% (%d images)", 100 * report["test"]["top1"],
             100 * report["test"]["top5"], len(labels))
    if args.catalog_count and test_source == FASHION_MNIST:
        evaluate_catalog(args, sess, spec, classes, report, out)
    if args.feedback_holdout:
        evaluate_feedback(args, sess, spec, classes, report, out)
    if not args.no_benchmark:
        images = np.zeros((64, spec.height, spec.width, spec.channels), dtype=np.uint8)
        report["cpu_throughput"] = {
            "threads": args.threads,
            "batch_1_img_s": inference.throughput(sess, images, 1, 1.0),
            "batch_64_img_s": inference.throughput(sess, images, 64, 1.0),
        }
    report["markdown"] = summary_markdown(report)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    write_model_card(out, run, report)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
