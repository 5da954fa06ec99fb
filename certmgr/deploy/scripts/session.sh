# shellcheck shell=sh
# SESSION: the scripts of one host's transaction run one after another in ONE SSH channel (inspect,
# then commit — no second channel, no second exec request, no second login shell), each in its own
# subshell exactly as `sh -c SCRIPT certmgr ARGS…` would run it.
# $1 a random marker; $2… the scripts' texts. On stdin, per step: a line "INDEX STDIN LENGTH" (INDEX
# 1-based into the texts; STDIN 1: the step reads what follows on stdin — commit's upload and its
# `go` —, 0: it reads /dev/null), then its arguments, shell-quoted by the controller (shlex.join:
# `eval "set -- …"` re-parses exactly that argv, as the remote shell parses a command): with LENGTH
# "-" one line, with "=N" N lines (a few: commit's SHA-256 lines of a certificate or two), each ended
# by a newline, read by the shell's own `read` and joined by newlines — no process —, with a plain
# number N that many bytes, read by `head -c` (a long text: the shell's joining grows with its square).
# After each step: a line "<marker>=<exit status>" on stdout and "<marker>" on stderr, each after a
# newline of its own. Anything else on stdin ends the session (exit 2); so does its end.
mark=$1
shift
while IFS= read -r step; do
  i=${step%% *} rest=${step#* }
  in=${rest%% *} len=${rest#* }
  [ "$step" = "$i $in $len" ] || exit 2
  case $i in '' | *[!0-9]*) exit 2 ;; esac
  nlines=
  case $len in
    -) nlines=1 ;;
    =[1-9] | =[1-9][0-9]) nlines=${len#=} ;;
    '' | *[!0-9]*) exit 2 ;;
  esac
  case $in in 0 | 1) ;; *) exit 2 ;; esac
  [ "$i" -ge 1 ] && [ "$i" -le $# ] || exit 2
  if [ -n "$nlines" ]; then
    IFS= read -r words || exit 2
    while [ "$nlines" -gt 1 ]; do
      IFS= read -r more || exit 2
      words="$words
$more"
      nlines=$((nlines - 1))
    done
  else
    words=$(head -c "$len") || exit 2
  fi
  script=
  eval "script=\${$i}"
  if [ "$in" = 1 ]; then
    (eval "set -- $words" && eval "$script")
  else
    (eval "set -- $words" && eval "$script") </dev/null
  fi
  rc=$?
  printf '\n%s=%s\n' "$mark" "$rc"
  printf '\n%s\n' "$mark" >&2
done
