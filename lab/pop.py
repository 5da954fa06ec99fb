"""One CDN POP: its paths, nginx and sshd configs, and its certbot-layout cert root.

Pure files and text; starting and stopping the daemons is `Lab`'s job.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from lab import pki
from lab.proc import LabError

MAX_POPS = 200  # addresses 127.0.1.2 … 127.0.1.201
MAX_NAMES_PER_POP = 2000
DEPLOY_USER = "certmgr-deploy"
# A supplementary group of the deploy user: the group a POP's privkey_group can hand keys to.
KEY_GROUP = "certmgr-lab-keys"
NGINX = "/usr/sbin/nginx"
PKILL = "/usr/bin/pkill"  # procps; what sudoers names for the reload_command's bare `pkill` (sudo's secure_path)

# Lineage name → names on the certificate; served by every POP and listed in the inventory.
CERTIFICATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hachyderm.test", ("hachyderm.test", "www.hachyderm.test")),
    ("media.hachyderm.test", ("media.hachyderm.test",)),
    ("static.hachyderm.test", ("static.hachyderm.test",)),
)
DEFAULT_NAMES_PER_POP = len(CERTIFICATES)
SEED_FILES = ("cert", "chain", "fullchain", "privkey")


def site_name(i: int) -> str:
    """The lineage (and only name) of server block `i` beyond the default three: s0003.hachyderm.test, …"""
    return f"s{i:04d}.hachyderm.test"


def certificates(names_per_pop: int = DEFAULT_NAMES_PER_POP) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The lineages every POP serves, one server block each with its certificate under live/<lineage>/.

    The default three (`CERTIFICATES`, 4 names) first, then single-name sites up to `names_per_pop`
    server blocks: the fleet's real shape is dozens to hundreds of names per POP.
    """
    if not 1 <= names_per_pop <= MAX_NAMES_PER_POP:
        raise LabError(f"names per POP must be between 1 and {MAX_NAMES_PER_POP}, not {names_per_pop}")
    extra = tuple((site_name(i), (site_name(i),)) for i in range(len(CERTIFICATES), names_per_pop))
    return CERTIFICATES[:names_per_pop] + extra

_FIRST_POPS = ("cdn-frankfurt-1", "cdn-fremont-1", "sally", "esme")


def pop_name(i: int) -> str:
    """Name of POP `i` (0-based): four named POPs, then pop-05, pop-06, …"""
    return _FIRST_POPS[i] if i < len(_FIRST_POPS) else f"pop-{i + 1:02d}"


def pop_index(name: str) -> int:
    for i in range(MAX_POPS):
        if pop_name(i) == name:
            return i
    raise LabError(f"no POP named {name!r}")


@dataclass(frozen=True, slots=True)
class PopPaths:
    """Where one POP lives on disk (`prefix` is nginx's `-p`) and the address it listens on."""

    name: str
    address: str
    prefix: Path
    cert_root: Path
    conf_d: Path
    nginx_conf: Path
    nginx_pid: Path
    nginx_error_log: Path
    sshd_config: Path
    sshd_pid: Path
    sshd_log: Path
    host_key: Path

    @classmethod
    def under(cls, lab_dir: Path, name: str) -> PopPaths:
        prefix = lab_dir / "pops" / name
        return cls(
            name=name,
            address=f"127.0.1.{pop_index(name) + 2}",
            prefix=prefix,
            cert_root=prefix / "etc" / "letsencrypt",
            conf_d=prefix / "conf.d",
            nginx_conf=prefix / "nginx.conf",
            nginx_pid=prefix / "nginx.pid",
            nginx_error_log=prefix / "logs" / "error.log",
            sshd_config=prefix / "sshd_config",
            sshd_pid=prefix / "sshd.pid",
            sshd_log=prefix / "logs" / "sshd.log",
            host_key=prefix / "ssh_host_ed25519_key",
        )

    def nginx_argv(self, *extra: str) -> list[str]:
        """The exact nginx argv for this POP (what sudoers allows, plus `-t`, `-T` or `-s reload`)."""
        return [NGINX, "-p", str(self.prefix), "-c", str(self.nginx_conf), "-e", str(self.nginx_error_log), *extra]

    @property
    def test_command(self) -> list[str]:
        return ["sudo", "-n", *self.nginx_argv("-t")]

    @property
    def reload_command(self) -> list[str]:
        """SIGHUP to this POP's nginx master, and nothing else: certmgr's default reload_command
        (certmgr.model.DEFAULT_RELOAD) with this POP's pid file in place of /run/nginx.pid.

        `nginx -s reload` parses the whole configuration in the client first, loading every
        certificate, before it signals the master, which parses it again: after the commit's own
        `nginx -t` that third parse is pure cost (at 200 names as much CPU as the test). pkill
        signals only the pid in nginx's pid file (root's, which the deploy user cannot write), and
        only if that process is named nginx.
        """
        return ["sudo", "-n", "pkill", "-HUP", "-F", str(self.nginx_pid), "-x", "nginx"]

    @property
    def nginx_reload_command(self) -> list[str]:
        """`nginx -s reload`, what a hand-written loop runs (the benchmarks' peers; sudoers allows it too)."""
        return ["sudo", "-n", *self.nginx_argv("-s", "reload")]

    @property
    def dump_command(self) -> list[str]:
        """`nginx -T` for this POP: what `certmgr discover` reads the effective configuration with."""
        return ["sudo", "-n", *self.nginx_argv("-T")]


