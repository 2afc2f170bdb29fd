"""Facts that never change once written, kept between batches: each wallet's unit, each
unit's system wallets, and each unit's scale. A batch needs the first two before it locks
anything (to write ahead, and to know which system wallets to lock); answers need the scale,
so that every amount says how to read it. Read once, they cost no round trip again."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import asyncpg

from ..model import OwnerKind, SystemWallet
from . import sql

__all__ = ["Facts", "unit_scales_max", "wallet_units_max"]

# Wallets whose unit is kept; past it, the cache starts over.
wallet_units_max = 100_000
# Units whose scale is kept; past it, the cache starts over.
unit_scales_max = 10_000


class Facts:
    def __init__(self) -> None:
        self._wallet_units: dict[int, str] = {}
        self._system_wallets: dict[tuple[str, SystemWallet], int] = {}
        self._unit_scales: dict[str, int] = {}

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

    def unit_scales_known(self, units: Collection[str]) -> Mapping[str, int] | None:
        """The scale of each of the units, if every one is known already (no I/O: what an
        answer's conversion asks first); else None."""
        known = self._unit_scales
        if all(unit in known for unit in units):
            return known
        return None

    async def unit_scales(
        self, connection: asyncpg.Connection, units: Collection[str]
    ) -> Mapping[str, int]:
        """The scale of each of the units that exist, read once per unit."""
        known = self._unit_scales
        missing = [unit for unit in units if unit not in known]
        if missing:
            if len(known) + len(missing) > unit_scales_max:
                known.clear()
            rows = await connection.fetch(sql.select_unit_scales, missing)
            known.update((row["code"], row["scale"]) for row in rows)
        return {unit: known[unit] for unit in units if unit in known}

    def unit_created(self, code: str, scale: int) -> None:
        """Learns a unit's scale from its creation (or a read of it): one query fewer."""
        if code not in self._unit_scales and len(self._unit_scales) < unit_scales_max:
            self._unit_scales[code] = scale
