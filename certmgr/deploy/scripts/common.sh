# shellcheck shell=sh
# Shared by every deploy script. POSIX sh + coreutils + sha256sum only. All inputs arrive as
# positional parameters quoted by shlex; commands from the inventory arrive as one shlex.join'ed
# string run with `eval`, which re-parses exactly the quoted argv (that is what the quoting is for).
# Multi-line text (nginx's messages) is returned base64-encoded on one `key=value` line; a line
# `cert=<name>` opens the section of one certificate, `cert=` returns to the script's own keys.
set -u
nl='
'
# say KEY=VALUE: one line, always. A value read from the POP's file system (a link's target, a file name) may
# hold a newline, which would start a line of its own — a forged `cert=` or `version=`: it is cut there and
# marked (a literal `\n...`), so that no parser takes the rest, or the cut text, for a plain value.
say() {
  say_l=$*
  case $say_l in
    *"$nl"*) printf '%s\\n...\n' "${say_l%%"$nl"*}" ;;
    *) printf '%s\n' "$say_l" ;;
  esac
}
b64() { printf '%s' "$1" | base64 -w0; }
# lineage NAME: the paths of one certificate under $root
lineage() {
  name=$1
  # shellcheck disable=SC2034  # prune.sh (which includes this file) sets its own paths
  live=$root/live/$name
  # shellcheck disable=SC2034  # rollback.sh reads only $live
  arch=$root/archive/$name
}
# runcmd CMD: run an inventory command (one shlex.join'ed argv) in place of this (sub)shell, so that
# `$(runcmd "$test")` is one process, not a subshell and then the command. Anything else — a shell
# operator or quote-protected text that may hide one, a leading assignment, a shell builtin (exit,
# cd, …) — keeps the plain eval, exactly as before.
runcmd() {
  case $1 in
    *[\;\&\|\<\>\(\)\{\}\`\'\"\\]* | *"$nl"*) eval "$1"; return ;;
  esac
  case ${1%% *} in
    '' | *=* | !* | exit | return | cd | . | eval | set | shift | export | unset | trap | umask | read | wait | \
    command | type | local | ulimit | hash | getopts | alias | unalias | exec | : | readonly | times | break | \
    continue | printf | echo | test | [ | kill | pwd | true | false) eval "$1" ;;
    *) eval "exec $1" ;;
  esac
}
# readlinks PREFIX PATH...: the target of every PATH that is a symlink, in PREFIX1, PREFIX2, … (""
# where PATH is none). Two or more links are read by ONE readlink (plus the subshell around it); a
# line count that disagrees (a target with a newline in it, a link changed meanwhile) falls back to
# one readlink per link, as does a single link.
readlinks() {
  rl_p=$1
  shift
  rl_i=0 rl_n=0 rl_out='' rl_l='' rl_k=0
  for rl_f in "$@"; do
    rl_i=$((rl_i + 1))
    eval "$rl_p$rl_i="
    if [ -L "$rl_f" ]; then rl_n=$((rl_n + 1)); fi
  done
  [ "$rl_n" -gt 0 ] || return 0
  if [ "$rl_n" -gt 1 ]; then
    rl_out=$(readlink -- "$@" 2>/dev/null; echo .)
    rl_out=${rl_out%.}
    # shellcheck disable=SC2034  # rl_l is read by the eval
    while IFS= read -r rl_l; do
      rl_k=$((rl_k + 1))
      eval "rl_line$rl_k=\$rl_l"
    done <<RL
$rl_out
RL
    # the here-document adds one empty line after the last newline
    rl_k=$((rl_k - 1))
  fi
  rl_i=0
  rl_j=0
  for rl_f in "$@"; do
    rl_i=$((rl_i + 1))
    [ -L "$rl_f" ] || continue
    rl_j=$((rl_j + 1))
    if [ "$rl_k" -eq "$rl_n" ]; then
      eval "$rl_p$rl_i=\$rl_line$rl_j"
    else
      eval "$rl_p$rl_i=\$(readlink -- \"\$rl_f\" 2>/dev/null)"
    fi
  done
}
