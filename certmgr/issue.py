"""ACME (RFC 8555) issuance with DNS-01: account, order, challenges through `dns/`, finalize; RFC 9773 ARI.

The only module touching `acme`/`josepy`, which is synchronous: each call runs in a private thread pool (one
`ClientNetwork` per order); waiting, polling and retrying stay on the event loop, under bounded deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import josepy as jose
import requests
from acme import challenges, errors, messages
from acme.client import ClientV2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import json_util

from certmgr import __version__, keys
from certmgr.acmecall import ERR, parse_retry_after, shown
from certmgr.acmecall import Net as _Net
from certmgr.acmecall import Timeouts as Timeouts  # re-exported: callers import it from here
from certmgr.acmecall import retrying as _retrying
from certmgr.acmecall import short_type as _short
from certmgr.dns import Provider, TXTRecord, ZoneUpdate, first_error, locate, run_all
from certmgr.dns.journal import CertJournal, Key
from certmgr.errors import ACMEError, CertmgrError, ChallengeInvalid, LocalFileError
from certmgr.inventory import CA, Certificate, Inventory
from certmgr.log import Secret, event
from certmgr.material import CertMaterial, split_pem

log = logging.getLogger(__name__)
T = TypeVar("T")

# RFC 8555 §8.1: a token "MUST NOT contain any characters outside the base64url alphabet"
# (and carries at least 128 bits of entropy, so at least 22 characters).
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewalInfo:
    """RFC 9773 §4.2: the CA's suggested renewal window for one certificate, and when to ask again."""

    start: dt.datetime
    end: dt.datetime
    retry_after: dt.datetime
    explanation_url: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Issued:
    """A certificate fresh from the CA, with what happened on the way."""

    material: CertMaterial
    replaced: str | None = None  # the ARI certID sent as `replaces`, when the CA took it
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)


class OrderLog(Protocol):
    """Told about a new order before and after the CA hears of it (certmgr.orders keeps it for a later run)."""

    def placing(self, csr_pem: bytes) -> None: ...

    def placed(self, url: str) -> None: ...


class AccountStore(Protocol):
    def load_account_key(self, ca_id: str) -> bytes | None: ...

    def save_account_key(self, ca_id: str, pem: bytes) -> Any: ...

    def audit(self, action: str, obj: str, **kw: Any) -> None: ...


class _NewOrder(messages.NewOrder):
    """newOrder with RFC 9773 §5 `replaces`, which the acme library cannot send."""

    replaces: str | None = json_util.field("replaces", omitempty=True)


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER serial bytes), unpadded."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise ValueError("certificate has no authority key identifier")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    return f"{b64(aki)}.{b64(serial_bytes)}"


def account_id(ca: CA) -> str:
    """One account per CA directory and contact set: `NAME-<hash>`, so a changed contact registers anew."""
    h = hashlib.sha256("\n".join([ca.directory, *sorted(ca.contact)]).encode()).hexdigest()[:10]
    return f"{ca.name}-{h}"


