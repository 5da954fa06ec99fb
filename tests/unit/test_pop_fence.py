"""Unit tests for fencing on the POP (deploy/scripts/fence.sh through commit.sh) and the lab-only trace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certmgr.deploy import COMMIT_SH, PRUNE_SH, ROLLBACK_SH, sha256sums
from certmgr.deploy import fence as fence_mod
from certmgr.inventory import Host
from certmgr.remote import Result
from lab import hatrace
from tests.unit.test_deploy import NAME, linked_root, material, sh, upload


def commit(root: Path, ver: int, epoch: str, holder: str) -> Result:
    """Upload version `ver` and run commit.sh for it with this epoch and holder."""
    m = material()
    tmp = f".tmp-up-t-{ver}"
    upload(root, tmp, m)
    return sh(COMMIT_SH, str(root), NAME, tmp, str(ver), sha256sums(m), "", "true", "true", "", "t",
              "20261127T120000Z", "5", epoch, holder)


def fence_file(root: Path) -> str:
    return (root / "archive" / ".certmgr-fence").read_text()


def live(root: Path) -> str:
    return os.readlink(root / "live" / NAME)


def test_a_first_epoch_is_recorded_and_the_commit_goes_on(tmp_path: Path) -> None:
    """The first fenced commit writes "EPOCH HOLDER" beside the lock and switches as usual."""
    root = linked_root(tmp_path)
    res = commit(root, 2, "3", "ctl-a/11")
    assert res.exit_status == 0 and res.get("done") == "1", res.stdout + res.stderr
    assert fence_file(root) == "3 ctl-a/11\n"
    assert live(root) == f"../archive/{NAME}/2"


@pytest.mark.parametrize(("epoch", "holder", "why"), [
    ("4", "ctl-a/11", "an older epoch"),
    ("5", "ctl-a/11", "the same epoch from another holder"),
])
def test_a_stale_or_foreign_epoch_is_refused_and_nothing_switches(tmp_path: Path, epoch: str, holder: str,
                                                                  why: str) -> None:
    """After B committed with epoch 5, A's commit with an older epoch, or the same epoch from another holder, is refused: exit 6, `fenced=5 ctl-b/22`, live and the fence file unchanged."""
    root = linked_root(tmp_path)
    assert commit(root, 2, "5", "ctl-b/22").exit_status == 0
    res = commit(root, 3, epoch, holder)
    assert res.exit_status == 6 and res.get("fenced") == "5 ctl-b/22", (why, res.stdout, res.stderr)
    assert res.get("stored") is None and live(root) == f"../archive/{NAME}/2"
    assert fence_file(root) == "5 ctl-b/22\n"
    host = Host(name="sally", address="x", cert_root=str(root))
    token = fence_mod.Token(epoch=int(epoch), holder=holder)
    assert fence_mod.refusal(res, host, token) == f"fenced: sally saw epoch 5 from holder ctl-b/22; ours {epoch} from {holder}"


def test_the_same_holder_again_and_a_newer_epoch_pass(tmp_path: Path) -> None:
    """The holder that set the epoch may commit again with it (rollback in one transaction); a newer epoch replaces it."""
    root = linked_root(tmp_path)
    assert commit(root, 2, "5", "ctl-b/22").exit_status == 0
    assert commit(root, 3, "5", "ctl-b/22").exit_status == 0
    assert commit(root, 4, "6", "ctl-a/11").exit_status == 0
    assert fence_file(root) == "6 ctl-a/11\n" and live(root) == f"../archive/{NAME}/4"


def test_without_an_epoch_nothing_is_checked_or_written(tmp_path: Path) -> None:
    """The directory store passes no epoch: a fence file of another controller is neither read nor replaced."""
    root = linked_root(tmp_path)
    (root / "archive" / ".certmgr-fence").write_text("9 ctl-b/22\n")
    res = commit(root, 2, "", "")
    assert res.exit_status == 0 and res.get("fenced") is None
    assert fence_file(root) == "9 ctl-b/22\n" and live(root) == f"../archive/{NAME}/2"


def test_the_lab_trace_gets_begin_and_end_lines_only_when_its_file_exists(tmp_path: Path) -> None:
    """Without archive/.certmgr-trace nothing is traced; with it, each commit appends begin/end (a refusal: fenced)."""
    root = linked_root(tmp_path)
    assert commit(root, 2, "1", "ctl-a/11").exit_status == 0
    trace = root / "archive" / ".certmgr-trace"
    assert not trace.exists()
    trace.write_text("")
    assert commit(root, 3, "2", "ctl-b/22").exit_status == 0
    assert commit(root, 4, "1", "ctl-a/11").exit_status == 6
    lines = [line.split() for line in trace.read_text().splitlines()]
    assert [(w[0], w[1], w[2]) for w in lines] == [("begin", "holder=ctl-b/22", "epoch=2"),
                                                   ("end", "holder=ctl-b/22", "epoch=2"),
                                                   ("fenced", "holder=ctl-a/11", "epoch=1")]
    assert lines[0][3] == lines[1][3] and lines[0][3].startswith("pid=")


