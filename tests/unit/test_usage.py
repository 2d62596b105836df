"""Semantic 10 (and issue 4): last_used_time is batched, one store call per flush."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime

from authsvc.core.ports import UsageCounts
from authsvc.core.usage import ALLOWED, DENIED, RATE_LIMITED, UsageRecorder


class RecordingStore:
    """Records record_last_used calls; a fake is fine for this unit (the integration test writes to PostgreSQL)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, datetime]] = []
        self.counts: list[dict[tuple[str, date], UsageCounts]] = []
        self.fail = fail

    async def record_last_used(
        self, used: Mapping[str, datetime], counts: Mapping[tuple[str, date], UsageCounts] | None = None
    ) -> None:
        if self.fail:
            raise ConnectionError("down")
        self.calls.append(dict(used))
        self.counts.append(dict(counts or {}))


async def test_many_uses_become_one_write_with_the_latest_time() -> None:
    store = RecordingStore()
    recorder = UsageRecorder(store, interval=10)  # type: ignore[arg-type]
    for i in range(1000):
        recorder.touch("k1", 1_700_000_000.0 + i)
        recorder.touch("k2", 1_700_000_000.0)
    await recorder.flush()
    assert len(store.calls) == 1
    assert store.calls[0]["k1"].timestamp() == 1_700_000_999.0
    assert set(store.calls[0]) == {"k1", "k2"}


async def test_failed_flush_keeps_uses_for_the_next_one() -> None:
    store = RecordingStore(fail=True)
    recorder = UsageRecorder(store, interval=10)  # type: ignore[arg-type]
    recorder.touch("k1", 1_700_000_000.0)
    await recorder.flush()
    store.fail = False
    await recorder.flush()
    assert [set(c) for c in store.calls] == [{"k1"}]


async def test_pending_uses_are_bounded_even_when_the_store_is_down() -> None:
    store = RecordingStore(fail=True)
    recorder = UsageRecorder(store, interval=10, max_pending=100)  # type: ignore[arg-type]
    for i in range(5000):
        recorder.touch(f"k{i}", 1.0)
    assert len(recorder._pending) <= 200
    assert recorder.dropped == 5000 - 200
    recorder.touch("k1", 2.0)  # a key already pending still moves forward
    assert recorder._pending["k1"] == 2.0
    await recorder.flush()
    assert len(recorder._pending) <= 100  # the failed batch is kept within the bound


async def test_stop_writes_what_is_pending() -> None:
    store = RecordingStore()
    recorder = UsageRecorder(store, interval=10)  # type: ignore[arg-type]
    recorder.start()
    recorder.touch("k1", 1_700_000_000.0)
    await recorder.stop()
    assert [set(c) for c in store.calls] == [{"k1"}]


async def test_answers_are_counted_per_key_and_utc_day_in_the_same_single_write() -> None:
    store = RecordingStore()
    recorder = UsageRecorder(store, interval=10)  # type: ignore[arg-type]
    late = 86_399.0  # 23:59:59 the same day
    day1 = 1_772_323_200.0  # 2026-03-01T00:00:00Z
    for outcome in (ALLOWED, ALLOWED, DENIED, RATE_LIMITED):
        recorder.count("k1", day1 + late, outcome)
    recorder.count("k1", day1 + 86_400, ALLOWED)  # the next UTC day
    recorder.count("k2", day1, DENIED)
    await recorder.flush()
    assert len(store.calls) == 1
    assert store.counts == [
        {("k1", date(2026, 3, 1)): (2, 1, 1), ("k1", date(2026, 3, 2)): (1, 0, 0), ("k2", date(2026, 3, 1)): (0, 1, 0)}
    ]


async def test_a_failed_flush_adds_its_counts_to_the_next_one_and_stop_writes_them() -> None:
    store = RecordingStore(fail=True)
    recorder = UsageRecorder(store, interval=10)  # type: ignore[arg-type]
    recorder.start()
    recorder.count("k1", 1_772_323_200.0, ALLOWED)
    await recorder.flush()
    recorder.count("k1", 1_772_323_200.0, ALLOWED)
    store.fail = False
    await recorder.stop()
    assert store.counts == [{("k1", date(2026, 3, 1)): (2, 0, 0)}]
