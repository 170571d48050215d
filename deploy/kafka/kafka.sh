#!/usr/bin/env bash
# Run a real single-node Apache Kafka (KRaft, broker+controller) on 127.0.0.1 without Docker.
#
#   deploy/kafka/kafka.sh fetch                         resolve the broker jars from Maven Central (once, cached)
#   deploy/kafka/kafka.sh certs --dir D [--days N]      make a test CA, a broker certificate (SAN IP:127.0.0.1,
#                                                       DNS:localhost) and a client certificate in D (once)
#   deploy/kafka/kafka.sh start [--port P] [--controller-port C] [--data-dir D] [--heap 512m]
#                               [--sasl-ssl-port S --tls-dir D [--scram-users u:pw,..] [--plain-users u:pw,..]]
#                                                       format storage if new, start, wait until it answers
#   deploy/kafka/kafka.sh stop  [--data-dir D]          stop cleanly (SIGTERM, then SIGKILL after 30 s)
#   deploy/kafka/kafka.sh status [--data-dir D]         exit 0 when the broker of D is running
#
# Defaults: port 9092, controller port = port + 1, data dir ./data/kafka-<port>.
# The broker's pid is in <data-dir>/broker.pid and its log in <data-dir>/server.log.
# With --sasl-ssl-port the broker also listens on SASL_SSL://127.0.0.1:S (PLAIN, SCRAM-SHA-256 and
# SCRAM-SHA-512; clients must present a certificate signed by <tls-dir>/ca.pem), <tls-dir> being one
# made by `certs`. PLAIN users are read at every start; SCRAM users (both mechanisms) are written only
# when the storage is first formatted. Names and passwords must not hold , : " \ [ ] = or spaces.
# <data-dir>/server.properties holds the passwords and is created with mode 600.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
libs="$here/libs"
cmd="${1:-}"
[ $# -gt 0 ] && shift

port=9092
cport=""
data_dir=""
heap="512m"
timeout_s=120
sasl_ssl_port=""
tls_dir=""
scram_users=""
plain_users=""
certs_dir=""
days=365
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --controller-port) cport="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --heap) heap="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --sasl-ssl-port) sasl_ssl_port="$2"; shift 2 ;;
    --tls-dir) tls_dir="$2"; shift 2 ;;
    --scram-users) scram_users="$2"; shift 2 ;;
    --plain-users) plain_users="$2"; shift 2 ;;
    --dir) certs_dir="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    *) echo "kafka.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
[ -n "$cport" ] || cport=$((port + 1))
[ -n "$data_dir" ] || data_dir="$PWD/data/kafka-$port"
if [ "$cmd" != certs ]; then
  mkdir -p "$data_dir"
  data_dir="$(cd "$data_dir" && pwd)"
fi
pid_file="$data_dir/broker.pid"

fetch() {
  if [ -f "$here/.fetched" ] && [ "$(cat "$here/.fetched")" = "$(sha256sum "$here/pom.xml" | cut -d' ' -f1)" ]; then
    return 0
  fi
  command -v mvn >/dev/null || { echo "kafka.sh: Maven (mvn) is required to fetch the broker jars" >&2; exit 1; }
  echo "kafka.sh: resolving the Kafka broker jars from Maven Central into $libs ..." >&2
  rm -rf "$libs"
  mvn -B -q -f "$here/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs" >&2
  sha256sum "$here/pom.xml" | cut -d' ' -f1 > "$here/.fetched"
}

check_java() {
  command -v java >/dev/null || { echo "kafka.sh: Java 17+ is required (java not found)" >&2; exit 1; }
  local v
  v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
  if [ -z "$v" ] || [ "$v" -lt 17 ]; then
    echo "kafka.sh: Java 17+ is required, found '$(java -version 2>&1 | head -1)'" >&2
    exit 1
  fi
}

# A test CA, a broker certificate and a client certificate (for mutual TLS), all PEM with unencrypted
# PKCS#8 keys: the broker reads broker-keystore.pem (key + chain) with ssl.keystore.type=PEM, and
# Python clients take ca.pem, client.pem and client.key. Files that exist are kept.
certs() {
  [ -n "$certs_dir" ] || { echo "kafka.sh: certs needs --dir D" >&2; exit 2; }
  command -v openssl >/dev/null || { echo "kafka.sh: openssl is required to make certificates" >&2; exit 1; }
  mkdir -p "$certs_dir"
  local d
  d="$(cd "$certs_dir" && pwd)"
  (
    umask 077
    cd "$d"
    if [ ! -f ca.pem ] || [ ! -f ca.key ]; then
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$days" \
        -subj "/CN=freshtower test CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
      # Certificates signed by an earlier CA would no longer verify.
      rm -f broker.pem broker.key broker-keystore.pem client.pem client.key
    fi
    # issue NAME CN EXTENDED-KEY-USAGE [SAN]: a key and a certificate signed by the CA.
    issue() {
      [ -f "$1.pem" ] && [ -f "$1.key" ] && return 0
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
      printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=$3" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" > "$1.ext"
      [ -z "${4:-}" ] || echo "subjectAltName=$4" >> "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" \
        -days "$days" -sha256 -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext" ca.srl
    }
    issue broker localhost serverAuth "IP:127.0.0.1,DNS:localhost"
    issue client freshtower-client clientAuth
    [ -f broker-keystore.pem ] || cat broker.key broker.pem ca.pem > broker-keystore.pem
    # The certificates are public; the keys stay 600.
    chmod 644 ca.pem broker.pem client.pem
  )
  echo "kafka.sh: certificates in $d" >&2
}

