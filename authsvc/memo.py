"""Responses reused while the principal they were built from is still the cached one.

Building protobuf responses is most of what a cache hit costs (a Check's
OkHttpResponse with identity headers and dynamic metadata, an
AuthorizeResponse with its Principal). They depend only on the principal, so
each transport memoizes them per principal *object*: a re-read key gets a new
Principal object, so a stale response can never be served. Messages are
never mutated after they are stored, so sharing one between calls is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from authsvc.keys import Principal

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PrincipalMemo(Generic[K, V]):
    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: dict[K, tuple[Principal, V]] = {}
        self._max_entries = max_entries

    def get_or_build(self, key: K, principal: Principal, build: Callable[[], V]) -> V:
        hit = self._entries.get(key)
        if hit is not None and hit[0] is principal:
            return hit[1]
        return self.put(key, principal, build())

    def put(self, key: K, principal: Principal, value: V) -> V:
        if len(self._entries) >= self._max_entries:
            self._entries.clear()  # bounded; rebuilding is cheap and rare
        self._entries[key] = (principal, value)
        return value
