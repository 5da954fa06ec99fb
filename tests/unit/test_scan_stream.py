"""Scan results streamed to disk give the same output as results held in memory; handshakes per POP are bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from certmgr import inventory as inv_mod
from certmgr import notify, pipeline, report, scanresult
from certmgr import scan as scan_mod
from certmgr.probe import Probe
from certmgr.spool import Spool
from lab.pki import Issued, make_ca, make_leaf
from tests import inv as inv_builder

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
HOSTS = ("pop1", "pop2", "pop3", "pop4")


def _der(c: Issued) -> bytes:
    return c.cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = make_ca("stream test root")
    inter = make_ca("stream test intermediate", issuer=root)
    return {"root": root, "inter": inter}


def _inventory(tmp_path: Path, pki: dict[str, Issued], certs: list[dict[str, Any]]) -> inv_mod.Inventory:
    (tmp_path / "trust.pem").write_bytes(pki["root"].cert_pem)
    return inv_mod.loads(inv_builder.toml(
        defaults={"trust": [f"{tmp_path}/trust.pem"]},
        hosts={h: {"address": f"127.0.0.{11 + i}", "https_port": 443} for i, h in enumerate(HOSTS)},
        certificates=certs, channels={"ops": {"type": "webhook", "url_env": "CERTMGR_TEST_UNUSED_HOOK"}}))


CERTS = [inv_builder.cert("a", *HOSTS, domains=["a.example.test", "www.a.example.test"]),
         inv_builder.cert("b", *HOSTS, domains=["b.example.test"]), inv_builder.cert("c", *HOSTS, domains=["*.c.example.test"]),
         inv_builder.cert("d", "pop1", "pop2", domains=["d.example.test"])]


class _StateStore:
    def __init__(self) -> None:
        self.files: dict[str, Any] = {}

    def load_json(self, relpath: str, default: Any = None) -> Any:
        return self.files.get(relpath, default)

    def save_json(self, relpath: str, obj: Any, **kw: Any) -> None:
        self.files[relpath] = obj


@pytest.fixture(scope="module")
def served(pki: dict[str, Issued]) -> dict[tuple[str, str], tuple[bytes, ...] | str]:
    """What each (address, SNI) serves: drift, an unreachable POP, expiring soon, a wildcard, a self-signed leaf."""
    inter = pki["inter"]
    a_new = make_leaf(inter, ["a.example.test", "www.a.example.test"], not_before=NOW - DAY, not_after=NOW + 89 * DAY)
    a_old = make_leaf(inter, ["a.example.test", "www.a.example.test"], not_before=NOW - 80 * DAY,
                      not_after=NOW + 10 * DAY)
    b_soon = make_leaf(inter, ["b.example.test"], not_before=NOW - 70 * DAY, not_after=NOW + 20 * DAY)
    b_live = make_leaf(inter, ["b.example.test"], not_before=NOW - DAY, not_after=NOW + 89 * DAY)
    c_wild = make_leaf(inter, ["*.c.example.test"], not_before=NOW - DAY, not_after=NOW + 89 * DAY)
    other_root = make_ca("somebody else")
    d_bad = make_leaf(other_root, ["d.example.test"], not_before=NOW - DAY, not_after=NOW + 60 * DAY)
    d_bad_soon = make_leaf(other_root, ["d.example.test"], not_before=NOW - 2 * DAY, not_after=NOW + 3 * DAY)
    out: dict[tuple[str, str], tuple[bytes, ...] | str] = {}
    for i, _h in enumerate(HOSTS):
        addr = f"127.0.0.{11 + i}"
        for name in ("a.example.test", "www.a.example.test"):
            out[(addr, name)] = (_der(a_old if i == 3 else a_new), _der(inter)) if i != 2 else "refused"
        out[(addr, "b.example.test")] = (_der(b_live if i == 0 else b_soon), _der(inter))
        out[(addr, "certmgr-scan.c.example.test")] = (_der(c_wild), _der(inter))
        out[(addr, "d.example.test")] = (_der(d_bad_soon if i == 1 else d_bad),)
    out[("live", "b")] = (_der(b_live),)
    return out


def _fake_probe(served: dict[tuple[str, str], tuple[bytes, ...] | str]) -> Any:
    async def fake(address: str, port: int, sni: str, *, connect_timeout: float = 5.0,
                   handshake_timeout: float = 5.0, peek: bool = False) -> Probe:
        await asyncio.sleep(0)
        got = served[(address, sni)]
        if isinstance(got, str):
            return Probe(address=address, port=port, sni=sni, error=got, elapsed=0.001)
        return Probe(address=address, port=port, sni=sni, chain=got, elapsed=0.001)
    return fake


def _scan(inv: inv_mod.Inventory, store: Any, **kw: Any) -> scan_mod.ScanResult:
    result = asyncio.run(scan_mod.scan(inv, store, now=NOW, workers=1, **kw))
    return dataclasses.replace(result, elapsed=0.5)  # the one field that differs between two runs


def _outputs(result: scan_mod.ScanResult, inv: inv_mod.Inventory, tmp: Path) -> dict[str, Any]:
    state = _StateStore()
    scan_mod.save_state(state, result)
    report.write_prometheus(result, tmp / "scan.prom")
    alerts = notify.alerts_for(result, {}, NOW, inv.channels.values())
    return {
        "json": "".join(scan_mod.json_text(result, {"notifications": []})),
        "state": state.files,
        "prometheus": list(report.prometheus_lines(result)),
        "textfile": (tmp / "scan.prom").read_text(),
        "table": report.table(result, limit=2),
        "alerts": [(a.channel, a.certificate, a.kind, a.severity, dataclasses.replace(a.message, key="")) for a in alerts],
        "plans": pipeline.plan_deploys(inv, result, (), False),
        "summaries": result.certificates,
        "severity": (result.severity, result.exit_code, result.endpoint_count, result.severity_counts()),
        "all": list(result.iter_endpoints()),
    }


def _live_store(served: dict[tuple[str, str], tuple[bytes, ...] | str]) -> Any:
    """The store's view scan() reads: certificate "b" has live version 3, the leaf POP 1 serves."""
    from certmgr.material import CertInfo

    der = served[("live", "b")][0]
    assert isinstance(der, bytes)
    info = CertInfo.from_der(der)

    class Store:
        def live_version(self, name: str) -> int | None:
            return 3 if name == "b" else None

        def read(self, name: str, version: int | None = None) -> Any:
            return type("Material", (), {"info": lambda _self: info})()

    return Store()


