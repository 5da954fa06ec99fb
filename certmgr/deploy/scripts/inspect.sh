# shellcheck shell=sh
# INSPECT: the state of every certificate due on this POP, and the preflight test, in one run.
# The preflight test (it loads every certificate of the POP) runs only where the commit could not
# undo what it does: a POP certmgr has not committed to before (no lock file yet), a lineage not
# in certmgr's layout (certbot's is converted) or a missing directory. Elsewhere a failed test after
# the swap tells "already broken" from "broken by us" by switching back and testing again (commit.sh).
# $1 cert root, $2 the first certificate's name, $3 the test command ("": no test), $4 privkey
# owner to report ("": none), $5 seconds to wait for the POP lock, $6 "1": wait for the lock first
# (settling an interrupted deploy); $7… the names of further certificates.
root=$1 first=$2 test=$3 keyown=$4 lockwait=${5:-30} waitlock=${6:-}
# certmgr-include: common.sh lock.sh
# Settling an interrupted deploy: wait for a commit that may still run here (it holds the lock to its end).
if [ -n "$waitlock" ]; then lock; fi
# The host died between the two renames of a certbot conversion (commit.sh): put certbot's
# directory back before nginx -t looks at the config. Every lineage: the test covers the whole
# host. Under the POP lock: a commit of another controller may be mid-way. Died after both renames,
# before the commit removed certbot's old directory (it does so once live/ is synced, after every
# swap): live/<name> is the new link, the old directory is only litter — removed.
for bak in "$root"/live/.*.certbot-old; do
  [ -d "$bak" ] || continue
  lock
  [ -d "$bak" ] || continue
  n=${bak##*/}; n=${n#.}; n=${n%.certbot-old}
  if [ ! -e "$root/live/$n" ] && [ ! -L "$root/live/$n" ]; then
    mv -T -- "$bak" "$root/live/$n" && say "restored=$n"
  elif [ -L "$root/live/$n" ]; then
    rm -rf -- "$bak"
  fi
done

steady=1  # every lineage a link in certmgr's layout, nothing missing (see above)
# certbot's directory is read under the POP lock: another controller's commit may be converting it
# (live/<name> renamed away, then a link put in its place), and its links must be read whole. A
# commit creates the lock file before converting, so without one there is nothing to wait for (and
# a POP never deployed to is left exactly as it was).
inspect_one() {
  # $1 the name, $2 its index: its links were read by readlinks (link_<5×index-4 … 5×index>)
  lineage "$1"
  say "cert=$name"
  if [ -L "$live" ]; then
    say layout=link
    eval "say \"target=\$link_$(($2 * 5 - 4))\""
  elif [ -d "$live" ]; then
    steady=
    say layout=certbot
    li=$(($2 * 5 - 4)) t=
    for k in cert chain fullchain privkey; do
      li=$((li + 1))
      eval "t=\$link_$li"
      b=${t##*/}
      # its K only if the link leads to this lineage's archive/<name>/<kind>K.pem (what a conversion copies), not
      # to another lineage's file of that name: `-ef`, 1 when they differ (2, a shell without it: the name only)
      # shellcheck disable=SC3013
      if [ -n "$b" ]; then
        [ "$live/$k.pem" -ef "$arch/$b" ] 2>/dev/null
        [ "$?" -ne 1 ] || b=
      fi
      say "certbot_$k=$b"
    done
  elif [ -e "$live" ]; then
    steady=
    say layout=other
  else
    steady=
    say layout=none
  fi
  [ -d "$root/live" ] || { steady=; say missing=live; }
  [ -d "$root/archive" ] || { steady=; say missing=archive; }
  if [ ! -d "$arch" ]; then
    steady=
    say missing=lineage
  else
    # the upload of the last commit that got as far as switching this lineage (commit.sh; builtins only)
    lc=''
    if [ -f "$root/archive/.last-commit-$name" ]; then IFS= read -r lc < "$root/archive/.last-commit-$name" || :; fi
    say "last_commit=$lc"
    for e in "$arch"/*; do
      b=${e##*/}
      case $b in
        ''|*[!0-9]*) ;;
        *) if [ -d "$e" ] && [ ! -L "$e" ]; then say "version=$b"; fi ;;
      esac
      case $b in
        fullchain[0-9]*.pem) n=${b#fullchain}; n=${n%.pem}
          case $n in *[!0-9]*) ;; *) say "certbot_version=$n" ;; esac ;;
      esac
    done
  fi
  # the live fullchain itself (a few KB): certmgr hashes it and reads the serial of its leaf (read below,
  # for every certificate at once)
  if [ -r "$live/fullchain.pem" ]; then chains="$chains $2"; fi
  if [ -n "$keyown" ] && [ -e "$live/privkey.pem" ]; then
    say "key_owner=$(stat -L -c '%U:%G:%u:%g' -- "$live/privkey.pem" 2>/dev/null)"
  fi
}

if [ $# -gt 6 ]; then shift 6; else set --; fi
# every lineage's live link and certbot's four links (five paths per name) by one readlink: the
# lock first when a certbot directory is among them and certmgr has committed here before (above)
for n in "$first" "$@"; do
  if [ -d "$root/live/$n" ] && [ ! -L "$root/live/$n" ] && [ -e "$root/archive/.certmgr.lock" ]; then lock; fi
done
names=$#
for n in "$first" "$@"; do
  l=$root/live/$n
  set -- "$@" "$l" "$l/cert.pem" "$l/chain.pem" "$l/fullchain.pem" "$l/privkey.pem"
done
shift "$names"
readlinks link_ "$@"
i=0 chains='' nc=0
while [ "$#" -gt 0 ]; do
  i=$((i + 1))
  n=${1#"$root/live/"}
  eval "name_$i=\$n"
  inspect_one "$n" "$i"
  shift 5
done
say cert=
# The live fullchains: one `base64` each for up to 3 of them, else ONE tar of them all
# (members <name>/fullchain.pem, links followed) read by ONE base64 — a POP pays per certificate no process.
set --
for i in $chains; do
  eval "n=\$name_$i"
  set -- "$@" "$n/fullchain.pem"
  nc=$((nc + 1))
done
if [ "$nc" -gt 3 ]; then
  say "fullchains_tar_b64=$(tar -chf - -b 1 -C "$root/live" -- "$@" 2>/dev/null | base64 -w0)"
else
  for f in "$@"; do
    say "cert=${f%/fullchain.pem}"
    say "fullchain_b64=$(base64 -w0 < "$root/live/$f")"
  done
  say cert=
fi
[ -e "$root/archive/.certmgr.lock" ] || steady=
if [ -n "$test" ] && [ -n "$steady" ]; then
  say test_rc=0
  say preflight=skipped
elif [ -n "$test" ]; then
  out=$(runcmd "$test" 2>&1 </dev/null 9>&-); rc=$?
  say "test_rc=$rc"
  [ "$rc" -eq 0 ] || say "test_out=$(b64 "$out")"
else
  say test_rc=0
  say test_skipped=1
fi
