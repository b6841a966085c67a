"""Start the real Triton Inference Server from the ``nvidia-pytriton`` wheel.

The wheel ships ``tritonserver`` (Triton 2.51, = NGC 24.10) with the Python
backend but no ONNX Runtime backend. This module lays out a backend directory:

* ``python/``: the wheel's ``libtriton_python.so`` and utils, plus the Python
  backend stub built for the running interpreter, copied beside them;
* ``onnxruntime/model.py``: our Python-based ONNX Runtime backend,

then execs ``tritonserver`` in explicit model-control mode (models can be
loaded and swapped at run time through the repository API).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from services.triton.config import TritonConfig

LOG = logging.getLogger(__name__)

OUR_BACKENDS = Path(__file__).resolve().parent / "backends"


def pytriton_root() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed wheel (found without importing pytriton)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nvidia-pytriton wheel is not installed (pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def library_dir() -> Path:
    return pytriton_root().parents[1] / "nvidia_pytriton.libs"


def _install(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` unless an identical copy is there; replace atomically, since a running
    Triton may be executing the old stub (writing over it in place fails with ETXTBSY)."""
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def prepare_backend_directory(dest: Path) -> Path:
    """Build (or refresh) the backend directory ``dest`` and return it."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} ({stub})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            _install(item, python_dir / item.name)
    _install(stub, python_dir / stub.name)
    for backend in OUR_BACKENDS.iterdir():
        if (backend / "model.py").exists():
            (dest / backend.name).mkdir(parents=True, exist_ok=True)
            _install(backend / "model.py", dest / backend.name / "model.py")
    return dest


def command(config: TritonConfig) -> list[str]:
    args = [
        str(pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={config.model_repository}",
        f"--backend-directory={config.backend_directory}",
        "--model-control-mode=explicit",
        f"--http-address={config.host}",
        f"--http-port={config.http_port}",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={config.host}",
        f"--metrics-port={config.metrics_port}",
        f"--log-verbose={config.log_verbose}",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        "--strict-readiness=true",
    ]
    if config.reuse_ports:
        # A second Triton on the same HTTP and gRPC ports: how `make run`'s stack restarts Triton without
        # a gap (the new one serves before the old one drains).
        args += ["--reuse-grpc-port=true", "--reuse-http-port=true"]
    if config.trace_url:
        # Every inference is traced; one that carries a W3C traceparent joins the caller's trace.
        args += ["--trace-config=mode=opentelemetry", f"--trace-config=opentelemetry,url={config.trace_url}",
                 "--trace-config=opentelemetry,resource=service.name=triton",
                 "--trace-config=rate=1", "--trace-config=level=TIMESTAMPS"]
    args += [f"--load-model={name}" for name in config.load_models]
    return args


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: the stub needs the wheel's libraries and this interpreter's packages."""
    env = dict(os.environ if base is None else base)
    libs = str(library_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    # The Python backend's stub embeds the system interpreter; point it at this environment's packages.
    site = [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join([*site, env.get("PYTHONPATH", "")]).strip(os.pathsep)
    return env


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TritonConfig.from_env()
    prepare_backend_directory(config.backend_directory)
    args = command(config)
    LOG.info("starting %s", " ".join(args))
    os.execve(args[0], args, environment())


if __name__ == "__main__":
    main()
