"""Semantics 1 and 2: the key format, its checksum, and what is stored."""

from __future__ import annotations

import hashlib
import math
import re

import pytest

from authsvc.core.keyformat import BASE62, CHECKSUM_LENGTH, RANDOM_LENGTH, KeyFormat, digest


@pytest.fixture
def fmt() -> KeyFormat:
    return KeyFormat("authsvc")


def test_key_is_prefix_underscore_random_and_checksum(fmt: KeyFormat) -> None:
    issued = fmt.generate()
    assert re.fullmatch(rf"authsvc_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}", issued.secret)
    assert issued.display_prefix == issued.secret[:12]


def test_random_part_carries_at_least_256_bits() -> None:
    assert RANDOM_LENGTH * math.log2(len(BASE62)) >= 256


def test_keys_are_unique(fmt: KeyFormat) -> None:
    assert len({fmt.generate().secret for _ in range(2000)}) == 2000


def test_digest_is_sha256_of_the_full_key(fmt: KeyFormat) -> None:
    issued = fmt.generate()
    assert issued.digest == hashlib.sha256(issued.secret.encode()).digest() == digest(issued.secret)


def test_issued_key_repr_hides_the_secret(fmt: KeyFormat) -> None:
    issued = fmt.generate()
    assert issued.secret not in repr(issued)
    assert issued.display_prefix in repr(issued)


def test_well_formed_key_passes_the_checksum(fmt: KeyFormat) -> None:
    assert fmt.is_well_formed(fmt.generate().secret)


def test_every_single_character_typo_is_caught(fmt: KeyFormat) -> None:
    secret = fmt.generate().secret
    body_start = len("authsvc_")
    for i in range(body_start, len(secret)):
        for replacement in "0aZ":
            if secret[i] != replacement:
                typo = secret[:i] + replacement + secret[i + 1 :]
                assert not fmt.is_well_formed(typo), f"typo at {i} passed"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "authsvc_",
        "other_" + "a" * (RANDOM_LENGTH + CHECKSUM_LENGTH),
        "authsvc-" + "a" * (RANDOM_LENGTH + CHECKSUM_LENGTH),
        "authsvc_" + "!" * (RANDOM_LENGTH + CHECKSUM_LENGTH),
        "authsvc_" + "é" * (RANDOM_LENGTH + CHECKSUM_LENGTH),
        "x" * 10_000,
    ],
)
def test_garbage_is_malformed(fmt: KeyFormat, key: str) -> None:
    assert not fmt.is_well_formed(key)


def test_a_key_of_another_deployment_prefix_is_malformed(fmt: KeyFormat) -> None:
    assert not fmt.is_well_formed(KeyFormat("acme").generate().secret)


@pytest.mark.parametrize("prefix", ["", "A", "a", "Authsvc", "with_underscore", "toolongprefix", "1abc"])
def test_bad_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        KeyFormat(prefix)
