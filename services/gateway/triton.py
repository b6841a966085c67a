"""Talks to Triton over one shared gRPC channel: readiness, model discovery, inference.

Public models are Triton models whose config has the parameter
``shopvision.public: "true"`` (the ensembles). Their preprocessing recipe is
read from the same config (``preprocess.*`` parameters and the ``image`` input
dims), so the model repository is its one source of truth. So are each public
model's calibration and a rollout under way: a READY ``<model>__candidate``
ensemble is attached to ``<model>`` (services/gateway/rollout.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import model_params
from services.common.errors import DeadlineExceeded, ShopvisionError, Unavailable
from services.common.spec import Spec
from services.gateway import metrics
from services.gateway.channels import RENEW_EVERY_S, RenewingChannel, channel_options
from services.gateway.retry import Retrier, RetryBudget, RetryPolicy, RetryWindowElapsed
from services.gateway.rollout import Calibration, Candidate, calibration_of, candidate_of_config, parameters_of

LOG = logging.getLogger(__name__)

INPUT = "image"
OUTPUT = "probabilities"
# Triton's error for a request bound to a model version that is being unloaded (a version swap).
# What a live Triton answers while it swaps a model version or drains before exiting: the same
# request sent again reaches the new version, or the Triton that replaces this one.
DRAINING_MARKERS = ("is not at ready state", "Request for unknown model", "Server is stopping",
                    "stopped accepting new inference requests")


def is_draining(error: InferenceServerException) -> bool:
    """Triton is swapping a model version or shutting down: the same request sent again is served."""
    return any(marker in str(error.message()) for marker in DRAINING_MARKERS)


def is_disconnected(error: InferenceServerException) -> bool:
    """The call did not reach a Triton (connection refused or lost), so it did no work."""
    return "UNAVAILABLE" in str(error.status() or "") and not is_draining(error)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, InferenceServerException) and (is_draining(error) or is_disconnected(error))


@dataclass(frozen=True)
class InferRetryPolicy:
    """Inference is a pure function of its inputs, so it may be sent again: for up to ``drain_window_s``
    while Triton says it is swapping or draining, for up to ``connect_window_s`` while it cannot be
    reached, never past the call's deadline, never on DEADLINE_EXCEEDED (a frozen Triton), and only
    within the retry budget. The retries themselves are :class:`services.gateway.retry.Retrier`'s."""

    drain_window_s: float = 8.0
    connect_window_s: float = 3.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def window_of(self, error: BaseException) -> float:
        """How long after the call started a retryable error may still be retried."""
        draining = isinstance(error, InferenceServerException) and is_draining(error)
        return self.drain_window_s if draining else self.connect_window_s

    def retrier(self, budget: RetryBudget) -> Retrier:
        # No attempt limit (the windows bound the retries); tritonclient cannot wait for a ready connection,
        # so each try gets the rest of the deadline.
        policy = RetryPolicy(max_attempts=0, initial_backoff_s=self.initial_backoff_s,
                             max_backoff_s=self.max_backoff_s, window_s=max(self.drain_window_s,
                                                                            self.connect_window_s),
                             wait_for_ready=False)
        return Retrier("triton", policy, budget)


EMBEDDING_OUTPUT = "embedding"
# Round robin over every Triton the address resolves to, fast reconnects, keepalive (services/gateway/channels.py).
# Triton's default flags permit no keepalive pings between calls: more than two on an idle connection got
# GOAWAY "too_many_pings" here, so the client stops at two until the connection carries a call again.
CHANNEL_ARGS = channel_options(max_send_bytes=64 * 1024 * 1024, max_pings_without_data=2)


def _channel_of(client: triton_aio.InferenceServerClient) -> grpc.aio.Channel:
    # tritonclient builds its channel itself and exposes no accessor; its close() cancels the calls in flight,
    # while a renewal must let them finish on the retired channel (RenewingChannel closes it with a grace).
    return client._channel


@dataclass(frozen=True)
class EmbeddingSource:
    """The ensemble step whose output is the public ``embedding``: search calls that model directly, so a
    catalog can pin its version; ``version`` is the one the ensemble's step pins ('' for an unpinned step),
    what a call without a catalog version uses."""

    model: str
    image_input: str
    embedding_output: str
    logits_output: str
    version: str = ""


@dataclass
class Model:
    name: str
    versions: list[str]
    spec: Spec
    num_classes: int
    labels: list[str] = field(default_factory=list)
    embedding_source: EmbeddingSource | None = None
    members: str = ""  # shopvision.members of the serving version, e.g. "fashion_cnn_onnx:3,postprocess_softmax:1"
    calibration: Calibration = field(default_factory=Calibration)
    candidate: Candidate | None = None  # a rollout under way
    max_batch_size: int = 1  # of the ensemble: the most images one inference request may carry

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.calibration.thresholds

    @property
    def threshold_rule(self) -> str:
        return self.calibration.threshold_rule

    @property
    def reference_json(self) -> str:
        """The serving version's ``shopvision.reference`` as written (JSON; parsed by the drift monitor)."""
        return self.calibration.reference_json


