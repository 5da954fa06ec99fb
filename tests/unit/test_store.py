"""Unit tests for certmgr.store: versions, modes, names, locking, crash safety, state, audit, certbot import."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr import certbot as certbot_mod
from certmgr import store as store_mod
from certmgr.certbot import ImportResult, convert_certbot_live
from certmgr.errors import LockHeld, StoreError
from certmgr.fsutil import is_temp_name
from certmgr.material import FILES, CertMaterial, MaterialError
from certmgr.store import Store
from tests.helpers import tree_digest

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("store_crash_writer.py")
FIXED = dt.datetime(2026, 11, 27, 2, 0, 3, tzinfo=dt.UTC)

# ---------------------------------------------------------------- certificates


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, serial: int
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def materials() -> list[CertMaterial]:
    """Four whole versions (leaf + issuing CA + matching key) for example.com."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    chain = _cert("Test CA", ca_key, "Test CA", ca_key, 1)
    out = []
    for serial in range(2, 6):
        key = ec.generate_private_key(ec.SECP256R1())
        out.append(
            CertMaterial(cert=_cert("example.com", key, "Test CA", ca_key, serial), chain=chain, privkey=_pem_key(key))
        )
    return out


@pytest.fixture(scope="module")
def mismatched(materials: list[CertMaterial]) -> CertMaterial:
    """A leaf paired with somebody else's private key."""
    return CertMaterial(cert=materials[0].cert, chain=materials[0].chain, privkey=materials[1].privkey)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store", clock=lambda: FIXED)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def temps_under(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if is_temp_name(n)]


# ---------------------------------------------------------------- the fork server (store_crash_writer.py)


