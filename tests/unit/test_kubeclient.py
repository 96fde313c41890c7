"""Every Kubernetes API call has a deadline: a server that accepts and never answers.

The "server" is a real loopback socket that accepts connections and then says nothing; the
clients are the real kubernetes client as the operator, the agent and ``layercache
status`` build it (`layercache.kubeclient`). Each call must fail within its timeout, not
hang (the old operator client hung for good, and so did the agent's watch).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from layercache import kubeclient
from layercache.agent.kubeapi import OwnObjectWatch

#: The read timeout the tests give the clients (seconds), and how long a call may take.
TIMEOUT = 1.0
BOUND = 10.0


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SilentServer, Path]]:
    server = SilentServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "silent",
        "clusters": [{"name": "silent", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "silent", "context": {"cluster": "silent", "user": "u",
                                                    "namespace": "ns"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kubeclient, "REQUEST_TIMEOUT", TIMEOUT)
    yield server, kubeconfig
    server.close()


def _bounded(call: Callable[[], Any]) -> BaseException:
    """Run ``call`` in a thread; it must raise within `BOUND` seconds. Returns the error."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:
            outcome.append(error)
        else:
            outcome.append(AssertionError("the call returned against a silent server"))

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"the call still hangs after {BOUND} s: no request timeout"
    assert time.monotonic() - started < BOUND
    return outcome[0]


def _timed_out(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error!r} {getattr(error, 'reason', '')}"
    return "timed out" in text.lower() or "timeout" in text.lower()


def test_the_operators_api_calls_time_out(silent: tuple[SilentServer, Path]) -> None:
    from layercache.controller.handlers.lifecycle import api_client
    from layercache.controller.kube import KubeApi

    kube = KubeApi(api_client())  # as the operator's start-up builds it
    error = _bounded(kube.nodes)  # a replan's first call
    assert _timed_out(error), repr(error)
    assert silent[0].accepted, "the client did connect to the silent server"


def test_the_agents_calls_and_its_watch_time_out(silent: tuple[SilentServer, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from layercache.agent.kubeapi import AgentKube
    from layercache.agent.nodespec import GROUP, PLURAL, VERSION
    from layercache.agent.settings import AgentSettings

    monkeypatch.setenv("NODE_NAME", "node-1")
    kube = AgentKube(AgentSettings())
    assert _timed_out(_bounded(kube.list_own))
    # A watch may stay quiet for the timeoutSeconds it asked for, then REQUEST_TIMEOUT more.
    started = time.monotonic()
    error = _bounded(lambda: kube.custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, watch=True, timeout_seconds=1, _preload_content=False))
    assert _timed_out(error), repr(error)
    assert time.monotonic() - started >= 1 + TIMEOUT - 0.2


def test_layercache_status_times_out(silent: tuple[SilentServer, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from layercache.cli import statusapi

    monkeypatch.setattr(statusapi, "REQUEST_TIMEOUT", TIMEOUT)
    api = statusapi.StatusApi(silent[1])
    assert api.default_namespace == "ns"
    error = _bounded(lambda: api.list_caches(None))
    assert isinstance(error, statusapi.StatusApiError)
    assert "cannot reach the API server" in str(error) and _timed_out(error), str(error)


@pytest.mark.parametrize(("url", "expected"), [
    ("https://k/api/v1/nodes", (TIMEOUT, TIMEOUT)),
    ("https://k/apis/g/v1/x?watch=true&timeoutSeconds=300", (TIMEOUT, 300 + TIMEOUT)),
    ("https://k/apis/g/v1/x?watch=True", (TIMEOUT, kubeclient.WATCH_DEFAULT_SECONDS + TIMEOUT)),
])
def test_request_timeout_lets_a_watch_wait_for_its_own_timeout(
        url: str, expected: tuple[float, float]) -> None:
    assert kubeclient.request_timeout(url, TIMEOUT) == expected


def test_own_object_watch_follows_again_after_a_watch_ends_normally() -> None:
    # A watch request ends without error at its timeout (WATCH_SECONDS): the thread must
    # watch again from the version reached, not die (it once did: an unset wait).
    loop = asyncio.new_event_loop()
    seen: list[str | None] = []

    class Kube:
        def list_own(self) -> tuple[dict[str, str], str]:
            return {"kind": "NodeLayerCache"}, "1"

    watch = OwnObjectWatch(Kube(), loop, lambda obj: None)  # type: ignore[arg-type]

    def follow(version: str) -> str:
        seen.append(version)
        if len(seen) == 2:
            watch._stop.set()
        return str(int(version) + 1)

    watch._follow = follow  # type: ignore[method-assign]
    watch.start()
    watch._thread.join(10)
    loop.close()
    assert not watch._thread.is_alive()
    assert seen == ["1", "2"]
