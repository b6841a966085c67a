"""One definition of each contract: the committed fashion model's config, ONNX graph, labels and model card
agree, and training reads the same recipe the gateway builds from Triton's config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from services.common.spec import Spec
from services.gateway.triton import spec_from_config
from training.data.datasets import FASHION_LABELS
from training.report.metrics import softmax
from training.repository.layout import (
    COMBINE_SOURCE,
    classifier_config,
    combine_config,
    ensemble_config,
    fused_config,
    install_combine_model,
    latest,
)
from training.repository.recipe import read_config, read_spec, spec_from_dict, spec_to_dict

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
COMMITTED = ["fashion_cnn", "fashion_effnet"]


def _dims(config, name: str) -> list[int]:  # type: ignore[no-untyped-def]
    tensors = list(config.input) + list(config.output)
    return [int(d) for d in next(t for t in tensors if t.name == name).dims]


@pytest.mark.parametrize("model", COMMITTED)
def test_training_and_gateway_read_the_same_recipe_from_the_committed_config(model: str) -> None:
    config = read_config(REPOSITORY / model / "config.pbtxt")
    as_triton_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    served = spec_from_config(as_triton_json)  # what the gateway builds from Triton's view of this config
    assert read_spec(REPOSITORY / model / "config.pbtxt") == served
    image = next(i for i in config.input if i.name == "image")
    assert (served.height, served.width, served.channels) == tuple(image.dims)
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert (served.crop, str(served.resize_shorter), served.background) == (
        params["preprocess.crop"], params["preprocess.resize_shorter"], params["preprocess.background"])
    assert params["shopvision.public"] == "true"


@pytest.mark.parametrize("model", COMMITTED)
def test_committed_onnx_graph_matches_its_configs_labels_and_card(model: str) -> None:
    classifier = read_config(REPOSITORY / f"{model}_onnx" / "config.pbtxt")
    ensemble = read_config(REPOSITORY / model / "config.pbtxt")
    recipe = read_spec(REPOSITORY / model / "config.pbtxt")
    assert classifier.backend == "onnxruntime" and ensemble.platform == "ensemble"
    assert ensemble.ensemble_scheduling.step[0].model_name == f"{model}_onnx"
    session = ort.InferenceSession(str(latest(REPOSITORY / f"{model}_onnx") / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.type == "tensor(uint8)"
    assert image.shape[1:] == _dims(classifier, "image") == _dims(ensemble, "image") == [
        recipe.height, recipe.width, recipe.channels]
    outputs = {o.name: o.shape[1:] for o in session.get_outputs()}
    assert outputs == {"logits": _dims(classifier, "logits"), "embedding": _dims(classifier, "embedding")}
    assert _dims(ensemble, "probabilities") == [10] and _dims(ensemble, "embedding") == outputs["embedding"]
    labels = (REPOSITORY / model / "labels.txt").read_text().splitlines()
    assert labels == list(FASHION_LABELS)
    version = latest(REPOSITORY / model)
    assert spec_from_dict(json.loads((version / "spec.json").read_text())) == recipe  # trained on the served recipe
    card = (version / "MODEL_CARD.md").read_text()
    assert "test top-1" in card and "catalog-style photos top-1" in card
    assert json.loads((version / "eval.json").read_text())["test"]["count"] == 10000


def test_generated_configs_are_valid_triton_configs() -> None:
    spec = Spec(64, 64, 3, "center", 72, "keep")
    classifier = _parse(classifier_config("m", spec, 5, 32, "d", instances=2))
    assert (classifier.name, classifier.instance_group[0].count, _dims(classifier, "image")) == ("m_onnx", 2,
                                                                                                 [64, 64, 3])
    combine = _parse(combine_config("f", 2, [0.7, 0.3]))
    assert [i.name for i in combine.input] == ["logits_0", "logits_1"]
    assert combine.parameters["weights"].string_value == "0.7,0.3"
    ensemble = _parse(ensemble_config("m", spec, 5, 32, "d"))
    assert spec_to_dict(spec_from_config(json_format.MessageToDict(ensemble, preserving_proto_field_name=True))) \
        == spec_to_dict(spec)
    fused = _parse(fused_config("f", ["a", "b"], spec, 5, 32, "d"))
    assert [s.model_name for s in fused.ensemble_scheduling.step] == ["a_onnx", "b_onnx", "f_combine"]


def _parse(text: str):  # type: ignore[no-untyped-def]
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_model_repository_holds_real_files_only() -> None:
    """A served model is a file in the repository (a symlink into training/ breaks when the folder is copied, synced
    to object storage or mounted alone)."""
    links = [str(p.relative_to(REPOSITORY)) for p in REPOSITORY.rglob("*") if p.is_symlink()]
    assert links == []


def test_publish_installs_a_copy_of_the_one_combine_model(tmp_path: Path) -> None:
    assert COMBINE_SOURCE.is_file() and not COMBINE_SOURCE.is_symlink()
    model_dir = install_combine_model(tmp_path, "f", 2, [0.7, 0.3])
    installed = model_dir / "1" / "model.py"
    assert not installed.is_symlink() and installed.read_bytes() == COMBINE_SOURCE.read_bytes()
    # Republishing fashion_fused into the repository that holds the source (source = target) keeps the file whole.
    copy = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "fashion_fused_combine", copy / "fashion_fused_combine")
    target = copy / "fashion_fused_combine" / "1" / "model.py"
    install_combine_model(copy, "fashion_fused", 2, [0.75, 0.25], source=target)
    assert target.read_bytes() == COMBINE_SOURCE.read_bytes()


def _triton_model_module(path: Path):  # type: ignore[no-untyped-def]
    """Import a Triton Python model file with the real ``triton_python_backend_utils`` of the pytriton wheel."""
    import importlib.util
    import sys

    import pytriton

    backend = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python"
    sys.path.insert(0, str(backend))
    try:
        spec = importlib.util.spec_from_file_location(f"triton_model_{path.parent.parent.name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(backend))
    return module


def test_the_served_softmax_copies_agree_with_trainings() -> None:
    """Triton loads its model files on their own, so the combine step keeps its own softmax: it must compute what
    training scores with (``training.report.metrics.softmax``), large logits included."""
    combine = _triton_model_module(COMBINE_SOURCE)
    logits = np.random.default_rng(0).normal(0, 30, (64, 10)).astype(np.float32)
    logits[0] = 1000.0  # overflow without the max shift
    np.testing.assert_allclose(combine.softmax(logits), softmax(logits), rtol=1e-6, atol=1e-7)
    assert np.isfinite(softmax(logits)).all()
    np.testing.assert_allclose(softmax(logits).sum(axis=-1), 1.0, rtol=1e-5)


class _FakeTensor:
    """What Triton's stub hands a Python model (``name()``, ``as_numpy()``) and what ``pb_utils.Tensor`` builds."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self._inputs = [_FakeTensor(name, array) for name, array in inputs.items()]

    def inputs(self) -> list[_FakeTensor]:
        return self._inputs


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor]) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}


