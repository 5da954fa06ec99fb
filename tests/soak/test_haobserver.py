"""The two-controller soak's database and trace observer states its invariants right (no lab, no database needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.soak.haobserver import Stored, TraceLine, issuances, renewals_needed, trace_violations, unaudited_versions


def _t(word: str, epoch: int | None, pid: int, holder: str = "h/1") -> TraceLine:
    return TraceLine(word, holder, epoch, pid, "t")


def test_haobserver_shares_no_code_with_certmgr_or_the_lab() -> None:
    """haobserver imports only the standard library, psycopg and cryptography: it cannot share certmgr's bugs."""
    tree = ast.parse(Path(__file__).with_name("haobserver.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "math", "collections", "dataclasses", "pathlib", "typing", "psycopg",
                       "cryptography"}, modules


@pytest.mark.parametrize(("lines", "expected"), [
    ([_t("begin", 1, 10), _t("end", 1, 10), _t("begin", 2, 11), _t("end", 2, 11)], []),
    ([_t("begin", 3, 10), _t("end", 3, 10), _t("fenced", 2, 11), _t("begin", 3, 12), _t("end", 3, 12)], []),
    ([_t("begin", 1, 10, "a/1"), _t("begin", 2, 11, "b/2"), _t("end", 2, 11), _t("end", 1, 10)],
     ["line 2: b/2 (epoch 2) began while a/1 (epoch 1, since t) had not ended",
      "line 4: end of pid 10 (h/1) without its begin"]),
    ([_t("begin", 5, 10, "b/2"), _t("end", 5, 10), _t("begin", 4, 11, "a/1"), _t("end", 4, 11)],
     ["line 3: epoch 4 from a/1 accepted after epoch 5 from b/2"]),
])
def test_trace_violations_find_overlaps_and_decreasing_epochs(lines: list[TraceLine], expected: list[str]) -> None:
    """Two transactions open at once and an accepted epoch below an earlier one are reported; a fenced line is not."""
    assert trace_violations(lines) == expected


def test_issuances_count_add_version_rows_and_unaudited_versions_are_found() -> None:
    """Issuances are add_version rows per name; a stored version whose serial no add_version row names is reported."""
    audit = [{"action": "add_version", "object": "a", "serial": "0A:1B"}, {"action": "activate", "object": "a"},
             {"action": "add_version", "object": "a", "serial": "FF"}, {"action": "deployed", "object": "b"}]
    assert issuances(audit) == {"a": 2}
    stored = [Stored("a", 1, "a1b"), Stored("a", 2, "ff"), Stored("b", 1, "1")]
    assert unaudited_versions(audit, stored) == [Stored("b", 1, "1")]


def test_renewals_needed_counts_the_first_and_one_per_earliest_renewal_point() -> None:
    """With renewal from 60% of the lifetime left, 100 s of 50-s certificates need at most 1 + 100/20 renewals."""
    assert renewals_needed(100, 50, 0.6) == 6
    assert renewals_needed(19, 50, 0.6) == 1
