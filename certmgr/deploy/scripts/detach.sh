# shellcheck shell=sh
# A client that vanishes mid-script (killed, network cut) must not leave an untested link live:
# ignoring HUP and PIPE lets the script run to its end (test, rollback or reload) with nobody
# reading its output; the next run's inspect sees where it got to.
trap '' HUP PIPE
