"""Model-repository layout of a published classifier (pure file work, no Triton calls).

A public model ``<name>`` is two Triton models plus the shared softmax:

* ``<name>_onnx``: the ONNX classifier (``backend: "onnxruntime"``), versions
  ``<n>/model.onnx``, only the latest version loaded;
* ``<name>``: the public ensemble (``shopvision.public``) with the preprocessing
  recipe (``preprocess.*`` + the ``image`` dims), ``labels.txt`` beside its
  config, and one version folder per published version holding that version's
  model card, metrics and plots. The gateway reports the ensemble's version.
  Its steps name the member versions they run (never ``-1``) and the parameter
  ``shopvision.members`` lists them, so a public version means one set of weights.
* during a rollout, ``<name>__candidate``: the same ensemble pinned to the
  candidate's members, its version folder numbered as the candidate's public
  version, with ``shopvision.rollout.*`` parameters instead of ``shopvision.public``
  (``training.rollout`` promotes it into ``<name>`` or removes it).

A fused model runs two published classifiers on the same input and averages
their probabilities in a small Python model ``<fused>_combine``.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.common import model_params
from services.common.spec import Spec
from training.repository.recipe import spec_parameters

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
CLASSIFIER_SUFFIX = "_onnx"
COMBINE_SUFFIX = "_combine"
SOFTMAX = "postprocess_softmax"
# The public ImageNet model (the gateway's default), written by ``training.export_imagenet``; bench/ uses it too.
IMAGENET_ENSEMBLE = "efficientnet_lite0_imagenet"
# The one copy of the combine step's Triton model; every fused model gets a copy of this file.
COMBINE_SOURCE = REPOSITORY / "fashion_fused_combine" / "1" / "model.py"
# A step of an ensemble config as these writers (and the committed configs) lay it out.
_STEP_VERSION = re.compile(r'(model_name: "([^"]+)"(\s*\n\s*)model_version: )(-?\d+)')


def classifier_name(model: str) -> str:
    return model + CLASSIFIER_SUFFIX


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest(model_dir: Path) -> Path:
    """The highest-numbered version folder of ``model_dir``: the one Triton serves under the "latest 1" policy."""
    found = versions(model_dir)
    if not found:
        raise FileNotFoundError(f"{model_dir} has no version folder")
    return model_dir / str(found[-1])


def next_version(repository: Path, model: str) -> int:
    """One above the highest version of the ensemble, its candidate and its classifier."""
    existing = (versions(repository / model) + versions(repository / model_params.candidate_name(model))
                + versions(repository / classifier_name(model)))
    return max(existing, default=0) + 1


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file and a rename, so Triton never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _dims(values: tuple[int, ...] | list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def classifier_config(model: str, spec: Spec, num_classes: int, embedding_dim: int, description: str,
                      max_batch_size: int = 64, threads: int = 1, instances: int = 1,
                      queue_delay_us: int = 1000) -> str:
    image = (spec.height, spec.width, spec.channels)
    return f"""# {description}
# Written by `python -m training.publish`. The graph takes uint8 NHWC pixels and
# normalises them itself; outputs: logits and the embedding before the head.
# Two versions stay loaded: catalogs embedded by the older one search with it until tools.reembed moves them.
name: "{classifier_name(model)}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "image" data_type: TYPE_UINT8 dims: {_dims(image)} }}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ {num_classes} ] }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {embedding_dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
version_policy: {{ latest: {{ num_versions: 2 }} }}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}
"""


@dataclass(frozen=True)
class Rollout:
    """What makes an ensemble a candidate: whose, canary or shadow, and the canary's share of callers."""

    candidate_of: str
    mode: str = "canary"
    percent: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in model_params.ROLLOUT_MODES:
            raise ValueError(f"rollout mode {self.mode!r} is not one of {model_params.ROLLOUT_MODES}")
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"canary percent {self.percent} is not within 0..100")

    def parameters(self) -> dict[str, str]:
        return {model_params.CANDIDATE_OF: self.candidate_of, model_params.ROLLOUT_MODE: self.mode,
                model_params.CANARY_PERCENT: f"{self.percent:g}"}


