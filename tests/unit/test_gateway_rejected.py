"""``shopvision_gateway_rejected_total`` exists at 0 for every reason the gateway can count a refusal under.

The gateway counts ``INVALID_ARGUMENT`` refusals (server.py ``observe``): its own ``InvalidInput`` reasons, read
here from the code itself, and the preprocess service's, which preprocess_client.py passes on ("image" when the
service named none). A new reason that is not in ``metrics.REJECT_REASONS`` fails here.
"""
from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from services.gateway import metrics as gateway_metrics
from services.preprocess import metrics as preprocess_metrics
from tests.unit.test_metrics_labels import invalid_input_reasons

SERVICES = Path(__file__).resolve().parents[2] / "services"


def test_every_reason_the_gateway_counts_is_initialised_at_zero() -> None:
    own = invalid_input_reasons(SERVICES / "gateway", SERVICES / "common" / "errors.py",
                                SERVICES / "common" / "spec.py")
    passed_on = set(preprocess_metrics.REJECT_REASONS) | {"image"}
    known = set(gateway_metrics.REJECT_REASONS)
    assert own <= known, f"not initialised: {sorted(own - known)}"
    assert passed_on <= known, f"not initialised: {sorted(passed_on - known)}"
    assert len(gateway_metrics.REJECT_REASONS) == len(known), "a reason is listed twice"
    for reason in known:
        assert REGISTRY.get_sample_value("shopvision_gateway_rejected_total", {"reason": reason}) is not None, reason
