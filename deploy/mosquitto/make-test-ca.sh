#!/usr/bin/env bash
# A test certificate authority for an edge-agent fleet broker: the CA, the broker's
# certificate and one client certificate per name (CN = the name = its MQTT username).
# For labs and tests; a production fleet uses its own PKI the same way (docs/broker.md).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: make-test-ca.sh --out DIR [options] [CLIENT_NAME...]

Creates, in DIR (nothing that exists is overwritten, so it can be run again to add clients):
  ca.crt, ca.key              the test CA (EC P-256)
  broker.crt, broker.key      the broker's certificate, SAN DNS:localhost, IP:127.0.0.1
                              and every --broker-name
  clients/NAME.crt, .key      one client certificate per NAME, CN=NAME (TLS client auth)
Keys are written with mode 0600.

A client NAME becomes the client's MQTT username (Mosquitto's use_identity_as_username),
so it must be 1-64 of A-Z a-z 0-9 _ . - (for a device: its edge-agent device_id).

Options:
  -o, --out DIR          output directory (created if missing)
  -b, --broker-name N    another name of the broker: a DNS name or an IPv4/IPv6 address;
                         repeat for several (e.g. -b broker.lan -b 10.0.0.5)
  -d, --days N           validity of new certificates in days (default 825)
      --ca-name TEXT     common name of a new CA (default "edge-agent test CA")
  -h, --help             this help

Example:
  make-test-ca.sh --out /etc/mosquitto/certs -b broker.lan pi-01 pi-02 sensor-boiler
EOF
}

die() { printf 'make-test-ca.sh: %s\n' "$*" >&2; exit 2; }

out=""
days=825
ca_name="edge-agent test CA"
broker_names=()
clients=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--out) [ $# -ge 2 ] || die "$1 needs a value"; out=$2; shift 2 ;;
    -b|--broker-name) [ $# -ge 2 ] || die "$1 needs a value"; broker_names+=("$2"); shift 2 ;;
    -d|--days) [ $# -ge 2 ] || die "$1 needs a value"; days=$2; shift 2 ;;
    --ca-name) [ $# -ge 2 ] || die "$1 needs a value"; ca_name=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; clients+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) clients+=("$1"); shift ;;
  esac
done
[ -n "$out" ] || { usage >&2; exit 2; }
[[ "$days" =~ ^[1-9][0-9]{0,4}$ ]] || die "--days must be a positive number"
command -v openssl >/dev/null || die "openssl is not installed (Debian: apt-get install openssl)"
for name in "${clients[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] \
    || die "client name '$name': use 1-64 of A-Z a-z 0-9 _ . - (it becomes an MQTT username)"
done
for name in "${broker_names[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9.:-]{1,253}$ ]] || die "broker name '$name' is not a host name or address"
done

mkdir -p "$out"  # certificates are public: the broker's user must reach broker.crt
umask 077        # keys are private from the moment they exist
mkdir -p "$out/clients"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# Sign a CSR for $2 (subject CN) with the CA, using the extensions in $3, into $1.
sign() {
  local cert=$1 cn=$2 ext=$3 key=$4
  openssl req -new -key "$key" -subj "/CN=$cn" -out "$work/req.csr"
  openssl x509 -req -in "$work/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "$(serial)" -days "$days" -sha256 -extfile "$ext" -out "$cert" 2>/dev/null
  chmod 0644 "$cert"
}

if [ ! -f "$out/ca.key" ]; then
  new_key "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -subj "/CN=$ca_name" -days "$days" -sha256 \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"
  chmod 0644 "$out/ca.crt"
  echo "created CA $out/ca.crt"
elif [ ! -f "$out/ca.crt" ]; then
  die "$out/ca.key exists but $out/ca.crt does not"
fi

if [ ! -f "$out/broker.crt" ]; then
  san="DNS:localhost,IP:127.0.0.1"
  for name in "${broker_names[@]}"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
  done
  cat >"$work/broker.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
  new_key "$out/broker.key"
  sign "$out/broker.crt" "${broker_names[0]:-localhost}" "$work/broker.ext" "$out/broker.key"
  echo "created broker certificate $out/broker.crt ($san)"
elif [ ${#broker_names[@]} -gt 0 ]; then
  echo "kept the existing $out/broker.crt (delete it to issue one with new names)" >&2
fi

cat >"$work/client.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EOF
for name in "${clients[@]}"; do
  if [ -f "$out/clients/$name.crt" ]; then
    echo "kept the existing $out/clients/$name.crt" >&2
    continue
  fi
  new_key "$out/clients/$name.key"
  sign "$out/clients/$name.crt" "$name" "$work/client.ext" "$out/clients/$name.key"
  echo "created client certificate $out/clients/$name.crt (CN=$name)"
done
