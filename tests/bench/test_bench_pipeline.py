"""The in-process pipeline row: the project's preprocessing + the model in one process, at tiny scale."""
from __future__ import annotations

import numpy as np

from bench import ceiling, pipeline
from bench.harness.data import ImageSet, jpeg_photo, model_spec, synthesize, tensors


def test_the_pipeline_classifies_like_the_served_recipe_and_reports_rates_and_cpu():
    jpegs = synthesize(640, 480).jpegs[:2]
    spec = model_spec()
    rows = pipeline.run(ceiling.DEFAULT_MODEL, jpegs, spec, (1, 2), threads=1, seconds=0.2)
    assert [(r.batch, r.threads) for r in rows] == [(1, 1), (2, 1)]
    for row in rows:
        assert row.images_per_s > 0 and row.runs >= 3
        assert row.cpu_ms_per_image > row.preprocess_ms_per_image > 0  # the model's CPU comes on top of decoding
        assert row.batch_p99_ms >= row.batch_p50_ms > 0
    # Same classes as the tensors the preprocess service makes of the same JPEGs (what the ceiling runs on).
    session = ceiling.session(ceiling.DEFAULT_MODEL, 1, spinning=False)
    pixels = np.stack(tensors(ImageSet(640, 480, jpegs), spec))
    from_tensors = session.run(["logits"], {session.get_inputs()[0].name: pixels})[0].argmax(axis=1)
    assert rows[0].top1 == tuple(int(c) for c in from_tensors)


def test_a_sample_photo_is_an_espresso():
    logits, preprocess_s = pipeline.step(ceiling.session(ceiling.DEFAULT_MODEL, 1), [jpeg_photo("coffee.png")],
                                         model_spec())
    assert int(logits[0].argmax()) == 967 and preprocess_s > 0
