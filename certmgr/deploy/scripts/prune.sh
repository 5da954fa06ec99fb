# shellcheck shell=sh
# PRUNE: remove archive versions beyond the newest $2 of each certificate named, never the live one
# nor the one before it (the rollback target). One run for all of a host's certificates, under one
# POP lock: every live link by one readlink, the versions ordered in the shell (no sort), each
# version set aside by a rename (a version is there whole or not at all), all removed by one rm.
# $1 cert root, $2 versions to keep, $3 seconds to wait for the POP lock, $4 $5 the POP lock's
# epoch and holder ("" "": no fencing, fence.sh), $6… the certificates' names. Per certificate:
# `cert=<name>`, then `removed=<v>` / `prune_failed=<v>` per version, and `kept_live=<v>`.
# Exit 6: fenced (a newer controller handled this POP; nothing removed).
root=$1 keep=$2 lockwait=${3:-30} epoch=${4:-} holder=${5:-}
# certmgr-include: common.sh lock.sh fence.sh
shift 5
if [ ! -d "$root/archive" ]; then
  for n in "$@"; do say "cert=$n"; say "kept_live="; done
  exit 0
fi
lock
fence
k=0
for n in "$@"; do
  k=$((k + 1))
  eval "p_name_$k=\$n"
done
for n in "$@"; do
  set -- "$@" "$root/live/$n"
done
shift "$k"
readlinks p_link_ "$@"
gone=''
i=0
while [ "$i" -lt "$k" ]; do
  i=$((i + 1))
  t=''
  eval "n=\$p_name_$i t=\$p_link_$i"
  arch=$root/archive/$n
  say "cert=$n"
  t=${t%/}  # `../archive/<name>/N/` names N too
  cur=${t##*/}
  case $cur in ''|*[!0-9]*) cur= ;; esac
  vs=''
  for e in "$arch"/*; do
    b=${e##*/}
    case $b in ''|*[!0-9]*) continue ;; esac
    if [ -d "$e" ] && [ ! -L "$e" ]; then
      vs="$vs $b"
      # the version live/<name> leads to, however its link spells it (an absolute path, `./`): the shell's
      # own test, no process; a shell without `-ef` fails it and keeps the link's reading
      # shellcheck disable=SC3013
      if [ -z "$cur" ] && [ -L "$root/live/$n" ] && [ "$root/live/$n" -ef "$e" ] 2>/dev/null; then cur=$b; fi
    fi
  done
  # newest first, by repeated selection: a few numbers per lineage
  rest=$vs desc=''
  while [ -n "$rest" ]; do
    max=''
    for v in $rest; do
      if [ -z "$max" ] || [ "$v" -gt "$max" ]; then max=$v; fi
    done
    desc="$desc $max"
    left=''
    for v in $rest; do
      [ "$v" = "$max" ] || left="$left $v"
    done
    rest=$left
  done
  prev=''  # the newest version older than the live one: the rollback target, kept too
  if [ -n "$cur" ]; then
    for v in $desc; do
      if [ "$v" -lt "$cur" ]; then prev=$v; break; fi
    done
  fi
  c=0
  for v in $desc; do
    c=$((c + 1))
    [ "$c" -gt "$keep" ] || continue
    [ "$v" != "$cur" ] || continue
    [ "$v" != "$prev" ] || continue
    g=$arch/.tmp-prune-$v-$$
    if mv -T -- "$arch/$v" "$g" 2>/dev/null; then
      say "removed=$v"
      gone="$gone$nl$g"
    else
      say "prune_failed=$v"
    fi
  done
  say "kept_live=$cur"
done
say cert=
# every version set aside, by one rm (one left by a failure here is a temp the next commit sweeps)
if [ -n "$gone" ]; then
  set --
  while IFS= read -r g; do
    [ -z "$g" ] || set -- "$@" "$g"
  done <<GONE
$gone
GONE
  rm -rf -- "$@" 2>/dev/null || :
fi
