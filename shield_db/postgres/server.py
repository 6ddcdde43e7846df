"""A private PostgreSQL server in a data folder, started by the pack (embedded default; tests and one machine).

It listens on a Unix socket only, inside ``<data>/socket`` (mode 0700), so only its owner can connect and no TCP
port is opened. PostgreSQL refuses to run as root: when the pack runs as root (containers) the server runs as the
``postgres`` system user (Debian's packages create it) and owns the data folder.
"""
from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from .errors import PostgresUnavailableError

LOG = logging.getLogger("shielded_sampling")
BIN_ENV = "SHIELD_PG_BIN"
DATA_ENV = "SHIELD_PG_DATA"
PORT_ENV = "SHIELD_PG_PORT"
DEFAULT_PORT = 55432
EMBEDDED = "embedded"
START_TIMEOUT = 60.0
INSTALL_HINT = ("install PostgreSQL's server binaries with the contrib modules (Debian/Ubuntu: `apt-get install "
                "postgresql`; they bring initdb, pg_ctl, cube and postgres_fdw), or set $SHIELD_PG_BIN to their bin "
                "folder, or give a DSN of a running server")


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$SHIELD_PG_BIN``, Debian's newest, or the PATH."""
    candidates = [os.environ[BIN_ENV]] if os.environ.get(BIN_ENV) else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    bundled = pgserver_bin_dir()
    if bundled:
        candidates.append(str(bundled))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise PostgresUnavailableError(f"no PostgreSQL server binaries found (looked in {candidates or 'PATH'}): "
                                   + INSTALL_HINT)


def pgserver_bin_dir() -> Path | None:
    """The binaries bundled by the PyPI package ``pgserver`` (PostgreSQL 16 + pgvector, no cube/postgres_fdw)."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "pginstall" / "bin"
    return folder if (folder / "initdb").is_file() else None


def run_as() -> str | None:
    """The user the server runs as: ``None`` (this process's user) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailableError("PostgreSQL cannot run as root and there is no 'postgres' user to run it as: "
                                       "run as a normal user, or create one (`useradd -r postgres`)") from None
    return "postgres"


class EmbeddedServer:
    """``initdb`` on first use, then ``pg_ctl start``; :meth:`dsn` connects over the private socket."""

    def __init__(self, data_dir, port: int = 5432, bin_dir: Path | None = None):
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.user = run_as()
        self.socket_dir = self.data_dir / "socket"
        self.pgdata = self.data_dir / "pgdata"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={self.db_user()}"

    def db_user(self) -> str:
        return self.user or pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args, check=True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(self.bin_dir / args[0]), *map(str, args[1:])], user=self.user,
                             capture_output=True, text=True, cwd="/")
        if check and out.returncode != 0:
            hint = (f" (the server runs as '{self.user}', who must be able to enter every parent folder of "
                    f"{self.data_dir})" if self.user else "")
            raise PostgresUnavailableError(f"{args[0]} failed for {self.data_dir} (exit {out.returncode}): "
                                           f"{(out.stderr or out.stdout).strip()[-2000:]}{hint}")
        return out

    def _own(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            return
        self._own(self.data_dir)
        self._own(self.socket_dir)
        self._run("initdb", "-D", self.pgdata, "-A", "trust", "-U", self.db_user(), "-E", "UTF8", "--no-locale")
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\n# shielded-sampling embedded server\nlisten_addresses = ''\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\nunix_socket_permissions = 0700\n"
                       "max_connections = 50\nshared_buffers = 128MB\nfsync = on\n")

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", self.pgdata, check=False).returncode == 0

    def start(self) -> EmbeddedServer:
        self.init()
        if not self.running():
            self._run("pg_ctl", "start", "-w", "-t", int(START_TIMEOUT), "-D", self.pgdata,
                      "-l", self.data_dir / "server.log")
            LOG.info("shield_db postgres: started a private server in %s", self.data_dir)
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", self.pgdata)


def default_data_dir() -> Path:
    """``$SHIELD_PG_DATA``, else ``~/.local/share/shielded-sampling/postgres``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".local" / "share" / "shielded-sampling" / "postgres")


def resolve_dsn(dsn: str | None, data_dir=None) -> str:
    """``dsn`` itself, or for ``None`` / ``""`` / ``"embedded"`` the private server (started if needed) in
    ``$SHIELD_PG_DATA``, else ``data_dir``, else :func:`default_data_dir`."""
    if dsn and dsn.strip() != EMBEDDED:
        return dsn
    port = int(os.environ.get(PORT_ENV) or DEFAULT_PORT)
    folder = os.environ.get(DATA_ENV) or data_dir or default_data_dir()
    return EmbeddedServer(folder, port=port).start().dsn()
