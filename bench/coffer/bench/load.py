"""The load of `coffer bench`: the setup of units and wallets, the scenarios, and what they
measure.

Every operation goes through the typed client (`coffer.clients.Client`):
`submit_batch_compact` with `operations` builders for the batch scenarios (compact answers,
as an importer or a load generator asks for them; `--whole-answers` asks for whole transfers
instead), its single calls otherwise. The client's own
retries are off (`retries_max=0`), so that every failure is counted. Request messages are
built before the timed part: the batch scenarios cycle through a ring of prepared batches and
give each operation a fresh idempotency key (and reference) as it is sent, so no operation is
a replay; the single-call scenarios cycle through prepared wallet choices and amounts.

The typed client costs little on top of the generated stubs, so the hot paths use it too:
`submit_batch` copies the operations into its request (about 1 µs an operation on this kind
of machine, some 3% of a core at 25,000 transfers/s), and a single call builds its request
(about 4 µs) next to some 150 µs of gRPC's own work per call in the client.

What is measured, and how, is in `bench_measure`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TextIO, TypedDict

from coffer.bench.measure import CpuMeter, Recorder, progress
from coffer.clients import Client, errors, operations
from coffer.v1.transfers_pb2 import Operation

__all__ = [
    "BatchWorkload",
    "EchoWorkload",
    "Fixture",
    "Note",
    "SingleWorkload",
    "Workload",
    "batch_scenarios",
    "credits_plan",
    "make_workload",
    "open_client",
    "run_load",
    "scenarios",
    "setup",
]

scenarios = ("batch", "single", "hot", "mixed", "payments", "credits", "overload")
batch_scenarios = ("batch", "hot", "payments", "credits")
unit_code = "EUR"
caller = "bench"
performed_by = "bench"
call_timeout_s = 30.0
# Customers may go this far below zero; they are also funded before the timed part.
overdraft = 100_000
funding_amount = 1_000_000_000
transfer_amount_max = 10_000
setup_concurrency = 32
setup_batch_size = 1000
ring_operations_min = 50_000
ring_operations_max = 1_000_000
# After a call fails outright (not a refusal), pause this long so a dead server is not spun on.
error_pause_s = 0.05
hold_timeout = timedelta(minutes=10)
voidable_max = 10_000
refused_reasons = frozenset({"INSUFFICIENT_FUNDS"})
# The credits scenario: each customer starts with 3 to 5 grants, expiring 1 to 90 days ahead
# (bought over the last 90 days). About a sixth of its load credits a new grant: a package
# bought, valid 90 days, as much as the wallet's debits take until its next package (four times
# a debit's amount on average); the rest debits that draw from the grants, the soonest expiry
# first. Each turn of the ring gives each wallet back what it takes (`credits_plan`), so it
# keeps about as many grants: 4.2 a wallet on average after a 20 s run, where wallets that got
# more than they spent had gathered 16 on average, up to 114.
credits_grants_min, credits_grants_max = 3, 5
credits_share = 0.2
credits_expiry_days_max = 90

Note = Callable[[str], None]


# Setup ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    run_id: str
    customers: list[int]
    merchants: list[int]
    # For the credits scenario: as many customers again, funded without terms, for the batch
    # load it is compared with in the same run.
    plain: list[int] = field(default_factory=list)


def open_client(target: str, connections: int, api_key: str | None = None) -> Client:
    """The bench's client: every call carrying `api_key` if given, over `connections`
    connections, which it spreads over the processes of a server of several (to reach them
    all, the client needs one a process at least)."""
    return Client(
        target,
        caller=caller,
        api_key=api_key,
        timeout_s=call_timeout_s,
        retries_max=0,
        connections=connections,
    )


async def setup(client: Client, scenario: str, wallets: int, run_id: str, note: Note) -> Fixture:
    """The unit, the wallets (customers with an overdraft; merchants for `hot` and
    `payments`), and a funding credit (a deposit, for `payments`) to every customer; for
    `credits`, also 3 to 5 grants with expiries days ahead to each, and as many customers again
    funded without terms (for the batch load it is compared with)."""
    started = time.monotonic()
    await client.create_unit(code=unit_code, kind="currency", name="Euro", scale=2)
    merchant_count = {"hot": 1, "payments": max(1, wallets // 10)}.get(scenario, 0)
    customer_count = wallets - merchant_count
    if customer_count < (2 if merchant_count == 0 else 1):
        raise ValueError(f"--wallets {wallets} is too few for the {scenario} scenario")
    limit = asyncio.Semaphore(setup_concurrency)

    async def create(number: int, kind: Literal["customer", "merchant"]) -> int:
        async with limit:
            wallet = await client.create_wallet(
                owner_id=f"bench-{run_id}-{kind}-{number}",
                owner_kind=kind,
                unit=unit_code,
                balance_minimum=-overdraft if kind == "customer" else 0,
                metadata={"bench": run_id},
                idempotency_key=f"{run_id}-wallet-{kind}-{number}",
            )
            return wallet.id

    customers = await asyncio.gather(*(create(n, "customer") for n in range(customer_count)))
    merchants = await asyncio.gather(*(create(n, "merchant") for n in range(merchant_count)))
    plain: list[int] = []
    if scenario == "credits":
        plain = await asyncio.gather(
            *(create(n, "customer") for n in range(customer_count, 2 * customer_count))
        )
    funded = [*customers, *plain]
    for start in range(0, len(funded), setup_batch_size):
        batch = []
        for number, wallet_id in enumerate(funded[start : start + setup_batch_size], start):
            key = f"{run_id}-funding-{number}"
            if scenario == "payments":
                batch.append(
                    operations.deposit(
                        wallet_id=wallet_id,
                        amount=funding_amount,
                        funding_source=f"iban:BENCH{number:010d}",
                        note="bench funding",
                        performed_by=performed_by,
                        idempotency_key=key,
                    )
                )
            else:
                batch.append(
                    operations.credit(
                        wallet_id=wallet_id,
                        amount=funding_amount,
                        note="bench funding",
                        reference=key,
                        performed_by=performed_by,
                        idempotency_key=key,
                    )
                )
        results = await client.submit_batch(batch)
        failed = [result.error for result in results if result.HasField("error")]
        if failed:
            raise RuntimeError(f"funding failed: {failed[0].reason}: {failed[0].message}")
    if scenario == "credits":
        await _grant(client, customers, run_id)
    note(
        f"setup: {len(funded):,} customer and {merchant_count:,} merchant wallets, funded "
        f"({time.monotonic() - started:.1f} s)"
    )
    return Fixture(run_id, list(customers), list(merchants), list(plain))


async def _grant(client: Client, customers: Sequence[int], run_id: str) -> None:
    """3 to 5 grants to each customer, expiring on different days ahead."""
    randomness = random.Random(run_id)
    now = datetime.now(UTC)
    grants = [
        operations.credit(
            wallet_id=wallet_id,
            amount=randomness.randint(1, transfer_amount_max) * 4,
            expires_at=now + timedelta(days=randomness.randint(1, credits_expiry_days_max)),
            note="bench grant",
            reference=f"{run_id}-grant-{wallet_id}-{number}",
            performed_by=performed_by,
            idempotency_key=f"{run_id}-grant-{wallet_id}-{number}",
        )
        for wallet_id in customers
        for number in range(randomness.randint(credits_grants_min, credits_grants_max))
    ]
    for start in range(0, len(grants), setup_batch_size):
        results = await client.submit_batch(grants[start : start + setup_batch_size])
        failed = [result.error for result in results if result.HasField("error")]
        if failed:
            raise RuntimeError(f"granting failed: {failed[0].reason}: {failed[0].message}")


def _picks(
    population: Sequence[int], count: int, skew: float, randomness: random.Random
) -> list[int]:
    """`count` draws from `population`: uniform, or Zipf-like (the wallet of rank r drawn with
    weight 1 / r**skew, the ranks shuffled over the wallets)."""
    if skew <= 0:
        return randomness.choices(population, k=count)
    order = list(population)
    randomness.shuffle(order)
    cumulative = list(itertools.accumulate(1 / (rank + 1) ** skew for rank in range(len(order))))
    return randomness.choices(order, cum_weights=cumulative, k=count)


def _pairs(
    population: Sequence[int], count: int, skew: float, randomness: random.Random
) -> list[tuple[int, int]]:
    """Source and target wallets, never the same one."""
    sources = _picks(population, count, skew, randomness)
    targets = _picks(population, count, skew, randomness)
    position = {wallet_id: index for index, wallet_id in enumerate(population)}
    pairs = []
    for source, target in zip(sources, targets, strict=True):
        if source == target:
            target = population[(position[source] + 1) % len(population)]
        pairs.append((source, target))
    return pairs


def credits_plan(
    customers: Sequence[int], count: int, skew: float, randomness: random.Random
) -> list[tuple[int, int, bool]]:
    """The credits load over one turn of the ring, `count` operations: (wallet, amount,
    whether a credit). A credit buys what its wallet's debits take until its next credit, the
    turn read as a circle, so that each wallet ends each turn with the grants it began it with
    (a credit right before another would buy nothing: it is a debit instead; a wallet drawn
    twice or more buys once at least). A wallet drawn once in the turn (with a skew) only
    spends: its grants run out, and its debits draw its funds without terms."""
    wallets = _picks(customers, count, skew, randomness)
    amounts = [randomness.randint(1, transfer_amount_max) for _ in wallets]
    credits = [randomness.random() < credits_share for _ in wallets]
    positions: dict[int, list[int]] = {}
    for position, wallet_id in enumerate(wallets):
        positions.setdefault(wallet_id, []).append(position)
    for mine in positions.values():
        if len(mine) == 1:
            credits[mine[0]] = False
            continue
        if not any(credits[position] for position in mine):
            credits[mine[0]] = True
        for number, position in enumerate(mine):
            following = mine[(number + 1) % len(mine)]
            if credits[position] and credits[following]:
                credits[position] = False
        first = next(number for number, position in enumerate(mine) if credits[position])
        # Backwards round the circle, from the operation right before the first credit: each
        # credit takes the debits met since the credit before it in this walk (after it).
        bought = 0
        for number in range(first + len(mine) - 1, first - 1, -1):
            position = mine[number % len(mine)]
            if credits[position]:
                amounts[position], bought = bought, 0
            else:
                bought += amounts[position]
    return list(zip(wallets, amounts, credits, strict=True))


def _credits_batch(plan: Sequence[tuple[int, int, bool]]) -> _PreparedBatch:
    """A batch of the credits load, as `credits_plan` planned it: a package bought now is
    valid for `credits_expiry_days_max` days, longer than those bought before it."""
    now = datetime.now(UTC)
    built = [
        operations.credit(
            wallet_id=wallet_id,
            amount=amount,
            expires_at=now + timedelta(days=credits_expiry_days_max),
            note="bench grant",
            performed_by=performed_by,
            idempotency_key="",
        )
        if credit
        else operations.debit(
            wallet_id=wallet_id,
            amount=amount,
            note="bench session",
            performed_by=performed_by,
            idempotency_key="",
        )
        for wallet_id, amount, credit in plan
    ]
    return _prepared(built)


def _prepared(built: list[Operation]) -> _PreparedBatch:
    keyed = []
    for operation in built:
        kind = operation.WhichOneof("operation")
        assert kind is not None
        keyed.append((getattr(operation, kind), kind != "deposit"))
    return _PreparedBatch(built, keyed)


def _ring_size(wallets: int) -> int:
    return min(ring_operations_max, max(ring_operations_min, 4 * wallets))


# Scenarios ------------------------------------------------------------------------------------


class Workload:
    """One scenario's load: `step` makes one RPC and records it."""

    label = ""
    # What the progress line counts.
    unit = "transfers"

    def __init__(self, run_id: str) -> None:
        self.key_prefix = f"{run_id}-"
        self.key_numbers = itertools.count()

    async def step(self, client: Client, recorder: Recorder) -> None:
        raise NotImplementedError

    async def _failed(
        self, recorder: Recorder, started: float, error: Exception, operations_count: int
    ) -> None:
        """A whole call failed: a refusal, or an error (then a short pause)."""
        ended = time.perf_counter()
        reason = error.reason if isinstance(error, errors.CofferError) else type(error).__name__
        if reason in refused_reasons:
            recorder.record(started, ended, 0, refused=operations_count)
            return
        recorder.record(
            started,
            ended,
            0,
            errors=operations_count,
            reasons={reason: operations_count},
            timed=False,
        )
        await asyncio.sleep(error_pause_s)


