"""``authsvc scan``: every planted key found at its path:line, no look-alike reported, no secret printed.

The command runs as a real process, as a CI job or a pre-commit hook runs it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authsvc.core.keyformat import DISPLAY_PREFIX_LENGTH, KeyFormat
from authsvc.scan import Scanner
from tests.leaks.corpus import AUTHSVC, plant, write_lookalikes

TIMEOUT = 60


def scan(
    *args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "authsvc", "scan", *args],
        cwd=cwd,
        input=stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=full_env,
        timeout=TIMEOUT,
        check=False,
    )


def findings(stdout: str) -> set[tuple[str, int, str]]:
    """(path, line, shown prefix) of each output line, which must all have the documented shape."""
    found = set()
    for line in stdout.splitlines():
        location, sep, shown = line.rpartition(": ")
        path, _, number = location.rpartition(":")
        assert sep and shown.endswith("…") and len(shown) == DISPLAY_PREFIX_LENGTH + 1, line
        found.add((path, int(number), shown[:-1]))
    return found


def assert_no_secret(output: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in output
        # Not even a piece of the secret part beyond the display prefix.
        rest = secret[DISPLAY_PREFIX_LENGTH:]
        assert not any(rest[i : i + 8] in output for i in range(len(rest) - 8))


def test_every_planted_key_is_found_at_its_path_and_line(tmp_path: Path) -> None:
    """Line starts and ends, URLs, JSON, quotes, escapes, two per line, binary and non-UTF-8 files; not .git."""
    planted = plant(tmp_path / "tree")
    result = scan("tree", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    expected = {(f"tree/{path}", line, key[:DISPLAY_PREFIX_LENGTH]) for path, line, key in planted.expected}
    assert findings(result.stdout) == expected
    # Two keys on one line are two findings, not one.
    assert len(result.stdout.splitlines()) == len(planted.expected)
    assert ".git" not in result.stdout
    assert result.stderr == ""
    assert_no_secret(result.stdout + result.stderr, planted.secrets())


def test_no_lookalike_is_reported(tmp_path: Path) -> None:
    """Wrong checksum, swapped characters, wrong prefix, truncated, one character longer, upper-cased."""
    kinds = write_lookalikes(tmp_path / "corpus")
    result = scan("corpus", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert sum(len(samples) for samples in kinds.values()) == 700


def test_prefix_option_looks_for_other_deployments_keys_too(tmp_path: Path) -> None:
    kinds = write_lookalikes(tmp_path / "corpus")
    result = scan("--prefix", "authsvx", "corpus", cwd=tmp_path)
    assert result.returncode == 1
    found = findings(result.stdout)
    assert {path for path, _, _ in found} == {"corpus/foreign_valid.txt"}
    assert len(found) == len(kinds["foreign_valid"])
    # The configured prefix is what is looked for by default.
    configured = scan("corpus", cwd=tmp_path, env={"AUTHSVC_KEY_PREFIX": "authsvx"})
    assert configured.returncode == 1
    assert findings(configured.stdout) == found


def test_standard_input_is_scanned_with_no_path_or_dash(tmp_path: Path) -> None:
    key = AUTHSVC.generate().secret
    text = f"first line\nsecond {key} line\n".encode()
    for args in ((), ("-",)):
        result = scan(*args, cwd=tmp_path, stdin=text)
        assert result.returncode == 1
        assert result.stdout == f"<stdin>:2: {key[:DISPLAY_PREFIX_LENGTH]}…\n"
        assert key not in result.stdout + result.stderr
    clean = scan("-", cwd=tmp_path, stdin=b"nothing to see\n")
    assert (clean.returncode, clean.stdout) == (0, "")


def test_exit_codes_and_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "clean.txt").write_text("no keys here\n")
    assert scan("clean.txt", cwd=tmp_path).returncode == 0

    missing = scan("clean.txt", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "authsvc: cannot read nowhere: no such file or directory\n"

    os.mkfifo(tmp_path / "pipe")  # opening it would block: refused instead
    fifo = scan("pipe", cwd=tmp_path)
    assert fifo.returncode == 2
    assert fifo.stderr == "authsvc: cannot read pipe: not a regular file or directory\n"

    bad_prefix = scan("--prefix", "Not-A-Prefix", "clean.txt", cwd=tmp_path)
    assert bad_prefix.returncode == 2
    assert len(bad_prefix.stderr.splitlines()) == 1 and "--prefix" in bad_prefix.stderr

    unknown_option = scan("--frobnicate", cwd=tmp_path)
    assert unknown_option.returncode == 2


def test_a_key_in_a_tree_with_an_unreadable_part_is_still_reported(tmp_path: Path) -> None:
    """The scan is incomplete (exit 2), but what it found is printed."""
    planted = plant(tmp_path / "tree")
    os.mkfifo(tmp_path / "pipe")
    result = scan("tree", "pipe", cwd=tmp_path)
    assert result.returncode == 2
    assert len(findings(result.stdout)) == len(planted.expected)


@pytest.mark.parametrize("line_cap", [130, 200, 257])
def test_keys_across_piece_boundaries_of_long_lines_are_found_once(line_cap: int) -> None:
    """A long line is read in pieces; a key at any offset is found exactly once, a longer one never."""
    key = AUTHSVC.generate().secret
    scanner = Scanner(["authsvc"], line_cap=line_cap)
    for offset in range(0, 3 * line_cap):
        for filler in (b"-", b"x"):
            line = filler * offset + key.encode() + b" " + filler * 300
            found = list(scanner.scan_stream(io.BytesIO(line + b"\nnext\n"), "t"))
            assert [(f.line, f.key) for f in found] == [(1, key)], (offset, filler)
            longer = filler * offset + key.encode() + b"A" + filler * 300
            assert list(scanner.scan_stream(io.BytesIO(longer), "t")) == [], offset
    # Two keys glued by one character, around every boundary.
    pair = (key + "," + key).encode()
    for offset in range(0, 2 * line_cap):
        found = list(scanner.scan_stream(io.BytesIO(b"-" * offset + pair), "t"))
        assert len(found) == 2, offset


def test_a_prefix_inside_a_longer_prefix_does_not_hide_a_key() -> None:
    """With prefixes "ab" and "xab", "xab_..." failing its checksum must not shadow the "ab_..." key in it."""
    key = KeyFormat("ab").generate().secret
    found = list(Scanner(["xab", "ab"]).scan_stream(io.BytesIO(b"x" + key.encode()), "t"))
    assert [f.key for f in found] == [key]


def test_finding_repr_never_shows_the_key() -> None:
    key = AUTHSVC.generate().secret
    (finding,) = Scanner(["authsvc"]).scan_stream(io.BytesIO(key.encode()), "t")
    assert key not in repr(finding)
    assert key not in finding.line_text()


@pytest.mark.slow
def test_a_huge_single_line_file_is_scanned_in_bounded_memory(tmp_path: Path) -> None:
    """64 MiB without a newline: found are the keys at its start, across a piece boundary and at its end."""
    size = 64 << 20
    keys = [AUTHSVC.generate().secret for _ in range(3)]
    big = tmp_path / "minified.js"
    with big.open("wb") as out:
        out.write(keys[0].encode() + b";")
        written = len(keys[0]) + 1
        chunk = b"var a=1;" * 8192
        while written < size:
            if written <= (1 << 20) - 30 < written + len(chunk):  # straddle the first 1 MiB piece boundary
                out.write(b"-" * ((1 << 20) - 30 - written) + keys[1].encode() + b";")
                written = (1 << 20) - 30 + len(keys[1]) + 1
                continue
            out.write(chunk)
            written += len(chunk)
        out.write(b";" + keys[2].encode())
    # VmHWM, the peak RSS of this process image: getrusage's ru_maxrss would
    # carry over the forking parent's (pytest's) peak across exec.
    code = (
        "import re, sys\n"
        "from authsvc.cli import main\n"
        "rc = main(['scan', sys.argv[1]])\n"
        "status = open('/proc/self/status').read()\n"
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', status)[1], file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(big)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 1, result.stderr
    assert [line.split(": ")[1] for line in result.stdout.splitlines()] == [
        f"{k[:DISPLAY_PREFIX_LENGTH]}…" for k in keys
    ]
    peak_mib = int(result.stderr.strip()) / 1024
    assert peak_mib < 64, f"peak RSS {peak_mib:.0f} MiB for a 64 MiB line: not streamed"
