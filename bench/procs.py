"""Processes the bench starts: started in their own process group, always stopped.

Every server runs as a subprocess in a new session, so stopping it reaches
its workers too (SIGTERM to the group, SIGKILL after a grace period). A
``Processes`` stack is a context manager: whatever happens inside (errors,
Ctrl-C, SIGTERM), everything it started is gone when the block exits.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable


def tool(name: str) -> str:
    """A console script next to this interpreter (envoy, authsvc), else from PATH."""
    candidate = Path(PYTHON).parent / name
    return str(candidate) if candidate.exists() else name


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


#: Ports are picked below the kernel's ephemeral range, where no outgoing connection takes one
#: between the pick and the server's bind (a port from ``bind(0)`` is in that range: it did happen).
_LOW, _HIGH = 10_000, _ephemeral_low()
_ROOM_BELOW = _HIGH - _LOW > 1000  # else (a system with a low ephemeral range) any port the kernel gives
_picker = random.Random()


def free_port() -> int:
    """A port free right now, below the ephemeral range when there is room (else any the kernel gives)."""
    for _ in range(100 if _ROOM_BELOW else 0):
        port = _picker.randrange(_LOW, _HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """A base port P with P..P+count-1 all free right now."""
    for _ in range(200):
        base = free_port()
        if base + count >= (_HIGH if _ROOM_BELOW else 65535):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for i in range(count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports found")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        # Workers of a stopped parent: make sure none outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def group_pids(self) -> list[int]:
        """The process and every live process of its group (its workers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) == self.popen.pid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
        return sorted(pids)


class Processes:
    """A stack of started processes, stopped in reverse order on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._started: list[Process] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self._started.append(process)
        return process

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self._started:
            self._started.remove(process)

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


def wait_serving(target: str, process: Process, timeout: float = 30.0) -> None:
    """Until ``grpc.health.v1.Health/Check`` on ``target`` answers SERVING."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode} before serving:\n{process.log_tail()}"
            )
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = reply.status
        except grpc.RpcError as exc:
            last = exc.code()
        time.sleep(0.1)
    raise TimeoutError(
        f"{process.name} at {target} not serving after {timeout:.0f}s (last: {last})\n{process.log_tail()}"
    )


def wait_port(port: int, process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{process.name} not listening on {port} after {timeout:.0f}s\n{process.log_tail()}")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User+system CPU time consumed so far by ``pids`` (those still alive)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
