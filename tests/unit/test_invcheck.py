"""`inventory check` looks at the files the inventory names, on this machine, and says what only a run can check."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from certmgr.cli import main
from lab.pki import make_ca
from tests import inv

INV = inv.toml(
    defaults={"ssh_key_file": "id", "known_hosts": "known_hosts", "trust": ["roots.pem"]},
    ca={"pebble": {"directory": "https://127.0.0.1:14000/dir", "agree_tos": True, "trust": "pebble.pem"}},
    dns=inv.LAB_DNS, hosts={"sally": {"address": "127.0.1.2"}, "esme": {"address": "127.0.1.3"}},
    certificates=[inv.cert("media.hachyderm.test", "sally", "esme")],
    channels={"ops": {"type": "webhook", "url_file": "hook-url"},
              "chat": {"type": "matrix", "homeserver": "https://127.0.0.1:8448", "room": "!r:hachyderm.test",
                       "token_env": "MATRIX_TOKEN"}})


def write(tmp_path: Path, text: str = INV, *, skip: tuple[str, ...] = (), url: str = "http://127.0.0.1:9/hook") -> Path:
    """The inventory in tmp_path with every file it names present, except those in `skip`."""
    pem = make_ca("invcheck test CA").cert_pem
    files = {"id": b"key\n", "known_hosts": b"", "roots.pem": pem, "pebble.pem": pem, "tsig.key": b"c2VjcmV0\n",
             "hook-url": url.encode() + b"\n"}
    for name, data in files.items():
        if name not in skip:
            (tmp_path / name).write_bytes(data)
    path = tmp_path / "domains.toml"
    path.write_text(text)
    return path


def check(path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--inventory", str(path), "inventory", "check", *args])
    return result.exit_code, result.output


NOTE = ("note: channels.chat.token_env: systemd credentials, environment variables and ${VAR} paths are read at "
        "run time, not here (`certmgr doctor` under the service's environment reads them)")


def test_all_files_present_is_ok_with_a_note(tmp_path: Path) -> None:
    """With every named file present, check exits 0 and says plainly which secrets only a run reads."""
    code, out = check(write(tmp_path))
    assert code == 0, out
    assert out.splitlines() == [
        f"{tmp_path / 'domains.toml'}: ok — 1 certificates (1 names), 2 hosts, 1 DNS providers, 1 CAs, 2 channels",
        NOTE,
    ]


MISSING = [
    ("tsig.key", "dns.lab.tsig_secret_file: cannot read secret file {d}/tsig.key: No such file or directory"),
    ("hook-url", "channels.ops.url_file: cannot read secret file {d}/hook-url: No such file or directory"),
    ("roots.pem", "defaults.trust[0]: cannot read {d}/roots.pem: No such file or directory"),
    ("pebble.pem", "ca.pebble.trust: cannot read {d}/pebble.pem: No such file or directory"),
    ("id", "hosts.*.ssh_key_file (all 2 hosts, from [defaults] or each host): cannot read {d}/id: "
           "No such file or directory"),
    ("known_hosts", "hosts.*.known_hosts (all 2 hosts, from [defaults] or each host): cannot read "
                    "{d}/known_hosts: No such file or directory (create it with the POPs' keys, or "
                    "`touch {d}/known_hosts` and run `certmgr deploy --accept-new` once to record them)"),
]


@pytest.mark.parametrize(("missing", "problem"), MISSING, ids=[m for m, _ in MISSING])
def test_missing_file_is_refused_naming_its_key(tmp_path: Path, missing: str, problem: str) -> None:
    """A `*_file` secret, trust bundle, SSH key or known_hosts that does not exist is an error (exit 2) naming its key."""
    code, out = check(write(tmp_path, skip=(missing,)))
    assert code == 2
    assert out.splitlines() == [f"certmgr: error: inventory {tmp_path / 'domains.toml'}: 1 problem",
                                "  " + problem.format(d=tmp_path)]


def test_trust_file_without_pem_is_refused(tmp_path: Path) -> None:
    """A trust bundle that holds no PEM certificate is refused."""
    path = write(tmp_path)
    (tmp_path / "pebble.pem").write_text("not a certificate\n")
    code, out = check(path)
    assert code == 2 and f"  ca.pebble.trust: {tmp_path / 'pebble.pem'} holds no PEM certificate" in out


@pytest.mark.parametrize(("url", "why"), [
    ("http://hooks.example.test/s3cr3t", "is http:// to a host that is not loopback: use https:// (the token or "
                                         "URL would cross the network in clear text)"),
    ("http://[::1/s3cr3t", "is not a valid URL (Invalid IPv6 URL)"),
])
def test_webhook_url_file_is_checked_without_showing_it(tmp_path: Path, url: str, why: str) -> None:
    """A webhook URL read from its file must be https:// (or http:// to loopback) and parse; the URL is never shown."""
    code, out = check(write(tmp_path, url=url))
    assert code == 2
    assert f"  channels.ops.url_file: the URL in {tmp_path / 'hook-url'} {why}" in out
    assert "s3cr3t" not in out


def test_warnings_print_and_exit_0(tmp_path: Path) -> None:
    """Warnings (hmac-sha1, the old `user` key) are printed after the summary and the exit status stays 0."""
    text = INV.replace('tsig_key = "certmgr-lab"', 'tsig_key = "certmgr-lab"\ntsig_algorithm = "hmac-sha1"')
    text = text.replace('address = "127.0.1.3"', 'address = "127.0.1.3"\nuser = "deploy"')
    code, out = check(write(tmp_path, text))
    assert code == 0, out
    assert out.splitlines()[1:] == [
        "warning: dns.lab.tsig_algorithm: hmac-sha1 is deprecated (RFC 8945 §6); generate a hmac-sha256 key",
        "warning: hosts.esme.user: deprecated name: rename it to ssh_user (as in [defaults])",
        NOTE,
    ]
    assert out.splitlines()[0].endswith(", 2 warnings")


def test_syntax_only_skips_the_files(tmp_path: Path) -> None:
    """--syntax-only validates the file without looking for the files it names, and says so."""
    code, out = check(write(tmp_path, skip=("id", "tsig.key")), "--syntax-only")
    assert code == 0, out
    assert out.splitlines()[-1] == "note: --syntax-only: the files the inventory names were not looked at"


def test_unset_credentials_directory_path_is_left_to_run_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ssh_key_file under ${CREDENTIALS_DIRECTORY} outside systemd is a note, not an error."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = INV.replace('ssh_key_file = "id"', 'ssh_key_file = "${CREDENTIALS_DIRECTORY}/id"')
    code, out = check(write(tmp_path, text, skip=("id",)))
    assert code == 0, out
    assert out.splitlines()[-1].startswith("note: channels.chat.token_env, hosts.*.ssh_key_file (all 2 hosts")
