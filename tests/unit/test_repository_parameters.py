"""``training.repository.parameters.set_parameters``: one-line config.pbtxt edits that Triton's parser reads back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from training.repository import layout
from training.repository.parameters import set_parameters

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
# Quotes, backslashes, a control character, non-ASCII text, braces: what a JSON value or a rule string may hold.
AWKWARD = json.dumps({"split": 'validation "held out" \\ 10 %', "labels": ["T-shirt/top", "Männer's"],
                      "tab": "a\tb"}, ensure_ascii=False) + "\n{}"


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("model", ["fashion_effnet", "fashion_fused", "fashion_cnn_onnx"])
def test_values_read_back_exactly_and_the_rest_is_byte_identical(model: str) -> None:
    original = (REPOSITORY / model / "config.pbtxt").read_text()
    before = parse(original)
    # Keys the served configs do not have yet (they may carry the real calibration parameters already).
    params = {"test.awkward": AWKWARD, "test.thresholds": "[0.5,2.0]"}
    assert not set(params) & set(before.parameters)
    updated = set_parameters(original, params)
    config = parse(updated)
    for key, value in params.items():
        assert config.parameters[key].string_value == value
    for key, value in before.parameters.items():
        assert config.parameters[key].string_value == value.string_value
    # Only lines were added: every original line is still there, in order.
    assert [line for line in updated.splitlines() if line in original.splitlines()] == original.splitlines()
    assert len(updated.splitlines()) == len(original.splitlines()) + 2
    # Setting them again changes only those lines, in place.
    again = set_parameters(updated, {"test.awkward": "{}", "test.thresholds": "[0.7]"})
    assert len(again.splitlines()) == len(updated.splitlines())
    assert parse(again).parameters["test.awkward"].string_value == "{}"
    assert [a for a, b in zip(again.splitlines(), updated.splitlines(), strict=True) if a != b] == [
        'parameters { key: "test.awkward" value: { string_value: "{}" } }',
        'parameters { key: "test.thresholds" value: { string_value: "[0.7]" } }']
    # The repository's own reader of one-line parameters agrees.
    assert layout.parameter_of(updated, "test.thresholds") == "[0.5,2.0]"
    assert set_parameters(updated, params) == updated


def test_a_new_key_goes_after_the_last_top_level_parameter() -> None:
    text = ('name: "m"\nparameters { key: "a" value: { string_value: "1" } }\n'
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n# trailing comment\n')
    updated = set_parameters(text, {"b": "2", "a": "one"})
    assert updated == ('name: "m"\nparameters { key: "a" value: { string_value: "one" } }\n'
                       'parameters { key: "b" value: { string_value: "2" } }\n'
                       'instance_group [ { count: 1 kind: KIND_CPU } ]\n# trailing comment\n')
    assert set_parameters('name: "m"', {"k": "v"}) == \
        'name: "m"\nparameters { key: "k" value: { string_value: "v" } }\n'


def test_repeated_keys_collapse_and_other_forms_are_refused() -> None:
    text = ('parameters { key: "a" value: { string_value: "1" } }\n'
            'parameters { key: "a" value: { string_value: "2" } }\n')
    assert set_parameters(text, {"a": "3"}) == 'parameters { key: "a" value: { string_value: "3" } }\n'
    multi_line = 'parameters {\n  key: "a"\n  value: { string_value: "1" }\n}\n'
    with pytest.raises(ValueError, match="one line"):
        set_parameters(multi_line, {"a": "2"})
    assert set_parameters(multi_line, {}) == multi_line
