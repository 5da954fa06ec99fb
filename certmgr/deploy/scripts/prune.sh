# shellcheck shell=sh
# PRUNE: remove archive versions of one certificate beyond the newest $3, never the live one.
# $1 cert root, $2 name, $3 versions to keep, $4 seconds to wait for the POP lock.
root=$1 keep=$3 lockwait=${4:-30}
# certmgr-include: common.sh lock.sh
lineage "$2"
[ -d "$root/archive" ] || { say "kept_live="; exit 0; }
lock
cur=
if [ -L "$live" ]; then t=$(readlink -- "$live"); cur=${t##*/}; fi
vs=
for e in "$arch"/*; do
  b=${e##*/}
  case $b in ''|*[!0-9]*) continue ;; esac
  if [ -d "$e" ] && [ ! -L "$e" ]; then vs="$vs $b"; fi
done
# $vs is a list of digits-only names: word splitting is what is wanted here
# shellcheck disable=SC2086
for v in $(printf '%s\n' $vs | sort -n | head -n "-$keep"); do
  [ "$v" = "$cur" ] && continue
  g=$arch/.tmp-prune-$v-$$
  if mv -T -- "$arch/$v" "$g" && rm -rf -- "$g"; then say "removed=$v"; else say "prune_failed=$v"; fi
done
say "kept_live=$cur"
