# shellcheck shell=sh
# FENCE (two controllers, docs/ha.md), called under the POP lock: refuse a controller whose lock
# epoch is older than the last this POP saw, or the same epoch from another holder; else remember
# it in archive/.certmgr-fence ("EPOCH HOLDER", replaced with one rename). $epoch "" (the directory
# store): nothing checked, nothing written. Refused: `fenced=<seen epoch> <seen holder>`, exit 6.
# Lab only: when archive/.certmgr-trace exists, `trace WORD` appends one line to it, under the lock.
# Needs say/b64 (common.sh), $root, $epoch, $holder.
trace() {
  tf=$root/archive/.certmgr-trace
  [ -f "$tf" ] || return 0
  printf '%s holder=%s epoch=%s pid=%s time=%s\n' "$1" "$holder" "$epoch" "$$" \
    "$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)" >>"$tf" 2>/dev/null || :
}
fence() {
  [ -n "$epoch" ] || return 0
  ff=$root/archive/.certmgr-fence
  seen_e=0 seen_h=
  if [ -r "$ff" ]; then read -r seen_e seen_h <"$ff" || :; fi
  case $seen_e in ''|*[!0-9]*) seen_e=0 ;; esac
  if [ "$epoch" -lt "$seen_e" ] || { [ "$epoch" -eq "$seen_e" ] && [ "$holder" != "$seen_h" ]; }; then
    say "fenced=$seen_e $seen_h"
    trace fenced
    exit 6
  fi
  [ "$epoch" -ne "$seen_e" ] || [ "$holder" != "$seen_h" ] || return 0
  o=$( (printf '%s %s\n' "$epoch" "$holder" >"$ff.tmp-$$" && sync -- "$ff.tmp-$$" && mv -f -- "$ff.tmp-$$" "$ff") 2>&1) || {
    rm -f -- "$ff.tmp-$$"
    say "lock_failed=$(b64 "cannot record the fencing epoch in $ff: $o")"
    exit 5
  }
}
