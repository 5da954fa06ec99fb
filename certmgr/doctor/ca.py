"""ACME CA checks: the directory answers, the stored account is known and valid (never registers)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from certmgr.doctor.model import Check, Status, Timeouts, _StoreLike
from certmgr.errors import CertmgrError
from certmgr.inventory import CA


async def check_ca(ca: CA, store: _StoreLike | None, *, executor: ThreadPoolExecutor,
                   timeouts: Timeouts) -> list[Check]:
    """Directory reachable; the stored account key's account valid (looked up with onlyReturnExisting), or
    none yet with agree_tos set. Never registers anything."""
    import josepy as jose

    from certmgr import issue, keys
    from certmgr.errors import ACMEError, LocalFileError

    out: list[Check] = []
    t0 = time.monotonic()
    try:
        client = await issue.ACMEClient.open(ca, executor=executor, timeouts=issue.Timeouts(http=timeouts.acme_http))
    except (ACMEError, LocalFileError) as exc:
        return [Check(group="ca", name="directory", subject=ca.name, status=Status.FAIL, message=exc.message,
                      hint=exc.hint, elapsed=time.monotonic() - t0)]
    out.append(Check(group="ca", name="directory", subject=ca.name, status=Status.OK,
                     message=f"{ca.directory} reachable ({(time.monotonic() - t0) * 1000:.0f} ms)",
                     elapsed=time.monotonic() - t0))
    t0 = time.monotonic()
    meta = getattr(client.directory, "meta", None)
    tos = getattr(meta, "terms_of_service", None) if meta is not None else None
    if meta is not None and getattr(meta, "external_account_required", False) and not ca.eab_kid:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message="the CA requires External Account Binding but no eab_kid is set",
                         hint=f"set eab_kid and eab_hmac_key_file in [ca.{ca.name}]"))
        return out
    ca_id = issue.account_id(ca)
    pem = None
    if store is not None:
        try:
            pem = store.load_account_key(ca_id)
        except CertmgrError as exc:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL, message=exc.message,
                             hint=exc.hint))
            return out
    tos_text = f" ({tos})" if tos else ""
    if pem is None:
        if ca.agree_tos:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.OK,
                             message=f"no account yet: the first renewal registers one (terms of service{tos_text} "
                                     "agreed)"))
        else:
            out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                             message="no account yet, and agree_tos is false: the first renewal cannot register one",
                             hint=f"read the terms of service{tos_text}, then set agree_tos = true in [ca.{ca.name}]"))
        return out
    try:
        key = keys.from_pem(pem)
        jwk = jose.jwk.JWKEC(key=key)
    except (ValueError, TypeError, CertmgrError) as exc:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message=f"account key accounts/{ca_id} cannot be read: {exc}",
                         hint="restore it from a backup; a new key means a new account"))
        return out
    client.account_key = jwk
    try:
        found = await client.find_account()  # onlyReturnExisting: never creates an account
    except ACMEError as exc:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL, message=exc.message,
                         hint=exc.hint, elapsed=time.monotonic() - t0))
        return out
    if found is None:
        status = Status.WARNING if ca.agree_tos else Status.FAIL
        then = ("the next renewal registers this key again" if ca.agree_tos
                else "agree_tos is false, so the next renewal cannot register it again")
        out.append(Check(group="ca", name="account", subject=ca.name, status=status,
                         message=f"the CA does not know the stored account key (accounts/{ca_id}): {then}",
                         hint="normal after a test CA restart; for a real CA, check the directory URL",
                         elapsed=time.monotonic() - t0))
        return out
    acct_status = found.body.status or "valid"
    url = found.uri or "?"
    if acct_status != "valid":
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.FAIL,
                         message=f"account {url} is {acct_status}: the CA refuses orders from it",
                         hint=f"move accounts/{ca_id} aside so the next renewal registers a new account",
                         elapsed=time.monotonic() - t0))
    else:
        out.append(Check(group="ca", name="account", subject=ca.name, status=Status.OK,
                         message=f"account {url} valid", elapsed=time.monotonic() - t0))
    return out
