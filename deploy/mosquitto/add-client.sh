#!/usr/bin/env bash
# Gives one client of an edge-agent fleet its rights on the broker: a block in Mosquitto's
# acl file for its role, and for clients that log in with a password, a password-file
# entry (made by mosquitto_passwd). Running it again for the same name replaces both.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: add-client.sh [options] ROLE NAME
       add-client.sh [options] --remove NAME

ROLE is one of (docs/broker.md has the table):
  device         an edge-agent board; NAME = its device_id (and its certificate CN)
  sensor         publishes jobs and cancels, reads its replies under PREFIX/replies/NAME/
  ops            dashboards, `edge-agent fleet`, rollouts: device status, telemetry, info
                 and results, operations' states, $SYS, commands, jobs, its own replies
  operator       what ops may, and operates devices (`edge-agent ops`, docs/operations.md):
                 requests under PREFIX/devices/+/operate/NAME, every operation's state and
                 logs
  homeassistant  Home Assistant: discovery, device status and telemetry, its birth message
NAME: 1-64 of A-Z a-z 0-9 _ . - (the client's MQTT username: its certificate CN or the
name it logs in with).

Options:
  --acl FILE             the acl file (default /etc/mosquitto/acl); created if missing
  --password-file FILE   also give NAME a password in this Mosquitto password file (for the
                         username/password listener); a new random password is printed
                         on stdout, unless --password-stdin
  --password-stdin       read the password from the first line of stdin
  --prefix P             the agents' mqtt.topic_prefix (default edge)
  --ha-prefix P          the agents' telemetry.discovery_prefix (default homeassistant)
  --remove NAME          remove NAME's acl block (and its password, with --password-file)
  --print                print the acl block for ROLE NAME and change nothing
  -h, --help             this help

Mosquitto reads both files at start and on SIGHUP: after a change run
  systemctl reload mosquitto        (or: kill -HUP <pid of mosquitto>)
EOF
}

die() { printf 'add-client.sh: %s\n' "$*" >&2; exit 2; }

acl=/etc/mosquitto/acl
pwfile=""
password_stdin=false
prefix=edge
ha_prefix=homeassistant
remove=""
print_only=false
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --acl) [ $# -ge 2 ] || die "$1 needs a value"; acl=$2; shift 2 ;;
    --password-file) [ $# -ge 2 ] || die "$1 needs a value"; pwfile=$2; shift 2 ;;
    --password-stdin) password_stdin=true; shift ;;
    --prefix) [ $# -ge 2 ] || die "$1 needs a value"; prefix=$2; shift 2 ;;
    --ha-prefix) [ $# -ge 2 ] || die "$1 needs a value"; ha_prefix=$2; shift 2 ;;
    --remove) [ $# -ge 2 ] || die "$1 needs a value"; remove=$2; shift 2 ;;
    --print) print_only=true; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) args+=("$1"); shift ;;
  esac
done

# Names and prefixes become topic levels: the same rule as the agent's device_id and
# topic_prefix settings, so no '+', '#' or '/' can widen a rule.
segment='^[A-Za-z0-9_.-]{1,64}$'
[[ "$prefix" =~ $segment ]] || die "--prefix '$prefix': use 1-64 of A-Z a-z 0-9 _ . -"
[[ "$ha_prefix" =~ $segment ]] || die "--ha-prefix '$ha_prefix': use 1-64 of A-Z a-z 0-9 _ . -"

if [ -n "$remove" ]; then
  [ ${#args[@]} -eq 0 ] || die "--remove takes only a NAME"
  name=$remove
  role=""
else
  [ ${#args[@]} -eq 2 ] || { usage >&2; exit 2; }
  role=${args[0]}
  name=${args[1]}
fi
[[ "$name" =~ $segment ]] || die "name '$name': use 1-64 of A-Z a-z 0-9 _ . -"

# The acl block of one client. Mosquitto's `pattern` lines (with %u) apply to every user,
# so a device rule written as a pattern would also let a sensor publish a "device status"
# under its own name: each client gets literal rules for its one role instead.
block() {
  local r=$1 n=$2 p=$prefix h=$ha_prefix
  printf '# >>> client %s, role %s (add-client.sh)\n' "$n" "$r"
  printf 'user %s\n' "$n"
  case "$r" in
    device)
      # Home Assistant node id as edge-agent builds it (telemetry.ha_discovery): every
      # character but letters, digits, '_' and '-' becomes '_'.
      local node="edge_agent_${n//[^A-Za-z0-9_-]/_}"
      cat <<EOF
# its own subtree: writes status, telemetry, info, results, operations' states; reads
# jobs, cancel, cmd, operation requests
topic readwrite $p/devices/$n/#
# fleet jobs and cancels, also through \$share/<group>/$p/jobs/<kind>
topic read $p/jobs/#
# hands a fleet job back to the fleet when busy (jobs.handoff)
topic write $p/jobs/classify
topic write $p/jobs/extract
topic read $p/cmd/#
# replies; the agent itself only answers under mqtt.reply_topic_prefixes
topic write $p/replies/#
# Home Assistant discovery for this device only, and Home Assistant's birth message
topic write $h/+/$node/+/config
topic read $h/status
EOF
      ;;
    sensor)
      cat <<EOF
# jobs and cancels, for the fleet or for one device
topic write $p/jobs/+
topic write $p/devices/+/jobs/+
topic write $p/devices/+/cancel
# its replies: ask for them under $p/replies/$n/
topic read $p/replies/$n/#
EOF
      ;;
    ops|operator)
      cat <<EOF
# what every device publishes, except discovery
topic read $p/devices/+/status
topic read $p/devices/+/telemetry
topic read $p/devices/+/info
topic read $p/devices/+/results
topic read \$SYS/#
# commands (rebirth), jobs and cancels
topic write $p/cmd/#
topic write $p/devices/+/cmd/#
topic write $p/jobs/+
topic write $p/devices/+/jobs/+
topic write $p/devices/+/cancel
topic read $p/replies/$n/#
EOF
      if [ "$r" = ops ]; then
        cat <<EOF
# operations' states (not their logs); it may not operate
topic read $p/devices/+/operations/+
EOF
      else
        cat <<EOF
# operations: requests to any device under its own name, every state and log chunk
topic write $p/devices/+/operate/$n
topic read $p/devices/+/operations/#
EOF
      fi
      ;;
    homeassistant)
      cat <<EOF
topic read $h/#
topic write $h/status
topic read $p/devices/+/status
topic read $p/devices/+/telemetry
EOF
      ;;
    *) die "unknown role '$r' (device, sensor, ops, operator or homeassistant)" ;;
  esac
  printf '# <<< client %s\n' "$n"
}

