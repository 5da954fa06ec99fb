"""issue/keys: ARI cert IDs, `replaces` on the wire, Retry-After, chain choice, profiles, keys and CSRs."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from acme import client as acme_client
from acme import messages
from cryptography import x509

from certmgr import keys
from certmgr.errors import ACMEError
from certmgr.inventory import CA, Certificate
from certmgr.issue import ACMEClient, _NewOrder, account_id, ari_cert_id, choose_chain, parse_retry_after
from lab.pki import make_ca, make_leaf

NOW = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)


def test_ari_cert_id_matches_the_acme_library() -> None:
    """Our RFC 9773 certID equals the acme library's own encoding (AKI.serial, base64url, unpadded)."""
    root = make_ca("ari root")
    leaf = make_leaf(root, ["media.hachyderm.test"])
    assert ari_cert_id(leaf.cert) == acme_client._renewal_info_path_component(leaf.cert)
    assert "=" not in ari_cert_id(leaf.cert)


def test_new_order_carries_replaces_and_profile() -> None:
    """The extended newOrder serialises `replaces` and `profile`, and omits them when unset."""
    idents = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="media.hachyderm.test")]
    full = _NewOrder(identifiers=idents, profile="shortlived", replaces="abc.def").to_partial_json()
    assert full["replaces"] == "abc.def" and full["profile"] == "shortlived"
    bare = _NewOrder(identifiers=idents, profile=None, replaces=None).to_partial_json()
    assert "replaces" not in bare and "profile" not in bare


@pytest.mark.parametrize(("value", "expected"), [
    ("120", NOW + dt.timedelta(seconds=120)),
    ("Fri, 27 Nov 2026 11:00:00 GMT", dt.datetime(2026, 11, 27, 11, 0, tzinfo=dt.UTC)),
    (None, None),
    ("", None),
    ("soon", None),
])
def test_retry_after_forms(value: str | None, expected: dt.datetime | None) -> None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 §10.2.3); anything else is ignored."""
    assert parse_retry_after(value, NOW) == expected


def test_preferred_chain_is_chosen_by_top_issuer_cn() -> None:
    """The alternate chain whose topmost certificate is issued by the preferred CN wins; else the default."""
    from cryptography.hazmat.primitives import serialization

    def pem(c: x509.Certificate) -> str:
        return c.public_bytes(serialization.Encoding.PEM).decode()

    root_a, root_b = make_ca("Root A"), make_ca("Root B")
    inter_a, inter_b = make_ca("Inter A", issuer=root_a), make_ca("Inter B", issuer=root_b)
    leaf = make_leaf(inter_a, ["x.hachyderm.test"])
    chain_a = pem(leaf.cert) + pem(inter_a.cert)
    chain_b = pem(leaf.cert) + pem(inter_b.cert)
    assert choose_chain([chain_a, chain_b], "Root B") == (chain_b, None)
    assert choose_chain([chain_a, chain_b], None) == (chain_a, None)
    chosen, note = choose_chain([chain_a, chain_b], "Root C")
    assert chosen == chain_a and note == "preferred chain 'Root C' not offered by the CA (2 chain(s)); kept the default"


def _client(profiles: dict[str, str] | None) -> ACMEClient:
    body: dict[str, object] = {"newNonce": "https://ca/n", "newAccount": "https://ca/a", "newOrder": "https://ca/o"}
    if profiles is not None:
        body["meta"] = {"profiles": profiles}
    directory = messages.Directory.from_json(body)
    ca = CA(name="pebble", directory="https://ca/dir")
    return ACMEClient(ca, directory, None, None, executor=ThreadPoolExecutor(1), timeouts=None)  # type: ignore[arg-type]


def cert(profile: str | None) -> Certificate:
    return Certificate(name="media", domains=("media.hachyderm.test",), dns="lab", hosts=(), ca="pebble",
                       profile=profile)


@pytest.mark.parametrize(("profiles", "profile", "message"), [
    (None, "shortlived", "acme order media: profile 'shortlived' requested but CA pebble offers no profiles "
                         "(order not placed)"),
    ({"classic": "", "tlsserver": ""}, "shortlived", "acme order media: CA pebble has no profile 'shortlived'; it "
                                                     "offers classic, tlsserver (order not placed)"),
])
def test_unknown_profile_is_a_clear_error(profiles: dict[str, str] | None, profile: str, message: str) -> None:
    """A profile the directory's meta.profiles does not list fails before any order, naming what is offered."""
    with pytest.raises(ACMEError) as err:
        _client(profiles).check_profile(cert(profile))
    assert str(err.value) == message and not err.value.retryable


def test_known_or_no_profile_passes() -> None:
    """A listed profile, or none at all, is accepted."""
    _client({"shortlived": "6 days"}).check_profile(cert("shortlived"))
    _client(None).check_profile(cert(None))


def test_account_id_changes_with_contact() -> None:
    """One account per CA directory and contact set: a new contact means a new account id."""
    a = CA(name="pebble", directory="https://ca/dir", contact=("mailto:a@x",))
    b = CA(name="pebble", directory="https://ca/dir", contact=("mailto:b@x",))
    assert account_id(a) != account_id(b) and account_id(a).startswith("pebble-")
    assert account_id(a) == account_id(CA(name="pebble", directory="https://ca/dir", contact=("mailto:a@x",)))


@pytest.mark.parametrize("key_type", keys.KEY_TYPES)
def test_keys_and_csr(key_type: str) -> None:
    """Every key type generates, round-trips through PEM, and signs a CSR listing every name in the SAN."""
    key = keys.generate(key_type)
    assert keys.key_type(keys.from_pem(keys.to_pem(key))) == key_type
    csr = x509.load_pem_x509_csr(keys.csr(key, ("hachyderm.test", "*.hachyderm.test")))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hachyderm.test", "*.hachyderm.test"]


def test_unknown_key_type() -> None:
    """An unknown key type is refused with the list of known ones."""
    with pytest.raises(keys.KeyMaterialError, match="unknown key type 'dsa'"):
        keys.generate("dsa")


def test_missing_ca_trust_file_is_named_before_any_request(tmp_path: Path) -> None:
    """A `[ca.X] trust` bundle that cannot be read is a LocalFileError naming the key and path, not a traceback."""
    import asyncio

    from certmgr.errors import LocalFileError, SecretError
    from certmgr.issue import Timeouts, ca_trust

    missing = tmp_path / "nope.pem"
    ca = CA(name="pebble", directory="https://127.0.0.1:1/dir", trust=missing)
    with pytest.raises(LocalFileError) as info:
        asyncio.run(ACMEClient.open(ca, executor=ThreadPoolExecutor(1), timeouts=Timeouts()))
    assert str(info.value) == (f"acme directory pebble: [ca.pebble] trust {missing}: cannot read: "
                               "No such file or directory (nothing ordered)")
    assert info.value.hint == ("fix trust in [ca.pebble] (a PEM bundle for the CA's own TLS), "
                               "or remove it to use the system roots")
    assert isinstance(info.value, SecretError)  # renew treats it as local configuration: no backoff
    missing.write_text("")
    assert ca_trust(ca) == str(missing) and ca_trust(CA(name="x", directory="https://127.0.0.1:1/")) is True
