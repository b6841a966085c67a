"""Render one overlay with optional components, images and model source to stdout (no cluster needed).

    python deploy/k8s/tools/render.py --overlay cpu --component monitoring --component network-policy \\
        --registry ghcr.io/acme --tag 1.4.0 --models-url s3://acme-models/shopvision/2024-11-02

``make deploy`` pipes this into ``kubectl apply``; ``make deploy DRY_RUN=1`` prints it. The tool
writes a throw-away kustomization that takes the overlay as its resource, adds the components, sets
the image names and merges the model source into the ``triton-model-source`` ConfigMap, then runs
``kubectl kustomize`` on it. Nothing in the repository changes. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

K8S_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "shopvision"
IMAGES = ("shopvision-gateway", "shopvision-preprocess")


class RenderError(RuntimeError):
    """Bad arguments or a failed ``kubectl kustomize``."""


def resolve(kind: str, value: str) -> Path:
    """A name under deploy/k8s/<kind>/ (``cpu``, ``monitoring``) or a path to a kustomization folder."""
    path = K8S_ROOT / kind / value
    if not path.is_dir():
        path = Path(value).resolve()
    if not (path / "kustomization.yaml").is_file():
        known = sorted(p.name for p in (K8S_ROOT / kind).iterdir() if (p / "kustomization.yaml").is_file())
        raise RenderError(f"{kind[:-1]} {value!r} is neither one of {', '.join(known)} nor a kustomization folder")
    return path


def kustomization(workdir: Path, overlay: Path, components: list[Path], registry: str | None,
                  tag: str | None, models_url: str | None, s3_endpoint: str | None) -> dict:
    """The wrapper kustomization (JSON is YAML); kustomize wants paths relative to its folder."""
    doc: dict = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay, workdir)],
    }
    if components:
        doc["components"] = [os.path.relpath(c, workdir) for c in components]
    if registry or tag:
        images = []
        for name in IMAGES:
            image: dict = {"name": name}
            if registry:
                image["newName"] = f"{registry.rstrip('/')}/{name}"
            if tag:
                image["newTag"] = tag
            images.append(image)
        doc["images"] = images
    literals = []
    if models_url:
        literals.append(f"MODEL_REPOSITORY_URL={models_url}")
    if s3_endpoint is not None:
        literals.append(f"AWS_ENDPOINT_URL={s3_endpoint}")
    if literals:
        doc["configMapGenerator"] = [{"name": "triton-model-source", "namespace": NAMESPACE,
                                      "behavior": "merge", "literals": literals}]
    return doc


def render(overlay: str, components: list[str], registry: str | None = None, tag: str | None = None,
           models_url: str | None = None, s3_endpoint: str | None = None, kubectl: str = "kubectl") -> str:
    """The manifests of ``overlay`` + ``components`` as one multi-document YAML string."""
    if models_url is not None and not models_url.startswith("s3://"):
        raise RenderError(f"--models-url {models_url!r} must be an s3:// URL (see deploy/README.md)")
    binary = shutil.which(kubectl)
    if binary is None:
        raise RenderError(f"{kubectl!r} is not on PATH: install kubectl >= 1.27 (it embeds kustomize v5)")
    overlay_dir = resolve("overlays", overlay)
    component_dirs = [resolve("components", c) for c in components]
    with tempfile.TemporaryDirectory(prefix="shopvision-render-") as tmp:
        workdir = Path(tmp)
        doc = kustomization(workdir, overlay_dir, component_dirs, registry, tag, models_url, s3_endpoint)
        (workdir / "kustomization.yaml").write_text(json.dumps(doc, indent=2) + "\n")
        result = subprocess.run([binary, "kustomize", str(workdir)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize failed:\n{result.stderr.strip()}")
    return result.stdout


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", default="cpu",
                        help="overlay name under deploy/k8s/overlays (cpu, gpu) or a folder (default: %(default)s)")
    parser.add_argument("--component", action="append", default=[], dest="components",
                        help="component under deploy/k8s/components, repeatable (default: none)")
    parser.add_argument("--registry", help="image registry/prefix, e.g. ghcr.io/acme (default: logical names)")
    parser.add_argument("--tag", help="image tag (default: the base's 0.1.0)")
    parser.add_argument("--models-url", help="s3:// URL of the published model repository (default: the base's)")
    parser.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS)")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(render(args.overlay, args.components, args.registry, args.tag, args.models_url,
                                args.s3_endpoint, args.kubectl))
    except RenderError as error:
        print(f"render: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
