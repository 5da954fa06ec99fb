# certmgr discover: read certificate files on a POP, and check each key against its certificate here.
#
# Run as: sh -c SCRIPT certmgr MAX_BYTES MAX_FILES N LIVE CERT ... DIR ...
# (N certificate paths, then the directories to look for certificate files in; every directory
# under LIVE, certmgr's cert_root/live, is looked in too). Read-only; keys are checkkeys.sh's job.
#
# Output: fields each terminated by a NUL byte (no path can contain one, so no file name can
# forge a field); file contents base64-encoded, at most MAX_BYTES+1 bytes read (more: too large).
#   cert IDX STATUS REAL PEM   STATUS ok|missing|unreadable|notfile; PEM "-" unless ok
#   file PATH REAL PEM         a certificate-looking file (*.pem|*.crt|*.cer|*.cert) in a DIR
#   done
trap '' HUP PIPE
umask 077
max=$(($1 + 1))
maxfiles=$2
n=$3
live=$4
shift 4

field() { printf '%s\0' "$1"; }
content() { head -c "$max" -- "$1" 2>/dev/null | base64; printf '\0'; }
# the path with symlinks resolved (always for configured files; for others only when one is a link)
real() {
  if [ -L "$1" ] || [ -n "$2" ]; then
    field "$(readlink -f -- "$1" 2>/dev/null || printf '%s' "$1")"
  else
    field "$1"
  fi
}

i=0
while [ "$i" -lt "$n" ]; do
  c=$1
  shift
  field cert
  field "$i"
  if [ ! -e "$c" ]; then
    field missing
  elif [ ! -f "$c" ]; then
    field notfile
  elif [ ! -r "$c" ]; then
    field unreadable
  else
    field ok
  fi
  real "$c" always
  if [ -f "$c" ] && [ -r "$c" ]; then content "$c"; else field -; fi
  i=$((i + 1))
done

found=0
for d in "$@" "$live"/*/; do
  [ -d "$d" ] || continue
  for f in "${d%/}"/*; do
    [ "$found" -ge "$maxfiles" ] && break 2
    case $f in
      *.pem | *.crt | *.cer | *.cert) ;;
      *) continue ;;
    esac
    { [ -f "$f" ] && [ -r "$f" ]; } || continue
    found=$((found + 1))
    field file
    field "$f"
    real "$f"
    content "$f"
  done
done
field "done"
