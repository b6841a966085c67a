"""Render the Kubernetes manifests (every overlay x component combination) and look objects up in them.

Rendering goes through ``deploy/k8s/tools/render.py``, the code path of ``make deploy``; each
combination is rendered once per test session.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "deploy" / "k8s"
NAMESPACE = "shopvision"
OVERLAYS = ("cpu", "gpu")
FEATURES = ("monitoring", "network-policy", "custom-metrics")
# The catalog database: in the cluster, managed outside it, or none (catalog off). One at most: render.py
# refuses both (test_k8s_postgres.py).
DATABASES = ("postgres", "external-postgres")
COMPONENTS = (*FEATURES, *DATABASES)
COMBINATIONS = [(overlay, (*subset, *database)) for overlay in OVERLAYS
                for n in range(len(FEATURES) + 1) for subset in itertools.combinations(FEATURES, n)
                for database in ((), *((d,) for d in DATABASES))]
# What `make deploy` applies unless told otherwise (the Makefile's COMPONENTS).
DEFAULT_COMPONENTS = ("monitoring", "network-policy", "postgres")
SERVICES = ("gateway", "preprocess")  # our images; Triton is NVIDIA's

Obj = dict[str, Any]


def combination_id(value: tuple) -> str:
    overlay, components = value
    return "+".join((overlay, *components))


@functools.cache
def load_tool(name: str) -> ModuleType:
    """A module of deploy/k8s/tools/ (they are scripts, not a package)."""
    path = K8S / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"k8s_tools_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@functools.cache
def _render_text(overlay: str, components: tuple[str, ...]) -> str:
    return load_tool("render").render(overlay, list(components))


def rendered_text(overlay: str, components: tuple[str, ...] = ()) -> str:
    """The YAML text `make deploy` would apply."""
    return _render_text(overlay, tuple(components))


def render(overlay: str, components: tuple[str, ...] = ()) -> list[Obj]:
    """Fresh parsed objects (callers may mutate them)."""
    return [doc for doc in yaml.safe_load_all(_render_text(overlay, tuple(components))) if doc]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: list[Obj]) -> list[Obj]:
    """Deployments and StatefulSets: everything that runs pods."""
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def container(deployment: Obj, name: str | None = None, init: bool = False) -> Obj:
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("initContainers" if init else "containers", [])
    name = name or deployment["metadata"]["name"]
    matches = [c for c in containers if c["name"] == name]
    assert len(matches) == 1, f"{deployment['metadata']['name']} has no container {name}"
    return matches[0]


def all_containers(deployment: Obj) -> list[tuple[Obj, bool]]:
    spec = deployment["spec"]["template"]["spec"]
    return [(c, True) for c in spec.get("initContainers", [])] + [(c, False) for c in spec["containers"]]


def config_map_by_prefix(objects: list[Obj], name: str) -> Obj:
    """A ConfigMap made by a configMapGenerator (``name-<hash>``) or a plain one."""
    matches = [o for o in of_kind(objects, "ConfigMap")
               if re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one ConfigMap {name}[-hash], found {len(matches)}"
    return matches[0]


def container_env(objects: list[Obj], c: Obj) -> dict[str, str | None]:
    """The environment a container sees: envFrom ConfigMaps, then env. Values taken from a Secret
    (``valueFrom``) are None: they exist only in the cluster."""
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in c.get("env", []):
        env[item["name"]] = None if "valueFrom" in item else item.get("value", "")
    return env


def known_env(env: dict[str, str | None]) -> dict[str, str]:
    """The values known before deployment (what a service's ``from_env`` can parse here)."""
    return {name: value for name, value in env.items() if value is not None}


def named_port(c: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name!r}"
    return ports[name]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def env_names_read(config_py: Path, prefix: str) -> set[str]:
    """Variable names a service's config.py reads: string constants ``PREFIX_...`` passed as the first
    argument of a call (``env_str("GATEWAY_ADDRESS", ...)``, or a helper that wraps it)."""
    names = set()
    for node in ast.walk(ast.parse(config_py.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            value = node.args[0].value
            if isinstance(value, str) and re.fullmatch(re.escape(prefix) + r"[A-Z0-9_]+", value):
                names.add(value)
    return names


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
