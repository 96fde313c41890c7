"""Leader election of the operator replicas: a `coordination.k8s.io` Lease in their namespace.

The Kubernetes convention (client-go's leaderelection, controller-runtime): every replica
is a candidate for one Lease in the release namespace; the holder renews it every
`retry_period` seconds, the others take it once it went `lease_duration` seconds without a
renewal (as they observed it, so clocks need not agree), or at once when the holder released
it on a clean shutdown. No cluster-scoped object is shared with other operators.

The election itself is the kubernetes client's `kubernetes.leaderelection` (its LeaseLock,
create/get/update with the Lease's resourceVersion, so two candidates never both win). It
runs in a daemon thread (it is blocking); `LeaseElection` bridges it to asyncio. Two things
are added around it, both for safety:

- every API error of the lock is an unsuccessful attempt (the library lets a connection
  error kill its thread, which would leave a leader that no longer renews: two writers);
- the holder stops renewing before it releases, and a released election never takes the
  Lease again.

kopf runs only while this replica leads (layercache.controller.main): a replica that loses
the Lease stops kopf and exits, and its Pod restarts as a fresh candidate (as
controller-runtime managers do), so a stale replica never writes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

__all__ = ["LEASE_DURATION_SECONDS", "RENEW_DEADLINE_SECONDS", "RETRY_PERIOD_SECONDS",
           "LeaseElection"]

log = logging.getLogger("layercache.controller.leadership")

#: client-go's defaults: a crashed leader is replaced within about 15 + 2 seconds.
LEASE_DURATION_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_PERIOD_SECONDS = 2


class _Lock(LeaseLock):
    """The library's LeaseLock on our ApiClient (its deadlines), never raising, closable."""

    def __init__(self, api: client.ApiClient, name: str, namespace: str, identity: str) -> None:
        super().__init__(name, namespace, identity)  # type: ignore[no-untyped-call]
        self.api_instance = client.CoordinationV1Api(api)
        self.closed = threading.Event()

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        try:
            found, record = super().get(name, namespace)  # type: ignore[no-untyped-call]
        except Exception as exc:  # e.g. the apiserver unreachable: one failed attempt
            log.warning("Lease %s/%s unreadable: %s", namespace, name, exc)
            return False, exc
        status = getattr(record, "status", None) if not found else None
        if status not in (None, 404):  # the library logs this at INFO only
            log.warning("Lease %s/%s unreadable: HTTP %s %s", namespace, name, status,
                        getattr(record, "reason", ""))
        return bool(found), record

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        return self._write("created", name, namespace,
                           lambda: LeaseLock.create(self, name, namespace, election_record))

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        return self._write("renewed", name, namespace,
                           lambda: LeaseLock.update(self, name, namespace, updated_record))

    def _write(self, what: str, name: str, namespace: str, write: Callable[[], Any]) -> bool:
        """One create or update of the library's; False once closed, or on any error."""
        if self.closed.is_set():
            return False
        try:
            return bool(write())
        except Exception as exc:
            log.warning("Lease %s/%s not %s: %s", namespace, name, what, exc)
            return False


class LeaseElection:
    """One candidate for Lease `namespace/name`, as `identity` (unique per process).

    Use: `await election.leading()` returns once this replica holds the Lease; the
    `lost` event is set when it could not renew it within the renew deadline (or the
    election thread failed); `release()` on a clean shutdown hands it over at once.
    """

    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, *,
                 lease_duration: int = LEASE_DURATION_SECONDS,
                 renew_deadline: int = RENEW_DEADLINE_SECONDS,
                 retry_period: int = RETRY_PERIOD_SECONDS) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self._api = api
        self._lock = _Lock(api, name, namespace, identity)
        self._config = electionconfig.Config(
            self._lock, lease_duration, renew_deadline, retry_period,
            self._started, self._stopped)
        self._leading = asyncio.Event()
        self.lost = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _started(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._leading.set)

    def _stopped(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.lost.set)

    def _run(self) -> None:
        try:
            leaderelection.LeaderElection(self._config).run()
        except BaseException:
            log.exception("leader election of Lease %s/%s failed", self.namespace, self.name)
        finally:
            self._stopped()  # run() returns only when leadership ended (or never began)

    async def leading(self) -> None:
        """Start the election thread and return once this replica holds the Lease.

        Raises:
            RuntimeError: the election ended without this replica ever leading.
        """
        self._loop = asyncio.get_running_loop()
        # A daemon thread: the library's wait for the Lease cannot be interrupted, and it
        # must not keep a stopping process alive.
        threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True).start()
        lost = asyncio.ensure_future(self.lost.wait())
        leading = asyncio.ensure_future(self._leading.wait())
        await asyncio.wait([lost, leading], return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        leading.cancel()
        if not self._leading.is_set():
            raise RuntimeError(f"leader election of Lease {self.namespace}/{self.name} ended")

    def release(self) -> None:
        """Stop renewing and, if this replica holds the Lease, hand it over (blocking).

        As client-go's ReleaseOnCancel: holderIdentity is cleared and leaseDurationSeconds
        set to 1, so a standby takes over on its next attempt instead of waiting the whole
        lease duration. Errors are logged: the Lease then simply expires.
        """
        self._lock.closed.set()
        api = client.CoordinationV1Api(self._api)
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.datetime.now(datetime.UTC)
            api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning("Lease %s/%s not released (it expires instead): %s",
                        self.namespace, self.name, exc)
