# shellcheck shell=sh
# ROLLBACK: switch certificates that did not verify back to what they pointed at, then ONE test
# and ONE reload. $1 cert root, $2 name, $3 the target to point live/<name> at again ("": remove
# the link), $4 test command, $5 reload command, $6 seconds to wait for the POP lock, $7 $8 the POP
# lock's epoch and holder ("" "": no fencing, fence.sh); then two per further certificate, as $2-$3.
# Exit 3: none could be switched back; 4: the test failed; 6: fenced (nothing switched back).
root=$1 test=$4 reload=$5 lockwait=${6:-30} epoch=${7:-} holder=${8:-}
# certmgr-include: detach.sh common.sh lock.sh fence.sh point.sh
back=0
lock
fence
trace begin
bd=$root/live/.tmp-back-$$
trap '[ ! -d "$bd" ] || rm -rf -- "$bd"; trace end' EXIT
pn=1
eval "p_name_1=\$2 p_target_1=\$3"
if [ $# -gt 8 ]; then shift 8; else set --; fi
while [ $# -ge 2 ]; do
  pn=$((pn + 1))
  eval "p_name_$pn=\$1 p_target_$pn=\$2"
  shift 2
done
# every link switched back by one mv (point_all)
point_all "$bd"
i=0 bn='' ok=''
while [ "$i" -lt "$pn" ]; do
  i=$((i + 1))
  eval "bn=\$p_name_$i ok=\$p_ok_$i"
  say "cert=$bn"
  if [ "$ok" = 1 ]; then say rolled_back=1; back=$((back + 1)); else say rolled_back=0; fi
done
say cert=
[ "$back" -gt 0 ] || exit 3
retest
if [ "$rc" -ne 0 ]; then exit 4; fi
out=$(runcmd "$reload" 2>&1 </dev/null 9>&-); rc=$?
say "reload_rc=$rc"
say "reload_out=$(b64 "$out")"
