"""Transport responses reused while the decision they were built from is still the cached one.

Building a response is most of what a cache hit costs a transport (a
Check's OkHttpResponse with identity headers and dynamic metadata, an
AuthorizeResponse with its Principal). A response depends only on the
decision's reason and principal, so each transport keeps one ``ResponseMemo``
and asks it for the response of each decision. The rules live here once:

* a re-read key gets a new ``Principal`` object, and an entry is reused only
  for the very same object, so a stale response can never be served;
* a decision with rate-limit counters (new values on every call) is always
  built fresh;
* decisions without a principal (missing, malformed, unknown key) share one
  response per reason and message.

Responses are never mutated once stored, so sharing one between calls is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from authsvc.core.keys import Decision, Principal, Reason

V = TypeVar("V")
Variant = TypeVar("Variant", bound=Hashable)


class ResponseMemo(Generic[Variant, V]):
    """``build(decision, variant)`` once per (principal, reason, variant); see the module docstring."""

    def __init__(self, build: Callable[[Decision, Variant], V], max_entries: int = 10_000) -> None:
        self._build = build
        self._entries: dict[tuple[str, Reason, Hashable], tuple[Principal | None, V]] = {}
        self._max_entries = max_entries

    def __call__(self, decision: Decision, variant: Variant) -> V:
        value = self.get(decision, variant)
        return self.put(decision, variant, self._build(decision, variant)) if value is None else value

    def get(self, decision: Decision, variant: Variant) -> V | None:
        """The stored response, or ``None``: for a caller that works out what to build only when it must."""
        if decision.rate_limit is not None:
            return None
        hit = self._entries.get(_slot(decision, variant))
        return hit[1] if hit is not None and hit[0] is decision.principal else None

    def put(self, decision: Decision, variant: Variant, value: V) -> V:
        """Keep ``value`` as the response to ``decision`` (unless it carries rate-limit counters); returns it."""
        if decision.rate_limit is None:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()  # bounded; rebuilding is cheap and rare
            self._entries[_slot(decision, variant)] = (decision.principal, value)
        return value


def _slot(decision: Decision, variant: Hashable) -> tuple[str, Reason, Hashable]:
    """One entry per key (or, without a principal, per message), reason and variant."""
    principal = decision.principal
    return (principal.key_id if principal is not None else decision.message, decision.reason, variant)
