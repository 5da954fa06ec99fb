# shellcheck shell=sh
# COMMIT: one transaction for every certificate due on this POP, under the POP lock. For each:
# verify the upload's SHA-256, store it as archive/<name>/<ver>/, swap live/<name> (one rename).
# Then ONE test and ONE reload for all; a failed test (or reload) switches every one of them back.
# $1-$6 the first certificate: name, upload temp dir, store version, sha256sum lines (the first may
# be `link TARGET`: its live link's target as inspect read it, see below), certbot version to
# convert ("": no conversion); $7 test command, $8 reload command, $9 privkey owner,
# $10 this controller's tag (its own upload temp dirs are `.tmp-up-<tag>-…`), $11 a UTC stamp for
# names set aside, $12 seconds to wait for the POP lock, $13 $14 the POP lock's epoch and holder
# ("" "": no fencing, fence.sh), $15 the size of the upload's tar archive on stdin ("": the files are
# in the temp dirs already; see receive.sh); then five per further certificate, as $2-$6.
# Exit 3: no certificate could be swapped (nothing changed); 4: the test or reload failed (all back);
# 5: the POP lock could not be taken; 6: fenced (a newer controller handled this POP; nothing changed).
root=$1 test=$7 reload=$8 keyown=$9
ctl=${10:-} stamp=${11:-0} lockwait=${12:-30} epoch=${13:-} holder=${14:-} sizes=${15:-} st=""
# certmgr-include: detach.sh common.sh lock.sh fence.sh point.sh keyown.sh receive.sh
umask 077
# the lock file lives in archive/: a first deploy makes it (0700, as any directory deploy makes)
[ -z "$sizes" ] || [ -d "$root/archive" ] || mkdir -m 700 -- "$root/archive" 2>/dev/null || :
fail() { say "failed_step=$1"; say "failed_out=$(b64 "$2")"; }
sumsok() { (cd -- "$1" 2>&1 && sha256sum --strict --quiet -c - 2>&1 <<SUMS
$sums
SUMS
) }

n=0  # certificates swapped so far: name_<i> and prev_<i> (i = 1..n) say how to switch each back
# Forks are what a POP pays per certificate: every upload arrives in ONE tar (receive.sh), is checked
# by ONE sha256sum and made durable by ONE sync before any rename (per certificate only when that
# fails, to say which one); every live/<name> is switched by ONE mv (swap_all), and live/ and the
# lineages are synced once after the swaps ($lazysync), before the test. The renames that store each
# version (each lineage its own directory) are one `rename.ul` for all where it is there (store_deferred).
m=0  # certificates asked for: c_<field>_<j> (j = 1..m)
want() {
  m=$((m + 1))
  w='' s=$4
  case $s in "link "*"$nl"*) w=${s%%"$nl"*} s=${s#*"$nl"} w=${w#link } ;; esac
  eval "c_name_$m=\$1 c_tmp_$m=\$2 c_ver_$m=\$3 c_sums_$m=\$s c_conv_$m=\$5 c_want_$m=\$w"
}
# every upload's files and directory, synced by one process
sync_uploads() {
  set --
  j=0 cn='' ct=''
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j"
    d=$root/archive/$cn/$ct
    set -- "$@" "$d/fullchain.pem" "$d/privkey.pem" "$d/cert.pem" "$d/chain.pem" "$d"
  done
  sync -- "$@"
}
# all_ok: every upload matches its SHA-256 and is on disk (one sha256sum, one sync); else non-zero.
# The sums name absolute paths (no `cd` in a subshell); a cert root with a newline in it (it would
# split a line) is checked one certificate at a time instead.
all_ok() {
  case $root in *"$nl"*) return 1 ;; esac
  allsums='' j=0 cn='' ct='' cs=''
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j ct=\$c_tmp_$j cs=\$c_sums_$j"
    while IFS= read -r l; do
      [ -n "$l" ] || continue
      allsums="$allsums${l%%  *}  $root/archive/$cn/$ct/${l#*  }
