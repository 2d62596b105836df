"""ReportLeakedKeys in the core: malformed keys are never looked up, duplicates once, the limit per address.

The in-memory store ships in the package and keeps the storage contract;
the end-to-end behaviour is in ``tests/grpc/test_leak_reports.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.errors import ResourceExhausted
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Actor, Role
from authsvc.core.manager import LEAK_REPORTS_PER_MINUTE, KeyManager
from authsvc.core.ports import Found
from authsvc.storage.memory import InMemoryStore

FORMAT = KeyFormat("authsvc")


class CountingStore(InMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def find_by_digest(self, digest: bytes) -> Found:
        self.lookups += 1
        return await super().find_by_digest(digest)


def manager(store: InMemoryStore) -> KeyManager:
    return KeyManager(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=lambda: datetime.now(UTC))


async def test_only_well_formed_distinct_keys_are_looked_up() -> None:
    store = CountingStore()
    m = manager(store)
    created = await m.create_key("acme", Actor("alice", Role.ADMIN), "ci", ["read"], None)
    key = created.secret
    malformed = [key[:-1] + ("A" if key[-1] != "A" else "B"), "authsvx" + key[7:], key[:-3], key.upper(), ""]
    answer = await m.report_leaked_keys([key, key, *malformed, FORMAT.generate().secret], "github", "", address="a")
    assert (answer.revoked, answer.already_revoked, answer.unknown) == (1, 0, len(malformed) + 1)
    assert store.lookups == 2  # the real key once, the unknown well-formed one once
    stored = await store.get_key("acme", created.key.id)
    assert stored is not None and stored.revoked_by == "leak-report"


async def test_the_limit_is_per_address() -> None:
    m = manager(InMemoryStore())
    for _ in range(LEAK_REPORTS_PER_MINUTE):
        await m.report_leaked_keys(["x"], "github", "", address="10.0.0.1")
    await m.report_leaked_keys(["x"], "github", "", address="10.0.0.2")  # another address has its own budget
    with pytest.raises(ResourceExhausted, match="leak reports a minute"):
        # Unless the minute turned just now; then the next call is refused.
        for _ in range(LEAK_REPORTS_PER_MINUTE + 1):
            await m.report_leaked_keys(["x"], "github", "", address="10.0.0.1")
