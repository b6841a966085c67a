"""The framework peer: Ray Serve's gRPC ingress serving ``shopvision.v1.ProductRecognition.Classify``.

    .cache/peers/ray/venv/bin/python -m bench.peers.ray_serve --grpc-port 9000 --spec '{"height": 224, ...}'

Runs inside its own virtual environment (``bench/peers/ray-requirements.txt``), started and stopped by
:class:`bench.targets.RayServePeer` with the repository and ``gen/`` on ``PYTHONPATH``. What a team
would build on a serving framework: one deployment whose replicas decode and transform each JPEG with
the project's own :func:`services.preprocess.imaging.preprocess` (the recipe comes in ``--spec``, read
by the caller from the model's ``config.pbtxt``) and run the same ONNX file in ONNX Runtime, with
``@serve.batch`` collecting concurrent requests into one ``session.run``. A local Ray cluster is
started with ``--num-cpus`` CPUs, no dashboard and a small object store; SIGTERM shuts Serve and Ray down.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from shopvision.v1 import recognition_pb2

from services.common.errors import InvalidInput
from services.common.spec import Spec
from services.preprocess.imaging import preprocess

LOG = logging.getLogger("ray_serve_peer")
REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "efficientnet_lite0_imagenet"
DEFAULT_MODEL = REPO_ROOT / "model_repository" / f"{MODEL_NAME}_onnx" / "1" / "model.onnx"
DEFAULT_LABELS = REPO_ROOT / "model_repository" / MODEL_NAME / "labels.txt"
SERVICER = "shopvision.v1.recognition_pb2_grpc.add_ProductRecognitionServicer_to_server"
MAX_PIXELS = 50_000_000  # the preprocess service's default limit


class Classifier:
    """A replica: preprocess in the request's coroutine, the model on batches from ``@serve.batch``."""

    def __init__(self, model_path: str, labels_path: str, spec: dict, threads: int, max_batch_size: int,
                 batch_wait_s: float) -> None:
        cv2.setNumThreads(1)  # one image per request coroutine, as the preprocess service decodes
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.labels = Path(labels_path).read_text().splitlines()
        self.spec = Spec(**spec).validate()
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        logits = self.session.run(["logits"], {self.input_name: np.stack(images)})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return list(shifted / shifted.sum(axis=1, keepdims=True))

    async def Classify(self, request: recognition_pb2.ClassifyRequest,
                       grpc_context: RayServegRPCContext) -> recognition_pb2.ClassifyResponse:
        start = time.perf_counter()
        try:
            result = preprocess(request.image, self.spec, MAX_PIXELS)
        except InvalidInput as error:  # as the stack answers it, not as an INTERNAL replica failure
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(error))
            return recognition_pb2.ClassifyResponse()
        prepared = time.perf_counter()
        probabilities = await self.infer(result.pixels)
        done = time.perf_counter()
        best = np.argsort(-probabilities)[:request.top_k or 5]
        return recognition_pb2.ClassifyResponse(
            predictions=[recognition_pb2.Prediction(label=self.labels[i], score=float(probabilities[i]),
                                                    class_id=int(i)) for i in best],
            model=MODEL_NAME, model_version="1", request_id=uuid.uuid4().hex,
            timings=recognition_pb2.Timings(preprocess_ms=(prepared - start) * 1e3,
                                            inference_ms=(done - prepared) * 1e3,
                                            total_ms=(time.perf_counter() - start) * 1e3),
            image_width=result.header.width, image_height=result.header.height)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-port", type=int, default=9000, help="gRPC ingress port (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8765,
                        help="Serve's HTTP proxy port, unused by the bench (default: %(default)s)")
    parser.add_argument("--spec", required=True, help="the preprocessing recipe as JSON (Spec fields)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model (default: %(default)s)")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="labels file (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=1, help="deployment replicas (default: %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads per replica (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="@serve.batch max_batch_size, 1 = no batching (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="@serve.batch batch_wait_timeout_s in ms (default: %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                        help="CPUs of the local Ray cluster (default: this machine's, %(default)s)")
    parser.add_argument("--object-store-mb", type=int, default=100,
                        help="Ray object store size in MiB (default: %(default)s; Ray's minimum is 75)")
    parser.add_argument("--temp-dir", default="/tmp/ray-shopvision",
                        help="Ray's session directory root, removed by the launcher (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=args.object_store_mb << 20,
             _temp_dir=args.temp_dir, logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]))
        app = serve.deployment(Classifier).options(
            num_replicas=args.replicas, max_ongoing_requests=64,
            ray_actor_options={"num_cpus": args.num_cpus / args.replicas}).bind(
            str(args.model), str(args.labels), json.loads(args.spec), args.intra_op_threads, args.max_batch_size,
            args.batch_wait_ms / 1e3)
        serve.run(app, name="shopvision")
        LOG.info("ray serve peer serving on 127.0.0.1:%d (%d replicas x %d intra-op threads, batch <= %d)",
                 args.grpc_port, args.replicas, args.intra_op_threads, args.max_batch_size)
        stop.wait()
    finally:
        LOG.info("shutting down Serve and Ray")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
