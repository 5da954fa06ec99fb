# certmgr discover: read certificate files on a POP, and check each key against its certificate here.
#
# Run as: sh -c SCRIPT certmgr MAX_BYTES MAX_FILES N LIVE CERT KEY ... DIR ...
# (N pairs of CERT KEY, KEY "" where none is configured, then the directories to look for
# certificate files in; every directory under LIVE, certmgr's cert_root/live, is looked in too). Read-only. Private keys never leave the host: only "match"/"mismatch"
# of the public-key digests is printed. Every path arrives as a positional argument and leaves
# base64-encoded, so no file name can forge an output line.
#
# Output lines:
#   cert IDX STATUS REAL PEM   STATUS ok|missing|unreadable|toolarge|notfile; REAL, PEM base64 ("-": none)
#   key IDX STATUS             STATUS match|mismatch|unreadable|missing|none|unchecked
#   file PATH REAL PEM         a certificate file found in a DIR (orphan candidates), base64
#   done
trap '' HUP PIPE
umask 077
max=$1
maxfiles=$2
n=$3
live=$4
shift 4

b64() { base64 | tr -d '\n'; }
b64s() { printf '%s' "$1" | b64; }
real() { readlink -f -- "$1" 2>/dev/null || printf '%s' "$1"; }
size() { wc -c <"$1" 2>/dev/null | tr -d ' '; }
digest() { openssl sha256 2>/dev/null | sed 's/^.*= *//'; }
have_openssl=no
command -v openssl >/dev/null 2>&1 && have_openssl=yes

i=0
while [ "$i" -lt "$n" ]; do
  c=$1
  k=$2
  shift 2
  r=$(real "$c")
  if [ ! -e "$c" ]; then
    printf 'cert %s missing %s -\n' "$i" "$(b64s "$r")"
  elif [ ! -f "$c" ]; then
    printf 'cert %s notfile %s -\n' "$i" "$(b64s "$r")"
  elif [ ! -r "$c" ]; then
    printf 'cert %s unreadable %s -\n' "$i" "$(b64s "$r")"
  elif [ "$(size "$c")" -gt "$max" ]; then
    printf 'cert %s toolarge %s -\n' "$i" "$(b64s "$r")"
  else
    printf 'cert %s ok %s %s\n' "$i" "$(b64s "$r")" "$(head -c "$max" -- "$c" | b64)"
  fi
  if [ -z "$k" ]; then
    st=none
  elif [ ! -e "$k" ]; then
    st=missing
  elif [ ! -f "$k" ] || [ ! -r "$k" ]; then
    st=unreadable
  elif [ "$have_openssl" = no ] || [ ! -f "$c" ] || [ ! -r "$c" ]; then
    st=unchecked
  else
    cd=$(openssl x509 -in "$c" -noout -pubkey 2>/dev/null | digest)
    kd=$(openssl pkey -in "$k" -pubout -passin pass: 2>/dev/null | digest)
    if [ -z "$cd" ] || [ -z "$kd" ]; then
      st=unchecked
    elif [ "$cd" = "$kd" ]; then
      st=match
    else
      st=mismatch
    fi
  fi
  printf 'key %s %s\n' "$i" "$st"
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
    [ "$(size "$f")" -le "$max" ] || continue
    head -c "$max" -- "$f" | grep -q 'BEGIN CERTIFICATE' || continue
    found=$((found + 1))
    printf 'file %s %s %s\n' "$(b64s "$f")" "$(b64s "$(real "$f")")" "$(head -c "$max" -- "$f" | b64)"
  done
done
printf 'done\n'
