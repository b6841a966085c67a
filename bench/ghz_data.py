"""Write the request data the ghz configs in ``bench/ghz/`` send: one real photo as a ClassifyRequest.

    python -m bench.ghz_data [--photo coffee.png] [--out-dir bench/ghz/data]

Writes ``classify.json`` (protobuf JSON, the image base64-encoded, for ghz ``data-file``) and
``classify.bin`` (the serialised message, for ghz ``binary-file``). The photo is a CC0 sample
from scikit-image, re-encoded as a JPEG (quality 90) the way a shop's upload usually arrives.
The files are small and committed; run this again to regenerate them.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from google.protobuf import json_format

from bench.harness.data import jpeg_of
from bench.harness.results import configure_logging
from devstack.stack import sample_photo

LOG = logging.getLogger("ghz_data")
REPO_ROOT = Path(__file__).resolve().parents[1]


def write(out_dir: Path, photo: Path, top_k: int = 5) -> tuple[Path, Path]:
    from shopvision.v1 import recognition_pb2

    request = recognition_pb2.ClassifyRequest(image=jpeg_of(photo), top_k=top_k)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, bin_path = out_dir / "classify.json", out_dir / "classify.bin"
    json_path.write_text(json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)) + "\n")
    bin_path.write_bytes(request.SerializeToString())
    return json_path, bin_path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", default="coffee.png",
                        help="scikit-image sample photo name, or a path (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=5, help="top_k in the request (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "ghz" / "data",
                        help="where to write classify.json and classify.bin (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    configure_logging()
    photo = Path(args.photo) if Path(args.photo).exists() else sample_photo(args.photo)
    for path in write(args.out_dir, photo, args.top_k):
        LOG.info("wrote %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
