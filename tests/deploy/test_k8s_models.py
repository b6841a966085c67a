"""Model delivery: model_repository/ is staged with a manifest, and the Triton init container's script
(deploy/k8s/base/config/fetch-models.sh, run here with sh) fetches, verifies and installs overlay configs.

The object store is a folder, and ``aws`` a stand-in script that copies from it: the script under test
is the real one, the transfer is not.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from k8s_manifests import K8S, REPO_ROOT, config_map_by_prefix, container, container_env, find, load_tool, render

from devstack.stack import Ports
from services.triton.config import TritonConfig
from services.triton.launcher import command, environment, prepare_backend_directory

FETCH = K8S / "base" / "config" / "fetch-models.sh"
GPU_CONFIGS = K8S / "overlays" / "gpu" / "model-configs"
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
FAKE_AWS = """#!/bin/sh
# Stand-in for the aws CLI: "aws s3 sync [--flags] s3://BUCKET/PATH/ DEST/" copies $FAKE_S3/BUCKET/PATH.
echo "$*" >> "$HOME/aws-calls"
case "$1 $2" in
  "configure set") exit 0 ;;
  "s3 sync") shift 2
    while [ "${1#--}" != "$1" ]; do shift; done
    src="$FAKE_S3/${1#s3://}"
    [ -d "$src" ] || { echo "fatal error: NoSuchBucket $1" >&2; exit 1; }
    mkdir -p "$2" && cp -R "$src/." "$2" ;;
  *) echo "unexpected aws call: $*" >&2; exit 3 ;;
esac
"""


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    """A staged model repository published at s3://models/shopvision/v1 of the stand-in store."""
    staged = tmp_path / "s3" / "models" / "shopvision" / "v1"
    load_tool("stage_models").stage(MODEL_REPOSITORY, staged)
    return staged


def fetch(tmp_path: Path, url: str = "s3://models/shopvision/v1", run: str = "pod",
          **env: str) -> subprocess.CompletedProcess:
    """Run the init script as a fresh pod would (empty /models), against the stand-in store."""
    pod = tmp_path / run
    (pod / "bin").mkdir(parents=True)
    (pod / "home").mkdir()
    (pod / "bin" / "aws").write_text(FAKE_AWS)
    (pod / "bin" / "aws").chmod(stat.S_IRWXU)
    full_env = {"PATH": f"{pod / 'bin'}:{os.environ['PATH']}", "HOME": str(pod / "home"),
                "FAKE_S3": str(tmp_path / "s3"), "MODEL_REPOSITORY_URL": url, "MODEL_DIR": str(pod / "models"),
                "MODEL_CONFIGS_DIR": str(pod / "no-configs"), **env}
    return subprocess.run(["sh", str(FETCH)], env=full_env, capture_output=True, text=True, timeout=60, check=False)


