"""CRI image calls against a node's containerd through `crictl`, as the kubelet makes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.paths import tool
from testbed.procs import run


def crictl(socket: str | Path, *args: str, timeout: float = 300) -> str:
    """Run the pinned `crictl` against the CRI endpoint at `socket`; returns stdout.

    Raises:
        ComponentError: crictl failed (the message has its stderr, e.g. a registry 401).
    """
    endpoint = f"unix://{socket}"
    return run([tool("crictl"), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                "--timeout", f"{int(timeout)}s", *args], timeout=timeout + 10)


def pull(socket: str | Path, image: str, creds: str | None = None) -> str:
    """CRI `PullImage` of `image` (with `user:password` if given); returns the image ref."""
    args = ["pull", *(["--creds", creds] if creds else []), image]
    return crictl(socket, *args).strip().rsplit(" ", 1)[-1]


def images(socket: str | Path) -> list[dict[str, Any]]:
    """CRI `ListImages`: each image's id, repoTags, repoDigests and size (bytes)."""
    listed: list[dict[str, Any]] = json.loads(crictl(socket, "images", "-o", "json"))["images"]
    return listed