def embedding_source_of(config: dict) -> EmbeddingSource | None:
    """The step of an ensemble config that produces ``embedding`` from ``image`` (None if there is none)."""
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        outputs = {value: key for key, value in step.get("output_map", {}).items()}
        inputs = {value: key for key, value in step.get("input_map", {}).items()}
        if EMBEDDING_OUTPUT in outputs and INPUT in inputs:
            others = [key for key in step.get("output_map", {}) if key != outputs[EMBEDDING_OUTPUT]]
            logits = others[0] if others else ""
            pinned = int(step.get("model_version", -1))
            return EmbeddingSource(step["model_name"], inputs[INPUT], outputs[EMBEDDING_OUTPUT], logits,
                                   str(pinned) if pinned > 0 else "")
    return None


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


class ModelGone(Unavailable):
    """The model asked for is not (or no longer) READY in Triton: a candidate promoted or rolled back."""


def is_gone(error: InferenceServerException) -> bool:
    """The model or version is not loaded (unknown, being unloaded) or Triton cannot be reached."""
    return is_draining(error) or is_disconnected(error) or "NOT_FOUND" in str(error.status() or "")


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


def classifications(result: triton_aio.InferResult) -> list[Classification]:
    """One :class:`Classification` per row of a classification-extension answer."""
    version = result.get_response().model_version
    return [Classification(*parse_classification(row), version) for row in result.as_numpy(OUTPUT)]


