"""A throw-away PostgreSQL for the HA store: Debian's binaries, run as `postgres` (initdb refuses root).

Listens on 127.0.0.1:PORT only, its unix socket in its own directory; the packaged cluster is never
touched. Roles: `certmgr_owner` (owns the schema, runs migrations) and `certmgr_rt` (the runtime
role certmgr runs as: INSERT/SELECT only on the audit log).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lab.proc import LabError, check_ports_free, run, tail, wait_until

PG_BIN = Path(os.environ.get("CERTMGR_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER, RUNTIME, DATABASE = "certmgr_owner", "certmgr_rt", "certmgr"


class PgServer:
    def __init__(self, path: Path, port: int, *, fsync: bool = False) -> None:
        self.fsync = fsync  # tests: off (speed); benchmarks: on, so the comparison with the directory store is fair
        self.path = Path(path)
        self.port = port
        self.data = self.path / "data"
        self.sock = self.path / "sock"
        self.log = self.path / "postgres.log"
        self.passwords = {OWNER: secrets.token_hex(16), RUNTIME: secrets.token_hex(16)}

    def url(self, role: str = RUNTIME) -> str:
        """A URL without its password (certmgr takes the password from a secret reference)."""
        return f"postgresql://{role}@127.0.0.1:{self.port}/{DATABASE}"

    def _as_postgres(self, *argv: str, timeout: float = 60.0) -> str:
        return run(["runuser", "-u", "postgres", "--", *argv], timeout=timeout).stdout

    def psql(self, sql: str, *, db: str = "postgres") -> str:
        """Run `sql` as the superuser over the unix socket (tests: faults, privileges, pg_terminate_backend)."""
        return self._as_postgres(str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                 "-h", str(self.sock), "-p", str(self.port), "-d", db, "-c", sql)

    def up(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise LabError(f"postgres: {PG_BIN}/initdb missing (apt-get install postgresql)")
        check_ports_free("postgres", [("127.0.0.1", self.port, "tcp")])
        pg = pwd.getpwnam("postgres")
        for d in (self.path, self.sock):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, pg.pw_uid, pg.pw_gid)
        self.path.chmod(0o755)
        nosync = [] if self.fsync else ["--no-sync"]
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                          "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", *nosync)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.sock}'\nfsync = {'on' if self.fsync else 'off'}\n"
                       "log_min_messages = warning\n")
        self.start()
        self.psql(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{self.passwords[OWNER]}'")
        self.psql(f"CREATE ROLE {RUNTIME} LOGIN PASSWORD '{self.passwords[RUNTIME]}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {OWNER}")
        self.psql("REVOKE ALL ON SCHEMA public FROM PUBLIC", db=DATABASE)
        self.psql(f"GRANT USAGE ON SCHEMA public TO {RUNTIME}; GRANT ALL ON SCHEMA public TO {OWNER}", db=DATABASE)

    def start(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "start")
        if not wait_until(lambda: (self.sock / f".s.PGSQL.{self.port}").exists(), 30):
            raise LabError(f"postgres did not start on 127.0.0.1:{self.port}:\n{tail(self.log)}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def down(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


# certmgr's tables (certmgr.pgstore's schema): dropped between tests and benchmark rounds
TABLES = "certmgr_schema, certmgr_live, certmgr_versions, certmgr_json, certmgr_accounts, certmgr_audit, certmgr_epochs"


@contextmanager
def temporary(prefix: str, port: int) -> Iterator[PgServer]:
    """A PostgreSQL in a fresh temp dir (`prefix`…) on 127.0.0.1:`port`, stopped and removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    server = PgServer(path, port)
    try:
        server.up()
        yield server
    finally:
        server.down()
        shutil.rmtree(path, ignore_errors=True)
