"""`certmgr discover` against the lab's messy fleet (lab/messy.py): the exact report, the stub, scan, bad input."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

from certmgr import inventory as inventory_mod
from certmgr.cli import main
from certmgr.material import serial_text
from lab import Lab, messy, pki
from lab.messy import ESME, FRANKFURT, FREMONT, POPS, SALLY
from lab.pop import CERTIFICATES, DEPLOY_USER
from tests.conftest import private_lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Lab, messy.Messy]]:
    """A private 4-POP lab with the messy-fleet profile applied."""
    with private_lab("discover", pops=4) as lab:
        yield lab, messy.apply(lab)


def cli(lab: Lab, state: Path, *args: str, inventory: Path | None = None) -> Any:
    return CliRunner().invoke(main, ["--inventory", str(inventory or lab.inventory_path), "--state-dir", str(state),
                                     *args], catch_exceptions=False)


def discover_json(lab: Lab, state: Path, *args: str, inventory: Path | None = None) -> dict[str, Any]:
    res = cli(lab, state, "discover", "--json", *args, inventory=inventory)
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def _serial(path: Path) -> str:
    return serial_text(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def expected_names(lab: Lab, m: messy.Messy) -> dict[str, list[tuple[Any, ...]]]:
    """name → [(host, file, config, real_path, serial, managed, lineage, served)], hosts in inventory order."""
    pre = {h: lab.pop_paths(h).prefix for h in POPS}
    root = {h: lab.pop_paths(h).cert_root for h in POPS}
    main_conf = {h: f"{pre[h]}/nginx.conf" for h in POPS}
    default = str(lab.seed_dir / "pop-default.pem")
    rows: dict[str, list[tuple[Any, ...]]] = {
        "_": [(h, default, f"{main_conf[h]}:22", default, _serial(lab.seed_dir / "pop-default.pem"), False, None,
               "unchecked") for h in POPS],
    }
    for k, (lineage, names) in enumerate(CERTIFICATES):
        for name in names:
            rows[name] = [(h, f"{root[h]}/live/{lineage}/fullchain.pem", f"{main_conf[h]}:{29 + 7 * k}",
                           f"{root[h]}/archive/{lineage}/fullchain1.pem", serial_text(lab.seed_serial(lineage)), True,
                           lineage, "same") for h in POPS]
    rows["legacy.hachyderm.test"] = [
        (h, f"{pre[h]}/etc/ssl/legacy/legacy.pem", f"{pre[h]}/snippets/legacy-tls.conf:1",
         f"{pre[h]}/etc/ssl/legacy/legacy.pem", m.serial("legacy"), False, None, "same") for h in POPS]
    rows["blog.hachyderm.test"] = [
        (h, f"{root[h]}/live/blog.hachyderm.test/fullchain.pem", f"{pre[h]}/sites/blog.conf:4",
         f"{root[h]}/archive/blog.hachyderm.test/fullchain1.pem", m.serial("blog"), False, None, "same")
        for h in (FRANKFURT, FREMONT)]
    rows["shop.hachyderm.test"] = [
        (h, f"{pre[h]}/etc/ssl/{d}/shop.pem", f"{pre[h]}/sites/shop.conf:4", f"{pre[h]}/etc/ssl/{d}/shop.pem",
         m.serial(d), False, None, "same")
        for h, d in ((FRANKFURT, "shop"), (FREMONT, "shop"), (SALLY, "shop"), (ESME, "shop-copy"))]
    rows["old.hachyderm.test"] = [
        (h, f"{pre[h]}/etc/ssl/old/old.pem", f"{pre[h]}/sites/old.conf:4", f"{pre[h]}/etc/ssl/old/old.pem",
         m.serial("old"), False, None, "same") for h in POPS]
    rows["dyn.hachyderm.test"] = [
        (h, f"{pre[h]}/etc/ssl/dyn/$ssl_server_name.pem", f"{pre[h]}/sites/dyn.conf:4", None, m.serial("dyn"), False,
         None, "dynamic") for h in POPS]
    return dict(sorted(rows.items()))


def test_discover_reports_the_messy_fleet_exactly(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """Every name with its hosts, files (includes followed, symlinks resolved), certificate, managed flag; unmanaged
    certificates soonest first; drift; the orphan; dynamic paths; nothing else."""
    lab, m = fleet
    data = discover_json(lab, tmp_path / "state")
    assert data["errors"] == [] and data["problems"] == [] and data["exit_code"] == 0
    got = {n["name"]: [(b["host"], b["file"], b["config"], b["real_path"],
                        b["certificate"]["serial"] if b["certificate"] else None, b["managed"], b["lineage"],
                        b["served"]) for b in n["served_by"]] for n in data["names"]}
    assert got == expected_names(lab, m)
    pre = {h: lab.pop_paths(h).prefix for h in POPS}
    root = {h: lab.pop_paths(h).cert_root for h in POPS}
    unmanaged = [(u["serial"], u["served_names"], u["hosts"], u["files"]) for u in data["unmanaged"]]
    assert unmanaged == [
        (m.serial("old"), ["old.hachyderm.test"], list(POPS), sorted(f"{pre[h]}/etc/ssl/old/old.pem" for h in POPS)),
        (m.serial("shop-copy"), ["shop.hachyderm.test"], [ESME], [f"{pre[ESME]}/etc/ssl/shop-copy/shop.pem"]),
        (m.serial("shop"), ["shop.hachyderm.test"], [FRANKFURT, FREMONT, SALLY],
         sorted(f"{pre[h]}/etc/ssl/shop/shop.pem" for h in (FRANKFURT, FREMONT, SALLY))),
        (m.serial("blog"), ["blog.hachyderm.test"], [FRANKFURT, FREMONT],
         sorted(f"{root[h]}/live/blog.hachyderm.test/fullchain.pem" for h in (FRANKFURT, FREMONT))),
        (m.serial("legacy"), ["legacy.hachyderm.test"], list(POPS),
         sorted(f"{pre[h]}/etc/ssl/legacy/legacy.pem" for h in POPS)),
        (m.serial("dyn"), ["dyn.hachyderm.test"], list(POPS),
         sorted(f"{pre[h]}/etc/ssl/dyn/$ssl_server_name.pem" for h in POPS)),
        (_serial(lab.seed_dir / "pop-default.pem"), ["_"], list(POPS), [str(lab.seed_dir / "pop-default.pem")]),
    ]
    assert [round(u["days_left"]) for u in data["unmanaged"][:6]] == [3, 20, 40, 50, 60, 70]
    assert data["drift"] == {
        "partial_names": [{"name": "blog.hachyderm.test", "served_on": [FRANKFURT, FREMONT],
                           "missing_on": [SALLY, ESME]}],
        "server_blocks": [{"name": "shop.hachyderm.test", "port": lab.ports.https, "variants": [
            {"hosts": [FRANKFURT, FREMONT, SALLY],
             "lines": ["ssl_certificate etc/ssl/shop/shop.pem", "ssl_certificate_key etc/ssl/shop/shop.key"]},
            {"hosts": [ESME],
             "lines": ["ssl_certificate etc/ssl/shop-copy/shop.pem", "ssl_certificate_key etc/ssl/shop-copy/shop.key"]},
        ]}],
    }
    assert [(o["host"], o["file"], o["certificate"]["serial"]) for o in data["orphans"]] == [
        (FREMONT, f"{pre[FREMONT]}/etc/ssl/legacy/legacy-2024.pem", m.serial("legacy-2024"))]
    assert data["key_mismatches"] == [] and data["not_served"] == []
    assert data["dynamic"] == [{"host": h, "names": ["dyn.hachyderm.test"],
                                "file": f"{pre[h]}/etc/ssl/dyn/$ssl_server_name.pem",
                                "config": f"{pre[h]}/sites/dyn.conf:4"} for h in POPS]


def test_table_puts_the_next_incident_first(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """The table opens with the unmanaged certificates, the one expiring in 3 days on top, and ends with a summary."""
    lab, m = fleet
    res = cli(lab, tmp_path / "state", "discover")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "UNMANAGED CERTIFICATES (7), soonest expiry first"
    assert lines[2].split()[3:6] == [m.serial("old")[:16], "old.hachyderm.test", ",".join(POPS)]
    assert "  blog.hachyderm.test: on cdn-frankfurt-1,cdn-fremont-1; not on sally,esme" in lines
    assert lines[-1].startswith("discover: 4 of 4 hosts in ")
    assert lines[-1].endswith("; 7 unmanaged certificates, 2 drift findings, 1 orphans, 0 key problems, 0 not served")


def test_inventory_stub_passes_inventory_check(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """The stub groups names as the fleet serves them, says where it guessed, and `inventory check` accepts it."""
    lab, m = fleet
    res = cli(lab, tmp_path / "state", "discover", "--inventory-stub")
    assert res.exit_code == 0, res.output
    stub = tmp_path / "stub.toml"
    stub.write_text(res.stdout)
    check = cli(lab, tmp_path / "state", "inventory", "check", inventory=stub)
    assert check.exit_code == 0, check.output
    assert check.output.endswith("ok — 8 certificates (9 names), 4 hosts, 2 DNS providers, 1 CAs, 1 channels\n")
    inv = inventory_mod.load(stub)
    assert {c.name: (c.domains, c.hosts) for c in inv.certificates} == {
        "hachyderm.test": (("hachyderm.test", "www.hachyderm.test"), POPS),
        "media.hachyderm.test": (("media.hachyderm.test",), POPS),
        "static.hachyderm.test": (("static.hachyderm.test",), POPS),
        "legacy.hachyderm.test": (("legacy.hachyderm.test",), POPS),
        "old.hachyderm.test": (("old.hachyderm.test",), POPS),
        "dyn.hachyderm.test": (("dyn.hachyderm.test",), POPS),
        "shop.hachyderm.test": (("shop.hachyderm.test",), POPS),
        "blog.hachyderm.test": (("blog.hachyderm.test",), (FRANKFURT, FREMONT)),
    }
    assert inv.hosts == inventory_mod.load(lab.inventory_path).hosts
    assert (f"# guess: shop.hachyderm.test is served with another certificate (serial {m.serial('shop-copy')}) on "
            f"esme; kept with the one 3 hosts serve (serial {m.serial('shop')}), and esme added to its hosts") \
        in res.stdout.splitlines()
    assert sum(line.startswith("# guess: certificate named after its first name") for line in res.stdout.splitlines()) \
        == 5  # legacy, old, dyn, shop, blog: the managed three keep their lineage names


def test_scan_includes_unmanaged_certificates_discover_found_expiring(fleet: tuple[Lab, messy.Messy],
                                                                     tmp_path: Path) -> None:
    """After a discover, `scan` adds the unmanaged certificates at warning or above (3 days: critical; 20 of 90
    days: warning), one row per host, and nothing for those far from expiry."""
    lab, m = fleet
    state = tmp_path / "state"
    assert cli(lab, state, "discover").exit_code == 0
    res = cli(lab, state, "scan", "--json", "--no-notify")
    data = json.loads(res.stdout)
    rows = [(e["name"], e["host"], e["severity"], e["serial"]) for e in data["endpoints"]
            if e["certificate"] == "(unmanaged)"]
    assert sorted(rows) == sorted([("old.hachyderm.test", h, "critical", m.serial("old")) for h in POPS]
                                  + [("shop.hachyderm.test", ESME, "warning", m.serial("shop-copy"))])
    old = next(e for e in data["endpoints"] if e["certificate"] == "(unmanaged)")
    assert old["problems"][1].startswith(
        f"not managed by certmgr: {lab.pop_paths(old['host']).prefix}/etc/ssl/old/old.pem (certmgr discover, ")
    assert "(unmanaged)" not in [c["name"] for c in data["certificates"]]  # no state file, no chat for it


def _inventory_with_dump(lab: Lab, tmp_path: Path, host: str, argv: list[str]) -> Path:
    text = lab.inventory_path.read_text()
    old = f"dump_command = {json.dumps(lab.pop_paths(host).dump_command)}"
    assert old in text
    path = tmp_path / f"inventory-{host}.toml"
    path.write_text(text.replace(old, f"dump_command = {json.dumps(argv)}"))
    return path


def test_configured_but_not_served(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """A certificate and key replaced on disk without a reload are configured but not served: nginx still serves
    the old one, and discover names both serials."""
    lab, m = fleet
    pre = lab.pop_paths(SALLY).prefix
    inter = pki.load_issued(lab.seed_dir / "seed-intermediate.pem", lab.seed_dir / "seed-intermediate.key")
    other = pki.make_leaf(inter, ["legacy.hachyderm.test"])
    pw = pwd.getpwnam(DEPLOY_USER)

    def put(issued: pki.Issued) -> None:
        pki.write_file(pre / "etc/ssl/legacy/legacy.pem", issued.cert_pem + inter.cert_pem)
        pki.write_file(pre / "etc/ssl/legacy/legacy.key", issued.key_pem, 0o600)
        os.chown(pre / "etc/ssl/legacy/legacy.key", pw.pw_uid, pw.pw_gid)

    try:
        put(other)
        data = discover_json(lab, tmp_path / "state", "--hosts", SALLY)
    finally:  # nginx was never reloaded: putting the files back restores the profile exactly
        put(m.certs["legacy"])
    assert data["hosts"] == [SALLY] and data["errors"] == [] and data["key_mismatches"] == []
    assert data["not_served"] == [
        {"host": SALLY, "name": "legacy.hachyderm.test", "port": lab.ports.https,
         "file": f"{pre}/etc/ssl/legacy/legacy.pem", "configured_serial": serial_text(other.cert.serial_number),
         "served_serial": m.serial("legacy"), "error": None}]


def test_key_mismatch(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """A key that no longer belongs to its certificate: `nginx -T` itself refuses (its [emerg] line is the host's
    error); with a dump_command that does not test (a saved dump), discover's own check on the host finds it."""
    lab, m = fleet
    p = lab.pop_paths(SALLY)
    saved = p.prefix / "saved-dump.txt"
    saved.write_text(subprocess.run(p.nginx_argv("-T"), capture_output=True, text=True, check=True).stdout)
    key = p.prefix / "etc/ssl/old/old.key"
    inter = pki.load_issued(lab.seed_dir / "seed-intermediate.pem", lab.seed_dir / "seed-intermediate.key")
    pw = pwd.getpwnam(DEPLOY_USER)

    def put(key_pem: bytes) -> None:
        pki.write_file(key, key_pem, 0o600)
        os.chown(key, pw.pw_uid, pw.pw_gid)

    try:
        put(pki.make_leaf(inter, ["x.hachyderm.test"]).key_pem)
        failing = discover_json(lab, tmp_path / "state", "--hosts", SALLY)
        data = discover_json(lab, tmp_path / "state", "--hosts", SALLY,
                             inventory=_inventory_with_dump(lab, tmp_path, SALLY, ["cat", str(saved)]))
    finally:
        put(m.certs["old"].key_pem)
    assert [e["host"] for e in failing["errors"]] == [SALLY]
    assert f'nginx: [emerg] SSL_CTX_use_PrivateKey("{key}") failed' in failing["errors"][0]["error"]
    assert "key values mismatch" in failing["errors"][0]["error"]
    assert data["errors"] == []
    assert data["key_mismatches"] == [
        {"host": SALLY, "certificate": f"{p.prefix}/etc/ssl/old/old.pem", "key": str(key), "status": "mismatch",
         "config": f"{p.prefix}/sites/old.conf:4"}]


