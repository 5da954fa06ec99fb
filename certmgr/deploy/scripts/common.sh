# shellcheck shell=sh
# Shared by every deploy script. POSIX sh + coreutils + sha256sum only. All inputs arrive as
# positional parameters quoted by shlex; commands from the inventory arrive as one shlex.join'ed
# string run with `eval`, which re-parses exactly the quoted argv (that is what the quoting is for).
# Multi-line text (nginx's messages) is returned base64-encoded on one `key=value` line; a line
# `cert=<name>` opens the section of one certificate, `cert=` returns to the script's own keys.
set -u
say() { printf '%s\n' "$*"; }
b64() { printf '%s' "$1" | base64 -w0; }
# lineage NAME: the paths of one certificate under $root
lineage() {
  name=$1
  live=$root/live/$name
  # shellcheck disable=SC2034  # rollback.sh reads only $live
  arch=$root/archive/$name
}