def test_staged_repository_is_the_local_one_plus_manifest(bucket: Path) -> None:
    shipped = sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())
    local = sorted(str(p.relative_to(MODEL_REPOSITORY)) for p in MODEL_REPOSITORY.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."))
    assert [f for f in shipped if f != "MANIFEST.sha256" and not f.endswith("/.keep")] == local
    for name in local:
        assert (bucket / name).read_bytes() == (MODEL_REPOSITORY / name).read_bytes()
    # Object stores have no empty folders: the ensemble's version folder carries a placeholder.
    for version in MODEL_REPOSITORY.glob("*/[0-9]*"):
        assert any((bucket / version.relative_to(MODEL_REPOSITORY)).iterdir()), version
    listed = [line.split("  ", 1)[1] for line in (bucket / "MANIFEST.sha256").read_text().splitlines()]
    assert listed == [f for f in shipped if f != "MANIFEST.sha256"]


def test_staging_refuses_a_model_without_weights(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    tool = load_tool("stage_models")
    with pytest.raises(tool.StageError, match="make models"):
        tool.stage(repository, tmp_path / "out")


def test_init_container_fetches_and_verifies(tmp_path: Path, bucket: Path) -> None:
    result = fetch(tmp_path)
    assert result.returncode == 0, result.stderr
    models = tmp_path / "pod" / "models"
    for file in (p for p in bucket.rglob("*") if p.is_file()):
        assert (models / file.relative_to(bucket)).read_bytes() == file.read_bytes()
    assert not list(models.glob("*/configs")), "no overlay configs without MODEL_CONFIG_NAME"
    calls = (tmp_path / "pod" / "home" / "aws-calls").read_text()
    assert "s3 sync --no-progress --only-show-errors s3://models/shopvision/v1/" in calls


def test_init_container_installs_the_gpu_configs(tmp_path: Path, bucket: Path) -> None:
    result = fetch(tmp_path, MODEL_CONFIG_NAME="gpu", MODEL_CONFIGS_DIR=str(GPU_CONFIGS),
                   S3_ADDRESSING_STYLE="path")
    assert result.returncode == 0, result.stderr
    files = sorted(GPU_CONFIGS.glob("*.pbtxt"))
    assert files
    for file in files:
        installed = tmp_path / "pod" / "models" / file.stem / "configs" / "gpu.pbtxt"
        assert installed.read_bytes() == file.read_bytes()
    assert "configure set default.s3.addressing_style path" in (tmp_path / "pod" / "home" / "aws-calls").read_text()


def test_init_container_fails_on_a_corrupt_or_unpublished_repository(tmp_path: Path, bucket: Path) -> None:
    onnx = next(bucket.rglob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1])
    corrupt = fetch(tmp_path, run="corrupt")
    assert corrupt.returncode != 0 and "FAILED" in corrupt.stdout + corrupt.stderr
    (bucket / "MANIFEST.sha256").unlink()
    unpublished = fetch(tmp_path, run="unpublished")
    assert unpublished.returncode != 0 and "make models-push" in unpublished.stderr
    missing = fetch(tmp_path, url="s3://models/shopvision/v2", run="missing")
    assert missing.returncode != 0 and "NoSuchBucket" in missing.stderr


def test_init_container_refuses_a_config_for_an_unknown_model(tmp_path: Path, bucket: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "no_such_model.pbtxt").write_text('name: "no_such_model"\n')
    result = fetch(tmp_path, MODEL_CONFIG_NAME="gpu", MODEL_CONFIGS_DIR=str(configs))
    assert result.returncode == 1 and "no_such_model" in result.stderr


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_init_container_environment_is_what_the_script_reads(overlay: str) -> None:
    """Every variable the script reads comes from the pod spec or is optional, and no key is unused."""
    objects = render(overlay)
    init = container(find(objects, "Deployment", "triton"), "fetch-models", init=True)
    env = container_env(objects, init)
    script = FETCH.read_text()
    assigned = set(re.findall(r"^\s*([A-Z][A-Z0-9_]*)=", script, re.MULTILINE))
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) - assigned
    optional = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", script)) | {"HOME"}
    assert read - optional <= set(env), f"not set: {sorted(read - optional - set(env))}"
    source = config_map_by_prefix(objects, "triton-model-source")["data"]
    # AWS_REGION is read by the aws CLI itself.
    assert set(source) - {"AWS_REGION"} <= read, f"unused: {sorted(set(source) - read)}"
    scripts = config_map_by_prefix(objects, "triton-scripts")["data"]
    assert scripts == {"fetch-models.sh": script}
    assert init["command"] == ["/bin/sh", "/scripts/fetch-models.sh"]


@pytest.mark.slow  # starts Triton on the fetched repository (~12 s)
def test_triton_serves_the_fetched_repository_with_an_overlay_config(tmp_path: Path, bucket: Path) -> None:
    """The real Triton (2.51, the NGC release's) loads what the init container leaves in /models, the
    models the Deployment names, and takes <model>/configs/<name>.pbtxt with --model-config-name."""
    classifier = "efficientnet_lite0_imagenet_onnx"
    base = (MODEL_REPOSITORY / classifier / "config.pbtxt").read_text()
    match = re.search(r"count: (\d+) kind: KIND_CPU", base)
    assert match, "the classifier's config has no CPU instance group"
    configs = tmp_path / "configs"
    configs.mkdir()
    # A CPU stand-in for the gpu overlay's config (no GPU here): only the instance count differs.
    more = f"count: {int(match.group(1)) + 1} kind: KIND_CPU"
    (configs / f"{classifier}.pbtxt").write_text(base.replace(match.group(0), more))
    assert fetch(tmp_path, MODEL_CONFIG_NAME="k8s", MODEL_CONFIGS_DIR=str(configs)).returncode == 0
    args = container(find(render("gpu"), "Deployment", "triton"))["args"]
    load = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
    ports = Ports.free()
    config = TritonConfig.from_env({
        "TRITON_MODEL_REPOSITORY": str(tmp_path / "pod" / "models"),
        "TRITON_BACKEND_DIRECTORY": str(tmp_path / "backends"), "TRITON_HTTP_PORT": str(ports.triton_http),
        "TRITON_GRPC_PORT": str(ports.triton_grpc), "TRITON_METRICS_PORT": str(ports.triton_metrics),
        "TRITON_LOAD_MODELS": ",".join(load)})
    prepare_backend_directory(config.backend_directory)
    log = (tmp_path / "triton.log").open("wb")
    server = subprocess.Popen([*command(config), "--model-config-name=k8s"], env=environment(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports.triton_http}/v2"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Triton did not become ready"
            try:
                with urllib.request.urlopen(f"{url}/health/ready", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        for model in load:
            with urllib.request.urlopen(f"{url}/models/{model}/ready", timeout=5) as reply:
                assert reply.status == 200, model
        with urllib.request.urlopen(f"{url}/models/{classifier}/config", timeout=5) as reply:
            assert json.load(reply)["instance_group"][0]["count"] == int(match.group(1)) + 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
