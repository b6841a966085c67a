"""Read a model's preprocessing recipe from its ``config.pbtxt`` (the one source of truth).

The serving path (gateway → preprocess service) builds a :class:`Spec` from the
``image`` input dims and the ``preprocess.*`` parameters of a public ensemble.
Training reads the very same fields here, with Triton's own ``ModelConfig``
protobuf, so a model is trained on exactly the pixels it will be served.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from services.common.spec import Spec

INPUT_NAME = "image"
PUBLIC_KEY = "shopvision.public"


def _model_config_pb2():  # type: ignore[no-untyped-def]
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def read_config(path: Path):  # type: ignore[no-untyped-def]
    """Parse ``path`` (a Triton ``config.pbtxt``) into a ``ModelConfig`` message."""
    pb2 = _model_config_pb2()
    return text_format.Parse(Path(path).read_text(), pb2.ModelConfig())


def config_path(repository: Path, model: str) -> Path:
    return Path(repository) / model / "config.pbtxt"


def spec_from_model_config(config) -> Spec:  # type: ignore[no-untyped-def]
    """The :class:`Spec` the gateway would build for this (public ensemble) config."""
    pb2 = _model_config_pb2()
    image = next((i for i in config.input if i.name == INPUT_NAME), None)
    if image is None:
        raise ValueError(f"model {config.name!r} has no input named {INPUT_NAME!r}")
    if image.data_type != pb2.TYPE_UINT8:
        raise ValueError(f"model {config.name!r}: input {INPUT_NAME!r} must be TYPE_UINT8")
    if len(image.dims) != 3:
        raise ValueError(f"model {config.name!r}: input {INPUT_NAME!r} dims {list(image.dims)} are not [H, W, C]")
    params = {key: value.string_value for key, value in config.parameters.items()}
    return Spec.from_parameters(list(image.dims), params)


def read_spec(path: Path) -> Spec:
    """The preprocessing recipe stored in the ``config.pbtxt`` at ``path``."""
    return spec_from_model_config(read_config(path))


def spec_parameters(spec: Spec) -> dict[str, str]:
    """The ``preprocess.*`` parameters that store ``spec`` in a config (inverse of :func:`read_spec`)."""
    return {
        "preprocess.crop": spec.crop,
        "preprocess.resize_shorter": str(spec.resize_shorter),
        "preprocess.background": spec.background,
    }


def spec_to_dict(spec: Spec) -> dict[str, int | str]:
    return {"height": spec.height, "width": spec.width, "channels": spec.channels, "crop": spec.crop,
            "resize_shorter": spec.resize_shorter, "background": spec.background}


def spec_from_dict(values: dict) -> Spec:
    return Spec(**{key: values[key] for key in ("height", "width", "channels", "crop", "resize_shorter",
                                                 "background")}).validate()
