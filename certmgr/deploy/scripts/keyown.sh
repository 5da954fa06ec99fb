# shellcheck shell=sh
# Give file $1 to $keyown: owner[:group] or :group (privkey_owner/privkey_group); mode stays 0600.
# Shared with doctor, which tries it on a temp file.
keyown() {
  [ -n "$keyown" ] || return 0
  case $keyown in
    :*) chgrp -- "${keyown#:}" "$1" ;;
    *) chown -- "$keyown" "$1" ;;
  esac
}
