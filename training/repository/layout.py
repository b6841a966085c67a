"""Model-repository layout of a published classifier (pure file work, no Triton calls).

A public model ``<name>`` is two Triton models plus the shared softmax:

* ``<name>_onnx``: the ONNX classifier (``backend: "onnxruntime"``), versions
  ``<n>/model.onnx``, only the latest version loaded;
* ``<name>``: the public ensemble (``shopvision.public``) with the preprocessing
  recipe (``preprocess.*`` + the ``image`` dims), ``labels.txt`` beside its
  config, and one version folder per published version holding that version's
  model card, metrics and plots. The gateway reports the ensemble's version.

A fused model runs two published classifiers on the same input and averages
their probabilities in a small Python model ``<fused>_combine``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
    """One above the highest version of the ensemble and its classifier."""
    existing = versions(repository / model) + versions(repository / classifier_name(model))
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


def _parameters(spec: Spec) -> str:
    lines = ['parameters { key: "shopvision.public" value: { string_value: "true" } }']
    lines += [f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
              for key, value in spec_parameters(spec).items()]
    return "\n".join(lines) + "\n"


def _public_ensemble(name: str, header: str, spec: Spec, num_classes: int, embedding_dim: int, steps: list[str],
                     max_batch_size: int) -> str:
    """A public ensemble's config: uint8 ``image`` in, ``probabilities`` (with labels) and ``embedding`` out,
    ``steps`` in order, the recipe as ``preprocess.*`` parameters."""
    image = (spec.height, spec.width, spec.channels)
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
""" + _parameters(spec)


def ensemble_config(model: str, spec: Spec, num_classes: int, embedding_dim: int, description: str,
                    max_batch_size: int = 64) -> str:
    header = f"""# Public model "{model}": {description}
# Written by `python -m training.publish`. classifier -> softmax; labels.txt feeds
# the classification extension. The "preprocess.*" parameters and the image dims
# are this model's preprocessing recipe: training reads them from here, the
# gateway reads them from Triton and the preprocess service applies them."""
    steps = [f"""    {{
      model_name: "{classifier_name(model)}"
      model_version: -1
      input_map {{ key: "image" value: "image" }}
      output_map {{ key: "logits" value: "logits" }}
      output_map {{ key: "embedding" value: "embedding" }}
    }}""", f"""    {{
      model_name: "{SOFTMAX}"
      model_version: -1
      input_map {{ key: "logits" value: "logits" }}
      output_map {{ key: "probabilities" value: "probabilities" }}
    }}"""]
    return _public_ensemble(model, header, spec, num_classes, embedding_dim, steps, max_batch_size)


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
                 description: str, max_batch_size: int = 64) -> str:
    """Ensemble running every member's classifier on the same image; the embedding is the first member's."""
    steps = []
    for i, member in enumerate(members):
        embedding = '\n      output_map { key: "embedding" value: "embedding" }' if i == 0 else ""
        steps.append(f"""    {{
      model_name: "{classifier_name(member)}"
      model_version: -1
      input_map {{ key: "image" value: "image" }}
      output_map {{ key: "logits" value: "logits_{i}" }}{embedding}
    }}""")
    combine_inputs = "\n".join(f'      input_map {{ key: "logits_{i}" value: "logits_{i}" }}'
                               for i in range(len(members)))
    steps.append(f"""    {{
      model_name: "{fused}{COMBINE_SUFFIX}"
      model_version: -1
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
