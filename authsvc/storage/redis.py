"""``SharedCounter`` on Redis: rate-limit windows counted once for every process.

Bounded by a short timeout: a slow Redis must cost a rate-limited call
milliseconds, not its deadline (the limiter then counts locally).
"""

from __future__ import annotations

from typing import Any

from authsvc.config import scrub
from authsvc.core.errors import ConfigError

# INCR and EXPIRE in one round trip, atomically.
_INCR_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RedisCounter:
    def __init__(self, url: str, timeout: float = 0.05) -> None:
        import redis.asyncio as redis  # optional at import time; only used when configured

        try:
            self._client: Any = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:  # redis-py's URL parser: e.g. an unknown query parameter
            raise ConfigError(f"is not usable: {scrub(str(exc), url)}") from None
        self._script = self._client.register_script(_INCR_SCRIPT)

    async def incr(self, name: str, ttl_seconds: int) -> int:
        return int(await self._script(keys=[name], args=[ttl_seconds]))

    async def close(self) -> None:
        await self._client.aclose()