@dataclass
class _PreparedBatch:
    operations: list[Operation]
    # The inner request of each operation, and whether its reference is set with its key.
    keyed: list[tuple[Any, bool]]


class BatchWorkload(Workload):
    """SubmitBatch calls of `batch_size` operations: transfers among customers (`batch`), from
    customers to one merchant (`hot`), deposits and payments (`payments`), or credits with
    expiries and debits that draw from them (`credits`)."""

    def __init__(
        self,
        scenario: str,
        fixture: Fixture,
        batch_size: int,
        skew: float,
        randomness: random.Random,
        *,
        compact: bool = True,
    ) -> None:
        super().__init__(fixture.run_id)
        self.label = scenario
        self.batch_size = batch_size
        self.compact = compact
        wallets = len(fixture.customers) + len(fixture.merchants)
        count = max(4, -(-_ring_size(wallets) // batch_size))
        if scenario == "credits":
            plan = credits_plan(fixture.customers, count * batch_size, skew, randomness)
            self.ring = [
                _credits_batch(plan[start : start + batch_size])
                for start in range(0, len(plan), batch_size)
            ]
        else:
            self.ring = [self._prepare(scenario, fixture, skew, randomness) for _ in range(count)]
        self.ring_positions = itertools.cycle(range(count))

    def _prepare(
        self, scenario: str, fixture: Fixture, skew: float, randomness: random.Random
    ) -> _PreparedBatch:
        size = self.batch_size
        amounts = [randomness.randint(1, transfer_amount_max) for _ in range(size)]
        built: list[Operation] = []
        if scenario == "batch":
            for (source, target), amount in zip(
                _pairs(fixture.customers, size, skew, randomness), amounts, strict=True
            ):
                built.append(
                    operations.transfer(
                        source_wallet_id=source,
                        target_wallet_id=target,
                        amount=amount,
                        note="bench transfer",
                        performed_by=performed_by,
                        idempotency_key="",
                    )
                )
        elif scenario == "hot":
            (merchant,) = fixture.merchants
            for source, amount in zip(
                _picks(fixture.customers, size, skew, randomness), amounts, strict=True
            ):
                built.append(
                    operations.transfer(
                        source_wallet_id=source,
                        target_wallet_id=merchant,
                        amount=amount,
                        note="bench purchase",
                        performed_by=performed_by,
                        idempotency_key="",
                    )
                )
        else:
            payers = _picks(fixture.customers, size, skew, randomness)
            payees = _picks(fixture.merchants, size, skew, randomness)
            for payer, payee, amount in zip(payers, payees, amounts, strict=True):
                if randomness.random() < 0.2:
                    built.append(
                        operations.deposit(
                            wallet_id=payer,
                            amount=amount * 5,
                            funding_source=f"card:bench-{payer}",
                            note="top-up",
                            performed_by=performed_by,
                            idempotency_key="",
                        )
                    )
                else:
                    built.append(
                        operations.pay(
                            payer_wallet_id=payer,
                            payee_wallet_id=payee,
                            amount=amount,
                            note="order",
                            performed_by=performed_by,
                            idempotency_key="",
                        )
                    )
        return _prepared(built)

    def next_operations(self) -> list[Operation]:
        """The next prepared batch, with fresh keys: each operation is new, never a replay.
        The reference (an order or invoice number, say) is the key too; a deposit's reference
        is its funding source. submit_batch copies the operations into its request before it
        first yields, so the prepared batch may be keyed again by the next call."""
        batch = self.ring[next(self.ring_positions)]
        prefix = self.key_prefix
        for inner, referenced in batch.keyed:
            key = f"{prefix}{next(self.key_numbers)}"
            inner.idempotency_key = key
            if referenced:
                inner.reference = key
        return batch.operations

    async def step(self, client: Client, recorder: Recorder) -> None:
        batch = self.next_operations()
        started = time.perf_counter()
        try:
            if self.compact:
                outcomes = await client.submit_batch_compact(batch)
                failures = [failed.error.reason for failed in outcomes.failed]
            else:
                results = await client.submit_batch(batch)
                failures = [result.error.reason for result in results if result.HasField("error")]
        except Exception as error:
            await self._failed(recorder, started, error, len(batch))
            return
        ended = time.perf_counter()
        refused = failed = 0
        reasons: Counter[str] | None = None
        for reason in failures:
            if reason in refused_reasons:
                refused += 1
            else:
                failed += 1
                reasons = reasons or Counter()
                reasons[reason] += 1
        succeeded = len(batch) - len(failures)
        recorder.record(started, ended, succeeded, refused=refused, errors=failed, reasons=reasons)


class SingleWorkload(Workload):
    """One Transfer call per step; the server's batcher coalesces concurrent ones."""

    label = "single"

    def __init__(self, fixture: Fixture, skew: float, randomness: random.Random) -> None:
        super().__init__(fixture.run_id)
        size = _ring_size(len(fixture.customers))
        pairs = _pairs(fixture.customers, size, skew, randomness)
        self.ring = [
            (source, target, randomness.randint(1, transfer_amount_max)) for source, target in pairs
        ]
        self.positions = itertools.cycle(range(size))

    async def transfer(self, client: Client) -> None:
        """The next single Transfer call."""
        source, target, amount = self.ring[next(self.positions)]
        key = f"{self.key_prefix}{next(self.key_numbers)}"
        await client.transfer(
            source_wallet_id=source,
            target_wallet_id=target,
            amount=amount,
            note="bench transfer",
            reference=key,
            performed_by=performed_by,
            idempotency_key=key,
        )

    async def step(self, client: Client, recorder: Recorder) -> None:
        started = time.perf_counter()
        try:
            await self.transfer(client)
        except Exception as error:
            await self._failed(recorder, started, error, 1)
            return
        recorder.record(started, time.perf_counter(), 1)


mixed_actions = {
    # action: weight
    "transfer": 30,
    "credit": 10,
    "debit": 10,
    "debit_up_to": 5,
    "hold": 12,
    "resolve_hold": 12,
    "void": 6,
    "balance": 15,
}


class _Common(TypedDict):
    """What every mutating call of the mixed scenario carries."""

    performed_by: str
    idempotency_key: str


class _MixedWorkload(Workload):
    """Single calls of every kind: credits, debits (all-or-nothing and up-to), transfers, holds
    captured (all or part) or released, voids of earlier transfers, and balance reads."""

    label = "mixed"

    def __init__(self, fixture: Fixture, skew: float, randomness: random.Random) -> None:
        super().__init__(fixture.run_id)
        size = _ring_size(len(fixture.customers))
        pairs = _pairs(fixture.customers, size, skew, randomness)
        actions = randomness.choices(
            list(mixed_actions), weights=list(mixed_actions.values()), k=size
        )
        self.ring = [
            (
                action,
                source,
                target,
                randomness.randint(1, transfer_amount_max),
                randomness.random(),
            )
            for action, (source, target) in zip(actions, pairs, strict=True)
        ]
        self.positions = itertools.cycle(range(size))
        # Holds placed and not yet resolved, and transfers that may be voided: each is taken
        # by one step only, so none is resolved or voided twice.
        self.open_holds: deque[tuple[int, int]] = deque()
        self.voidable: deque[int] = deque(maxlen=voidable_max)

    async def step(self, client: Client, recorder: Recorder) -> None:
        action, source, target, amount, chance = self.ring[next(self.positions)]
        if action == "resolve_hold" and not self.open_holds:
            action = "hold"
        if action == "void" and not self.voidable:
            action = "transfer"
        key = f"{self.key_prefix}{next(self.key_numbers)}"
        started = time.perf_counter()
        try:
            transfers = await self._act(client, action, source, target, amount, chance, key)
        except Exception as error:
            await self._failed(recorder, started, error, 1)
            return
        recorder.record(started, time.perf_counter(), transfers)

    async def _act(
        self,
        client: Client,
        action: str,
        source: int,
        target: int,
        amount: int,
        chance: float,
        key: str,
    ) -> int:
        """Makes the call; returns 1 for a mutating operation, 0 for a read."""
        common = _Common(performed_by=performed_by, idempotency_key=key)
        if action == "transfer":
            transfer = await client.transfer(
                source_wallet_id=source,
                target_wallet_id=target,
                amount=amount,
                note="bench transfer",
                reference=key,
                **common,
            )
            self.voidable.append(transfer.id)
        elif action == "credit":
            transfer = await client.credit(
                wallet_id=source, amount=amount, note="top-up", reference=key, **common
            )
            self.voidable.append(transfer.id)
        elif action in ("debit", "debit_up_to"):
            debited = await client.debit(
                wallet_id=source,
                amount=amount // 2 + 1,
                mode="all_or_nothing" if action == "debit" else "up_to",
                note="purchase",
                reference=key,
                **common,
            )
            if debited.amount_debited > 0:
                self.voidable.append(debited.transfer.id)
        elif action == "hold":
            placed = await client.place_hold(
                wallet_id=source,
                amount=amount,
                target_wallet_id=target,
                timeout=hold_timeout,
                note="reservation",
                reference=key,
                **common,
            )
            self.open_holds.append((placed.hold.id, placed.hold.amount))
        elif action == "resolve_hold":
            hold_id, held = self.open_holds.popleft()
            if chance < 0.3:
                await client.capture_hold(
                    hold_id=hold_id, note="fulfilled", reference=key, **common
                )
            elif chance < 0.6:
                await client.capture_hold(
                    hold_id=hold_id,
                    amount=max(1, held // 2),
                    note="partly fulfilled",
                    reference=key,
                    **common,
                )
            else:
                await client.release_hold(hold_id=hold_id, note="cancelled", **common)
        elif action == "void":
            await client.void(transfer_id=self.voidable.pop(), note="refund", **common)
        else:
            await client.get_balance(wallet_id=source)
            return 0
        return 1


class EchoWorkload(Workload):
    """The standard health Check: what a call costs with no ledger behind it."""

    label = "echo"
    unit = "calls"

    async def step(self, client: Client, recorder: Recorder) -> None:
        started = time.perf_counter()
        try:
            await client.health()
        except Exception as error:
            await self._failed(recorder, started, error, 1)
            return
        recorder.record(started, time.perf_counter(), 1)


def make_workload(
    scenario: str,
    fixture: Fixture,
    batch_size: int,
    skew: float,
    seed: int,
    *,
    compact: bool = True,
) -> Workload:
    """The scenario's load; batch scenarios ask for compact answers unless `compact` is
    false (whole transfers in each answer)."""
    randomness = random.Random(seed)
    if scenario in batch_scenarios:
        return BatchWorkload(scenario, fixture, batch_size, skew, randomness, compact=compact)
    if scenario == "single":
        return SingleWorkload(fixture, skew, randomness)
    assert scenario == "mixed", scenario
    return _MixedWorkload(fixture, skew, randomness)


async def run_load(
    workload: Workload,
    client: Client,
    *,
    inflight: int,
    warmup_s: float,
    duration_s: float,
    cpu: CpuMeter | None = None,
    stream: TextIO = sys.stderr,
) -> dict[str, Any]:
    """`inflight` loops, each making one call at a time (the client spreads them over its
    connections), for the warmup and then the measured duration; then the summary, with the
    CPU each of `cpu`'s groups spent in the measured window when given."""
    recorder = Recorder(warmup_s, duration_s)

    async def loop() -> None:
        while recorder.running():
            await workload.step(client, recorder)

    recorder.start()
    reporting = asyncio.create_task(progress(workload.label, workload.unit, recorder, stream))
    metering = asyncio.create_task(_meter(cpu, recorder)) if cpu is not None else None
    try:
        await asyncio.gather(*(loop() for _ in range(inflight)))
    finally:
        reporting.cancel()
        await asyncio.gather(reporting, return_exceptions=True)
    summary = recorder.summary()
    summary["inflight"] = inflight
    if metering is not None:
        summary.update(cpu_budget(await metering, summary["transfers"], duration_s))
    return summary


async def _meter(cpu: CpuMeter, recorder: Recorder) -> dict[str, float]:
    """What each group of processes spent in the measured window."""
    await asyncio.sleep(max(0.0, recorder.measure_start - time.perf_counter()))
    before = cpu.read()
    await asyncio.sleep(max(0.0, recorder.measure_end - time.perf_counter()))
    after = cpu.read()
    return {name: after[name] - before.get(name, 0.0) for name in after}


def cpu_budget(spent: dict[str, float], transfers: int, duration_s: float) -> dict[str, Any]:
    """The CPU each group spent per transfer (µs) and the cores it kept busy."""
    return {
        "cpu_us_per_transfer": {
            name: round(seconds / transfers * 1e6, 1) if transfers else None
            for name, seconds in spent.items()
        },
        "cpu_cores": {name: round(seconds / duration_s, 2) for name, seconds in spent.items()},
    }
