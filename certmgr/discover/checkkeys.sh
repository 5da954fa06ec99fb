# certmgr discover: does each private key belong to its certificate? Checked here, on the POP.
#
# Run as: sh -c SCRIPT certmgr N KEY PUBKEY ... (N pairs: a key path, and the PEM public key of the
# certificate configured with it, as read by certmgr). The private key never leaves the host, nor
# does anything derived from it: only the verdict is printed. Read-only.
#
# Output: fields each terminated by a NUL byte.
#   key IDX STATUS   STATUS match|mismatch|unreadable|missing|unchecked (no openssl, or the key does not parse)
trap '' HUP PIPE
umask 077
n=$1
shift
have_openssl=no
command -v openssl >/dev/null 2>&1 && have_openssl=yes

i=0
while [ "$i" -lt "$n" ]; do
  k=$1
  want=$2
  shift 2
  if [ ! -e "$k" ]; then
    st=missing
  elif [ ! -f "$k" ] || [ ! -r "$k" ]; then
    st=unreadable
  elif [ "$have_openssl" = no ]; then
    st=unchecked
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
