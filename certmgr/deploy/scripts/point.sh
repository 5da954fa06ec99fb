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
