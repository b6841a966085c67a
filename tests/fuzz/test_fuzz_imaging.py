"""Property-based fuzzing of the decode/preprocess path, in process (``services.preprocess.imaging.preprocess``).

Properties, for every input: the only exception is :class:`InvalidInput` (no crash), each call
returns within a time bound (no hang), and the process's peak memory grows by a bounded amount.
Valid images within the service's limits (pixel count, aspect ratio) must also be *accepted*, with
the model's input shape, so a decoder that refused everything could not pass.
Runs are derandomized in CI (the same examples every time); ``HYPOTHESIS_PROFILE=fuzz`` explores
new random examples for longer.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from devstack.stack import REPO_ROOT
from services.common.errors import InvalidInput
from services.common.spec import Spec
from services.preprocess.imaging import MAX_ASPECT_RATIO, Result, preprocess
from tests.fuzz.seeds import flat_png, seeds

MAX_PIXELS = 4_000_000
TIME_LIMIT_S = 3.0  # generous for 2 busy cores; a healthy call takes milliseconds to ~0.3 s at 4 Mpx
MEMORY_LIMIT_BYTES = 256 * 1024 * 1024  # 4 Mpx decoded is 12 MB; anything near this limit is a bomb
SPECS = [
    Spec(height=224, width=224, channels=3, crop="center", resize_shorter=256),
    Spec(height=28, width=28, channels=1, crop="object", background="dark"),
    Spec(height=224, width=224, channels=3, crop="stretch"),
]
SEEDS = seeds()
INTERESTING = [0, 1, 2, 7, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 16383, 16384, 40_000, 65_500,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]

settings.register_profile("ci", max_examples=250, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          database=DirectoryBasedExampleDatabase(str(REPO_ROOT / ".cache" / "hypothesis")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def peak_rss_reset() -> int | None:
    """Reset the kernel's peak-RSS mark of this process and return the current RSS (None if unsupported)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def check_bounded(data: bytes, spec: Spec) -> Result | InvalidInput:
    """Run ``preprocess`` once, assert the three properties and return its result or its refusal.

    Either outcome is allowed here; callers that know the input is valid assert which one it was
    (:func:`check_accepted`, :func:`check_refused`).
    """
    baseline = peak_rss_reset()
    started = time.perf_counter()
    outcome: Result | InvalidInput
    try:
        outcome = preprocess(data, spec, max_pixels=MAX_PIXELS)
    except InvalidInput as error:
        assert error.reason and error.message
        outcome = error
    else:
        assert outcome.pixels.shape == (spec.height, spec.width, spec.channels)
        assert outcome.pixels.dtype == np.uint8
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s"
    if baseline is not None:
        grown = _status_kib("VmHWM") * 1024 - baseline
        assert grown < MEMORY_LIMIT_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"
    return outcome


def check_accepted(data: bytes, spec: Spec) -> Result:
    """A valid image within the limits: bounded, and turned into the model's input (not refused)."""
    outcome = check_bounded(data, spec)
    assert isinstance(outcome, Result), f"a valid image was refused: {outcome.reason}: {outcome.message}"
    return outcome


def check_refused(data: bytes, spec: Spec, reason: str) -> None:
    """A valid image outside a documented limit: bounded, and refused for that reason."""
    outcome = check_bounded(data, spec)
    assert isinstance(outcome, InvalidInput), "an image outside the limits was accepted"
    assert outcome.reason == reason, (outcome.reason, outcome.message)


def within_limits(width: int, height: int) -> bool:
    """Whether the service must accept a valid ``width`` x ``height`` image (services/preprocess/imaging.py)."""
    return width * height <= MAX_PIXELS and max(width, height) <= MAX_ASPECT_RATIO * min(width, height)


@st.composite
def servable_shapes(draw: st.DrawFn) -> tuple[int, int]:
    """(width, height) of any size and orientation within the pixel and aspect-ratio limits, extremes included."""
    shorter = draw(st.integers(1, 2000))  # 2000 x 2000 is the pixel limit
    longest = min(4000, MAX_ASPECT_RATIO * shorter, MAX_PIXELS // shorter)
    longer = draw(st.one_of(st.just(longest), st.integers(shorter, longest)))
    return (longer, shorter) if draw(st.booleans()) else (shorter, longer)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A seed file with 1-4 mutations, biased towards the header where sizes and markers live."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.one_of(st.integers(0, min(len(data) - 1, 40)), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "integer", "truncate", "insert", "delete", "repeat"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "integer":
            width = draw(st.sampled_from([1, 2, 4]))
            number = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[pos:pos + width] = number.to_bytes(width, draw(st.sampled_from(["little", "big"])))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.mark.timeout(300)
@given(data=mutated_images(), spec=st.sampled_from(SPECS))
def test_mutated_images_fail_cleanly(data: bytes, spec: Spec) -> None:
    check_bounded(data, spec)


@pytest.mark.timeout(300)
@settings(max_examples=40)
@given(shape=servable_shapes(), channels=st.sampled_from([1, 3, 4]), spec=st.sampled_from(SPECS))
def test_valid_images_of_any_shape_are_accepted_and_stay_bounded(shape: tuple[int, int], channels: int,
                                                                 spec: Spec) -> None:
    """Odd shapes (1x20, 4000x200, 2000x2000, ...) within the limits are served and must not blow up the
    intermediate images; a flat image stays flat through every recipe."""
    width, height = shape
    assert within_limits(width, height), shape
    pixels = check_accepted(flat_png(width, height, channels), spec).pixels
    assert pixels.min() == pixels.max(), (shape, channels, spec)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_valid_seed_in_an_accepted_format_is_accepted(name: str) -> None:
    """The unmutated seeds are valid files: those in an accepted format are served, GIF/TIFF refused by format."""
    for spec in SPECS:
        if name.startswith(("gif", "tiff")):
            check_refused(SEEDS[name], spec, "unsupported_format")
        else:
            check_accepted(SEEDS[name], spec)


def test_extreme_shapes_stay_bounded() -> None:
    """The shapes a fuzzer finds first, kept as explicit regressions (each is a few hundred bytes): past the
    aspect-ratio limit they are refused for it, at the limits they are served."""
    noisy_bmp = cv2.imencode(".bmp", np.zeros((3000, 1, 3), np.uint8))[1].tobytes()
    for spec in SPECS:
        for width, height in [(1, 40_000), (40_000, 1), (2, 20_000), (3, 1_000_000)]:
            assert not within_limits(width, height)
            check_refused(flat_png(width, height), spec, "bad_aspect_ratio")
        check_refused(noisy_bmp, spec, "bad_aspect_ratio")
        for width, height in [(1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO, 1), (4000, 200), (200, 4000), (2000, 2000)]:
            assert within_limits(width, height)
            check_accepted(flat_png(width, height), spec)
