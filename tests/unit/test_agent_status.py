"""The agent's status book and metrics, without I/O (own CollectorRegistry per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from layercache.agent.nodespec import Counters
from layercache.agent.status.report import MAX_ERROR_MESSAGE, MAX_ERRORS, StatusBook
from layercache.metrics import AgentGauges, AgentMetrics

SECRET = "s3cr3t-token"


def _book(counters: Counters | None = None) -> tuple[StatusBook, CollectorRegistry]:
    registry = CollectorRegistry()
    book = StatusBook(counters or Counters(), AgentMetrics("n1", registry), lambda: [SECRET])
    return book, registry


def _conditions(book: StatusBook) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in book.body()["conditions"]}


def test_nothing_is_claimed_before_the_first_inventory() -> None:
    book, _ = _book(Counters(1, 2, 3))
    book.peer_endpoint = "http://10.0.0.1:5780"
    assert book.body().keys() == {"bytes", "lastSync", "peerEndpoint"}
    assert book.body()["bytes"] == {"upstream": 1, "peer": 2, "servedToPeers": 3}


def test_conditions_follow_the_facts() -> None:
    book, _ = _book()
    book.synced, book.wanted, book.held, book.busy = True, 3, 1, True
    assert _conditions(book) == {"Ready": ("False", "LayersMissing"),
                                 "Progressing": ("True", "Fetching"),
                                 "Degraded": ("False", "AsExpected")}
    book.failing["sha256:x"] = book.error("DigestMismatch", "bad bytes", "sha256:x")
    assert _conditions(book)["Degraded"] == ("True", "DigestMismatch")
    book.pressure = ("DiskPressure", "full")
    assert _conditions(book)["Progressing"] == ("False", "DiskPressure")
    assert _conditions(book)["Degraded"] == ("True", "DiskPressure")
    assert book.body()["diskPressure"] is True
    book.pressure, book.failing, book.held, book.busy = None, {}, 3, False
    assert _conditions(book) == {"Ready": ("True", "AllLayersHeld"),
                                 "Progressing": ("False", "Complete"),
                                 "Degraded": ("False", "AsExpected")}
    book.images_pending = 1
    assert _conditions(book)["Ready"] == ("False", "ImagesPending")


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    book, _ = _book()
    book.synced, book.wanted = True, 1
    book.previous["Ready"] = {"type": "Ready", "status": "False",
                              "lastTransitionTime": "2020-01-01T00:00:00Z"}
    first = next(c for c in book.conditions() if c["type"] == "Ready")
    assert first["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    book.held = 1
    second = next(c for c in book.conditions() if c["type"] == "Ready")
    assert second["status"] == "True"
    assert second["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def test_errors_are_bounded_newest_first_scrubbed_and_counted() -> None:
    book, registry = _book()
    book.synced = True
    for number in range(MAX_ERRORS + 5):
        book.error("UpstreamUnavailable", f"attempt {number} with {SECRET}", "sha256:x")
    book.error("DigestMismatch", "x" * 2000)
    errors = book.body()["errors"]
    assert len(errors) == MAX_ERRORS
    assert errors[0]["reason"] == "DigestMismatch" and "digest" not in errors[0]
    assert len(errors[0]["message"]) == MAX_ERROR_MESSAGE
    assert errors[1]["message"] == f"attempt {MAX_ERRORS + 4} with <redacted>"
    assert registry.get_sample_value("layercache_agent_errors_total",
                                     {"node": "n1", "reason": "UpstreamUnavailable"}) == 25


def test_byte_counters_continue_and_feed_metrics() -> None:
    book, registry = _book(Counters(100, 200, 300))
    book.fetched("upstream", 5)
    book.fetched("peer", 7)
    book.served_bytes(11)
    assert book._bytes() == {"upstream": 105, "peer": 207, "servedToPeers": 311}
    # Metrics count this process's bytes; status carries the persisted totals.
    sample = registry.get_sample_value
    assert sample("layercache_agent_fetched_bytes_total", {"node": "n1", "source": "peer"}) == 7
    assert sample("layercache_agent_served_bytes_total", {"node": "n1"}) == 11
    assert book.changed.is_set()


def test_gauges_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics("n1", registry)
    now = AgentGauges(layers_wanted=4, layers_held=1, bytes_held=10, disk_pressure=False)
    metrics.track(lambda: now)
    assert registry.get_sample_value("layercache_agent_layers_held", {"node": "n1"}) == 1
    now = AgentGauges(layers_wanted=4, layers_held=4, bytes_held=40, disk_pressure=True)
    assert registry.get_sample_value("layercache_agent_layers_held", {"node": "n1"}) == 4
    assert registry.get_sample_value("layercache_agent_disk_pressure", {"node": "n1"}) == 1
    metrics.ingested("peer", ok=True, seconds=0.3)
    assert registry.get_sample_value("layercache_agent_ingest_duration_seconds_count",
                                     {"node": "n1", "source": "peer", "result": "ok"}) == 1


def test_every_ingest_series_exists_before_the_first_layer() -> None:
    # rate() counts only increases after a series' first scrape: a series created by its
    # first observation would hide that observation from the dashboard's latency panel.
    registry = CollectorRegistry()
    AgentMetrics("n1", registry)
    for source in ("upstream", "peer"):
        for result in ("ok", "error"):
            assert registry.get_sample_value(
                "layercache_agent_ingest_duration_seconds_count",
                {"node": "n1", "source": source, "result": result}) == 0


def test_byte_counts_in_si_units_for_kubectl_get() -> None:
    # `kubectl get nlc` printed raw byte counts (issue 10); its columns read status.human.
    book, _ = _book(Counters(63_400_000, 32_400_000, 0))
    book.synced, book.bytes_held = True, 95_800_000
    assert book.body()["human"] == {"bytesHeld": "95.8 MB", "upstream": "63.4 MB",
                                    "peer": "32.4 MB"}
