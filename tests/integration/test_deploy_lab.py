"""End-to-end deploy tests on the lab's real POPs (sshd as a non-root user + sudo'd nginx).

Uses its own lab on CERTMGR_TEST_PORT_BASE (default 44000) so it never collides with other labs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import grp
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from certmgr import inventory as inventory_mod
from certmgr.deploy import HostOutcome, Status, deploy
from certmgr.deploy import session as session_mod
from certmgr.inventory import Host, Inventory
from certmgr.material import CertInfo, CertMaterial, serial_text
from certmgr.remote import Timeouts
from certmgr.store import Store
from lab import Lab, pki
from lab.pop import KEY_GROUP
from tests.conftest import private_lab
from tests.helpers import read_pty

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MEDIA = "media.hachyderm.test"
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def dlab() -> Iterator[Lab]:
    """A 4-POP lab of this module's own (it breaks POPs and proxies SSH), stopped at the end.

    CERTMGR_TEST_LAB_DIR may name a lab that is already running (its first 4 POPs are used).
    """
    path = os.environ.get("CERTMGR_TEST_LAB_DIR")
    if path:
        yield Lab.load(path)
        return
    with private_lab("deploy", pops=4) as lab:
        yield lab


@pytest.fixture()
def fresh(dlab: Lab) -> Iterator[Lab]:
    """Every POP back to the certbot-layout seed, conf.d emptied, serving the seed serials."""
    dlab.reseed()
    yield dlab
    for pop in dlab.pop_names:  # a broken conf.d left behind would stop the next `lab up`
        for f in dlab.pop_paths(pop).conf_d.glob("*.conf"):
            f.unlink()


@pytest.fixture()
def store(tmp_path: Path, dlab: Lab) -> Store:
    """A store holding each POP's certbot-era seed as its version 1 (as after importing certbot's lineages).

    Store and POP numbers then agree from the start: the seed is certbot's version 1 on every POP.
    """
    s = Store.open(tmp_path / "state")
    with s.lock("test"):
        for d in sorted((dlab.seed_dir / "certs").iterdir()):
            seed = CertMaterial(cert=(d / "cert.pem").read_bytes(), chain=(d / "chain.pem").read_bytes(),
                                privkey=(d / "privkey.pem").read_bytes())
            s.activate(d.name, s.add_version(d.name, seed))
    return s


_CA = pki.make_ca("certmgr deploy test CA", not_before=NOW - dt.timedelta(days=30))


def trusting_ca(inv: Inventory, store: Store) -> Inventory:
    """The inventory with the test CA added to `[defaults] trust`, so deploy's certcheck lets its leaves go out."""
    path = Path(store.root).parent / "deploy-test-ca.pem"
    path.write_bytes(_CA.cert_pem)
    return dataclasses.replace(inv, trust=(*inv.trust, path))


