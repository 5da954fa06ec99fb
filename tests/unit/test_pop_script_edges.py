"""The POP scripts at their edges (a review's findings, each shown to fail before its fix): a live link that reaches
archive/<name>/N/ under another spelling, certbot's K equal to the store's N with another N/ there, a link target
or file name with a newline in it, a reused version's key mode, and leftovers of killed scripts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from certmgr.deploy import COMMIT_SH, INSPECT_SH, PRUNE_SH, sha256sums
from certmgr.deploy.model import parse_commit, parse_inspection
from tests.unit.test_deploy import NAME, certbot_root, linked_root, material, sh, upload

OTHER = "other.example"


def live(root: Path, name: str = NAME) -> Path:
    return root / "live" / name


def relink(root: Path, target: str, name: str = NAME) -> None:
    os.unlink(live(root, name))
    os.symlink(target, live(root, name))


@pytest.mark.parametrize("spelling", ["absolute", "trailing slash"])
@pytest.mark.parametrize("test", ["false", "true"])
def test_a_live_link_into_n_under_another_spelling_never_dangles_nor_skips_the_swap(
        tmp_path: Path, spelling: str, test: str) -> None:
    """live/<name> reaches archive/<name>/2/ (other content) by an absolute path or with a trailing slash; the store's
    version 2 arrives. 2/ is copied aside and live pointed at the copy before 2/ moves: with the test failing, live
    serves what it served before (never the new, untested version, never a dangling link); with it passing, the new
    version, and the rollback target is the copy."""
    root = linked_root(tmp_path, 1)
    before = material((OTHER,))
    upload(root, "2", before)
    relink(root, f"{root}/archive/{NAME}/2" if spelling == "absolute" else f"../archive/{NAME}/2/")
    m = material()
    upload(root, ".tmp-up-t-x-2", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-up-t-x-2", "2", sha256sums(m), "", test, "true", "", "t", "STAMP")
    c = parse_commit(res).certs[NAME]
    aside = "2.certmgr-aside-STAMP"
    assert c.aside == aside, res.stdout + res.stderr
    assert c.prev == f"../archive/{NAME}/{aside}"
    served = (live(root) / "fullchain.pem").read_bytes()
    if test == "false":
        assert res.exit_status == 4 and served == before.fullchain, res.stdout
        assert os.readlink(live(root)) == f"../archive/{NAME}/{aside}"
    else:
        assert res.get("done") == "1" and served == m.fullchain, res.stdout
    assert (root / "archive" / NAME / aside / "fullchain.pem").read_bytes() == before.fullchain


def test_certbot_k_equal_to_the_store_version_with_another_k_dir_keeps_both_apart(tmp_path: Path) -> None:
    """certbot's layout at K=3, the store's version is 3 too, and archive/<name>/3/ holds something else: certbot's
    copy and the other 3/ are set aside under two names, and a failed test puts live back on certbot's certificate
    (not on the other content)."""
    root, certbot = certbot_root(tmp_path, k=3)
    stale = material((OTHER,))
    upload(root, "3", stale)
    m = material()
    upload(root, ".tmp-up-t-x-3", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-up-t-x-3", "3", sha256sums(m), "3", "false", "true", "", "t", "STAMP")
    assert res.exit_status == 4, res.stdout + res.stderr
    c = parse_commit(res).certs[NAME]
    assert c.convdir == "3.certmgr-aside-STAMP" and c.aside is not None and c.aside != c.convdir, res.stdout
    assert (live(root) / "fullchain.pem").read_bytes() == certbot.fullchain
    kept = root / "archive" / NAME
    assert (kept / c.convdir / "fullchain.pem").read_bytes() == certbot.fullchain
    assert (kept / c.aside / "fullchain.pem").read_bytes() == stale.fullchain


@pytest.mark.parametrize("target", ["../archive/{n}/2/", "{root}/archive/{n}/2"])
def test_prune_keeps_the_live_version_however_its_link_is_spelled(tmp_path: Path, target: str) -> None:
    """A live link with a trailing slash or an absolute path still names the live version (and the one before it):
    pruning to 2 of 5 keeps 2 (live) and 1 (its rollback target), never leaves live dangling."""
    root = linked_root(tmp_path, 5)
    relink(root, target.format(n=NAME, root=root))
    res = sh(PRUNE_SH, str(root), "2", "5", "", "", NAME)
    assert res.get("kept_live") == "2", res.stdout + res.stderr
    assert sorted(res.all("removed")) == ["3"]
    assert sorted(os.listdir(root / "archive" / NAME)) == ["1", "2", "4", "5"]
    assert (live(root) / "fullchain.pem").exists()


def test_a_newline_in_a_link_target_cannot_forge_an_inspection_line(tmp_path: Path) -> None:
    """A live link whose target holds a newline and `cert=`/`version=` lines: inspect's output keeps every value on
    its line — the other certificate's section gets no forged version, this one's target reads as no version."""
    root = linked_root(tmp_path, 1)
    (root / "archive" / OTHER).mkdir()
    upload(root, "1", material((OTHER,)), OTHER)
    os.symlink(f"../archive/{OTHER}/1", live(root, OTHER))
    relink(root, f"../archive/{NAME}/1\ncert={OTHER}\nlayout=link\ntarget=../archive/{OTHER}/7\nversion=7")
    res = sh(INSPECT_SH, str(root), NAME, "", "", "5", "", OTHER)
    state = parse_inspection(res)
    assert sorted(state.certs[OTHER].versions) == [1], res.stdout
    assert state.certs[OTHER].target == f"../archive/{OTHER}/1"
    assert state.certs[NAME].target == f"../archive/{NAME}/1\\n...", res.stdout
    assert sorted(state.certs[NAME].versions) == [1]


def test_a_reused_version_gets_an_owner_only_key(tmp_path: Path) -> None:
    """archive/<name>/2/ already holds this very certificate (an earlier attempt, a hand-made copy) with its key
    0644: the commit uses it and makes the key 0600."""
    root = linked_root(tmp_path, 1)
    m = material()
    upload(root, "2", m)
    (root / "archive" / NAME / "2" / "privkey.pem").chmod(0o644)
    upload(root, ".tmp-up-t-x-2", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-up-t-x-2", "2", sha256sums(m), "", "true", "true")
    assert res.get("done") == "1" and res.get("reused") == "2", res.stdout + res.stderr
    assert stat.S_IMODE((root / "archive" / NAME / "2" / "privkey.pem").stat().st_mode) == 0o600


def test_leftovers_of_killed_scripts_are_swept_by_the_next_commit(tmp_path: Path) -> None:
    """A conversion killed between its two tars leaves archive/.tmp-conv<pid>.tar (certbot's keys in it); a fence
    write killed before its rename leaves archive/.certmgr-fence.tmp-<pid>. The next commit removes both."""
    root = linked_root(tmp_path, 1)
    litter = [root / "archive" / ".tmp-conv4242.tar", root / "archive" / ".certmgr-fence.tmp-4243"]
    for f in litter:
        f.write_text("left by a killed script")
    m = material()
    upload(root, ".tmp-up-t-x-2", m)
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-up-t-x-2", "2", sha256sums(m), "", "true", "true")
    assert res.get("done") == "1", res.stdout + res.stderr
    assert not [f for f in litter if f.exists()]


def test_last_commit_names_only_a_certificate_this_commit_may_switch(tmp_path: Path) -> None:
    """Of two certificates, one whose upload does not match its sums is not switched: no `.last-commit-<name>`
    says this commit's upload for it (a later settlement would read "switched and switched back")."""
    root = linked_root(tmp_path, 1)
    (root / "archive" / OTHER).mkdir()
    upload(root, "1", material((OTHER,)), OTHER)
    os.symlink(f"../archive/{OTHER}/1", live(root, OTHER))
    good, bad = material(), material((OTHER,))
    upload(root, ".tmp-up-t-x-2", good)
    upload(root, ".tmp-up-t-y-2", bad, OTHER)
    (root / "archive" / OTHER / ".tmp-up-t-y-2" / "chain.pem").write_text("not what was sent")
    res = sh(COMMIT_SH, str(root), NAME, ".tmp-up-t-x-2", "2", sha256sums(good), "", "true", "true", "", "t",
             "STAMP", "5", "", "", "", OTHER, ".tmp-up-t-y-2", "2", sha256sums(bad), "")
    c = parse_commit(res)
    assert c.certs[NAME].swapped and c.certs[OTHER].failed_step == "verify", res.stdout + res.stderr
    assert (root / "archive" / f".last-commit-{NAME}").read_text() == ".tmp-up-t-x-2\n"
    assert not (root / "archive" / f".last-commit-{OTHER}").exists()


def test_a_certbot_link_into_another_lineage_is_not_taken_for_this_ones_version(tmp_path: Path) -> None:
    """certbot's live/<name>/chain.pem leads to ../../archive/<other>/chain3.pem: inspect does not report it as
    K=3 of this lineage (a conversion would copy archive/<name>/chain3.pem instead), so the conversion is refused."""
    from certmgr.deploy.plan import certbot_version

    root, _ = certbot_root(tmp_path, k=3)
    (root / "archive" / OTHER).mkdir()
    (root / "archive" / OTHER / "chain3.pem").write_text("another lineage's chain")
    os.unlink(live(root) / "chain.pem")
    os.symlink(f"../../archive/{OTHER}/chain3.pem", live(root) / "chain.pem")
    state = parse_inspection(sh(INSPECT_SH, str(root), NAME, "", "", "5", ""))
    k, why = certbot_version(state.certs[NAME].fields, NAME)
    assert k is None and why == f"live/{NAME}/chain.pem is not a link to archive/{NAME}/chainK.pem", why
    assert certbot_version(parse_inspection(sh(INSPECT_SH, str(certbot_root(tmp_path / "ok", k=3)[0]), NAME, "",
                                                  "", "5", "")).certs[NAME].fields, NAME) == (3, None)


@pytest.mark.parametrize("sep", ["\r", "\v", "\x1c", "\x85"])
def test_a_line_break_other_than_newline_in_a_link_target_forges_no_key(tmp_path: Path, sep: str) -> None:
    """A target holding "\\r" (or another character str.splitlines() ends a line at) and `version=9`: the parser
    ends lines at "\\n" only, as `say` writes them, so no version 9 appears and the target reads as no version."""
    import subprocess

    from certmgr.deploy.plan import version_of_target
    from certmgr.remote import Result, parse_kv, sh_command

    root = linked_root(tmp_path, 1)
    relink(root, f"../archive/{NAME}/1{sep}version=9")
    # bytes, decoded as the SSH session does (a text-mode pipe would turn "\r" into "\n" on its own)
    proc = subprocess.run(["sh", "-c", sh_command(INSPECT_SH, [str(root), NAME, "", "", "5", ""])],
                          capture_output=True, timeout=30, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    state = parse_inspection(Result(exit_status=proc.returncode, stdout=out, stderr="", fields=parse_kv(out)))
    assert sorted(state.certs[NAME].versions) == [1], state.certs[NAME].fields
    assert version_of_target(state.certs[NAME].target, NAME) is None
