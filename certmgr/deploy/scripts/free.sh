# shellcheck shell=sh
# Free space at the nearest existing directory of $1.
d=$1
while [ ! -d "$d" ] && [ "$d" != / ]; do d=${d%/*}; [ -n "$d" ] || d=/; done
printf 'dir=%s\n' "$d"
df -Pk -- "$d" 2>/dev/null | awk 'NR==2 { print "free_kb=" $4 }'
df -Pi -- "$d" 2>/dev/null | awk 'NR==2 { print "free_inodes=" $4 }'
