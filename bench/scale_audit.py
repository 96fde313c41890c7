"""Count the API requests one user made, from the kube-apiserver's audit log.

The bed's apiserver is started with a policy that logs, at ``Metadata`` level, only the
requests of one user (the operator's ServiceAccount) — every request once, at the stage it
completes (``ResponseComplete``; a watch also logs ``ResponseStarted`` when it opens, and
that is when it is counted). Format: one JSON ``audit.k8s.io/v1`` Event per line
(``--audit-log-format=json``, Kubernetes "Auditing" docs).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: Verbs that change an object.
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def audit_args(workdir: Path, username: str) -> tuple[str, ...]:
    """kube-apiserver flags that log ``username``'s requests to ``workdir/audit.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": [username]}, {"level": "None"}],
    }, sort_keys=False))
    return (f"--audit-policy-file={policy}", f"--audit-log-path={workdir / 'audit.log'}",
            "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0")


@dataclass
class Requests:
    """Requests seen in one window of the log.

    ``by_kind`` counts "verb resource[/subresource]"; ``writes`` counts, per object name of
    ``resource``, the write requests (create/update/patch/delete) to it.
    """

    by_kind: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """All requests."""
        return sum(self.by_kind.values())


class AuditLog:
    """Reads ``path`` incrementally: each `take` returns the requests logged since the last."""

    def __init__(self, path: Path, resource: str) -> None:
        self.path = path
        self.resource = resource
        self.offset = 0
        self._seen: set[str] = set()

    def take(self) -> Requests:
        """Requests completed since the previous call (watches: since they opened)."""
        found = Requests()
        if not self.path.exists():
            return found
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next take
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            verb, stage = event.get("verb", ""), event.get("stage")
            if stage != "ResponseComplete" and not (verb == "watch"
                                                    and stage == "ResponseStarted"):
                continue
            if event["auditID"] in self._seen:
                continue  # a watch logged at open and again at close
            self._seen.add(event["auditID"])
            ref = event.get("objectRef") or {}
            kind = ref.get("resource", event.get("requestURI", "?"))
            if ref.get("subresource"):
                kind += "/" + ref["subresource"]
            found.by_kind[f"{verb} {kind}"] += 1
            if (verb in WRITE_VERBS and ref.get("resource") == self.resource
                    and not ref.get("subresource")):
                found.writes[ref.get("name", "")] += 1
        return found
