"""`osdface_rejected_total`: its label values are the error types marked as rejections in the
one error table, each present at 0 from start, and its HELP names exactly those."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.errors import ErrorKind
from service.metrics import Metrics


def test_every_rejection_reason_is_a_series_at_zero_from_start() -> None:
    text = Metrics().render()[0].decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "osdface_rejected"]
    reasons = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    expected = {kind.type for kind in ErrorKind if kind.rejection}
    assert reasons == dict.fromkeys(expected, 0.0)
    assert {"queue_full", "too_many_jobs", "deadline_exceeded"} <= expected
    named = family.documentation.split(":", 1)[1].strip(" .").split(", ")
    assert sorted(named) == sorted(expected)
