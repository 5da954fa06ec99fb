"""certmgr's local test lab: Pebble, bind9 and CDN POPs (sshd + nginx) on loopback.

`from lab import Lab`; the CLI is `python -m lab up|down|status`.
"""

from lab.lab import Lab, Ports
from lab.named import read_bind_key
from lab.pop import PopPaths, served_certificate
from lab.proc import LabError

__all__ = ["Lab", "LabError", "PopPaths", "Ports", "read_bind_key", "served_certificate"]
