"""The lab's bind9: zone data, the primary's and the lagging secondary's configs, DNS probes.

Pure text and probes only; starting and stopping `named` is `Lab`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from lab.proc import LabError, run

ZONE = "hachyderm.test"
CHALLENGE_ZONE = "challenges.test"
REFUSE_ZONE = "refuse.test"
LAB_KEY = "certmgr-lab"
CHALLENGE_KEY = "certmgr-challenges"
RNDC_KEY = "lab-rndc"
PRIMARY_NS = "127.0.0.1"
SECONDARY_NS = "127.0.0.2"
WEB_ADDRESS = "127.0.1.2"  # A records of the test zone; where they point is not important
PRIMARY_ZONES = (ZONE, CHALLENGE_ZONE, REFUSE_ZONE)
PDNS_ZONE = "pdns.test"  # served by the optional PowerDNS (lab/powerdns.py); bind forwards it there


def acme_update_names(sites: Sequence[str] = ()) -> list[str]:
    """Every name X whose `_acme-challenge.X TXT` the `certmgr-lab` key may update.

    bind 9.18 has no rule for "_acme-challenge under any name", so the grant lists
    names. `*.hachyderm.test` validates at `_acme-challenge.hachyderm.test`, already
    in the list. c000-c099 and n000-n099 serve many-certificate tests and benchmarks.
    """
    names = [ZONE] + [f"{h}.{ZONE}" for h in ("www", "media", "static", "cdn")]
    names += [f"c{i:03d}.{ZONE}" for i in range(100)]
    names += [f"n{i:03d}.{ZONE}" for i in range(100)]
    names += [n for n in sites if n not in names]  # a lab with many names per POP: s0003.hachyderm.test, …
    return names


def zone_texts(serial: int, *, secondary: bool) -> dict[str, str]:
    """Zone file text by file stem (`<stem>.zone`), including the local root zone."""
    # refresh 86400 with notify off: the secondary catches up once a day (or on `sync_secondary`).
    def soa(origin: str = "@") -> str:
        return f"{origin} SOA ns1.{ZONE}. hostmaster.{ZONE}. ( {serial} 86400 3600 1209600 60 )"

    main = [
        "$TTL 60", soa(),
        f"@ NS ns1.{ZONE}.", *([f"@ NS ns2.{ZONE}."] if secondary else []),
        f"@ A {WEB_ADDRESS}",
        f"ns1 A {PRIMARY_NS}",
        f"ns2 A {SECONDARY_NS}",
        *(f"{h} A {WEB_ADDRESS}" for h in ("www", "media", "static", "cdn", "delegated")),
        # CNAME-delegated DNS-01: the TXT is written in challenges.test, with that zone's key.
        f"_acme-challenge.delegated CNAME delegated.{CHALLENGE_ZONE}.",
    ]
    challenges = ["$TTL 60", soa(), f"@ NS ns1.{ZONE}."]
    refuse = ["$TTL 60", soa(), f"@ NS ns1.{ZONE}.", f"@ A {WEB_ADDRESS}", f"www A {WEB_ADDRESS}"]
    # pdns.test is delegated from the local root, so that named's resolver (recursion, loopback clients
    # only) uses the forward zone in named.conf: Pebble asks named, named asks PowerDNS.
    root = ["$TTL 60", soa("."), f". NS ns1.{ZONE}.", f"ns1.{ZONE}. A {PRIMARY_NS}",
            f"{PDNS_ZONE}. NS ns1.{PDNS_ZONE}.", f"ns1.{PDNS_ZONE}. A {PRIMARY_NS}"]
    files = {ZONE: main, CHALLENGE_ZONE: challenges, REFUSE_ZONE: refuse, "root": root}
    return {stem: "\n".join(lines) + "\n" for stem, lines in files.items()}


def primary_conf(d: Path, port: int, rndc_port: int, pdns_port: int, sites: Sequence[str] = ()) -> str:
    grants = "\n".join(f"        grant {LAB_KEY}. name _acme-challenge.{n}. TXT;" for n in acme_update_names(sites))
    return f"""// certmgr lab primary: authoritative for the lab zones, loopback only.
