"""Shared fixtures and checks for the fault-injection suite (`pytest -m faults`).

Each fault module gets a lab of its own (`flab`, from conftest's `private_lab`: faults restart
Pebble and break POPs), the fault-injecting ACME proxy in front of its Pebble (`proxy`), and the
chat receiver on the lab's webhook port. The helpers here state what "every POP serves a valid
certificate", "no file is truncated or mixed" and "what the audit log says" mean, once.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmgr.material import serial_text
from lab import Lab
from lab.pop import CERTIFICATES
from tests.conftest import private_lab
from tests.faults.acmeproxy import ACMEProxy
from tests.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
LINEAGES = tuple(name for name, _ in CERTIFICATES)
SNI: dict[str, tuple[str, ...]] = dict(CERTIFICATES)
CLI_TIMEOUT = 120.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def flab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A lab of this module's own (2 POPs unless the module sets FAULT_POPS), torn down at module end."""
    pops = getattr(request.module, "FAULT_POPS", 2)
    tag = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with private_lab(tag, pops=pops) as instance:
        yield instance


@pytest.fixture(scope="module")
def proxy(flab: Lab) -> Iterator[ACMEProxy]:
    """The fault-injecting proxy in front of the module lab's Pebble (TLS from the lab's HTTPS CA)."""
    with ACMEProxy.running(flab.ports.acme, flab.https_cert, flab.https_key, flab.https_ca) as p:
        yield p


@pytest.fixture(scope="module")
def chat(flab: Lab) -> Iterator[Receiver]:
    """The chat receiver on the lab's webhook port (the inventory's `ops` channel)."""
    with Receiver(port=flab.ports.webhook) as rx:
        yield rx


@pytest.fixture()
def fresh(flab: Lab, proxy: ACMEProxy, chat: Receiver) -> Iterator[Lab]:
    """Every POP back on its near-expiry seed, no proxy rules or records, an empty chat log."""
    proxy.clear()
    chat.clear()
    flab.reseed()
    # reseed waits for one handshake showing the seed; right after a reload the old nginx worker may
    # still accept a few: wait until three rounds in a row show every seed everywhere
    want = {(pop, sni): flab.seed_serial(lineage) for pop in flab.pop_names for lineage in LINEAGES
            for sni in SNI[lineage]}
    streak = [0]

    def settled() -> bool:
        streak[0] = streak[0] + 1 if served(flab) == want else 0
        return streak[0] >= 3

    wait_for(settled, 15, "every POP to serve its seed certificates", interval=0.1)
    yield flab
    proxy.clear()
    for pop in flab.pop_names:
        for f in flab.pop_paths(pop).conf_d.glob("*.conf"):
            f.unlink()


# ---------------------------------------------------------------- inventory and CLI


def write_inventory(flab: Lab, proxy: ACMEProxy, path: Path, *, certs: Sequence[str] | None = None,
                    cert_extra: dict[str, str] | None = None) -> Path:
    """The lab's inventory with the CA directory pointed at the proxy; `certs` keeps only those lineages.

    `cert_extra` adds TOML lines (e.g. `preferred_chain = "…"`) to every [[certificates]] table.
    """
    text = flab.inventory_path.read_text().replace(flab.pebble.directory, proxy.directory)
    blocks = text.split("[[certificates]]\n")
    head, tables = blocks[0], blocks[1:]
    kept = []
    for t in tables:
        name = t.split('name = "', 1)[1].split('"', 1)[0]
        if certs is not None and name not in certs:
            continue
        body, _, rest = t.partition("\n\n")
        extra = "".join(f"{k} = {v}\n" for k, v in (cert_extra or {}).items())
        kept.append(body.rstrip("\n") + "\n" + extra + ("\n" + rest if rest else "\n"))
    # the [channels.*] table follows the last [[certificates]] table in the lab's rendering
    tail = ""
    if kept and "[channels." in tables[-1] and "[channels." not in "".join(kept):
        tail = "[channels." + tables[-1].split("[channels.", 1)[1]
    path.write_text(head + "".join("[[certificates]]\n" + k for k in kept) + ("\n" + tail if tail else ""))
    return path


