#!/usr/bin/env bash
# The main job on one machine, end to end, on a synthetic world (run by `make demo`):
#   1. two days of events into a real Kafka broker
#   2. the archive sink writes them as daily Parquet partitions
#   3. the nightly job compacts day one's archive files, then the full retrain trains on it and promotes
#      version 1
#   4. the streaming worker learns day two online (ID embeddings only) while the publisher
#      pushes the changes to the RocksDB KV store every second
#   5. what the KV store holds at the end
# Everything lands under data/demo/<run>/; the broker keeps running (stop it with `make kafka-stop`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PORT="${KAFKA_PORT:-9092}"
BOOT="127.0.0.1:$PORT"
RUN="data/demo/$(date -u +%Y%m%dT%H%M%SZ)"
PREFIX="demo-$(date +%s)."
DAYS="${DEMO_DAYS:-2}"
mkdir -p "$RUN"

step() { printf '\n== %s\n' "$*"; }

deploy/kafka/kafka.sh start --port "$PORT" --data-dir data/kafka

step "1/5 $DAYS synthetic days into Kafka (topics ${PREFIX}*)"
$PY -m streaming replay --bootstrap "$BOOT" --topic-prefix "$PREFIX" --source synthetic --days "$DAYS"

step "2/5 archive sink: Kafka -> daily Parquet partitions in $RUN/archive"
$PY -m streaming archive --bootstrap "$BOOT" --topic-prefix "$PREFIX" --archive "$RUN/archive" --exit-when-idle 3
ls "$RUN/archive"

step "3/5 nightly: compact the first day's archive files, full retrain on it -> model registry $RUN/models"
$PY -m streaming compact-archive --archive "$RUN/archive" --before 2024-01-02
$PY -m trainer full --archive "$RUN/archive" --models "$RUN/models" --day 2024-01-01

step "4/5 streaming worker (incremental SGD) + publisher (every 1 s) on the days after the model's cutoff"
$PY -m publisher run --source worker --worker-state "$RUN/worker" --models "$RUN/models" --store "$RUN/kv" \
  --interval 1 --metrics-port 0 > "$RUN/publisher.log" 2>&1 &
publisher=$!
trap 'kill -TERM $publisher 2>/dev/null || true' EXIT
$PY -m streaming worker --bootstrap "$BOOT" --topic-prefix "$PREFIX" --models "$RUN/models" \
  --state-dir "$RUN/worker" --group "demo-worker-$PREFIX" --metrics-port 0 --exit-when-idle 5
sleep 3  # one more publish after the worker's last checkpoint
kill -TERM "$publisher"
wait "$publisher" || true
trap - EXIT
grep -E "published version" "$RUN/publisher.log" | tail -n 3 || tail -n 5 "$RUN/publisher.log"

step "5/5 the KV store that serving reads"
$PY -m publisher inspect --store "$RUN/kv"
echo "(freshness_s is wall clock minus the published watermark: the synthetic events are dated January 2024;"
echo " on a live stream it is the publish interval plus a checkpoint interval, i.e. seconds)"
printf '\nDone. Artifacts: %s. The broker still runs on %s (make kafka-stop).\n' "$RUN" "$BOOT"
