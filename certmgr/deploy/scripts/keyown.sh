# shellcheck shell=sh
# Give file(s) $1… to $keyown: owner[:group] or :group (privkey_owner/privkey_group); mode stays
# 0600. One process for every file given. Shared with doctor, which tries it on a temp file.
keyown() {
  [ -n "$keyown" ] || return 0
  case $keyown in
    :*) chgrp -- "${keyown#:}" "$@" ;;
    *) chown -- "$keyown" "$@" ;;
  esac
}
