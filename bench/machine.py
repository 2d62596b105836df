"""What the numbers were measured on: hardware, kernel, versions, load."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.procs import tool


def _first_line(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return "?"


def describe(database_url: str) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    import uvloop

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "uvloop": str(getattr(uvloop, "__version__", "?")),
        "envoy": _first_line([tool("envoy"), "--version"]).split("version:")[-1].strip(),
        "h2load": _first_line(["h2load", "--version"]),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "postgresql": postgresql_version(database_url),
        "redis": _first_line(["redis-cli", "INFO", "server"]) and _redis_version(),
    }


def postgresql_version(database_url: str) -> str:
    """Asked of the server's maintenance database: the bench database may not exist yet on a fresh machine."""
    maintenance = urllib.parse.urlsplit(database_url)._replace(path="/postgres").geturl()
    return _first_line(["psql", maintenance, "-Atc", "SHOW server_version"])


def _redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-cli", "INFO", "server"], capture_output=True, text=True, timeout=5, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
    return "?"