HOSTILE_NAME = "evil\x1b]0;pwned\x07.hachyderm.test"


def _bad_inventory(lab: Lab, tmp_path: Path) -> Path:
    """The lab inventory with each POP's dump_command replaced by one kind of bad input."""
    esme = lab.pop_paths(ESME)
    hostile_dir = esme.prefix / "etc/ssl/hostile"
    hostile_dir.mkdir(parents=True, exist_ok=True)
    inter = pki.load_issued(lab.seed_dir / "seed-intermediate.pem", lab.seed_dir / "seed-intermediate.key")
    leaf = pki.make_leaf(inter, ["ok.hachyderm.test"])
    odd = hostile_dir / "a\nb;`touch x`;'q'.pem"
    pki.write_file(odd, leaf.cert_pem)
    pki.write_file(hostile_dir / "unreadable.pem", leaf.cert_pem, 0o600)  # root's: the deploy user cannot read it
    dump = (f"# configuration file {esme.prefix}/nginx.conf:\n"
            "http {\n"
            f"  server {{ listen {esme.address}:{lab.ports.https} ssl;\n"
            f"    server_name \"{HOSTILE_NAME}\" ok.hachyderm.test;\n"
            f"    ssl_certificate \"{odd}\"; }}\n"
            f"  server {{ listen {esme.address}:{lab.ports.https} ssl; server_name unreadable.hachyderm.test;\n"
            f"    ssl_certificate {hostile_dir}/unreadable.pem; }}\n"
            "}\n")
    pki.write_file(esme.prefix / "hostile-dump.txt", dump.encode())
    overrides = {
        FRANKFURT: ["sh", "-c", "echo 'nginx: [emerg] open() failed' >&2; exit 3"],
        FREMONT: ["printf", "%s", "garbage {{{ \x1b[31m not a dump"],
        SALLY: ["head", "-c", "9000000", "/dev/zero"],
        ESME: ["cat", str(esme.prefix / "hostile-dump.txt")],
    }
    text = lab.inventory_path.read_text()
    for h in POPS:
        old = f"dump_command = {json.dumps(lab.pop_paths(h).dump_command)}"
        assert old in text
        text = text.replace(old, f"dump_command = {json.dumps(overrides[h])}")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_bad_input_gives_clear_per_host_errors(fleet: tuple[Lab, messy.Messy], tmp_path: Path) -> None:
    """nginx -T failing, garbage, a huge dump: one exact error per host; hostile names and files on the fourth host
    are reported escaped, an unreadable file is named, and that host is otherwise discovered."""
    lab, _ = fleet
    inv = _bad_inventory(lab, tmp_path)
    data = discover_json(lab, tmp_path / "state", inventory=inv)
    assert data["exit_code"] == 1
    assert data["errors"] == [
        {"host": FRANKFURT, "error": "discover cdn-frankfurt-1: `sh -c echo 'nginx: [emerg] open() failed' >&2; "
                                     "exit 3` exited 3: nginx: [emerg] open() failed (nothing parsed)"},
        {"host": FREMONT, "error": "discover cdn-fremont-1: `printf %s garbage {{{ \\x1b[31m not a dump` output is "
                                   "not an nginx configuration dump: no '# configuration file' sections "
                                   "(not nginx -T output) (nothing parsed)"},
        {"host": SALLY, "error": "discover sally: `head -c 9000000 /dev/zero` printed more than 8192 KiB "
                                 "(stopped reading; nothing parsed)"},
    ]
    hostile_dir = lab.pop_paths(ESME).prefix / "etc/ssl/hostile"
    assert data["problems"] == [{"host": ESME, "problem": f"{hostile_dir}/unreadable.pem "
                                                          f"({lab.pop_paths(ESME).prefix}/nginx.conf:7): unreadable"}]
    names = {n["name"]: n["served_by"][0] for n in data["names"]}
    assert set(names) == {HOSTILE_NAME, "ok.hachyderm.test", "unreadable.hachyderm.test"}
    assert names["ok.hachyderm.test"]["file"] == f"{hostile_dir}/a\nb;`touch x`;'q'.pem"
    assert names["ok.hachyderm.test"]["status"] == "ok"
    assert names["unreadable.hachyderm.test"]["status"] == "unreadable"
    assert not (Path.cwd() / "x").exists() and not (hostile_dir / "x").exists()
    table = cli(lab, tmp_path / "state", "discover", inventory=inv).output
    assert "\x1b" not in table and "\x07" not in table
    assert "evil\\x1b]0;pwned\\x07.hachyderm.test" in table
    assert "a\\nb;`touch x`;'q'.pem" in table
