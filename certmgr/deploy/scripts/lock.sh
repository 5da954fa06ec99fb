# shellcheck shell=sh
# One certmgr script at a time per POP, whichever controller (state dir) runs it: flock(1) from
# util-linux (Essential in Debian) on archive/.certmgr.lock, which the deploy user can always create
# (it uploads there). Held until the script exits — a timed-out script the client gave up
# on keeps it until it ends. Commands run under it get `9>&-`, so a daemon they start cannot keep it.
# Needs say/b64 (common.sh), $root and $lockwait.
locked=
lock() {
  [ -z "$locked" ] || return 0
  command -v flock >/dev/null 2>&1 || { say "lock_failed=$(b64 'flock(1) not found (package util-linux)')"; exit 5; }
  lk=$root/archive/.certmgr.lock
  # `true` (not `:`, a special builtin whose failed redirection would end the script), no subshell
  true 2>/dev/null >>"$lk" || { o=$(true 2>&1 >>"$lk"); say "lock_failed=$(b64 "$o")"; exit 5; }
  exec 9>>"$lk"
  flock -w "$lockwait" 9 || { say "lock_busy=$lockwait"; exit 5; }
  locked=1
}
