"""Inventory validation: every bad input gets one exact message naming its key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from certmgr import inventory
from certmgr.errors import InventoryError, SecretError
from tests import inv

BASE = inv.toml(
    defaults={"ca": "pebble"}, ca=inv.LAB_CA, dns=inv.LAB_DNS,
    hosts={"sally": {"address": "127.0.1.2", "tags": ["cdn", "canary"]}, "esme": {"address": "127.0.1.3", "tags": ["cdn"]}},
    certificates=[inv.cert("media.hachyderm.test", "tag:cdn")],
    channels={"ops": {"type": "discord", "url_file": "discord-url"}})


def problems(text: str) -> list[str]:
    with pytest.raises(InventoryError) as info:
        inventory.loads(textwrap.dedent(text), base=Path("/etc/certmgr"))
    return info.value.problems


def with_cert(**fields: str) -> str:
    """BASE plus a second certificate whose keys are given as raw TOML values."""
    body = "\n".join(f"{k} = {v}" for k, v in fields.items())
    return BASE + "\n[[certificates]]\n" + body + "\n"


# (inventory text, the exact problem expected)
BAD: list[tuple[str, str, str]] = [
    ("unknown top-level key", BASE + "\n[defualts2]\n", "defualts2: unknown key (did you mean 'defaults'?)"),
    ("unknown key with suggestion", BASE.replace('address = "127.0.1.2"', 'address = "127.0.1.2"\nprot = 22'),
     "hosts.sally.prot: unknown key (did you mean 'port'?)"),
    ("undefined host", with_cert(name='"a.hachyderm.test"', domains='["a.hachyderm.test"]', hosts='["salyl"]'),
     "certificates[1].hosts[0]: no host named 'salyl' (did you mean 'sally'?)"),
    ("undefined tag", with_cert(name='"a.hachyderm.test"', domains='["a.hachyderm.test"]', hosts='["tag:cnd"]'),
     "certificates[1].hosts[0]: no host has tag 'cnd' (did you mean 'cdn'?)"),
    ("shell metacharacters in name", with_cert(name='"a.hachyderm.test;reboot"', domains='["a.hachyderm.test"]'),
     "certificates[1].name: 'a.hachyderm.test;reboot' is not a valid certificate name (lower-case letters, "
     "digits, '.', '-', '_'; it becomes a directory name on every host)"),
    ("path traversal in name", with_cert(name='"../../etc"', domains='["a.hachyderm.test"]'),
     "certificates[1].name: '../../etc' is not a valid certificate name (lower-case letters, digits, '.', '-', "
     "'_'; it becomes a directory name on every host)"),
    ("NUL byte in name", with_cert(name='"a\\u0000b.hachyderm.test"', domains='["a.hachyderm.test"]'),
     "certificates[1].name: 'a\\x00b.hachyderm.test' is not a valid certificate name (lower-case letters, "
     "digits, '.', '-', '_'; it becomes a directory name on every host)"),
    ("command substitution in domain", with_cert(name='"x.hachyderm.test"', domains='["$(id).hachyderm.test"]'),
     "certificates[1].domains[0]: '$(id).hachyderm.test' contains characters not allowed in a DNS name: '$()'"),
    ("semicolon in domain", with_cert(name='"x.hachyderm.test"', domains='["a.hachyderm.test;reboot"]'),
     "certificates[1].domains[0]: 'a.hachyderm.test;reboot' contains characters not allowed in a DNS name: ';'"),
    ("slash in domain", with_cert(name='"x.hachyderm.test"', domains='["a/b.hachyderm.test"]'),
     "certificates[1].domains[0]: 'a/b.hachyderm.test' contains characters not allowed in a DNS name: '/'"),
    ("wildcard not leftmost", with_cert(name='"x.hachyderm.test"', domains='["a.*.hachyderm.test"]'),
     "certificates[1].domains[0]: 'a.*.hachyderm.test': a wildcard is only allowed as the leftmost label"),
    ("partial wildcard label", with_cert(name='"x.hachyderm.test"', domains='["a*.hachyderm.test"]'),
     "certificates[1].domains[0]: 'a*.hachyderm.test': '*' must be a whole label"),
    ("unicode confusable", with_cert(name='"x.hachyderm.test"', domains='["раураl.hachyderm.test"]'),
     "certificates[1].domains[0]: 'раураl.hachyderm.test' contains non-ASCII characters; write the A-label form "
     "'xn--l-7sba6dbr.hachyderm.test'"),
    ("upper case", with_cert(name='"x.hachyderm.test"', domains='["WWW.hachyderm.test"]'),
     "certificates[1].domains[0]: 'WWW.hachyderm.test' must be lower case"),
    ("label starts with hyphen", with_cert(name='"x.hachyderm.test"', domains='["-a.hachyderm.test"]'),
     "certificates[1].domains[0]: '-a.hachyderm.test': label '-a' must not start or end with '-'"),
    ("label too long", with_cert(name='"x.hachyderm.test"', domains=f'["{"a" * 64}.hachyderm.test"]'),
     f"certificates[1].domains[0]: '{'a' * 64}.hachyderm.test': label 'aaaaaaaaaaaaaaaaaaaa'… is longer than 63 "
     "characters"),
    ("single label", with_cert(name='"x.hachyderm.test"', domains='["localhost"]'),
     "certificates[1].domains[0]: 'localhost' is not a fully qualified name"),
    ("domain outside zones", with_cert(name='"x.example.com"', domains='["x.example.com"]'),
     "certificates[1].domains[0]: 'x.example.com' is in none of dns.lab's zones (hachyderm.test)"),
    ("duplicate certificate name", with_cert(name='"media.hachyderm.test"', domains='["m2.hachyderm.test"]'),
     "certificates[1].name: duplicate certificate name 'media.hachyderm.test' (also certificates[0])"),
    ("domain on two certificates", with_cert(name='"m2.hachyderm.test"', domains='["media.hachyderm.test"]'),
     "certificates[1].domains[0]: 'media.hachyderm.test' is already on certificate 'media.hachyderm.test'"),
    ("domain listed twice", with_cert(name='"m2.hachyderm.test"', domains='["m2.hachyderm.test", "m2.hachyderm.test"]'),
     "certificates[1].domains[1]: 'm2.hachyderm.test' is listed twice"),
    ("empty domains", with_cert(name='"m2.hachyderm.test"', domains="[]"), "certificates[1].domains: must not be empty"),
    ("missing domains", with_cert(name='"m2.hachyderm.test"'), "certificates[1].domains: required key is missing"),
    ("wrong type", with_cert(name="42", domains='["m2.hachyderm.test"]'), "certificates[1].name: must be a string, not an integer"),
    ("bool where int", BASE.replace('address = "127.0.1.3"', 'address = "127.0.1.3"\nport = true'),
     "hosts.esme.port: must be an integer, not a boolean"),
    ("port out of range", BASE.replace('address = "127.0.1.3"', 'address = "127.0.1.3"\nport = 70000'),
     "hosts.esme.port: 70000 is not a port number (1-65535)"),
    ("unknown key type", with_cert(name='"m2.hachyderm.test"', domains='["m2.hachyderm.test"]', key_type='"ecdsa-256"'),
     "certificates[1].key_type: 'ecdsa-256' is not one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096 "
     "(did you mean 'ecdsa-p256'?)"),
    ("bad threshold", with_cert(name='"m2.hachyderm.test"', domains='["m2.hachyderm.test"]', renew_before='"soon"'),
     "certificates[1].renew_before: 'soon' is neither a duration (\"30d\") nor a fraction of the lifetime "
     "(\"1/3\", \"0.25\")"),
    ("inline TSIG secret", BASE.replace('tsig_secret_file = "tsig.key"', 'tsig_secret = "c2VjcmV0"'),
     "dns.lab.tsig_secret: secrets must not be written inline; use tsig_secret_file, tsig_secret_credential or "
     "tsig_secret_env"),
    ("inline webhook URL", BASE.replace('url_file = "discord-url"', 'url = "https://discord.com/api/webhooks/1/x"'),
     "channels.ops.url: secrets must not be written inline; use url_file, url_credential or url_env"),
    ("two secret sources", BASE.replace('url_file = "discord-url"', 'url_file = "a"\nurl_env = "B"'),
     "channels.ops.url_*: give exactly one of url_file, url_credential, url_env"),
    ("missing TSIG secret", BASE.replace('tsig_secret_file = "tsig.key"', ""),
     "dns.lab.tsig_secret_file: required: the tsig_secret must come from tsig_secret_file, tsig_secret_credential "
     "or tsig_secret_env"),
    ("MD5 refused", BASE.replace('tsig_key = "certmgr-lab"', 'tsig_key = "certmgr-lab"\ntsig_algorithm = "HMAC-MD5.SIG-ALG.REG.INT"'),
     "dns.lab.tsig_algorithm: 'HMAC-MD5.SIG-ALG.REG.INT': HMAC-MD5 is refused; use hmac-sha256"),
    ("server not an IP", BASE.replace('server = "127.0.0.1"', 'server = "ns1.hachyderm.test"'),
     "dns.lab.server: 'ns1.hachyderm.test' must be an IP address (certmgr never resolves the primary through the "
     "system resolver)"),
    ("undefined CA", with_cert(name='"m2.hachyderm.test"', domains='["m2.hachyderm.test"]', ca='"letsencrypt"'),
     "certificates[1].ca: no CA named 'letsencrypt'"),
    ("undefined DNS provider", with_cert(name='"m2.hachyderm.test"', domains='["m2.hachyderm.test"]', dns='"labb"'),
     "certificates[1].dns: no DNS provider named 'labb' (did you mean 'lab'?)"),
    ("http directory", BASE.replace("https://127.0.0.1:14000/dir", "http://127.0.0.1:14000/dir"),
     "ca.pebble.directory: 'http://127.0.0.1:14000/dir' must be an https:// URL"),
    ("contact not mailto", BASE.replace("mailto:ops@hachyderm.test", "ops@hachyderm.test"),
     "ca.pebble.contact[0]: 'ops@hachyderm.test' must be a mailto: address"),
    ("shell string command", BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\ntest_command = "nginx -t; rm -rf /"'),
     "hosts.esme.test_command: must be a list of arguments (argv), e.g. [\"sudo\", \"-n\", \"nginx\", \"-t\"]; "
     "certmgr never runs a shell string"),
    ("relative cert root", BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\ncert_root = "../etc"'),
     "hosts.esme.cert_root: '../etc' must be an absolute path of letters, digits and ._-/@+ (no '..')"),
    ("jump host undefined", BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\njump = "bastoin"'),
     "hosts.esme.jump: no host named 'bastoin'"),
    ("bad host address", BASE.replace('address = "127.0.1.3"', 'address = "127.0.1.3; id"'),
     "hosts.esme.address: '127.0.1.3; id' contains characters not allowed in a DNS name: ' ;'"),
    ("matrix without room", BASE.replace('type = "discord"\nurl_file = "discord-url"',
                                        'type = "matrix"\nhomeserver = "https://m.example"\ntoken_file = "t"'),
     "channels.ops.room: required for a matrix channel"),
    ("unknown channel type", BASE.replace('type = "discord"', 'type = "teams"'),
     "channels.ops.type: 'teams' is not one of discord, slack, matrix, webhook"),
    ("bad duration", BASE.replace('url_file = "discord-url"', 'url_file = "discord-url"\nrepeat = "daily"'),
     "channels.ops.repeat: 'daily' is not a duration (e.g. \"90s\", \"15m\", \"12h\", \"30d\")"),
    ("shell syntax in privkey_group", BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\nprivkey_group = "ssl-cert;id"'),
     "hosts.esme.privkey_group: 'ssl-cert;id' is not a valid name (lower-case letters, digits, '_', '.', '-'; "
     "at most 32) or numeric id"),
    ("negative privkey_owner", BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\nprivkey_owner = -1'),
     "hosts.esme.privkey_owner: -1 is not a user/group name or numeric id"),
    ("hosts not a table", BASE + '\n[[hosts.extra]]\naddress = "127.0.0.9"\n',
     "hosts.extra: must be a table, not an array"),
    ("IP literal as domain", with_cert(name='"x.hachyderm.test"', domains='["127.0.0.1"]'),
     "certificates[1].domains[0]: '127.0.0.1' is an IP address, not a DNS name"),
    ("all-digit last label", with_cert(name='"x.hachyderm.test"', domains='["x.hachyderm.123"]'),
     "certificates[1].domains[0]: 'x.hachyderm.123': the last label must not be all digits (it would read as "
     "an IP address)"),
    ("empty label", with_cert(name='"x.hachyderm.test"', domains='["x..hachyderm.test"]'),
     "certificates[1].domains[0]: 'x..hachyderm.test' has an empty label"),
    ("leading empty label", with_cert(name='"x.hachyderm.test"', domains='[".x.hachyderm.test"]'),
     "certificates[1].domains[0]: '.x.hachyderm.test' has an empty label"),
    ("101 names on one certificate",
     with_cert(name='"x.hachyderm.test"', domains="[" + ", ".join(f'"n{i}.hachyderm.test"' for i in range(101)) + "]"),
     "certificates[1].domains: 101 names; a certificate holds at most 100 (split it into several certificates)"),
    ("verify name not on the certificate",
     with_cert(name='"x.hachyderm.test"', domains='["*.x.hachyderm.test"]', verify_names='["a.b.x.hachyderm.test"]'),
     "certificates[1].verify_names[0]: 'a.b.x.hachyderm.test' is not covered by the certificate's domains"),
    ("wildcard verify name", with_cert(name='"x.hachyderm.test"', domains='["*.x.hachyderm.test"]',
                                       verify_names='["*.x.hachyderm.test"]'),
     "certificates[1].verify_names[0]: '*.x.hachyderm.test': a wildcard is only allowed as the leftmost label"),
    ("empty verify names", with_cert(name='"x.hachyderm.test"', domains='["x.hachyderm.test"]', verify_names="[]"),
     "certificates[1].verify_names: must not be empty"),
    ("http matrix homeserver", BASE.replace('type = "discord"\nurl_file = "discord-url"',
                                           'type = "matrix"\nhomeserver = "http://matrix.example.org"\n'
                                           'room = "!r:example.org"\ntoken_file = "t"'),
     "channels.ops.homeserver: 'http://matrix.example.org' is http:// to a host that is not loopback: use "
     "https:// (the token or URL would cross the network in clear text)"),
    ("homeserver not a URL", BASE.replace('type = "discord"\nurl_file = "discord-url"',
                                         'type = "matrix"\nhomeserver = "matrix.example.org"\n'
                                         'room = "!r:example.org"\ntoken_file = "t"'),
     "channels.ops.homeserver: 'matrix.example.org' must be an https:// URL"),
    ("user and ssh_user on one host", BASE.replace('address = "127.0.1.3"',
                                                  'address = "127.0.1.3"\nuser = "a"\nssh_user = "b"'),
     "hosts.esme.user: give ssh_user only (user is its old name)"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_inventory_exact_message(text: str, expected: str) -> None:
    """Each bad inventory yields exactly this problem, naming its key path."""
    assert problems(text) == [expected]


def test_enough_bad_inventories() -> None:
    """The table covers at least 25 distinct bad inventories, as the foundation issue requires."""
    assert len({e for _, _, e in BAD}) >= 25


def test_all_problems_reported_at_once() -> None:
    """Several problems in one file are all reported, in file order, with exit status 2."""
    text = BASE.replace('tags = ["cdn"]', 'tags = ["cdn"]\nprot = 1') + (
        '\n[[certificates]]\nname = "x.hachyderm.test"\ndomains = ["$(id).hachyderm.test"]\nhosts = ["salyl"]\n')
    with pytest.raises(InventoryError) as info:
        inventory.loads(text)
    assert info.value.exit_code == 2
    assert info.value.problems == [
        "hosts.esme.prot: unknown key (did you mean 'port'?)",
        "certificates[1].domains[0]: '$(id).hachyderm.test' contains characters not allowed in a DNS name: '$()'",
        "certificates[1].hosts[0]: no host named 'salyl' (did you mean 'sally'?)",
    ]
    assert str(info.value).startswith("inventory <string>: 3 problems\n  hosts.esme.prot")


def test_privkey_owner_and_group_inherit_and_can_be_cleared() -> None:
    """[defaults] privkey_group reaches every host; a host can set its own owner or clear the group with ""."""
    text = BASE.replace("[defaults]", "[defaults]\nprivkey_group = \"ssl-cert\"", 1)
    text = text.replace('tags = ["cdn", "canary"]', 'tags = ["cdn", "canary"]\nprivkey_owner = 33\nprivkey_group = ""')
    inv = inventory.loads(text)
    assert (inv.hosts["sally"].privkey_chown, inv.hosts["esme"].privkey_chown) == ("33", ":ssl-cert")
    assert inventory.loads(BASE).hosts["esme"].privkey_chown == ""


def test_toml_syntax_error_is_reported() -> None:
    """A TOML syntax error is an InventoryError, not a traceback."""
    with pytest.raises(InventoryError, match="TOML syntax"):
        inventory.loads("[defaults\n")


def test_missing_file(tmp_path: Path) -> None:
    """A missing inventory names the path."""
    with pytest.raises(InventoryError) as info:
        inventory.load(tmp_path / "nope.toml")
    assert info.value.problems == [f"file not found: {tmp_path / 'nope.toml'}"]


def test_valid_inventory_resolves_tags_and_defaults() -> None:
    """Tags expand to hosts in inventory order; defaults and relative secret paths are applied."""
    inv = inventory.loads(BASE, base=Path("/etc/certmgr"))
    cert = inv.certificate("media.hachyderm.test")
    assert cert.hosts == ("sally", "esme")
    assert cert.ca == "pebble" and cert.dns == "lab" and cert.key_type == "ecdsa-p256"
    assert inv.hosts["sally"].canary and not inv.hosts["esme"].canary
    assert inv.dns["lab"].config.tsig_secret.where == "/etc/certmgr/tsig.key"
    assert inv.dns["lab"].config.tsig_algorithm == "hmac-sha256"
    assert inv.zone_provider("_acme-challenge.media.hachyderm.test") == (inv.dns["lab"], "hachyderm.test")


def test_wildcard_and_punycode_accepted() -> None:
    """A leftmost wildcard and an A-label are valid DNS names."""
    inv = inventory.loads(with_cert(name='"wild.hachyderm.test"',
                                    domains='["*.hachyderm.test", "xn--l-7sba6dbr.hachyderm.test"]'))
    assert inv.certificate("wild.hachyderm.test").domains[0] == "*.hachyderm.test"


@pytest.mark.parametrize(("raw", "norm"), [("HMAC-SHA256", "hmac-sha256"), ("hmac-sha512.", "hmac-sha512"),
                                           ("hmac-md5.sig-alg.reg.int", None), ("sha256", None)])
def test_tsig_algorithm_normalised(raw: str, norm: str | None) -> None:
    """TSIG algorithm names are normalised; MD5 is never accepted."""
    assert inventory.normalise_tsig_algorithm(raw) == norm


def test_secret_sources(tmp_path: Path) -> None:
    """Secrets come from a file, a systemd credential or the environment, and say where they failed."""
    (tmp_path / "s").write_text("  c2VjcmV0c2VjcmV0\n")
    assert inventory.SecretRef("file", str(tmp_path / "s"), "k").read() == "c2VjcmV0c2VjcmV0"
    assert inventory.SecretRef("credential", "s", "k").read({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == \
        "c2VjcmV0c2VjcmV0"
    assert inventory.SecretRef("env", "X", "k").read({"X": "abc"}) == "abc"
    with pytest.raises(SecretError, match=r"k: systemd credential 's' requested but \$CREDENTIALS_DIRECTORY"):
        inventory.SecretRef("credential", "s", "k").read({})
    with pytest.raises(SecretError, match="k: cannot read secret file"):
        inventory.SecretRef("file", str(tmp_path / "missing"), "k").read()


def test_repo_example_inventory_is_valid() -> None:
    """The example domains.toml at the repository root validates."""
    inv = inventory.load(Path(__file__).parents[2] / "domains.toml")
    assert {c.name for c in inv.certificates} == {"hachyderm.io", "media.hachyderm.io"}
    assert inv.certificate("media.hachyderm.io").hosts == ("cdn-frankfurt-1", "cdn-fremont-1", "sally", "esme")


def test_redacted_view_hides_secret_values() -> None:
    """`inventory show` data carries only secret references."""
    data = inventory.redacted(inventory.loads(BASE, base=Path("/etc/certmgr")))
    assert data["dns"]["lab"]["tsig_secret"] == "<secret file:/etc/certmgr/tsig.key>"
    assert data["channels"]["ops"]["url"] == "<secret file:/etc/certmgr/discord-url>"


@pytest.mark.parametrize("name", ["media.hachyderm.test\n", "media.hachyderm.test\r"])
def test_trailing_newline_rejected(name: str) -> None:
    """A certificate name with a trailing newline is rejected, not passed on to the store."""
    text = with_cert(name=f'"{name.encode("unicode_escape").decode()}"', domains='["m2.hachyderm.test"]')
    assert problems(text)[0].startswith("certificates[1].name: ")


def test_credentials_directory_in_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """`${CREDENTIALS_DIRECTORY}` in a path is expanded under systemd, and left as written when unset."""
    text = BASE.replace('[hosts.sally]', '[hosts.sally]\nssh_key_file = "${CREDENTIALS_DIRECTORY}/id_ed25519"')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/certmgr.service")
    assert inventory.loads(text).hosts["sally"].ssh_key_file == Path("/run/credentials/certmgr.service/id_ed25519")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert inventory.loads(text).hosts["sally"].ssh_key_file == Path("${CREDENTIALS_DIRECTORY}/id_ed25519")


def test_warnings_are_not_errors() -> None:
    """hmac-sha1, the old host key `user` and a wildcard-only certificate without verify_names load, with one warning each."""
    text = with_cert(name='"w.hachyderm.test"', domains='["*.w.hachyderm.test"]')
    text = text.replace('tsig_key = "certmgr-lab"', 'tsig_key = "certmgr-lab"\ntsig_algorithm = "hmac-sha1"')
    text = text.replace('address = "127.0.1.3"', 'address = "127.0.1.3"\nuser = "deploy"')
    inv = inventory.loads(text)
    assert inv.hosts["esme"].user == "deploy" and inv.dns["lab"].config.tsig_algorithm == "hmac-sha1"
    assert list(inv.warnings) == [
        "dns.lab.tsig_algorithm: hmac-sha1 is deprecated (RFC 8945 §6); generate a hmac-sha256 key",
        "hosts.esme.user: deprecated name: rename it to ssh_user (as in [defaults])",
        "certificates[1].verify_names: not set and every domain is a wildcard: the deploy verifies with "
        "'certmgr-verify.w.hachyderm.test', which reaches nginx's default server unless a server_name matches it; "
        "list names the hosts serve",
    ]
    assert inventory.loads(BASE).warnings == ()


def test_ssh_user_per_host() -> None:
    """`ssh_user` is the one key for the SSH login, in [defaults] and in [hosts.*]."""
    inv = inventory.loads(BASE.replace('address = "127.0.1.3"', 'address = "127.0.1.3"\nssh_user = "deploy"'))
    assert (inv.hosts["sally"].user, inv.hosts["esme"].user) == ("certmgr", "deploy") and not inv.warnings


def test_verify_names_default_to_non_wildcard_names() -> None:
    """Without verify_names a certificate verifies with its non-wildcard names; given ones are used as written."""
    inv = inventory.loads(with_cert(name='"w.hachyderm.test"', domains='["*.w.hachyderm.test", "w.hachyderm.test"]'))
    assert inv.certificate("w.hachyderm.test").verify_names == ("w.hachyderm.test",)
    assert inv.certificate("media.hachyderm.test").verify_names == ("media.hachyderm.test",)
    inv = inventory.loads(with_cert(name='"w.hachyderm.test"', domains='["*.w.hachyderm.test"]',
                                    verify_names='["shop.w.hachyderm.test"]'))
    assert inv.certificate("w.hachyderm.test").verify_names == ("shop.w.hachyderm.test",)
    assert inventory.redacted(inv)["certificates"][1]["verify_names"] == ["shop.w.hachyderm.test"]


def test_non_utf8_reports_line_and_column(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is reported with its line and column, not a byte offset."""
    path = tmp_path / "domains.toml"
    path.write_bytes(b'[defaults]\nca = "pebble"\n# caf\xe9\n')
    with pytest.raises(InventoryError) as info:
        inventory.load(path)
    assert info.value.problems == ["line 3, column 6: not UTF-8 (byte 0xe9); save the file as UTF-8"]
    path.write_bytes('# café, naïve\n'.encode() + b'# \xc3\xa9t\xe9\n')  # columns count characters, not bytes
    with pytest.raises(InventoryError) as info:
        inventory.load(path)
    assert info.value.problems == ["line 2, column 5: not UTF-8 (byte 0xe9); save the file as UTF-8"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A UTF-8 byte order mark (as some Windows editors write) does not make a valid inventory invalid."""
    path = tmp_path / "domains.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert inventory.load(path).certificate("media.hachyderm.test").hosts == ("sally", "esme")


@pytest.mark.parametrize(("value", "expected"), [
    ("1", "defaults.keep_versions: 1 keeps too few versions: the live one and the previous one (the rollback target) "
          "are always kept, so at least 2"),
    ('"3"', "defaults.keep_versions: must be an integer, not a string"),
])
def test_keep_versions_is_at_least_two(value: str, expected: str) -> None:
    """[defaults] keep_versions (retention, default 3) must keep the live and the previous version."""
    assert inventory.loads(BASE).keep_versions == 3
    assert inventory.loads(BASE.replace("[defaults]", "[defaults]\nkeep_versions = 5", 1)).keep_versions == 5
    assert problems(BASE.replace("[defaults]", f"[defaults]\nkeep_versions = {value}", 1)) == [expected]
