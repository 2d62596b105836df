"""authsvc: API-key authorization as a service.

The public surface is the gRPC contract (``protos/authsvc/v1``) and the
``authsvc`` command; see README.md. Internals:

* ``keys``, ``keyformat``, ``validation``, ``errors``: the domain, no I/O
* ``service``: the core over a ``storage.Store``, with ``cache``, ``usage``, ``ratelimit``
* ``storage``: PostgreSQL, migrations, the embedded server
* ``grpc``, ``extauthz``: the transports
* ``config``, ``cli``, ``app``, ``workers``: running it
"""

__version__ = "0.1.0"
