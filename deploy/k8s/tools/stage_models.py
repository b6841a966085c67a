"""Stage the local model repository for upload to the object store the Triton pods read.

    python deploy/k8s/tools/stage_models.py --repository model_repository --out build/model-repository

``make models-push MODELS_URL=s3://...`` runs this, then ``aws s3 sync --delete``. What is shipped
is exactly ``model_repository/`` (the folder the local stack and the tests serve), minus Python
caches and hidden files, plus:

* a ``.keep`` file in every empty version folder: object stores have no empty folders, and Triton
  needs the ensemble's ``1/`` to exist;
* ``MANIFEST.sha256`` (``sha256sum`` format), which the init container checks after downloading.

It fails when a model has no ``config.pbtxt`` or no numbered version folder, or when a version of a
non-ensemble model is empty (``make models`` not run). Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from pathlib import Path

LOG = logging.getLogger("stage_models")
REPO_ROOT = Path(__file__).resolve().parents[3]
MANIFEST = "MANIFEST.sha256"
PLACEHOLDER = ".keep"


class StageError(RuntimeError):
    """The repository is not complete enough to ship."""


def shipped(path: Path) -> bool:
    return not any(part.startswith(".") or part == "__pycache__" for part in path.parts) and path.suffix != ".pyc"


def is_ensemble(config: Path) -> bool:
    return any(line.split("#")[0].replace(" ", "") == 'platform:"ensemble"'
               for line in config.read_text(encoding="utf-8").splitlines())


def check_model(model: Path) -> None:
    config = model / "config.pbtxt"
    if not config.is_file():
        raise StageError(f"{model.name}: no config.pbtxt")
    versions = [v for v in model.iterdir() if v.is_dir() and v.name.isdigit()]
    if not versions:
        raise StageError(f"{model.name}: no numbered version folder")
    if not is_ensemble(config):
        for version in versions:
            if not any(shipped(f.relative_to(version)) for f in version.rglob("*") if f.is_file()):
                raise StageError(f"{model.name}/{version.name} is empty (run `make models` first)")


def stage(repository: Path, out: Path) -> list[str]:
    """Copy ``repository`` into a fresh ``out`` and write the manifest; returns the shipped paths."""
    models = sorted(p for p in repository.iterdir() if p.is_dir() and shipped(p.relative_to(repository)))
    if not models:
        raise StageError(f"{repository} holds no model")
    for model in models:
        check_model(model)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for source in sorted(repository.rglob("*")):
        relative = source.relative_to(repository)
        if not shipped(relative):
            continue
        target = out / relative
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for model in models:
        for version in (out / model.name).iterdir():
            if version.is_dir() and version.name.isdigit() and not any(version.iterdir()):
                (version / PLACEHOLDER).write_bytes(b"")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    lines = [f"{hashlib.sha256((out / f).read_bytes()).hexdigest()}  {f}\n" for f in files]
    (out / MANIFEST).write_text("".join(lines), encoding="utf-8")
    return files


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="Triton model repository to ship (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "model-repository",
                        help="staging folder, replaced on each run (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        files = stage(args.repository, args.out)
    except StageError as error:
        LOG.error("%s", error)
        return 1
    LOG.info("staged %d files of %s in %s (with %s)", len(files), args.repository, args.out, MANIFEST)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
