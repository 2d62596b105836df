"""A tree with planted keys in every place a leak turns up, and a corpus of look-alikes.

Shared by the ``authsvc scan`` and gitleaks tests, so both are judged on the
same files. Keys are generated fresh for each run, with the real
``KeyFormat``: no key is written into this repository.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from authsvc.core.keyformat import BASE62, KeyFormat

AUTHSVC = KeyFormat("authsvc")


@dataclass
class Planted:
    root: Path
    expected: set[tuple[str, int, str]] = field(default_factory=set)
    """(path relative to root, line, key) of every key that must be found."""
    hidden: list[str] = field(default_factory=list)
    """Keys under .git, which must not be found."""

    def key(self, relative: str, line: int, fmt: KeyFormat = AUTHSVC) -> str:
        secret = fmt.generate().secret
        self.expected.add((relative, line, secret))
        return secret

    def secrets(self) -> list[str]:
        return [key for _, _, key in self.expected] + self.hidden


def plant(root: Path) -> Planted:
    """Keys at line starts and ends, in URLs, JSON, quotes, two per line, in several file types."""
    p = Planted(root)

    def write(relative: str, lines: list[str]) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    write(".env", [
        f"AUTHSVC_KEY={p.key('.env', 1)}",
        "# nothing here",
        p.key(".env", 3),
        f'export TOKEN="{p.key(".env", 4)}"',
    ])
    write("config/app.json", [
        "{",
        f'  "api_key": "{p.key("config/app.json", 2)}",',
        f'  "keys": ["{p.key("config/app.json", 3)}","{p.key("config/app.json", 3)}"],',
        f'  "escaped": "first line\\n{p.key("config/app.json", 4)}"',
        "}",
    ])
    write("docs/notes.md", [
        "# Notes",
        "",
        f"curl 'https://api.example.com/v1/orders?api_key={p.key('docs/notes.md', 3)}&page=2'",
        f"https://user:{p.key('docs/notes.md', 4)}@example.com/path",
        f"redirect=%2Fcallback%3Ftoken%3D{p.key('docs/notes.md', 5)}",
        f"Paste the key at the end of this line: {p.key('docs/notes.md', 6)}",
    ])
    write("src/deep/pkg/settings.py", [
        '"""Settings."""',
        f"TOKEN = '{p.key('src/deep/pkg/settings.py', 2)}'",
        f"PAIR = ({p.key('src/deep/pkg/settings.py', 3)}, {p.key('src/deep/pkg/settings.py', 3)})",
        f"GLUED = '{p.key('src/deep/pkg/settings.py', 4)},{p.key('src/deep/pkg/settings.py', 4)}'",
    ])
    write("deploy/values.yaml", [
        "auth:",
        f"  key: {p.key('deploy/values.yaml', 2)}",
        f"  header: 'Authorization: ApiKey {p.key('deploy/values.yaml', 3)}'",
    ])
    # A binary file: the key between bytes that are not text in any encoding.
    binary_key = p.key("assets/blob.bin", 2)
    (root / "assets").mkdir()
    (root / "assets" / "blob.bin").write_bytes(
        bytes(b for b in range(256) if b != 0x0A) + b"\n\x00\xff\xfe" + binary_key.encode() + b"\x00\x81\n"
    )
    # Not in UTF-8: the scanner must not care.
    (root / "legacy.txt").write_bytes(
        "caf\xe9 ".encode("latin-1") + p.key("legacy.txt", 1).encode() + b" \xe9\n"
    )
    # Under .git (at the top and deeper): skipped.
    for git_dir in (root / ".git", root / "src" / "vendored" / ".git"):
        git_dir.mkdir(parents=True)
        secret = AUTHSVC.generate().secret
        p.hidden.append(secret)
        (git_dir / "config").write_text(f"[remote]\n\turl = https://x:{secret}@example.com\n")
    return p


def _mutate_checksum(key: str, rng: random.Random) -> str:
    position = rng.randrange(len(key) - 6, len(key))
    replacement = rng.choice([c for c in BASE62 if c != key[position]])
    return key[:position] + replacement + key[position + 1 :]


def _swap_two(key: str, rng: random.Random) -> str:
    """Two different characters of the random part swapped: a typo the checksum must catch."""
    body = list(key)
    start, end = len("authsvc_"), len(key) - 6
    while True:
        i, j = rng.sample(range(start, end), 2)
        if body[i] != body[j]:
            body[i], body[j] = body[j], body[i]
            return "".join(body)


def lookalikes(count: int = 100, seed: int = 14) -> dict[str, list[str]]:
    """Strings that resemble authsvc keys but are not one, by kind.

    ``wrong_checksum`` and ``swapped`` have the key's exact shape (so a
    shape-only regex such as gitleaks' reports them); the others do not.
    """
    rng = random.Random(seed)
    kinds: dict[str, list[str]] = {
        "wrong_checksum": [], "swapped": [], "wrong_prefix": [], "truncated": [],
        "one_char_longer": [], "upper_cased": [], "foreign_valid": [],
    }
    other = KeyFormat("authsvx")
    for _ in range(count):
        key = AUTHSVC.generate().secret
        kinds["wrong_checksum"].append(_mutate_checksum(key, rng))
        kinds["swapped"].append(_swap_two(key, rng))
        kinds["wrong_prefix"].append("authsvx" + key[len("authsvc"):])
        kinds["truncated"].append(key[: rng.randrange(len(key) - 8, len(key))])
        kinds["one_char_longer"].append(key + rng.choice(BASE62))
        kinds["upper_cased"].append(key.upper())
        kinds["foreign_valid"].append(other.generate().secret)  # valid, but for another deployment's prefix
    for kind in ("wrong_checksum", "swapped", "wrong_prefix", "truncated", "upper_cased"):
        assert not any(AUTHSVC.is_well_formed(s) for s in kinds[kind]), kind  # the corpus is what it claims
    return kinds


def write_lookalikes(root: Path) -> dict[str, list[str]]:
    """One file per kind; each look-alike on its own line, in contexts where real keys are found."""
    kinds = lookalikes()
    root.mkdir(parents=True, exist_ok=True)
    for kind, samples in kinds.items():
        lines = []
        for n, sample in enumerate(samples):
            lines.append([sample, f'"{sample}"', f"?key={sample}&x=1", f"k = '{sample}'"][n % 4])
        (root / f"{kind}.txt").write_text("\n".join(lines) + "\n")
    return kinds
