"""Settings: every value bounded by the limits it feeds, checked when made. Every field of
Settings has its bounds tested here: a field added without them fails
`test_every_setting_is_bounded`."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import pytest

from coffer.clients.workers import Worker, new_instance
from coffer.core.model import (
    batch_operations_max,
    events_retention_days_max,
    events_watchers_max_limit,
)
from coffer.core.store.connections import pool_size_max, timeout_s_max, timeout_s_min
from coffer.server.admission import request_bytes_max
from coffer.server.settings import (
    Settings,
    SettingsError,
    authentication_failures_per_s_max,
    batch_size_max_default,
    batch_wait_ms_max,
    calls_max_limit,
    cgroup_cores,
    cpu_max_cores,
    credentials_cache_ttl_s_max,
    expiration_interval_s_max,
    expiry_notice_days_max,
    interval_s_max,
    interval_s_min,
    pool_size_min,
    port_max,
    queue_max_limit,
    queued_bytes_max_limit,
    rate_limit_burst_max,
    rate_limit_calls_per_s_max,
    rate_min,
    shutdown_grace_s_max,
    workers_default,
    workers_max,
)

Changes = dict[str, Any]
base = Settings(database_url="")
# The values below and above every number's range, for floats.
not_numbers = [math.nan, math.inf, -math.inf]


def timeouts(setting: str) -> tuple[list[Changes], list[Changes]]:
    # 0.0004 s would be 0 ms to PostgreSQL: no timeout at all.
    return (
        [{setting: timeout_s_min}, {setting: timeout_s_max}],
        [{setting: value} for value in (0, 0.0004, timeout_s_max + 1, *not_numbers)],
    )


def intervals(setting: str) -> tuple[list[Changes], list[Changes]]:
    return (
        [{setting: interval_s_min}, {setting: interval_s_max}],
        [{setting: value} for value in (0, -1, interval_s_max + 1, *not_numbers)],
    )


# For each setting: changes that put it at its bounds (accepted), and changes that put it just
# past them (refused, naming that setting). Where a bound depends on another setting, the
# changes set both, so that only the setting tested can be out of bounds.
bounds: dict[str, tuple[list[Changes], list[Changes]]] = {
    "database_url": (
        [
            {"database_url": ""},
            {"database_url": "postgresql://coffer@/coffer?host=/run/postgresql"},
            {"database_url": "postgres://coffer@db.example:5432/coffer"},
        ],
        [{"database_url": "coffer"}, {"database_url": "mysql://coffer@db/coffer"}],
    ),
    "listen": (
        [
            {"listen": "127.0.0.1:0"},
            {"listen": "[::1]:50051"},
            {"listen": "localhost:50051"},
            {"listen": f"[::]:{port_max}", "insecure": True},
            {"listen": "0.0.0.0:50051", "insecure": True},
        ],
        [
            # Plaintext off loopback, without --insecure.
            {"listen": f"[::]:{port_max}"},
            {"listen": "0.0.0.0:50051"},
            {"listen": "coffer.example:50051"},
            {"listen": "127.0.0.1"},
            {"listen": ":50051"},
            {"listen": f"127.0.0.1:{port_max + 1}"},
            {"listen": "127.0.0.1:-1"},
            # Digits, but not ASCII ones.
            {"listen": "127.0.0.1:\u00b2"},
            {"listen": "127.0.0.1:\u0665\u0660"},
        ],
    ),
    "pool_size": (
        [{"pool_size": pool_size_min, "batch_workers": 1}, {"pool_size": pool_size_max}],
        [{"pool_size": pool_size_min - 1}, {"pool_size": pool_size_max + 1}],
    ),
    "pool_size_read": (
        [{"pool_size_read": 1}, {"pool_size_read": pool_size_max}],
        [{"pool_size_read": 0}, {"pool_size_read": pool_size_max + 1}],
    ),
    "statement_timeout_s": timeouts("statement_timeout_s"),
    "lock_timeout_s": timeouts("lock_timeout_s"),
    "batch_size_max": (
        [{"batch_size_max": 1}, {"batch_size_max": batch_operations_max}],
        [{"batch_size_max": 0}, {"batch_size_max": batch_operations_max + 1}],
    ),
    "batch_wait_ms": (
        [{"batch_wait_ms": 0}, {"batch_wait_ms": batch_wait_ms_max}],
        [{"batch_wait_ms": value} for value in (-1, batch_wait_ms_max + 1, *not_numbers)],
    ),
    "queue_max": (
        [{"queue_max": batch_size_max_default}, {"queue_max": queue_max_limit}],
        [{"queue_max": batch_size_max_default - 1}, {"queue_max": queue_max_limit + 1}],
    ),
    "batch_workers": (
        [{"batch_workers": 1}, {"pool_size": 10, "batch_workers": 5}],
        [{"batch_workers": 0}, {"pool_size": 10, "batch_workers": 6}],
    ),
    "queued_bytes_max": (
        [
            {"queued_bytes_max": 2 * request_bytes_max},
            {"queued_bytes_max": queued_bytes_max_limit},
        ],
        [
            {"queued_bytes_max": 2 * request_bytes_max - 1},
            {"queued_bytes_max": queued_bytes_max_limit + 1},
        ],
    ),
    "calls_max": (
        [{"calls_max": 1}, {"calls_max": calls_max_limit}],
        # 10**9 would overflow gRPC's own limits, which are multiples of it.
        [{"calls_max": 0}, {"calls_max": calls_max_limit + 1}, {"calls_max": 10**9}],
    ),
    "reuse_port": (
        [{"reuse_port": False}, {"reuse_port": True}],
        [{"reuse_port": "no"}, {"reuse_port": 1}],
    ),
    "insecure": (
        [{"insecure": False}, {"insecure": True}],
        [{"insecure": "yes"}, {"insecure": 1}],
    ),
    "workers": (
        [{"workers": 1}, {"workers": workers_max}],
        [{"workers": value} for value in (0, workers_max + 1, 1.5, True, math.nan)],
    ),
    "worker": (
        [{"worker": Worker(1, 1, new_instance())}, {"worker": Worker(2, 2, new_instance())}],
        [{"worker": value} for value in (f"2/2@{new_instance()}", 2, None)],
    ),
    "background_jobs": (
        [{"background_jobs": False}, {"background_jobs": True}],
        [{"background_jobs": "no"}, {"background_jobs": 0}],
    ),
    "rate_limit_calls_per_s": (
        [
            {"rate_limit_calls_per_s": rate_min},
            {"rate_limit_calls_per_s": rate_limit_calls_per_s_max},
        ],
        [
            {"rate_limit_calls_per_s": value}
            for value in (0, rate_limit_calls_per_s_max * 2, *not_numbers)
        ],
    ),
    "rate_limit_burst": (
        [{"rate_limit_burst": 1}, {"rate_limit_burst": rate_limit_burst_max}],
        [
            {"rate_limit_burst": 0},
            {"rate_limit_burst": rate_limit_burst_max + 1},
            {"rate_limit_burst": 2.5},
        ],
    ),
    "authentication_failures_per_s": (
        [
            {"authentication_failures_per_s": rate_min},
            {"authentication_failures_per_s": authentication_failures_per_s_max},
        ],
        [
            {"authentication_failures_per_s": value}
            for value in (0, authentication_failures_per_s_max + 1, *not_numbers)
        ],
    ),
    "credentials_cache_ttl_s": (
        [
            {"credentials_cache_ttl_s": timeout_s_min},
            {"credentials_cache_ttl_s": credentials_cache_ttl_s_max},
        ],
        [
            {"credentials_cache_ttl_s": value}
            for value in (0, credentials_cache_ttl_s_max + 1, *not_numbers)
        ],
    ),
    "hold_expiry_interval_s": intervals("hold_expiry_interval_s"),
    "health_check_interval_s": intervals("health_check_interval_s"),
    "health_check_timeout_s": timeouts("health_check_timeout_s"),
    "shutdown_grace_s": (
        [{"shutdown_grace_s": 0}, {"shutdown_grace_s": shutdown_grace_s_max}],
        [{"shutdown_grace_s": value} for value in (-1, shutdown_grace_s_max + 1, *not_numbers)],
    ),
    # Empty: no metrics served.
    "metrics_listen": (
        [
            {"metrics_listen": ""},
            {"metrics_listen": "127.0.0.1:0"},
            {"metrics_listen": f"[::]:{port_max}"},
            # Port 0 twice: two free ports.
            {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
            # Ports P to P + 3 for 4 workers; port 0: each a free one.
            {"workers": 4, "metrics_listen": f"127.0.0.1:{port_max - 3}"},
            {"workers": 4, "listen": "127.0.0.1:9104", "metrics_listen": "127.0.0.1:9100"},
            {"workers": workers_max, "metrics_listen": "127.0.0.1:0"},
        ],
        [
            {"metrics_listen": "127.0.0.1"},
            {"metrics_listen": f"127.0.0.1:{port_max + 1}"},
            {"metrics_listen": "127.0.0.1:\u00b2"},
            {"metrics_listen": 9090},
            # The gRPC port itself.
            {"listen": "127.0.0.1:9090", "metrics_listen": "127.0.0.1:9090"},
            # With workers, a port each from P: past the last port, or --listen's among them.
            {"workers": 4, "metrics_listen": f"127.0.0.1:{port_max - 2}"},
            {"workers": 4, "listen": "127.0.0.1:9103", "metrics_listen": "127.0.0.1:9100"},
        ],
    ),
    # TLS files: none is plaintext; real certificates are accepted in tests/server/test_tls.py,
    # which makes them.
    "tls_cert": (
        [{"tls_cert": ""}],
        [
            {"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"},
            {"tls_cert": "/nonexistent/cert.pem"},
            {"tls_cert": b"cert.pem", "tls_key": "key.pem"},
        ],
    ),
    "tls_key": (
        [{"tls_key": ""}],
        [{"tls_key": "/nonexistent/key.pem"}, {"tls_key": 1}],
    ),
    "tls_client_ca": (
        [{"tls_client_ca": ""}],
        [{"tls_client_ca": "/nonexistent/ca.pem"}],
    ),
    "events": (
        [{"events": False}, {"events": True}],
        [{"events": "no"}, {"events": 0}],
    ),
    "events_retention_days": (
        [{"events_retention_days": 1}, {"events_retention_days": events_retention_days_max}],
        [
            {"events_retention_days": 0},
            {"events_retention_days": events_retention_days_max + 1},
            {"events_retention_days": 1.5},
        ],
    ),
    "events_retention_interval_s": intervals("events_retention_interval_s"),
    "events_watchers_max": (
        [{"events_watchers_max": 1}, {"events_watchers_max": events_watchers_max_limit}],
        [{"events_watchers_max": 0}, {"events_watchers_max": events_watchers_max_limit + 1}],
    ),
    "events_poll_interval_s": intervals("events_poll_interval_s"),
    # 0: no expiration runs; else as long as a day.
    "expiration_interval_s": (
        [
            {"expiration_interval_s": 0},
            {"expiration_interval_s": interval_s_min},
            {"expiration_interval_s": expiration_interval_s_max},
        ],
        [
            {"expiration_interval_s": value}
            for value in (0.001, -1, expiration_interval_s_max + 1, True, "1", *not_numbers)
        ],
    ),
    # 0: no notices.
    "expiry_notice_days": (
        [{"expiry_notice_days": 0}, {"expiry_notice_days": expiry_notice_days_max}],
        [
            {"expiry_notice_days": value}
            for value in (-1, expiry_notice_days_max + 1, 1.5, *not_numbers)
        ],
    ),
}


def test_every_setting_is_bounded() -> None:
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert set(bounds) == fields, "every setting needs its bounds tested here"


def test_the_defaults_are_within_bounds() -> None:
    # Made without error, and with the values the other bounds assume.
    assert base.batch_size_max == batch_size_max_default
    assert 2 * base.batch_workers <= base.pool_size < 10
    # A Server is one process; `coffer serve` starts one a core it may run on by default.
    assert base.workers == 1 and base.background_jobs
    quota = cgroup_cores()
    cores = (
        len(os.sched_getaffinity(0)) if quota is None else min(quota, len(os.sched_getaffinity(0)))
    )
    assert workers_default() == max(1, min(cores, workers_max))


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("1000 100000\n", 1),
        ("", None),
        ("100000\n", None),
        ("x 100000\n", None),
        ("100000 0\n", None),
    ],
)
def test_a_cgroup_cpu_quota_is_whole_cores_rounded_up(text: str, cores: int | None) -> None:
    assert cpu_max_cores(text) == cores


@pytest.mark.parametrize("setting", sorted(bounds))
def test_a_setting_at_its_bounds_is_accepted(setting: str) -> None:
    accepted, _ = bounds[setting]
    for changes in accepted:
        made = dataclasses.replace(base, **changes)
        assert getattr(made, setting) == changes[setting]


@pytest.mark.parametrize("setting", sorted(bounds))
def test_a_setting_past_its_bounds_is_refused(setting: str) -> None:
    _, refused = bounds[setting]
    assert refused
    for changes in refused:
        with pytest.raises(SettingsError) as raised:
            dataclasses.replace(base, **changes)
        assert raised.value.setting == setting, changes
        assert str(raised.value).startswith(f"{setting} must "), raised.value


@pytest.mark.parametrize("setting", ["queue_max", "calls_max", "queued_bytes_max", "pool_size"])
def test_an_integer_too_large_for_a_float_is_refused(setting: str) -> None:
    with pytest.raises(SettingsError, match=setting):
        dataclasses.replace(base, **{setting: 10**400})


def test_the_message_names_the_bounds_and_the_value() -> None:
    with pytest.raises(SettingsError) as raised:
        dataclasses.replace(base, statement_timeout_s=0.0004)
    assert raised.value.problem == (
        f"must be {timeout_s_min:g} to {timeout_s_max:g} (PostgreSQL counts whole milliseconds, "
        "and 0 means no timeout), not 0.0004"
    )
    with pytest.raises(SettingsError) as raised:
        dataclasses.replace(base, batch_workers=5)
    assert raised.value.problem.startswith(f"must be 1 to {base.pool_size // 2} (half of pool_size")
    assert raised.value.problem.endswith(", not 5")