options {{
    directory "{d}";
    pid-file none;              // the lab records the pid itself
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    dump-file "{d}/named_dump.db";
    statistics-file "{d}/named.stats";
    listen-on port {port} {{ {PRIMARY_NS}; }};
    listen-on-v6 {{ none; }};
    // Pebble's DNS client does not chase CNAMEs, and with recursion off named stops a
    // chain at the zone boundary, so a CNAME-delegated challenge could never validate.
    // Recursion on, for loopback clients only, makes named follow the chain into
    // challenges.test; the local root zone below answers every other name here
    // (NXDOMAIN), so nothing is ever sent off the machine. Queries without RD, and
    // every answer from the lab zones, are the same as with recursion off (AA set).
    recursion yes;
    allow-recursion {{ 127.0.0.0/8; }};
    allow-query-cache {{ 127.0.0.0/8; }};
    notify no;                  // the secondary must lag until its refresh (or `sync_secondary`)
    dnssec-validation no;
    allow-transfer {{ 127.0.0.0/8; }};
    // nothing cached: a forwarded challenge TXT (pdns.test) is read fresh by every validation
    max-cache-ttl 0;
    max-ncache-ttl 0;
}};
include "{d}/{LAB_KEY}.key";
include "{d}/{CHALLENGE_KEY}.key";
include "{d}/{RNDC_KEY}.key";
controls {{ inet {PRIMARY_NS} port {rndc_port} allow {{ 127.0.0.0/8; }} keys {{ "{RNDC_KEY}"; }}; }};
zone "{ZONE}" {{
    type primary;
    file "{ZONE}.zone";
    update-policy {{
{grants}
    }};
}};
zone "{CHALLENGE_ZONE}" {{
    type primary;
    file "{CHALLENGE_ZONE}.zone";
    update-policy {{ grant {CHALLENGE_KEY}. zonesub TXT; }};
}};
zone "{REFUSE_ZONE}" {{
    type primary;
    file "{REFUSE_ZONE}.zone";
    allow-update {{ none; }};
}};
zone "{PDNS_ZONE}" {{
    type forward;               // the optional PowerDNS (lab/powerdns.py); SERVFAIL when it is not running
    forward only;
    forwarders {{ {PRIMARY_NS} port {pdns_port}; }};
}};
zone "." {{
    type primary;
    file "root.zone";           // root hints are never used: recursion ends here
}};
"""


def secondary_conf(d: Path, keys_dir: Path, port: int, rndc_port: int) -> str:
    return f"""// certmgr lab secondary for {ZONE}: deliberately slow to follow the primary.
options {{
    directory "{d}";
    pid-file none;
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port {port} {{ {SECONDARY_NS}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    notify no;
    dnssec-validation no;
    transfer-source {SECONDARY_NS};
}};
include "{keys_dir}/{RNDC_KEY}.key";
controls {{ inet {SECONDARY_NS} port {rndc_port} allow {{ 127.0.0.0/8; }} keys {{ "{RNDC_KEY}"; }}; }};
zone "{ZONE}" {{
    type secondary;
    primaries {{ {PRIMARY_NS} port {port}; }};
    // No file: the zone lives in memory and is transferred afresh on every start.
}};
"""


def rndc_conf(keys_dir: Path, rndc_port: int) -> str:
    return f'include "{keys_dir}/{RNDC_KEY}.key";\noptions {{ default-key "{RNDC_KEY}"; default-port {rndc_port}; }};\n'


def soa_serial(server: str, port: int, zone: str, timeout: float = 0.3) -> int | None:
    """The zone's serial if `server:port` answers authoritatively for it, else None."""
    query = dns.message.make_query(zone, "SOA")
    try:
        resp = dns.query.udp(query, server, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return None
    if resp.rcode() != dns.rcode.NOERROR or not resp.flags & dns.flags.AA or not resp.answer:
        return None
    return int(resp.answer[0][0].serial)


def read_bind_key(path: Path) -> tuple[str, str, str]:
    """(name, algorithm, secret) from a BIND key file written by `tsig-keygen`."""
    text = path.read_text()
    m = re.search(r'key\s+"([^"]+)"\s*\{\s*algorithm\s+([\w-]+);\s*secret\s+"([^"]+)";', text)
    if not m:
        raise LabError(f"{path}: not a BIND key file")
    return m.group(1), m.group(2), m.group(3)


def ensure_loopback_address(address: str) -> None:
    """named binds only addresses an interface carries (unlike sshd and nginx): put it on lo.

    Left in place on `down`: other labs on this machine may be using it too.
    """
    out = run(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout
    if f" {address}/" not in out:
        res = run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=False)
        if res.returncode != 0 and "File exists" not in res.stderr:
            raise LabError(f"cannot add {address} to lo for the secondary nameserver: {res.stderr.strip()}")
