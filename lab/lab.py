"""The certmgr test lab: Pebble, bind9 and N CDN POPs (sshd + nginx), all on loopback.

`Lab(dir, port_base).up()` starts what is not running and writes `inventory.toml`
(certmgr's schema) and `lab.json` (every port, address, pid and path) into `dir`.
"""

from __future__ import annotations

import datetime as dt
import functools
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from lab import inventory, named, pki
from lab.named import CHALLENGE_KEY, CHALLENGE_ZONE, LAB_KEY, PRIMARY_NS, REFUSE_ZONE, RNDC_KEY, SECONDARY_NS, ZONE
from lab.pebble import PEBBLE, Pebble
from lab.pop import (
    DEFAULT_NAMES_PER_POP,
    DEPLOY_USER,
    KEY_GROUP,
    MAX_POPS,
    NGINX,
    PKILL,
    PopPaths,
    certificates,
    clear_dir,
    nginx_conf,
    pop_index,
    pop_name,
    seed_cert_root,
    served_certificate,
    sshd_conf,
)
from lab.powerdns import PowerDNS
from lab.proc import (
    LabError,
    check_ports_free,
    descendants,
    ours,
    pid_alive,
    read_pid,
    run,
    spawn,
    stop_tree,
    tail,
    tcp_open,
    wait_tcp,
    wait_until,
    wait_vanished,
)

DEFAULT_DIR = "/tmp/certmgr-lab"
DEFAULT_PORT_BASE = 14000
DEFAULT_VALIDITY = 90 * 86400  # Pebble's own default is 5 years; certmgr meets 90 days in production
# Which reload a POP's sudoers allows: SIGHUP by pkill (certmgr's default) and `nginx -s reload` (the old
# default's stand-in: the lab has no systemd), one of them, or none.
RELOAD_GRANTS = ("both", "sighup", "legacy", "none")
DEPLOY_HOME = Path("/var/lib/certmgr-deploy")
SEED_LIFETIME = dt.timedelta(days=90)
SEED_REMAINING = dt.timedelta(days=5)  # near expiry: certmgr must want to renew these
SSHD = "/usr/sbin/sshd"
NAMED = "/usr/sbin/named"
TOOLS = (NGINX, PKILL, SSHD, NAMED, PEBBLE, "/usr/sbin/tsig-keygen", "/usr/sbin/rndc", "/usr/bin/sudo",
         "/usr/sbin/visudo")


@dataclass(frozen=True, slots=True)
class Ports:
    """The lab's ports, all offsets from one base so labs side by side never collide."""

    base: int

    @property
    def acme(self) -> int:
        return self.base

    @property
    def management(self) -> int:
        return self.base + 1

    @property
    def dns(self) -> int:
        return self.base + 2  # on 127.0.0.1, and on 127.0.0.2 for the secondary

    @property
    def webhook(self) -> int:
        return self.base + 3  # tests may start a chat receiver here; the lab never does

    @property
    def rndc(self) -> int:
        return self.base + 4

    @property
    def acme2(self) -> int:
        return self.base + 5  # the optional second Pebble

    @property
    def management2(self) -> int:
        return self.base + 6

    @property
    def pdns(self) -> int:
        return self.base + 7  # the optional PowerDNS: DNS

    @property
    def pdns_api(self) -> int:
        return self.base + 8  # the optional PowerDNS: HTTP API

    @property
    def ssh(self) -> int:
        return self.base + 10  # on every POP address

    @property
    def https(self) -> int:
        return self.base + 11

    def as_dict(self) -> dict[str, int]:
        names = ("acme", "management", "dns", "webhook", "rndc", "acme2", "management2", "pdns", "pdns_api", "ssh",
                 "https")
        return {n: getattr(self, n) for n in names}


