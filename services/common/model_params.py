"""Names of the Triton config parameters through which the model repository tells the gateway about a model.

The model repository is the one source of truth the gateway reads (``get_model_config``): the preprocessing
recipe (``preprocess.*``, services/common/spec.py), whether a model is public, and for the model lifecycle:
which member versions a public version pins, its per-class confidence thresholds and reference distribution
(written by ``training.calibrate`` / ``training.publish``), and a rollout under way (a candidate ensemble named
``<model>__candidate`` whose parameters say whose candidate it is, canary or shadow, and the canary share).
Every value is a string (Triton's ``string_value``); JSON where it is structured.
"""
from __future__ import annotations

PUBLIC = "shopvision.public"  # "true" on the ensembles the gateway serves
# "fashion_effnet_onnx:4,postprocess_softmax:1": the member versions this public version pins (as its steps do).
MEMBERS = "shopvision.members"
# JSON list of floats, one per class in label order: the score at or above which an answer is ``confident``.
THRESHOLDS = "shopvision.thresholds"
THRESHOLD_RULE = "shopvision.threshold_rule"  # how they were chosen, e.g. "precision>=0.95 on validation"
# JSON {"class_share": [...], "score_edges": [...], "score_share": [...], "count": N, "split": "..."}: class
# frequencies and the top-1 score histogram of this version on its validation split (the drift reference).
REFERENCE = "shopvision.reference"

# Rollout: set on the candidate ensemble ``<model>__candidate`` (its Triton version = the public version number).
CANDIDATE_SUFFIX = "__candidate"
CANDIDATE_OF = "shopvision.rollout.candidate_of"  # the public model it is a candidate for
ROLLOUT_MODE = "shopvision.rollout.mode"  # "canary" or "shadow"
CANARY_PERCENT = "shopvision.rollout.percent"  # "0".."100": share of callers the canary answers
ROLLOUT_MODES = ("canary", "shadow")


def candidate_name(model: str) -> str:
    """The Triton model that holds ``model``'s candidate version during a rollout."""
    return f"{model}{CANDIDATE_SUFFIX}"
