# shellcheck shell=sh
# Shared by commit and rollback: point live/<name> at $1 (a relative target) with one rename(2).
# With $lazysync set the caller syncs live/ once after all its renames (one process, not one each).
lazysync=
point() {
  tl=$root/live/.$name.tmp-$$-$2
  if [ -z "$1" ]; then rm -f -- "$live"; return $?; fi
  # -T: a leftover of a dead run with the same PID, a link to a directory, is replaced, never entered
  ln -sfT -- "$1" "$tl" || return 1
  if ! mv -T -- "$tl" "$live"; then rm -f -- "$tl"; return 1; fi
  [ -n "$lazysync" ] || sync -- "$root/live" 2>/dev/null || :
}
# the test command again, after switching back: its verdict and text in the script's own section
retest() {
  out=$(runcmd "$test" 2>&1 </dev/null 9>&-); rc=$?
  say "retest_rc=$rc"
  say "retest_out=$(b64 "$out")"
}
# point_all DIR: point live/<p_name_I> at p_target_I (I = 1..$pn; "": remove the link), each with ONE
# rename(2) but all by ONE `mv -t` (a link per certificate made in DIR, a directory under live/, by
# `ln`): GNU mv renames into live/ by its descriptor, never following an old link into its directory,
# and goes on past one it cannot rename. p_ok_I: 1 switched (its staged link gone), 0 not.
point_all() {
  pd=$1 pi=0 pnm='' pt=''
  if [ "$pn" -eq 1 ]; then
    # one link: point's own ln + mv, no stage dir to make and remove
    eval "lineage \"\$p_name_1\"; pt=\$p_target_1"
    pi=0
    if point "$pt" back; then pi=1; fi
    eval "p_ok_1=\$pi"
    return 0
  fi
  [ -d "$pd" ] || mkdir -m 700 -- "$pd" 2>/dev/null || :
  set --
  while [ "$pi" -lt "$pn" ]; do
    pi=$((pi + 1))
    eval "pnm=\$p_name_$pi pt=\$p_target_$pi p_ok_$pi=0 p_ln_$pi="
    [ -n "$pt" ] || continue
    if ln -sfT -- "$pt" "$pd/$pnm" 2>/dev/null; then eval "p_ln_$pi=1"; set -- "$@" "$pd/$pnm"; fi
  done
  [ $# -eq 0 ] || mv -f -t "$root/live" -- "$@" 2>/dev/null
  # no link before: none after (one rm for all)
  set --
  pi=0
  while [ "$pi" -lt "$pn" ]; do
    pi=$((pi + 1))
    eval "pnm=\$p_name_$pi pt=\$p_target_$pi"
    [ -n "$pt" ] || set -- "$@" "$root/live/$pnm"
  done
  [ $# -eq 0 ] || rm -f -- "$@" 2>/dev/null
  pi=0 pl=''
  while [ "$pi" -lt "$pn" ]; do
    pi=$((pi + 1))
    eval "pnm=\$p_name_$pi pt=\$p_target_$pi pl=\$p_ln_$pi"
    if [ -z "$pt" ]; then
      [ -e "$root/live/$pnm" ] || [ -L "$root/live/$pnm" ] || eval "p_ok_$pi=1"
    elif [ -n "$pl" ] && [ ! -e "$pd/$pnm" ] && [ ! -L "$pd/$pnm" ]; then
      eval "p_ok_$pi=1"
    fi
  done
  [ -n "$lazysync" ] || sync -- "$root/live" 2>/dev/null || :
}
