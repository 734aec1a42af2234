#!/usr/bin/env bash
# Writes the fleet broker's mosquitto.conf from the template next to this script (paths
# and ports filled in) and creates the empty acl and password files it names.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install-config.sh [options]

Writes CONF_DIR/mosquitto.conf from deploy/mosquitto/mosquitto.conf and creates, if
missing, CONF_DIR/acl and CONF_DIR/passwd (root:<USER's group>, 0640) and CONF_DIR/certs/.
Put ca.crt, broker.crt and broker.key in CONF_DIR/certs (make-test-ca.sh --out
CONF_DIR/certs does, for a lab), then add clients with add-client.sh.

Options:
  --conf-dir DIR       where the config, acl, passwd and certs/ live (default /etc/mosquitto)
  --data-dir DIR       persistence directory (default /var/lib/mosquitto)
  --log-file FILE      (default /var/log/mosquitto/mosquitto.log)
  --cert-port N        the client-certificate listener (default 8883)
  --password-port N    the username/password listener (default 8884)
  --bind ADDRESS       listen on this address only (default: every interface)
  --user NAME          the user Mosquitto drops root to (default mosquitto)
  --force              replace an existing mosquitto.conf (the old one is kept as
                       mosquitto.conf.orig)
  -h, --help           this help

Debian: install-config.sh --force replaces the package's /etc/mosquitto/mosquitto.conf;
then systemctl restart mosquitto.
EOF
}

die() { printf 'install-config.sh: %s\n' "$*" >&2; exit 2; }

conf_dir=/etc/mosquitto
data_dir=/var/lib/mosquitto
log_file=/var/log/mosquitto/mosquitto.log
cert_port=8883
password_port=8884
bind=""
run_user=mosquitto
force=false
while [ $# -gt 0 ]; do
  case "$1" in
    --conf-dir) [ $# -ge 2 ] || die "$1 needs a value"; conf_dir=$2; shift 2 ;;
    --data-dir) [ $# -ge 2 ] || die "$1 needs a value"; data_dir=$2; shift 2 ;;
    --log-file) [ $# -ge 2 ] || die "$1 needs a value"; log_file=$2; shift 2 ;;
    --cert-port) [ $# -ge 2 ] || die "$1 needs a value"; cert_port=$2; shift 2 ;;
    --password-port) [ $# -ge 2 ] || die "$1 needs a value"; password_port=$2; shift 2 ;;
    --bind) [ $# -ge 2 ] || die "$1 needs a value"; bind=$2; shift 2 ;;
    --user) [ $# -ge 2 ] || die "$1 needs a value"; run_user=$2; shift 2 ;;
    --force) force=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

template="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/mosquitto.conf"
[ -f "$template" ] || die "template $template is missing"

# Mosquitto resolves relative paths against its working directory: make them absolute.
conf_dir=$(realpath -m "$conf_dir")
data_dir=$(realpath -m "$data_dir")
log_file=$(realpath -m "$log_file")
for path in "$conf_dir" "$data_dir" "$log_file"; do
  [[ "$path" =~ ^[A-Za-z0-9_./-]+$ ]] || die "path '$path': use only A-Z a-z 0-9 _ . - /"
done
for port in "$cert_port" "$password_port"; do
  [[ "$port" =~ ^[0-9]{1,5}$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
    || die "port '$port' is not a port number"
done
[ "$cert_port" != "$password_port" ] || die "the two listeners need two ports"
[[ "$bind" =~ ^[A-Za-z0-9.:-]*$ ]] || die "--bind '$bind' is not an address"
[[ "$run_user" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user '$run_user' is not a user name"

conf="$conf_dir/mosquitto.conf"
if [ -e "$conf" ] && ! $force; then
  die "$conf exists; --force replaces it (keeping the old one as $conf.orig)"
fi

mkdir -p "$conf_dir/certs" "$data_dir" "$(dirname "$log_file")"
rendered=$(mktemp "$conf.XXXXXX")
trap 'rm -f "$rendered"' EXIT
sed -e "s|@CONF_DIR@|$conf_dir|g" \
    -e "s|@DATA_DIR@|$data_dir|g" \
    -e "s|@LOG_FILE@|$log_file|g" \
    -e "s|@CERT_PORT@|$cert_port|g" \
    -e "s|@PASSWORD_PORT@|$password_port|g" \
    -e "s|@BIND_ADDRESS@|$bind|g" \
    -e "s|@RUN_USER@|$run_user|g" \
    -e 's/[[:space:]]*$//' \
    "$template" >"$rendered"
if grep -v '^#' "$rendered" | grep -q '@[A-Z_]*@'; then
  die "the template has a placeholder this script does not know"
fi
chmod 0644 "$rendered"
if [ -e "$conf" ]; then cp -p "$conf" "$conf.orig"; fi
mv -f "$rendered" "$conf"
echo "wrote $conf"

# Mosquitto 2 reads the password and acl files and the TLS key after dropping root:
# its user's group must be able to read them.
group=""
if [ "$(id -u)" -eq 0 ] && [ "$run_user" != root ] && id "$run_user" >/dev/null 2>&1; then
  group=$(id -gn "$run_user")
fi
for file in "$conf_dir/acl" "$conf_dir/passwd"; do
  if [ ! -e "$file" ]; then
    : >"$file"
    chmod 0640 "$file"
    echo "created $file"
  fi
done
if [ -n "$group" ]; then
  chgrp "$group" "$conf_dir/acl" "$conf_dir/passwd"
  chown "$run_user" "$data_dir"
  if [ -e "$conf_dir/certs/broker.key" ]; then
    chgrp "$group" "$conf_dir/certs/broker.key"
    chmod 0640 "$conf_dir/certs/broker.key"
  fi
  if [ ! -e "$log_file" ]; then : >"$log_file"; fi
  chown "$run_user" "$log_file"
fi
for file in ca.crt broker.crt broker.key; do
  [ -e "$conf_dir/certs/$file" ] || echo "still needed: $conf_dir/certs/$file" >&2
done
