# shellcheck shell=sh
# RECEIVE (commit.sh): every upload arrives on the commit's stdin, under the POP lock — for each
# certificate in turn its files in the order of its sha256sum lines, each exactly as long as the next
# number in $sizes — and is written by `head -c` (which reads no byte past its count) into the
# certificate's temp dir, umask 077: a private key is never readable by others, even briefly. Then
# `received=1`, and the controller's `go` line: a stream cut anywhere before it (EOF, a short file)
# removes every temp dir made here and switches nothing (exit 3). SHA-256 is checked after, as before.
# Needs say/b64/lineage (common.sh), fail, $m and c_<field>_<j> (commit.sh), $root and $sizes.
received=0  # temp dirs made so far (certificates 1..received)
unreceive() {
  set --
  k=0 un='' ut=''
  while [ "$k" -lt "$received" ]; do
    k=$((k + 1))
    eval "un=\$c_name_$k ut=\$c_tmp_$k"
    set -- "$@" "$root/archive/$un/$ut"
  done
  [ $# -eq 0 ] || rm -rf -- "$@"
}
# refused J STEP TEXT: certificate J failed at STEP, every other one is reported as not received
refused() {
  k=0 un=''
  while [ "$k" -lt "$m" ]; do
    k=$((k + 1))
    eval "un=\$c_name_$k"
    say "cert=$un"
    if [ "$k" -eq "$1" ]; then fail "$2" "$3"; else fail unreceived "$3"; fi
  done
  say cert=
}
# mkdirs: every certificate's temp dir, mode 0755 (its files stay 0600 until their chmod below), by
# ONE mkdir; all or none (a failure removes those it made and names the first it could not make)
mkdirs() {
  set --
  j=0 cn='' ct='' o='' fresh=1
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j"
    lineage "$cn"
    [ -d "$arch" ] || mkdir -m 700 -- "$arch" 2>/dev/null || :
    if [ -e "$arch/$ct" ] || [ -L "$arch/$ct" ]; then fresh=; fi
    set -- "$@" "$arch/$ct"
  done
  if [ -n "$fresh" ]; then
    if o=$(mkdir -m 755 -- "$@" 2>&1); then received=$m; return 0; fi
    # none was there before: remove whichever it made, name the first it could not make
    received=$m
    j=0
    for d in "$@"; do j=$((j + 1)); [ -d "$d" ] || break; done
    unreceive
    refused "$j" upload "$o"
    return 1
  fi
  # one is there already (not ours to remove): one at a time, as before, to say which
  j=0
  for d in "$@"; do
    j=$((j + 1))
    o=$(mkdir -m 755 -- "$d" 2>&1) || { unreceive; refused "$j" upload "$o"; return 1; }
    received=$j
  done
}
receive() {
  j=0 cn='' ct='' cs='' o=''
  [ -d "$root/live" ] || mkdir -m 700 -- "$root/live" 2>/dev/null || :
  mkdirs || return 1
  # shellcheck disable=SC2086  # the sizes are numbers, one word each
  set -- $sizes
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j cs=\$c_sums_$j"
    lineage "$cn"
    while IFS= read -r l <&3; do
      [ -n "$l" ] || continue
      f=${l#*  }
      case $f in fullchain.pem|privkey.pem|cert.pem|chain.pem) ;; *) f='' ;; esac
      if [ -z "$f" ] || [ $# -eq 0 ]; then unreceive; refused "$j" upload "bad stream description"; return 1; fi
      o=$(head -c "$1" 2>&1 > "$arch/$ct/$f") || { unreceive; refused "$j" upload "$o"; return 1; }
      shift
    done 3<<LINES
$cs
LINES
  done
  # the modes deploy has always given (the key keeps 0600; the dirs were made 0755): one process
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j"
    d=$root/archive/$cn/$ct
    set -- "$@" "$d/cert.pem" "$d/chain.pem" "$d/fullchain.pem"
  done
  o=$(chmod 644 -- "$@" 2>&1) || { unreceive; refused 0 upload "$o"; return 1; }
  say received=1
  IFS= read -r go || go=
  [ "$go" = go ] || { unreceive; refused 0 upload "the upload stream ended early"; return 1; }
}