def sshd_conf(p: PopPaths, port: int, authorized_keys: Path) -> str:
    return f"""# certmgr lab POP {p.name}
ListenAddress {p.address}:{port}
HostKey {p.host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
AllowUsers {DEPLOY_USER}
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
# The lab dir sits under /tmp (mode 1777), which strict mode would reject.
StrictModes no
# A parallel deployer opens many connections and sessions at once.
MaxStartups 200
MaxSessions 50
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTunnel no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def nginx_conf(p: PopPaths, port: int, default_cert: Path, default_key: Path,
               lineages: tuple[tuple[str, tuple[str, ...]], ...] = CERTIFICATES) -> str:
    listen = f"{p.address}:{port}"
    servers = []
    for name, domains in lineages:
        live = p.cert_root / "live" / name
        servers.append(
            f"""    server {{
        listen {listen} ssl;
        server_name {' '.join(domains)};
        ssl_certificate {live}/fullchain.pem;
        ssl_certificate_key {live}/privkey.pem;
        location / {{ return 200 "{p.name} {name}\\n"; }}
    }}
"""
        )
    tmp = p.prefix / "tmp"
    # Hundreds of server names outgrow the default hash (nginx refuses to start without this).
    names_hash = "    server_names_hash_max_size 8192;\n" if len(lineages) > len(CERTIFICATES) else ""
    return f"""# certmgr lab POP {p.name}
worker_processes 1;
# The lab runs nginx as its child (reaped the moment it stops); `-s reload` works the same.
daemon off;
pid {p.nginx_pid};
error_log {p.nginx_error_log} notice;  # notice: reloads are logged (SIGHUP lines), tests and benchmarks count them
events {{ worker_connections 256; }}
http {{
    default_type text/plain;
    access_log {p.prefix}/logs/access.log;
    # Debian's compiled-in temp paths are under /var/lib/nginx; keep every POP self-contained.
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
{names_hash}    # An unknown SNI (or none) still completes a handshake, with a certificate no lineage uses.
    server {{
        listen {listen} ssl default_server;
        server_name _;
        ssl_certificate {default_cert};
        ssl_certificate_key {default_key};
        location / {{ return 404 "{p.name}: unknown host\\n"; }}
    }}
{''.join(servers)}    # Tests break this POP's config by dropping a bad file here.
    include {p.conf_d}/*.conf;
}}
"""


def seed_cert_root(p: PopPaths, seed_certs: Path,
                   lineages: tuple[tuple[str, tuple[str, ...]], ...] = CERTIFICATES) -> None:
    """Lay the seed certificates out as certbot does, owned by the deploy user.

    `archive/<name>/{cert,chain,fullchain,privkey}1.pem` and a real `live/<name>/`
    directory of relative symlinks to them; private keys 0600.
    """
    pw = pwd.getpwnam(DEPLOY_USER)
    if p.cert_root.exists():
        shutil.rmtree(p.cert_root)
    created: list[Path] = [p.cert_root, p.cert_root / "archive", p.cert_root / "live"]
    for d in created:
        d.mkdir(parents=True)
    for name, _ in lineages:
        arch, live = p.cert_root / "archive" / name, p.cert_root / "live" / name
        arch.mkdir()
        live.mkdir()
        created += [arch, live]
        for kind in SEED_FILES:
            dst = arch / f"{kind}1.pem"
            pki.write_file(dst, (seed_certs / name / f"{kind}.pem").read_bytes(), 0o600 if kind == "privkey" else 0o644)
            link = live / f"{kind}.pem"
            os.symlink(f"../../archive/{name}/{kind}1.pem", link)
            created += [dst, link]
    # certbot keeps archive/ and live/ private; nginx's master runs as root and reads them anyway.
    p.cert_root.chmod(0o755)
    (p.cert_root / "archive").chmod(0o700)
    (p.cert_root / "live").chmod(0o700)
    for path in created:
        os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def clear_dir(d: Path) -> None:
    """Remove everything inside `d` (a POP's conf.d), keeping `d` itself."""
    for f in d.iterdir() if d.is_dir() else ():
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink()


def served_certificate(address: str, port: int, sni: str | None, timeout: float = 3.0) -> x509.Certificate:
    """The leaf a TLS server presents for `sni`, read without verification (tests verify separately)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we want to see whatever is served, valid or not
    with socket.create_connection((address, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise LabError(f"{address}:{port} presented no certificate")
    return x509.load_der_x509_certificate(der)
