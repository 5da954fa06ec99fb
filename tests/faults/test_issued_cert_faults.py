"""A CA that issues the wrong thing: the ACME proxy rewrites the certificate download, certcheck refuses it.

Each case drives `certmgr run` (or `renew` / `deploy`) as a subprocess against this module's own lab. The
forged leaves keep Pebble's leaf as it is except for the one property under test, and are signed by a
"forgery" CA that the test inventory trusts, so each refusal names exactly one difference. Checked: nothing
stored, the POPs untouched, the error's words, the audit log, the chat alert, and the backoff.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import ssl
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certmgr import certcheck
from certmgr.material import CertMaterial, split_pem
from certmgr.store import Store
from lab import Lab, pki
from tests.faults.acmeproxy import ACMEProxy
from tests.faults.conftest import (
    LINEAGES,
    SNI,
    assert_every_pop_serves_live,
    audit,
    certmgr,
    check_store_whole,
    write_inventory,
)
from tests.helpers import tree_digest
from tests.receiver import Receiver

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_POPS = 2
MEDIA = "media.hachyderm.test"
APEX = "hachyderm.test"  # hachyderm.test + www.hachyderm.test
DAY = dt.timedelta(days=1)
# valid long before the forged leaves' windows (an expired leaf is checked at an instant inside its own window)
FORGERY_ROOT = pki.make_ca("certmgr forgery root", not_before=dt.datetime.now(dt.UTC) - 400 * DAY)
FORGERY = pki.make_ca("certmgr forgery intermediate", issuer=FORGERY_ROOT,
                      not_before=dt.datetime.now(dt.UTC) - 400 * DAY)

Rewrite = Callable[[bytes], bytes]


@contextlib.contextmanager
def pebble_env(flab: Lab, env: Mapping[str, str]) -> Iterator[None]:
    """Pebble restarted with `env` for the block, then back to the lab's defaults."""
    flab.restart_pebble(env=env)
    try:
        yield
    finally:
        flab.restart_pebble()


