"""Feedback from ``SubmitFeedback`` as training data: export one model's corrections as images + CSV manifests.

    python -m training.feedback export --model fashion_cnn --output runs/feedback/fashion_cnn
    python -m training.feedback export --model fashion_cnn --output DIR --since 2026-12-01T00:00:00Z
    python -m training.feedback count [--model fashion_cnn] [--since 2026-12-01]

``export`` writes into ``--output``:

* ``images/<sha256>.<ext>``: each distinct photo once, named by its content hash (files already there are kept);
* ``manifest.csv`` (``path,label``, paths relative to the CSV): the feedback to train on, as
  ``python -m training.train --extra-data`` (or ``--data``) takes any catalog manifest;
* ``holdout.csv``: the feedback held out for evaluation (``training.evaluate --feedback-holdout``). A photo is
  held out when its hash falls under ``--holdout-fraction``: the choice depends on the photo alone, so every
  re-export (and every ``--since``) puts the same photo on the same side;
* ``export.json``: what was exported (counts per label, the newest feedback time for the next ``--since``).

De-duplicated by image hash: a photo is exported once; when it received different labels, the latest wins
(a later correction overrides an earlier one) and the conflict is counted. Reads the catalog database
(``--database-url``, default ``$GATEWAY_CATALOG_DATABASE_URL``) through the gateway's own feedback queries.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from psycopg_pool import PoolTimeout

from services.common.config import env_str
from services.gateway.catalog.store import CatalogStore
from services.gateway.config import DEFAULT_DATABASE_URL
from services.gateway.feedback import FeedbackRow, FeedbackStore
from services.preprocess.formats import sniff_format

LOG = logging.getLogger("feedback")
MANIFEST = "manifest.csv"
HOLDOUT = "holdout.csv"
SUMMARY = "export.json"
IMAGES = "images"
PROGRESS_EVERY = 500


@dataclass(frozen=True)
class Entry:
    """One exported photo: its hash, the label it is trained on, when that label was given, which side."""

    sha256: bytes
    label: str
    created_at: datetime
    held_out: bool


def iso_time(text: str) -> datetime:
    """An ISO-8601 time for ``--since``; a date or a time without a zone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time, e.g. 2026-12-01T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=env_str("GATEWAY_CATALOG_DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="catalog database holding the feedback (default: $GATEWAY_CATALOG_DATABASE_URL or the "
                             "one make run starts)")
    common.add_argument("--since", type=iso_time, default=None,
                        help="only feedback given at or after this ISO-8601 time (default: all)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,count}")
    export = commands.add_parser("export", parents=[common], help="write images + manifest.csv + holdout.csv",
                                 description="Write one model's feedback as images/, manifest.csv, holdout.csv "
                                             "and export.json (see python -m training.feedback --help).")
    export.add_argument("--model", required=True, help="public model name the feedback was given for")
    export.add_argument("--output", type=Path, required=True, help="folder to write (created if missing)")
    export.add_argument("--holdout-fraction", type=fraction, default=0.2,
                        help="share of the photos held out for evaluation, chosen by image hash "
                             "(default: %(default)s)")
    count = commands.add_parser("count", parents=[common], help="feedback per model and label",
                                description="Log the number of feedback per model and label.")
    count.add_argument("--model", default="", help="only this model (default: every model)")
    return parser


def held_out(digest: bytes, share: float) -> bool:
    """Whether the photo of ``digest`` is held out: its hash as a number in [0, 1) below ``share``."""
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def plan(rows: list[FeedbackRow], share: float) -> tuple[list[Entry], int]:
    """One entry per distinct photo (the latest label wins; ``rows`` are oldest first), in the order the photos
    were first corrected, and the number of photos whose labels disagreed."""
    latest: dict[bytes, FeedbackRow] = {}
    labels: dict[bytes, set[str]] = {}
    for row in rows:
        latest[row.image_sha256] = row  # a photo keeps the position of its first correction
        labels.setdefault(row.image_sha256, set()).add(row.label)
    conflicts = sum(1 for seen in labels.values() if len(seen) > 1)
    entries = [Entry(digest, row.label, row.created_at, held_out(digest, share)) for digest, row in latest.items()]
    return entries, conflicts


def image_name(digest: bytes, data: bytes) -> str:
    fmt = sniff_format(data)
    return f"{digest.hex()}.{'jpg' if fmt == 'jpeg' else fmt or 'bin'}"


async def write_images(store: FeedbackStore, entries: list[Entry], folder: Path) -> dict[bytes, str]:
    """Every entry's photo under ``folder`` (read from the database only when not already exported);
    the file name of each hash, relative to the output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = {path.stem: path.name for path in folder.iterdir() if path.is_file()}
    names = {e.sha256: f"{IMAGES}/{existing[e.sha256.hex()]}" for e in entries if e.sha256.hex() in existing}
    missing = [e.sha256 for e in entries if e.sha256 not in names]
    started = time.perf_counter()
    for start in range(0, len(missing), PROGRESS_EVERY):
        photos = await store.images(missing[start:start + PROGRESS_EVERY])
        for digest, data in photos.items():
            name = image_name(digest, data)
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(folder / name)  # a file under its final name is always whole
            names[digest] = f"{IMAGES}/{name}"
        LOG.info("photos: %d / %d written (%.1f s)", min(start + PROGRESS_EVERY, len(missing)), len(missing),
                 time.perf_counter() - started)
    lost = [e for e in entries if e.sha256 not in names]
    if lost:
        raise SystemExit(f"{len(lost)} feedback photos are missing from the images table (first: "
                         f"{lost[0].sha256.hex()})")
    return names


def write_manifest(path: Path, entries: list[Entry], names: dict[bytes, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label"))
        writer.writerows((names[e.sha256], e.label) for e in entries)
    tmp.replace(path)


async def export(store: FeedbackStore, args: argparse.Namespace) -> dict:
    """Write the export of ``args.model`` into ``args.output``; returns what ``export.json`` records."""
    out: Path = args.output
    rows = await store.rows(args.model, args.since)
    LOG.info("%d feedback rows for model %s%s", len(rows), args.model,
             f" since {args.since.isoformat()}" if args.since else "")
    entries, conflicts = plan(rows, args.holdout_fraction)
    names = await write_images(store, entries, out / IMAGES)
    train = [e for e in entries if not e.held_out]
    holdout = [e for e in entries if e.held_out]
    write_manifest(out / MANIFEST, train, names)
    write_manifest(out / HOLDOUT, holdout, names)
    summary = {
        "model": args.model, "since": args.since.isoformat() if args.since else None,
        "exported_at": datetime.now(UTC).isoformat(), "feedback_rows": len(rows), "photos": len(entries),
        "duplicates_dropped": len(rows) - len(entries), "label_conflicts": conflicts,
        "holdout_fraction": args.holdout_fraction, "train": len(train), "holdout": len(holdout),
        "train_labels": dict(sorted(Counter(e.label for e in train).items())),
        "holdout_labels": dict(sorted(Counter(e.label for e in holdout).items())),
        "newest": max((e.created_at for e in entries), default=None),
    }
    summary["newest"] = summary["newest"].isoformat() if summary["newest"] else None
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    LOG.info("exported %d photos of %s to %s: %d to train on (%s), %d held out (%s); %d duplicates dropped, "
             "%d photos with conflicting labels (latest kept)", len(entries), args.model, out, len(train), MANIFEST,
             len(holdout), HOLDOUT, summary["duplicates_dropped"], conflicts)
    return summary


async def count(store: FeedbackStore, args: argparse.Namespace) -> dict:
    found: dict[str, dict[str, int]] = {}
    for model, label, number in await store.counts(args.since):
        if not args.model or model == args.model:
            found.setdefault(model, {})[label] = number
    for model, labels in found.items():
        LOG.info("%s: %d feedback (%s)", model, sum(labels.values()),
                 ", ".join(f"{label} {number}" for label, number in labels.items()))
    if not found:
        LOG.info("no feedback%s", f" for model {args.model}" if args.model else "")
    return found


async def run(args: argparse.Namespace) -> dict:
    catalog = CatalogStore(args.database_url)
    try:
        await catalog.pool.open(wait=True, timeout=30)
    except PoolTimeout:
        raise SystemExit("cannot reach the feedback database (--database-url): is PostgreSQL running?") from None
    try:
        store = FeedbackStore(catalog)
        return await (export(store, args) if args.command == "export" else count(store, args))
    finally:
        await catalog.close()


def main(args: argparse.Namespace) -> dict:
    return asyncio.run(run(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
