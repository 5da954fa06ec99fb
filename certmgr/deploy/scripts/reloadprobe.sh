# shellcheck shell=sh
# RELOADPROBE: may the deploy user run the default reload, or only the old one? Runs nothing as
# root: `sudo -n -l ARGV` answers by its exit status (0: allowed without a password, 1: not), which
# no locale changes. $1 the pid file the default reload signals ("": it names none); $2 the
# `sudo -n -l` argv for the default reload, $3 the one for the fallback ("": not asked), each one
# shlex.join'ed string: `eval` re-parses exactly the quoted argv (as common.sh's runcmd does).
set -u
pidfile=$1 default=$2 fallback=$3
if [ -z "$pidfile" ] || [ -s "$pidfile" ]; then echo pidfile=1; else echo pidfile=0; fi
(eval "$default") >/dev/null 2>&1 </dev/null
echo "default_rc=$?"
if [ -n "$fallback" ]; then
  (eval "$fallback") >/dev/null 2>&1 </dev/null
  echo "fallback_rc=$?"
fi
