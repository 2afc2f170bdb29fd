"""The ledger's storage on PostgreSQL, one job a module; `coffer.core.ledger.Ledger` is its
one entry point."""

__all__: list[str] = []