def parameter_line(key: str, value: str) -> str:
    """One ``parameters`` entry in the one-line form every config here uses (``value`` escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters {{ key: "{key}" value: {{ string_value: "{escaped}" }} }}'


def members_value(members: list[tuple[str, int]]) -> str:
    """``shopvision.members`` of pinned steps: "fashion_cnn_onnx:3,postprocess_softmax:1"."""
    return ",".join(f"{name}:{version}" for name, version in members)


def parse_members(value: str) -> list[tuple[str, int]]:
    """The inverse of :func:`members_value`."""
    members = []
    for item in value.split(","):
        name, sep, version = item.strip().rpartition(":")
        if not sep or not name or not version.isdigit():
            raise ValueError(f"{model_params.MEMBERS}={value!r}: expected 'model:version,model:version'")
        members.append((name, int(version)))
    return members


def _parameters(spec: Spec, members: list[tuple[str, int]], rollout: Rollout | None = None) -> str:
    if rollout is None:
        lines = [parameter_line(model_params.PUBLIC, "true")]
    else:
        lines = [parameter_line(key, value) for key, value in rollout.parameters().items()]
    lines.append(parameter_line(model_params.MEMBERS, members_value(members)))
    lines += [parameter_line(key, value) for key, value in spec_parameters(spec).items()]
    return "\n".join(lines) + "\n"


def _step_members(steps: list[str]) -> list[tuple[str, int]]:
    found = []
    for step in steps:
        match = _STEP_VERSION.search(step)
        if match is None:
            raise ValueError(f"ensemble step without model_name / model_version: {step}")
        found.append((match.group(2), int(match.group(4))))
    return found


def _public_ensemble(name: str, header: str, spec: Spec, num_classes: int, embedding_dim: int, steps: list[str],
                     max_batch_size: int, rollout: Rollout | None = None) -> str:
    """A public ensemble's config: uint8 ``image`` in, ``probabilities`` (with labels) and ``embedding`` out,
    ``steps`` in order (pinned), the members and the recipe as parameters; a candidate's with ``rollout``."""
    image = (spec.height, spec.width, spec.channels)
    members = _step_members(steps)
    unpinned = [member for member, version in members if version < 1]
    if unpinned:
        raise ValueError(f"{name}: steps {unpinned} are not pinned to a version")
    joined = ",\n".join(steps)
    return f"""{header}
name: "{name}"
platform: "ensemble"
max_batch_size: {max_batch_size}
input [
  {{ name: "image" data_type: TYPE_UINT8 dims: {_dims(image)} }}
]
output [
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {num_classes} ] label_filename: "labels.txt" }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {embedding_dim} ] }}
]
ensemble_scheduling {{
  step [
{joined}
  ]
}}
version_policy: {{ latest: {{ num_versions: 1 }} }}
""" + _parameters(spec, members, rollout)


def ensemble_config(model: str, spec: Spec, num_classes: int, embedding_dim: int, description: str,
                    max_batch_size: int = 64, *, classifier_version: int = 1, softmax_version: int = 1,
                    rollout: Rollout | None = None) -> str:
    """``model``'s public ensemble pinned to ``classifier_version`` of its classifier (or, with ``rollout``,
    its candidate ``<model>__candidate``)."""
    header = f"""# Public model "{model}": {description}
# Written by `python -m training.publish`. classifier -> softmax; labels.txt feeds
# the classification extension. The "preprocess.*" parameters and the image dims
# are this model's preprocessing recipe: training reads them from here, the
# gateway reads them from Triton and the preprocess service applies them."""
    steps = [f"""    {{
      model_name: "{classifier_name(model)}"
      model_version: {classifier_version}
      input_map {{ key: "image" value: "image" }}
      output_map {{ key: "logits" value: "logits" }}
      output_map {{ key: "embedding" value: "embedding" }}
    }}""", f"""    {{
      model_name: "{SOFTMAX}"
      model_version: {softmax_version}
      input_map {{ key: "logits" value: "logits" }}
      output_map {{ key: "probabilities" value: "probabilities" }}
    }}"""]
    name = model if rollout is None else model_params.candidate_name(model)
    return _public_ensemble(name, header, spec, num_classes, embedding_dim, steps, max_batch_size, rollout)


def combine_config(fused: str, members: int, weights: list[float], max_batch_size: int = 64) -> str:
    inputs = ",\n".join(f'  {{ name: "logits_{i}" data_type: TYPE_FP32 dims: [ -1 ] }}' for i in range(members))
    return f"""# Weighted mean of the members' softmax probabilities, for the fused model "{fused}".
name: "{fused}{COMBINE_SUFFIX}"
backend: "python"
max_batch_size: {max_batch_size}
input [
{inputs}
]
output [
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ -1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "weights" value: {{ string_value: "{','.join(f'{w:g}' for w in weights)}" }} }}
"""


def fused_config(fused: str, members: list[str], spec: Spec, num_classes: int, embedding_dim: int,
                 description: str, max_batch_size: int = 64, *, member_versions: list[int] | None = None,
                 combine_version: int = 1) -> str:
    """Ensemble running every member's classifier (``member_versions`` of them, default 1 each) on the same
    image; the embedding is the first member's."""
    pinned = member_versions or [1] * len(members)
    if len(pinned) != len(members):
        raise ValueError(f"{len(pinned)} member versions for {len(members)} members")
    steps = []
    for i, (member, member_version) in enumerate(zip(members, pinned, strict=True)):
        embedding = '\n      output_map { key: "embedding" value: "embedding" }' if i == 0 else ""
        steps.append(f"""    {{
      model_name: "{classifier_name(member)}"
      model_version: {member_version}
      input_map {{ key: "image" value: "image" }}
      output_map {{ key: "logits" value: "logits_{i}" }}{embedding}
    }}""")
    combine_inputs = "\n".join(f'      input_map {{ key: "logits_{i}" value: "logits_{i}" }}'
                               for i in range(len(members)))
    steps.append(f"""    {{
      model_name: "{fused}{COMBINE_SUFFIX}"
      model_version: {combine_version}
{combine_inputs}
      output_map {{ key: "probabilities" value: "probabilities" }}
    }}""")
    header = f"""# Public model "{fused}": {description}
# Written by `python -m training.publish --fuse`. Members: {', '.join(members)}."""
    return _public_ensemble(fused, header, spec, num_classes, embedding_dim, steps, max_batch_size)


