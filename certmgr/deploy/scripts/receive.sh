# shellcheck shell=sh
# RECEIVE (commit.sh): every upload arrives on the commit's stdin, under the POP lock, as ONE tar
# archive of $sizes bytes, built by the controller from validated names only: each certificate's files
# as archive/<name>/<tmp>/<file> (privkey.pem mode 0600, the others 0644) and its new live link, staged
# as live/<tmp of the first certificate>/<name> (the stage dir, $st: the swap renames them all into
# live/ at once). `head -c` reads no byte past the archive (tar alone would read whole records, the
# `go` line with them) and feeds GNU tar, which extracts exactly the members named here from the
# arguments — none other — with its defaults (no absolute name, no `..`), never the archive's owners,
# its modes under umask 022 (--no-same-permissions: a mode is the archive's less the umask, so no file
# is ever more open than the archive says — the private key 0600 from its creation — and none gets
# a bit the archive leaves out), making the temp dirs (0755) itself. Then `received=1`, and the
# controller's `go` line: a stream cut anywhere before it (EOF, a short archive) removes every temp
# dir of this upload and switches nothing (exit 3). SHA-256 is checked after, as before.
# Needs say/b64/lineage (common.sh), fail, $m and c_<field>_<j> (commit.sh), $root, $sizes and $st.
received=0  # temp dirs made so far (certificates 1..received)
unreceive() {
  set --
  k=0 un='' ut=''
  while [ "$k" -lt "$received" ]; do
    k=$((k + 1))
    eval "un=\$c_name_$k ut=\$c_tmp_$k"
    set -- "$@" "$root/archive/$un/$ut"
  done
  if [ -e "$st" ] || [ -L "$st" ]; then set -- "$@" "$st"; fi
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
# mkdirs: whether every certificate's temp dir is new: then tar makes them (no process here); one
# there already is not ours to remove: each made by mkdir, one at a time, to say which (refused)
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
  if [ -n "$fresh" ]; then received=$m; return 0; fi
  j=0
  for d in "$@"; do
    j=$((j + 1))
    o=$(mkdir -m 755 -- "$d" 2>&1) || { unreceive; refused "$j" upload "$o"; return 1; }
    received=$j
  done
}
# untarred TEXT: tar failed; a cut stream (the archive ends early, a member never came) is "the upload
# stream ended early" for all, a failure naming one certificate's path (disk full) is that one's
untarred() {
  case $1 in
    *"Unexpected EOF"* | *"Not found in archive"* | *"short read"*)
      refused 0 upload "the upload stream ended early"; return ;;
  esac
  k=0 un='' ut=''
  while [ "$k" -lt "$m" ]; do
    k=$((k + 1))
    eval "un=\$c_name_$k ut=\$c_tmp_$k"
    case $1 in *"archive/$un/$ut/"* | *"${st##*/}/$un"*) refused "$k" upload "$1"; return ;; esac
  done
  refused 0 upload "$1"
}
receive() {
  j=0 cn='' ct='' o=''
  [ -d "$root/live" ] || mkdir -m 700 -- "$root/live" 2>/dev/null || :
  if [ -e "$st" ] || [ -L "$st" ]; then refused 0 upload "$st exists already"; return 1; fi
  mkdirs || return 1
  # the members to extract, from the arguments: every file of every certificate, then its staged link
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j"
    d=archive/$cn/$ct
    set -- "$@" "$d/fullchain.pem" "$d/privkey.pem" "$d/cert.pem" "$d/chain.pem"
  done
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j"
    set -- "$@" "live/${st##*/}/$cn"
  done
  # --no-wildcards: a name may hold `*` (a wildcard certificate), matched as itself. The umask is the
  # command substitution's own: the script's stays 077.
  o=$(umask 022; { head -c "$sizes" | tar -x -f - -C "$root" --no-same-owner --no-same-permissions --no-wildcards \
    -m -- "$@"; } 2>&1)
  rc=$?
  umask 077  # the script's own again, whichever shell ran the substitution (ksh93 may not fork for it)
  [ "$rc" -eq 0 ] || { unreceive; untarred "$o"; return 1; }
  # what tar made is what was listed: regular files, and links (no process: the shell's own tests) —
  # never a link where a file belongs, which a later step would follow
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j"
    for f in fullchain.pem privkey.pem cert.pem chain.pem; do
      d=$root/archive/$cn/$ct/$f
      if [ -L "$d" ] || [ ! -f "$d" ]; then unreceive; refused "$j" upload "archive/$cn/$ct/$f is not a regular file"; return 1; fi
    done
    if [ ! -L "$st/$cn" ]; then unreceive; refused "$j" upload "live/${st##*/}/$cn is not a link"; return 1; fi
  done
  say received=1
  IFS= read -r go || go=
  [ "$go" = go ] || { unreceive; refused 0 upload "the upload stream ended early"; return 1; }
}
