"""Talks to Triton over one shared gRPC channel: readiness, model discovery, inference.

Public models are Triton models whose config has the parameter
``shopvision.public: "true"`` (the ensembles). Their preprocessing recipe is
read from the same config (``preprocess.*`` parameters and the ``image`` input
dims), so the model repository is its one source of truth.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common.errors import DeadlineExceeded, ShopvisionError, Unavailable
from services.common.spec import Spec
from services.gateway import metrics
from services.gateway.retry import RetryBudget

LOG = logging.getLogger(__name__)

INPUT = "image"
OUTPUT = "probabilities"
# Triton's error for a request bound to a model version that is being unloaded (a version swap).
# What a live Triton answers while it swaps a model version or drains before exiting: the same
# request sent again reaches the new version, or the Triton that replaces this one.
DRAINING_MARKERS = ("is not at ready state", "Request for unknown model", "Server is stopping",
                    "stopped accepting new inference requests")


def is_draining(error: InferenceServerException) -> bool:
    return any(marker in str(error.message()) for marker in DRAINING_MARKERS)


def is_disconnected(error: InferenceServerException) -> bool:
    return "UNAVAILABLE" in str(error.status() or "") and not is_draining(error)


@dataclass(frozen=True)
class InferRetryPolicy:
    """Inference is a pure function of its inputs, so it may be sent again: for up to ``drain_window_s``
    while Triton says it is swapping or draining, for up to ``connect_window_s`` while it cannot be
    reached, never past the call's deadline, never on DEADLINE_EXCEEDED (a frozen Triton), and only
    within the retry budget."""

    drain_window_s: float = 8.0
    connect_window_s: float = 3.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
EMBEDDING_OUTPUT = "embedding"
CHANNEL_ARGS = [
    # Reconnect quickly after Triton restarts; the default backoff grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class Model:
    name: str
    versions: list[str]
    spec: Spec
    num_classes: int
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Classification:
    scores: list[float]
    class_ids: list[int]
    labels: list[str]
    model_version: str


@dataclass(frozen=True)
class Embedding:
    """The ``embedding`` output of one image (as the model gives it) and its top-1 category."""

    vector: np.ndarray
    label: str
    score: float
    model_version: str


def _to_error(error: InferenceServerException, what: str) -> ShopvisionError:
    status = str(error.status() or "")
    metrics.UPSTREAM_ERRORS.labels("triton", status.replace("StatusCode.", "") or "UNKNOWN").inc()
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in str(error.message()):
        return DeadlineExceeded(f"deadline exceeded while waiting for Triton ({what})", reason="deadline")
    return Unavailable(f"Triton is unavailable ({what}): {error.message()}", reason="triton")


def spec_from_config(config: dict) -> Spec:
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    image_input = next((i for i in config["input"] if i["name"] == INPUT), None)
    if image_input is None:
        raise ValueError(f"model {config['name']} has no input named {INPUT!r}")
    return Spec.from_parameters(image_input["dims"], params)


def parse_classification(row: np.ndarray) -> tuple[list[float], list[int], list[str]]:
    """Triton's classification extension returns ``b"score:index:label"`` strings, best first."""
    scores, ids, labels = [], [], []
    for item in row:
        score, index, label = item.decode("utf-8").split(":", 2)
        scores.append(float(score))
        ids.append(int(index))
        labels.append(label)
    return scores, ids, labels