def cli_argv(inventory: Path, state: Path, *args: str, crash: str | None = None) -> list[str]:
    base = [sys.executable, "-m", "tests.faults.crashpoints", crash, "--"] if crash else [sys.executable, "-m",
                                                                                          "certmgr"]
    return [*base, "--inventory", str(inventory), "--state-dir", str(state), *args]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def certmgr(inventory: Path, state: Path, *args: str, timeout: float = CLI_TIMEOUT,
            crash: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI to completion (as the timer would), output captured."""
    return subprocess.run(cli_argv(inventory, state, *args, crash=crash), capture_output=True, text=True,
                          env=cli_env(**env), cwd=REPO, timeout=timeout)


def start_certmgr(inventory: Path, state: Path, *args: str, crash: str | None = None,
                  **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cli_argv(inventory, state, *args, crash=crash), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(**env), cwd=REPO)


def kill9(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGKILL a CLI we started and collect its output."""
    proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -9, (proc.returncode, out, err)
    return out, err


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Bounded polling: the first truthy value of cond(), or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def audit(state: Path) -> list[dict[str, Any]]:
    """The audit log's entries, as certmgr's own reader sees them (a line torn by a crash is skipped)."""
    from certmgr.store import Store

    if not (state / "audit.log").exists():
        return []
    return list(Store(state).read_audit())


def torn_audit_lines(state: Path) -> list[str]:
    out = []
    for line in (state / "audit.log").read_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            out.append(line)
    return out


# ---------------------------------------------------------------- what "whole" and "valid" mean


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, pub) == key.public_key().public_bytes(enc, pub)


def check_version_dir(d: Path) -> str:
    """A version directory is whole: four files, parseable, fullchain = cert + chain, key matches. Its serial."""
    files = {f: (d / f).read_bytes() for f in ("fullchain.pem", "privkey.pem", "cert.pem", "chain.pem")}
    assert files["fullchain.pem"] == files["cert.pem"] + files["chain.pem"], f"{d}: fullchain is not cert + chain"
    x509.load_pem_x509_certificates(files["fullchain.pem"])
    assert _key_matches(files["cert.pem"], files["privkey.pem"]), f"{d}: private key does not match the certificate"
    return serial_text(x509.load_pem_x509_certificate(files['cert.pem']).serial_number)  # as certmgr prints it


def check_store_whole(state: Path) -> dict[str, str]:
    """Every archived version is whole and every live link points at one; returns {lineage: live serial}."""
    live: dict[str, str] = {}
    archive = state / "archive"
    for lineage in sorted(archive.iterdir()) if archive.is_dir() else []:
        for v in lineage.iterdir():
            if v.name.isdigit():
                check_version_dir(v)
        link = state / "live" / lineage.name
        if link.is_symlink():
            target = link.resolve()
            assert target.parent == lineage.resolve() and target.name.isdigit(), f"{link} → {target}"
            live[lineage.name] = check_version_dir(target)
    return live


def check_pop_files_whole(flab: Lab) -> None:
    """On every POP, whatever each live/<name>/ resolves to is whole and matched (the files nginx reads)."""
    for pop in flab.pop_names:
        root = flab.pop_paths(pop).cert_root
        for lineage in LINEAGES:
            live = root / "live" / lineage
            fullchain = (live / "fullchain.pem").read_bytes()
            key = (live / "privkey.pem").read_bytes()
            certs = x509.load_pem_x509_certificates(fullchain)
            assert certs, f"{pop}: {live}/fullchain.pem is empty"
            leaf_pem = certs[0].public_bytes(serialization.Encoding.PEM)
            assert _key_matches(leaf_pem, key), f"{pop}: {live}: fullchain and privkey are from different versions"


def handshake(address: str, port: int, sni: str, cafile: Path, timeout: float = 5.0) -> x509.Certificate:
    """A verifying TLS handshake (chain to `cafile`, hostname, dates); the leaf the server presented."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((address, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def served(flab: Lab) -> dict[tuple[str, str], int]:
    """(POP, SNI) → serial presented right now (unverified handshake)."""
    return {(pop, sni): flab.served_serial(pop, sni) for pop in flab.pop_names for names in SNI.values()
            for sni in names}


def assert_every_pop_serves_live(flab: Lab, state: Path, lineages: Sequence[str] = LINEAGES) -> None:
    """Every POP presents, for every name, the store's live certificate, and it verifies against Pebble's roots."""
    live = check_store_whole(state)
    for lineage in lineages:
        assert lineage in live, f"{lineage} has no live version in the store"
        for pop in flab.pop_names:
            p = flab.pop_paths(pop)
            for sni in SNI[lineage]:
                leaf = handshake(p.address, flab.ports.https, sni, flab.pebble.roots)
                assert serial_text(leaf.serial_number) == live[lineage], (pop, sni)


def assert_every_pop_serves_a_valid_certificate(flab: Lab, bundle: Path) -> None:
    """Every POP completes a verifying handshake for every name, old (seed) or new (Pebble) certificate alike."""
    bundle.write_bytes(flab.seed_ca.read_bytes() + flab.pebble.roots.read_bytes())
    for pop in flab.pop_names:
        p = flab.pop_paths(pop)
        for names in SNI.values():
            for sni in names:
                handshake(p.address, flab.ports.https, sni, bundle)


