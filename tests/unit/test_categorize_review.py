"""``tools.categorize.needs_review``: the gateway's ``confident`` flag decides, unless one --threshold is given."""
from __future__ import annotations

from tools import categorize


def test_review_follows_confident_by_default() -> None:
    assert categorize.needs_review([0.41, 0.3], confident=True, threshold=None, margin=0.0) is False
    assert categorize.needs_review([0.97, 0.01], confident=False, threshold=None, margin=0.0) is True
    assert categorize.needs_review([], confident=False, threshold=None, margin=0.0) is True


def test_an_explicit_threshold_replaces_the_per_class_ones() -> None:
    assert categorize.needs_review([0.97, 0.01], confident=False, threshold=0.5, margin=0.0) is False
    assert categorize.needs_review([0.41, 0.3], confident=True, threshold=0.5, margin=0.0) is True


def test_a_close_second_is_flagged_either_way() -> None:
    assert categorize.needs_review([0.55, 0.45], confident=True, threshold=None, margin=0.2) is True
    assert categorize.needs_review([0.55, 0.45], confident=True, threshold=0.5, margin=0.2) is True
    assert categorize.needs_review([0.9, 0.05], confident=True, threshold=None, margin=0.2) is False


def test_the_default_threshold_is_per_class() -> None:
    args = categorize.get_args_parser().parse_args(["fashion-mnist:test:5"])
    assert args.threshold is None