class TritonBackend:
    def __init__(self, address: str, retry: InferRetryPolicy | None = None,
                 budget: RetryBudget | None = None, renew_every_s: float = RENEW_EVERY_S) -> None:
        self.address = address
        self._retry = retry or InferRetryPolicy()
        self._retrier = self._retry.retrier(budget or RetryBudget(ratio=0.2, min_per_s=5.0))
        # ``address`` is any gRPC target. Triton keeps its connections open for ever unless launched with
        # --grpc-max-connection-age, so the client is rebuilt from a fresh resolution every ``renew_every_s``
        # to reach Tritons added since (services/gateway/channels.py).
        self._clients = RenewingChannel("triton", lambda: triton_aio.InferenceServerClient(
            address, channel_args=CHANNEL_ARGS), _channel_of, renew_every_s)
        self._models: dict[str, Model] = {}
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()

    @property
    def _client(self) -> triton_aio.InferenceServerClient:
        """The client for the next call (each retry reads it again, so it may go out on a renewed channel)."""
        return self._clients.get()

    async def close(self) -> None:
        await self._clients.close()

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

    async def find_model(self, name: str) -> Model | None:
        """The public model ``name``, re-reading the list when it is not known yet (None when Triton has none)."""
        model = self._models.get(name)
        if model is None:
            # A model published a moment ago: when Triton says it is ready, re-read the models now;
            # otherwise look again at most once a second (unknown names must not hammer Triton).
            try:
                if await self.model_ready(name):
                    await self.refresh()
                else:
                    await self.refresh_if_older(1.0)
            except Unavailable:
                if not self._models:
                    raise
            model = self._models.get(name)
        return model

    async def ready_versions(self, name: str, timeout_s: float = 5.0) -> list[str]:
        """The versions of any model (public or not) that Triton has READY, oldest first."""
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
        except InferenceServerException as error:
            raise _to_error(error, "listing models") from None
        versions = [entry.get("version", "") for entry in index.get("models", [])
                    if entry.get("name") == name and entry.get("state") == "READY"]
        return sorted(versions, key=lambda v: int(v) if v.isdigit() else 0)

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
            candidates: dict[str, Candidate] = {}
            for name, versions in ready.items():
                try:
                    reply = await self._client.get_model_config(name, as_json=True, client_timeout=timeout_s)
                    config = reply["config"]
                except InferenceServerException as error:
                    if is_draining(error):  # unloaded since the index was read (a rollout ending)
                        continue
                    raise _to_error(error, f"reading config of {name}") from None
                params = parameters_of(config)
                is_candidate = bool(params.get(model_params.CANDIDATE_OF))
                if params.get(model_params.PUBLIC) != "true" and not is_candidate:
                    continue
                try:
                    spec = spec_from_config(config)
                    output = next(o for o in config["output"] if o["name"] == OUTPUT)
                except (ValueError, StopIteration, ShopvisionError) as error:
                    LOG.error("model %s has a bad preprocessing spec or no %r output: %s", name, OUTPUT, error)
                    continue
                num_classes = int(output["dims"][-1])
                if is_candidate:
                    candidate = candidate_of_config(name, params, versions, spec, num_classes)
                    if candidate is not None:
                        candidates[candidate.model] = candidate
                    continue
                model = Model(name, sorted(versions, key=lambda v: int(v) if v.isdigit() else 0),
                              spec, num_classes, embedding_source=embedding_source_of(config),
                              members=params.get(model_params.MEMBERS, ""),
                              calibration=calibration_of(name, params, num_classes),
                              max_batch_size=max(1, int(config.get("max_batch_size", 1) or 1)))
                previous = self._models.get(name)
                if previous and previous.labels and previous.num_classes == model.num_classes:
                    model.labels = previous.labels
                else:
                    model.labels = await self._fetch_labels(model, timeout_s)
                models[name] = model
            for public, candidate in candidates.items():
                if public in models:
                    models[public].candidate = candidate
                else:
                    LOG.warning("candidate %s is for %s, which is not a READY public model: ignored",
                                candidate.triton_name, public)
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

    async def _infer_with_retries(self, call: Callable[[float], Awaitable[triton_aio.InferResult]],
                                  timeout_s: float, what: str) -> triton_aio.InferResult:
        """Run ``call(remaining_seconds)``, sending it again as :class:`InferRetryPolicy` allows."""

        async def attempt(number: int, remaining: float) -> triton_aio.InferResult:
            return await call(remaining)

        try:
            return await self._retrier.call(attempt, timeout_s, retryable=is_retryable,
                                            window_of=self._retry.window_of)
        except RetryWindowElapsed as elapsed:
            if not isinstance(elapsed.last_error, InferenceServerException):
                raise
            raise _to_error(elapsed.last_error, what) from None
        except InferenceServerException as error:
            raise _to_error(error, what) from None

    async def classify_many(self, model: Model, pixels: np.ndarray, top_k: int, timeout_s: float,
                            request_id: str) -> list[Classification]:
        """The images of ``pixels`` (N, H, W, C) in one inference request of batch N, one result per image."""
        result = await self._infer(model.name, pixels, top_k, timeout_s, request_id)
        return classifications(result)

    async def classify_once_many(self, name: str, pixels: np.ndarray, top_k: int, timeout_s: float,
                                 request_id: str) -> list[Classification]:
        """One attempt at Triton model ``name`` (a candidate, a comparison copy) with the batch ``pixels``: no
        retries, since the caller has the serving version to fall back on; :class:`ModelGone` when ``name`` is
        not READY."""
        inputs = [triton_aio.InferInput(INPUT, list(pixels.shape), "UINT8")]
        inputs[0].set_data_from_numpy(pixels)
        outputs = [triton_aio.InferRequestedOutput(OUTPUT, class_count=top_k)]
        try:
            result = await self._client.infer(name, inputs, outputs=outputs, request_id=request_id,
                                              client_timeout=timeout_s)
        except InferenceServerException as error:
            if is_gone(error):
                raise ModelGone(f"{name} is not ready in Triton: {error.message()}", reason="model_gone") from None
            raise _to_error(error, f"inferring {name}") from None
        return classifications(result)

    async def embed(self, model: Model, pixels: np.ndarray, timeout_s: float, request_id: str,
                    version: str = "") -> Embedding:
        """Embedding and top-1 category of one image from the model's embedding step, ``version`` of that step
        (empty: the version the ensemble pins, else its latest); the version reported is the embedding model's."""
        source = model.embedding_source
        if source is None:
            raise Unavailable(f"model {model.name} has no embedding step: it cannot serve similar-product search",
                              reason="no_embedding")
        version = version or source.version
        inputs = [triton_aio.InferInput(source.image_input, [1, *pixels.shape], "UINT8")]
        inputs[0].set_data_from_numpy(pixels[None])
        outputs = [triton_aio.InferRequestedOutput(source.embedding_output)]
        if source.logits_output:
            outputs.append(triton_aio.InferRequestedOutput(source.logits_output))
        what = f"embedding with {source.model}" + (f" version {version}" if version else "")
        result = await self._infer_with_retries(
            lambda remaining: self._client.infer(source.model, inputs, model_version=version, outputs=outputs,
                                                 request_id=request_id, client_timeout=remaining),
            timeout_s, what)
        label, score = "", 0.0
        if source.logits_output:
            logits = result.as_numpy(source.logits_output)[0].astype(np.float64)
            top = int(np.argmax(logits))
            score = float(1.0 / np.exp(logits - logits[top]).sum())
            label = model.labels[top] if top < len(model.labels) else str(top)
        return Embedding(result.as_numpy(source.embedding_output)[0].astype(np.float32), label, score,
                         result.get_response().model_version)
