# certmgr discover: read the certificates in certificate files on a POP (never a private key).
#
# Run as: sh -c SCRIPT certmgr MAX_BYTES MAX_FILES N LIVE CERT ... DIR ...
# (N configured certificate paths, then the directories to look for other certificate files in;
# every directory under LIVE, certmgr's cert_root/live, is looked in too). Read-only.
#
# Only the lines of "-----BEGIN CERTIFICATE-----" ... "-----END CERTIFICATE-----" blocks leave the
# host: a file that also holds a private key (nginx allows both in one file) sends its certificates
# only, and a block in which "PRIVATE KEY" appears is dropped whole. At most MAX_BYTES per file.
#
# Output: fields each terminated by a NUL byte (no path can contain one, so no file name can
# forge a field), then one base64 field with the certificate lines of every file read:
#   cert IDX STATUS REAL   STATUS ok|missing|unreadable|notfile|empty; REAL: symlinks resolved
#                          ("" for an ok file: its REAL comes in `reals`, below)
#   reals REAL… endreals   the REAL of every ok file, in order, by ONE `readlink -f -z` (a count that
#                          disagrees — a file gone meanwhile — leaves each one's own path)
#   file PATH              a *.pem|*.crt|*.cer|*.cert file in a DIR (an orphan candidate)
#   pem B64                "F<path, \ and newline escaped>" per file read, then its lines prefixed "|"
#   done
# Processes: one readlink, one awk, one base64 for the whole host (plus one readlink per file that
# is not ok, for its REAL).
trap '' HUP PIPE
umask 077
max=$1
maxfiles=$2
n=$3
live=$4
shift 4

field() { printf '%s\0' "$1"; }
i=0
nread=0
while [ "$i" -lt "$n" ]; do
  c=$1
  shift
  if [ ! -e "$c" ]; then
    st=missing
  elif [ ! -f "$c" ]; then
    st=notfile
  elif [ ! -r "$c" ]; then
    st=unreadable
  elif [ ! -s "$c" ]; then
    st=empty
  else
    st=ok
    set -- "$@" "$c"  # read below, with the others, by one awk
    nread=$((nread + 1))
  fi
  field cert
  field "$i"
  field "$st"
  if [ "$st" = ok ]; then
    field ""
  else
    field "$(readlink -f -- "$c" 2>/dev/null || printf '%s' "$c")"
  fi
  i=$((i + 1))
done
# now "$@" is: DIR ... then the readable configured certificates
ndirs=$(($# - nread))
# reals SKIP ARG…: the real path of every ARG after the first SKIP, NUL-terminated (its own "$@")
reals() {
  shift "$(($1 + 1))"
  readlink -f -z -- "$@" 2>/dev/null
}
field reals
if [ "$nread" -gt 0 ]; then reals "$ndirs" "$@"; fi
field endreals
found=0
for d in "$@" "$live"/*/; do
  case $d in /*) ;; *) continue ;; esac
  [ -d "$d" ] || continue
  for f in "${d%/}"/*; do
    [ "$found" -ge "$maxfiles" ] && break 2
    case $f in
      *privkey*) continue ;;
      *.pem | *.crt | *.cer | *.cert) ;;
      *) continue ;;
    esac
    { [ -f "$f" ] && [ -r "$f" ] && [ -s "$f" ]; } || continue
    found=$((found + 1))
    field file
    field "$f"
    set -- "$@" "$f"
  done
done
shift "$ndirs"
# now "$@" is every readable file: one awk reads them all (absolute paths: never an option, never a
# var=value assignment); it prints F<path, with \ and newline escaped> per file, then its lines
field pem
if [ "$#" -gt 0 ]; then
  awk -v max="$max" '
    function esc(s,    out, i, ch) {
      out = ""
      for (i = 1; i <= length(s); i++) {
        ch = substr(s, i, 1)
        if (ch == "\\") out = out "\\\\"; else if (ch == "\n") out = out "\\n"; else out = out ch
      }
      return out
    }
    FNR == 1 { print "F" esc(FILENAME); inb = 0; n = 0; blk = "" }
    n > max { next }
    { n += length($0) + 1 }
    /-----BEGIN CERTIFICATE-----/ { inb = 1; blk = "" }
    inb { blk = blk "|" $0 "\n" }
    /PRIVATE KEY/ { inb = 0; blk = "" }
    inb && /-----END CERTIFICATE-----/ { printf "%s", blk; inb = 0; blk = "" }
  ' "$@" 2>/dev/null | base64
fi
printf '\0'
field "done"
