# shellcheck shell=sh
# PRUNE: remove archive versions of one certificate beyond the newest $3, never the live one nor the one before it.
# $1 cert root, $2 name, $3 versions to keep, $4 seconds to wait for the POP lock, $5 $6 the POP
# lock's epoch and holder ("" "": no fencing, fence.sh). Exit 6: fenced (a newer controller handled
# this POP; nothing removed).
root=$1 keep=$3 lockwait=${4:-30} epoch=${5:-} holder=${6:-}
# certmgr-include: common.sh lock.sh fence.sh
lineage "$2"
[ -d "$root/archive" ] || { say "kept_live="; exit 0; }
lock
fence
cur=
if [ -L "$live" ]; then t=$(readlink -- "$live"); cur=${t##*/}; fi
vs=
for e in "$arch"/*; do
  b=${e##*/}
  case $b in ''|*[!0-9]*) continue ;; esac
  if [ -d "$e" ] && [ ! -L "$e" ]; then vs="$vs $b"; fi
done
# The version just before live is kept too: it is the rollback target.
case $cur in ''|*[!0-9]*) cur= ;; esac
prev=
# $vs is a list of digits-only names: word splitting is what is wanted here
# shellcheck disable=SC2086
for v in $(printf '%s\n' $vs | sort -n); do
  if [ -n "$cur" ] && [ "$v" -lt "$cur" ]; then prev=$v; fi
done
# shellcheck disable=SC2086
for v in $(printf '%s\n' $vs | sort -n | head -n "-$keep"); do
  [ "$v" = "$cur" ] && continue
  [ "$v" = "$prev" ] && continue
  g=$arch/.tmp-prune-$v-$$
  if mv -T -- "$arch/$v" "$g" && rm -rf -- "$g"; then say "removed=$v"; else say "prune_failed=$v"; fi
done
say "kept_live=$cur"