# Splits "name:pw,name:pw" into the array named $1 (read -a: no glob expansion of the passwords).
split_users() {
  read -r -a "$1" <<< "${2//,/ }"
}

# Exits unless $2 is a comma-separated list of name:password pairs that the configs below can quote.
check_users() {
  local pair pairs re='^[A-Za-z0-9._@-]+:[^],:"\=[:space:][]+$'
  split_users pairs "$2"
  for pair in ${pairs[@]+"${pairs[@]}"}; do
    if ! [[ "$pair" =~ $re ]]; then
      echo "kafka.sh: $1 wants name:password[,name:password...] without , : \" \\ [ ] = or spaces; got '$pair'" >&2
      exit 2
    fi
  done
}

# The SASL_SSL listener's settings, appended to the rendered server.properties.
sasl_ssl_config() {
  local jaas_plain="org.apache.kafka.common.security.plain.PlainLoginModule required" pair pairs
  split_users pairs "$plain_users"
  for pair in ${pairs[@]+"${pairs[@]}"}; do
    jaas_plain+=" user_${pair%%:*}=\"${pair#*:}\""
  done
  cat <<EOF

# SASL_SSL listener (kafka.sh start --sasl-ssl-port): TLS with client certificates, then SASL.
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
# ssl.client.auth only counts on a SASL_SSL listener when it carries the listener prefix (KIP-684).
listener.name.sasl_ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$tls_dir/broker-keystore.pem
listener.name.sasl_ssl.ssl.truststore.type=PEM
listener.name.sasl_ssl.ssl.truststore.location=$tls_dir/ca.pem
listener.name.sasl_ssl.plain.sasl.jaas.config=$jaas_plain;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

running() {
  [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
  fetch
  check_java
  if running; then
    echo "kafka.sh: broker already running (pid $(cat "$pid_file")) on 127.0.0.1:$port" >&2
    return 0
  fi
  local render=(-e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$cport#g" -e "s#@LOG_DIR@#$data_dir/log#g")
  local scram_args=()
  if [ -n "$sasl_ssl_port" ]; then
    [ -n "$tls_dir" ] && [ -f "$tls_dir/broker-keystore.pem" ] && [ -f "$tls_dir/ca.pem" ] \
      || { echo "kafka.sh: --sasl-ssl-port needs --tls-dir D made by 'kafka.sh certs --dir D'" >&2; exit 2; }
    tls_dir="$(cd "$tls_dir" && pwd)"
    check_users --plain-users "$plain_users"
    check_users --scram-users "$scram_users"
    local sasl="SASL_SSL://127.0.0.1:$sasl_ssl_port" pair pairs mech
    render+=(-e "s#^listeners=.*#&,$sasl#" -e "s#^advertised.listeners=.*#&,$sasl#"
      -e "s#^listener.security.protocol.map=.*#&,SASL_SSL:SASL_SSL#")
    split_users pairs "$scram_users"
    for pair in ${pairs[@]+"${pairs[@]}"}; do
      for mech in SCRAM-SHA-256 SCRAM-SHA-512; do
        scram_args+=(--add-scram "$mech=[name=${pair%%:*},password=${pair#*:}]")
      done
    done
  fi
  # umask 077: with SASL the file holds the PLAIN passwords.
  rm -f "$data_dir/server.properties"
  (
    umask 077
    sed "${render[@]}" "$here/server.properties" > "$data_dir/server.properties"
    [ -z "$sasl_ssl_port" ] || sasl_ssl_config >> "$data_dir/server.properties"
  )
  local cp="$libs/*"
  local jvm=(-Xms"$heap" -Xmx"$heap" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    -Dkafka.logs.dir="$data_dir" -Dlog4j2.configurationFile="$here/log4j2.properties")
  if [ ! -f "$data_dir/log/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$data_dir/server.properties" --standalone -g ${scram_args[@]+"${scram_args[@]}"} \
      >"$data_dir/format.log" 2>&1 \
      || { echo "kafka.sh: formatting storage failed:" >&2; cat "$data_dir/format.log" >&2; exit 1; }
  fi
  : > "$data_dir/server.log"
  setsid nohup java -cp "$cp" "${jvm[@]}" kafka.Kafka "$data_dir/server.properties" \
    >"$data_dir/stdout.log" 2>&1 < /dev/null &
  echo $! > "$pid_file"
  local deadline=$((SECONDS + timeout_s))
  until grep -q "Kafka Server started" "$data_dir/server.log" 2>/dev/null && port_open "$port" \
    && { [ -z "$sasl_ssl_port" ] || port_open "$sasl_ssl_port"; }; do
    if ! running; then
      echo "kafka.sh: broker exited during start-up; last log lines:" >&2
      tail -n 30 "$data_dir/server.log" "$data_dir/stdout.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "kafka.sh: broker did not answer within ${timeout_s}s; last log lines:" >&2
      tail -n 30 "$data_dir/server.log" >&2
      stop
      exit 1
    fi
    sleep 0.2
  done
  echo "kafka.sh: broker up on 127.0.0.1:$port (pid $(cat "$pid_file"), data $data_dir)" >&2
}

stop() {
  if ! running; then
    rm -f "$pid_file"
    return 0
  fi
  local pid
  pid="$(cat "$pid_file")"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "kafka.sh: broker $pid ignored SIGTERM for 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.2
  done
  rm -f "$pid_file"
  echo "kafka.sh: broker stopped" >&2
}

case "$cmd" in
  fetch) fetch ;;
  certs) certs ;;
  start) start ;;
  stop) stop ;;
  status) running ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ] || exit 2 ;;
esac