"
    done <<LINES
$cs
LINES
  done
  sha256sum --strict --quiet -c - >/dev/null 2>&1 <<SUMS && sync_uploads >/dev/null 2>&1
$allsums
SUMS
}

# CONVERSIONS (certbot's layout), prepared for every certificate at once before any swap: certbot's
# live version K copied into a temp dir per lineage (mkdir for all, cp per file, one chmod per mode,
# one keyown, one sync), renamed into archive/<name>/K/ by stage. A copy that failed is c_cfail_<j>.
# K/ holding other content (or K being the store's number) puts certbot's copy aside instead.
# copy_all: certbot's four files of every conversion prepared (c_ctmp_<j>) into it as cert.pem … privkey.pem,
# by one tar into an archive file and one out of it (GNU tar; cp follows links, so does -h; -m: new mtimes, as
# cp's). Non-zero when anything failed (no pipe: each tar's status is seen) or a file is not there after.
copy_all() {
  ca=$root/archive/.tmp-conv$$.tar
  set --
  j=0 cn='' cc='' ct='' k=''
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j cc=\$c_conv_$j ct=\$c_ctmp_$j"
    [ -n "$ct" ] || continue
    for k in cert chain fullchain privkey; do set -- "$@" "$cn/$k$cc.pem"; done
  done
  [ $# -gt 0 ] || return 1
  ok=
  if tar -chf "$ca" -C "$root/archive" -- "$@" 2>/dev/null \
      && tar -xmf "$ca" -C "$root/archive" --no-same-owner \
        --transform "s,^\([^/]*\)/\([a-z]*\)\([0-9][0-9]*\)\.pem\$,\1/.tmp-\3-conv$$/\2.pem," 2>/dev/null; then
    ok=1
  fi
  rm -f -- "$ca"
  [ -n "$ok" ] || return 1
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "ct=\$c_ctmp_$j"
    [ -n "$ct" ] || continue
    for k in cert chain fullchain privkey; do [ -f "$ct/$k.pem" ] || return 1; done
  done
}
prepare_conversions() {
  set --
  j=0 cn='' cv='' cc='' ct='' o='' fresh=1
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j cv=\$c_ver_$j cc=\$c_conv_$j"
    eval "c_cdir_$j= c_ctmp_$j= c_cfail_$j="
    [ -n "$cc" ] || continue
    lineage "$cn"
    cdir=$cc
    if [ "$cc" = "$cv" ]; then
      cdir=$cc.certmgr-aside-$stamp
    elif [ -e "$arch/$cc" ] && ! cmp -s -- "$arch/$cc/fullchain.pem" "$arch/fullchain$cc.pem"; then
      cdir=$cc.certmgr-aside-$stamp
    fi
    eval "c_cdir_$j=\$cdir"
    [ ! -d "$arch/$cdir" ] || continue
    ct=$arch/.tmp-$cc-conv$$
    if [ -e "$ct" ] || [ -L "$ct" ]; then fresh=; fi
    eval "c_ctmp_$j=\$ct"
    set -- "$@" "$ct"
  done
  [ $# -gt 0 ] || return 0
  if [ -z "$fresh" ] || ! mkdir -m 755 -- "$@" 2>/dev/null; then
    # one at a time, to say which could not be made (none removed that was there before)
    j=0
    while [ "$j" -lt "$m" ]; do
      j=$((j + 1))
      eval "ct=\$c_ctmp_$j"
      [ -n "$ct" ] || continue
      if [ -n "$fresh" ] && [ -d "$ct" ] && [ ! -L "$ct" ]; then continue; fi
      o=$(mkdir -m 755 -- "$ct" 2>&1) || eval "c_ctmp_$j= c_cfail_$j=\$o"
    done
  fi
  # every copy at once (copy_all: 3 processes, not a `cp` per file); if that fails, file by file, to say which
  copied=
  if copy_all; then copied=1; fi
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "cn=\$c_name_$j cc=\$c_conv_$j ct=\$c_ctmp_$j"
    [ -n "$ct" ] || continue
    lineage "$cn"
    for k in cert chain fullchain privkey; do
      [ -z "$copied" ] || continue
      if ! o=$(cp -- "$arch/$k$cc.pem" "$ct/$k.pem" 2>&1); then
        rm -rf -- "$ct"
        eval "c_ctmp_$j= c_cfail_$j=\$o"
        continue 2
      fi
    done
    set -- "$@" "$ct"
  done
  [ $# -gt 0 ] || return 0
  # the modes deploy has always given: 0644, the key 0600 (one chmod each for all)
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "ct=\$c_ctmp_$j"
    [ -z "$ct" ] || set -- "$@" "$ct/cert.pem" "$ct/chain.pem" "$ct/fullchain.pem"
  done
  chmod 644 -- "$@" 2>/dev/null
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "ct=\$c_ctmp_$j"
    [ -z "$ct" ] || set -- "$@" "$ct/privkey.pem"
  done
  chmod 600 -- "$@" 2>/dev/null
  if [ -n "$keyown" ] && ! keyown "$@" >/dev/null 2>&1; then
    # one at a time, to say which
    j=0
    while [ "$j" -lt "$m" ]; do
      j=$((j + 1))
      eval "ct=\$c_ctmp_$j"
      [ -n "$ct" ] || continue
      if ! o=$(keyown "$ct/privkey.pem" 2>&1); then
        rm -rf -- "$ct"
        eval "c_ctmp_$j= c_cfail_$j=\$o"
      fi
    done
  fi
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "ct=\$c_ctmp_$j"
    [ -z "$ct" ] || set -- "$@" "$ct/cert.pem" "$ct/chain.pem" "$ct/fullchain.pem" "$ct/privkey.pem" "$ct"
  done
  [ $# -eq 0 ] || sync -- "$@" 2>/dev/null || :
}

# stage J: store certificate J's version (and swap a converted certbot directory; any other
# live/<name> is switched by swap_all, with every other one); non-zero when it failed (unchanged).
# Its live link's target was read before (c_link_<J>, one readlink for all), its conversion prepared.
stage() {
  tmp='' ver='' sums='' conv='' cur='' cdir='' ct='' cfail=''
  eval "lineage \"\$c_name_$1\"; tmp=\$c_tmp_$1 ver=\$c_ver_$1 sums=\$c_sums_$1 conv=\$c_conv_$1"
  eval "cur=\$c_link_$1 cdir=\$c_cdir_$1 ct=\$c_ctmp_$1 cfail=\$c_cfail_$1"
  say "cert=$name"
  if [ -z "$checked" ]; then
    o=$(sumsok "$arch/$tmp") || { fail verify "$o"; return 1; }
  fi
  if [ -n "$keyown" ] && [ -z "$keyed" ]; then
    o=$(keyown "$arch/$tmp/privkey.pem" 2>&1) || { fail chown "$o"; return 1; }
    [ -z "$checked" ] || sync -- "$arch/$tmp/privkey.pem" 2>/dev/null || :
  fi
  if [ -z "$checked" ]; then
    o=$(cd -- "$arch/$tmp" 2>&1 && sync -- fullchain.pem privkey.pem cert.pem chain.pem . 2>&1) || { fail sync "$o"; return 1; }
  fi
  # The store's number names this version on every POP. archive/<name>/N/ may exist already: this
  # very certificate (a rolled-back attempt, another controller's upload) is used as it is; other
  # content (a certbot-era or hand-made N/) is set aside as N.certmgr-aside-<stamp>/, never lost.
  if [ -d "$arch/$ver" ] && [ ! -L "$arch/$ver" ] && sumsok "$arch/$ver" >/dev/null; then
    # its key owner-only whatever made it (an older tool, a hand-made copy); best effort: a key given to
    # privkey_owner by an earlier deploy is not the deploy user's to chmod (and was made 0600 then)
    chmod 600 -- "$arch/$ver/privkey.pem" 2>/dev/null || :
    if [ -n "$keyown" ]; then o=$(keyown "$arch/$ver/privkey.pem" 2>&1) || { fail chown "$o"; return 1; }; fi
    rm -rf -- "${arch:?}/$tmp"
    say "reused=$ver"
  else
    if [ -e "$arch/$ver" ] || [ -L "$arch/$ver" ]; then
      aside=$ver.certmgr-aside-$stamp
      # not the name certbot's converted copy takes (K = N, prepare_conversions), nor one already there
      if [ "$aside" = "$cdir" ] || [ -e "$arch/$aside" ] || [ -L "$arch/$aside" ]; then
        aside=$ver.certmgr-aside-$stamp-$$
      fi
      # live reads N/ under whatever spelling its link has (an absolute path, a trailing slash): `-ef`
      # shellcheck disable=SC3013
      if [ "$cur" = "../archive/$name/$ver" ] || { [ -L "$live" ] && [ "$live" -ef "$arch/$ver" ]; } 2>/dev/null
      then
        # live reads N/: copy it aside, point live at the copy, then remove N/ — live never dangles
        o=$(cp -a -- "$arch/$ver" "$arch/$aside" 2>&1) || { fail aside "$o"; return 1; }
        point "../archive/$name/$aside" aside || { fail aside "cannot point live at $aside"; return 1; }
        cur=../archive/$name/$aside
        o=$(rm -rf -- "${arch:?}/$ver" 2>&1) || { fail aside "$o"; return 1; }
      else
        o=$(mv -T -- "$arch/$ver" "$arch/$aside" 2>&1) || { fail aside "$o"; return 1; }
      fi
      say "aside=$aside"
    fi
    if deferrable; then
      # renamed with every other such upload by ONE process after this loop (store_deferred)
      defer="$defer $1"
      eval "c_cur_$1=\$cur"
      return 0
    fi
    o=$(mv -T -- "$arch/$tmp" "$arch/$ver" 2>&1) || { fail rename "$o"; return 1; }
  fi
  eval "c_cur_$1=\$cur"
  stage_tail "$1"
}

# deferrable: whether this upload's rename to archive/<name>/<ver>/ can wait for the one rename of all
# (util-linux's `rename.ul`, Debian's name for it: it renames each path it is given by one rename(2)):
# two or more certificates, and every deferred temp dir is <one common prefix><its version>.
deferrable() {
  [ -n "$renamer" ] || return 1
  p=${tmp%"$ver"}
  [ -n "$p" ] && [ "$p$ver" = "$tmp" ] || return 1
  case $p in .tmp-up-*) ;; *) return 1 ;; esac
  case ${p#.tmp-up-} in *.tmp-up-*) return 1 ;; esac  # the one occurrence in a path is then its temp dir's
  case $p in *[!A-Za-z0-9_.-]*) return 1 ;; esac
  [ -n "$pfx" ] || pfx=$p
  [ "$pfx" = "$p" ]
}

# store_deferred: every deferred upload renamed to archive/<name>/<ver>/ by ONE `rename.ul` (the last
# occurrence of the common prefix in each path replaced by nothing: only its temp dir's own name changes);
# one it did not rename (it goes on past a failure) is renamed alone by `mv -T`, whose words say why not.
store_deferred() {
  [ -n "$defer" ] || return 0
  set --
  for j in $defer; do
    eval "set -- \"\$@\" \"\$root/archive/\$c_name_$j/\$c_tmp_$j\""
  done
  "$renamer" -l -- "$pfx" '' "$@" >/dev/null 2>&1 || :
  for j in $defer; do
    eval "lineage \"\$c_name_$j\"; tmp=\$c_tmp_$j ver=\$c_ver_$j"
    if [ -e "$arch/$tmp" ] || [ -L "$arch/$tmp" ] || [ ! -d "$arch/$ver" ]; then
      if ! o=$(mv -T -- "$arch/$tmp" "$arch/$ver" 2>&1); then
        say "cert=$name"
        fail rename "$o"
        unprepared "$j"
        continue
      fi
    fi
    stage_tail "$j" || unprepared "$j"
  done
}

# unprepared J: a certificate that failed before its conversion was renamed into place leaves no prepared copy
unprepared() {
  eval "ct=\$c_ctmp_$1"
  if [ -n "$ct" ] && [ -d "$ct" ]; then rm -rf -- "$ct"; fi
}

# stage_tail J: certificate J's version is stored as archive/<name>/<ver>/: say so, and swap a converted
# certbot directory (or leave the swap to swap_all); non-zero when it failed.
stage_tail() {
  ver='' conv='' cur='' cdir='' ct='' cfail=''
  eval "lineage \"\$c_name_$1\"; ver=\$c_ver_$1 conv=\$c_conv_$1"
  eval "cur=\$c_cur_$1 cdir=\$c_cdir_$1 ct=\$c_ctmp_$1 cfail=\$c_cfail_$1"
  say "cert=$name"
  [ -n "$lazysync" ] || sync -- "$arch" 2>/dev/null || :
  say "stored=$ver"
  prev=
  if [ -n "$conv" ]; then
    # certbot layout: its live version K was copied (prepare_conversions); rollback goes there
    if [ -n "$cfail" ]; then fail convert "$cfail"; return 1; fi
    if [ ! -d "$arch/$cdir" ]; then
      [ -n "$ct" ] || { fail convert "archive/$name/$cdir/ was not prepared"; return 1; }
      o=$(mv -T -- "$ct" "$arch/$cdir" 2>&1) || { rm -rf -- "$ct"; fail convert "$o"; return 1; }
    elif [ -n "$ct" ]; then
      rm -rf -- "$ct"
    fi
    prev=../archive/$name/$cdir
    tl=$st/$name
    bak=$root/live/.$name.certbot-old
    # the link staged by the upload (receive.sh); made here when the files were uploaded before
    if [ ! -L "$tl" ]; then
      o=$(stagelink "../archive/$name/$ver" "$tl" 2>&1) || { fail swap "$o"; return 1; }
    fi
    # rename(2) cannot replace a directory by a symlink: two renames, microseconds apart
    o=$(mv -T -- "$live" "$bak" 2>&1) || { rm -f -- "$tl"; fail swap "$o"; return 1; }
    if ! o=$(mv -T -- "$tl" "$live" 2>&1); then mv -T -- "$bak" "$live"; rm -f -- "$tl"; fail swap "$o"; return 1; fi
    if [ -n "$lazysync" ]; then
      baks="$baks $1"  # removed after the one sync of live/ (below), by one rm
    else
      sync -- "$root/live" 2>/dev/null || :
      rm -rf -- "$bak"
    fi
    say "converted=$conv"
    say "convdir=$cdir"
    say "prev=$prev"
    say swapped=1
    n=$((n + 1))
    eval "name_$n=\$name prev_$n=\$prev"
  else
    # switched with every other one by swap_all (which says prev= and swapped=1)
    pend="$pend $1"
    eval "c_prev_$1=\$cur"
  fi
}

# stagelink TARGET PATH: a link in the stage dir (made here when no upload made it)
stagelink() {
  [ -d "$st" ] || mkdir -m 700 -- "$st" || return 1
  ln -sfT -- "$1" "$2"
}

# swap_all: every stored certificate's live/<name> switched to its staged link, each by ONE rename(2),
# all by ONE `mv -t`: GNU mv renames into live/ by its descriptor and never follows an old link into
# the directory it points at. A certificate whose staged link is still there after was not switched
# (mv goes on past a failure): it fails at "swap" with mv's words about it, the others are swapped.
swap_all() {
  set --
  cn='' cv='' cp='' o='' l=''
  for j in $pend; do
    eval "cn=\$c_name_$j cv=\$c_ver_$j"
    if [ ! -L "$st/$cn" ]; then
      o=$(stagelink "../archive/$cn/$cv" "$st/$cn" 2>&1) || eval "c_sfail_$j=\$o"
    fi
    set -- "$@" "$st/$cn"
  done
  [ $# -gt 0 ] || return 0
  o=$(mv -f -t "$root/live" -- "$@" 2>&1)
  for j in $pend; do
    eval "cn=\$c_name_$j cp=\$c_prev_$j"
    say "cert=$cn"
    if [ -e "$st/$cn" ] || [ -L "$st/$cn" ] || eval "[ -n \"\${c_sfail_$j:-}\" ]"; then
      eval "l=\${c_sfail_$j:-}"
      if [ -z "$l" ]; then
        # mv's lines about this one (its name, then a quote or the end), else all it said
        while IFS= read -r ml; do
          case $ml in *"/$cn'"* | *"/$cn") l="$l${l:+$nl}$ml" ;; esac
        done <<MV
$o
MV
      fi
      fail swap "${l:-$o}"
      continue
    fi
    say "prev=$cp"
    say swapped=1
    n=$((n + 1))
    eval "name_$n=\$cn prev_$n=\$cp"
  done
  say cert=
  [ -n "$lazysync" ] || sync -- "$root/live" 2>/dev/null || :
}

# Switch every swapped certificate back to what it pointed at, all by one `mv` (point_all); non-zero
# when one could not be.
back_all() {
  i=0 bad=0 bn='' ok=''
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    eval "p_name_$i=\$name_$i p_target_$i=\$prev_$i"
  done
  pn=$n
  point_all "$st"
  i=0
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    eval "bn=\$name_$i ok=\$p_ok_$i"
    say "cert=$bn"
    if [ "$ok" = 1 ]; then say rolled_back=1; else say rolled_back=0; bad=1; fi
  done
  say cert=
  [ -z "$lazysync" ] || sync -- "$root/live" 2>/dev/null || :
  return "$bad"
}

lock
fence
trace begin
want "$2" "$3" "$4" "$5" "$6"
if [ $# -gt 15 ]; then shift 15; else set --; fi
while [ $# -ge 5 ]; do
  want "$1" "$2" "$3" "$4" "$5"
  shift 5
done
# the stage dir of this transaction's new links (and of its switches back): under live/ (one file
# system, for rename(2)), named after the first upload's temp dir (unique); gone when the script ends
eval "st=\$root/live/\$c_tmp_1"
trap '[ ! -d "$st" ] || rm -rf -- "$st"; trace end' EXIT
[ -z "$sizes" ] || receive || exit 3
checked=
if all_ok; then checked=1 lazysync=1; fi
# every key given to $keyown by one process (else per certificate in stage, to say which failed)
keyed=
if [ -n "$keyown" ] && [ -n "$checked" ]; then
  set --
  j=0
  while [ "$j" -lt "$m" ]; do
    j=$((j + 1))
    eval "set -- \"\$@\" \"\$root/archive/\$c_name_$j/\$c_tmp_$j/privkey.pem\""
  done
  if keyown "$@" >/dev/null 2>&1; then keyed=1; sync -- "$@" 2>/dev/null || :; fi
fi
# what every live/<name> points at now (the rollback targets): inspect's reading of the link where it
# still leads to that very directory (`-ef`, the shell's own test: no process; under the lock, so it
# stays so), else one readlink for all the others. `-ef` is not POSIX, but dash, bash, ksh and busybox
# have it; a shell without it fails the test, and so reads every link.
set --
j=0 cn='' cw='' idx=''
while [ "$j" -lt "$m" ]; do
  j=$((j + 1))
  eval "cn=\$c_name_$j cw=\$c_want_$j"
  # shellcheck disable=SC3013
  if [ -n "$cw" ] && [ -L "$root/live/$cn" ] && [ "$root/live/$cn" -ef "$root/live/$cw" ] 2>/dev/null; then
    eval "c_link_$j=\$cw"
  else
    set -- "$@" "$root/live/$cn"
    idx="$idx $j"
  fi
done
if [ $# -gt 0 ]; then
  readlinks r_link_ "$@"
  i=0
  for j in $idx; do
    i=$((i + 1))
    eval "c_link_$j=\$r_link_$i"
  done
fi
prepare_conversions
baks='' pend='' defer='' pfx='' renamer=''
if [ "$m" -ge 2 ] && command -v rename.ul >/dev/null 2>&1; then renamer=rename.ul; fi
j=0
while [ "$j" -lt "$m" ]; do
  j=$((j + 1))
  stage "$j" || unprepared "$j"
done
store_deferred
say cert=
# before any switch, archive/.last-commit-<name> names this commit's upload: a later run settling an
# interrupted deploy tells "switched and switched back" from "never switched" by it (intents.verdict;
# a certbot conversion needs none: its link tells). Builtins only; outside the lineage, left to certbot.
for j in $pend; do  # stored, its swap to come (a certificate that failed before is not switched by this commit)
  eval "cn=\$c_name_$j ct=\$c_tmp_$j"
  printf '%s\n' "$ct" > "$root/archive/.last-commit-$cn" 2>/dev/null || :
done
swap_all
[ "$n" -gt 0 ] || exit 3
if [ -n "$lazysync" ]; then  # the renames on disk before nginx reads them: every lineage swapped, and live/
  set --
  i=0 bn=''
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    eval "bn=\$name_$i"
    set -- "$@" "$root/archive/$bn"
  done
  sync -- "$@" "$root/live" 2>/dev/null || :
  # certbot's converted directories, set aside by their rename, gone once live/ is on disk: one rm
  set --
  for j in $baks; do
    eval "set -- \"\$@\" \"\$root/live/.\$c_name_$j.certbot-old\""
  done
  [ $# -eq 0 ] || rm -rf -- "$@"
fi
out=$(runcmd "$test" 2>&1 </dev/null 9>&-); rc=$?
say "test_rc=$rc"
if [ "$rc" -ne 0 ]; then
  say "test_out=$(b64 "$out")"
  back_all || :
  retest
  exit 4
fi
out=$(runcmd "$reload" 2>&1 </dev/null 9>&-); rc=$?
say "reload_rc=$rc"
if [ "$rc" -ne 0 ]; then
  say "reload_out=$(b64 "$out")"
  # The failed reload may have loaded the new files anyway: switch back, test, reload again.
  back_all || exit 4
  retest
  [ "$rc" -eq 0 ] || exit 4
  out=$(runcmd "$reload" 2>&1 </dev/null 9>&-); rc=$?
  say "rereload_rc=$rc"
  say "rereload_out=$(b64 "$out")"
  exit 4
fi
# Leftovers, swept under the lock. Scripts make their temporaries under the lock, so any such
# is a dead script's. Uploads (and their stage dirs in live/) are another controller's until an
# hour untouched: only this controller's own (its earlier run is over — the store lock) or one
# untouched for an hour (its controller is gone) is removed. All by one rm.
sweepable() {
  [ -e "$1" ] || [ -L "$1" ] || return 1
  [ "$1" != "$st" ] || return 1
  case ${1##*/} in
    .tmp-up-"$ctl"-*) [ -n "$ctl" ] || return 1 ;;
    .tmp-up-*) [ -n "$(find "$1" -maxdepth 0 -mmin +60 2>/dev/null)" ] || return 1 ;;
  esac
}
set --
for d in "$root"/live/.tmp-up-* "$root"/live/.tmp-back-* "$root"/archive/.tmp-conv*.tar "$root"/archive/.certmgr-fence.tmp-*; do
  if sweepable "$d"; then set -- "$@" "$d"; fi
done
i=0 bn=''
while [ "$i" -lt "$n" ]; do
  i=$((i + 1))
  eval "bn=\$name_$i"
  lineage "$bn"
  for d in "$arch"/.tmp-* "$root/live/.$name.tmp-"*; do
    if sweepable "$d"; then set -- "$@" "$d"; fi
  done
done
[ $# -eq 0 ] || rm -rf -- "$@"
say done=1