ACL_HEADER='# Mosquitto acl_file for an edge-agent fleet (docs/broker.md).
# One block per client, written and removed by deploy/mosquitto/add-client.sh. A client
# without a block can connect but can neither publish nor receive anything.
# There are no pattern lines on purpose: Mosquitto applies them to every user.
'

if $print_only; then
  [ -z "$remove" ] || die "--print and --remove do not go together"
  block "$role" "$name"
  exit 0
fi
[ -n "$remove" ] || block "$role" "$name" >/dev/null  # check the role before changing files

# Replace $1 by the content of $2, keeping $1's owner and mode (Mosquitto's user must go
# on being able to read it).
replace_file() {
  local target=$1 new=$2
  if [ -e "$target" ]; then
    chmod --reference="$target" "$new"
    if [ "$(id -u)" -eq 0 ]; then chown --reference="$target" "$new"; fi
  else
    chmod 0640 "$new"
  fi
  mv -f "$new" "$target"
}

# The acl file without NAME's block.
without_block() {
  awk -v start="# >>> client $1," -v stop="# <<< client $1" '
    index($0, start) == 1 { skip = 1 }
    !skip { print }
    skip && $0 == stop { skip = 0 }
  ' "$acl"
}

mkdir -p "$(dirname "$acl")"
[ -e "$acl" ] || (umask 027 && : >"$acl")
new_acl=$(mktemp "$acl.XXXXXX")
trap 'rm -f "$new_acl" "${new_pw:-}" "${plain:-}"' EXIT
if [ -s "$acl" ]; then without_block "$name" >"$new_acl"; else printf '%s' "$ACL_HEADER" >"$new_acl"; fi
if awk -v line="user $name" '$0 == line { found = 1 } END { exit !found }' "$new_acl"; then
  die "$acl has a 'user $name' line that add-client.sh did not write: edit that by hand"
fi
if [ -z "$remove" ]; then
  # one blank line between blocks
  if [ -s "$new_acl" ] && [ -n "$(tail -n 1 "$new_acl")" ]; then echo >>"$new_acl"; fi
  block "$role" "$name" >>"$new_acl"
fi
replace_file "$acl" "$new_acl"

if [ -n "$pwfile" ]; then
  command -v mosquitto_passwd >/dev/null \
    || die "mosquitto_passwd is not installed (Debian: apt-get install mosquitto)"
  mkdir -p "$(dirname "$pwfile")"
  [ -e "$pwfile" ] || (umask 027 && : >"$pwfile")
  new_pw=$(mktemp "$pwfile.XXXXXX")
  awk -F: -v n="$name" '$1 != n' "$pwfile" >"$new_pw"
  if [ -z "$remove" ]; then
    if $password_stdin; then
      IFS= read -r password || true
      [ -n "$password" ] || die "no password on stdin"
    else
      password=$(openssl rand -base64 24)
      printf '%s\n' "$password"
    fi
    case "$password" in *:*) die "the password must not contain ':'" ;; esac
    # Hash it without putting it on a command line: a plain-text file, converted in place.
    plain=$(mktemp)
    printf '%s:%s\n' "$name" "$password" >"$plain"
    mosquitto_passwd -U "$plain"
    cat "$plain" >>"$new_pw"
  fi
  replace_file "$pwfile" "$new_pw"
fi

if [ -n "$remove" ]; then
  echo "removed $name; now reload Mosquitto (systemctl reload mosquitto)" >&2
else
  echo "added $name as $role; now reload Mosquitto (systemctl reload mosquitto)" >&2
fi