def _line(word: str, pid: int, epoch: int | None) -> hatrace.Line:
    return hatrace.Line(word=word, holder=f"ctl/{pid}", epoch=epoch, pid=pid, time="t")


@pytest.mark.parametrize(("words", "found"), [
    ([("begin", 1, 3), ("end", 1, 3), ("begin", 2, 4), ("end", 2, 4)], []),
    ([("begin", 1, 3), ("end", 1, 3), ("fenced", 2, 2), ("begin", 3, None), ("end", 3, None)], []),
    ([("begin", 1, 3), ("begin", 2, 4), ("end", 2, 4), ("end", 1, 3)],
     ["line 2: begin of pid 2 while pid 1 (epoch 3) is open", "line 4: end of pid 1 without its begin"]),
    ([("begin", 1, 5), ("end", 1, 5), ("begin", 2, 4), ("end", 2, 4)], ["line 3: epoch 4 after 5"]),
    ([("begin", 1, 5)], ["pid 1 (epoch 5) began and never ended"]),
])
def test_the_observer_names_overlapping_transactions_and_decreasing_epochs(
        words: list[tuple[str, int, int | None]], found: list[str]) -> None:
    """lab/hatrace.violations: two begins without an end between them, an end not of the open begin, an epoch below an earlier one."""
    assert hatrace.violations([_line(*w) for w in words]) == found


def test_a_stale_epoch_cannot_switch_back_either(tmp_path: Path) -> None:
    """rollback.sh (switching back after a failed verify) is fenced like commit.sh: A's older epoch leaves B's live link alone."""
    root = linked_root(tmp_path)
    assert commit(root, 2, "5", "ctl-b/22").exit_status == 0
    res = sh(ROLLBACK_SH, str(root), NAME, f"../archive/{NAME}/1", "true", "true", "5", "4", "ctl-a/11")
    assert res.exit_status == 6 and res.get("fenced") == "5 ctl-b/22" and res.get("rolled_back") is None
    assert live(root) == f"../archive/{NAME}/2"
    same = sh(ROLLBACK_SH, str(root), NAME, f"../archive/{NAME}/1", "true", "true", "5", "5", "ctl-b/22")
    assert same.exit_status == 0 and live(root) == f"../archive/{NAME}/1"  # the holder's own rollback goes on


def _prune(root: Path, epoch: str, holder: str) -> Result:
    """prune.sh keeping 1 version, with this epoch and holder (before the names)."""
    return sh(PRUNE_SH, str(root), "1", "5", epoch, holder, NAME)


def _versions(root: Path) -> list[str]:
    return sorted(e for e in os.listdir(root / "archive" / NAME) if e.isdigit())


@pytest.mark.parametrize(("epoch", "holder", "why"), [
    ("4", "ctl-a/11", "an older epoch"),
    ("5", "ctl-a/11", "the same epoch from another holder"),
])
def test_a_stale_or_foreign_epoch_cannot_prune(tmp_path: Path, epoch: str, holder: str, why: str) -> None:
    """prune.sh is fenced like commit.sh: after B's epoch 5, an older epoch or B's epoch from A exits 6 with `fenced=5 ctl-b/22` and removes nothing."""
    root = linked_root(tmp_path, versions=4)
    (root / "archive" / ".certmgr-fence").write_text("5 ctl-b/22\n")
    res = _prune(root, epoch, holder)
    assert res.exit_status == 6 and res.get("fenced") == "5 ctl-b/22", (why, res.stdout, res.stderr)
    assert res.all("removed") == [] and res.get("kept_live") is None
    assert _versions(root) == ["1", "2", "3", "4"] and fence_file(root) == "5 ctl-b/22\n"
    host = Host(name="sally", address="x", cert_root=str(root))
    assert fence_mod.refusal(res, host, fence_mod.Token(epoch=int(epoch), holder=holder)) == (
        f"fenced: sally saw epoch 5 from holder ctl-b/22; ours {epoch} from {holder}")


def test_the_holder_or_a_newer_epoch_prunes_and_no_epoch_checks_nothing(tmp_path: Path) -> None:
    """The fence's own holder prunes; a newer epoch prunes and is recorded; the directory store ("" "") prunes without reading or writing the fence file."""
    for epoch, holder, after in (("5", "ctl-b/22", "5 ctl-b/22\n"), ("6", "ctl-a/11", "6 ctl-a/11\n"),
                                 ("", "", "5 ctl-b/22\n")):
        root = linked_root(tmp_path / (epoch or "none"), versions=4)
        (root / "archive" / ".certmgr-fence").write_text("5 ctl-b/22\n")
        res = _prune(root, epoch, holder)
        assert res.exit_status == 0 and sorted(res.all("removed")) == ["1", "2"], (epoch, res.stdout, res.stderr)
        assert _versions(root) == ["3", "4"] and fence_file(root) == after
