"""The hot path: Authorize, answered from the decision cache whenever it may be.

``check`` is synchronous: a cache hit (the common case) is decided with no
coroutine and no await, so a transport answers it in one pass of its
handler. Only what needs I/O comes back as a ``Pending`` for ``complete``:
a cache miss (one store lookup) or a key under a rate limit (one shared
counter increment).

Ordering rules that keep a revoked key out:

* the cache's epoch is taken *before* the lookup starts (in ``check``), so a
  lookup that raced an invalidation is never cached (see ``DecisionCache``),
  nor is one read from a server other than the one the feed follows;
* ``decide`` checks revocation and expiry on every hit, against the clock
  this authorizer was given.

A miss whose digest is not among those the store holds (``KnownDigests``: a
forged key, most likely) is a *suspect*: looked up only within the table's
budget, refused as ``OverUnknownKeyBudget`` past it, so a flood of forged keys cannot
take the lookups that real, uncached keys need.

Every answer (and every call that raised) is reported to the metrics
``Recorder`` with its transport, whether it came from the cache, and how
long it took on the injected ``timer``; with metrics off nothing is timed.

The clock, timer, store, cache, usage recorder, limiter and metrics are all
injected: this module does no I/O of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from authsvc_client._cache import MISS, DecisionCache

from authsvc.core.admission import AT_CAPACITY, Admission
from authsvc.core.errors import AtCapacity, InvalidArgument, OverUnknownKeyBudget, Unavailable
from authsvc.core.keyformat import MAX_KEY_LENGTH, KeyFormat, digest
from authsvc.core.keys import Decision, Grant, KeyGrant, Reason, ScopeCatalog, decide
from authsvc.core.known import UNKNOWN_KEYS, KnownDigests
from authsvc.core.ports import NO_METRICS, Found, KeyStore, Monotonic, Recorder, WallClock
from authsvc.core.ratelimit import RateLimiter
from authsvc.core.usage import ALLOWED, DENIED, RATE_LIMITED, UsageRecorder

# Enum members as globals: ``Reason.OK`` costs 0.2 us per read on Python 3.11 (see ``authsvc_client._decision``).
_OK, _REVOKED, _EXPIRED = Reason.OK, Reason.REVOKED, Reason.EXPIRED
MISSING: Final = Decision(Reason.MISSING_KEY)
MALFORMED: Final = Decision(Reason.MALFORMED_KEY)
NOT_CACHEABLE: Final = (None, False)


@dataclass(slots=True)
class Pending:
    """An Authorize that needs I/O: a lookup (``grant`` unknown) or a rate-limit count (``allowed`` set)."""

    digest: bytes
    required_scope: str
    #: The cache's epoch when the lookup was decided on; see the module docstring.
    epoch: int
    #: The allowed decision a rate limit still has to confirm, with the key's own limit.
    allowed: Decision | None = None
    rate_limit: int = 0
    #: For the metrics: who asked, when (``Authorizer``'s timer), and whether the key was cached.
    transport: str = "grpc"
    started: float = 0.0
    cached: bool = False
    #: Not among the digests the store held when the feed last spoke (``authsvc.core.known``).
    suspect: bool = False

    def __repr__(self) -> str:  # the digest is not secret, but nothing needs it in a log
        return f"Pending(lookup={self.allowed is None})"


class Authorizer:
    """Decides Authorize for ``(key, required_scope)``; see the module docstring."""

    def __init__(
        self,
        store: KeyStore,
        catalog: ScopeCatalog,
        key_format: KeyFormat,
        *,
        clock: WallClock,
        cache: DecisionCache[Grant] | None = None,
        usage: UsageRecorder | None = None,
        limiter: RateLimiter | None = None,
        metrics: Recorder = NO_METRICS,
        timer: Monotonic | None = None,
        admission: Admission | None = None,
        known: KnownDigests | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.key_format = key_format
        self.cache = cache
        self.usage = usage
        self.limiter = limiter
        self._clock = clock
        self._metrics = metrics
        self._timer = timer if metrics is not NO_METRICS else None
        #: The process's bound on what waits; ``complete`` takes a slot (``authsvc.core.admission``).
        self.admission = admission if admission is not None else Admission()
        #: The stored digests: a miss that is not among them is looked up only within their budget.
        self.known = known

    def check(self, key: str, required_scope: str, transport: str = "grpc") -> Decision | Pending:
        """The decision, when no I/O is needed; otherwise what ``complete`` must finish.

        Raises ``InvalidArgument`` for an unknown required scope (a caller
        bug). ``transport`` only labels the metrics (``grpc``, ``envoy_grpc``, ``envoy_http``).
        """
        timer = self._timer
        if timer is None:
            return self._check(key, required_scope)
        started = timer()
        try:
            answer = self._check(key, required_scope)
        except InvalidArgument:
            self._metrics.failed("invalid_argument", transport, timer() - started)
            raise
        if isinstance(answer, Pending):
            answer.transport, answer.started = transport, started
            return answer
        cached = None if answer is MISSING or answer is MALFORMED else True
        self._metrics.decided(answer.reason, transport, cached, timer() - started)
        return answer

    async def complete(self, pending: Pending) -> Decision:
        """Finish what ``check`` could not: raises ``Unavailable`` when the store cannot answer (fail closed).

        One coroutine, metrics or not: a miss already awaits the store, and
        every extra coroutine level costs it again on each resumption. What
        waits takes a slot of the process's ``Admission``; without a free one
        it raises ``AtCapacity`` (an ``Unavailable``) at once, before any await.
        """
        timer = self._timer
        admission = self.admission
        try:
            if not admission.try_enter():
                raise AtCapacity(AT_CAPACITY)
            try:
                self._take_budget(pending.suspect)
                if pending.allowed is None:
                    found = await self.store.find_by_digest(pending.digest)
                    grant = self._learn(pending.digest, found, pending.epoch, pending.suspect)
                    answer = self._decide(grant, pending.required_scope, pending.digest)
                    if isinstance(answer, Pending):
                        answer.transport, answer.started = pending.transport, pending.started
                        decision = await self._limit(answer)
                    else:
                        decision = answer
                else:
                    decision = await self._limit(pending)
            finally:
                admission.leave()
        except Unavailable as exc:
            if timer is not None:
                self._metrics.failed(exc.reason, pending.transport, timer() - pending.started)
            raise
        if timer is not None:
            self._metrics.decided(decision.reason, pending.transport, pending.cached, timer() - pending.started)
        return decision

    def _check(self, key: str, required_scope: str) -> Decision | Pending:
        self.catalog.check_required(required_scope)
        if not key:
            return MISSING
        if len(key) > MAX_KEY_LENGTH:
            return MALFORMED  # before hashing: a megabyte of garbage is not worth a SHA-256
        key_digest = digest(key)
        cache = self.cache
        if cache is not None:
            # The cache first: only well-formed keys are ever put in it, so a
            # hit needs no shape or checksum check (a digest is as good as the key).
            cached = cache.get(key_digest)
            if cached is not MISS:
                answer = self._decide(cached, required_scope, key_digest)  # type: ignore[arg-type]  # not MISS
                if isinstance(answer, Pending):
                    answer.cached = True  # a cached key under a rate limit
                return answer
        if not self.key_format.is_well_formed(key):
            return MALFORMED  # garbage never reaches the store (nor, so, the cache)
        known = self.known
        return Pending(
            key_digest,
            required_scope,
            cache.epoch if cache is not None else 0,
            suspect=known is not None and known.suspect(key_digest),
        )

    async def _limit(self, pending: Pending) -> Decision:
        assert self.limiter is not None and pending.allowed is not None  # only _decide makes such a Pending
        now = self._clock()
        decision = await self.limiter.apply(pending.allowed, pending.rate_limit, now)
        if self.usage is not None and decision.principal is not None:
            self.usage.count(
                decision.principal.key_id, now, ALLOWED if decision.reason is _OK else RATE_LIMITED
            )
        return decision

    async def authorize(self, key: str, required_scope: str, transport: str = "grpc") -> Decision:
        """``check`` and, when needed, ``complete``: for callers that are async anyway."""
        answer = self.check(key, required_scope, transport)
        if isinstance(answer, Pending):
            return await self.complete(answer)
        return answer

    def client_view(self, key_digest: bytes) -> tuple[float | None, bool]:
        """What a client cache may keep of the answer just given for ``key_digest``: its expiry, and whether at all.

        Read back from this process's cache, so an answer the cache did not
        keep (a lookup that raced an invalidation, a cache that is not
        serving, no cache) is not cacheable: in doubt, the client asks again.
        A key under a rate limit, its own or the default, never is: only the
        server counts it. For a cache hit the view depends on the cached
        grant alone, so a transport that memoises responses per principal
        needs it only when it builds one (``authsvc.grpc.keyservice``).
        """
        cache = self.cache
        if cache is None:
            return NOT_CACHEABLE
        grant = cache.peek(key_digest)
        if grant is MISS:
            return NOT_CACHEABLE
        if grant is None:
            return (None, True)
        assert isinstance(grant, Grant)
        limiter = self.limiter
        if grant.rate_limit or (limiter is not None and limiter.default_limit):
            return NOT_CACHEABLE
        return (grant.expire_at, True)

    async def holder(self, key_digest: bytes) -> str | None:
        """The id of the stored key whose digest ``key_digest`` is (``None``: no such key).

        What a usage report names its entries by (``authsvc.grpc.watch``): a
        key's id is shown to every upstream, its digest is not. From this
        process's cache when it has the digest, else one lookup under the same
        admission and unknown-key budget as Authorize's misses (raising
        ``AtCapacity``, ``OverUnknownKeyBudget`` or ``Unavailable`` as they
        do), whose answer the cache keeps as a miss's would be. Never counted
        as an Authorize, nor by a rate limit.
        """
        cache = self.cache
        if cache is not None:
            cached = cache.peek(key_digest)
            if cached is not MISS:
                return None if cached is None else cached.principal.key_id  # type: ignore[union-attr]  # a Grant
        suspect = self.known is not None and self.known.suspect(key_digest)
        admission = self.admission
        if not admission.try_enter():
            raise AtCapacity(AT_CAPACITY)
        try:
            self._take_budget(suspect)
            epoch = cache.epoch if cache is not None else 0
            found = await self.store.find_by_digest(key_digest)
        finally:
            admission.leave()
        grant = self._learn(key_digest, found, epoch, suspect)
        return None if grant is None else grant.principal.key_id

    def _take_budget(self, suspect: bool) -> None:
        """A suspect's lookup spends the unknown-key budget; past it, refused (most likely forged: see known.py)."""
        known = self.known
        if suspect and known is not None and not known.budget.try_take():
            raise OverUnknownKeyBudget(UNKNOWN_KEYS)

    def _learn(self, key_digest: bytes, found: Found, epoch: int, suspect: bool) -> Grant | None:
        """What a lookup read, kept: by the cache (no such key too), and by the digest table for a suspect
        that exists (created since the feed last spoke). Not a coroutine: the miss path awaits only the store."""
        record, source = found
        grant = KeyGrant.of(record, self.catalog) if record is not None else None
        if suspect and record is not None and self.known is not None:
            self.known.add(key_digest)
        if self.cache is not None:
            self.cache.put(key_digest, grant, epoch, source)
        return grant

    def evict(self, key_digest: bytes) -> None:
        """This process changed the key: forget it at once, before any notification arrives.

        A key it created is known to the table of stored digests at once too:
        used right away on this replica, it is no suspect.
        """
        if self.cache is not None:
            self.cache.evict(key_digest)
        if self.known is not None:
            self.known.add(key_digest)

    def _decide(self, grant: Grant | None, required_scope: str, key_digest: bytes) -> Decision | Pending:
        now = self._clock()
        decision = decide(grant, required_scope, now)
        if grant is None:
            return decision
        reason = decision.reason
        if reason is _OK:
            limiter = self.limiter
            if limiter is not None and (grant.rate_limit or limiter.default_limit):
                if self.usage is not None:  # its answer is counted in ``complete``, once the limiter has spoken
                    self.usage.touch(grant.principal.key_id, now)
                return Pending(key_digest, required_scope, -1, decision, grant.rate_limit)
            outcome = ALLOWED
        elif reason is _REVOKED or reason is _EXPIRED:
            return decision  # a key that is no longer usable is not counted as used
        else:
            outcome = DENIED
        if self.usage is not None:
            self.usage.use(grant.principal.key_id, now, outcome)
        return decision