def new_material(domains: Sequence[str], *, pad: int = 0) -> CertMaterial:
    """A fresh leaf for `domains` signed by the test CA, valid at NOW and today; `pad` bytes of PEM comment make the
    chain big."""
    leaf = pki.make_leaf(_CA, list(domains), not_before=NOW - dt.timedelta(hours=1),
                         not_after=max(NOW, dt.datetime.now(dt.UTC)) + dt.timedelta(days=90))
    chain = (b"# padding\n" * (pad // 10)) + _CA.cert_pem
    return CertMaterial(cert=leaf.cert_pem, chain=chain, privkey=leaf.key_pem)


def put_new_versions(store: Store, inv: Inventory, names: Sequence[str], *, pad: int = 0) -> dict[str, str]:
    """Add and activate a new version of each lineage; returns {name: serial}."""
    serials = {}
    with store.lock("test"):
        for name in names:
            m = new_material(inv.certificate(name).domains, pad=pad)
            store.activate(name, store.add_version(name, m))
            serials[name] = m.info().serial
    return serials


def run(inv: Inventory, store: Store, names: Sequence[str], **kw: object) -> list[HostOutcome]:
    kw.setdefault("timeouts", Timeouts(connect=5, command=30, upload=30, verify=5, handshake=3))
    return asyncio.run(deploy(trusting_ca(inv, store), store, [inv.certificate(n) for n in names], now=NOW,
                              **kw))  # type: ignore[arg-type]


def served(lab: Lab, pop: str, sni: str) -> str:
    return serial_text(lab.served_serial(pop, sni))  # as certmgr (and openssl) print it


def by_host(outcomes: Sequence[HostOutcome], name: str = MEDIA) -> dict[str, HostOutcome]:
    return {o.host: o for o in outcomes if o.cert == name}


def live_state(lab: Lab, pop: str, name: str = MEDIA) -> tuple[str, list[str]]:
    """(what live/<name> is, the archive listing) — to assert that nothing changed."""
    root = lab.pop_paths(pop).cert_root
    live = root / "live" / name
    what = f"link:{os.readlink(live)}" if live.is_symlink() else f"dir:{sorted(os.listdir(live))}"
    return what, sorted(os.listdir(root / "archive" / name))


def with_hosts(inv: Inventory, **changes: Host) -> Inventory:
    hosts = dict(inv.hosts)
    hosts.update(changes)
    return dataclasses.replace(inv, hosts=hosts)


def audit(store: Store) -> list[dict[str, object]]:
    return list(store.read_audit())


# ---------------------------------------------------------------------------- happy path


def test_deploy_four_pops_then_rerun_skips(fresh: Lab, store: Store) -> None:
    """All lineages reach all 4 POPs (each serving the new serial, certbot layout converted); a rerun skips all."""
    inv = inventory_mod.load(fresh.inventory_path)
    names = [c.name for c in inv.certificates]
    serials = put_new_versions(store, inv, names)
    outcomes = run(inv, store, names)
    assert {(o.cert, o.host): o.status for o in outcomes} == {
        (n, p): Status.DEPLOYED for n in names for p in fresh.pop_names}
    assert all(o.converted and o.version == 2 and o.previous_version == 1 for o in outcomes)
    assert all(o.version == store.live_version(o.cert) for o in outcomes)  # the store's number, on every POP
    for pop in fresh.pop_names:
        for cert in inv.certificates:
            for sni in cert.domains:
                assert served(fresh, pop, sni) == serials[cert.name]
            root = fresh.pop_paths(pop).cert_root
            assert os.readlink(root / "live" / cert.name) == f"../archive/{cert.name}/2"
            assert (root / "archive" / cert.name / "2" / "privkey.pem").stat().st_mode & 0o777 == 0o600
            assert not [e for e in os.listdir(root / "archive" / cert.name) if e.startswith(".")]
    entries = audit(store)
    deployed = [e for e in entries if e["action"] == "deployed"]
    assert len(deployed) == 12
    assert any(e["summary"] == f"deployed {MEDIA} to sally: serial {e['from']} → {serials[MEDIA]}"
               for e in deployed if e["host"] == "sally" and e["object"] == MEDIA)
    assert len([e for e in entries if e["action"] == "converted"]) == 12
    state = store.load_json(f"state/deploy/{MEDIA}.json")
    assert state["hosts"]["sally"]["serial"] == serials[MEDIA] and state["hosts"]["sally"]["version"] == 2

    again = run(inv, store, names)
    assert {o.status for o in again} == {Status.SKIPPED}
    assert len([e for e in audit(store) if e["action"] == "deployed"]) == 12


def test_every_certificate_due_on_a_pop_takes_one_reload(fresh: Lab, store: Store) -> None:
    """Three certificates due on each POP are one transaction: each POP's nginx logs exactly one reload."""
    inv = inventory_mod.load(fresh.inventory_path)
    names = [c.name for c in inv.certificates]
    assert len(names) == 3
    serials = put_new_versions(store, inv, names)
    before = {pop: fresh.reload_count(pop) for pop in fresh.pop_names}
    outcomes = run(inv, store, names)
    assert {o.status for o in outcomes} == {Status.DEPLOYED} and len(outcomes) == 3 * len(fresh.pop_names)
    assert {pop: fresh.reload_count(pop) - before[pop] for pop in fresh.pop_names} == {
        pop: 1 for pop in fresh.pop_names}
    assert all(served(fresh, pop, MEDIA) == serials[MEDIA] for pop in fresh.pop_names)
    again = {pop: fresh.reload_count(pop) for pop in fresh.pop_names}
    assert {o.status for o in run(inv, store, names)} == {Status.SKIPPED}
    assert {pop: fresh.reload_count(pop) for pop in fresh.pop_names} == again  # nothing due: no reload


def test_cli_deploy_json_and_exit_status(fresh: Lab, store: Store) -> None:
    """`certmgr deploy NAME --json` prints one object per host and exits 0 when every host serves the new serial."""
    inv = inventory_mod.load(fresh.inventory_path)
    serial = put_new_versions(store, inv, [MEDIA])[MEDIA]
    res = _cli(fresh, store, "deploy", MEDIA, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sorted(r["host"] for r in rows) == sorted(fresh.pop_names)
    assert {(r["status"], r["new_serial"]) for r in rows} == {("deployed", serial)}


def _cli(lab: Lab, store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    inventory = Path(store.root).parent / "deploy-test-inventory.toml"  # the lab's, trusting the test CA too
    ca = trusting_ca(inventory_mod.load(lab.inventory_path), store).trust[-1]
    inventory.write_text(lab.inventory_path.read_text().replace("trust = [", f'trust = ["{ca}", ', 1))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CERTMGR_INVENTORY": str(inventory),
           "CERTMGR_STATE_DIR": str(store.root)}
    return subprocess.run([sys.executable, "-m", "certmgr", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _cli_pty(lab: Lab, store: Store, *args: str, **env: str) -> tuple[int, str]:
    """`certmgr ARGS` with stdout on a pseudo-terminal (what on-call sees in a shell): exit status and output."""
    import pty

    _cli(lab, store, "--version")  # writes the test inventory next to the store
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "certmgr", *args], stdout=slave, stderr=subprocess.DEVNULL,
                            env={**{k: v for k, v in os.environ.items() if k != "NO_COLOR"}, "PYTHONPATH": str(REPO),
                                 "CERTMGR_STATE_DIR": str(store.root),
                                 "CERTMGR_INVENTORY": str(Path(store.root).parent / "deploy-test-inventory.toml"),
                                 **env})
    os.close(slave)
    out = read_pty(master)
    return proc.wait(timeout=120), out.decode()


def test_cli_deploy_streams_per_pop_lines_and_status_trusts_it(fresh: Lab, store: Store) -> None:
    """Piped: one plain line per POP (canary labelled), the closing line; then `status` shows every POP current
    without a scan; on a TTY the same deploy draws a bar and colours, and NO_COLOR turns the colours off."""
    inv = inventory_mod.load(fresh.inventory_path)
    serial = put_new_versions(store, inv, [MEDIA])[MEDIA]
    expires = store.read(MEDIA).info().not_after
    res = _cli(fresh, store, "deploy", MEDIA)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "\x1b" not in res.stdout and "\r" not in res.stdout
    assert sorted(line.split()[3] for line in lines[:4]) == sorted(fresh.pop_names)
    assert f"deployed    {MEDIA} → cdn-frankfurt-1 (canary) v2 serial " in res.stdout
    assert not any(" (canary)" in line for line in lines if "cdn-frankfurt-1" not in line)
    assert not any(line.rstrip().endswith("s") and "[" in line for line in lines[:4])  # no timings without -v
    assert lines[-1] == f"{MEDIA}: 4/4 POPs serve {serial} (expires {expires:%Y-%m-%d %H:%M}Z)"
    assert serial == served(fresh, "sally", MEDIA)  # the serial openssl prints for what sally serves

    status = _cli(fresh, store, "status", MEDIA)
    assert status.returncode == 0, status.stdout
    assert status.stdout.count(f"current  ok       serial {serial}, last deploy deployed") == 4
    assert "BEHIND" not in status.stdout

    code, out = _cli_pty(fresh, store, "-v", "deploy", MEDIA, TERM="xterm")
    assert code == 0, out
    assert "deploy  [" in out and "4/4" in out  # click's bar, counting POPs
    assert "\x1b[32m" in out and f"{MEDIA} → sally v2 serial {serial} (already live) " in out  # -v: timings
    assert f"{MEDIA}: 4/4 POPs serve {serial}" in out
    code, out = _cli_pty(fresh, store, "deploy", MEDIA, NO_COLOR="1")
    assert code == 0 and f"{MEDIA}: 4/4 POPs serve {serial}" in out and "\x1b" not in out  # no colour, no bar


# ---------------------------------------------------------------------------- nginx -t fails on one POP


def test_nginx_t_failure_rolls_back_that_pop_and_rerun_finishes(fresh: Lab, store: Store) -> None:
    """A POP whose nginx -t fails after the swap is rolled back (old serial served, test passing); a rerun after the fix deploys only it."""
    inv = inventory_mod.load(fresh.inventory_path)
    first = put_new_versions(store, inv, [MEDIA])[MEDIA]
    assert {o.status for o in run(inv, store, [MEDIA])} == {Status.DEPLOYED}
    # sally's conf.d includes a file that only the current version dir has: the next swap breaks nginx -t
    sally = fresh.pop_paths("sally")
    (sally.cert_root / "archive" / MEDIA / "2" / "extra.conf").write_text("# present in version 2 only\n")
    (sally.conf_d / "extra.conf").write_text(f"include {sally.cert_root}/live/{MEDIA}/extra.conf;\n")
    assert fresh.nginx_test("sally")[0] == 0

    second = put_new_versions(store, inv, [MEDIA])[MEDIA]
    res = _cli(fresh, store, "deploy", MEDIA)
    assert res.returncode == 1
    assert "rolled back" in res.stdout
    assert len([row for row in res.stdout.splitlines() if row[:1].isalpha() and f"{MEDIA} → " in row]) == 4
    state = store.load_json(f"state/deploy/{MEDIA}.json")["hosts"]
    assert state["sally"]["status"] == "rolled back" and state["sally"]["serial"] == first
    assert "extra.conf" in state["sally"]["error"] and "No such file or directory" in state["sally"]["error"]
    assert state["sally"]["error"].endswith("(rolled back to version 2, not reloaded)")
    assert served(fresh, "sally", MEDIA) == first
    assert os.readlink(sally.cert_root / "live" / MEDIA) == f"../archive/{MEDIA}/2"
    assert fresh.nginx_test("sally")[0] == 0
    for pop in fresh.pop_names:
        if pop != "sally":
            assert state[pop]["status"] == "deployed" and served(fresh, pop, MEDIA) == second
    assert any(e["action"] == "rolled back" and e["host"] == "sally" for e in audit(store))

    (sally.conf_d / "extra.conf").unlink()
    rerun = by_host(run(inv, store, [MEDIA]))
    assert rerun["sally"].status == Status.DEPLOYED
    assert {rerun[p].status for p in fresh.pop_names if p != "sally"} == {Status.SKIPPED}
    assert served(fresh, "sally", MEDIA) == second


def test_preflight_broken_config_changes_nothing(fresh: Lab, store: Store) -> None:
    """A POP whose config is already broken is reported as such and left exactly as it was."""
    inv = inventory_mod.load(fresh.inventory_path)
    put_new_versions(store, inv, [MEDIA])
    esme = fresh.pop_paths("esme")
    (esme.conf_d / "broken.conf").write_text("this is not nginx syntax\n")
    before = live_state(fresh, "esme")
    outcomes = by_host(run(inv, store, [MEDIA]))
    assert outcomes["esme"].status == Status.FAILED
    assert outcomes["esme"].error is not None
    assert "config was already broken before deploy" in outcomes["esme"].error
    assert "broken.conf" in outcomes["esme"].error and outcomes["esme"].error.endswith("(nothing changed)")
    assert live_state(fresh, "esme") == before
    assert {outcomes[p].status for p in fresh.pop_names if p != "esme"} == {Status.DEPLOYED}


# ---------------------------------------------------------------------------- host keys and reachability


def test_changed_host_key_is_refused_and_nothing_written(fresh: Lab, store: Store, tmp_path: Path) -> None:
    """A host key that differs from known_hosts is refused with a clear message; the POP is untouched."""
    inv = inventory_mod.load(fresh.inventory_path)
    serial = put_new_versions(store, inv, [MEDIA])[MEDIA]
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    addr = f"[{fresh.pop_paths('sally').address}]:{fresh.ports.ssh}"
    lines = [ln for ln in fresh.known_hosts.read_text().splitlines() if not ln.startswith(addr + " ")]
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join([*lines, f"{addr} {other}"]) + "\n")
    before = live_state(fresh, "sally")
    inv2 = with_hosts(inv, sally=dataclasses.replace(inv.hosts["sally"], known_hosts=kh))
    outcomes = by_host(run(inv2, store, [MEDIA], accept_new=True))  # accept-new never accepts a *changed* key
    o = outcomes["sally"]
    assert o.status == Status.FAILED
    assert o.error is not None and "host key changed: server offered ssh-ed25519 SHA256:" in o.error
    assert o.error.endswith("(refused, nothing changed)") and o.hint and "ssh-keygen -R" in o.hint
    assert live_state(fresh, "sally") == before
    assert served(fresh, "sally", MEDIA) != serial
    assert outcomes["esme"].status == Status.DEPLOYED


def test_unknown_host_key_refused_then_accept_new_records_it(fresh: Lab, store: Store, tmp_path: Path) -> None:
    """A host absent from known_hosts is refused, unless --accept-new, which trusts and records its key."""
    inv = inventory_mod.load(fresh.inventory_path)
    put_new_versions(store, inv, [MEDIA])
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    inv2 = with_hosts(inv, sally=dataclasses.replace(inv.hosts["sally"], known_hosts=kh))
    o = by_host(run(inv2, store, [MEDIA], hosts=["sally"]))["sally"]
    assert o.status == Status.FAILED and o.error is not None
    assert "unknown host key ssh-ed25519 SHA256:" in o.error and f"not in {kh}" in o.error
    assert o.hint is not None and "--accept-new" in o.hint
    o = by_host(run(inv2, store, [MEDIA], hosts=["sally"], accept_new=True))["sally"]
    assert o.status == Status.DEPLOYED
    addr = f"[{fresh.pop_paths('sally').address}]:{fresh.ports.ssh}"
    assert kh.read_text().startswith(addr + " ssh-ed25519 ")
    [accepted] = [e for e in audit(store) if e["action"] == "host key accepted"]
    assert accepted["object"] == "sally" and str(accepted["to"]).startswith("ssh-ed25519 SHA256:")
    assert accepted["known_hosts"] == str(kh)
    assert by_host(run(inv2, store, [MEDIA], hosts=["sally"]))["sally"].status == Status.SKIPPED


def test_unreachable_pop_does_not_stop_the_others(fresh: Lab, store: Store) -> None:
    """A POP nobody answers for is reported unreachable; every other POP is deployed."""
    inv = inventory_mod.load(fresh.inventory_path)
    put_new_versions(store, inv, [MEDIA])
    ghost = dataclasses.replace(inv.hosts["esme"], name="ghost", address="127.0.1.250", tags=("cdn",))
    inv2 = with_hosts(inv, ghost=ghost)
    cert = dataclasses.replace(inv2.certificate(MEDIA), hosts=(*inv2.certificate(MEDIA).hosts, "ghost"))
    inv2 = dataclasses.replace(inv2, certificates=(cert,))
    outcomes = by_host(run(inv2, store, [MEDIA]))
    assert outcomes["ghost"].status == Status.UNREACHABLE
    assert outcomes["ghost"].error == (f"deploy {MEDIA} → ghost: connect ghost (127.0.1.250:{fresh.ports.ssh}): "
                                       "Connection refused (nothing changed)")
    assert {outcomes[p].status for p in fresh.pop_names} == {Status.DEPLOYED}


# ---------------------------------------------------------------------------- upload failures


def test_upload_refused_by_permissions_changes_no_live_link(fresh: Lab, store: Store) -> None:
    """A POP where the deploy user cannot write archive/<name>/ fails at upload and its live state is unchanged."""
    inv = inventory_mod.load(fresh.inventory_path)
    put_new_versions(store, inv, [MEDIA])
    arch = fresh.pop_paths("sally").cert_root / "archive" / MEDIA
    before = live_state(fresh, "sally")
    old = served(fresh, "sally", MEDIA)
    arch.chmod(0o555)
    try:
        outcomes = by_host(run(inv, store, [MEDIA]))
    finally:
        arch.chmod(0o700)
    o = outcomes["sally"]
    assert o.status == Status.FAILED and o.error is not None, [x.line() for x in outcomes.values()]
    assert "upload sally" in o.error and "ermission denied" in o.error and o.error.endswith("(live unchanged)")
    assert live_state(fresh, "sally") == before and served(fresh, "sally", MEDIA) == old
    assert {outcomes[p].status for p in fresh.pop_names if p != "sally"} == {Status.DEPLOYED}, [
        x.line() for x in outcomes.values()]


def test_privkey_group_is_set_on_the_pop_and_an_owner_it_cannot_set_changes_nothing(fresh: Lab, store: Store) -> None:
    """privkey_group: the key on the POP belongs to that group (0600); a non-root deploy user cannot give it to root.

    A changed setting alone makes the next run deploy again (the live key's ownership is part of "already live").
    """
    inv = inventory_mod.load(fresh.inventory_path)
    put_new_versions(store, inv, [MEDIA])
    sally, esme = inv.hosts["sally"], inv.hosts["esme"]
    inv = with_hosts(inv, sally=dataclasses.replace(sally, privkey_group=KEY_GROUP),
                     esme=dataclasses.replace(esme, privkey_owner="root"))
    before = live_state(fresh, "esme")
    old = served(fresh, "esme", MEDIA)
    outcomes = by_host(run(inv, store, [MEDIA], hosts=["sally", "esme"]))
    ok, bad = outcomes["sally"], outcomes["esme"]
    assert ok.status == Status.DEPLOYED, ok.line()
    key = fresh.pop_paths("sally").cert_root / "live" / MEDIA / "privkey.pem"
    st = key.stat()
    assert (grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777) == (KEY_GROUP, 0o600)
    assert pwd.getpwuid(st.st_uid).pw_name == "certmgr-deploy"
    assert bad.status == Status.FAILED and bad.error is not None, bad.line()
    assert "cannot give privkey.pem to root" in bad.error and "Operation not permitted" in bad.error
    assert bad.error.endswith("(live unchanged)") and bad.hint and "privkey_owner" in bad.hint
    assert live_state(fresh, "esme") == before and served(fresh, "esme", MEDIA) == old

    again = by_host(run(inv, store, [MEDIA], hosts=["sally"]))
    assert again["sally"].status == Status.SKIPPED
    regrouped = with_hosts(inv, sally=dataclasses.replace(sally, privkey_group=None, privkey_owner="certmgr-deploy"))
    assert by_host(run(regrouped, store, [MEDIA], hosts=["sally"]))["sally"].status == Status.SKIPPED
    moved = with_hosts(inv, sally=dataclasses.replace(sally, privkey_group="certmgr-deploy"))
    third = by_host(run(moved, store, [MEDIA], hosts=["sally"]))["sally"]
    # the same certificate keeps its one number: version 2 is given to the new group in place, no copy made
    assert third.status == Status.DEPLOYED and third.version == ok.version == store.live_version(MEDIA), third.line()
    assert live_state(fresh, "sally") == (f"link:../archive/{MEDIA}/2",
                                          ["1", "2", "cert1.pem", "chain1.pem", "fullchain1.pem", "privkey1.pem"])
    assert grp.getgrgid(key.stat().st_gid).gr_name == "certmgr-deploy"


@pytest.fixture()
def bastion(fresh: Lab, tmp_path: Path) -> Iterator[tuple[str, int, str]]:
    """A jump host: an sshd of its own on 127.0.2.250 that lets the deploy user forward to sally's sshd only.

    Yields (address, port, its known_hosts line); stopped at the end.
    """
    from lab.pop import sshd_conf
    from lab.proc import spawn, stop_tree, wait_tcp

    sally = fresh.pop_paths("sally")
    address, port = "127.0.2.250", fresh.ports.ssh
    d = tmp_path / "bastion"
    d.mkdir()
    d.chmod(0o755)
    paths = dataclasses.replace(sally, name="bastion", address=address, host_key=d / "ssh_host_ed25519_key")
    pub = pki.make_ssh_keypair(paths.host_key, "root@bastion").rsplit(" ", 1)[0]
    conf = sshd_conf(paths, port, fresh.authorized_keys).replace(
        "AllowTcpForwarding no", f"AllowTcpForwarding local\nPermitOpen {sally.address}:{port}")
    (d / "sshd_config").write_text(conf)
    log = d / "sshd.log"
    pid = spawn(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"), "-E", str(log)], log=d / "sshd.out")
    try:
        wait_tcp("bastion sshd", address, port, pid=pid, log=log)
        yield address, port, f"[{address}]:{port} {pub}"
    finally:
        stop_tree(pid, str(d / "sshd_config"))


def test_jump_host_with_accept_new_audited_even_when_the_target_is_refused(
        fresh: Lab, store: Store, tmp_path: Path, bastion: tuple[str, int, str]) -> None:
    """sally behind a jump host: --accept-new trusts the unknown jump host (audited and recorded even though
    sally's changed key is then refused, nothing written); with sally's key fixed the deploy goes through it."""
    address, port, bastion_line = bastion
    inv = inventory_mod.load(fresh.inventory_path)
    serial = put_new_versions(store, inv, [MEDIA])[MEDIA]
    sally = fresh.pop_paths("sally")
    hostport = f"[{sally.address}]:{fresh.ports.ssh}"
    real = next(ln for ln in fresh.known_hosts.read_text().splitlines() if ln.startswith(hostport + " "))
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{hostport} {other}\n")
    jump = dataclasses.replace(inv.hosts["sally"], name="bastion", address=address, port=port, known_hosts=kh,
                               tags=())
    inv2 = with_hosts(inv, bastion=jump, sally=dataclasses.replace(inv.hosts["sally"], jump="bastion", known_hosts=kh))
    before = live_state(fresh, "sally")

    o = by_host(run(inv2, store, [MEDIA], hosts=["sally"], accept_new=True))["sally"]
    assert o.status == Status.FAILED and o.error is not None and "host key changed" in o.error, o.line()
    assert live_state(fresh, "sally") == before
    [accepted] = [e for e in audit(store) if e["action"] == "host key accepted"]
    assert accepted["object"] == "bastion" and accepted["known_hosts"] == str(kh)
    assert bastion_line.split(" ", 1)[1] in kh.read_text()

    kh.write_text(kh.read_text().replace(f"{hostport} {other}", real))
    o = by_host(run(inv2, store, [MEDIA], hosts=["sally"]))["sally"]
    assert o.status == Status.DEPLOYED, o.line()
    assert served(fresh, "sally", MEDIA) == serial
    bastion_log = (tmp_path / "bastion" / "sshd.log").read_text()
    assert "Accepted publickey for certmgr-deploy" in bastion_log


class _CuttingProxy:
    """TCP proxy to an sshd that drops both sides once `limit` bytes went client → server."""

    def __init__(self, target: tuple[str, int], limit: int) -> None:
        self.target = target
        self.limit = limit
        self.sent = 0
        self.cut = False

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(16384):
                    if count:
                        self.sent += len(data)
                        if self.sent > self.limit:
                            self.cut = True
                            break
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                for x in (w, uw):
                    x.transport.abort()

        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False))


def test_connection_cut_mid_upload_changes_no_live_link_and_rerun_finishes(fresh: Lab, store: Store) -> None:
    """The SSH connection dying mid-upload leaves live/ untouched; the next run deploys and sweeps the partial upload."""
    inv = inventory_mod.load(fresh.inventory_path)
    serial = put_new_versions(store, inv, [MEDIA], pad=400_000)[MEDIA]
    sally = fresh.pop_paths("sally")
    before = live_state(fresh, "sally")
    old = served(fresh, "sally", MEDIA)
    proxy_port = fresh.ports.base + 50
    proxy = _CuttingProxy((sally.address, fresh.ports.ssh), limit=120_000)
    via = dataclasses.replace(inv.hosts["sally"], port=proxy_port)
    kh_line = next(ln for ln in fresh.known_hosts.read_text().splitlines()
                   if ln.startswith(f"[{sally.address}]:{fresh.ports.ssh} "))
    kh = Path(store.root) / "known_hosts"
    kh.write_text(kh_line.replace(f":{fresh.ports.ssh} ", f":{proxy_port} ", 1) + "\n")
    via = dataclasses.replace(via, known_hosts=kh)

    async def main() -> list[HostOutcome]:
        server = await asyncio.start_server(proxy.handle, sally.address, proxy_port)
        try:
            return await deploy(with_hosts(trusting_ca(inv, store), sally=via), store, [inv.certificate(MEDIA)],
                                hosts=["sally"],
                                now=NOW, timeouts=Timeouts(connect=5, command=30, upload=30, verify=5))
        finally:
            server.close()

    o = asyncio.run(main())[0]
    assert proxy.cut
    assert o.status == Status.FAILED and o.error is not None
    assert "connection lost" in o.error and o.error.endswith("during upload (live unchanged)")
    assert live_state(fresh, "sally")[0] == before[0]
    assert [e for e in live_state(fresh, "sally")[1] if not e.startswith(".")] == before[1]
    assert served(fresh, "sally", MEDIA) == old
    # the upload rode on the commit's stdin: the script read a short stream, so (once it has let the POP
    # lock go) it has removed its temp dir itself and switched nothing
    lock = sally.cert_root / "archive" / ".certmgr.lock"
    subprocess.run(["flock", "-w", "120", str(lock), "true"], check=True)
    assert not [e for e in os.listdir(sally.cert_root / "archive" / MEDIA) if e.startswith(".tmp")]
    assert live_state(fresh, "sally")[0] == before[0]

    again = by_host(run(inv, store, [MEDIA], hosts=["sally"]))["sally"]
    assert again.status == Status.DEPLOYED and served(fresh, "sally", MEDIA) == serial
    assert not [e for e in os.listdir(sally.cert_root / "archive" / MEDIA) if e.startswith(".")]


def test_connection_cut_inside_the_archive_of_many_certificates_switches_none(fresh: Lab, store: Store) -> None:
    """Every lineage due on sally in ONE upload archive, the connection cut inside it (past the first lineage's
    files): each lineage fails "during upload (live unchanged)", none is switched, no temp dir is left in any
    lineage nor a stage dir in live/; a rerun deploys them all."""
    inv = inventory_mod.load(fresh.inventory_path)
    names = [n for n, _ in fresh.certificates]
    assert len(names) >= 3
    serials = put_new_versions(store, inv, names, pad=150_000)
    sally = fresh.pop_paths("sally")
    before = {n: live_state(fresh, "sally", n) for n in names}
    proxy_port = fresh.ports.base + 51
    proxy = _CuttingProxy((sally.address, fresh.ports.ssh), limit=250_000)  # inside the second lineage's files
    kh_line = next(ln for ln in fresh.known_hosts.read_text().splitlines()
                   if ln.startswith(f"[{sally.address}]:{fresh.ports.ssh} "))
    kh = Path(store.root) / "known_hosts"
    kh.write_text(kh_line.replace(f":{fresh.ports.ssh} ", f":{proxy_port} ", 1) + "\n")
    via = dataclasses.replace(inv.hosts["sally"], port=proxy_port, known_hosts=kh)

    async def main() -> list[HostOutcome]:
        server = await asyncio.start_server(proxy.handle, sally.address, proxy_port)
        try:
            return await deploy(with_hosts(trusting_ca(inv, store), sally=via), store,
                                [inv.certificate(n) for n in names], hosts=["sally"], now=NOW,
                                timeouts=Timeouts(connect=5, command=30, upload=30, verify=5))
        finally:
            server.close()

    outs = {o.cert: o for o in asyncio.run(main())}
    assert proxy.cut
    assert set(outs) == set(names)
    for n in names:
        o = outs[n]
        assert o.status == Status.FAILED and o.error is not None, o.line()
        assert "connection lost" in o.error and o.error.endswith("during upload (live unchanged)"), o.error
    lock = sally.cert_root / "archive" / ".certmgr.lock"
    subprocess.run(["flock", "-w", "120", str(lock), "true"], check=True)
    for n in names:
        assert live_state(fresh, "sally", n) == before[n], n
    assert not [e for e in os.listdir(sally.cert_root / "live") if e.startswith(".")]
    again = {o.cert: o for o in run(inv, store, names, hosts=["sally"])}
    assert {n: (again[n].status, served(fresh, "sally", n)) for n in names} == {
        n: (Status.DEPLOYED, serials[n]) for n in names}
    assert not [e for n in names for e in os.listdir(sally.cert_root / "archive" / n) if e.startswith(".")]
    assert not [e for e in os.listdir(sally.cert_root / "live") if e.startswith(".")]


def test_a_live_link_that_cannot_be_renamed_fails_only_its_lineage(fresh: Lab, store: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Between sally's inspect and its commit, live/<one lineage> becomes a directory (the same files, so nginx
    still loads): the one `mv` of the swaps cannot rename over it, that lineage alone fails "cannot switch the live
    link" (live unchanged, old serial served); every other lineage is switched, tested, reloaded and served."""
    inv = inventory_mod.load(fresh.inventory_path)
    names = [n for n, _ in fresh.certificates]
    put_new_versions(store, inv, names)
    first = run(inv, store, names, hosts=["sally"])  # certbot's layout converted: every live/<name> a link
    assert {o.status for o in first} == {Status.DEPLOYED}, [o.line() for o in first]
    serials = put_new_versions(store, inv, names)
    sally = fresh.pop_paths("sally")
    stuck = names[1]
    old = served(fresh, "sally", stuck)
    live = sally.cert_root / "live" / stuck
    real = session_mod.Session.run_streamed

    async def hooked(self: session_mod.Session, script: str, args: Sequence[str], data: bytes, **kw: Any) -> Any:
        if self.remote.host.name == "sally" and live.is_symlink():
            files = {f: (live / f).read_bytes() for f in ("fullchain.pem", "privkey.pem", "cert.pem", "chain.pem")}
            live.unlink()
            live.mkdir()
            for f, b in files.items():
                (live / f).write_bytes(b)
        return await real(self, script, args, data, **kw)

    monkeypatch.setattr(session_mod.Session, "run_streamed", hooked)
    outs = {o.cert: o for o in run(inv, store, names, hosts=["sally"])}
    o = outs[stuck]
    assert o.status == Status.FAILED and o.error is not None, o.line()
    assert "cannot switch the live link" in o.error and "cannot overwrite directory" in o.error, o.error
    assert o.error.endswith("(live unchanged)") and served(fresh, "sally", stuck) == old
    assert live.is_dir() and not live.is_symlink()
    for n in names:
        if n != stuck:
            assert (outs[n].status, served(fresh, "sally", n)) == (Status.DEPLOYED, serials[n]), outs[n].line()
    assert not [e for e in os.listdir(sally.cert_root / "live") if e.startswith(".")]


# ---------------------------------------------------------------------------- canary, prune


def test_failing_canary_holds_every_other_host(fresh: Lab, store: Store) -> None:
    """When the canary (tag `canary`: cdn-frankfurt-1) fails, no other POP is touched."""
    inv = inventory_mod.load(fresh.inventory_path)
    assert inv.hosts["cdn-frankfurt-1"].canary
    put_new_versions(store, inv, [MEDIA])
    (fresh.pop_paths("cdn-frankfurt-1").conf_d / "broken.conf").write_text("not nginx\n")
    before = {p: live_state(fresh, p) for p in fresh.pop_names}
    outcomes = by_host(run(inv, store, [MEDIA]))
    assert outcomes["cdn-frankfurt-1"].status == Status.FAILED
    others = [p for p in fresh.pop_names if p != "cdn-frankfurt-1"]
    assert {outcomes[p].status for p in others} == {Status.HELD}
    assert outcomes["sally"].error == f"deploy {MEDIA} → sally: held: canary cdn-frankfurt-1 did not verify (not touched)"
    assert {p: live_state(fresh, p) for p in fresh.pop_names} == before


def test_prune_keeps_newest_and_live(fresh: Lab, store: Store) -> None:
    """--prune K leaves the newest K version dirs (and the live one) on each host and audits what it removed."""
    inv = inventory_mod.load(fresh.inventory_path)
    for _ in range(3):
        put_new_versions(store, inv, [MEDIA])
        assert {o.status for o in run(inv, store, [MEDIA], hosts=["esme"])} == {Status.DEPLOYED}
    arch = fresh.pop_paths("esme").cert_root / "archive" / MEDIA
    assert sorted(e for e in os.listdir(arch) if e.isdigit()) == ["1", "2", "3", "4"]
    outcomes = run(inv, store, [MEDIA], hosts=["esme"], prune=2)
    assert [o.status for o in outcomes] == [Status.SKIPPED]
    assert sorted(e for e in os.listdir(arch) if e.isdigit()) == ["3", "4"]
    assert os.readlink(fresh.pop_paths("esme").cert_root / "live" / MEDIA) == f"../archive/{MEDIA}/4"
    assert (arch / "fullchain1.pem").exists()  # certbot's flat files are not ours to prune
    pruned = [e for e in audit(store) if e["action"] == "pruned"]
    assert pruned and pruned[-1]["removed"] == [1, 2] and pruned[-1]["host"] == "esme"
    assert CertInfo.from_cert(store.read(MEDIA).leaf).serial == served(fresh, "esme", MEDIA)


# ---------------------------------------------------------------------------- renew hook


def test_renew_deploys_unless_no_deploy(fresh: Lab, store: Store) -> None:
    """`certmgr renew` pushes a renewed certificate to every POP; with --no-deploy it touches no POP."""
    res = _cli(fresh, store, "renew", MEDIA, "--force", "--no-deploy", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["status"] == "renewed" and "deploy" not in row
    assert {served(fresh, p, MEDIA) for p in fresh.pop_names} == {serial_text(fresh.seed_serial(MEDIA))}

    res = _cli(fresh, store, "renew", MEDIA, "--force", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    serial = CertInfo.from_cert(store.read(MEDIA).leaf).serial
    assert row["status"] == "renewed"
    assert sorted((d["host"], d["status"], d["new_serial"]) for d in row["deploy"]) == sorted(
        (p, "deployed", serial) for p in fresh.pop_names)
    assert {served(fresh, p, MEDIA) for p in fresh.pop_names} == {serial}


def test_reload_that_does_nothing_is_caught_by_the_handshake_and_rolled_back(fresh: Lab, store: Store) -> None:
    """A reload command that succeeds without reloading (new serial never served) ends rolled back, old serial served."""
    inv = inventory_mod.load(fresh.inventory_path)
    first = put_new_versions(store, inv, [MEDIA])[MEDIA]
    assert {o.status for o in run(inv, store, [MEDIA], hosts=["sally"])} == {Status.DEPLOYED}
    put_new_versions(store, inv, [MEDIA])
    inv2 = with_hosts(inv, sally=dataclasses.replace(inv.hosts["sally"], reload_command=("true",)))
    o = by_host(run(inv2, store, [MEDIA], hosts=["sally"],
                    timeouts=Timeouts(connect=5, command=30, upload=30, verify=1.5, handshake=3)))["sally"]
    assert o.status == Status.ROLLED_BACK and o.error is not None, o.line()
    assert f"new serial {o.new_serial} not served after 1.5s ({MEDIA}: {first})" in o.error
    assert o.error.endswith("(rolled back to version 2, reloaded)")
    root = fresh.pop_paths("sally").cert_root
    assert os.readlink(root / "live" / MEDIA) == f"../archive/{MEDIA}/2"
    assert served(fresh, "sally", MEDIA) == first and fresh.nginx_test("sally")[0] == 0


# ---------------------------------------------------------------------------- wildcards and verify_names

APEX = "hachyderm.test"  # the lab's nginx serves this lineage under explicit names only: hachyderm.test www.hachyderm.test


def wildcard_inventory(lab: Lab, tmp_path: Path, domains: Sequence[str], verify_names: Sequence[str] | None,
                       lineage: str = APEX) -> Inventory:
    """The lab inventory with `lineage` turned into a wildcard certificate, through the parser (defaults applied)."""
    text = lab.inventory_path.read_text()
    start = text.index(f'name = "{lineage}"\ndomains = ')
    end = text.index("\n", text.index("domains = ", start))
    new = f'name = "{lineage}"\ndomains = {json.dumps(list(domains))}'
    if verify_names is not None:
        new += f"\nverify_names = {json.dumps(list(verify_names))}"
    path = tmp_path / "wild.toml"
    path.write_text(text[:start] + new + text[end:])
    return inventory_mod.load(path)


@pytest.mark.parametrize(("lineage", "domains", "verify_names", "served_as"), [
    (APEX, ["hachyderm.test", "*.hachyderm.test"], None, "www.hachyderm.test"),
    ("static.hachyderm.test", ["*.hachyderm.test"], ["static.hachyderm.test"], "static.hachyderm.test"),
], ids=["apex+wildcard, default verify_names", "wildcard only, verify_names"])
def test_wildcard_served_under_explicit_names_verifies(fresh: Lab, store: Store, tmp_path: Path, lineage: str,
                                                       domains: list[str], verify_names: list[str] | None,
                                                       served_as: str) -> None:
    """A wildcard certificate that nginx serves only under explicit server_names verifies with those names and stays deployed."""
    inv = wildcard_inventory(fresh, tmp_path, domains, verify_names, lineage)
    assert inv.certificate(lineage).verify_names == (lineage,)
    serial = put_new_versions(store, inv, [lineage])[lineage]
    o = by_host(run(inv, store, [lineage], hosts=["sally"]), lineage)["sally"]
    assert o.status == Status.DEPLOYED, o.line()
    assert served(fresh, "sally", served_as) == serial


def test_verify_names_are_the_names_handshaken(fresh: Lab, store: Store, tmp_path: Path) -> None:
    """verify_names naming a name the POP does not serve (nginx's default server answers) fails verification, before and after the switch back."""
    inv = wildcard_inventory(fresh, tmp_path, ["hachyderm.test", "*.hachyderm.test"], ["nope.hachyderm.test"])
    seed = served(fresh, "sally", APEX)
    new = put_new_versions(store, inv, [APEX])[APEX]
    o = by_host(run(inv, store, [APEX], hosts=["sally"],
                    timeouts=Timeouts(connect=5, command=30, upload=30, verify=1.5, handshake=3)), APEX)["sally"]
    # the same names check the restored version too: the default server's certificate is "not served either"
    assert o.status == Status.FAILED and o.error is not None, o.line()
    assert f"new serial {new} not served after 1.5s (nope.hachyderm.test: " in o.error
    assert o.error.endswith(f"(switched back to version 1 and reloaded, but serial {seed} is not served either)")
    assert served(fresh, "sally", APEX) == seed and served(fresh, "sally", "www.hachyderm.test") == seed


def test_inventory_check_passes_on_the_lab(fresh: Lab, store: Store) -> None:
    """The lab's inventory passes `inventory check` with every file it names in place, without warnings."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CERTMGR_INVENTORY": str(fresh.inventory_path),
           "CERTMGR_STATE_DIR": str(store.root)}  # the lab's own file (_cli runs a copy trusting the test CA)
    res = subprocess.run([sys.executable, "-m", "certmgr", "inventory", "check"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{fresh.inventory_path}: ok — ") and "warning" not in res.stdout
