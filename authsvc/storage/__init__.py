"""Storage: the core's ports (``authsvc.core.ports``) implemented at the edge.

- ``postgres``: ``KeyStore`` on PostgreSQL (asyncpg), with ``migrate`` and
  its numbered SQL files, and ``embedded`` for the PostgreSQL that runs when
  no database URL is configured;
- ``notify``: the ``InvalidationFeed`` over LISTEN/NOTIFY;
- ``memory``: both ports in process memory (unit tests of the core, trying
  authsvc without a database);
- ``redis``: the rate limiter's ``SharedCounter``.

Every store passes ``tests/storage/test_contract.py``.
"""