def test_spooled_scan_gives_the_same_output_as_an_in_memory_one(
        tmp_path: Path, pki: dict[str, Issued], served: dict[tuple[str, str], tuple[bytes, ...] | str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan spooled to disk in many small runs (keep=1) yields byte-identical JSON, state files, metrics,
    table head, alerts, deploy plans and summaries to the same scan held in memory."""
    monkeypatch.setattr(scan_mod, "probe", _fake_probe(served))
    inv = _inventory(tmp_path, pki, CERTS)
    store = _live_store(served)
    in_memory = _scan(inv, store)
    assert in_memory.spooled is None and in_memory.endpoint_count == 18
    monkeypatch.setattr(scanresult, "_RUN", 3)
    spooled = _scan(inv, store, keep=2)
    assert spooled.spooled is not None and len(spooled.endpoints) == 2 and spooled.endpoint_count == 18
    a, b = _outputs(in_memory, inv, tmp_path), _outputs(spooled, inv, tmp_path)
    for key in a:
        assert a[key] == b[key], key
    # the streamed JSON is exactly what `json.dumps(result_json(...), indent=2)` printed before
    assert a["json"] == json.dumps({**scan_mod.result_json(in_memory), "notifications": []}, indent=2)
    assert list(spooled.endpoints) == a["all"][:2]
    assert a["textfile"] == "\n".join(a["prometheus"]) + "\n"
    assert len([x for x in a["prometheus"] if x.startswith("certmgr_scan_endpoint_severity{")]) == 18
    # and the scenario exercises what the aggregates must reproduce
    by_name = {c.name: c for c in in_memory.certificates}
    assert by_name["a"].hosts_by_severity == {"error": ("pop3",), "critical": ("pop4",)}
    assert by_name["b"].command == "certmgr deploy b" and by_name["b"].live_version == 3
    assert (by_name["c"].severity, by_name["d"].severity) == ("ok", "critical")
    assert by_name["d"].hosts_by_severity == {"critical": ("pop2", "pop1")}  # least time left first
    assert sum(r.drift for r in a["all"]) == 6  # a on pop4 (two names), b on pop2-pop4, d on one of two


def test_table_of_a_spooled_scan_shows_the_most_urgent_and_counts_the_rest(
        tmp_path: Path, pki: dict[str, Issued], served: dict[tuple[str, str], tuple[bytes, ...] | str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond `keep` endpoints the table lists the most urgent ones and says how many more --json has."""
    monkeypatch.setattr(scan_mod, "probe", _fake_probe(served))
    inv = _inventory(tmp_path, pki, CERTS)
    result = _scan(inv, None, keep=4)
    lines = report.table(result).splitlines()
    assert lines[1].startswith("error") and len([x for x in lines if x.startswith(("error", "critical"))]) == 4
    assert "… 14 more endpoints (use --json for all)" in lines
    assert any(x.startswith("18 endpoints in 0.50s: ") for x in lines)


def test_spool_merges_sorted_runs_and_reads_back_in_write_order() -> None:
    """Records come back in write order per run, in key order when merged, across 64 KiB read blocks."""
    spool = Spool()
    spool.add_run([(i, "x" * (i % 300)) for i in range(0, 3000, 2)])
    spool.add_run([(i, "y" * 70_000) for i in range(1, 7, 2)])
    spool.add_run([(i, "") for i in range(7, 3000, 2)])
    spool.add_run([])
    assert [r[0] for r in spool.merged(lambda r: r[0])] == list(range(3000))
    assert [r[0] for r in spool.run(1)] == [1, 3, 5] and len(spool) == 3000 and spool.runs == 4
    spool.close()


# ---------------------------------------------------------------- handshakes per POP


def _many(n_names: int) -> list[dict[str, Any]]:
    return [inv_builder.cert(f"n{i}", *HOSTS, domains=[f"n{i}.example.test"]) for i in range(n_names)]


class _Counter:
    """Counts handshakes in flight per address in shared memory, so forked workers add up."""

    def __init__(self) -> None:
        self.now = multiprocessing.get_context("fork").Array("i", 8)
        self.peak = multiprocessing.get_context("fork").Array("i", 8)
        self.calls = multiprocessing.get_context("fork").Value("i", 0)

    def probe(self) -> Any:
        async def fake(address: str, port: int, sni: str, *, connect_timeout: float = 5.0,
                       handshake_timeout: float = 5.0, peek: bool = False) -> Probe:
            i = int(address.rsplit(".", 1)[1]) - 11
            with self.now.get_lock():
                self.now[i] += 1
                self.now[4] += 1
                self.peak[i] = max(self.peak[i], self.now[i])
                self.peak[4] = max(self.peak[4], self.now[4])
                self.calls.value += 1
            try:
                await asyncio.sleep(0.002)
            finally:
                with self.now.get_lock():
                    self.now[i] -= 1
                    self.now[4] -= 1
            return Probe(address=address, port=port, sni=sni, error="refused")
        return fake

    def peaks(self) -> tuple[list[int], int]:
        return list(self.peak[:4]), self.peak[4]


@pytest.mark.parametrize(("workers", "concurrency", "per_address", "want_per_address", "want_total"), [
    (1, 100, 3, 3, 12),    # the per-address bound binds: 4 POPs x 3
    (1, 5, 3, 3, 5),       # the total bound binds
    (2, 100, 4, 4, 16),    # two workers get 2 per address each: 4 in all
])
def test_handshakes_in_flight_per_address_are_bounded(
        tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch, workers: int, concurrency: int,
        per_address: int, want_per_address: int, want_total: int) -> None:
    """No POP address ever has more than `per_address` handshakes in flight (all workers together), nor the
    scan more than `concurrency`; with enough endpoints both bounds are reached."""
    counter = _Counter()
    monkeypatch.setattr(scan_mod, "probe", counter.probe())
    inv = _inventory(tmp_path, pki, _many(60))
    result = asyncio.run(scan_mod.scan(inv, None, now=NOW, workers=workers, concurrency=concurrency,
                                       per_address=per_address))
    per_pop, total = counter.peaks()
    assert counter.calls.value == result.endpoint_count == 240
    assert max(per_pop) <= want_per_address and total <= want_total
    assert max(per_pop) == want_per_address or workers > 1  # forked workers may not overlap on a busy machine
    if workers == 1:
        assert total == want_total


def test_a_pop_with_many_names_does_not_hold_up_the_others(
        tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints queue per address: while one POP's lanes are full, handshakes to other POPs still run."""
    counter = _Counter()
    monkeypatch.setattr(scan_mod, "probe", counter.probe())
    certs = [inv_builder.cert(f"m{i}", "pop1", domains=[f"m{i}.example.test"]) for i in range(50)] + _many(2)
    inv = _inventory(tmp_path, pki, certs)
    asyncio.run(scan_mod.scan(inv, None, now=NOW, workers=1, concurrency=10, per_address=2))
    per_pop, total = counter.peaks()
    assert per_pop == [2, 2, 2, 2] and total == 8


def test_an_unwritable_spool_directory_is_a_scan_error(
        tmp_path: Path, pki: dict[str, Issued], served: dict[tuple[str, str], tuple[bytes, ...] | str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Results that cannot be spooled stop the scan with a ScanError naming the directory and the cause."""
    import tempfile

    from certmgr.errors import ScanError

    monkeypatch.setattr(scan_mod, "probe", _fake_probe(served))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    inv = _inventory(tmp_path, pki, CERTS)
    with pytest.raises(ScanError) as info:
        _scan(inv, None)
    assert str(info.value) == (f"scan: cannot spool results to {tmp_path}/missing: No such file or directory "
                               "(scan stopped)")
    assert info.value.hint == "free space there, or set TMPDIR to a writable directory"


# ---------------------------------------------------------------- the parent's memory


def _wide(n_certs: int, n_domains: int) -> list[dict[str, Any]]:
    return [inv_builder.cert(f"w{i}", *HOSTS, domains=[f"d{j}.w{i}.example.test" for j in range(n_domains)])
            for i in range(n_certs)]


def _retained_after_scan(inv: inv_mod.Inventory, workers: int) -> tuple[int, int, int]:
    """(bytes the parent still holds with the result alive, EndpointResult objects it added, endpoints)."""
    import gc
    import tracemalloc

    gc.collect()
    others = sum(isinstance(o, scanresult.EndpointResult) for o in gc.get_objects())  # earlier tests' in this worker
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = asyncio.run(scan_mod.scan(inv, None, now=NOW, workers=workers, keep=20))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    alive = sum(isinstance(o, scanresult.EndpointResult) for o in gc.get_objects()) - others
    n = result.endpoint_count
    assert result.spooled is not None and len(list(result.iter_endpoints())) == n  # every endpoint still readable
    return held, alive, n


@pytest.mark.parametrize("workers", [1, 2])
def test_the_parent_keeps_no_memory_per_endpoint(
        tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """Ten times the endpoints (same certificates and POPs, more names each) leave the parent holding the same
    few `keep` results and well under 100 bytes more per added endpoint (it held about 3 KB before streaming)."""
    leaf = make_leaf(pki["inter"], ["other.example.test"], not_before=NOW - DAY, not_after=NOW + 5 * DAY)
    chain = (_der(leaf), _der(pki["inter"]))

    async def fake(address: str, port: int, sni: str, *, connect_timeout: float = 5.0,
                   handshake_timeout: float = 5.0, peek: bool = False) -> Probe:
        await asyncio.sleep(0)
        return Probe(address=address, port=port, sni=sni, chain=chain, elapsed=0.001)

    monkeypatch.setattr(scan_mod, "probe", fake)
    monkeypatch.setattr(scanresult, "_RUN", 256)
    _retained_after_scan(_inventory(tmp_path, pki, _wide(10, 6)), workers)  # one-time caches (verifier, imports)
    # tracemalloc counts every thread of this process: a thread an earlier test of this worker left running can
    # allocate inside one window (seen once in CI: 3.8 MB in one). Each figure is the lesser of two scans; memory
    # the scan itself keeps per endpoint shows in both.
    small = min(_retained_after_scan(_inventory(tmp_path, pki, _wide(10, 6)), workers) for _ in range(2))
    large = min(_retained_after_scan(_inventory(tmp_path, pki, _wide(10, 60)), workers) for _ in range(2))
    assert (small[2], large[2]) == (240, 2400)
    assert small[1] <= 20 and large[1] <= 20  # only the `keep` most urgent results are objects
    per_endpoint = (large[0] - small[0]) / (large[2] - small[2])
    assert per_endpoint < 100, f"{per_endpoint:.0f} bytes more per endpoint ({small[0]} -> {large[0]})"