def choose_chain(fullchains: Sequence[str], preferred_issuer: str | None) -> tuple[str, str | None]:
    """The fullchain whose topmost certificate's issuer CN is `preferred_issuer` (else the default, first)."""
    if not preferred_issuer:
        return fullchains[0], None
    for chain in fullchains:
        certs = split_pem(chain.encode())
        if not certs:
            continue
        top = x509.load_pem_x509_certificate(certs[-1])
        cns = [a.value for a in top.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if preferred_issuer in cns:
            return chain, None
    return fullchains[0], (f"preferred chain {preferred_issuer!r} not offered by the CA "
                           f"({len(fullchains)} chain(s)); kept the default")


def ca_trust(ca: CA) -> str | bool:
    """requests' `verify` for the ACME endpoint's own TLS: `[ca.X] trust`, else the system roots; never off.

    requests only says "invalid path" deep inside a call (a traceback); a bundle that cannot be read is
    named here, before anything is sent.
    """
    if ca.trust is None:
        return True
    try:
        with open(ca.trust, "rb"):
            pass
    except OSError as exc:
        raise LocalFileError(f"acme directory {ca.name}: [ca.{ca.name}] trust {ca.trust}: cannot read: "
                             f"{exc.strerror} (nothing ordered)",
                             hint=f"fix trust in [ca.{ca.name}] (a PEM bundle for the CA's own TLS), "
                                  "or remove it to use the system roots") from exc
    return str(ca.trust)


class ACMEClient:
    """One CA for one run: its directory and account, shared by many concurrent orders."""

    def __init__(self, ca: CA, directory: messages.Directory, account_key: jose.jwk.JWK | None,
                 regr: messages.RegistrationResource | None, *, executor: ThreadPoolExecutor,
                 timeouts: Timeouts) -> None:
        self.ca = ca
        self.directory = directory
        self.account_key = account_key
        self.regr = regr
        self.executor = executor
        self.timeouts = timeouts
        self._account_lock = asyncio.Lock()
        self._account_error: CertmgrError | None = None

    # ------------------------------------------------------------ plumbing

    def _verify(self) -> Any:  # requests takes a CA bundle path where acme's signature says bool
        return ca_trust(self.ca)

    def _net(self, *, account: bool = True) -> _Net:
        net = _Net(self.account_key, account=self.regr if account else None, alg=jose.jwa.ES256,
                   verify_ssl=self._verify(), user_agent=f"certmgr/{__version__}",
                   timeout=int(self.timeouts.http))
        return net

    @staticmethod
    async def _fetch_directory(ca: CA, executor: ThreadPoolExecutor, timeouts: Timeouts) -> messages.Directory:
        verify: Any = ca_trust(ca)
        net = _Net(None, verify_ssl=verify, user_agent=f"certmgr/{__version__}",
                   timeout=int(timeouts.http))
        step = f"acme directory {ca.name}"
        try:
            return await _retrying(step, net, executor, timeouts, ClientV2.get_directory, ca.directory, net,
                                   outcome="nothing ordered")
        finally:
            net.session.close()

    async def call(self, net: _Net, step: str, fn: Callable[..., T], *args: Any, outcome: str) -> T:
        return await _retrying(step, net, self.executor, self.timeouts, fn, *args, outcome=outcome)

    # ------------------------------------------------------------ account

    @classmethod
    async def open(cls, ca: CA, *, executor: ThreadPoolExecutor, timeouts: Timeouts | None = None) -> ACMEClient:
        """Fetch the directory; no account yet (`ensure_account` before ordering)."""
        timeouts = timeouts or Timeouts()
        directory = await cls._fetch_directory(ca, executor, timeouts)
        return cls(ca, directory, None, None, executor=executor, timeouts=timeouts)

    async def ensure_account(self, accounts: AccountStore, *, env: Mapping[str, str] | None = None) -> None:
        """Find (or register, once) the account whose key the store keeps; concurrent callers share one."""
        async with self._account_lock:
            if self.regr is not None:
                return
            if self._account_error is not None:  # one failed registration per run, not one per certificate
                raise self._account_error
            try:
                await self._ensure_account(accounts, env=env)
            except CertmgrError as exc:
                self._account_error = exc
                raise

    async def _ensure_account(self, accounts: AccountStore, *, env: Mapping[str, str] | None) -> None:
        ca_id = account_id(self.ca)
        pem = accounts.load_account_key(ca_id)
        key = ec.generate_private_key(ec.SECP256R1()) if pem is None else keys.from_pem(pem)
        self.account_key = jose.jwk.JWKEC(key=key)
        registered = await self._account(new=pem is None, env=env)
        if registered and self.regr is not None:  # first: the account exists at the CA even if saving fails
            accounts.audit("account registered", self.ca.name, to=self.regr.uri, directory=self.ca.directory,
                           contact=list(self.ca.contact), eab=bool(self.ca.eab_kid), key=f"accounts/{ca_id}",
                           new_key=pem is None)
        if pem is None:
            # saved only once the CA accepted it: a failed registration leaves no orphan key
            accounts.save_account_key(ca_id, keys.to_pem(key))

    async def _account(self, *, new: bool, env: Mapping[str, str] | None) -> bool:
        """Find the account of `self.account_key` at the CA, or register it; True when registered now."""
        ca = self.ca
        if not new:
            found = await self.find_account()
            if found is not None:
                self.regr = found
                event(log, logging.DEBUG, "acme account found", ca=ca.name, uri=found.uri)
                return False
            event(log, logging.INFO, "acme account unknown to the CA, registering the stored key again", ca=ca.name)
        net = self._net(account=False)
        client = ClientV2(self.directory, net)
        step = f"acme account {ca.name}"
        try:
            tos = self.directory.meta.terms_of_service if hasattr(self.directory, "meta") else None
            if not ca.agree_tos:
                raise ACMEError(
                    f"{step}: the CA's terms of service{f' ({tos})' if tos else ''} are not agreed (no account "
                    "registered)", hint=f"read them, then set agree_tos = true in [ca.{ca.name}]", retryable=False)
            kwargs: dict[str, Any] = {"terms_of_service_agreed": True}
            if ca.contact:
                kwargs["contact"] = tuple(ca.contact)
            if ca.eab_kid:
                if ca.eab_hmac_key is None:
                    raise ACMEError(f"{step}: eab_kid is set but no eab_hmac_key_* (no account registered)",
                                    retryable=False)
                hmac = Secret(ca.eab_hmac_key.read(env))
                assert self.account_key is not None
                kwargs["external_account_binding"] = messages.ExternalAccountBinding.from_data(
                    account_public_key=self.account_key.public_key(), kid=ca.eab_kid, hmac_key=hmac.reveal(),
                    directory=self.directory)
            elif self.directory.meta.external_account_required:
                raise ACMEError(f"{step}: the CA requires External Account Binding (no account registered)",
                                hint=f"set eab_kid and eab_hmac_key_file in [ca.{ca.name}]", retryable=False)
            reg = messages.NewRegistration(**kwargs)
            try:
                regr = await self.call(net, step, client.new_account, reg, outcome="no account registered")
            except errors.ConflictError as exc:  # the key already has an account: RFC 8555 §7.3.1 returns it
                regr = messages.RegistrationResource(body=reg, uri=str(exc))
            self.regr = regr
            event(log, logging.INFO, "acme account registered", ca=ca.name, uri=regr.uri)
            return True
        finally:
            net.session.close()

    async def find_account(self) -> messages.RegistrationResource | None:
        """The account of `self.account_key` at the CA, or None when the CA does not know the key.

        RFC 8555 §7.3.1: newAccount with onlyReturnExisting looks the account up and never creates
        one (signed with the key itself, like a registration). Other errors raise ACMEError.
        """
        net = self._net(account=False)
        try:
            probe = messages.NewRegistration(only_return_existing=True)
            resp = await self.call(net, f"acme account {self.ca.name}", ClientV2(self.directory, net)._post,
                                   self.directory["newAccount"], probe, outcome="nothing registered")
        except ACMEError as exc:
            if exc.typ == ERR + "accountDoesNotExist":
                return None
            raise
        finally:
            net.session.close()
        body = resp.json() if resp.content else {}
        return messages.RegistrationResource(body=messages.Registration.from_json(body),
                                             uri=resp.headers.get("Location"))

    # ------------------------------------------------------------ directory facts

    @property
    def has_ari(self) -> bool:
        return "renewalInfo" in self.directory.to_partial_json()

    @property
    def profiles(self) -> dict[str, str] | None:
        meta = getattr(self.directory, "meta", None)
        return dict(meta.profiles) if meta is not None and meta.profiles else None

    def check_profile(self, cert: Certificate) -> None:
        """An unknown profile is a clear error from the directory's `meta.profiles`."""
        if cert.profile is None:
            return
        offered = self.profiles
        if not offered:
            raise ACMEError(f"acme order {cert.name}: profile {cert.profile!r} requested but CA {self.ca.name} "
                            "offers no profiles (order not placed)",
                            hint="remove `profile` from the certificate or use a CA that supports profiles",
                            retryable=False)
        if cert.profile not in offered:
            raise ACMEError(f"acme order {cert.name}: CA {self.ca.name} has no profile {cert.profile!r}; it offers "
                            f"{', '.join(sorted(offered))} (order not placed)", retryable=False)

    # ------------------------------------------------------------ ARI

    async def renewal_info(self, cert: x509.Certificate, *, now: dt.datetime) -> RenewalInfo | None:
        """RFC 9773 §4.2: GET renewalInfo/<certID>; None when the CA has no ARI."""
        if not self.has_ari:
            return None
        url = self.directory["renewalInfo"].rstrip("/") + "/" + ari_cert_id(cert)
        net = self._net(account=False)
        try:
            resp = await self.call(net, f"acme renewal-info {self.ca.name}", net.get, url, outcome="window unknown")
        finally:
            net.session.close()
        info = messages.RenewalInfo.from_json(resp.json())
        start, end = info.suggested_window.start, info.suggested_window.end
        start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
        end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
        retry = parse_retry_after(resp.headers.get("Retry-After"), now) or now + dt.timedelta(hours=6)
        # RFC 9773 §4.3: clamp Retry-After to a sane range (at least a minute, at most a day)
        retry = min(max(retry, now + dt.timedelta(minutes=1)), now + dt.timedelta(days=1))
        return RenewalInfo(start=start.astimezone(dt.UTC), end=end.astimezone(dt.UTC), retry_after=retry,
                           explanation_url=resp.json().get("explanationURL"))

    # ------------------------------------------------------------ revocation

    async def revoke(self, leaf: x509.Certificate, reason: int, *, step: str) -> bool:
        """RFC 8555 §7.6: revoke `leaf`, signed with the account key of the account that ordered it.

        `reason` is an RFC 5280 §5.3.1 CRLReason code. True when revoked now, False when the CA says it
        already was (`alreadyRevoked`). Call `ensure_account` first.
        """
        net = self._net()
        try:
            await self.call(net, step, ClientV2(self.directory, net).revoke, leaf, reason, outcome="not revoked")
        except ACMEError as exc:
            if exc.typ == ERR + "alreadyRevoked":
                return False
            raise
        finally:
            net.session.close()
        return True

    # ------------------------------------------------------------ the order

    async def issue(self, cert: Certificate, key: keys.PrivateKey, *, inventory: Inventory,
                    providers: Mapping[str, Provider], replaces: str | None = None,
                    journal: CertJournal | None = None, record: OrderLog | None = None) -> Issued:
        """One order for all of `cert.domains`: DNS-01 for each pending authorization, finalize, download.

        `journal` is told which TXT records are about to be written (before the UPDATE) and which the
        server confirmed gone, so whatever a kill, a timeout or a refusal leaves is retried by a later run.
        `record` is told the key and CSR before new-order and the order URL after (certmgr.orders), so a
        later run resumes the order instead of placing another.

        Challenge records are removed in `finally` — on success, failure and cancellation alike.
        """
        self.check_profile(cert)
        csr_pem = keys.csr(key, cert.domains)
        if record is not None:
            record.placing(csr_pem)
        return await self._order(cert, key, csr_pem, None, inventory=inventory, providers=providers,
                                 replaces=replaces, journal=journal, record=record)

    async def fetch_order(self, cert: Certificate, uri: str) -> messages.Order:
        """RFC 8555 §7.1.3: the order at `uri` as the CA sees it now (POST-as-GET with this account)."""
        net = self._net()
        try:
            resp = await self.call(net, f"acme order {cert.name}", ClientV2(self.directory, net)._post_as_get, uri,
                                   outcome="order not resumed")
        finally:
            net.session.close()
        order: messages.Order = messages.Order.from_json(resp.json())
        return order

    async def resume(self, cert: Certificate, key: keys.PrivateKey, csr_pem: bytes, uri: str,
                     order: messages.Order, *, inventory: Inventory, providers: Mapping[str, Provider],
                     journal: CertJournal | None = None) -> Issued:
        """Carry on an order an earlier run placed (`fetch_order` gave `order`): whatever its status still needs."""
        return await self._order(cert, key, csr_pem, (uri, order), inventory=inventory, providers=providers,
                                 replaces=None, journal=journal, record=None)

    async def _order(self, cert: Certificate, key: keys.PrivateKey, csr_pem: bytes,
                     placed: tuple[str, messages.Order] | None, *, inventory: Inventory,
                     providers: Mapping[str, Provider], replaces: str | None, journal: CertJournal | None,
                     record: OrderLog | None) -> Issued:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        timings: dict[str, float] = {}
        notes: list[str] = []
        net = self._net()
        client = ClientV2(self.directory, net)
        name = cert.name
        try:
            if placed is None:
                order, uri, used_replaces = await self._new_order(net, client, cert, replaces, notes)
                if record is not None:
                    record.placed(uri)
            else:
                (uri, order), used_replaces = placed, False
                notes.append(f"resumed the order an earlier run placed (status {order.status.name})")
            timings["order"] = loop.time() - t0
            authzs = []
            for url in order.authorizations:
                resp = await self.call(net, f"acme authorization {name}", client._post_as_get, url,
                                       outcome="order abandoned")
                body = resp.json()
                _check_tokens(name, body)
                authzs.append((url, messages.Authorization.from_json(body)))
            pending = [(url, a) for url, a in authzs if a.status != messages.STATUS_VALID]
            if pending:
                await self._dns01(net, client, cert, pending, inventory=inventory, providers=providers,
                                  timings=timings, t0=t0, journal=journal)
            else:
                notes.append("all authorizations already valid (reused)")
            body = await self._finalize(net, client, cert, uri, order, csr_pem)
            timings["finalized"] = loop.time() - t0
            fullchain, chain_note = await self._download(net, client, cert, body)
            if chain_note:
                notes.append(chain_note)
        except jose.errors.DeserializationError as exc:
            # A malformed (or hostile) CA response, e.g. a dns-01 token that is not base64url
            # (RFC 8555 §8.1): this certificate fails, as text; the run and the other orders go on.
            text = str(exc)
            text = text[max(text.rfind("Could not decode "), 0):]  # the innermost field and why
            raise ACMEError(f"acme order {name}: the CA sent a response certmgr cannot accept: {text[:300]!r} "
                            "(order abandoned)", hint="the CA's answer is malformed; nothing was answered or "
                            "written; report it to the CA", retryable=False) from exc
        finally:
            net.session.close()
        # Checked (names, key, dates, chain) by the caller before anything is stored: certmgr.certcheck
        material = CertMaterial.from_fullchain(fullchain.encode(), keys.to_pem(key))
        timings["total"] = loop.time() - t0
        return Issued(material=material, replaced=replaces if used_replaces else None, notes=tuple(notes),
                      timings=timings)

    async def _new_order(self, net: _Net, client: ClientV2, cert: Certificate, replaces: str | None,
                         notes: list[str]) -> tuple[messages.Order, str, bool]:
        step = f"acme new-order {cert.name}"
        idents = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in cert.domains]

        async def place(with_replaces: bool) -> tuple[messages.Order, str]:
            order = _NewOrder(identifiers=idents, profile=cert.profile or None,
                              replaces=replaces if with_replaces else None)
            resp = await self.call(net, step, client._post, self.directory["newOrder"], order,
                                   outcome="order not placed")
            return messages.Order.from_json(resp.json()), resp.headers["Location"]

        if replaces:
            try:
                order, uri = await place(True)
                return order, uri, True
            except errors.ConflictError:
                why = "409 alreadyReplaced (this certificate was already replaced)"
            except ACMEError as exc:
                if not (exc.typ in (ERR + "alreadyReplaced", ERR + "unauthorized", ERR + "malformed")
                        or "replaces" in (exc.detail or "")):
                    raise
                why = f"{_short(exc.typ)}: {exc.detail}"
            # RFC 9773 §5: the CA may refuse `replaces` (already replaced, other account): order without it
            event(log, logging.WARNING, "CA rejected replaces, ordering without it", cert=cert.name, reason=why)
            notes.append(f"CA rejected `replaces` ({why}); ordered without it (not exempt from rate limits)")
        order, uri = await place(False)
        return order, uri, False

    async def _dns01(self, net: _Net, client: ClientV2, cert: Certificate,
                     pending: list[tuple[str, messages.Authorization]], *, inventory: Inventory,
                     providers: Mapping[str, Provider], timings: dict[str, float], t0: float,
                     journal: CertJournal | None) -> None:
        """Present every TXT, wait until every authoritative server serves them, answer, poll; always clean up."""
        loop = asyncio.get_running_loop()
        todo: list[tuple[str, messages.Authorization, messages.ChallengeBody]] = []
        for url, authz in pending:
            ident = authz.identifier.value
            domain = f"*.{ident}" if authz.wildcard else ident
            chall = next((c for c in authz.challenges if isinstance(c.chall, challenges.DNS01)), None)
            if chall is None:
                raise ACMEError(f"acme authorization {domain}: the CA offers no dns-01 challenge (order abandoned)",
                                retryable=False)
            todo.append((url, authz, chall))
        placed: dict[str, tuple[Provider, list[TXTRecord]]] = {}
        # Records whose add the server refused: RFC 2136 §3.7, nothing of that UPDATE was written, so no
        # delete follows (a second rejected UPDATE would only mislead the operator). Other zones' records,
        # accepted or unanswered, are still removed.
        refused: set[Key] = set()
        journaled: set[Key] = set()  # keys this order added to the journal (a value left by an earlier run is not)

        try:
            for _url, authz, chall in todo:
                ident = authz.identifier.value
                domain = f"*.{ident}" if authz.wildcard else ident
                value = chall.chall.validation(self.account_key)
                prov, rec = await locate(inventory, providers, domain, value, token=chall.chall.encode("token"),
                                         key_authorization=chall.chall.key_authorization(self.account_key),
                                         prefer=cert.dns)
                placed.setdefault(prov.name, (prov, []))[1].append(rec)
            if journal is not None:  # before any UPDATE: a kill from here on leaves the records listed
                for name, (_, recs) in placed.items():
                    journaled |= journal.written(name, recs)
            # one UPDATE per zone per provider; providers in parallel, each zone's UPDATE to its end
            results = await asyncio.gather(*(prov.present(recs) for prov, recs in placed.values()))
            updates: list[ZoneUpdate] = [u for batch in results for u in batch]
            not_written = {r.key for u in updates if u.applied is False for r in u.records}
            refused |= not_written
            if journal is not None and not_written & journaled:
                journal.drop(not_written & journaled)
            error = first_error(updates)
            if error is not None:
                raise error
            timings["presented"] = loop.time() - t0
            await run_all([prov.wait_propagated(recs) for prov, recs in placed.values()])
            timings["propagated"] = loop.time() - t0
            for _url, _authz, chall in todo:
                if chall.status not in (None, messages.STATUS_PENDING):
                    continue  # answered by an earlier run (resumed order): RFC 8555 §7.5.1 takes one answer
                await self.call(net, f"acme challenge {cert.name}", client.answer_challenge, chall,
                                chall.chall.response(self.account_key), outcome="order abandoned")
            await self._poll_authorizations(net, client, cert, [u for u, _, _ in todo])
            timings["validated"] = loop.time() - t0
        finally:
            # shield: on cancellation (Ctrl-C, SIGTERM) the records are still removed
            async def clean() -> None:
                batches = await asyncio.gather(*(
                    prov.cleanup([r for r in recs if r.key not in refused]) for prov, recs in placed.values()
                    if any(r.key not in refused for r in recs)))
                gone = {r.key for batch in batches for u in batch if u.applied for r in u.records}
                if journal is not None and gone:
                    journal.drop(gone)  # only what the server confirmed; the rest waits for a later run

            if placed:
                try:
                    await asyncio.shield(clean())
                except asyncio.CancelledError:
                    await clean()
                    raise

    async def _poll_authorizations(self, net: _Net, client: ClientV2, cert: Certificate, urls: list[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.authorizations
        remaining = list(urls)
        i = 0
        while remaining:
            for url in list(remaining):
                resp = await self.call(net, f"acme authorization {cert.name}", client._post_as_get, url,
                                       outcome="order abandoned")
                authz = messages.Authorization.from_json(resp.json())
                if authz.status == messages.STATUS_VALID:
                    remaining.remove(url)
                elif authz.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    continue
                else:
                    raise _invalid(cert, authz)
            if not remaining:
                return
            wait = self._interval(i, net.last_response)
            i += 1
            if loop.time() + wait > deadline:
                raise ACMEError(f"acme authorization {cert.name}: {len(remaining)} authorization(s) still pending "
                                f"after {self.timeouts.authorizations:g}s (order abandoned)",
                                hint="the CA is slow to validate; try again later")
            await asyncio.sleep(wait)

    def _interval(self, i: int, resp: requests.Response | None) -> float:
        iv = self.timeouts.poll_intervals
        wait = iv[min(i, len(iv) - 1)]
        if resp is not None:
            ra = parse_retry_after(resp.headers.get("Retry-After"), dt.datetime.now(dt.UTC))
            if ra is not None:
                wait = max(wait, min((ra - dt.datetime.now(dt.UTC)).total_seconds(), self.timeouts.short_wait))
        return wait

    async def _finalize(self, net: _Net, client: ClientV2, cert: Certificate, uri: str, order: messages.Order,
                        csr_pem: bytes) -> messages.Order:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.finalize
        step = f"acme finalize {cert.name}"
        csr = messages.CertificateRequest(csr=x509.load_pem_x509_csr(csr_pem))
        finalized = False
        i = 0
        body = order
        while True:
            if not finalized and body.status in (messages.STATUS_READY, messages.STATUS_PENDING):
                try:
                    resp = await self.call(net, step, client._post, order.finalize, csr, outcome="no certificate")
                    body = messages.Order.from_json(resp.json())
                    finalized = True
                except ACMEError as exc:
                    if exc.typ != ERR + "orderNotReady":
                        raise
            if body.status == messages.STATUS_VALID and body.certificate:
                return body
            if body.status == messages.STATUS_INVALID:
                err = body.error
                detail = shown(err.detail) if err else None
                raise ACMEError(f"{step}: order invalid: {detail or 'no detail from the CA'} "
                                "(no certificate)", typ=err.typ if err else None, detail=detail,
                                retryable=False)
            wait = self._interval(i, net.last_response)
            i += 1
            if loop.time() + wait > deadline:
                raise ACMEError(f"{step}: order still {body.status} after {self.timeouts.finalize:g}s "
                                "(no certificate)")
            await asyncio.sleep(wait)
            resp = await self.call(net, step, client._post_as_get, uri, outcome="no certificate")
            body = messages.Order.from_json(resp.json())

    async def _download(self, net: _Net, client: ClientV2, cert: Certificate,
                        body: messages.Order) -> tuple[str, str | None]:
        step = f"acme certificate {cert.name}"
        resp = await self.call(net, step, client._post_as_get, body.certificate, outcome="no certificate")
        chains = [resp.text]
        if cert.preferred_chain:
            for url in client._get_links(resp, "alternate"):
                alt = await self.call(net, step, client._post_as_get, url, outcome="no certificate")
                chains.append(alt.text)
        return choose_chain(chains, cert.preferred_chain)


def _check_tokens(name: str, body: Any) -> None:
    """Refuse an authorization whose dns-01 token is not plain base64url, before it is decoded or used.

    josepy's decoder skips characters outside the alphabet, so `AAAA…$(touch x)` would be accepted
    and answered with a key authorization the CA never issued; `../../x` would crash the parser.
    """
    chals = body.get("challenges") if isinstance(body, dict) else None
    for chal in chals if isinstance(chals, list) else []:
        if isinstance(chal, dict) and chal.get("type") == "dns-01":
            token = chal.get("token")
            if not isinstance(token, str) or not _TOKEN.fullmatch(token):
                raise ACMEError(f"acme authorization {name}: the CA sent a dns-01 token that is not base64url "
                                f"(RFC 8555 §8.1): {str(token)[:100]!r} (order abandoned)",
                                hint="the CA's answer is malformed or hostile; nothing was written or answered; "
                                     "report it to the CA", retryable=False)


def _invalid(cert: Certificate, authz: messages.Authorization) -> CertmgrError:
    ident = authz.identifier.value
    domain = f"*.{ident}" if authz.wildcard else ident
    err = next((c.error for c in authz.challenges if c.error is not None), None)
    detail = shown(err.detail) if err is not None else f"authorization {authz.status}"
    return ChallengeInvalid(
        f"acme challenge {cert.name} ({domain}): the CA found the dns-01 challenge invalid: {detail} "
        "(order abandoned)", typ=err.typ if err is not None else None, detail=detail,
        hint="check that _acme-challenge TXT records are not overridden (stale CNAME, other provider)")
