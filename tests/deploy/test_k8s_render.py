"""Every overlay x component combination renders and every object is valid against the Kubernetes schemas.

Schemas: the ones bundled in ``kubernetes-validate`` (offline), strict mode (unknown fields fail),
for the oldest Kubernetes deploy/README.md supports and the newest the package knows. The
prometheus-operator kinds have no bundled schema; their structure is checked here and their
content in test_k8s_monitoring.py.
"""
from __future__ import annotations

import json
import os
import subprocess

import kubernetes_validate
import pytest
import yaml
from k8s_manifests import (
    COMBINATIONS,
    COMPONENTS,
    DEFAULT_COMPONENTS,
    K8S,
    NAMESPACE,
    REPO_ROOT,
    combination_id,
    find,
    load_tool,
    of_kind,
    render,
)
from kubernetes_validate.utils import latest_version

OLDEST_SUPPORTED = "1.29"  # deploy/README.md, prerequisites
K8S_VERSIONS = (OLDEST_SUPPORTED, latest_version())
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace"}
_VALID: set[tuple[str, str]] = set()


@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_combination_renders_valid_objects(combination: tuple) -> None:
    overlay, components = combination
    objects = render(overlay, components)
    assert {"Deployment", "Service", "Namespace"} <= {o["kind"] for o in objects}
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], name
        else:
            # Components are rendered outside the base's namespace transformer: each object names it.
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{name} is not in namespace {NAMESPACE}"
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", name
            assert isinstance(obj.get("spec"), dict) and obj["spec"], name
            continue
        for version in K8S_VERSIONS:
            key = (version, json.dumps(obj, sort_keys=True))
            if key in _VALID:  # most objects are the same in many combinations
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name} is invalid for Kubernetes {version}: {error.message} at {list(error.path)}")
            _VALID.add(key)


def test_every_component_is_in_the_combinations() -> None:
    """A new component folder is rendered and validated with all the others (k8s_manifests.COMPONENTS)."""
    folders = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert folders == set(COMPONENTS)
    assert all((K8S / "components" / name / "README.md").is_file() for name in folders), "each has a README"


def test_schema_validation_rejects_a_typo() -> None:
    """The validator is strict: a misspelt field fails (so the test above can fail)."""
    deployment = find(render("cpu"), "Deployment", "gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_make_deploy_dry_run_prints_the_overlay_without_a_cluster() -> None:
    """``make deploy DRY_RUN=1 OVERLAY=gpu`` prints the gpu overlay with the default components, the in-cluster
    catalog database among them."""
    result = subprocess.run(["make", "--no-print-directory", "deploy", "DRY_RUN=1", "OVERLAY=gpu"], cwd=REPO_ROOT,
                            env={**os.environ, "KUBECONFIG": "/nonexistent"}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    printed = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert printed == render("gpu", DEFAULT_COMPONENTS)
    assert find(printed, "StatefulSet", "postgres")
    triton = find(printed, "Deployment", "triton")
    assert "--model-config-name=gpu" in triton["spec"]["template"]["spec"]["containers"][0]["args"]


def test_make_deploy_dry_run_defaults_to_cpu() -> None:
    result = subprocess.run(["make", "--no-print-directory", "deploy", "DRY_RUN=1", "COMPONENTS="],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert [doc for doc in yaml.safe_load_all(result.stdout) if doc] == render("cpu")


def test_make_deploy_without_dry_run_asks_for_the_registry() -> None:
    result = subprocess.run(["make", "--no-print-directory", "deploy", "REGISTRY=", "KUBECTL=false"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "set REGISTRY" in result.stderr


def test_render_sets_images_and_model_source() -> None:
    text = load_tool("render").render("cpu", [], registry="registry.example.com/acme/", tag="1.4.0",
                                      models_url="s3://acme-models/shopvision/v7", s3_endpoint="http://minio:9000")
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    for service in ("gateway", "preprocess"):
        image = find(objects, "Deployment", service)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == f"registry.example.com/acme/shopvision-{service}:1.4.0"
    sources = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("triton-model-source")]
    assert len(sources) == 1
    assert sources[0]["data"]["MODEL_REPOSITORY_URL"] == "s3://acme-models/shopvision/v7"
    assert sources[0]["data"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # The hash suffix changes with the data, so a new model URL rolls the Triton pods.
    triton = find(objects, "Deployment", "triton")
    refs = json.dumps(triton["spec"]["template"]["spec"]["initContainers"][0]["envFrom"])
    assert sources[0]["metadata"]["name"] in refs
    base = [o for o in of_kind(render("cpu"), "ConfigMap") if o["metadata"]["name"].startswith("triton-model-source")]
    assert base[0]["metadata"]["name"] != sources[0]["metadata"]["name"]


def test_render_refuses_unknown_overlay_and_non_s3_urls() -> None:
    tool = load_tool("render")
    with pytest.raises(tool.RenderError, match="cpu, gpu"):
        tool.render("arm", [])
    with pytest.raises(tool.RenderError, match="s3://"):
        tool.render("cpu", [], models_url="https://example.com/models")
