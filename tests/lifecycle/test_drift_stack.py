"""Drift through the real Classify path: a fresh gateway on the session stack watches fashion_effnet, whose served
version carries its validation reference (``training.calibrate``). Traffic like the validation split keeps the
population stability index low; traffic of one category lifts the class figure past the alert level
(``ShopvisionModelDrift``, 0.25 in deploy/k8s/components/monitoring/rules/lifecycle.rules.yml)."""
from __future__ import annotations

import concurrent.futures
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Stack
from tests.search.gateways import PrivateGateway
from training.data.datasets import fashion_mnist_raw
from training.data.uploads import encode_png

MODEL = "fashion_effnet"
ALERT_LEVEL = 0.25
TROUSER = 1


def drift_figures(metrics_port: int) -> dict[str, float]:
    """``shopvision_gateway_drift_psi`` of MODEL by signal, and the window size, from the gateway's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != MODEL:
                continue
            if sample.name == "shopvision_gateway_drift_psi":
                found[sample.labels["signal"]] = sample.value
            elif sample.name == "shopvision_gateway_drift_window_samples":
                found["window"] = sample.value
    return found


def classify_all(address: str, photos: list[bytes]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda photo: stub.Classify(
                recognition_pb2.ClassifyRequest(image=photo, model=MODEL), timeout=30), photos))
    assert all(a.model == MODEL and a.predictions for a in answers)


@pytest.mark.stack
def test_drift_stays_low_on_test_images_and_rises_on_a_one_category_stream(stack: Stack, tmp_path: Path) -> None:
    raw, labels = fashion_mnist_raw("test")
    gateway = PrivateGateway.on(stack, tmp_path).start()
    try:
        # Like the reference: the first 400 test images (all ten categories in their natural mix).
        classify_all(gateway.address, [encode_png(image) for image in raw[:400]])
        like_reference = drift_figures(gateway.stack.ports.gateway_metrics)
        assert like_reference["window"] == 400
        assert like_reference["class"] < 0.1 and like_reference["score"] < ALERT_LEVEL, like_reference

        # A shifted stream: only trousers. 600 of them make the window 60 % trousers against the reference's 10 %.
        trousers = np.flatnonzero(labels == TROUSER)[:600]
        classify_all(gateway.address, [encode_png(raw[i]) for i in trousers])
        shifted = drift_figures(gateway.stack.ports.gateway_metrics)
        assert shifted["window"] == 1000
        assert shifted["class"] > ALERT_LEVEL, shifted
        assert shifted["class"] > 5 * like_reference["class"], (like_reference, shifted)
    finally:
        gateway.stop()
