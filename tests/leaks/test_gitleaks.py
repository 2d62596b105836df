"""deploy/secret-scanning/gitleaks.toml, run by the real gitleaks binary on the same corpus as ``authsvc scan``."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

from authsvc.core.keyformat import scan_pattern
from tests.leaks.corpus import plant, write_lookalikes
from tests.support import ROOT, bin_path

RULES = ROOT / "deploy" / "secret-scanning" / "gitleaks.toml"
RULE_ID = "authsvc-api-key"


def gitleaks(source: Path, report: Path) -> list[dict[str, object]]:
    """Findings of our rule, from gitleaks' JSON report (secrets redacted)."""
    result = subprocess.run(
        [
            bin_path("gitleaks"), "dir", str(source), "--config", str(RULES), "--redact", "--no-banner",
            "--report-format", "json", "--report-path", str(report), "--exit-code", "0",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    findings: list[dict[str, object]] = json.loads(report.read_text())
    return [f for f in findings if f["RuleID"] == RULE_ID]


def test_the_rule_is_the_scanners_pattern() -> None:
    """One key pattern: the rule is keyformat.scan_pattern in RE2 spelling (\\b for the right-hand lookahead)."""
    rule = tomllib.loads(RULES.read_text())["rules"][0]
    assert rule["id"] == RULE_ID and rule["keywords"] == ["authsvc_"]
    python = scan_pattern(["authsvc"]).replace("(?:authsvc)", "authsvc").replace("(?![0-9A-Za-z_])", r"\b")
    assert rule["regex"] == python
    re.compile(rule["regex"])


def test_gitleaks_finds_every_planted_key_in_text_at_its_path_and_line(tmp_path: Path) -> None:
    """Everything ``authsvc scan`` finds but the key in a binary file: gitleaks skips binary files."""
    planted = plant(tmp_path / "tree")
    found = gitleaks(tmp_path / "tree", tmp_path / "report.json")
    located = [(str(Path(str(f["File"])).relative_to(tmp_path / "tree")), f["StartLine"]) for f in found]
    expected = [(path, line) for path, line, _ in planted.expected if path != "assets/blob.bin"]
    assert set(located) == set(expected)  # .git is not scanned in dir mode
    # Two keys on one line are two findings. (gitleaks may report a key twice:
    # as written and once more percent-decoded, as on the %3D line.)
    for location in expected:
        assert located.count(location) >= expected.count(location), location


def test_gitleaks_reports_only_shape_valid_lookalikes(tmp_path: Path) -> None:
    """gitleaks cannot check the checksum: it reports exactly the look-alikes with a key's shape, nothing else."""
    kinds = write_lookalikes(tmp_path / "corpus")
    found = gitleaks(tmp_path / "corpus", tmp_path / "report.json")
    files = {Path(str(f["File"])).name for f in found}
    assert files == {"wrong_checksum.txt", "swapped.txt"}
    assert len(found) == len(kinds["wrong_checksum"]) + len(kinds["swapped"])
