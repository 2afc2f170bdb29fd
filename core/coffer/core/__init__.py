"""Coffer's domain: its values (`model`), errors (`errors`) and rules (`rules`), the ledger
that keeps them on PostgreSQL (`ledger`, over `store`), the schema's migrations (`migrate`),
the check of the books (`audit`) and the preload of a history (`preload`). No gRPC: the core
imports only the standard library and asyncpg, nothing of the server or the clients
(tests/test_project.py holds it so). Each module names its public names in `__all__`; the
package itself exports none.
"""

__all__: list[str] = []