def reissued(pem: bytes, *, names: list[str] | None = None, key: ec.EllipticCurvePrivateKey | None = None,
             not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> bytes:
    """Pebble's leaf re-signed by the (trusted) forgery CA with one property changed; chain = the forgery CA."""
    real = x509.load_pem_x509_certificate(split_pem(pem)[0])
    sans = names if names is not None else real.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(FORGERY.cert.subject)
            .public_key(key.public_key() if key else real.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or real.not_valid_before_utc)
            .not_valid_after(not_after or real.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(FORGERY.key.public_key()),
                           critical=False)
            .sign(FORGERY.key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + FORGERY.cert_pem


def impostor_of(real: x509.Certificate) -> bytes:
    """A CA certificate with `real`'s subject but another key, issued by the forgery root (which is trusted)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(FORGERY_ROOT.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(FORGERY_ROOT.key.public_key()),
                           critical=False)
            .sign(FORGERY_ROOT.key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def chain_not_signing(pem: bytes) -> bytes:
    """Pebble's own leaf, its intermediate swapped for an impostor of the same name."""
    certs = split_pem(pem)
    return certs[0] + impostor_of(x509.load_pem_x509_certificate(certs[1]))


def stamp(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M}Z"


NOW = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
EXPIRED_AT = NOW - DAY
STARTS_AT = NOW + 3 * DAY
# id: (lineage, rewrite of that lineage's download, the difference named)
FAULTS: dict[str, tuple[str, Rewrite, str]] = {
    "wrong-names": (MEDIA, lambda pem: reissued(pem, names=["other.hachyderm.test"]),
                    f"SANs differ: missing {MEDIA}, extra other.hachyderm.test"),
    "missing-san": (APEX, lambda pem: reissued(pem, names=[APEX]), "SANs differ: missing www.hachyderm.test"),
    "expired": (MEDIA, lambda pem: reissued(pem, not_before=EXPIRED_AT - 90 * DAY, not_after=EXPIRED_AT),
                f"expired: notAfter {stamp(EXPIRED_AT)} was 1d ago"),
    "not-yet-valid": (MEDIA, lambda pem: reissued(pem, not_before=STARTS_AT, not_after=STARTS_AT + 90 * DAY),
                      f"not yet valid: notBefore {stamp(STARTS_AT)} is 3d ahead (more than the 1h of clock skew "
                      "tolerated)"),
    "another-key": (MEDIA, lambda pem: reissued(pem, key=OTHER_KEY),
                    "key differs: the leaf certifies another key, not the one the CSR was made with"),
}


def forging_inventory(flab: Lab, proxy: ACMEProxy, tmp_path: Path, cert_extra: dict[str, str] | None = None) -> Path:
    """The lab inventory through the proxy, trusting the forgery root too (so only the fault under test differs)."""
    root = tmp_path / "forgery-root.pem"
    root.write_bytes(FORGERY_ROOT.cert_pem)
    inv = write_inventory(flab, proxy, tmp_path / "domains.toml", cert_extra=cert_extra)
    inv.write_text(inv.read_text().replace("trust = [", f'trust = ["{root}", ', 1))
    return inv


def rewrite_for(proxy: ACMEProxy, lineage: str, fn: Rewrite, *, alternate_only: bool = False) -> None:
    """Pass `lineage`'s certificate downloads (with `alternate_only`, only its alternate chains) through `fn`."""
    ident = SNI[lineage][0]

    def rewrite(path: str, pem: bytes) -> bytes:
        if ident not in proxy.idents_of(path) or (alternate_only and "/alternate/" not in path):
            return pem
        return fn(pem)

    proxy.rewrite_certificate(rewrite)


def assert_refused_and_backed_off(flab: Lab, proxy: ACMEProxy, chat: Receiver, inv: Path, state: Path,
                                  lineage: str, why: str) -> None:
    """One `run`: `lineage` refused (nothing stored, POPs keep the seed, audit, chat); the others go live;
    the next run backs off without a new order."""
    pops_before = {pop: tree_digest(flab.pop_paths(pop).cert_root / "live" / lineage) for pop in flab.pop_names}
    res = certmgr(inv, state, "run", "--json")
    assert res.returncode == 2, res.stdout + res.stderr
    report = json.loads(res.stdout)
    [row] = [r for r in report["renewals"] if r["name"] == lineage]
    error = f"renew {lineage}: issued certificate refused: {why} (nothing stored)"
    assert (row["status"], row["error"], row["hint"], row["retryable"]) == ("failed", error, certcheck.HINT, False)
    others = [n for n in LINEAGES if n != lineage]
    assert_every_pop_serves_live(flab, state, others)
    assert lineage not in check_store_whole(state)
    assert not (state / "archive" / lineage).exists() and not (state / "live" / lineage).is_symlink()
    for pop in flab.pop_names:
        assert tree_digest(flab.pop_paths(pop).cert_root / "live" / lineage) == pops_before[pop]
        for sni in SNI[lineage]:
            assert flab.served_serial(pop, sni) == flab.seed_serial(lineage)
    [refused] = [e for e in audit(state) if e["action"] == "certificate refused"]
    assert (refused["object"], refused["problems"]) == (lineage, [why])
    [failed] = [e for e in audit(state) if e["action"] == "renew failed"]
    assert (failed["object"], failed["error"], failed["failures"]) == (lineage, error, 1)
    alerts = [r.json for r in chat.requests if r.json.get("kind") == "failure"]
    assert [a["title"] for a in alerts] == [f"FAILED renewal of {lineage}"]
    assert why in "\n".join(alerts[0]["lines"])
    renew_state = json.loads((state / "state" / "renew" / f"{lineage}.json").read_text())
    assert renew_state["failures"] == 1

    orders = proxy.created("new-order", SNI[lineage][0])
    again = certmgr(inv, state, "run")
    assert proxy.created("new-order", SNI[lineage][0]) == orders, "backoff: no new order right after a refusal"
    assert f"backoff  {lineage}" in again.stdout, again.stdout


@pytest.mark.parametrize("fault", list(FAULTS))
def test_issued_certificate_that_differs_is_refused(fresh: Lab, proxy: ACMEProxy, chat: Receiver, tmp_path: Path,
                                                    fault: str) -> None:
    """A certificate for other names, missing a SAN, expired, not yet valid or for another key is refused
    before it is stored: the error names the difference, audited, alerted, backed off; the others renew."""
    lineage, fn, why = FAULTS[fault]
    inv = forging_inventory(fresh, proxy, tmp_path)
    rewrite_for(proxy, lineage, fn)
    assert_refused_and_backed_off(fresh, proxy, chat, inv, tmp_path / "state", lineage, why)


def test_chain_that_does_not_sign_the_leaf_is_refused(fresh: Lab, proxy: ACMEProxy, chat: Receiver,
                                                      tmp_path: Path) -> None:
    """Pebble's leaf served with an impostor intermediate (same name, trusted root, another key) is refused."""
    inv = forging_inventory(fresh, proxy, tmp_path)
    issuer: list[str] = []

    def swap(pem: bytes) -> bytes:
        issuer.append(x509.load_pem_x509_certificate(split_pem(pem)[0]).issuer.rfc4514_string())
        return chain_not_signing(pem)

    rewrite_for(proxy, MEDIA, swap)
    state = tmp_path / "state"
    # the leaf's issuer (Pebble's intermediate, a fresh name per Pebble start) is only known once downloaded:
    # run, then check the words
    res = certmgr(inv, state, "renew", MEDIA, "--json", "--no-deploy")
    assert res.returncode == 1, res.stdout + res.stderr
    [row] = json.loads(res.stdout)
    assert row["error"] == (f"renew {MEDIA}: issued certificate refused: chain does not verify to a trusted root: "
                            f"the chain does not sign the leaf: {issuer[0]} in the chain has another key "
                            "(candidates exhausted: signature does not match) (nothing stored)")
    assert not (state / "archive" / MEDIA).exists()
    why = row["error"].split("issued certificate refused: ", 1)[1].removesuffix(" (nothing stored)")
    [refused] = [e for e in audit(state) if e["action"] == "certificate refused"]
    assert refused["problems"] == [why]
    assert json.loads((state / "state" / "renew" / f"{MEDIA}.json").read_text())["failures"] == 1
    # and through `run` (chat, POPs, backoff), on a fresh state
    chat.clear()
    assert_refused_and_backed_off(fresh, proxy, chat, inv, tmp_path / "state2", MEDIA, why)


def _root_cn(flab: Lab, index: int) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(flab.https_ca))
    url = f"https://127.0.0.1:{flab.ports.management}/roots/{index}"
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return x509.load_pem_x509_certificate(resp.read())


def test_alternate_chain_without_the_preferred_issuer_is_refused(fresh: Lab, proxy: ACMEProxy, chat: Receiver,
                                                                 tmp_path: Path) -> None:
    """An alternate chain that names the preferred root at its top (an impostor) but leads to the default root
    is refused: "verifies only to" the other root; nothing stored; the other certificates get the real one."""
    with pebble_env(fresh, {"PEBBLE_ALTERNATE_ROOTS": "1"}):
        default, preferred = _root_cn(fresh, 0), _root_cn(fresh, 1)
        cn = preferred.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        default_cn = default.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        inters = x509.load_pem_x509_certificates(fresh.pebble.intermediates.read_bytes())
        [to_default] = [i for i in inters if i.issuer == default.subject]
        fake = pki.make_ca("x")  # self-signed, then renamed: an impostor carrying the preferred root's name
        impostor = (x509.CertificateBuilder().subject_name(preferred.subject).issuer_name(preferred.subject)
                    .public_key(fake.key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(fake.key, hashes.SHA256()))

        def misleading(pem: bytes) -> bytes:
            return split_pem(pem)[0] + b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                for c in (to_default, impostor))

        inv = forging_inventory(fresh, proxy, tmp_path, cert_extra={"preferred_chain": json.dumps(cn)})
        rewrite_for(proxy, MEDIA, misleading, alternate_only=True)
        why = f"preferred chain {cn!r}: the chain names it at its top but verifies only to {default_cn}"
        assert_refused_and_backed_off(fresh, proxy, chat, inv, tmp_path / "state", MEDIA, why)
        for lineage in LINEAGES:
            if lineage != MEDIA:
                top = x509.load_pem_x509_certificates((tmp_path / "state" / "live" / lineage / "chain.pem")
                                                      .read_bytes())[-1]
                assert top.issuer == preferred.subject, "the real alternate is accepted"


def test_refused_renewal_leaves_the_stored_version_untouched(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """With a good version live, a forced renewal that gets an expired certificate changes nothing in archive/ or
    live/ (same tree digest, same live serial) and exits 1."""
    inv = forging_inventory(fresh, proxy, tmp_path)
    state = tmp_path / "state"
    good = certmgr(inv, state, "renew", MEDIA, "--no-deploy")
    assert good.returncode == 0, good.stdout + good.stderr
    before = (tree_digest(state / "archive"), tree_digest(state / "live"), check_store_whole(state)[MEDIA])
    rewrite_for(proxy, MEDIA, FAULTS["expired"][1])
    res = certmgr(inv, state, "renew", MEDIA, "--force", "--no-deploy")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"FAILED   {MEDIA}: renew {MEDIA}: issued certificate refused: {FAULTS['expired'][2]} (nothing stored)" \
        in res.stdout
    assert (tree_digest(state / "archive"), tree_digest(state / "live"), check_store_whole(state)[MEDIA]) == before


def test_deploy_refuses_a_stored_version_that_fails_the_checks(fresh: Lab, proxy: ACMEProxy, tmp_path: Path) -> None:
    """A live version in the store that has since expired (put there by hand) is uploaded to no POP: every POP
    FAILED "version N refused: expired …", POP files unchanged, nothing audited as deployed."""
    inv = forging_inventory(fresh, proxy, tmp_path)
    state = tmp_path / "state"
    good = certmgr(inv, state, "renew", MEDIA, "--no-deploy")
    assert good.returncode == 0, good.stdout + good.stderr
    store = Store(state)
    live = store.read(MEDIA)
    expired = reissued(live.fullchain, not_before=EXPIRED_AT - 90 * DAY, not_after=EXPIRED_AT)
    with store.lock("test"):
        version = store.add_version(MEDIA, CertMaterial.from_fullchain(expired, live.privkey))
        store.activate(MEDIA, version)
    pops_before = {pop: tree_digest(fresh.pop_paths(pop).cert_root) for pop in fresh.pop_names}
    res = certmgr(inv, state, "deploy", MEDIA, "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = json.loads(res.stdout)
    assert sorted(r["host"] for r in rows) == sorted(fresh.pop_names)
    for r in rows:
        assert r["status"] == "failed"
        assert r["error"] == (f"deploy {MEDIA} → {r['host']}: version {version} refused: "
                              f"{FAULTS['expired'][2]} (nothing uploaded)")
    assert {pop: tree_digest(fresh.pop_paths(pop).cert_root) for pop in fresh.pop_names} == pops_before
    assert not [e for e in audit(state) if e["action"] == "deployed"]
