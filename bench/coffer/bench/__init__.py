"""`coffer bench`: a server on a fresh durable PostgreSQL, driven through the typed client,
measured against pgbench and a bare gRPC echo on the same machine."""

__all__: list[str] = []
