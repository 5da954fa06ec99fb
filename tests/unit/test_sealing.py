"""certmgr.sealing: AES-256-GCM sealing of private keys, bound to table/name/version/key id, with rotation."""

from __future__ import annotations

import base64

import pytest

from certmgr.errors import SecretError, StoreError
from certmgr.sealing import Sealer

K1, K2 = bytes(range(32)), bytes(range(1, 33))
LINE1 = f"k1 {base64.b64encode(K1).decode()}"
LINE2 = f"k2 {base64.b64encode(K2).decode()}"


def test_round_trip_and_binding() -> None:
    """A sealed key opens at its own place only: another name, version or table fails as altered or moved."""
    s = Sealer({"k1": K1}, "k1")
    kid, blob = s.seal(b"secret", table="versions", name="a.test", version=3)
    assert kid == "k1" and b"secret" not in blob
    assert s.open(kid, blob, table="versions", name="a.test", version=3) == b"secret"
    for where in ({"table": "accounts", "name": "a.test", "version": 3},
                  {"table": "versions", "name": "b.test", "version": 3},
                  {"table": "versions", "name": "a.test", "version": 4}):
        with pytest.raises(StoreError, match=r"sealed private key does not open \(altered, or copied from another row\)$"):
            s.open(kid, blob, **where)


def test_rotation_seals_with_the_first_line_and_opens_with_any() -> None:
    """With two key lines the first seals; rows sealed with the older key still open."""
    old = Sealer.from_text(LINE2, where="store.key_file")
    kid, blob = old.seal(b"x", table="versions", name="n", version=1)
    both = Sealer.from_text(f"# rotated\n{LINE1}\n{LINE2}\n", where="store.key_file")
    assert both.current == "k1"
    assert both.open(kid, blob, table="versions", name="n", version=1) == b"x"
    assert both.seal(b"y", table="versions", name="n", version=2)[0] == "k1"


def test_an_unknown_key_id_names_it() -> None:
    """A row sealed with a key the file no longer has fails naming the key id and how to fix it."""
    kid, blob = Sealer.from_text(LINE2, where="k").seal(b"x", table="versions", name="n", version=1)
    with pytest.raises(StoreError, match=r"^store versions n v1: sealed with key 'k2', which the key file lacks$"):
        Sealer.from_text(LINE1, where="k").open(kid, blob, table="versions", name="n", version=1)


@pytest.mark.parametrize(("text", "message"), [
    ("", "store.key_file: no key"),
    ("k1", "store.key_file: line 1 is not `KEYID BASE64-KEY`"),
    ("k1 AAAA", "store.key_file: line 1: key 'k1' is not 32 bytes of base64"),
    (f"{LINE1}\n{LINE1}", "store.key_file: line 2: key id 'k1' appears twice"),
    ("bad/id AAAA", "store.key_file: line 1 is not `KEYID BASE64-KEY`"),
])
def test_bad_key_files_are_refused(text: str, message: str) -> None:
    """A key file that is empty, malformed, short or repeats an id is refused with the line named."""
    with pytest.raises(SecretError) as err:
        Sealer.from_text(text, where="store.key_file")
    assert str(err.value) == message


def test_keygen_makes_a_line_that_parses_and_repr_hides_keys() -> None:
    """keygen's line parses back; repr shows key ids only."""
    s = Sealer.from_text(Sealer.keygen("k9"), where="k")
    assert s.current == "k9"
    assert repr(s) == "Sealer(current='k9', ids=['k9'])"