class Writers:
    """Drives store_crash_writer.py; every child it forks is SIGKILLed by the end of the test module."""

    def __init__(self, materials_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(materials_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.alive: set[int] = set()

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply, f"store_crash_writer.py died answering {line!r}"
        return reply

    def write(self, root: Path, name: str) -> int:
        pid = int(self._ask(f"write {root} {name}").removeprefix("pid "))
        self.alive.add(pid)
        return pid

    def hold(self, root: Path, actor: str) -> int:
        pid = int(self._ask(f"hold {root} {actor}").removeprefix("pid "))
        self.alive.add(pid)
        return pid

    def kill(self, pid: int) -> int:
        """SIGKILL a child and reap it; returns the signal that ended it."""
        os.kill(pid, signal.SIGKILL)
        reply = self._ask(f"reap {pid}")
        self.alive.discard(pid)
        return int(reply.split()[2])

    def close(self) -> None:
        for pid in list(self.alive):
            self.kill(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def writers(tmp_path_factory: pytest.TempPathFactory, materials: list[CertMaterial]) -> Iterator[Writers]:
    directory = tmp_path_factory.mktemp("materials")
    for i, m in enumerate(materials):
        (directory / str(i)).mkdir()
        (directory / str(i) / "cert.pem").write_bytes(m.cert)
        (directory / str(i) / "chain.pem").write_bytes(m.chain)
        (directory / str(i) / "privkey.pem").write_bytes(m.privkey)
    w = Writers(directory)
    try:
        yield w
    finally:
        w.close()


# ---------------------------------------------------------------- layout, versions, activation


def test_open_creates_layout_with_private_modes(tmp_path: Path) -> None:
    """Store.open creates archive/, live/, accounts/ and state/ as 0700 and lock and audit.log as 0600."""
    old = os.umask(0o022)
    try:
        s = Store.open(tmp_path / "new" / "store")
    finally:
        os.umask(old)
    for sub in ("archive", "live", "accounts", "state"):
        assert mode(s.root / sub) == 0o700, sub
    assert mode(s.root / "lock") == 0o600
    assert mode(s.root / "audit.log") == 0o600


def test_open_tightens_a_loose_existing_directory(tmp_path: Path) -> None:
    """Re-opening a store whose archive/ was made world-readable puts it back to 0700."""
    s = Store.open(tmp_path)
    os.chmod(s.root / "archive", 0o755)
    Store.open(tmp_path)
    assert mode(s.root / "archive") == 0o700


def test_open_without_create_refuses_a_non_store(tmp_path: Path) -> None:
    """Store.open(create=False) on a directory without the layout fails with a hint about the state dir."""
    with pytest.raises(StoreError, match="not a certmgr state directory") as ei:
        Store.open(tmp_path, create=False)
    assert ei.value.hint is not None and "CERTMGR_STATE_DIR" in ei.value.hint


def test_versions_are_numbered_from_one_and_not_live_until_activated(
    store: Store, materials: list[CertMaterial]
) -> None:
    """add_version numbers 1, 2, 3 and makes nothing live; activate switches and returns the previous version."""
    with store.lock("test"):
        assert [store.add_version("example.com", m) for m in materials[:3]] == [1, 2, 3]
        assert store.versions("example.com") == [1, 2, 3]
        assert store.live_version("example.com") is None
        assert store.activate("example.com", 2) is None
        assert store.activate("example.com", 3) == 2
        assert store.activate("example.com", 3) == 3
    assert store.names() == ["example.com"]
    assert store.live_version("example.com") == 3
    assert store.read("example.com") == materials[2]
    assert store.read("example.com", 1) == materials[0]


def test_live_is_one_relative_symlink_to_a_version_dir(store: Store, materials: list[CertMaterial]) -> None:
    """live/<name> is a single relative symlink, so live/<name>/fullchain.pem and privkey.pem share one version."""
    with store.lock("test"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
    link = store.root / "live" / "example.com"
    assert os.readlink(link) == "../archive/example.com/1"
    assert (link / "fullchain.pem").read_bytes() == materials[0].fullchain
    assert (link / "privkey.pem").read_bytes() == materials[0].privkey


def test_version_files_have_final_modes(store: Store, materials: list[CertMaterial]) -> None:
    """privkey.pem is 0600, the other PEMs 0644 and the version directory 0700."""
    with store.lock("test"):
        store.add_version("example.com", materials[0])
    vdir = store.root / "archive" / "example.com" / "1"
    assert mode(vdir) == 0o700
    assert {f: mode(vdir / f) for f in FILES} == {
        "fullchain.pem": 0o644,
        "privkey.pem": 0o600,
        "cert.pem": 0o644,
        "chain.pem": 0o644,
    }


def test_add_version_refuses_mismatched_key_and_writes_nothing(store: Store, mismatched: CertMaterial) -> None:
    """Material whose key does not match its leaf is refused before anything reaches the archive."""
    with store.lock("test"), pytest.raises(MaterialError, match="do not match"):
        store.add_version("example.com", mismatched)
    assert store.versions("example.com") == []
    assert temps_under(store.root) == []


def test_activate_missing_version_keeps_live(store: Store, materials: list[CertMaterial]) -> None:
    """Activating a version that does not exist fails with a message naming it and leaves live alone."""
    with store.lock("test"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
        with pytest.raises(StoreError) as ei:
            store.activate("example.com", 7)
    assert str(ei.value) == "store example.com: cannot activate version 7: it does not exist (live version unchanged)"
    assert store.live_version("example.com") == 1


def test_read_without_live_version_fails(store: Store) -> None:
    """Reading the live version of a lineage with none is a StoreError, not a crash."""
    with pytest.raises(StoreError, match=re.escape("store example.com: no live version")):
        store.read("example.com")


def test_read_detects_an_inconsistent_version(store: Store, materials: list[CertMaterial]) -> None:
    """A version whose fullchain.pem is not cert + chain (edited by hand) is reported, not served."""
    with store.lock("test"):
        store.add_version("example.com", materials[0])
    path = store.root / "archive" / "example.com" / "1" / "fullchain.pem"
    path.write_bytes(materials[1].fullchain)
    with pytest.raises(StoreError, match="version 1 is inconsistent"):
        store.read("example.com", 1)


def test_prune_keeps_newest_and_live(store: Store, materials: list[CertMaterial]) -> None:
    """prune removes all but the newest `keep` versions, never the live one, and reports what it removed."""
    with store.lock("test"):
        for m in materials:
            store.add_version("example.com", m)
        store.activate("example.com", 1)
        assert store.prune("example.com", keep=2) == [2]
        assert store.versions("example.com") == [1, 3, 4]
        assert store.prune("example.com", keep=0) == [3, 4]
        assert store.prune("example.com", keep=5) == []
    assert store.versions("example.com") == [1]
    assert temps_under(store.root) == []


def test_prune_never_removes_the_version_before_live(store: Store, materials: list[CertMaterial]) -> None:
    """The version just below the live one (what a rollback goes back to) survives even keep=0."""
    with store.lock("test"):
        for m in materials:
            store.add_version("example.com", m)
        store.activate("example.com", 3)
        assert store.prune("example.com", keep=0) == [1, 4]
    assert store.versions("example.com") == [2, 3]


def test_writers_must_hold_the_lock(store: Store, materials: list[CertMaterial]) -> None:
    """Writing archive/ or live/ outside `with store.lock()` is a programming error."""
    with pytest.raises(RuntimeError, match=re.escape("inside `with store.lock")):
        store.add_version("example.com", materials[0])
    with pytest.raises(RuntimeError):
        store.activate("example.com", 1)
    with pytest.raises(RuntimeError):
        store.prune("example.com", 1)


# ---------------------------------------------------------------- names


BAD_NAMES = [
    "",
    ".hidden",
    "..",
    "../etc",
    "a/b",
    "a..b",
    "Example.com",
    "-rf",
    "_global",
    "example.com\n",
    "a b",
    "a\x00b",
    "x" * 201,
    "é.example",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_before_any_path_is_built(
    store: Store, materials: list[CertMaterial], name: str
) -> None:
    """Names that could escape the store, hide, look like options or collide with _global are refused."""
    for call in (
        lambda: store.versions(name),
        lambda: store.live_version(name),
        lambda: store.read(name),
        lambda: store.load_state(name),
        lambda: store.save_state(name, {}),
    ):
        with pytest.raises(StoreError, match="is not a valid certificate name"):
            call()
    with store.lock("test"), pytest.raises(StoreError, match="is not a valid certificate name"):
        store.add_version(name, materials[0])
    assert sorted(os.listdir(store.root / "archive")) == []


@pytest.mark.parametrize("name", ["example.com", "*.example.com", "example.com-0001", "mail_1.example.org", "a"])
def test_good_names_are_accepted(store: Store, name: str) -> None:
    """Certbot-style lineage names (dots, dashes, underscores, wildcard star) are valid."""
    assert store_mod.check_name(name) == name


# ---------------------------------------------------------------- lock


def test_lock_contention_message_names_pid_actor_and_start_time(store: Store) -> None:
    """A second locker gets LockHeld (exit 75) naming the holder's pid, actor and start time exactly."""
    other = Store.open(store.root)
    with store.lock("certmgr run"):
        with pytest.raises(LockHeld) as ei, other.lock("certmgr status"):
            pass
    assert str(ei.value) == (
        f"store {store.root} is locked by pid {os.getpid()} (certmgr run, started 2026-11-27T02:00:03Z)"
    )
    assert (ei.value.pid, ei.value.started, ei.value.exit_code) == (os.getpid(), "2026-11-27T02:00:03Z", 75)


def test_lock_names_a_holder_in_another_process(store: Store, writers: Writers) -> None:
    """Contention with another process reports that process's pid and start time."""
    pid = writers.hold(store.root, "certmgr run")
    with pytest.raises(LockHeld) as ei, store.lock("test"):
        pass
    assert re.fullmatch(
        rf"store {re.escape(str(store.root))} is locked by pid {pid} "
        r"\(certmgr run, started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)",
        str(ei.value),
    )
    assert ei.value.pid == pid
    writers.kill(pid)


def test_lock_is_released_when_its_holder_is_sigkilled(store: Store, writers: Writers) -> None:
    """A holder killed with SIGKILL frees the lock at once: the next run proceeds without waiting."""
    pid = writers.hold(store.root, "certmgr run")
    assert writers.kill(pid) == signal.SIGKILL
    start = time.monotonic()
    with store.lock("next run"):
        pass
    assert time.monotonic() - start < 0.5


def test_lock_wait_proceeds_as_soon_as_the_holder_dies(store: Store, writers: Writers) -> None:
    """lock(wait=...) polls and takes the lock once the holder is gone, well before the deadline."""
    pid = writers.hold(store.root, "certmgr run")
    timer = threading.Timer(0.2, writers.kill, args=(pid,))
    timer.start()
    start = time.monotonic()
    try:
        with store.lock("waiter", wait=10):
            elapsed = time.monotonic() - start
    finally:
        timer.join()
    assert 0.15 < elapsed < 3


def test_lock_wait_gives_up_at_the_deadline(store: Store) -> None:
    """lock(wait=0.2) raises LockHeld after about 0.2 s and says it waited."""
    other = Store.open(store.root)
    with store.lock("certmgr run"):
        start = time.monotonic()
        with pytest.raises(LockHeld, match=r"\(gave up after 0.2s\)$"), other.lock("x", wait=0.2):
            pass
        assert 0.15 < time.monotonic() - start < 1


def test_lock_is_not_reentrant_and_clears_its_record(store: Store) -> None:
    """A nested lock() on the same Store is a bug (RuntimeError); after release the lock file names nobody."""
    with store.lock("outer"):
        assert json.loads((store.root / "lock").read_bytes())["actor"] == "outer"
        with pytest.raises(RuntimeError, match="not re-entrant"), store.lock("inner"):
            pass
    assert (store.root / "lock").read_bytes() == b""


def test_lock_sweeps_temporaries_of_a_killed_writer(store: Store, materials: list[CertMaterial]) -> None:
    """Taking the lock removes half-written version dirs and temp links a killed writer left behind."""
    with store.lock("test"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
    lineage = store.root / "archive" / "example.com"
    (lineage / ".tmp-2-deadbeef").mkdir()
    (lineage / ".tmp-2-deadbeef" / "privkey.pem").write_bytes(b"half")
    (store.root / "live" / ".example.com.tmp-0123456789ab").symlink_to("../archive/example.com/2")
    with store.lock("test"):
        assert temps_under(store.root) == []
    assert store.versions("example.com") == [1]


def test_lock_sweeps_a_deploy_intent_half_written_by_a_killed_deploy(store: Store) -> None:
    """A deploy intent's temp file (state/intents/<name>/) a killed deploy left is removed at the next lock, however fresh."""
    store.save_json("state/intents/example.com/pop-1.abc.json", {"id": "abc"})
    d = store.root / "state" / "intents" / "example.com"
    (d / ".pop-1.def.json.tmp-0123456789ab").write_bytes(b'{"id": "d')
    with store.lock("test"):
        assert temps_under(store.root) == []
    assert sorted(p.name for p in d.iterdir()) == ["pop-1.abc.json"]


# ---------------------------------------------------------------- crash safety


def test_sigkilled_writer_never_leaves_a_partial_version(
    tmp_path: Path, writers: Writers, materials: list[CertMaterial]
) -> None:
    """SIGKILL at random moments of add_version/activate/prune leaves every version whole and the next writer fine."""
    store = Store.open(tmp_path / "store")
    name = "crash.example.com"
    rng = random.Random(20261127)  # fixed seed: reproducible kill moments, still spread over the loop
    progressed = mid_write = 0
    # At least 30 kills; more (up to 150) while too few landed after the writer got going: on a
    # loaded machine a 0–40 ms wait can end before the child was given the CPU at all.
    for round_ in range(150):
        if round_ >= 30 and progressed >= 10 and mid_write >= 1:
            break
        before = store.versions(name)
        pid = writers.write(store.root, name)
        time.sleep(rng.uniform(0, 0.04))
        assert writers.kill(pid) == signal.SIGKILL
        progressed += store.versions(name) != before
        mid_write += bool(temps_under(store.root / "archive"))  # killed inside add_version or prune
        live = store.live_version(name)
        for version in store.versions(name):  # every final version dir is whole, live included
            material = store.read(name, version)
            material.check()
            vdir = store.root / "archive" / name / str(version)
            assert sorted(os.listdir(vdir)) == sorted(FILES)
            assert mode(vdir / "privkey.pem") == 0o600
        if live is not None:
            assert live in store.versions(name)
            assert (store.root / "live" / name / "fullchain.pem").read_bytes() == store.read(name).fullchain
        assert isinstance(store.load_state(name), dict)
        list(store.read_audit())
        with store.lock("next writer"):  # no wait: the dead writer's flock is gone
            # state/ temps are swept only when an hour old (unlocked writers may own them); harmless meanwhile
            assert temps_under(store.root / "archive") + temps_under(store.root / "live") == []
            new = store.add_version(name, materials[0])
            assert store.activate(name, new) == live
        assert store.read(name) == materials[0]
    assert progressed >= 10, "the writer was killed before it got going too often to prove anything"
    assert mid_write >= 1, "no kill landed inside a version write"


# ---------------------------------------------------------------- state, accounts


def test_state_round_trips_atomically_with_mode_0600(store: Store) -> None:
    """load_state is {} before any save, returns what save_state wrote, and the file is 0600."""
    assert store.load_state("example.com") == {}
    store.save_state("example.com", {"last_deploy": {"sally": 3}, "failures": 0})
    assert store.load_state("example.com") == {"last_deploy": {"sally": 3}, "failures": 0}
    assert mode(store.root / "state" / "example.com.json") == 0o600
    assert os.listdir(store.root / "state") == ["example.com.json"]


def test_save_json_creates_parents_and_honours_mode(store: Store) -> None:
    """save_json makes missing parent directories 0700 and writes the file with the given mode."""
    store.save_json("accounts/letsencrypt/account.json", {"uri": "https://ca/acct/1"}, 0o644)
    assert store.load_json("accounts/letsencrypt/account.json") == {"uri": "https://ca/acct/1"}
    assert mode(store.root / "accounts" / "letsencrypt") == 0o700
    assert mode(store.root / "accounts" / "letsencrypt" / "account.json") == 0o644
    assert store.load_json("state/_global.json", default={"x": 1}) == {"x": 1}


@pytest.mark.parametrize(
    "relpath",
    [
        "archive/x.json",
        "live/x",
        "lock",
        "audit.log",
        "state/../lock",
        "/etc/passwd",
        "state/.hidden.json",
        "state",
        "state//x.json",
    ],
)
def test_json_paths_stay_in_state_and_accounts(store: Store, relpath: str) -> None:
    """load_json/save_json refuse paths outside state/ and accounts/, '..' and hidden names."""
    with pytest.raises(StoreError, match="is not a state path"):
        store.save_json(relpath, {})
    with pytest.raises(StoreError, match="is not a state path"):
        store.load_json(relpath)


def test_corrupt_state_is_reported_with_a_hint(store: Store) -> None:
    """A state file that is not JSON raises StoreError naming it, with a hint to restore or move it aside."""
    (store.root / "state" / "example.com.json").write_bytes(b"{not json")
    with pytest.raises(StoreError, match=re.escape("store state/example.com.json: not valid JSON")) as ei:
        store.load_state("example.com")
    assert ei.value.hint is not None and "move it aside" in ei.value.hint


def test_account_key_is_private_and_never_silently_replaced(store: Store, materials: list[CertMaterial]) -> None:
    """save_account_key writes 0600 in a 0700 dir and refuses to overwrite an existing key unless told to."""
    assert store.load_account_key("letsencrypt") is None
    store.save_account_key("letsencrypt", materials[0].privkey)
    path = store.account_key_path("letsencrypt")
    assert path == store.root / "accounts" / "letsencrypt" / "key.pem"
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)
    with pytest.raises(StoreError, match="an account key already exists"):
        store.save_account_key("letsencrypt", materials[1].privkey)
    store.save_account_key("letsencrypt", materials[1].privkey, replace=True)
    assert store.load_account_key("letsencrypt") == materials[1].privkey
    with pytest.raises(StoreError, match="is not a valid CA name"):
        store.account_key_path("../evil")


# ---------------------------------------------------------------- audit log


def test_audit_appends_json_lines_with_lock_actor(store: Store, materials: list[CertMaterial]) -> None:
    """audit appends one JSON object per line; store mutations audit themselves under the lock's actor."""
    store.audit("deploy", "example.com", frm=1, to=2, actor="alice", host="sally")
    with store.lock("certmgr run"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
    lines = (store.root / "audit.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries[0] == {
        "time": "2026-11-27T02:00:03Z",
        "actor": "alice",
        "action": "deploy",
        "object": "example.com",
        "from": 1,
        "to": 2,
        "host": "sally",
    }
    assert [(e["action"], e["actor"], e["from"], e["to"]) for e in entries[1:]] == [
        ("add_version", "certmgr run", None, 1),
        ("activate", "certmgr run", None, 1),
    ]
    assert entries[1]["serial"] == materials[0].info().serial
    assert list(store.read_audit()) == entries


def test_audit_never_contains_key_material(store: Store, materials: list[CertMaterial]) -> None:
    """No store operation writes key bytes to the audit log, and audit() refuses a PEM private key."""
    with store.lock("test"):
        store.activate("example.com", store.add_version("example.com", materials[0]))
    with pytest.raises(ValueError, match="private key"):
        store.audit("oops", "example.com", key=materials[0].privkey.decode())
    assert b"PRIVATE KEY" not in (store.root / "audit.log").read_bytes()


def test_audit_survives_a_torn_last_line(store: Store) -> None:
    """A line torn by a crash is skipped by read_audit, and the next entry starts on a fresh line."""
    store.audit("one", "a")
    with open(store.root / "audit.log", "ab") as fh:
        fh.write(b'{"time": "2026-11-27T02:00:03Z", "act')
    store.audit("two", "b")
    assert [e["action"] for e in store.read_audit()] == ["one", "two"]


# ---------------------------------------------------------------- certbot import


def make_certbot_tree(root: Path, name: str, versions: list[CertMaterial], live: int) -> None:
    """A certbot config dir: renewal conf, flat archive cert1.pem.., live/ per-file relative links."""
    (root / "renewal").mkdir(parents=True, exist_ok=True)
    archive, live_dir = root / "archive" / name, root / "live" / name
    archive.mkdir(parents=True)
    live_dir.mkdir(parents=True)
    (root / "renewal" / f"{name}.conf").write_text(
        f"version = 2.11.0\narchive_dir = /etc/letsencrypt/archive/{name}\n"
        f"cert = /etc/letsencrypt/live/{name}/cert.pem\n[renewalparams]\nauthenticator = dns-rfc2136\n"
    )
    for k, m in enumerate(versions, 1):
        for kind, data in (("cert", m.cert), ("chain", m.chain), ("fullchain", m.fullchain), ("privkey", m.privkey)):
            (archive / f"{kind}{k}.pem").write_bytes(data)
        os.chmod(archive / f"privkey{k}.pem", 0o600)
    for kind in ("cert", "chain", "fullchain", "privkey"):
        (live_dir / f"{kind}.pem").symlink_to(f"../../archive/{name}/{kind}{live}.pem")
    (live_dir / "README").write_text("This directory contains your keys and certificates.\n")


@pytest.fixture
def certbot(tmp_path: Path, materials: list[CertMaterial]) -> Path:
    root = tmp_path / "letsencrypt"
    make_certbot_tree(root, "example.com", materials[:3], live=2)
    return root


def test_import_certbot_keeps_numbering_and_live_version(
    store: Store, certbot: Path, materials: list[CertMaterial]
) -> None:
    """Each certbot archive version K becomes version K, certbot's live one is made live, the source is untouched."""
    digest = tree_digest(certbot)
    with store.lock("certmgr import"):
        results = store.import_certbot(certbot)
    assert results == [ImportResult(name="example.com", imported=(1, 2, 3), certbot_live=2, activated=2)]
    assert store.versions("example.com") == [1, 2, 3]
    assert store.live_version("example.com") == 2
    assert [store.read("example.com", k) for k in (1, 2, 3)] == materials[:3]
    assert mode(store.root / "archive" / "example.com" / "2" / "privkey.pem") == 0o600
    assert tree_digest(certbot) == digest
    imports = [e for e in store.read_audit() if e["action"] == "import"]
    assert imports == [
        {
            "time": "2026-11-27T02:00:03Z",
            "actor": "certmgr import",
            "action": "import",
            "object": "example.com",
            "from": None,
            "to": 2,
            "source": str(certbot),
            "versions": [1, 2, 3],
            "skipped": [],
        }
    ]


def test_import_certbot_twice_changes_nothing(store: Store, certbot: Path) -> None:
    """Re-importing reports every version as present, rewrites no file and adds no audit entry."""
    with store.lock("certmgr import"):
        store.import_certbot(certbot)
        before = tree_digest(store.root / "archive"), len(list(store.read_audit()))
        results = store.import_certbot(certbot)
    assert results == [ImportResult(name="example.com", present=(1, 2, 3), certbot_live=2)]
    assert (tree_digest(store.root / "archive"), len(list(store.read_audit()))) == before


def test_import_certbot_skips_and_reports_broken_versions(
    store: Store, tmp_path: Path, materials: list[CertMaterial], mismatched: CertMaterial
) -> None:
    """A version whose key does not match its leaf is skipped with the reason; the good ones are imported."""
    root = tmp_path / "le"
    make_certbot_tree(root, "example.com", [materials[0], mismatched, materials[2]], live=3)
    with store.lock("certmgr import"):
        [result] = store.import_certbot(root)
    assert result.imported == (1, 3)
    assert result.skipped == ((2, "certificate and private key do not match"),)
    assert store.live_version("example.com") == 3


def test_import_certbot_leaves_live_alone_once_certmgr_has_its_own_versions(
    store: Store, certbot: Path, materials: list[CertMaterial]
) -> None:
    """After certmgr adds and activates a version of its own, a re-import never switches live back to certbot's."""
    with store.lock("certmgr"):
        store.import_certbot(certbot)
        store.activate("example.com", store.add_version("example.com", materials[3]))
        [result] = store.import_certbot(certbot)
    assert store.live_version("example.com") == 4
    assert result.activated is None
    assert result.problem == "import example.com: certmgr has versions of its own; live left alone"


def test_import_certbot_refuses_a_tree_without_lineages(store: Store, tmp_path: Path) -> None:
    """Pointing import at a directory that is not certbot's says so, with a hint to the usual path."""
    with store.lock("test"), pytest.raises(StoreError, match="no certbot lineages") as ei:
        store.import_certbot(tmp_path)
    assert ei.value.hint is not None and "/etc/letsencrypt" in ei.value.hint


# ---------------------------------------------------------------- certbot live/ conversion


@pytest.mark.parametrize("exchange_supported", [True, False])
def test_convert_certbot_live_swaps_dir_for_symlink(
    certbot: Path, materials: list[CertMaterial], monkeypatch: pytest.MonkeyPatch, exchange_supported: bool
) -> None:
    """convert_certbot_live turns live/<name>/ into one symlink to archive/<name>/<K>/, serving the same bytes."""
    if not exchange_supported:
        monkeypatch.setattr(certbot_mod, "exchange", lambda a, b: False)
    assert convert_certbot_live(certbot, "example.com") == 2
    live = certbot / "live" / "example.com"
    assert os.readlink(live) == "../archive/example.com/2"
    assert (live / "fullchain.pem").read_bytes() == materials[1].fullchain
    assert (live / "privkey.pem").read_bytes() == materials[1].privkey
    assert (certbot / "archive" / "example.com" / "privkey2.pem").exists()  # certbot's files stay
    assert sorted(os.listdir(certbot / "live")) == ["example.com"]
    assert convert_certbot_live(certbot, "example.com") == 2  # idempotent


def test_convert_certbot_live_recovers_from_a_crash_between_renames(certbot: Path) -> None:
    """If a conversion died with live/<name> renamed away, the next call restores, cleans up and converts it."""
    live_root = certbot / "live"
    os.rename(live_root / "example.com", live_root / ".example.com.certbot-old")
    (live_root / ".example.com.tmp-0123456789ab").symlink_to("../archive/example.com/2")
    assert convert_certbot_live(certbot, "example.com") == 2
    assert os.readlink(live_root / "example.com") == "../archive/example.com/2"
    assert sorted(os.listdir(live_root)) == ["example.com"]


def test_docs_import_example_runs(tmp_path: Path, certbot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The import snippet in docs/store.md works as printed (paths pointed at a synthetic tree)."""
    text = (REPO / "docs" / "store.md").read_text()
    m = re.search(r"<!-- checked by tests/unit/test_store.py -->\n```python\n(.*?)```", text, re.S)
    assert m is not None
    code = m.group(1).replace("/var/lib/certmgr", str(tmp_path / "state")).replace("/etc/letsencrypt", str(certbot))
    exec(compile(code, "docs/store.md", "exec"), {})
    assert capsys.readouterr().out == "example.com imported (1, 2, 3) already present () live 2\n"
    assert Store.open(tmp_path / "state").live_version("example.com") == 2


def test_import_command(tmp_path: Path, certbot: Path) -> None:
    """`certmgr import DIR` adopts the lineages, says what it did, and is safe to re-run."""
    from click.testing import CliRunner

    from certmgr.cli import main

    args = ["--state-dir", str(tmp_path / "state"), "import", str(certbot)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output == "example.com: imported 3; live: v2\n"
    again = CliRunner().invoke(main, args)
    assert again.output == "example.com: imported 0; 3 already present; live unchanged\n"
    assert Store.open(tmp_path / "state").live_version("example.com") == 2


def test_import_without_certbot_live_makes_the_newest_version_live(
    store: Store, tmp_path: Path, materials: list[CertMaterial]
) -> None:
    """An archive without certbot's live/<name>/ is imported with its newest version live (not left dark)."""
    root = tmp_path / "copied"
    make_certbot_tree(root, "example.com", materials[:2], live=2)
    shutil.rmtree(root / "live")
    with store.lock("certmgr import"):
        [result] = store.import_certbot(root)
    assert (result.imported, result.certbot_live, result.activated, result.problem) == ((1, 2), None, 2, None)
    assert store.live_version("example.com") == 2


def test_audit_log_rotates_and_stays_bounded(store: Store) -> None:
    """Past audit_max_bytes, audit.log becomes audit.log.1 (one generation kept); read_audit reads both, oldest first."""
    store.audit_max_bytes = 2000
    for i in range(200):
        store.audit("test", f"entry-{i:03d}")
    files = sorted(p.name for p in store.root.glob("audit.log*"))
    assert files == ["audit.log", "audit.log.1"]
    sizes = [p.stat().st_size for p in store.root.glob("audit.log*")]
    assert all(s <= 2000 + 200 for s in sizes), sizes
    objects = [e["object"] for e in store.read_audit()]
    assert objects == sorted(objects) and objects[-1] == "entry-199" and len(objects) < 200
