"""Start, watch and stop the bed's processes, each in its own session with a log file.

Every component is a child process started with `start_new_session=True`, so that stopping
it (SIGTERM, then SIGKILL after a grace period) reaches its whole process group, and so that
`testbed-down` in another Python process can stop it from the PID recorded in the state file.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Lines of a component's log shown when it fails to come up.
LOG_TAIL_LINES = 40


class ComponentError(RuntimeError):
    """A bed component exited early or did not become ready in time; carries its log tail."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default lower bound


#: Ports `free_port` handed out in this process: not handed out twice (two components
#: started one after the other would otherwise both get one not bound yet).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Return a TCP port free now on every address, below the ephemeral range.

    Not the kernel's `bind(0)` choice: that comes from the ephemeral range, which every
    outgoing connection also draws its local port from, so between this call and the
    component's own bind a client socket could take it ("address already in use"). Checked
    on the wildcard address, since components bind 0.0.0.0 (the operator's metrics), and
    one free on 127.0.0.1 may be bound on a bed bridge's address. Never the same port twice
    in one process.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)  # noqa: S311 - not crypto
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise OSError("no free TCP port below the ephemeral range")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of the log at `path` ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """Whether a process with `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Field 3, after the parenthesised command name, is the state; Z = zombie.
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def stop_group(pid: int, grace: float = 10.0) -> None:
    """Stop the process group led by `pid`: SIGTERM, wait up to `grace` seconds, then SIGKILL.

    Returns once no process of the group is left. Missing processes are not an error.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _group_alive(pid):
                return
            time.sleep(0.05)


def processes_naming(path: Path) -> dict[int, str]:
    """Processes (not this one) whose command line names a path below `path`.

    Returns PID -> command line (arguments joined by spaces). How the bed finds what it
    started from another process, or what a killed parent left behind (containerd shims).
    `path` itself does not count: the command that stops the bed names it (`--dir`).
    """
    needle = str(path.resolve()).encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if any(a.startswith(needle + b"/") or b"=" + needle + b"/" in a for a in argv):
                found[int(entry.name)] = b" ".join(argv).decode(errors="replace").strip()
    return found


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # Fields after the command name: state, ppid, pgrp.
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@dataclass
class Process:
    """One bed component: `argv` run with its output in `log`, stopped as a process group."""

    name: str
    argv: Sequence[str | os.PathLike[str]]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """PID of the running process (also its process-group ID)."""
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def start(self) -> Process:
        """Start the process in a new session; returns self."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [os.fspath(a) for a in self.argv], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, cwd=self.cwd, start_new_session=True,
            )
        return self

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        """Poll `check` until it returns True.

        Raises:
            ComponentError: the process exited, or `timeout` seconds passed; the message
                carries the exit status and the tail of the log.

        """
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if check():
                    return
            code = self.popen.poll() if self.popen else None
            if code is not None:
                raise ComponentError(
                    f"{self.name} exited with status {code} before it was ready; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise ComponentError(
                    f"{self.name} not ready after {timeout:.0f} s; log {self.log}:\n"
                    f"{log_tail(self.log)}"
                )
            time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process and its group (idempotent)."""
        if self.popen is None or self.popen.returncode is not None:
            return
        stop_group(self.popen.pid, grace)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # Still there after SIGTERM and SIGKILL rounds (e.g. stuck in uninterruptible
            # I/O under load): kill the leader once more and reap it, however long it takes.
            self.popen.kill()
            self.popen.wait()


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0,
        input: bytes | None = None, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> str:
    """Run a short command (in `cwd`, default ours) and return its stdout.

    Raises:
        ComponentError: non-zero exit; the message has the command and its stderr tail.

    """
    cmd = [os.fspath(a) for a in argv]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise ComponentError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{tail}")
    return proc.stdout.decode(errors="replace")
