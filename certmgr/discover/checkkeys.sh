# certmgr discover: does each private key belong to its certificate? Checked here, on the POP.
#
# Run as: sh -c SCRIPT certmgr N KEY PUBKEY ... [CERT ...] (N pairs: a key path, and the PEM public
# key of the certificate configured with it, as read by certmgr; then, optionally, the N certificate
# paths themselves). The private key never leaves the host, nor does anything derived from it: only
# the verdict is printed. Read-only.
#
# With the certificate paths, every readable key is first checked by ONE process: `openssl cms
# -sign` with one -signer/-inkey pair per key refuses a key that does not belong to its certificate
# (X509_check_private_key, the check nginx makes when it loads them). If it accepts them all, each
# is a match; if it refuses any (a mismatch, a key that does not parse, a certificate openssl reads
# otherwise), every key is checked on its own, as below: one `openssl pkey -pubout` per key.
#
# Output: fields each terminated by a NUL byte.
#   key IDX STATUS   STATUS match|mismatch|unreadable|missing|unchecked (no openssl, or the key does not parse)
trap '' HUP PIPE
umask 077
n=$1
shift
have_openssl=no
command -v openssl >/dev/null 2>&1 && have_openssl=yes

# status KEY: st="missing"/"unreadable"/"unchecked" from the shell alone, else "" (needs openssl)
status() {
  if [ ! -e "$1" ]; then
    st=missing
  elif [ ! -f "$1" ] || [ ! -r "$1" ]; then
    st=unreadable
  elif [ "$have_openssl" = no ]; then
    st=unchecked
  else
    st=
  fi
}

# all_match N KEY PUBKEY … CERT …: the one-process check of every key openssl would look at
all_match() {
  an=$1
  shift
  [ "$have_openssl" = yes ] && [ "$an" -gt 0 ] && [ $# -eq $((an * 3)) ] || return 1
  # the certificate paths, after the 2N pair arguments, become -signer/-inkey pairs with their keys
  ai=0 todo=0
  for a in "$@"; do
    ai=$((ai + 1))
    [ "$ai" -le $((an * 2)) ] || break
    [ $((ai % 2)) -eq 1 ] || continue
    status "$a"
    [ -z "$st" ] || continue
    todo=$((todo + 1))
  done
  [ "$todo" -gt 0 ] || return 1
  ai=0 c=''
  for a in "$@"; do
    ai=$((ai + 1))
    [ "$ai" -le $((an * 2)) ] || break
    [ $((ai % 2)) -eq 1 ] || continue
    k=$a
    # the certificate of pair (ai+1)/2 is argument 2N + (ai+1)/2
    eval "c=\${$((an * 2 + (ai + 1) / 2))}"
    status "$k"
    [ -z "$st" ] || continue
    set -- "$@" -signer "$c" -inkey "$k"
  done
  shift $((an * 3))
  openssl cms -sign -binary -noattr -passin pass: -in /dev/null -out /dev/null "$@" >/dev/null 2>&1 </dev/null
}

fast=no
if all_match "$n" "$@"; then fast=yes; fi
i=0
while [ "$i" -lt "$n" ]; do
  k=$1
  want=$2
  shift 2
  status "$k"
  if [ -n "$st" ]; then
    :
  elif [ "$fast" = yes ]; then
    st=match
  else
    # `openssl pkey -pubout` prints the public half as PEM, the form certmgr sends: compare as text
    got=$(openssl pkey -in "$k" -pubout -passin pass: 2>/dev/null)
    if [ -z "$got" ]; then
      st=unchecked
    elif [ "$got" = "$want" ]; then
      st=match
    else
      st=mismatch
    fi
  fi
  printf 'key\0%s\0%s\0' "$i" "$st"
  i=$((i + 1))
done
printf 'done\0'
