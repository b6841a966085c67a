"""One definition of each contract: the committed fashion model's config, ONNX graph, labels and model card
agree, and training reads the same recipe the gateway builds from Triton's config."""
from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from services.common.spec import Spec
from services.gateway.triton import spec_from_config
from training.datasets import FASHION_LABELS
from training.recipe import read_config, read_spec, spec_from_dict, spec_to_dict
from training.repository import classifier_config, combine_config, ensemble_config, fused_config, latest

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
FASHION = Spec(28, 28, 1, "object", 0, "dark")
COMMITTED = ["fashion_cnn", "fashion_effnet"]


def _dims(config, name: str) -> list[int]:  # type: ignore[no-untyped-def]
    tensors = list(config.input) + list(config.output)
    return [int(d) for d in next(t for t in tensors if t.name == name).dims]


@pytest.mark.parametrize("model", COMMITTED)
def test_training_and_gateway_read_the_same_recipe_from_the_committed_config(model: str) -> None:
    config = read_config(REPOSITORY / model / "config.pbtxt")
    assert read_spec(REPOSITORY / model / "config.pbtxt") == FASHION
    as_triton_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    assert spec_from_config(as_triton_json) == FASHION
    assert config.parameters["shopvision.public"].string_value == "true"


@pytest.mark.parametrize("model", COMMITTED)
def test_committed_onnx_graph_matches_its_configs_labels_and_card(model: str) -> None:
    classifier = read_config(REPOSITORY / f"{model}_onnx" / "config.pbtxt")
    ensemble = read_config(REPOSITORY / model / "config.pbtxt")
    assert classifier.backend == "onnxruntime" and ensemble.platform == "ensemble"
    assert ensemble.ensemble_scheduling.step[0].model_name == f"{model}_onnx"
    session = ort.InferenceSession(str(latest(REPOSITORY / f"{model}_onnx") / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.type == "tensor(uint8)"
    assert image.shape[1:] == _dims(classifier, "image") == _dims(ensemble, "image") == [28, 28, 1]
    outputs = {o.name: o.shape[1:] for o in session.get_outputs()}
    assert outputs == {"logits": _dims(classifier, "logits"), "embedding": _dims(classifier, "embedding")}
    assert _dims(ensemble, "probabilities") == [10] and _dims(ensemble, "embedding") == outputs["embedding"]
    labels = (REPOSITORY / model / "labels.txt").read_text().splitlines()
    assert labels == list(FASHION_LABELS)
    version = latest(REPOSITORY / model)
    assert spec_from_dict(json.loads((version / "spec.json").read_text())) == FASHION
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
