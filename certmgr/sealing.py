"""Private keys at rest in a shared database: AES-256-GCM, bound to where they are stored.

Each ciphertext's associated data names its table, row name and version, so a row copied over
another (a swapped key) fails to open; the key id travels with the row so keys can be rotated.
The key file (a systemd credential) holds one `KEYID BASE64-32-BYTES` per line; the first line
seals, every line opens. See docs/ha.md, "The store key".
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from certmgr.errors import SecretError, StoreError

_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_NONCE = 12  # NIST SP 800-38D §8.2.2: 96-bit random nonces


def _aad(table: str, name: str, version: int, key_id: str) -> bytes:
    return f"certmgr-seal-1|{table}|{name}|{version}|{key_id}".encode()


class Sealer:
    """Seals and opens private keys; `repr` never shows a key."""

    __slots__ = ("_current", "_keys")

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"current key id {current!r} is not among the keys")
        for kid, key in keys.items():
            if not _KEY_ID.fullmatch(kid) or len(key) != 32:
                raise ValueError(f"key {kid!r}: ids are [A-Za-z0-9._-], keys 32 bytes")
        self._keys = dict(keys)
        self._current = current

    def __repr__(self) -> str:
        return f"Sealer(current={self._current!r}, ids={sorted(self._keys)!r})"

    @property
    def current(self) -> str:
        return self._current

    @classmethod
    def from_text(cls, text: str, *, where: str) -> Sealer:
        """Parse a key file: `KEYID BASE64` per line (32 bytes each), blank lines and `#` comments ignored."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not _KEY_ID.fullmatch(parts[0]):
                raise SecretError(f"{where}: line {lineno} is not `KEYID BASE64-KEY`",
                                  hint="make one with `certmgr store keygen KEYID`")
            try:
                key = base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32:
                raise SecretError(f"{where}: line {lineno}: key {parts[0]!r} is not 32 bytes of base64",
                                  hint="make one with `certmgr store keygen KEYID`")
            if parts[0] in keys:
                raise SecretError(f"{where}: line {lineno}: key id {parts[0]!r} appears twice")
            keys[parts[0]] = key
            order.append(parts[0])
        if not order:
            raise SecretError(f"{where}: no key", hint="make one with `certmgr store keygen KEYID`")
        return cls(keys, order[0])

    @staticmethod
    def keygen(key_id: str) -> str:
        """A new key file line for `key_id` (32 random bytes)."""
        if not _KEY_ID.fullmatch(key_id):
            raise SecretError(f"store keygen: {key_id!r} is not a key id ([A-Za-z0-9._-], up to 32)")
        return f"{key_id} {base64.b64encode(os.urandom(32)).decode()}\n"

    def seal(self, plaintext: bytes, *, table: str, name: str, version: int) -> tuple[str, bytes]:
        """(key id, nonce ‖ ciphertext ‖ tag) of `plaintext`, bound to table/name/version."""
        nonce = os.urandom(_NONCE)
        kid = self._current
        return kid, nonce + AESGCM(self._keys[kid]).encrypt(nonce, plaintext, _aad(table, name, version, kid))

    def open(self, key_id: str, blob: bytes, *, table: str, name: str, version: int) -> bytes:
        """The plaintext; StoreError when the key id is unknown or the row was altered or moved."""
        key = self._keys.get(key_id)
        if key is None:
            raise StoreError(f"store {table} {name} v{version}: sealed with key {key_id!r}, which the key file lacks",
                             hint="add that key's line back to the store key credential (rotation keeps old lines)")
        try:
            return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(table, name, version, key_id))
        except InvalidTag:
            raise StoreError(f"store {table} {name} v{version}: sealed private key does not open "
                             "(altered, or copied from another row)",
                             hint="restore the row from a backup; never copy key rows between names") from None
