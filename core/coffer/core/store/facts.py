"""Facts that never change once written, kept between batches: each wallet's unit, each
unit's system wallets, each unit's scale and each unit's default validity. A batch needs the
first two before it locks anything (to write ahead, and to know which system wallets to lock),
and the validity to date the grants of credits that name no expiry; answers need the scale, so
that every amount says how to read it. Read once, they cost no round trip again."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TypeVar

import asyncpg

from ..model import OwnerKind, SystemWallet, Unit
from ..validity import Validity, parse_validity
from . import sql

__all__ = [
    "Facts",
    "system_wallet_units_max",
    "unit_scales_max",
    "unit_validities_max",
    "wallet_units_max",
]

# Wallets whose unit is kept; past it, the cache starts over.
wallet_units_max = 100_000
# Units whose system wallets are kept; past it, the cache starts over.
system_wallet_units_max = 10_000
# Units whose scale is kept; past it, the cache starts over.
unit_scales_max = 10_000
# Units whose default validity is kept; past it, the cache starts over.
unit_validities_max = 10_000

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


async def _read_through(
    known: dict[_Key, _Value],
    wanted: Collection[_Key],
    size_max: int,
    read: Callable[[list[_Key]], Awaitable[Iterable[tuple[_Key, _Value]]]],
) -> dict[_Key, _Value]:
    """What `known` holds of `wanted`, reading the rest (once; what does not exist stays
    unknown). Past `size_max`, the cache starts over and reads all it is asked for, so that an
    answer never lacks a fact it had a moment before."""
    missing = [key for key in wanted if key not in known]
    if missing:
        if len(known) + len(missing) > size_max:
            known.clear()
            missing = list(wanted)
        known.update(await read(missing))
    return {key: known[key] for key in wanted if key in known}


class Facts:
    def __init__(
        self,
        *,
        wallet_units_max: int = wallet_units_max,
        system_wallet_units_max: int = system_wallet_units_max,
        unit_scales_max: int = unit_scales_max,
        unit_validities_max: int = unit_validities_max,
    ) -> None:
        self._wallet_units: dict[int, str] = {}
        self._system_wallets: dict[str, dict[SystemWallet, int]] = {}
        self._unit_scales: dict[str, int] = {}
        self._unit_validities: dict[str, Validity | None] = {}
        self._wallet_units_max = wallet_units_max
        self._system_wallet_units_max = system_wallet_units_max
        self._unit_scales_max = unit_scales_max
        self._unit_validities_max = unit_validities_max

    async def wallet_units(
        self, connection: asyncpg.Connection, wallet_ids: set[int]
    ) -> dict[int, str]:
        """The unit of each of the wallets that exist."""

        async def read(missing: list[int]) -> Iterable[tuple[int, str]]:
            rows = await connection.fetch(sql.select_wallet_units, missing)
            return ((row["id"], row["unit"]) for row in rows)

        return await _read_through(self._wallet_units, wallet_ids, self._wallet_units_max, read)

    async def system_wallets(
        self, connection: asyncpg.Connection, units: set[str]
    ) -> dict[tuple[str, SystemWallet], int]:
        """The system wallets of the units, by unit and which."""

        async def read(missing: list[str]) -> Iterable[tuple[str, dict[SystemWallet, int]]]:
            rows = await connection.fetch(sql.select_system_wallets, OwnerKind.system, missing)
            found: dict[str, dict[SystemWallet, int]] = {}
            for row in rows:
                found.setdefault(row["unit"], {})[SystemWallet[row["owner_id"]]] = row["id"]
            return found.items()

        by_unit = await _read_through(
            self._system_wallets, units, self._system_wallet_units_max, read
        )
        return {
            (unit, which): wallet_id
            for unit, wallets in by_unit.items()
            for which, wallet_id in wallets.items()
        }

    async def expired_wallets(self, connection: asyncpg.Connection, units: set[str]) -> None:
        """Makes the expired-credits wallets of the units that have none yet (each unit's is
        made at its first expiration), so that `system_wallets` then has them."""
        lacking = [
            unit for unit in units if SystemWallet.expired not in self._system_wallets.get(unit, {})
        ]
        if not lacking:
            return
        await connection.execute(
            sql.insert_expired_wallets, lacking, SystemWallet.expired.name, OwnerKind.system
        )
        for unit in lacking:
            self._system_wallets.pop(unit, None)

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

        async def read(missing: list[str]) -> Iterable[tuple[str, int]]:
            rows = await connection.fetch(sql.select_unit_scales, missing)
            return ((row["code"], row["scale"]) for row in rows)

        return await _read_through(self._unit_scales, units, self._unit_scales_max, read)

    async def unit_validities(
        self, connection: asyncpg.Connection, units: set[str]
    ) -> dict[str, Validity | None]:
        """The default validity of each of the units that exist (None: none), read once per
        unit."""

        async def read(missing: list[str]) -> Iterable[tuple[str, Validity | None]]:
            rows = await connection.fetch(sql.select_unit_validities, missing)
            return ((row["code"], _validity(row["default_validity"])) for row in rows)

        return await _read_through(self._unit_validities, units, self._unit_validities_max, read)

    def unit_created(self, unit: Unit) -> None:
        """Learns a unit's scale and default validity from its creation: queries fewer."""
        if unit.code not in self._unit_scales and len(self._unit_scales) < self._unit_scales_max:
            self._unit_scales[unit.code] = unit.scale
        known = self._unit_validities
        if unit.code not in known and len(known) < self._unit_validities_max:
            known[unit.code] = _validity(unit.default_validity)


def _validity(text: str) -> Validity | None:
    """A unit's stored default validity ("" for none), which its creation checked."""
    return parse_validity(text, "default_validity") if text else None