class Lab:
    """One lab rooted at `dir`, on ports `port_base` … `port_base + 11`.

    Every method that starts or stops something is idempotent and acts only on
    processes whose recorded pid still runs this lab's own config file.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        port_base: int | None = None,
        pops: int = 4,
        secondary: bool = False,
        validity: int = DEFAULT_VALIDITY,
        names_per_pop: int = DEFAULT_NAMES_PER_POP,
    ) -> None:
        self.dir = Path(os.path.abspath(dir or os.environ.get("CERTMGR_LAB_DIR", DEFAULT_DIR)))
        if port_base is None:
            port_base = int(os.environ.get("CERTMGR_LAB_PORT_BASE", DEFAULT_PORT_BASE))
        if not 1024 < port_base < 65000:
            raise LabError(f"port base {port_base} is out of range (1025-64999)")
        if not 1 <= pops <= MAX_POPS:
            raise LabError(f"pops must be between 1 and {MAX_POPS}, not {pops}")
        if re.search(r"[\s\\,:=\"]", str(self.dir)):
            # The paths go into sudoers rules, nginx and named configs verbatim.
            raise LabError(f"lab dir {self.dir} may not contain whitespace or any of \\ , : = \"")
        self.ports = Ports(port_base)
        self.pops = pops
        self.names_per_pop = names_per_pop
        # (lineage, names) of every server block each POP serves; the default lab's three first.
        self.certificates = certificates(names_per_pop)
        self.secondary = secondary
        self.validity = validity
        self.labid = f"{port_base}-{hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]}"
        self.inventory_path = self.dir / "inventory.toml"
        self.info_path = self.dir / "lab.json"
        # No "." in the name: sudo skips such files in sudoers.d.
        self.sudoers_path = Path(f"/etc/sudoers.d/certmgr-lab-{self.labid}")
        # Per POP, which reload sudoers grants (RELOAD_GRANTS; absent: "both"). Tests vary it (grant_reload).
        self.reload_grants: dict[str, str] = {}
        self.https_ca = self.dir / "pebble" / "https-ca.pem"
        self.https_cert = self.dir / "pebble" / "https-cert.pem"
        self.https_key = self.dir / "pebble" / "https-key.pem"
        self.seed_dir = self.dir / "seed"
        self.seed_ca = self.seed_dir / "seed-ca.pem"
        self.dns_dir = self.dir / "dns"
        self.dns2_dir = self.dir / "dns2"
        self.ssh_dir = self.dir / "ssh"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.authorized_keys = self.ssh_dir / "authorized_keys"
        self.webhook_url_file = self.dir / "secrets" / "webhook-url"
        tls = {"https_cert": self.https_cert, "https_key": self.https_key, "https_ca": self.https_ca}
        self.pebble = Pebble(self.dir / "pebble", acme_port=self.ports.acme, management_port=self.ports.management,
                             dns_port=self.ports.dns, **tls)
        self.pebble2 = Pebble(self.dir / "pebble2", acme_port=self.ports.acme2, management_port=self.ports.management2,
                              dns_port=self.ports.dns, **tls)
        self.powerdns = PowerDNS(self.dir / "pdns", dns_port=self.ports.pdns, api_port=self.ports.pdns_api)
        self._outputs_lock = threading.Lock()

    @classmethod
    def load(cls, dir: str | os.PathLike[str] | None = None) -> Lab:
        """A Lab for an existing directory, with the settings its last `up` recorded."""
        path = Path(os.path.abspath(dir or os.environ.get("CERTMGR_LAB_DIR", DEFAULT_DIR)))
        try:
            info = json.loads((path / "lab.json").read_text())
        except (OSError, ValueError):
            return cls(path)
        return cls(path, info["port_base"], pops=info["pop_count"], secondary=info["dns"]["secondary"]["enabled"],
                   validity=info["validity"], names_per_pop=info.get("names_per_pop", DEFAULT_NAMES_PER_POP))

    # ----- names and paths -----------------------------------------------------------------

    @property
    def pop_names(self) -> list[str]:
        return [pop_name(i) for i in range(self.pops)]

    def _sites(self) -> list[str]:
        """Names of the server blocks beyond the default three (DNS-01 updates allowed for them too)."""
        return [n for lineage, names in self.certificates[DEFAULT_NAMES_PER_POP:] for n in names]

    def pop_paths(self, name: str) -> PopPaths:
        """Paths of POP `name`: prefix, cert root, conf.d, configs, logs, pid files."""
        return PopPaths.under(self.dir, name)

    def _all_pop_dirs(self) -> list[str]:
        """POPs present on disk (an earlier `up` may have had more than `self.pops`)."""
        base = self.dir / "pops"
        names = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
        return sorted(names | set(self.pop_names), key=pop_index)

    def _pops_in_play(self) -> list[str]:
        """The configured POPs, plus any extra one from an earlier, larger `up` still running."""
        return [n for n in self._all_pop_dirs() if n in self.pop_names or self.nginx_pid(n) or self.sshd_pid(n)]

    # ----- up ------------------------------------------------------------------------------

    def up(self) -> None:
        """Start every component that is not running (in parallel); leave running ones alone."""
        self._prepare()
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=min(16, self.pops + 2)) as pool:
            futures = [("dns", pool.submit(self._start_dns)),
                       ("pebble", pool.submit(self.pebble.start, None, self.validity))]
            futures += [(n, pool.submit(self._start_pop, n, True)) for n in self.pop_names]
            for what, fut in futures:
                try:
                    fut.result()
                except LabError as exc:
                    errors.append(f"{what}: {exc}")
        self._write_outputs()
        if errors:
            raise LabError("some components did not start:\n" + "\n".join(errors) + "\nthe others are running: "
                           f"`python -m lab down --dir {self.dir}` stops them; `up` again after the fix starts only "
                           "what is not running")

    def _prepare(self) -> None:
        """Everything before the daemons: tools, user, dirs, keys, certificates, sudoers."""
        missing = [t for t in TOOLS if not os.path.exists(t)]
        if missing:
            raise LabError(f"missing {', '.join(missing)}: apt-get install $(cat lab/requirements-apt.txt)")
        if os.geteuid() != 0:
            raise LabError("the lab runs sshd and nginx and writes sudoers: run it as root")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the deploy user must reach its cert roots and authorized_keys
        self._ensure_deploy_user()
        self._check_traversable()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self._ensure_pebble_tls()
        self._ensure_seed()
        self._ensure_ssh_client_key()
        self._ensure_dns_keys()
        pki.write_file(self.webhook_url_file, f"http://127.0.0.1:{self.ports.webhook}/hook\n".encode(), 0o600)
        self._write_sudoers()

    def _check_traversable(self) -> None:
        uid = pwd.getpwnam(DEPLOY_USER).pw_uid
        for parent in self.dir.parents:
            st = parent.stat()
            if not st.st_mode & 0o001 and st.st_uid != uid:
                raise LabError(
                    f"{parent} (mode {st.st_mode & 0o777:o}) is not traversable by {DEPLOY_USER}, who must "
                    f"reach {self.dir}; put the lab under a world-traversable dir such as /tmp"
                )

    def _ensure_deploy_user(self) -> None:
        """A dedicated non-root login with an empty HOME and an unlocked, unusable password.

        With `UsePAM no`, sshd refuses accounts whose password field starts with "!"
        (useradd's default) even for key logins; "*" means "no password", not "locked".
        """
        if not _user_exists():
            argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(DEPLOY_HOME),
                    "--shell", "/bin/sh", "--password", "*", DEPLOY_USER]
            # Another lab may be creating the user at this moment (exit 9: exists, 10: lock busy).
            wait_until(lambda: run(argv, check=False).returncode in (0, 9) or _user_exists(), 10.0, 0.1)
            if not _user_exists():
                run(argv)
        shadow = Path("/etc/shadow").read_text().splitlines()
        entry = next((line.split(":") for line in shadow if line.startswith(DEPLOY_USER + ":")), None)
        if entry is not None and entry[1].startswith("!"):
            run(["usermod", "--password", "*", DEPLOY_USER])
        if not _in_group(KEY_GROUP, DEPLOY_USER):
            # Several labs may add it at once (groupadd exit 9: exists; 10: lock busy).
            wait_until(lambda: run(["groupadd", "--system", KEY_GROUP], check=False).returncode in (0, 9)
                       or _in_group(KEY_GROUP, None), 10.0, 0.1)
            wait_until(lambda: run(["usermod", "--append", "--groups", KEY_GROUP, DEPLOY_USER],
                                   check=False).returncode == 0 or _in_group(KEY_GROUP, DEPLOY_USER), 10.0, 0.1)
        pw = pwd.getpwnam(DEPLOY_USER)
        DEPLOY_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(DEPLOY_HOME, pw.pw_uid, pw.pw_gid)

    def _ensure_pebble_tls(self) -> None:
        """Debian's Pebble ships no certificate for its own HTTPS listener: make a CA and a leaf."""
        if self.https_ca.exists() and self.https_cert.exists() and self.https_key.exists():
            return
        ca = pki.make_ca("certmgr lab Pebble HTTPS CA")
        leaf = pki.make_leaf(ca, ["localhost"], ips=["127.0.0.1"])
        pki.write_file(self.https_key, leaf.key_pem, 0o600)
        pki.write_file(self.https_cert, leaf.cert_pem)
        pki.write_file(self.https_ca, ca.cert_pem)

    def _ensure_seed(self) -> None:
        """The seed CA (root + intermediate) and one near-expiry certificate per lineage.

        Leaves are made once and reused by every POP and every `reseed`, so their serials
        are stable; they are remade only when less than two days remain.
        """
        ca_key = self.seed_dir / "seed-ca.key"
        inter_pem, inter_key = self.seed_dir / "seed-intermediate.pem", self.seed_dir / "seed-intermediate.key"
        if not all(p.exists() for p in (self.seed_ca, ca_key, inter_pem, inter_key)):
            root = pki.make_ca("certmgr lab seed root")
            inter = pki.make_ca("certmgr lab seed intermediate", issuer=root)
            pki.write_file(ca_key, root.key_pem, 0o600)
            pki.write_file(self.seed_ca, root.cert_pem)
            pki.write_file(inter_key, inter.key_pem, 0o600)
            pki.write_file(inter_pem, inter.cert_pem)
            shutil.rmtree(self.seed_dir / "certs", ignore_errors=True)
            (self.seed_dir / "pop-default.pem").unlink(missing_ok=True)
        inter = pki.load_issued(inter_pem, inter_key)
        now = dt.datetime.now(dt.UTC)
        for name, domains in self.certificates:
            d = self.seed_dir / "certs" / name
            if (d / "cert.pem").exists():
                old = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
                if old.not_valid_after_utc - now > dt.timedelta(days=2):
                    continue
            not_after = now + SEED_REMAINING
            leaf = pki.make_leaf(inter, domains, not_before=not_after - SEED_LIFETIME, not_after=not_after)
            pki.write_file(d / "privkey.pem", leaf.key_pem, 0o600)
            pki.write_file(d / "chain.pem", inter.cert_pem)
            pki.write_file(d / "fullchain.pem", leaf.cert_pem + inter.cert_pem)
            pki.write_file(d / "cert.pem", leaf.cert_pem)
        if not (self.seed_dir / "pop-default.pem").exists():
            leaf = pki.make_leaf(inter, ["pop-default.lab.invalid"])
            pki.write_file(self.seed_dir / "pop-default.key", leaf.key_pem, 0o600)
            pki.write_file(self.seed_dir / "pop-default.pem", leaf.cert_pem + inter.cert_pem)

    def _ensure_ssh_client_key(self) -> None:
        if not self.ssh_key.exists():
            pki.make_ssh_keypair(self.ssh_key, f"{DEPLOY_USER}@certmgr-lab")
        # sshd reads authorized_keys as the deploy user: world-readable, parents traversable.
        self.ssh_dir.chmod(0o755)
        line = f'from="127.0.0.0/8" {pki.ssh_public_line(self.ssh_key)} certmgr-lab\n'
        pki.write_file(self.authorized_keys, line.encode(), 0o644)

    def _ensure_dns_keys(self) -> None:
        self.dns_dir.mkdir(parents=True, exist_ok=True)
        for key in (LAB_KEY, CHALLENGE_KEY, RNDC_KEY):
            path = self.dns_dir / f"{key}.key"
            if not path.exists():
                out = run(["/usr/sbin/tsig-keygen", "-a", "hmac-sha256", key]).stdout
                pki.write_file(path, out.encode(), 0o600)

    def grant_reload(self, name: str, grant: str = "both") -> None:
        """Change which reload POP `name`'s sudoers allows (RELOAD_GRANTS) and rewrite the lab's sudoers file."""
        if grant not in RELOAD_GRANTS:
            raise LabError(f"reload grant must be one of {', '.join(RELOAD_GRANTS)}, not {grant!r}")
        self.reload_grants[name] = grant
        self._write_sudoers()

    def _write_sudoers(self) -> None:
        """Let the deploy user run exactly each POP's `nginx -t`, reload (SIGHUP by pkill), `nginx -T` as root.

        `nginx -s reload` is allowed too: the benchmarks' hand-written loops run it, as people do (and it
        stands in for the old default, `systemctl reload nginx`, where tests need an old-only POP:
        `grant_reload`).
        """
        lines = [f"# certmgr lab {self.dir} (port base {self.ports.base}); removed by `python -m lab down`."]
        for name in self._pops_in_play():
            p = self.pop_paths(name)
            grant = self.reload_grants.get(name, "both")
            reloads = {"both": (p.reload_command, p.nginx_reload_command), "sighup": (p.reload_command,),
                       "legacy": (p.nginx_reload_command,), "none": ()}[grant]
            # The argv without "sudo -n", its program by full path (sudoers wants one; sudo finds a bare
            # `pkill` on its secure_path); the lab dir holds none of the chars sudoers would need escaped.
            cmds = (p.test_command, *reloads, p.dump_command)
            lines.append(f"{DEPLOY_USER} ALL=(root) NOPASSWD: " + ", ".join(
                " ".join([PKILL if c[2] == "pkill" else c[2], *c[3:]]) for c in cmds))
        text = "\n".join(lines) + "\n"
        if self.sudoers_path.exists() and self.sudoers_path.read_text() == text:
            return
        # sudo ignores names containing "." in sudoers.d, so the temp file is never live.
        tmp = self.sudoers_path.with_name(f".{self.sudoers_path.name}.tmp")
        pki.write_file(tmp, text.encode(), 0o440)
        try:
            run(["/usr/sbin/visudo", "-cf", str(tmp)])
            os.replace(tmp, self.sudoers_path)
        finally:
            tmp.unlink(missing_ok=True)

    # ----- DNS -----------------------------------------------------------------------------

    @property
    def named_pid(self) -> int | None:
        pid = read_pid(self.dns_dir / "named.pid")
        return pid if ours(pid, str(self.dns_dir / "named.conf")) else None

    @property
    def named2_pid(self) -> int | None:
        pid = read_pid(self.dns2_dir / "named.pid")
        return pid if ours(pid, str(self.dns2_dir / "named.conf")) else None

    def _start_dns(self) -> None:
        self._start_named_primary()
        if self.secondary:
            self._start_named_secondary()

    def _start_named_primary(self) -> None:
        if self.named_pid is not None:
            return
        d, port = self.dns_dir, self.ports.dns
        check_ports_free("named", [(PRIMARY_NS, port, "udp"), (PRIMARY_NS, port, "tcp"),
                                   (PRIMARY_NS, self.ports.rndc, "tcp")])
        # A fresh start is a fresh zone: an old journal would replay a previous run's records.
        for stem, text in named.zone_texts(int(time.time()), secondary=self.secondary).items():
            (d / f"{stem}.zone.jnl").unlink(missing_ok=True)
            pki.write_file(d / f"{stem}.zone", text.encode())
        conf = named.primary_conf(d, port, self.ports.rndc, self.ports.pdns, self._sites())
        pki.write_file(d / "named.conf", conf.encode())
        pki.write_file(d / "rndc.conf", named.rndc_conf(d, self.ports.rndc).encode(), 0o600)
        # As root, without -u bind: the ports are unprivileged and every file is in the lab
        # dir, so dropping privileges would only force chowning the lab's key files to bind.
        self._run_named("named", d, PRIMARY_NS, named.PRIMARY_ZONES)

    def _start_named_secondary(self) -> None:
        if self.named2_pid is not None:
            return
        d, port = self.dns2_dir, self.ports.dns
        d.mkdir(parents=True, exist_ok=True)
        named.ensure_loopback_address(SECONDARY_NS)
        check_ports_free("named secondary", [(SECONDARY_NS, port, "udp"), (SECONDARY_NS, port, "tcp"),
                                             (SECONDARY_NS, self.ports.rndc, "tcp")])
        pki.write_file(d / "named.conf", named.secondary_conf(d, self.dns_dir, port, self.ports.rndc).encode())
        self._run_named("named secondary", d, SECONDARY_NS, (ZONE,))

    def _run_named(self, what: str, d: Path, address: str, zones: tuple[str, ...]) -> None:
        conf, log = d / "named.conf", d / "named.log"
        pid = spawn([NAMED, "-c", str(conf), "-g"], log=log)
        (d / "named.pid").write_text(f"{pid}\n")

        def ready() -> bool:
            if not pid_alive(pid):
                raise LabError(f"{what} exited during startup ({address}:{self.ports.dns}); log {log}:\n{tail(log)}")
            return all(named.soa_serial(address, self.ports.dns, z) is not None for z in zones)

        try:
            if not wait_until(ready, 20.0, 0.05):
                raise LabError(f"{what} did not serve {', '.join(zones)} on {address}:{self.ports.dns} "
                               f"within 20s; log {log}:\n{tail(log)}")
        except LabError:
            stop_tree(pid, str(conf))  # a half-started named would make the next `up` skip it
            raise

    def rndc(self, *args: str, server: str = PRIMARY_NS) -> str:
        """Run `rndc` against the primary (or `server=SECONDARY_NS`) and return its output."""
        return run(["/usr/sbin/rndc", "-c", str(self.dns_dir / "rndc.conf"), "-s", server, *args]).stdout

    def sync_secondary(self, timeout: float = 10.0) -> None:
        """Make the lagging secondary transfer the zone now, and wait until its serial matches."""
        if self.named2_pid is None:
            raise LabError("the secondary is not running (start the lab with secondary=True)")
        self.rndc("retransfer", ZONE, server=SECONDARY_NS)

        def caught_up() -> bool:
            primary = named.soa_serial(PRIMARY_NS, self.ports.dns, ZONE)
            return primary is not None and named.soa_serial(SECONDARY_NS, self.ports.dns, ZONE) == primary

        if not wait_until(caught_up, timeout, 0.05):
            raise LabError(f"secondary {SECONDARY_NS}:{self.ports.dns} did not catch up within {timeout:.0f}s")

    def kill_named(self) -> None:
        """SIGKILL the primary named, as a crash would: its zone files and update journals stay on disk."""
        pid = self.named_pid
        if pid is None:
            raise LabError("the primary named is not running")
        os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not pid_alive(pid), 10.0, 0.02):
            raise LabError(f"named pid {pid} did not die")
        (self.dns_dir / "named.pid").unlink(missing_ok=True)

    def restart_named(self) -> None:
        """Start the primary again over the same zone files and journals: its dynamic updates are served again."""
        if self.named_pid is not None:
            return
        self._run_named("named", self.dns_dir, PRIMARY_NS, named.PRIMARY_ZONES)

    def _stop_dns(self) -> list[int]:
        stopped: list[int] = []
        for d in (self.dns2_dir, self.dns_dir):
            pid = read_pid(d / "named.pid")
            if pid is not None:
                stopped += stop_tree(pid, str(d / "named.conf"))
            (d / "named.pid").unlink(missing_ok=True)
        return stopped

    # ----- Pebble --------------------------------------------------------------------------

    def restart_pebble(self, env: Mapping[str, str | None] | None = None, validity: int | None = None) -> None:
        """Restart Pebble with `env` on top of the defaults (a None value unsets a default).

        Each call states the whole override set: `restart_pebble()` restores the defaults.
        Pebble makes a new root on every start; `pebble/roots.pem` is rewritten, and
        certificates issued before the restart no longer chain to it.
        """
        wait_vanished(self.pebble.stop())
        self.pebble.start(env, validity or self.validity)
        self._write_outputs()

    def start_second_pebble(self, env: Mapping[str, str | None] | None = None,
                            validity: int | None = None,
                            eab_keys: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Start an independent Pebble on ports base+5/base+6 (same lab DNS); return its info.

        `eab_keys` ({kid: base64url HMAC key}) makes it require External Account Binding.
        """
        self.pebble2.start(env, validity or self.validity, eab_keys)
        self._write_outputs()
        return self.pebble2.info()

    def start_powerdns(self) -> None:
        """Start the optional PowerDNS (zone pdns.test, API on P+8); bind forwards pdns.test to it."""
        check_ports_free("pdns_server", [] if self.powerdns.pid else
                         [("127.0.0.1", self.ports.pdns, "udp"), ("127.0.0.1", self.ports.pdns, "tcp"),
                          ("127.0.0.1", self.ports.pdns_api, "tcp")])
        self.powerdns.start()

    def stop_powerdns(self) -> None:
        wait_vanished(self.powerdns.stop())

    def stop_second_pebble(self) -> None:
        self.pebble2.stop()
        self._write_outputs()

    # ----- POPs ----------------------------------------------------------------------------

    def nginx_pid(self, name: str) -> int | None:
        p = self.pop_paths(name)
        pid = read_pid(p.nginx_pid)
        return pid if ours(pid, str(p.nginx_conf)) else None

    def sshd_pid(self, name: str) -> int | None:
        p = self.pop_paths(name)
        pid = read_pid(p.sshd_pid)
        return pid if ours(pid, str(p.sshd_config)) else None

    def start_pop(self, name: str) -> None:
        """Start POP `name`'s sshd and nginx (whichever is down); its cert root is left as it is."""
        self._start_pop(name, seed=False)
        self._write_outputs()

    def stop_pop(self, name: str) -> None:
        """Stop POP `name`'s nginx and sshd, and any SSH session on it."""
        self._stop_pop(name)
        self._write_outputs()

    def _start_pop(self, name: str, seed: bool) -> None:
        p = self.pop_paths(name)
        nginx_up, sshd_up = self.nginx_pid(name) is not None, self.sshd_pid(name) is not None
        if nginx_up and sshd_up:
            return
        for d in (self.dir / "pops", p.prefix, p.prefix / "etc"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)  # on the deploy user's way to its cert root
        for sub in ("logs", "tmp", "conf.d"):
            (p.prefix / sub).mkdir(exist_ok=True)
        if not p.host_key.exists():
            pki.make_ssh_keypair(p.host_key, f"root@{name}")
        if (seed and not nginx_up) or not (p.cert_root / "live").exists():
            seed_cert_root(p, self.seed_dir / "certs", self.certificates)
        if not sshd_up:
            self._start_sshd(p)
        if not nginx_up:
            self._start_nginx(p)

    def _start_sshd(self, p: PopPaths) -> None:
        check_ports_free(f"sshd {p.name}", [(p.address, self.ports.ssh, "tcp")])
        pki.write_file(p.sshd_config, sshd_conf(p, self.ports.ssh, self.authorized_keys).encode())
        pid = spawn([SSHD, "-D", "-f", str(p.sshd_config), "-E", str(p.sshd_log)], log=p.prefix / "logs" / "sshd.out")
        p.sshd_pid.write_text(f"{pid}\n")
        try:
            wait_tcp(f"sshd {p.name}", p.address, self.ports.ssh, pid=pid, log=p.sshd_log)
        except LabError:
            stop_tree(pid, str(p.sshd_config))
            raise

    def _start_nginx(self, p: PopPaths) -> None:
        check_ports_free(f"nginx {p.name}", [(p.address, self.ports.https, "tcp")])
        conf = nginx_conf(p, self.ports.https, self.seed_dir / "pop-default.pem", self.seed_dir / "pop-default.key",
                          self.certificates)
        pki.write_file(p.nginx_conf, conf.encode())
        p.nginx_pid.unlink(missing_ok=True)
        # `daemon off` keeps nginx our child, reaped the moment it stops; bind and config
        # errors land in its error log, quoted on failure.
        pid = spawn(p.nginx_argv(), log=p.prefix / "logs" / "nginx.out")
        try:
            wait_tcp(f"nginx {p.name}", p.address, self.ports.https, pid=pid, log=p.nginx_error_log)
            if not wait_until(lambda: read_pid(p.nginx_pid) == pid, 5.0):
                raise LabError(f"nginx {p.name} wrote no pid file {p.nginx_pid}")
        except LabError:
            stop_tree(pid, str(p.nginx_conf))
            raise

    def _stop_pop(self, name: str) -> list[int]:
        p = self.pop_paths(name)
        stopped: list[int] = []
        for pidfile, marker, sshd in ((p.nginx_pid, p.nginx_conf, False), (p.sshd_pid, p.sshd_config, True)):
            pid = read_pid(pidfile)
            if pid is not None:
                stopped += stop_tree(pid, str(marker), children_first=sshd)
            pidfile.unlink(missing_ok=True)
        return stopped

    def nginx_test(self, name: str) -> tuple[int, str]:
        """Run POP `name`'s `nginx -t` as root (no sudo); return (exit status, output)."""
        res = run(self.pop_paths(name).nginx_argv("-t"), check=False)
        return res.returncode, res.stderr + res.stdout

    def nginx_reload(self, name: str, timeout: float = 15.0) -> None:
        """Reload POP `name`'s nginx as root (no sudo) and wait until it took effect; LabError when refused.

        `nginx -s reload` returns once the signal is sent; the master then re-reads its config (tens
        of ms with several certificates) and only then retires the old workers, which kept serving
        the old certificates meanwhile. Done means: every worker from before has exited.
        """
        before = self._nginx_workers(name)
        if not before and self.nginx_pid(name) is not None:
            raise LabError(f"reload {name}: nginx runs but no worker of its master was found")
        run(self.pop_paths(name).nginx_argv("-s", "reload"))
        if not wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in before), timeout, 0.01):
            log = self.pop_paths(name).nginx_error_log
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            last = ([ln for ln in lines if "[notice]" not in ln] or lines)[-1:]  # the log records reloads too
            raise LabError(f"reload {name}: the old nginx workers {sorted(before)} still run after {timeout:.0f}s"
                           f" (the master kept its old config?){': ' + last[0] if last else ''}")

    def reload_count(self, name: str) -> int:
        """How many reloads POP `name`'s nginx master took, from its error log (notice level).

        A reload logs `signal 1 (SIGHUP) received from N, reconfiguring`, then `reconfiguring`: the
        first of the two is counted.
        """
        log = self.pop_paths(name).nginx_error_log
        if not log.exists():
            return 0
        return sum(1 for ln in log.read_text(errors="replace").splitlines() if "(SIGHUP) received" in ln)

    def _nginx_workers(self, name: str) -> set[int]:
        """PIDs of the processes under POP `name`'s nginx master (its workers)."""
        master = self.nginx_pid(name)
        return set(descendants(master)) if master is not None else set()

    def served_serial(self, name: str, sni: str | None) -> int:
        """Serial of the leaf POP `name` presents for `sni` right now."""
        p = self.pop_paths(name)
        return served_certificate(p.address, self.ports.https, sni).serial_number

    def seed_serial(self, lineage: str) -> int:
        cert = x509.load_pem_x509_certificate((self.seed_dir / "certs" / lineage / "cert.pem").read_bytes())
        return cert.serial_number

    def reseed(self, name: str | None = None, timeout: float = 15.0) -> None:
        """Reset POP `name` (default: every POP) to the lab's initial state.

        Puts the certbot-layout seed back, empties conf.d, starts whatever is stopped,
        reloads nginx, and waits until every lineage is served with its seed serial.
        """
        def one(n: str) -> None:
            p = self.pop_paths(n)
            seed_cert_root(p, self.seed_dir / "certs", self.certificates)
            clear_dir(p.conf_d)
            running = self.nginx_pid(n) is not None
            self._start_pop(n, seed=False)
            if running:
                self.nginx_reload(n)
            for lineage, domains in self.certificates:
                check = functools.partial(self._serves, n, domains[0], self.seed_serial(lineage))
                if not wait_until(check, timeout, 0.05):
                    raise LabError(f"reseed {n}: {domains[0]} not served with its seed certificate in {timeout:.0f}s")

        _parallel({n: functools.partial(one, n) for n in ([name] if name else self.pop_names)})
        self._write_outputs()

    def _serves(self, name: str, sni: str, serial: int) -> bool:
        try:
            return self.served_serial(name, sni) == serial
        except (OSError, LabError):
            return False

    # ----- down / status -------------------------------------------------------------------

    def down(self) -> None:
        """Stop every process this lab started (by recorded pid), then remove its sudoers file."""
        stops: dict[str, Callable[[], list[int]]] = {
            "pebble": self.pebble.stop, "pebble2": self.pebble2.stop, "dns": self._stop_dns,
            "powerdns": self.powerdns.stop,
        }
        stops.update({f"pop {n}": functools.partial(self._stop_pop, n) for n in self._all_pop_dirs()})
        try:
            wait_vanished(_parallel(stops))
        finally:
            self.sudoers_path.unlink(missing_ok=True)
            if self.info_path.exists():
                self._write_outputs()

    def status(self) -> dict[str, dict[str, Any]]:
        """Each component → {"up": bool, "pid": int | None, "where": "address:port"}."""
        def row(pid: int | None, address: str, port: int) -> dict[str, Any]:
            return {"up": pid is not None and tcp_open(address, port), "pid": pid, "where": f"{address}:{port}"}

        out = {"pebble": row(self.pebble.pid, "127.0.0.1", self.ports.acme)}
        if self.pebble2.pid is not None:
            out["pebble2"] = row(self.pebble2.pid, "127.0.0.1", self.ports.acme2)
        out["named"] = row(self.named_pid, PRIMARY_NS, self.ports.dns)
        if self.secondary or self.named2_pid is not None:
            out["named-secondary"] = row(self.named2_pid, SECONDARY_NS, self.ports.dns)
        if self.powerdns.pid is not None:
            out["powerdns"] = row(self.powerdns.pid, "127.0.0.1", self.ports.pdns_api)
        for name in self._pops_in_play():
            p = self.pop_paths(name)
            out[f"sshd {name}"] = row(self.sshd_pid(name), p.address, self.ports.ssh)
            out[f"nginx {name}"] = row(self.nginx_pid(name), p.address, self.ports.https)
        return out

    # ----- outputs -------------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """The lab.json dict: every port, address, pid and path (no secrets)."""
        data: dict[str, Any] = json.loads(self.info_path.read_text())
        return data

    def _info(self) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        seed = {}
        for name, domains in self.certificates:
            cert = x509.load_pem_x509_certificate((self.seed_dir / "certs" / name / "cert.pem").read_bytes())
            seed[name] = {
                "domains": list(domains),
                "serial": cert.serial_number,
                "serial_hex": f"{cert.serial_number:x}",
                "not_after": cert.not_valid_after_utc.isoformat(),
                "days_left": round((cert.not_valid_after_utc - now).total_seconds() / 86400, 2),
                "dir": str(self.seed_dir / "certs" / name),
            }
        pops = []
        for i, name in enumerate(self.pop_names):
            p = self.pop_paths(name)
            pops.append({
                "name": name, "address": p.address, "ssh_port": self.ports.ssh, "https_port": self.ports.https,
                "tags": inventory.pop_tags(i),
                "prefix": str(p.prefix), "cert_root": str(p.cert_root), "conf_d": str(p.conf_d),
                "nginx_conf": str(p.nginx_conf), "nginx_error_log": str(p.nginx_error_log),
                "nginx_pid": self.nginx_pid(name), "sshd_pid": self.sshd_pid(name),
                "sshd_config": str(p.sshd_config), "sshd_log": str(p.sshd_log),
                "host_key_pub": f"{p.host_key}.pub",
                "test_command": p.test_command, "reload_command": p.reload_command,
            })
        return {
            "dir": str(self.dir),
            "labid": self.labid,
            "port_base": self.ports.base,
            "pop_count": self.pops,
            "names_per_pop": self.names_per_pop,
            "validity": self.validity,
            "ports": self.ports.as_dict(),
            "inventory": str(self.inventory_path),
            "sudoers": str(self.sudoers_path),
            "pebble": self.pebble.info(),
            "pebble2": self.pebble2.info() if self.pebble2.pid is not None else None,
            "dns": {
                "server": PRIMARY_NS,
                "port": self.ports.dns,
                "pid": self.named_pid,
                "config": str(self.dns_dir / "named.conf"),
                "log": str(self.dns_dir / "named.log"),
                "rndc_conf": str(self.dns_dir / "rndc.conf"),
                "zones": {ZONE: "certmgr-lab may update _acme-challenge.<update_names> TXT",
                          CHALLENGE_ZONE: "certmgr-challenges may update any TXT",
                          REFUSE_ZONE: "no updates"},
                "keys": {k: str(self.dns_dir / f"{k}.key") for k in (LAB_KEY, CHALLENGE_KEY)},
                "update_names": named.acme_update_names(self._sites()),
                "delegated": {"name": f"_acme-challenge.delegated.{ZONE}", "target": f"delegated.{CHALLENGE_ZONE}"},
                "secondary": {"enabled": self.secondary, "address": SECONDARY_NS, "port": self.ports.dns,
                              "pid": self.named2_pid, "log": str(self.dns2_dir / "named.log")},
            },
            "seed": {"ca": str(self.seed_ca), "certificates": seed},
            "ssh": {"user": DEPLOY_USER, "key": str(self.ssh_key), "known_hosts": str(self.known_hosts),
                    "authorized_keys": str(self.authorized_keys)},
            "certificates": [{"name": n, "domains": list(d)} for n, d in self.certificates],
            "pops": pops,
            "webhook": {"url_file": str(self.webhook_url_file), "url": f"http://127.0.0.1:{self.ports.webhook}/hook",
                        "port": self.ports.webhook},
        }

    def _write_outputs(self) -> None:
        with self._outputs_lock:
            hosts = []
            for name in self.pop_names:
                p = self.pop_paths(name)
                if p.host_key.exists():
                    hosts.append(f"[{p.address}]:{self.ports.ssh} {pki.ssh_public_line(p.host_key)}\n")
            pki.write_file(self.known_hosts, "".join(hosts).encode())
            pki.write_file(self.inventory_path, inventory.render(self).encode())
            pki.write_file(self.info_path, (json.dumps(self._info(), indent=2) + "\n").encode())


def _parallel(tasks: Mapping[str, Callable[[], Any]]) -> list[Any]:
    """Run `tasks` in threads; return their results (lists are concatenated), or raise every LabError."""
    errors: list[str] = []
    results: list[Any] = []
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(tasks)))) as pool:
        for what, fut in [(k, pool.submit(fn)) for k, fn in tasks.items()]:
            try:
                res = fut.result()
            except LabError as exc:
                errors.append(f"{what}: {exc}")
                continue
            results += res if isinstance(res, list) else [res]
    if errors:
        raise LabError("\n".join(errors))
    return results


def _in_group(group: str, user: str | None) -> bool:
    """Does `group` exist (and list `user` as a member, when given)?"""
    try:
        members = grp.getgrnam(group).gr_mem
    except KeyError:
        return False
    return user is None or user in members


def _user_exists() -> bool:
    try:
        pwd.getpwnam(DEPLOY_USER)
    except KeyError:
        return False
    return True
