"""The schema's migrations: numbered SQL files (`0001_ledger.sql`, …), which
`coffer.core.migrate` applies in order, once each. A package only so that they ship and are
read as package resources; it holds no Python and imports nothing.
"""

__all__: list[str] = []