class TritonBackend:
    def __init__(self, address: str, retry: InferRetryPolicy | None = None,
                 budget: RetryBudget | None = None) -> None:
        self.address = address
        self._retry = retry or InferRetryPolicy()
        self._budget = budget or RetryBudget(ratio=0.2, min_per_s=5.0)
        self._rng = random.Random()
        self._client = triton_aio.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        self._models: dict[str, Model] = {}
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._client.close()

    async def ready(self, timeout_s: float = 1.0) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    @property
    def models(self) -> dict[str, Model]:
        return self._models

    async def model_ready(self, name: str, timeout_s: float = 1.0) -> bool:
        """Whether Triton has some version of ``name`` READY (False when it cannot tell)."""
        try:
            return bool(await self._client.is_model_ready(name, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def refresh(self, timeout_s: float = 5.0) -> dict[str, Model]:
        """Re-read which public models and versions are READY (labels fetched once per model)."""
        async with self._refresh_lock:
            try:
                index = await self._client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
            except InferenceServerException as error:
                raise _to_error(error, "listing models") from None
            ready: dict[str, list[str]] = {}
            for entry in index.get("models", []):
                if entry.get("state") == "READY":
                    ready.setdefault(entry["name"], []).append(entry.get("version", ""))
            models: dict[str, Model] = {}
            for name, versions in ready.items():
                try:
                    reply = await self._client.get_model_config(name, as_json=True, client_timeout=timeout_s)
                    config = reply["config"]
                except InferenceServerException as error:
                    raise _to_error(error, f"reading config of {name}") from None
                if config.get("parameters", {}).get("shopvision.public", {}).get("string_value") != "true":
                    continue
                try:
                    spec = spec_from_config(config)
                except (ValueError, ShopvisionError) as error:
                    LOG.error("model %s has a bad preprocessing spec: %s", name, error)
                    continue
                output = next(o for o in config["output"] if o["name"] == OUTPUT)
                model = Model(name, sorted(versions, key=lambda v: int(v) if v.isdigit() else 0),
                              spec, int(output["dims"][-1]))
                previous = self._models.get(name)
                if previous and previous.labels and previous.num_classes == model.num_classes:
                    model.labels = previous.labels
                else:
                    model.labels = await self._fetch_labels(model, timeout_s)
                models[name] = model
            self._models = models
            self._refreshed_at = time.monotonic()
            return models

    async def refresh_if_older(self, seconds: float) -> None:
        if time.monotonic() - self._refreshed_at > seconds:
            await self.refresh()

    async def _fetch_labels(self, model: Model, timeout_s: float) -> list[str]:
        """All labels in class order, through the classification extension on a blank image."""
        pixels = np.zeros((1, model.spec.height, model.spec.width, model.spec.channels), dtype=np.uint8)
        result = await self._infer(model.name, pixels, model.num_classes, timeout_s, request_id="labels")
        _, ids, labels = parse_classification(result.as_numpy(OUTPUT)[0])
        by_id = dict(zip(ids, labels, strict=True))
        return [by_id.get(i, str(i)) for i in range(model.num_classes)]

    async def _infer(self, name: str, pixels: np.ndarray, top_k: int, timeout_s: float, request_id: str):
        inputs = [triton_aio.InferInput(INPUT, list(pixels.shape), "UINT8")]
        inputs[0].set_data_from_numpy(pixels)
        outputs = [triton_aio.InferRequestedOutput(OUTPUT, class_count=top_k)]
        return await self._infer_with_retries(
            lambda remaining: self._client.infer(name, inputs, outputs=outputs, request_id=request_id,
                                                 client_timeout=remaining),
            timeout_s, f"inferring {name}")

    async def _infer_with_retries(self, call, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
        """Run ``call(remaining_seconds)``, sending it again as :class:`InferRetryPolicy` allows."""
        start = time.monotonic()
        deadline = start + timeout_s
        self._budget.deposit()
        retries = 0
        while True:
            try:
                return await call(max(deadline - time.monotonic(), 0.001))
            except InferenceServerException as error:
                if is_draining(error):
                    window_end = start + self._retry.drain_window_s
                elif is_disconnected(error):
                    window_end = start + self._retry.connect_window_s
                else:
                    raise _to_error(error, what) from None
                retries += 1
                cap = min(self._retry.max_backoff_s, self._retry.initial_backoff_s * 2 ** (retries - 1))
                pause = self._rng.uniform(cap / 2, cap)
                if time.monotonic() + pause >= min(deadline, window_end):
                    metrics.RETRIES.labels("triton", "window_elapsed").inc()
                    raise _to_error(error, what) from None
                if not self._budget.try_spend():
                    metrics.RETRIES.labels("triton", "budget_exhausted").inc()
                    raise _to_error(error, what) from None
                metrics.RETRIES.labels("triton", "retried").inc()
                LOG.info("retrying %s in %.2f s: %s", what, pause, error.message())
                await asyncio.sleep(pause)

    async def classify(self, model: Model, pixels: np.ndarray, top_k: int, timeout_s: float,
                       request_id: str) -> Classification:
        result = await self._infer(model.name, pixels[None], top_k, timeout_s, request_id)
        scores, ids, labels = parse_classification(result.as_numpy(OUTPUT)[0])
        return Classification(scores, ids, labels, result.get_response().model_version)

    async def embed(self, model: Model, pixels: np.ndarray, timeout_s: float, request_id: str,
                    version: str = "") -> Embedding:
        """Embedding and top-1 category of one image; ``version`` pins a model version (empty: Triton's choice)."""
        inputs = [triton_aio.InferInput(INPUT, [1, *pixels.shape], "UINT8")]
        inputs[0].set_data_from_numpy(pixels[None])
        outputs = [triton_aio.InferRequestedOutput(EMBEDDING_OUTPUT),
                   triton_aio.InferRequestedOutput(OUTPUT, class_count=1)]
        what = f"embedding with {model.name}" + (f" version {version}" if version else "")
        result = await self._infer_with_retries(
            lambda remaining: self._client.infer(model.name, inputs, model_version=version, outputs=outputs,
                                                 request_id=request_id, client_timeout=remaining),
            timeout_s, what)
        scores, _, labels = parse_classification(result.as_numpy(OUTPUT)[0])
        return Embedding(result.as_numpy(EMBEDDING_OUTPUT)[0].astype(np.float32), labels[0], scores[0],
                         result.get_response().model_version)
