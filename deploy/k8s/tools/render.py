"""Render one overlay with optional components, images and model source to stdout (no cluster needed).

    python deploy/k8s/tools/render.py --overlay cpu --component monitoring --component network-policy \\
        --component postgres --registry ghcr.io/acme --tag 1.4.0 --models-url s3://acme-models/shopvision/2024-11-02

``make deploy`` pipes this into ``kubectl apply``; ``make deploy DRY_RUN=1`` prints it. The tool
writes a throw-away kustomization that takes the overlay as its resource, adds the components, sets
the image names and merges the model source into the ``triton-model-source`` ConfigMap, then runs
``kubectl kustomize`` on it. Nothing in the repository changes. Standard library only.

The result is checked before it is printed: a gateway whose catalog is on (a non-empty
``GATEWAY_CATALOG_DATABASE_URL``) must have a database behind the URL (``check_catalog_database``).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, unquote

K8S_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "shopvision"
IMAGES = ("shopvision-gateway", "shopvision-preprocess")
CATALOG_URL = "GATEWAY_CATALOG_DATABASE_URL"
# The in-cluster database of the postgres component; the external-postgres component takes the URL from a Secret.
DATABASE_STATEFULSET = "postgres"


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
    check_catalog_database(result.stdout)
    return result.stdout


# --- The catalog check. kustomize prints block YAML in one fixed style (two-space indent, sequences at
# their key's indent, one document per object); the few fields read here are found in that text, so the
# tool needs no YAML library. tests/deploy checks these readers against PyYAML on every combination.

def documents(manifests: str) -> list[str]:
    return [doc for doc in re.split(r"^---\n", manifests, flags=re.MULTILINE) if doc.strip()]


def _scalar(text: str) -> str:
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    return text


def _block(doc: str, key: str) -> list[str]:
    """The lines under the top-level ``key:`` (more indented, or a sequence at column 0)."""
    lines = doc.splitlines()
    if f"{key}:" not in lines:
        return []
    block = []
    for line in lines[lines.index(f"{key}:") + 1:]:
        if line and not line.startswith((" ", "- ")):
            break
        block.append(line)
    return block


def identity(doc: str) -> tuple[str, str]:
    """(kind, metadata.name) of one rendered object."""
    kind = re.search(r"^kind: (.*)$", doc, flags=re.MULTILINE)
    names = [_scalar(line[len("  name:"):]) for line in _block(doc, "metadata") if line.startswith("  name: ")]
    return (_scalar(kind.group(1)) if kind else "", names[0] if names else "")


def config_map_data(doc: str) -> dict[str, str]:
    """``data`` of a ConfigMap made from env files and literals (one-line values)."""
    data = {}
    for line in _block(doc, "data"):
        match = re.fullmatch(r"  ([-._a-zA-Z0-9]+): (.*)", line)
        if match:
            data[match.group(1)] = _scalar(match.group(2))
    return data


def env_entry(doc: str, name: str) -> dict[str, str] | None:
    """The ``env`` entry called ``name`` in a workload: {"value": ...} or {"valueFrom": ""}; None if absent."""
    lines = doc.splitlines()
    for number, line in enumerate(lines):
        match = re.fullmatch(r"( *)- name: (.*)", line)
        if not match or _scalar(match.group(2)) != name:
            continue
        indent = len(match.group(1)) + 2
        entry: dict[str, str] = {}
        for sibling in lines[number + 1:]:
            if len(sibling) - len(sibling.lstrip(" ")) < indent or sibling.lstrip(" ").startswith("- "):
                break
            field = re.fullmatch(" " * indent + r"(value|valueFrom):(.*)", sibling)
            if field:
                entry[field.group(1)] = _scalar(field.group(2)) if field.group(1) == "value" else ""
        return entry
    return None


def database_hosts(url: str) -> list[str]:
    """Hosts of a libpq URL (``postgresql://user@h1:5432,h2/db?host=...``); refuses what cannot work in a pod."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise RenderError(f"{CATALOG_URL}={url!r} is not a postgresql:// URL")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    query = rest.partition("?")[2]
    userinfo, _, hosts = authority.rpartition("@")
    params = parse_qs(query)
    if ":" in userinfo or "password" in params:
        raise RenderError(f"{CATALOG_URL} holds a password, readable by anyone who may read the namespace's "
                          "ConfigMaps or pod specs: put the URL in the Secret of the external-postgres component "
                          "(or the password in PGPASSWORD from a Secret), see deploy/README.md")
    names = [re.sub(r":\d*$", "", h).strip("[]") for h in hosts.split(",") if h]
    names += [unquote(h) for value in params.get("host", []) for h in value.split(",") if h]
    if not names or any(n.startswith("/") for n in names):
        raise RenderError(f"{CATALOG_URL}={url!r} names no host: in a pod libpq would look for a Unix socket "
                          "that does not exist")
    return names


def in_namespace_service(host: str) -> str | None:
    """The Service a host name means inside this namespace (``postgres``, ``postgres.shopvision.svc...``);
    None for anything else: an address, ``localhost`` (a proxy sidecar), another namespace, a DNS name."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    parts = host.split(".")
    if len(parts) == 1:
        return None if host == "localhost" else host
    if parts[1] == NAMESPACE and (len(parts) == 2 or parts[2] == "svc"):
        return parts[0]
    return None


def check_catalog_database(manifests: str) -> None:
    """A gateway with the catalog on needs a database: refuse manifests where it has none, or two."""
    objects = {identity(doc): doc for doc in documents(manifests)}
    gateway = objects.get(("Deployment", "gateway"))
    if gateway is None:
        return
    # The value from gateway-env (envFrom), unless an env entry of the Deployment overrides it.
    url = ""
    for (kind, name), doc in objects.items():
        if kind == "ConfigMap" and re.fullmatch(r"gateway-env(-[a-z0-9]{10})?", name):
            url = config_map_data(doc).get(CATALOG_URL, "")
    entry = env_entry(gateway, CATALOG_URL)
    in_cluster = ("StatefulSet", DATABASE_STATEFULSET) in objects
    if entry is not None and "valueFrom" in entry:
        if in_cluster:
            raise RenderError(f"two catalog databases: the gateway takes {CATALOG_URL} from a Secret "
                              "(external-postgres) and the postgres component deploys one in the cluster: "
                              "choose one of the two components")
        return
    if entry is not None:
        url = entry.get("value", "")
    if not url:
        return
    services = {name for kind, name in objects if kind == "Service"}
    for host in database_hosts(url):
        service = in_namespace_service(host)
        if service is not None and service not in services:
            raise RenderError(
                f"the catalog is on ({CATALOG_URL} names host {host!r}) but no Service {service!r} is rendered: "
                "add the postgres component (the default of `make deploy`), or external-postgres for a managed "
                f"database, or set {CATALOG_URL}= (empty) in gateway-env to run without the catalog")


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
