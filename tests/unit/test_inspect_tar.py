"""inspect.sh's one tar of the live fullchains, read on the controller: in memory only, the names asked about,
regular files of a sane size; anything malformed or hostile gives nothing, never an exception or a file."""

from __future__ import annotations

import base64
import io
import tarfile

from certmgr.deploy.model import MAX_FULLCHAIN, fullchains_from_tar


def tar_b64(members: list[tuple[str, bytes | None, bytes]]) -> str:
    """(name, data, type) members; data None for a link (its target in the name after '->')."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name.split("->")[0])
            info.type = kind
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = name.split("->")[1]
                tf.addfile(info)
    return base64.b64encode(buf.getvalue()).decode()


def test_each_asked_name_gets_its_own_bytes_long_names_too() -> None:
    long = "a" * 60 + ".example" + ".b" * 40
    v = tar_b64([("x.example/fullchain.pem", b"X", tarfile.REGTYPE), (f"{long}/fullchain.pem", b"L", tarfile.REGTYPE)])
    assert fullchains_from_tar(v, ["x.example", long]) == {"x.example": b"X", long: b"L"}


def test_what_was_not_asked_for_or_is_not_a_sane_file_is_left_out() -> None:
    v = tar_b64([
        ("other.example/fullchain.pem", b"O", tarfile.REGTYPE),  # not asked about
        ("x.example/privkey.pem", b"K", tarfile.REGTYPE),  # not a fullchain
        ("../x.example/fullchain.pem", b"P", tarfile.REGTYPE),  # a path out
        ("y.example/fullchain.pem->/etc/shadow", None, tarfile.SYMTYPE),  # a link
        ("z.example/fullchain.pem", b"", tarfile.REGTYPE),  # empty, as an unreadable one
        ("w.example/fullchain.pem", b"W" * (MAX_FULLCHAIN + 1), tarfile.REGTYPE),  # too large
    ])
    assert fullchains_from_tar(v, ["x.example", "y.example", "z.example", "w.example"]) == {}


def test_malformed_input_gives_nothing() -> None:
    good = tar_b64([("x.example/fullchain.pem", b"X" * 2000, tarfile.REGTYPE)])
    raw = base64.b64decode(good)
    for value in (None, "", "not base64!", base64.b64encode(b"garbage" * 100).decode(),
                  base64.b64encode(raw[:700]).decode()):
        assert fullchains_from_tar(value, ["x.example"]) == {}
