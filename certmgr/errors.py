"""One exception hierarchy for certmgr: every failure an operator can meet.

CertmgrError
 ├── UsageError                  bad command-line use                    exit 2
 ├── InventoryError              domains.toml invalid (all problems)     exit 2
 ├── SecretError                 a secret reference cannot be read      exit 2
 │    └── LocalFileError         another file the inventory names (trust) cannot be read
 ├── StoreError                  local state dir problem                 exit 1
 │    └── LockHeld               another certmgr holds the store lock    exit 75
 ├── ScanError                   a scan could not run at all             exit 3
 ├── DNSError                    RFC 2136 update / propagation failure   exit 1
 │    ├── DNSAuthError           REFUSED / NOTAUTH / BADKEY / BADSIG      (not retryable)
 │    ├── DNSClockSkewError      TSIG BADTIME                             (not retryable)
 │    └── PropagationTimeout     some authoritative servers lag           (retryable)
 ├── ACMEError                   the CA said no, or could not be reached exit 1
 │    ├── RateLimited            429 rateLimited, carries retry_after     (retryable later)
 │    └── ChallengeInvalid       the CA rejected a challenge              (not retryable)
 ├── CertificateRefused          a certificate failed the checks before  exit 1
 │                               going live (names, key, dates, chain)    (not retryable)
 ├── DeployError                 a POP could not be updated              exit 1
 │    └── HostKeyError           unknown or changed SSH host key          (not retryable)
 └── NotifyError                 a chat channel could not be reached     exit 1

Only certmgr/cli/ catches CertmgrError broadly; anything else is a bug and shows its
traceback. Messages follow "step subject: cause (outcome)"; `hint` is the next
step for the operator.
"""

from __future__ import annotations

import datetime as dt


class CertmgrError(Exception):
    """Base of every error certmgr reports to an operator."""

    exit_code: int = 1
    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(CertmgrError):
    exit_code = 2


class InventoryError(CertmgrError):
    """The inventory is invalid; `problems` lists every one, each naming its key path."""

    exit_code = 2

    def __init__(self, problems: list[str], *, path: str = "domains.toml") -> None:
        self.problems = list(problems)
        self.path = path
        n = len(self.problems)
        head = f"inventory {path}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))


class SecretError(CertmgrError):
    exit_code = 2


class LocalFileError(SecretError):
    """A file the inventory names, not a secret (a `[ca.*] trust` bundle), cannot be read on this machine.

    Like a SecretError it is this machine's configuration, not the CA's answer: no renewal backoff.
    """


class StoreError(CertmgrError):
    pass


class LockHeld(StoreError):
    """Another certmgr process holds the store lock."""

    exit_code = 75  # EX_TEMPFAIL: the timer may simply try again later

    def __init__(self, message: str, *, pid: int | None = None, started: str | None = None) -> None:
        who = f"`ps -p {pid}`" if pid else "`ps`"
        super().__init__(message,
                         hint=f"wait for it to finish (see it with {who}), or `certmgr run --wait-lock SECONDS`")
        self.pid = pid
        self.started = started


class StoreUnavailable(StoreError):
    """The shared (PostgreSQL) store cannot be reached: certmgr stops; it never falls back to local state."""

    exit_code = 69  # EX_UNAVAILABLE: not in the unit's SuccessExitStatus=, so the unit fails and OnFailure= fires


class LockLost(StoreError):
    """The database session holding a lock ended (idle timeout, terminated, restart): no more writes."""

    exit_code = 69


class ScanError(CertmgrError):
    exit_code = 3


class DNSError(CertmgrError):
    retryable = True


class DNSAuthError(DNSError):
    retryable = False


class DNSClockSkewError(DNSAuthError):
    pass


class PropagationTimeout(DNSError):
    def __init__(self, message: str, *, lagging: tuple[str, ...] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.lagging = lagging


class ACMEError(CertmgrError):
    """The CA refused or failed; `typ`/`detail` carry the RFC 8555 problem document."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        typ: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.typ = typ
        self.detail = detail
        if retryable is not None:
            self.retryable = retryable


class RateLimited(ACMEError):
    def __init__(self, message: str, *, retry_after: dt.datetime | None, detail: str | None = None) -> None:
        super().__init__(
            message,
            typ="urn:ietf:params:acme:error:rateLimited",
            detail=detail,
            hint=f"no new order before {retry_after.isoformat()}" if retry_after else None,
        )
        self.retry_after = retry_after


class ChallengeInvalid(ACMEError):
    retryable = False


class CertificateRefused(CertmgrError):
    """An issued (or stored) certificate is not what was ordered; `problems` names each difference."""

    def __init__(self, message: str, *, problems: tuple[str, ...], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems


class DeployError(CertmgrError):
    pass


class HostKeyError(DeployError):
    retryable = False


class NotifyError(CertmgrError):
    pass