def test_the_served_softmax_step_executes_trainings_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """``postprocess_softmax``'s ``execute``, the last step of every single-model ensemble, answers each request
    with training's softmax of its logits: float32, finite for logits of 1000 (no overflow), rows summing to 1.
    ``Tensor`` and ``InferenceResponse`` exist only inside Triton's stub; stand-ins record what it returns."""
    served = _triton_model_module(REPOSITORY / "postprocess_softmax" / "1" / "model.py")
    monkeypatch.setattr(served.pb_utils, "Tensor", _FakeTensor, raising=False)
    monkeypatch.setattr(served.pb_utils, "InferenceResponse", _FakeResponse, raising=False)
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, 30, (n, 10)).astype(np.float32) for n in (1, 5, 64)]
    batches[1][2] = 1000.0
    batches[2][0, 3] = -1000.0
    responses = served.TritonPythonModel().execute([_FakeRequest(logits=b) for b in batches])
    assert len(responses) == len(batches)
    for response, logits in zip(responses, batches, strict=True):
        probabilities = response.outputs["probabilities"]
        assert probabilities.dtype == np.float32 and np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities, softmax(logits), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(served.softmax(batches[1]), softmax(batches[1]), rtol=1e-6, atol=1e-7)


def test_the_fused_combine_step_executes_the_weighted_mean_of_trainings_softmax(
        monkeypatch: pytest.MonkeyPatch) -> None:
    combine = _triton_model_module(COMBINE_SOURCE)
    monkeypatch.setattr(combine.pb_utils, "Tensor", _FakeTensor, raising=False)
    monkeypatch.setattr(combine.pb_utils, "InferenceResponse", _FakeResponse, raising=False)
    model = combine.TritonPythonModel()
    model.initialize({"model_config": json.dumps({
        "input": [{"name": "logits_0"}, {"name": "logits_1"}],
        "parameters": {"weights": {"string_value": "0.75,0.25"}}})})
    rng = np.random.default_rng(2)
    first, second = (rng.normal(0, 30, (4, 10)).astype(np.float32) for _ in range(2))
    first[0] = 1000.0
    (response,) = model.execute([_FakeRequest(logits_0=first, logits_1=second)])
    np.testing.assert_allclose(response.outputs["probabilities"], 0.75 * softmax(first) + 0.25 * softmax(second),
                               rtol=1e-6, atol=1e-7)