def copy_files(files: list[Path], folder: Path) -> list[Path]:
    """Copy existing ``files`` into ``folder`` (atomically each); returns the copies."""
    copies = []
    for file in files:
        if file.exists():
            write_atomic(folder / file.name, file.read_bytes())
            copies.append(folder / file.name)
    return copies


def install_combine_model(repository: Path, fused: str, members: int, weights: list[float],
                          source: Path = COMBINE_SOURCE) -> Path:
    """``<fused>_combine``: a copy of the one combine model file (``source``) and its config."""
    model_dir = repository / f"{fused}{COMBINE_SUFFIX}"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    # Read, then written atomically: also right when the target is the source itself (fashion_fused republished
    # into model_repository/).
    write_atomic(model_dir / "1" / "model.py", source.read_bytes())
    write_atomic(model_dir / "config.pbtxt", combine_config(fused, members, weights))
    return model_dir


# -- edits of an existing ensemble config (text in, text out: comments, layout and other parameters kept) ---------
_NAME_LINE = re.compile(r'^name: "([^"]*)"$', re.MULTILINE)


def _parameter_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf'^parameters \{{ key: "{re.escape(key)}" value: \{{ string_value: "(.*)" \}} \}}$\n?',
                      re.MULTILINE)


def parameter_of(text: str, key: str) -> str | None:
    """The value of parameter ``key`` in a config written in the one-line form (None when absent)."""
    match = _parameter_pattern(key).search(text)
    return None if match is None else match.group(1).replace('\\"', '"').replace("\\\\", "\\")


def without_parameter(text: str, key: str) -> str:
    return _parameter_pattern(key).sub("", text)


def with_parameter(text: str, key: str, value: str) -> str:
    """``text`` with parameter ``key`` set to ``value``: in place when present, else after the last parameter."""
    line = parameter_line(key, value)
    pattern = _parameter_pattern(key)
    if pattern.search(text):
        return pattern.sub(lambda _: line + "\n", text, count=1)
    last = None
    for match in re.finditer(r"^parameters \{.*\}$", text, re.MULTILINE):
        last = match
    if last is None:
        return text.rstrip("\n") + "\n" + line + "\n"
    return text[:last.end()] + "\n" + line + text[last.end():]


def step_members(text: str) -> list[tuple[str, int]]:
    """(model, version) of every step of an ensemble config, in order."""
    return [(match.group(2), int(match.group(4))) for match in _STEP_VERSION.finditer(text)]


def pinned(text: str, versions: dict[str, int]) -> str:
    """``text`` with the steps of the models in ``versions`` pinned to those versions and
    ``shopvision.members`` matching the steps."""
    def pin(match: re.Match[str]) -> str:
        version = versions.get(match.group(2))
        return match.group(0) if version is None else f"{match.group(1)}{version}"

    text = _STEP_VERSION.sub(pin, text)
    return with_parameter(text, model_params.MEMBERS, members_value(step_members(text)))


def renamed(text: str, name: str) -> str:
    if not _NAME_LINE.search(text):
        raise ValueError("config has no top-level name line")
    return _NAME_LINE.sub(f'name: "{name}"', text, count=1)


def as_candidate(public_text: str, model: str, rollout: Rollout) -> str:
    """The candidate ``<model>__candidate`` made from a public ensemble's config (the steps still to be pinned)."""
    text = renamed(public_text, model_params.candidate_name(model))
    lines = "".join(parameter_line(key, value) + "\n" for key, value in rollout.parameters().items())
    public = _parameter_pattern(model_params.PUBLIC)
    if public.search(text):  # the rollout parameters take the place of shopvision.public
        return public.sub(lambda _: lines, text, count=1)
    for key, value in rollout.parameters().items():
        text = with_parameter(text, key, value)
    return text


def as_public(candidate_text: str, model: str) -> str:
    """``model``'s public config made from its candidate's: the same steps, members and other parameters."""
    text = renamed(candidate_text, model)
    candidate_of = _parameter_pattern(model_params.CANDIDATE_OF)
    public = parameter_line(model_params.PUBLIC, "true") + "\n"
    text = (candidate_of.sub(lambda _: public, text, count=1) if candidate_of.search(text)
            else with_parameter(text, model_params.PUBLIC, "true"))
    for key in (model_params.ROLLOUT_MODE, model_params.CANARY_PERCENT):
        text = without_parameter(text, key)
    return text


def rollout_of(text: str) -> Rollout | None:
    """The rollout parameters of a candidate's config (None when it is no candidate)."""
    candidate_of = parameter_of(text, model_params.CANDIDATE_OF)
    if not candidate_of:
        return None
    return Rollout(candidate_of, parameter_of(text, model_params.ROLLOUT_MODE) or "canary",
                   float(parameter_of(text, model_params.CANARY_PERCENT) or 0.0))
