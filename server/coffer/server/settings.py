"""What a server runs with: `Settings`, each value bounded by the limits it feeds, checked in
one place, when made.

A value out of its bounds raises SettingsError, naming the setting and its bounds: so a bad
value stops the server at start with a clear message (`coffer serve` prints it and exits with
status 2) rather than failing calls later, or failing deep inside gRPC or asyncpg. The bounds
are the constants below, or the limits of the modules a setting feeds, imported from there;
the batcher takes its defaults from here.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from coffer.clients.workers import Worker, new_instance, workers_max
from coffer.core.model import (
    batch_operations_max,
    events_retention_days_default,
    events_retention_days_max,
    events_watchers_max_default,
    events_watchers_max_limit,
)
from coffer.core.store.connections import (
    lock_timeout_s_default,
    pool_size_max,
    statement_timeout_s_default,
    timeout_s_max,
    timeout_s_min,
)

from .admission import request_bytes_max
from .tls import TlsError, TlsFiles, read_certificates

__all__ = [
    "Settings",
    "SettingsError",
    "authentication_failures_per_s_default",
    "authentication_failures_per_s_max",
    "batch_size_max_default",
    "batch_wait_ms_max",
    "batch_workers_default",
    "calls_max_limit",
    "cgroup_cores",
    "cpu_max_cores",
    "credentials_cache_ttl_s_default",
    "credentials_cache_ttl_s_max",
    "expiration_interval_s_default",
    "expiration_interval_s_max",
    "expiry_notice_days_default",
    "expiry_notice_days_max",
    "interval_s_max",
    "interval_s_min",
    "listen_default",
    "pool_size_min",
    "port_max",
    "queue_max_default",
    "queue_max_limit",
    "queued_bytes_max_limit",
    "rate_limit_burst_default",
    "rate_limit_burst_max",
    "rate_limit_calls_per_s_default",
    "rate_limit_calls_per_s_max",
    "rate_min",
    "shutdown_grace_s_max",
    "worker_alone",
    "workers_default",
    "workers_max",
]

listen_default = "127.0.0.1:50051"
port_max = 65535
# The database's URL: empty until known (`coffer serve` checks the flags before it starts an
# embedded PostgreSQL), else one asyncpg connects to.
database_url_schemes = ("postgresql://", "postgres://")

# Connections for writes: at least one for each lane of the batcher (single calls, batch calls).
pool_size_default = 8
pool_size_min = 2
pool_size_read_default = 4

batch_size_max_default = 1000
batch_wait_ms_default = 0.0
# The longest a small batch may wait for more operations.
batch_wait_ms_max = 1000.0
batch_workers_default = 2
queue_max_default = 50_000
# Operations waiting for a batch: each holds its request's values in memory.
queue_max_limit = 1_000_000
queued_bytes_max_default = 16 * 1024 * 1024
# Request bytes in progress at once (their decoded messages take several times as much).
queued_bytes_max_limit = 1024 * 1024 * 1024
calls_max_default = 4096
# Calls in progress at once. gRPC's own limits are small multiples of it (server/app.py), in
# 32-bit integers; and one process, on one thread, would only queue more.
calls_max_limit = 100_000

# The hold-expiry sweep and the health check run every so often: not so often that they spin,
# at least once an hour.
interval_s_min = 0.01
interval_s_max = 3600.0
shutdown_grace_s_default = 10.0
shutdown_grace_s_max = 600.0
# Expiration runs (`Ledger.expire_grants`): every so often, 0 for none (another server may run
# them), at least once a day when on; each followed by the notices of the grants that expire
# within so many days (GRANT_EXPIRING_SOON), 0 for none.
expiration_interval_s_default = 3600.0
expiration_interval_s_max = 86_400.0
expiry_notice_days_default = 7
expiry_notice_days_max = 366

# Rates (server/gate.py): calls a second per principal, with a burst, generous by default (a
# guard against a runaway client, not a quota); failed authentications a second per peer host,
# low (a guard against guessing keys).
rate_limit_calls_per_s_default = 10_000.0
rate_limit_calls_per_s_max = 1_000_000.0
rate_limit_burst_default = 20_000
rate_limit_burst_max = 10_000_000
authentication_failures_per_s_default = 20.0
authentication_failures_per_s_max = 100_000.0
rate_min = 0.1
# How long a credential looked up, and whether any exists, is taken as it was: a revocation
# made through another server takes effect within it.
credentials_cache_ttl_s_default = 2.0
credentials_cache_ttl_s_max = 60.0
# Processes of `coffer serve` (server/workers.py): by default one a core this process may run
# on, at most `workers_max` (coffer.clients.workers, which the clients read too).
# The names of the loopback interface that are not IP addresses.
_loopback_names = frozenset({"localhost"})


def worker_alone() -> Worker:
    """A server of one process, as its health check names it: worker 1 of 1, of an instance
    of its own."""
    return Worker(1, 1, new_instance())


def workers_default() -> int:
    """`coffer serve`'s workers when not told: the cores this process may run on (its CPU
    affinity, which a cpuset or a `taskset` narrows), fewer if its cgroup's CPU quota allows
    fewer (`cgroup_cores`), at most workers_max."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        cores = os.cpu_count() or 1
    quota = cgroup_cores()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, min(cores, workers_max))


