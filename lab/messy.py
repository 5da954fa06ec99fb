"""The "messy fleet" profile: the 4 named POPs as a team finds them after years of copied configs.

Applied to a running lab (`apply(lab)`, then every POP reloads), it adds exactly these cases for
`certmgr discover` to find, on top of the three managed lineages every POP serves:

- a certificate outside `cert_root`: legacy.hachyderm.test, `etc/ssl/legacy/` on every POP;
- an include chain: nginx.conf → conf.d/messy.conf → sites/legacy.conf → snippets/legacy-tls.conf;
- a name served on 2 of 4 POPs only: blog.hachyderm.test (a certbot lineage certmgr does not manage)
  on cdn-frankfurt-1 and cdn-fremont-1;
- a configuration copied to one POP with a different certificate path: shop.hachyderm.test uses
  `etc/ssl/shop/` everywhere but on esme, whose copy points at `etc/ssl/shop-copy/` (another certificate);
- an unmanaged certificate expiring in 3 days: old.hachyderm.test;
- a `$ssl_server_name` dynamic path: dyn.hachyderm.test;
- an orphaned certificate file: `etc/ssl/legacy/legacy-2024.pem` on cdn-fremont-1, used by no configuration.

Relative paths in the configuration are resolved by nginx against its prefix (each POP's own dir).
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lab import pki
from lab.pop import DEPLOY_USER

if TYPE_CHECKING:
    from lab.lab import Lab

FRANKFURT, FREMONT, SALLY, ESME = "cdn-frankfurt-1", "cdn-fremont-1", "sally", "esme"
POPS = (FRANKFURT, FREMONT, SALLY, ESME)
LIFETIME = dt.timedelta(days=90)
# days left per unmanaged certificate (soonest first is the order discover must report)
REMAINING = {"old": 3, "shop-copy": 20, "shop": 40, "blog": 50, "legacy": 60, "legacy-2024": 1, "dyn": 70}


@dataclass(frozen=True, slots=True)
class Messy:
    """What `apply` made: the leaf of each case, to compare discover's report against."""

    certs: dict[str, pki.Issued]

    def serial(self, which: str) -> str:
        """As `openssl x509 -serial` (and certmgr) print it: upper-case hex, whole bytes."""
        digits = format(self.certs[which].cert.serial_number, "X")
        return "0" * (len(digits) % 2) + digits


def _leaf(inter: pki.Issued, names: list[str], days_left: int) -> pki.Issued:
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=days_left)
    return pki.make_leaf(inter, names, not_before=not_after - LIFETIME, not_after=not_after)


def _server(listen: str, name: str, tls: str) -> str:
    return f"""server {{
    listen {listen} ssl;
    server_name {name};
{tls}    location / {{ return 200 "{name}\\n"; }}
}}
"""


