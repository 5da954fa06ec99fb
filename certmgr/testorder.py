"""Test order: a real ACME order against the CA's staging directory — DNS-01 validated, finalized — and thrown away.

What certbot calls `--dry-run`, under its real name: it proves the account, the TSIG key, propagation
and the CA's validation end to end, without touching the production CA's rate limits. The certificate
is never stored, never made live, never deployed; renewal state and backoff are left alone. Challenge
records go through the DNS journal like any order's, so an interrupted test order is cleaned up too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from certmgr import keys
from certmgr.dns.journal import CertJournal
from certmgr.errors import CertmgrError, UsageError
from certmgr.inventory import CA, Certificate, Inventory
from certmgr.issue import Timeouts
from certmgr.log import event
from certmgr.store_api import StateStore

log = logging.getLogger(__name__)

# Production directory → its staging twin, for the CAs that publish one.
STAGING = {
    "https://acme-v02.api.letsencrypt.org/directory": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "https://dv.acme-v02.api.pki.goog/directory": "https://dv.acme-v02.test-api.pki.goog/directory",
}


def staging_directory(ca: CA, given: str | None) -> str:
    """The directory a test order goes to: `given`, else the CA's staging twin, else a UsageError (never production)."""
    if given:
        return given
    if ca.directory in STAGING.values():
        return ca.directory
    twin = STAGING.get(ca.directory)
    if twin is None:
        raise UsageError(f"test-order: no staging directory known for CA {ca.name} ({ca.directory}) (nothing ordered)",
                         hint="pass --directory URL: the CA's staging or test directory (for a private or test CA, "
                              "its own directory URL)")
    return twin


@dataclass(frozen=True, slots=True, kw_only=True)
class TestOrder:
    """How one test order went: `ok` with the certificate's serial and dates, or the error."""

    __test__ = False  # not a pytest test class

    name: str
    directory: str
    ok: bool
    serial: str | None = None
    not_after: dt.datetime | None = None
    issuer: str | None = None
    error: str | None = None
    hint: str | None = None
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        if self.ok:
            return (f"ok      {self.name}: ordered, validated (DNS-01) and issued by {self.directory}: serial "
                    f"{self.serial}, expires {self.not_after:%Y-%m-%d %H:%M}Z, issuer {self.issuer} "
                    "(discarded: nothing stored, nothing deployed)")
        return f"FAILED  {self.name}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "directory": self.directory, "ok": self.ok, "serial": self.serial,
                "not_after": self.not_after.isoformat() if self.not_after else None, "issuer": self.issuer,
                "error": self.error, "hint": self.hint, "timings": {k: round(v, 3) for k, v in self.timings.items()}}


async def test_orders(inv: Inventory, store: StateStore, certs: Sequence[Certificate], *, directory: str | None = None,
                      timeouts: Timeouts | None = None, env: Mapping[str, str] | None = None) -> list[TestOrder]:
    """One test order per certificate (one at a time: they are checks, not a fleet renewal), in the order given.

    Staging accounts are kept in the store like production ones (their id names the staging directory), so
    repeated tests do not register a new account each time. The caller holds the store lock.
    """
    from certmgr import renew as renew_mod

    targets = [(cert, dataclasses.replace(inv.cas[cert.ca], directory=staging_directory(inv.cas[cert.ca], directory)))
               for cert in certs]  # every directory resolved before anything is ordered
    run = renew_mod._Run(inv, store, concurrency=1, timeouts=timeouts or Timeouts(), env=env)
    out: list[TestOrder] = []
    try:
        await renew_mod._retry_dns_leftovers(run)  # opens the DNS journal (and clears what earlier runs left)
        for cert, ca in targets:
            out.append(await _one(run, cert, ca))
    finally:
        run.close()
    return out


async def _one(run: Any, cert: Certificate, ca: CA) -> TestOrder:
    loop = asyncio.get_running_loop()
    try:
        providers, errors = run.providers()
        if cert.dns in errors:
            raise errors[cert.dns]
        client = await run.client(ca)
        await client.ensure_account(run.store, env=run.env)
        key = await loop.run_in_executor(run.executor, keys.generate, cert.key_type)
        journal = CertJournal(run.journal, cert.name) if run.journal is not None else None
        issued = await client.issue(cert, key, inventory=run.inventory, providers=providers, journal=journal)
        info = issued.material.info()
        if sorted(info.names) != sorted(cert.domains):
            raise CertmgrError(f"test-order {cert.name}: the CA issued {', '.join(info.names)}, not "
                               f"{', '.join(cert.domains)} (discarded)")
    except CertmgrError as exc:
        event(log, logging.WARNING, "test order failed", cert=cert.name, directory=ca.directory, error=exc.message)
        _audit(run.store, cert.name, ca.directory, ok=False, error=exc.message)
        return TestOrder(name=cert.name, directory=ca.directory, ok=False, error=exc.message, hint=exc.hint)
    _audit(run.store, cert.name, ca.directory, ok=True, serial=info.serial)
    event(log, logging.INFO, "test order issued", cert=cert.name, directory=ca.directory, serial=info.serial)
    return TestOrder(name=cert.name, directory=ca.directory, ok=True, serial=info.serial, not_after=info.not_after,
                     issuer=info.issuer, timings=dict(issued.timings))


def _audit(store: StateStore, name: str, directory: str, **kw: Any) -> None:
    try:
        store.audit("test order", name, directory=directory, **kw)
    except CertmgrError as exc:
        event(log, logging.ERROR, "audit line lost", action="test order", cert=name, error=str(exc))
