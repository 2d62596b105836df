"""Finding leaked authsvc keys in files, trees and streams (``authsvc scan``).

A finding is a key whose shape *and* checksum are valid for one of the
prefixes looked for (:mod:`authsvc.core.keyformat` owns both rules), so random
look-alikes are not reported: the CRC32 makes a chance match about one in
57 billion.

Bounded memory whatever the input: files are read as bytes (keys are ASCII,
so any encoding that keeps ASCII as is works, and binary files need no
special case), one line at a time, and a line longer than ``LINE_CAP`` is
read in pieces that overlap by more than a key's length, so no key is lost
or reported twice at a piece boundary.

A :class:`Finding` keeps the key it found, for ``--report`` (which will hand
the keys to ``ReportLeakedKeys``); its ``repr`` and :meth:`Finding.line_text`
show only the 12-character display prefix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from authsvc.core.keyformat import DISPLAY_PREFIX_LENGTH, MAX_KEY_LENGTH, KeyFormat, scan_pattern

LINE_CAP = 1 << 20
"""Bytes of one line held at once; longer lines (minified files, binaries) are read in pieces."""
_OVERLAP = MAX_KEY_LENGTH + 1
SKIPPED_DIRECTORIES = frozenset({".git"})
STDIN = "-"


@dataclass(frozen=True, slots=True)
class Finding:
    """One well-formed key at ``path:line``."""

    path: str
    line: int
    key: str = field(repr=False)

    @property
    def display_prefix(self) -> str:
        return self.key[:DISPLAY_PREFIX_LENGTH]

    def line_text(self) -> str:
        """What ``authsvc scan`` prints: never more of the key than its display prefix."""
        return f"{self.path}:{self.line}: {self.display_prefix}…"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A file or directory that could not be read; the scan is incomplete."""

    path: str
    reason: str


class Scanner:
    """Finds keys of the given prefixes; one compiled pattern for all of them."""

    def __init__(self, prefixes: Iterable[str], *, line_cap: int = LINE_CAP) -> None:
        # KeyFormat validates each prefix (ValueError names the bad one).
        self._formats = {p: KeyFormat(p) for p in prefixes}
        self._line_cap = max(line_cap, 2 * _OVERLAP)
        if not self._formats:
            raise ValueError("at least one key prefix is needed")
        # Inside a lookahead, so candidates may overlap: with prefixes "ab" and
        # "xab", "xab_..." failing its checksum must not hide the "ab_..." in it.
        self._pattern = re.compile(b"(?=(" + scan_pattern(self._formats).encode("ascii") + b"))")

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(self._formats)

    def _keys_in(self, data: bytes) -> Iterator[tuple[int, str]]:
        """(end offset, key) of each checksum-valid key in ``data``."""
        for match in self._pattern.finditer(data):
            key = match.group(1).decode("ascii")
            if self._formats[key.partition("_")[0]].is_well_formed(key):
                yield match.end(1), key

    def scan_stream(self, stream: BinaryIO, path: str) -> Iterator[Finding]:
        line_number = 1
        carry = b""  # the end of the previous piece of the same line
        decided = 0  # keys ending at or before this offset into ``carry + piece`` were handled already
        while piece := stream.readline(self._line_cap):
            ends_line = piece.endswith(b"\n")
            data = carry + piece
            for end, key in self._keys_in(data):
                # A key touching the end of an unfinished piece may go on in
                # the next one (and then be no key): decide it there.
                if end > decided and (end < len(data) or ends_line):
                    yield Finding(path, line_number, key)
            if ends_line:
                line_number += 1
                carry, decided = b"", 0
            else:
                carry = data[-_OVERLAP:]
                decided = len(carry) - 1  # everything ending before the old end was decided above
        # The input ended without a newline: a key touching its end is decided now.
        for end, key in self._keys_in(carry):
            if end > decided:
                yield Finding(path, line_number, key)

    def scan_paths(self, paths: Iterable[str], stdin: BinaryIO | None = None) -> Iterator[Finding | Unreadable]:
        """Findings in order of the paths given; directories are walked in sorted order, ``.git`` skipped.

        Symbolic links to directories are not followed (no cycles);
        anything that is not a regular file (sockets, FIFOs) is skipped so
        a scan never blocks.
        """
        for path in paths:
            if path == STDIN:
                if stdin is not None:
                    yield from self.scan_stream(stdin, "<stdin>")
                continue
            if os.path.isdir(path):
                yield from self._scan_tree(path)
            elif os.path.isfile(path):
                yield from self._scan_file(path)
            else:
                yield Unreadable(path, "not a regular file or directory")

    def _scan_tree(self, root: str) -> Iterator[Finding | Unreadable]:
        errors: list[OSError] = []
        for directory, subdirectories, files in os.walk(root, onerror=errors.append):
            while errors:
                failed = errors.pop()
                yield Unreadable(str(failed.filename or directory), failed.strerror or str(failed))
            subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
            for name in sorted(files):
                file_path = os.path.join(directory, name)
                if os.path.isfile(file_path):
                    yield from self._scan_file(file_path)
        while errors:
            failed = errors.pop()
            yield Unreadable(str(failed.filename or root), failed.strerror or str(failed))

    def _scan_file(self, path: str) -> Iterator[Finding | Unreadable]:
        try:
            stream = Path(path).open("rb")  # noqa: SIM115  # opened apart from `with` to tell open errors from read errors
        except OSError as exc:
            yield Unreadable(path, exc.strerror or str(exc))
            return
        with stream:
            try:
                yield from self.scan_stream(stream, path)
            except OSError as exc:  # e.g. EISDIR, EIO half-way
                yield Unreadable(path, exc.strerror or str(exc))
