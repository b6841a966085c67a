"""``make retrain MODEL=fashion_cnn`` at smoke scale on a private stack: feedback sent with SubmitFeedback is
exported, trained on with the base data, evaluated on the test split and on the feedback held out, and the result
is published as a canary (the candidate ``fashion_cnn__candidate``), never straight to 100 %."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest
import tritonclient.grpc as grpcclient
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Ports, Stack
from services.common import model_params
from tests.lifecycle.feedback_helpers import fashion_photos, noisy, submit
from training.repository import layout as repo

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MODEL = "fashion_cnn"
REPOSITORY = REPO_ROOT / "model_repository"


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own (PostgreSQL too) over a copy of fashion_cnn's part of the repository."""
    base = tmp_path_factory.mktemp("retrain")
    repository = base / "model_repository"
    for name in ("postprocess_softmax", MODEL, repo.classifier_name(MODEL)):
        shutil.copytree(REPOSITORY / name, repository / name, ignore=shutil.ignore_patterns("__pycache__"))
    stack = Stack(ports=Ports.free(), model_repository=repository, log_dir=base / "logs",
                  postgres_dir=base / "postgres", extra_env={"GATEWAY_DEFAULT_MODEL": MODEL})
    stack.start()
    yield stack
    stack.stop()


def test_make_retrain_smoke_ends_in_a_canary(private_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    repository = private_stack.model_repository
    served_config = (repository / MODEL / "config.pbtxt").read_text()
    served_versions = repo.versions(repository / MODEL)
    with grpc.insecure_channel(private_stack.gateway_address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        for i, (photo, label) in enumerate(fashion_photos(40, seed=31)):
            submit(stub, noisy(photo, 200 + i), label, MODEL)
    out = tmp_path_factory.mktemp("retrain-run")
    env = {**os.environ, "GATEWAY_CATALOG_DATABASE_URL": private_stack.postgres_url}
    done = subprocess.run(
        ["make", "--no-print-directory", "retrain", f"MODEL={MODEL}",
         f"RETRAIN_TRITON={private_stack.triton_grpc_address}",
         f"RETRAIN_ARGS=--smoke --repository {repository} --output-dir {out}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    summary = json.loads((out / "retrain.json").read_text())
    assert summary["feedback"]["photos"] == 40 and summary["feedback"]["holdout"] > 0
    report = json.loads((out / "run" / "eval.json").read_text())
    assert report["test"]["count"] == 300 and report["test"]["source"] == "fashion-mnist"
    assert report["feedback_holdout"]["count"] == summary["feedback"]["holdout"]
    card = (out / "run" / "MODEL_CARD.md").read_text()
    assert "held-out feedback top-1" in card and "Callers' feedback" in card

    # A canary: the candidate holds the new version; the served model is as it was.
    candidate = model_params.candidate_name(MODEL)
    version = summary["published"]["version"]
    assert summary["published"]["canary_percent"] == 10.0
    assert (repository / candidate / str(version)).is_dir()
    candidate_config = (repository / candidate / "config.pbtxt").read_text()
    assert "canary" in candidate_config and model_params.CANARY_PERCENT in candidate_config
    assert (repository / MODEL / "config.pbtxt").read_text() == served_config
    assert repo.versions(repository / MODEL) == served_versions
    client = grpcclient.InferenceServerClient(private_stack.triton_grpc_address)
    try:
        assert client.is_model_ready(candidate, str(version))
        assert client.is_model_ready(MODEL)
    finally:
        client.close()
