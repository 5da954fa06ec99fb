"""The default reload (SIGHUP by pkill) and its fallback on the lab's real POPs (sshd, sudo, nginx): a POP whose
sudoers allows the default, one that allows only the old form, one that allows neither; deploy and doctor on each.

The lab has no systemd, so the old default `systemctl reload nginx` cannot reload its nginx: the hosts here carry
the lab POP's `nginx -s reload` as their `reload_fallback` (what the inventory sets to `systemctl reload nginx`
when reload_command is left to its default; tests/unit/test_reload.py pins that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from certmgr import doctor
from certmgr import inventory as inventory_mod
from certmgr import remote as remote_mod
from certmgr.deploy import HostOutcome, Status
from certmgr.doctor.model import Check
from certmgr.doctor.model import Status as DStatus
from certmgr.inventory import Host, Inventory
from certmgr.remote import Timeouts
from certmgr.store import Store
from lab import Lab
from tests.conftest import private_lab
from tests.integration.test_deploy_lab import MEDIA, put_new_versions, run, served, with_hosts

pytestmark = pytest.mark.integration

POP = "sally"


@pytest.fixture(scope="module")
def rlab() -> Iterator[Lab]:
    """A 3-POP lab of this module's own (it rewrites the POPs' sudoers grants)."""
    with private_lab("reload", pops=3) as lab:
        yield lab


@pytest.fixture()
def fresh(rlab: Lab) -> Iterator[Lab]:
    """Every POP on its certbot-layout seed; every sudoers grant back to both reloads afterwards."""
    rlab.reseed()
    yield rlab
    for pop in rlab.pop_names:
        rlab.reload_grants.pop(pop, None)
    rlab.grant_reload(POP, "both")


@pytest.fixture()
def store(tmp_path: Path, rlab: Lab) -> Store:
    from certmgr.material import CertMaterial

    s = Store.open(tmp_path / "state")
    with s.lock("test"):
        for d in sorted((rlab.seed_dir / "certs").iterdir()):
            seed = CertMaterial(cert=(d / "cert.pem").read_bytes(), chain=(d / "chain.pem").read_bytes(),
                                privkey=(d / "privkey.pem").read_bytes())
            s.activate(d.name, s.add_version(d.name, seed))
    return s


def defaulted(lab: Lab) -> tuple[Inventory, Host]:
    """The lab's inventory with POP's reload left to certmgr's default (this POP's pid file) and its fallback."""
    inv = inventory_mod.load(lab.inventory_path)
    p = lab.pop_paths(POP)
    host = dataclasses.replace(inv.hosts[POP], reload_command=tuple(p.reload_command),
                               reload_fallback=tuple(p.nginx_reload_command))
    return with_hosts(inv, **{POP: host}), host


def deploy_media(lab: Lab, inv: Inventory, store: Store) -> tuple[str, HostOutcome]:
    serial = put_new_versions(store, inv, [MEDIA])[MEDIA]
    outs = run(inv, store, [MEDIA], hosts=[POP])
    assert len(outs) == 1
    return serial, outs[0]


def audit(store: Store, action: str) -> list[dict[str, object]]:
    lines = (Path(store.root) / "audit.log").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("action") == action]


def reload_state(store: Store) -> object:
    return store.load_json(f"state/reload/{POP}.json")


def check_reload(host: Host) -> Check:
    async def go() -> Check:
        async with remote_mod.connect(host, jump=None, accept_new=False,
                                      timeouts=Timeouts(connect=5, command=30)) as rem:
            return await doctor._check_reload(host, rem)
    return asyncio.run(go())


def test_default_reload_deploys_with_one_sighup_and_asks_sudo_once(fresh: Lab, store: Store) -> None:
    """Sudo allows the default: deploy reloads by SIGHUP (one reload logged), serves the new serial, keeps the
    verdict, and the next deploy asks sudo nothing (the kept verdict is not rewritten); doctor says OK."""
    inv, host = defaulted(fresh)
    before = fresh.reload_count(POP)
    serial, out = deploy_media(fresh, inv, store)
    assert (out.status, out.error, out.note) == (Status.DEPLOYED, None, None)
    assert served(fresh, POP, MEDIA) == serial
    assert fresh.reload_count(POP) - before == 1
    kept = reload_state(store)
    assert isinstance(kept, dict) and kept["allowed"] is True and kept["using"] == list(host.reload_command)
    serial2, out2 = deploy_media(fresh, inv, store)
    assert out2.status == Status.DEPLOYED and served(fresh, POP, MEDIA) == serial2
    assert reload_state(store) == kept  # not asked again
    assert fresh.reload_count(POP) - before == 2
    assert audit(store, "reload fallback") == [] and audit(store, "reload default") == []
    got = check_reload(host)
    assert (got.status, got.message) == (
        DStatus.OK, "sudo allows `pkill -HUP nginx` without a password (checked with sudo -l, not run)")


def test_pop_allowing_only_the_old_reload_still_deploys_with_a_warning(fresh: Lab, store: Store) -> None:
    """Sudoers allows only the old form: deploy uses it (one reload), says so on the outcome every time, audits it
    once; doctor warns with the sudoers line; once the line is added the next deploy uses the default again."""
    inv, host = defaulted(fresh)
    fresh.grant_reload(POP, "legacy")
    line = f"certmgr-deploy ALL=(root) NOPASSWD: /usr/bin/pkill -HUP -F {fresh.pop_paths(POP).nginx_pid} -x nginx"
    note = (f"reloaded with the old default `{' '.join(host.reload_fallback[2:])}`: sudo does not allow "
            f"`{' '.join(host.reload_command[2:])}` without a password; add `{line}` to sudoers "
            "(docs/deploy.md, \"Reload\")")
    before = fresh.reload_count(POP)
    for _ in range(2):
        serial, out = deploy_media(fresh, inv, store)
        assert (out.status, out.error, out.note) == (Status.DEPLOYED, None, note)
        assert served(fresh, POP, MEDIA) == serial
    assert fresh.reload_count(POP) - before == 2
    rows = audit(store, "reload fallback")
    assert [(r["object"], r["summary"]) for r in rows] == [(POP, f"{POP}: {note}")]
    got = check_reload(host)
    assert (got.status, got.message, got.hint) == (
        DStatus.WARNING, "deploy reloads with the old default `nginx -s reload`: sudo does not allow "
                         f"`{' '.join(host.reload_command[2:])}` without a password",
        f"add `{line}` to sudoers (docs/deploy.md, \"Reload\")")
    fresh.grant_reload(POP, "both")
    serial, out = deploy_media(fresh, inv, store)
    assert (out.status, out.note) == (Status.DEPLOYED, None)
    assert [r["to"] for r in audit(store, "reload default")] == [" ".join(host.reload_command)]


def test_pop_allowing_neither_reload_fails_cleanly_and_switches_back(fresh: Lab, store: Store) -> None:
    """Sudoers allows neither reload: the commit's reload is refused, every certificate is switched back, the old
    serial is still served, and the report names the default's argv and its sudoers line; doctor fails."""
    inv, host = defaulted(fresh)
    fresh.grant_reload(POP, "none")
    old = served(fresh, POP, MEDIA)
    before = fresh.reload_count(POP)
    serial, out = deploy_media(fresh, inv, store)
    line = f"certmgr-deploy ALL=(root) NOPASSWD: /usr/bin/pkill -HUP -F {fresh.pop_paths(POP).nginx_pid} -x nginx"
    assert (out.status, out.error, out.hint, out.note) == (
        Status.ROLLED_BACK,
        f"deploy {MEDIA} → {POP}: pkill -HUP nginx failed: \"sudo: a password is required\" (rolled back to "
        f"version 1, reload failed again: \"sudo: a password is required\": old serial {old} served)",
        f"sudo on {POP} refuses the reload: add `{line}` to sudoers (docs/deploy.md, \"Reload\")", None)
    assert served(fresh, POP, MEDIA) == old != serial
    assert fresh.reload_count(POP) == before
    assert audit(store, "reload fallback") == []
    got = check_reload(host)
    assert (got.status, got.message, got.hint) == (
        DStatus.FAIL, "sudo allows neither `pkill -HUP nginx` nor the old default `nginx -s reload` without a "
                      "password (sudo -n -l): deploy's reload will fail and switch back",
        f"add `{line}` to sudoers (docs/deploy.md, \"Reload\")")


def test_kept_verdict_is_forgotten_when_the_default_reload_fails(fresh: Lab, store: Store) -> None:
    """A kept "default allowed" that no longer holds (the sudoers line was removed) costs one switched-back deploy;
    the next deploy asks again and falls back."""
    inv, _ = defaulted(fresh)
    deploy_media(fresh, inv, store)
    assert reload_state(store)["allowed"] is True  # type: ignore[index]
    fresh.grant_reload(POP, "legacy")
    _, out = deploy_media(fresh, inv, store)
    assert out.status == Status.ROLLED_BACK
    assert reload_state(store)["allowed"] is False  # type: ignore[index]
    serial, out = deploy_media(fresh, inv, store)
    assert out.status == Status.DEPLOYED and out.note is not None
    assert served(fresh, POP, MEDIA) == serial
