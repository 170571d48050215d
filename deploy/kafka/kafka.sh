#!/usr/bin/env bash
# Run a real single-node Apache Kafka (KRaft, broker+controller) on 127.0.0.1 without Docker.
#
#   deploy/kafka/kafka.sh fetch                         resolve the broker jars from Maven Central (once, cached)
#   deploy/kafka/kafka.sh start [--port P] [--controller-port C] [--data-dir D] [--heap 512m]
#                                                       format storage if new, start, wait until it answers
#   deploy/kafka/kafka.sh stop  [--data-dir D]          stop cleanly (SIGTERM, then SIGKILL after 30 s)
#   deploy/kafka/kafka.sh status [--data-dir D]         exit 0 when the broker of D is running
#
# Defaults: port 9092, controller port = port + 1, data dir ./data/kafka-<port>.
# The broker's pid is in <data-dir>/broker.pid and its log in <data-dir>/server.log.
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
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --controller-port) cport="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --heap) heap="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    *) echo "kafka.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
[ -n "$cport" ] || cport=$((port + 1))
[ -n "$data_dir" ] || data_dir="$PWD/data/kafka-$port"
mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"
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
  sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$cport#g" -e "s#@LOG_DIR@#$data_dir/log#g" \
    "$here/server.properties" > "$data_dir/server.properties"
  local cp="$libs/*"
  local jvm=(-Xms"$heap" -Xmx"$heap" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    -Dkafka.logs.dir="$data_dir" -Dlog4j2.configurationFile="$here/log4j2.properties")
  if [ ! -f "$data_dir/log/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$data_dir/server.properties" --standalone -g >"$data_dir/format.log" 2>&1 \
      || { echo "kafka.sh: formatting storage failed:" >&2; cat "$data_dir/format.log" >&2; exit 1; }
  fi
  : > "$data_dir/server.log"
  setsid nohup java -cp "$cp" "${jvm[@]}" kafka.Kafka "$data_dir/server.properties" \
    >"$data_dir/stdout.log" 2>&1 < /dev/null &
  echo $! > "$pid_file"
  local deadline=$((SECONDS + timeout_s))
  until grep -q "Kafka Server started" "$data_dir/server.log" 2>/dev/null && port_open "$port"; do
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
  start) start ;;
  stop) stop ;;
  status) running ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ] || exit 2 ;;
esac
