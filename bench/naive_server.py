"""The naive peer: one process that decodes, preprocesses and runs ONNX Runtime per request, no batching.

    python -m bench.naive_server [--address 127.0.0.1:50061] [--workers 4] [--intra-op-threads 2]

What a team would hand-roll (like a Keras ``predict`` loop behind a thread-pool gRPC server):
it serves the same ``shopvision.v1.ProductRecognition`` proto and the same model file with the
same recipe (resize the shorter side to 256, centre-crop 224, uint8 RGB into the graph), but
every request decodes the full-resolution image and runs the model on a batch of one. It is the
baseline ``make bench`` compares the stack against; it is not part of the service.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from training.repository.layout import IMAGENET_ENSEMBLE, classifier_name

LOG = logging.getLogger("naive_server")
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = IMAGENET_ENSEMBLE
DEFAULT_MODEL = REPO_ROOT / "model_repository" / classifier_name(MODEL_NAME) / "1" / "model.onnx"
DEFAULT_LABELS = REPO_ROOT / "model_repository" / MODEL_NAME / "labels.txt"
SERVICE_NAME = recognition_pb2.DESCRIPTOR.services_by_name["ProductRecognition"].full_name


class BadImage(ValueError):
    """The bytes are not a decodable image."""


@dataclass(frozen=True)
class Classified:
    scores: np.ndarray
    class_ids: np.ndarray
    width: int
    height: int
    preprocess_s: float
    inference_s: float


class NaiveClassifier:
    """Decode + resize + crop + ``session.run`` on a batch of one, all in the calling thread."""

    def __init__(self, model_path: Path, labels_path: Path, intra_op_threads: int = 2, size: int = 224,
                 resize_shorter: int = 256) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.labels = labels_path.read_text().splitlines()
        self.size, self.resize_shorter = size, resize_shorter

    def preprocess(self, data: bytes) -> tuple[np.ndarray, int, int]:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BadImage("image could not be decoded (not a JPEG, PNG, WebP or BMP, or corrupt)")
        height, width = image.shape[:2]
        scale = self.resize_shorter / min(height, width)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        crop = cv2.cvtColor(resized[top:top + self.size, left:left + self.size], cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(crop)[None], width, height

    def classify(self, data: bytes, top_k: int) -> Classified:
        start = time.perf_counter()
        pixels, width, height = self.preprocess(data)
        prepared = time.perf_counter()
        logits = self.session.run(["logits"], {self.input_name: pixels})[0][0]
        done = time.perf_counter()
        exp = np.exp(logits - logits.max())
        probabilities = exp / exp.sum()
        best = np.argsort(-probabilities)[:top_k]
        return Classified(probabilities[best], best, width, height, prepared - start, done - prepared)


class NaiveServicer(recognition_pb2_grpc.ProductRecognitionServicer):
    def __init__(self, classifier: NaiveClassifier) -> None:
        self._classifier = classifier

    def Classify(self, request: recognition_pb2.ClassifyRequest,
                 context: grpc.ServicerContext) -> recognition_pb2.ClassifyResponse:
        start = time.perf_counter()
        if not request.image:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image is empty")
        if request.model and request.model != MODEL_NAME:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown model {request.model!r}")
        top_k = request.top_k or 5
        if top_k > len(self._classifier.labels):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k={top_k} is larger than the number of classes")
        try:
            result = self._classifier.classify(request.image, top_k)
        except BadImage as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        labels = self._classifier.labels
        return recognition_pb2.ClassifyResponse(
            predictions=[recognition_pb2.Prediction(label=labels[i], score=float(s), class_id=int(i))
                         for s, i in zip(result.scores, result.class_ids, strict=True)],
            model=MODEL_NAME, model_version="1", request_id=uuid.uuid4().hex,
            timings=recognition_pb2.Timings(preprocess_ms=result.preprocess_s * 1e3,
                                            inference_ms=result.inference_s * 1e3,
                                            total_ms=(time.perf_counter() - start) * 1e3),
            image_width=result.width, image_height=result.height)

    def ListModels(self, request: recognition_pb2.ListModelsRequest,
                   context: grpc.ServicerContext) -> recognition_pb2.ListModelsResponse:
        size = self._classifier.size
        return recognition_pb2.ListModelsResponse(default_model=MODEL_NAME, models=[recognition_pb2.ModelInfo(
            name=MODEL_NAME, versions=["1"], labels=self._classifier.labels, input_height=size, input_width=size,
            input_channels=3, is_default=True)])


def build_server(classifier: NaiveClassifier, address: str, workers: int) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)])
    recognition_pb2_grpc.add_ProductRecognitionServicer_to_server(NaiveServicer(classifier), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50061", help="listen address (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model (default: %(default)s)")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="labels file (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="gRPC worker threads (default: %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    classifier = NaiveClassifier(args.model, args.labels, args.intra_op_threads)
    server = build_server(classifier, args.address, args.workers)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    LOG.info("naive peer serving on %s (%d workers, %d intra-op threads)", args.address, args.workers,
             args.intra_op_threads)
    stop.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