def apply(lab: Lab) -> Messy:
    """Lay the messy profile onto the lab's 4 named POPs and reload them."""
    missing = [p for p in POPS if p not in lab.pop_names]
    if missing:
        raise ValueError(f"the messy profile needs the POPs {', '.join(POPS)} (lab has {lab.pops})")
    inter = pki.load_issued(lab.seed_dir / "seed-intermediate.pem", lab.seed_dir / "seed-intermediate.key")
    certs = {
        "legacy": _leaf(inter, ["legacy.hachyderm.test"], REMAINING["legacy"]),
        "legacy-2024": _leaf(inter, ["legacy.hachyderm.test"], REMAINING["legacy-2024"]),
        "blog": _leaf(inter, ["blog.hachyderm.test"], REMAINING["blog"]),
        "shop": _leaf(inter, ["shop.hachyderm.test"], REMAINING["shop"]),
        "shop-copy": _leaf(inter, ["shop.hachyderm.test"], REMAINING["shop-copy"]),
        "old": _leaf(inter, ["old.hachyderm.test"], REMAINING["old"]),
        "dyn": _leaf(inter, ["dyn.hachyderm.test"], REMAINING["dyn"]),
    }
    chain = inter.cert_pem
    pw = pwd.getpwnam(DEPLOY_USER)
    for pop in POPS:
        p = lab.pop_paths(pop)
        listen = f"{p.address}:{lab.ports.https}"
        ssl = p.prefix / "etc" / "ssl"
        shutil.rmtree(ssl, ignore_errors=True)
        for d in ("sites", "snippets"):
            shutil.rmtree(p.prefix / d, ignore_errors=True)

        def put(rel: str, issued: pki.Issued, prefix: Path = p.prefix) -> None:
            pki.write_file(prefix / f"{rel}.pem", issued.cert_pem + chain)
            pki.write_file(prefix / f"{rel}.key", issued.key_pem, 0o600)
            # the deploy user may read these keys, so discover checks them against their certificates
            os.chown(prefix / f"{rel}.key", pw.pw_uid, pw.pw_gid)

        put("etc/ssl/legacy/legacy", certs["legacy"])
        put("etc/ssl/old/old", certs["old"])
        shop_dir = "shop-copy" if pop == ESME else "shop"
        put(f"etc/ssl/{shop_dir}/shop", certs[shop_dir])
        put("etc/ssl/dyn/dyn.hachyderm.test", certs["dyn"])
        # nginx reads a $variable path per handshake in its worker (user nobody), not in the root master
        (p.prefix / "etc/ssl/dyn/dyn.hachyderm.test.key").chmod(0o644)
        if pop == FREMONT:
            pki.write_file(p.prefix / "etc/ssl/legacy/legacy-2024.pem", certs["legacy-2024"].cert_pem + chain)
        sites = {
            "legacy.conf": _server(listen, "legacy.hachyderm.test", "    include snippets/legacy-tls.conf;\n"),
            "shop.conf": _server(listen, "shop.hachyderm.test",
                                 f"    ssl_certificate etc/ssl/{shop_dir}/shop.pem;\n"
                                 f"    ssl_certificate_key etc/ssl/{shop_dir}/shop.key;\n"),
            "old.conf": _server(listen, "old.hachyderm.test", "    ssl_certificate etc/ssl/old/old.pem;\n"
                                                              "    ssl_certificate_key etc/ssl/old/old.key;\n"),
            "dyn.conf": _server(listen, "dyn.hachyderm.test",
                                f"    ssl_certificate {ssl}/dyn/$ssl_server_name.pem;\n"
                                f"    ssl_certificate_key {ssl}/dyn/$ssl_server_name.key;\n"),
        }
        if pop in (FRANKFURT, FREMONT):
            live = p.cert_root / "live" / "blog.hachyderm.test"
            sites["blog.conf"] = _server(listen, "blog.hachyderm.test",
                                         f"    ssl_certificate {live}/fullchain.pem;\n"
                                         f"    ssl_certificate_key {live}/privkey.pem;\n")
            _certbot_lineage(p.cert_root, "blog.hachyderm.test", certs["blog"], chain, pw.pw_uid, pw.pw_gid)
        for name, text in sites.items():
            pki.write_file(p.prefix / "sites" / name, text.encode())
        pki.write_file(p.prefix / "snippets" / "legacy-tls.conf",
                       b"ssl_certificate etc/ssl/legacy/legacy.pem;\nssl_certificate_key etc/ssl/legacy/legacy.key;\n")
        pki.write_file(p.conf_d / "messy.conf", b"# the messy fleet profile (lab/messy.py)\ninclude sites/*.conf;\n")
    for pop in POPS:
        lab.nginx_reload(pop)
    return Messy(certs=certs)


def _certbot_lineage(cert_root: os.PathLike[str] | str, name: str, issued: pki.Issued, chain: bytes, uid: int,
                     gid: int) -> None:
    """A certbot lineage certmgr's inventory does not list: archive/NAME/*1.pem, live/NAME/ symlinks."""
    root = Path(cert_root)
    arch, live = root / "archive" / name, root / "live" / name
    shutil.rmtree(arch, ignore_errors=True)
    shutil.rmtree(live, ignore_errors=True)
    files = {"cert": issued.cert_pem, "chain": chain, "fullchain": issued.cert_pem + chain, "privkey": issued.key_pem}
    created = [arch, live]
    arch.mkdir(parents=True)
    live.mkdir(parents=True)
    for kind, data in files.items():
        pki.write_file(arch / f"{kind}1.pem", data, 0o600 if kind == "privkey" else 0o644)
        os.symlink(f"../../archive/{name}/{kind}1.pem", live / f"{kind}.pem")
        created += [arch / f"{kind}1.pem", live / f"{kind}.pem"]
    for path in created:
        os.chown(path, uid, gid, follow_symlinks=False)


def remove(lab: Lab, *, reload: bool = True) -> None:
    """Undo `apply` (files and configuration) and reload the POPs; with `reload=False`, only on POPs whose
    nginx is down (before `up`: a running nginx would keep serving names whose files are gone)."""
    for pop in POPS:
        if pop not in lab.pop_names or (not reload and lab.nginx_pid(pop) is not None):
            continue
        p = lab.pop_paths(pop)
        for d in (p.prefix / "etc" / "ssl", p.prefix / "sites", p.prefix / "snippets",
                  p.cert_root / "live" / "blog.hachyderm.test", p.cert_root / "archive" / "blog.hachyderm.test"):
            shutil.rmtree(d, ignore_errors=True)
        (p.conf_d / "messy.conf").unlink(missing_ok=True)
        if reload:
            lab.nginx_reload(pop)
