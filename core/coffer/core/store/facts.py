"""Facts that never change once written, kept between batches: each wallet's unit, and each
unit's system wallets. A batch needs them before it locks anything (to write ahead, and to
know which system wallets to lock); read once, they cost no round trip again."""

from __future__ import annotations

import asyncpg

from ..model import OwnerKind, SystemWallet
from . import sql

__all__ = ["Facts", "wallet_units_max"]

# Wallets whose unit is kept; past it, the cache starts over.
wallet_units_max = 100_000


class Facts:
    def __init__(self) -> None:
        self._wallet_units: dict[int, str] = {}
        self._system_wallets: dict[tuple[str, SystemWallet], int] = {}

    async def wallet_units(
        self, connection: asyncpg.Connection, wallet_ids: set[int]
    ) -> dict[int, str]:
        """The unit of each of the wallets that exist."""
        known = self._wallet_units
        missing = [wallet_id for wallet_id in wallet_ids if wallet_id not in known]
        if missing:
            if len(known) + len(missing) > wallet_units_max:
                known.clear()
            rows = await connection.fetch(sql.select_wallet_units, missing)
            known.update((row["id"], row["unit"]) for row in rows)
        return {wallet_id: known[wallet_id] for wallet_id in wallet_ids if wallet_id in known}

    async def system_wallets(
        self, connection: asyncpg.Connection, units: set[str]
    ) -> dict[tuple[str, SystemWallet], int]:
        """The system wallets of the units, by unit and which."""
        known = self._system_wallets
        missing = [unit for unit in units if (unit, SystemWallet.operator) not in known]
        if missing:
            rows = await connection.fetch(sql.select_system_wallets, OwnerKind.system, missing)
            for row in rows:
                known[(row["unit"], SystemWallet[row["owner_id"]])] = row["id"]
        return {key: wallet_id for key, wallet_id in known.items() if key[0] in units}
