"""Tests for toolkit.core.protocol.topics: the topic table, id validation and parse_topic."""

from __future__ import annotations

import pytest

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol import topics


def test_topic_table() -> None:
    assert topics.act_topic("r1", "dev-1") == "hiertrain/r1/dev-1/act"
    assert topics.weights_topic("r1", "dev-1") == "hiertrain/r1/dev-1/weights"
    assert topics.status_topic("r1", "dev-1") == "hiertrain/r1/dev-1/status"
    assert topics.infer_request_topic("r1", "dev-1") == "hiertrain/r1/dev-1/infer"
    assert topics.infer_reply_topic("r1", "dev-1") == "hiertrain/r1/dev-1/infer/reply"


def test_wildcards() -> None:
    assert topics.act_wildcard("r1") == "hiertrain/r1/+/act"
    assert topics.status_wildcard("r1") == "hiertrain/r1/+/status"
    assert topics.infer_request_wildcard("r1") == "hiertrain/r1/+/infer"
    assert topics.wildcard("r1", topics.INFER_REPLY) == "hiertrain/r1/+/infer/reply"
    assert topics.wildcard("r1", topics.WEIGHTS) == "hiertrain/r1/+/weights"


@pytest.mark.parametrize("kind", topics.KINDS)
def test_parse_inverts_topic(kind: str) -> None:
    for run, device in (("r", "d"), ("run_2024.01-a", "A" * 64), ("0", "pi.4")):
        assert topics.parse_topic(topics.topic(run, device, kind)) == (run, device, kind)


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+b", "a#", "+", "#", "a b", "é", "x" * 65, "a\n", "tab\t", None, 5],
)
def test_invalid_ids_are_rejected(bad: object) -> None:
    with pytest.raises(HiertrainError, match="invalid run id"):
        topics.act_topic(bad, "dev")  # type: ignore[arg-type]
    with pytest.raises(HiertrainError, match="invalid device id"):
        topics.status_topic("run", bad)  # type: ignore[arg-type]
    with pytest.raises(HiertrainError):
        topics.act_wildcard(bad)  # type: ignore[arg-type]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(HiertrainError, match="unknown topic kind"):
        topics.topic("r", "d", "logs")
    with pytest.raises(HiertrainError, match="unknown topic kind"):
        topics.wildcard("r", "infer/reply")  # the suffix is not the kind


@pytest.mark.parametrize(
    "foreign",
    [
        "",
        "hiertrain",
        "hiertrain/r/d",
        "hiertrain/r/d/",
        "hiertrain/r/d/logs",
        "hiertrain/r/d/infer/other",
        "hiertrain/r/d/act/extra",
        "hiertrain/r/+/act",
        "hiertrain/#",
        "hiertrain//d/act",
        "hiertrain/r//act",
        "other/r/d/act",
        "/hiertrain/r/d/act",
        "Hiertrain/r/d/act",
        "hiertrain/r/d/act\n",
        "hiertrain/" + "x" * 65 + "/d/act",
        b"hiertrain/r/d/act",
        None,
    ],
)
def test_parse_rejects_foreign_topics(foreign: object) -> None:
    with pytest.raises(WireError) as exc:
        topics.parse_topic(foreign)  # type: ignore[arg-type]
    assert exc.value.reason == "topic"
