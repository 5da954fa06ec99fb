"""discover without a lab: nginx -T parsing, the remote scripts run locally, the stub, and scan's use of the state."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmgr import inventory as inventory_mod
from certmgr.cli import main
from certmgr.discover import collect, stub
from certmgr.discover.nginxconf import DumpError, Listen, parse_dump, split_dump
from certmgr.discover.text import clean
from certmgr.material import CertMaterial
from certmgr.scan import UNMANAGED, unmanaged_results
from tests.unit.test_store import make_certbot_tree

ROOT = Path(__file__).parents[2]
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
SCRIPTS = importlib.resources.files("certmgr.discover")

DUMP = """nginx: the configuration file /etc/nginx/nginx.conf syntax is ok
# configuration file /etc/nginx/nginx.conf:
events {}
http {
    ssl_certificate /etc/ssl/default.pem;
    ssl_certificate_key /etc/ssl/default.key;
    ssl_protocols TLSv1.2;
    include sites-enabled/*;
    include /etc/nginx/conf.d/tls.conf;
}

# configuration file /etc/nginx/sites-enabled/a.conf:
server {
    listen 443 ssl http2;
    listen [::]:443 ssl;
    server_name a.example.org www.a.example.org;
    ssl_certificate certs/a.pem;  # relative: against nginx's prefix
    ssl_certificate_key certs/a.key;
}
server {
    listen 127.0.0.1:8443 ssl default_server;
    server_name _;
}

# configuration file /etc/nginx/sites-enabled/b.conf:
server {
    listen unix:/run/x.sock;
    server_name b.example.org;
    include snippets/dyn.conf;
}

# configuration file /etc/nginx/snippets/dyn.conf:
ssl_certificate /etc/ssl/$ssl_server_name.pem;
ssl_certificate_key /etc/ssl/$ssl_server_name.key;

# configuration file /etc/nginx/conf.d/tls.conf:
server { server_name plain.example.org; }
"""


def test_split_dump_keeps_each_file_and_drops_the_preamble() -> None:
    """`nginx -T` output splits on its `# configuration file PATH:` lines; text before the first is dropped."""
    files = split_dump(DUMP)
    assert [p for p, _ in files] == ["/etc/nginx/nginx.conf", "/etc/nginx/sites-enabled/a.conf",
                                     "/etc/nginx/sites-enabled/b.conf", "/etc/nginx/snippets/dyn.conf",
                                     "/etc/nginx/conf.d/tls.conf"]
    assert files[3][1] == ("ssl_certificate /etc/ssl/$ssl_server_name.pem;\n"
                           "ssl_certificate_key /etc/ssl/$ssl_server_name.key;\n\n")


def test_parse_dump_follows_includes_inheritance_listen_forms_and_dynamic_paths() -> None:
    """Globbed and explicit includes are followed inside the dump, relative paths resolve against the prefix,
    server blocks inherit http-level certificates, and a $variable path is dynamic."""
    cfg = parse_dump(DUMP)
    assert cfg.main == "/etc/nginx/nginx.conf" and cfg.prefix == "/etc/nginx" and cfg.problems == ()
    rows = [(sb.file.rsplit("/", 1)[1], sb.names, sb.listens, [(c.certificate, c.key, c.dynamic, c.line)
                                                             for c in sb.certs], sb.includes) for sb in cfg.servers]
    assert rows == [
        ("a.conf", ("a.example.org", "www.a.example.org"),
         (Listen(address="", port=443, ssl=True), Listen(address="[::]", port=443, ssl=True)),
         [("/etc/nginx/certs/a.pem", "/etc/nginx/certs/a.key", False, 5)], ()),
        ("a.conf", ("_",), (Listen(address="127.0.0.1", port=8443, ssl=True, default_server=True),),
         [("/etc/ssl/default.pem", "/etc/ssl/default.key", False, 3)], ()),
        ("b.conf", ("b.example.org",), (Listen(address="", port=80, ssl=False),),
         [("/etc/ssl/$ssl_server_name.pem", "/etc/ssl/$ssl_server_name.key", True, 1)],
         ("/etc/nginx/snippets/dyn.conf",)),
        ("tls.conf", ("plain.example.org",), (Listen(address="", port=80, ssl=False),),
         [("/etc/ssl/default.pem", "/etc/ssl/default.key", False, 3)], ()),
    ]
    assert cfg.servers[0].tls == (("ssl_protocols", ("TLSv1.2",)), ("ssl_certificate", ("certs/a.pem",)),
                                  ("ssl_certificate_key", ("certs/a.key",)))


@pytest.mark.parametrize(("text", "error"), [
    ("", "no '# configuration file' sections (not nginx -T output)"),
    ("garbage {{{\x1b[31m", "no '# configuration file' sections (not nginx -T output)"),
])
def test_parse_dump_refuses_what_is_not_a_dump(text: str, error: str) -> None:
    """Output without nginx -T's file sections is refused with one exact reason."""
    with pytest.raises(DumpError) as exc:
        parse_dump(text)
    assert str(exc.value) == error


def test_include_loops_and_missing_includes_are_problems_not_crashes() -> None:
    """A file including itself, and an include absent from the dump, are reported; parsing goes on."""
    cfg = parse_dump("# configuration file /n/nginx.conf:\nhttp { include /n/loop.conf; include /n/gone.conf; }\n"
                     "# configuration file /n/loop.conf:\ninclude /n/loop.conf;\nserver { listen 1 ssl; }\n")
    assert cfg.problems == ("/n/loop.conf:1: include /n/loop.conf nested too deep or in a loop",
                            "/n/nginx.conf:1: include /n/gone.conf is not in the dump")
    assert len(cfg.servers) == 1


def test_hostile_paths_never_reach_the_local_file_system(tmp_path: Path) -> None:
    """An include naming a real local file is looked up in the dump only: nothing on this machine is read."""
    secret = tmp_path / "local.conf"
    secret.write_text("http { server { server_name leaked.example; } }\n")
    cfg = parse_dump(f"# configuration file /n/nginx.conf:\ninclude {secret};\n")
    assert cfg.servers == () and cfg.problems == (f"/n/nginx.conf:1: include {secret} is not in the dump",)


# ---------------------------------------------------------------- the remote scripts, run here with sh


def _leaf(name: str, days: int = 90) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=90 - days))
            .not_valid_after(NOW + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _sh(script: str, *args: str) -> bytes:
    return subprocess.run(["sh", "-c", SCRIPTS.joinpath(script).read_text(), "certmgr", *args],
                          capture_output=True, check=True).stdout


def test_read_script_sends_certificates_only_never_a_private_key(tmp_path: Path) -> None:
    """A combined cert+key file, a key-only .pem and a hostile file name: only certificate blocks leave."""
    cert, key = _leaf("a.example.org")
    d = tmp_path / "ssl"
    d.mkdir()
    (d / "combined.pem").write_bytes(cert + key)
    (d / "key-only.pem").write_bytes(key)
    (d / "fake.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n" + key + b"-----END CERTIFICATE-----\n")
    odd = d / "x\ny\\z;`id`.crt"
    odd.write_bytes(cert)
    (d / "link.pem").symlink_to("combined.pem")
    out = _sh("readcerts.sh", "65536", "100", "3", str(tmp_path / "live"), str(d / "link.pem"), str(d / "nope.pem"),
              str(d), str(d))
    assert b"PRIVATE KEY" not in out
    tokens = out.split(b"\0")
    # an ok file's real path (symlinks resolved) comes after the cert records, from one readlink for all
    assert tokens[:15] == [b"cert", b"0", b"ok", b"",
                           b"cert", b"1", b"missing", str(d / "nope.pem").encode(),
                           b"cert", b"2", b"notfile", str(d).encode(),
                           b"reals", str(d / "combined.pem").encode(), b"endreals"]
    pem_b64 = tokens[tokens.index(b"pem") + 1]
    blocks = collect._pem_blocks(pem_b64, collect.Limits())
    assert b"PRIVATE KEY" not in b"".join(blocks.values())
    assert blocks[str(d / "link.pem")] == cert and blocks[str(odd)] == cert and blocks[str(d / "combined.pem")] == cert
    assert str(d / "fake.pem") not in blocks and str(d / "key-only.pem") not in blocks
    assert tokens[-2:] == [b"done", b""]


def test_key_script_compares_public_keys_on_the_host(tmp_path: Path) -> None:
    """match, mismatch and missing, from the certificate's public key given and the key file read there."""
    cert, key = _leaf("a.example.org")
    _, other = _leaf("b.example.org")
    (tmp_path / "k1").write_bytes(key)
    (tmp_path / "k2").write_bytes(other)
    spki = x509.load_pem_x509_certificate(cert).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip()
    out = _sh("checkkeys.sh", "3", str(tmp_path / "k1"), spki, str(tmp_path / "k2"), spki, str(tmp_path / "k3"), spki)
    assert out.split(b"\0") == [b"key", b"0", b"match", b"key", b"1", b"mismatch", b"key", b"2", b"missing",
                                b"done", b""]
    # with the certificate paths last (what discover sends), the same verdicts
    (tmp_path / "c").write_bytes(cert)
    c = str(tmp_path / "c")
    out = _sh("checkkeys.sh", "3", str(tmp_path / "k1"), spki, str(tmp_path / "k2"), spki, str(tmp_path / "k3"), spki,
              c, c, c)
    assert out.split(b"\0") == [b"key", b"0", b"match", b"key", b"1", b"mismatch", b"key", b"2", b"missing",
                                b"done", b""]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", ["readcerts.sh", "checkkeys.sh"])
def test_remote_scripts_are_shellcheck_clean(script: str) -> None:
    """The remote scripts pass shellcheck as POSIX sh."""
    path = Path(str(SCRIPTS.joinpath(script)))
    res = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_clean_escapes_control_characters_and_bounds_length() -> None:
    """Foreign text loses its control characters (escaped, visible) and is cut to the limit."""
    assert clean("evil\x1b]0;pwned\x07\n.test") == "evil\\x1b]0;pwned\\x07\\n.test"
    assert clean("x" * 10, 5) == "xxxx…"


# ---------------------------------------------------------------- inventory, stub, import, scan


def test_dump_command_is_an_argv_with_a_default() -> None:
    """dump_command defaults to `sudo -n nginx -T`, is set per host or in [defaults], and must be a list."""
    inv = inventory_mod.load(ROOT / "domains.toml")
    assert inv.hosts["sally"].dump_command == ("sudo", "-n", "nginx", "-T")
    text = (ROOT / "domains.toml").read_text().replace('[hosts.sally]\n', '[hosts.sally]\ndump_command = "nginx -T"\n')
    with pytest.raises(inventory_mod.InventoryError) as exc:
        inventory_mod.loads(text)
    assert exc.value.problems == ['hosts.sally.dump_command: must be a list of arguments (argv), e.g. '
                                  '["sudo", "-n", "nginx", "-t"]; certmgr never runs a shell string']


def test_import_inventory_stub_lists_adopted_lineages(tmp_path: Path) -> None:
    """`import --inventory-stub` prints an inventory with one certificate per adopted lineage that passes
    `inventory check`; a lineage outside every DNS zone is written commented out, saying why."""
    src = tmp_path / "letsencrypt"
    for name in ("media.hachyderm.io", "other.example.net"):
        cert, key = _leaf(name)
        make_certbot_tree(src, name, [CertMaterial(cert=cert, chain=b"", privkey=key)], live=1)
    base = ["--inventory", str(ROOT / "domains.toml"), "--state-dir", str(tmp_path / "state")]
    res = CliRunner().invoke(main, [*base, "import", str(src), "--inventory-stub"])
    assert res.exit_code == 0, res.output
    (tmp_path / "stub.toml").write_text(res.stdout)
    # --syntax-only: the repo's domains.toml (copied into the stub) names /etc/certmgr files absent here
    check = CliRunner().invoke(main, ["--inventory", str(tmp_path / "stub.toml"), "inventory", "check", "--syntax-only"])
    assert check.exit_code == 0, check.output
    assert "warning" not in check.output
    inv = inventory_mod.load(tmp_path / "stub.toml")
    assert [(c.name, c.domains, c.hosts) for c in inv.certificates] == [
        ("media.hachyderm.io", ("media.hachyderm.io",), ())]
    lines = res.stdout.splitlines()
    assert "# guess: other.example.net is in none of the DNS providers' zones: left out (add its zone to a [dns.*])" \
        in lines
    assert "# left out (would not pass `certmgr inventory check`): no domain is in a DNS provider's zone" in lines
    assert '# name = "other.example.net"' in lines


def test_stub_render_round_trips_the_inventory() -> None:
    """Hosts, CAs, DNS providers and channels written by the stub read back equal to the inventory's."""
    inv = inventory_mod.load(ROOT / "domains.toml")
    text = stub.render(inv, [stub.StubCert(name="x.hachyderm.io", domains=("x.hachyderm.io",), hosts=("sally",))])
    back = inventory_mod.loads(text, base=ROOT)
    assert back.hosts == inv.hosts and back.cas == inv.cas and back.dns == inv.dns and back.channels == inv.channels


class _Store:
    def __init__(self, data: Any) -> None:
        self.data = data

    def load_json(self, relpath: str, default: Any = None) -> Any:
        assert relpath == "state/discover.json"
        return self.data


def test_scan_adds_unmanaged_certificates_at_warning_or_above() -> None:
    """From the last discover: 3 of 90 days left is critical, 20 warning, 60 nothing; one row per host, its file."""
    rows = []
    for name, days, hosts in (("a.example.org", 3, ["h1", "h2"]), ("b.example.org", 20, ["h1"]),
                              ("c.example.org", 60, ["h1"])):
        cert, _ = _leaf(name, days)
        rows.append({"served_names": [name], "hosts": hosts, "files": [f"/{h}/{name}.pem" for h in hosts],
                     "where": [{"host": h, "file": f"/{h}/{name}.pem"} for h in hosts], "leaf_pem": cert.decode()})
    store = _Store({"schema": 1, "discovered_at": (NOW - dt.timedelta(hours=2)).isoformat(), "unmanaged": rows})
    got = [(r.endpoint.cert, r.endpoint.name, r.endpoint.host, r.severity, r.problems)
           for r in unmanaged_results(store, NOW)]
    assert got == [
        (UNMANAGED, "a.example.org", "h1", "critical", ("expires in 3.0d (critical below 9.0d, 1/10)",
                                                        "not managed by certmgr: /h1/a.example.org.pem "
                                                        "(certmgr discover, 2.0 hours ago)")),
        (UNMANAGED, "a.example.org", "h2", "critical", ("expires in 3.0d (critical below 9.0d, 1/10)",
                                                        "not managed by certmgr: /h2/a.example.org.pem "
                                                        "(certmgr discover, 2.0 hours ago)")),
        (UNMANAGED, "b.example.org", "h1", "warning", ("expires in 20.0d (warning below 22.5d, 1/4)",
                                                       "not managed by certmgr: /h1/b.example.org.pem "
                                                       "(certmgr discover, 2.0 hours ago)")),
    ]
    assert unmanaged_results(_Store(None), NOW) == [] and unmanaged_results(_Store({"schema": 99}), NOW) == []
    assert unmanaged_results(None, NOW) == []


def test_discover_rejects_unknown_hosts_and_tags() -> None:
    """--hosts names only hosts and tags the inventory has; anything else is a usage error before any SSH."""
    res = CliRunner().invoke(main, ["--inventory", str(ROOT / "domains.toml"), "discover", "--hosts",
                                    "sally,tag:nope,salyl"])
    assert res.exit_code == 2
    assert res.output.splitlines()[0] == "certmgr: error: discover --hosts: no host or tag 'tag:nope', 'salyl' in the " \
                                         "inventory"