def cgroup_cores(cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cores the cgroup v2 CPU quotas of this process allow (a container's `--cpus`): the
    smallest over its cgroup and those above it, within the hierarchy mounted at `cgroups`;
    None without a quota (or without cgroup v2)."""
    try:
        membership = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    own = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    if own is None:
        return None
    directory = cgroups / own.strip().lstrip("/")
    found = None
    for each in [directory, *directory.parents]:
        if not each.is_relative_to(cgroups):
            break
        try:
            cores = cpu_max_cores((each / "cpu.max").read_text())
        except OSError:
            continue
        if cores is not None:
            found = cores if found is None else min(found, cores)
    return found


def cpu_max_cores(text: str) -> int | None:
    """The cores a cgroup v2 `cpu.max` allows: "QUOTA PERIOD" (µs), ceil(QUOTA / PERIOD), at
    least 1; None for "max" (no quota) or what is not one."""
    fields = text.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields) or int(fields[1]) == 0:
        return None
    return max(1, math.ceil(int(fields[0]) / int(fields[1])))


class SettingsError(ValueError):
    """A setting out of the bounds of what it feeds; `setting` names it, `problem` says what
    its bounds are and what it was."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Settings:
    """What a server runs with; checked when made (SettingsError)."""

    database_url: str
    # HOST:PORT; port 0 picks a free one.
    listen: str = listen_default
    # Connections to PostgreSQL for writes: batches in flight at once, units, wallets.
    pool_size: int = pool_size_default
    # Connections for queries (gets, lists, histories), apart from the writes' ones.
    pool_size_read: int = pool_size_read_default
    # A statement running longer, or waiting longer for a lock, fails its call with
    # UNAVAILABLE; so does a database that does not answer for about as long, and a wait for a
    # free connection.
    statement_timeout_s: float = statement_timeout_s_default
    lock_timeout_s: float = lock_timeout_s_default
    # Operations coalesced into one batch: at most the ledger's batch_operations_max.
    batch_size_max: int = batch_size_max_default
    batch_wait_ms: float = batch_wait_ms_default
    # Operations waiting for a batch: at least one batch of them.
    queue_max: int = queue_max_default
    # Coalesced batches at once, when there is a backlog, of single calls and of batch calls
    # each (each batch on a connection of its own): at most half of pool_size.
    batch_workers: int = batch_workers_default
    # Request bytes in progress at once (decoded, queued or being applied), and calls: past
    # either, calls are refused with OVERLOADED before their request is decoded. At least two
    # of the largest requests (one of them kept for single calls and reads).
    queued_bytes_max: int = queued_bytes_max_default
    calls_max: int = calls_max_default
    # SO_REUSEPORT: several server processes may listen on one port (the kernel spreads the
    # connections among them).
    reuse_port: bool = False
    hold_expiry_interval_s: float = 1.0
    health_check_interval_s: float = 1.0
    # Also the health check's connection's statement and lock timeouts.
    health_check_timeout_s: float = 1.0
    shutdown_grace_s: float = shutdown_grace_s_default
    # TLS: the server's PEM certificate chain and key, both or neither (neither: plaintext);
    # with them, the PEM certificate authorities whose client certificates are required (mTLS).
    # Paths; the files are read and checked here, and again on every reload.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The event stream: kept (a record per write transaction) or not (for measuring: the
    # event RPCs then answer EVENTS_DISABLED); how many days records are kept, and how often
    # the older ones are deleted; watchers served at once (each also holds one of calls_max
    # while it lasts); how often a watcher reads anyway, should a notification be lost.
    events: bool = True
    events_retention_days: int = events_retention_days_default
    events_retention_interval_s: float = 60.0
    events_watchers_max: int = events_watchers_max_default
    events_poll_interval_s: float = 1.0
    # HOST:PORT to serve Prometheus metrics on over HTTP (port 0: any free one); empty: none.
    metrics_listen: str = ""
    # Plaintext on an address other than loopback, which is refused without it: for a trusted
    # network, or behind a proxy that terminates TLS. Authentication is on all the same.
    insecure: bool = False
    rate_limit_calls_per_s: float = rate_limit_calls_per_s_default
    rate_limit_burst: int = rate_limit_burst_default
    authentication_failures_per_s: float = authentication_failures_per_s_default
    credentials_cache_ttl_s: float = credentials_cache_ttl_s_default
    # Expiration runs: every expiration_interval_s (0: none), each followed by the notices of
    # the grants that expire within expiry_notice_days (0: none).
    expiration_interval_s: float = expiration_interval_s_default
    expiry_notice_days: int = expiry_notice_days_default
    # Processes serving on one port (`coffer serve --workers`): 1, the server alone; more, a
    # supervisor and that many workers, each a server with workers=1 and reuse_port (a Server
    # is one process: `Server.start` takes 1 only). With more than one and a metrics port P,
    # worker k serves its metrics on P + k - 1.
    workers: int = 1
    # Which of a supervisor's workers this server is, as its health check tells clients
    # (`coffer.clients.workers`): a server alone is worker 1 of 1.
    worker: Worker = field(default_factory=worker_alone)
    # Whether this server runs the background jobs: the hold-expiry sweep, the deletion of old
    # events, the expiration runs and their notices. Safe from several servers at once, but
    # each run is work done again: of `coffer serve`'s workers, only the first runs them.
    background_jobs: bool = True

    @property
    def loopback(self) -> bool:
        """Whether the server listens on a loopback address alone (where, without any
        credential yet, it may be open)."""
        host = self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if host in _loopback_names:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def tls_files(self) -> TlsFiles | None:
        """The TLS files, or None for plaintext."""
        if not self.tls_cert:
            return None
        return TlsFiles(
            cert=Path(self.tls_cert),
            key=Path(self.tls_key),
            client_ca=Path(self.tls_client_ca) if self.tls_client_ca else None,
        )

    def __post_init__(self) -> None:
        if self.database_url and not self.database_url.startswith(database_url_schemes):
            raise SettingsError(
                "database_url", f"must start with {' or '.join(database_url_schemes)}"
            )
        _check_address("listen", self.listen)
        self._check_metrics_listen()
        for flag in ("reuse_port", "insecure", "events", "background_jobs"):
            if not isinstance(getattr(self, flag), bool):
                raise SettingsError(flag, f"must be true or false, not {getattr(self, flag)!r}")
        if not isinstance(self.worker, Worker):
            raise SettingsError("worker", f"must be a Worker (K of N), not {self.worker!r}")
        self._check_tls()
        if not self.loopback and self.tls_files is None and not self.insecure:
            raise SettingsError(
                "listen",
                f"must be a loopback address to serve plaintext, not {self.listen!r}: serve TLS "
                "there (--tls-cert and --tls-key), or pass --insecure for plaintext on a trusted "
                "network or behind a TLS proxy (API keys would cross it in the clear)",
            )
        self._check_expiration_interval()
        timeout_note = " (PostgreSQL counts whole milliseconds, and 0 means no timeout)"
        bounds: list[tuple[str, float, float, str]] = [
            ("pool_size", pool_size_min, pool_size_max, ""),
            ("pool_size_read", 1, pool_size_max, ""),
            ("statement_timeout_s", timeout_s_min, timeout_s_max, timeout_note),
            ("lock_timeout_s", timeout_s_min, timeout_s_max, timeout_note),
            (
                "batch_size_max",
                1,
                batch_operations_max,
                " (the most operations the ledger applies in one transaction)",
            ),
            ("batch_wait_ms", 0, batch_wait_ms_max, ""),
            (
                "queue_max",
                self.batch_size_max,
                queue_max_limit,
                f" (at least one batch: batch_size_max, {self.batch_size_max})",
            ),
            (
                "batch_workers",
                1,
                self.pool_size // 2,
                f" (half of pool_size, {self.pool_size}: single calls and batch calls each run "
                "up to that many batches at once, each on a connection)",
            ),
            (
                "queued_bytes_max",
                2 * request_bytes_max,
                queued_bytes_max_limit,
                f" (at least twice the largest request, {request_bytes_max} bytes)",
            ),
            ("calls_max", 1, calls_max_limit, ""),
            ("hold_expiry_interval_s", interval_s_min, interval_s_max, ""),
            ("health_check_interval_s", interval_s_min, interval_s_max, ""),
            ("health_check_timeout_s", timeout_s_min, timeout_s_max, timeout_note),
            ("shutdown_grace_s", 0, shutdown_grace_s_max, ""),
            ("rate_limit_calls_per_s", rate_min, rate_limit_calls_per_s_max, ""),
            ("rate_limit_burst", 1, rate_limit_burst_max, ""),
            ("authentication_failures_per_s", rate_min, authentication_failures_per_s_max, ""),
            ("credentials_cache_ttl_s", timeout_s_min, credentials_cache_ttl_s_max, ""),
            ("events_retention_days", 1, events_retention_days_max, ""),
            ("events_retention_interval_s", interval_s_min, interval_s_max, ""),
            ("events_watchers_max", 1, events_watchers_max_limit, ""),
            ("events_poll_interval_s", interval_s_min, interval_s_max, ""),
            ("expiry_notice_days", 0, expiry_notice_days_max, " (0: no notices)"),
            ("workers", 1, workers_max, ""),
        ]
        for setting, low, high, note in bounds:
            value = getattr(self, setting)
            # Integers stay integers (gRPC and asyncpg take no 2.5 connections); NaN is in no
            # range.
            whole = isinstance(low, int) and isinstance(high, int)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (whole and not isinstance(value, int))
                or (isinstance(value, float) and math.isnan(value))
                or not low <= value <= high
            ):
                raise SettingsError(
                    setting, f"must be {_number(low)} to {_number(high)}{note}, not {value!r}"
                )

    def _check_expiration_interval(self) -> None:
        """0 (no runs), or an interval as the other sweeps' but as long as a day."""
        value = self.expiration_interval_s
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (value == 0 or interval_s_min <= value <= expiration_interval_s_max)
        ):
            raise SettingsError(
                "expiration_interval_s",
                f"must be 0 (no expiration runs) or {_number(interval_s_min)} to "
                f"{_number(expiration_interval_s_max)}, not {value!r}",
            )

    def _check_metrics_listen(self) -> None:
        if not isinstance(self.metrics_listen, str):
            raise SettingsError(
                "metrics_listen", f"must be HOST:PORT or empty, not {self.metrics_listen!r}"
            )
        if not self.metrics_listen:
            return
        _check_address("metrics_listen", self.metrics_listen)
        if self.metrics_listen == self.listen and not self.listen.endswith(":0"):
            raise SettingsError(
                "metrics_listen", f"must differ from --listen, not {self.metrics_listen!r}"
            )
        # With several workers, a port each from P: all of them within the ports, none --listen's.
        workers = self.workers if isinstance(self.workers, int) and self.workers > 1 else 1
        metrics_port = int(self.metrics_listen.rpartition(":")[2])
        if workers == 1 or metrics_port == 0:
            return
        last = metrics_port + workers - 1
        listen_port = int(self.listen.rpartition(":")[2])
        if last > port_max or metrics_port <= listen_port <= last:
            raise SettingsError(
                "metrics_listen",
                f"must leave a port to each of the {workers} workers (P to P + {workers - 1}), "
                f"all of them to {port_max} and none --listen's, not {self.metrics_listen!r}",
            )

    def _check_tls(self) -> None:
        for setting in ("tls_cert", "tls_key", "tls_client_ca"):
            if not isinstance(getattr(self, setting), str):
                raise SettingsError(setting, f"must be a path, not {getattr(self, setting)!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise SettingsError(
                given,
                f"must come with --{missing.replace('_', '-')} "
                "(a certificate and its key, or neither)",
            )
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError(
                "tls_client_ca",
                "must come with --tls-cert and --tls-key "
                "(client certificates are checked over TLS)",
            )
        files = self.tls_files
        if files is not None:
            try:
                read_certificates(files)
            except TlsError as error:
                raise SettingsError(error.setting, error.problem) from None


def _check_address(setting: str, address: object) -> None:
    """`address` must be HOST:PORT, the port from 0 to port_max."""
    if isinstance(address, str):
        host, separator, port = address.rpartition(":")
        if host and separator and port.isascii() and port.isdigit() and int(port) <= port_max:
            return
    raise SettingsError(
        setting, f"must be HOST:PORT with a port from 0 to {port_max}, not {address!r}"
    )


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
