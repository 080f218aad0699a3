#!/usr/bin/env bash
# The sidecar-pair benchmark: the Isthmus pair beside the closest L7 peer and beside no proxy,
# driven with the same load in one run, so the ratios hold on a noisy machine.
#
#   direct    client -> nginx backend
#   haproxy   client -> haproxy A --(HTTP/2 over mTLS 1.3, one pooled connection)--> haproxy B -> backend
#   isthmus   client -> sidecar A --(HTTP/2 over mTLS 1.3, SPIFFE IDs checked)--> sidecar B -> backend
#
# Every proxy runs one worker thread. Per setup and run: HTTP/1.1 throughput (wrk, keep-alive),
# HTTP/2 throughput (h2load, h2c, many streams per connection), latency at a fixed request rate
# (h2load --rps, percentiles from its per-request log), CPU time per request of the proxies
# (from /proc/<pid>/stat over the throughput runs) and each proxy's peak RSS (VmHWM).
#
# Usage (as any user; tools from Debian: apt-get install wrk nghttp2-client nginx-light haproxy):
#   cargo build --release && bench/run.sh
# Env: SETUPS="direct haproxy isthmus" RUNS=1 DURATION=10 CONNS=64 H2_CONNS=64 H2_STREAMS=10
#      RATE=1000 RATE_CONNS=10 ISTHMUS_BIN=target/release/isthmus KEEP=<dir for raw outputs>
#      HOLD=1 (start the setups, print their addresses, wait for Ctrl-C: for profiling)
# Addresses: 127.0.210.0/24 only, so nothing collides with the demo or the tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUPS="${SETUPS:-direct haproxy isthmus}"
RUNS="${RUNS:-1}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
H2_CONNS="${H2_CONNS:-64}"
H2_STREAMS="${H2_STREAMS:-10}"
RATE="${RATE:-1000}"
RATE_CONNS="${RATE_CONNS:-10}"
ISTHMUS_BIN="$(realpath -m "${ISTHMUS_BIN:-$ROOT/target/release/isthmus}")"
HOST=backend.bench.svc.cluster.local
NET=127.0.210
WORK="$(mktemp -d /tmp/isthmus-bench.XXXXXX)"
RAW="${KEEP:-$WORK/raw}"
mkdir -p "$RAW"
PIDS=()

say() { echo "[bench] $*" >&2; }
die() { say "error: $*"; exit 1; }
for tool in wrk h2load nginx haproxy openssl curl awk sort; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install wrk nghttp2-client nginx-light haproxy)"
done
[ -x "$ISTHMUS_BIN" ] || [[ " $SETUPS " != *" isthmus "* ]] || die "no isthmus binary at $ISTHMUS_BIN (cargo build --release)"

stop() { # TERM, then KILL after 5 s
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: a foreground server in the background, its output in $RAW/NAME.log
start() {
  local name=$1; shift
  "$@" >"$RAW/$name.log" 2>&1 &
  LAST=$!
  PIDS+=("$LAST")
}
alive() { # PID NAME: dies, showing the end of NAME's log, unless PID still runs
  kill -0 "$1" 2>/dev/null && return 0
  die "$2 exited: $(tail -n 3 "$RAW/$2.log" 2>/dev/null)"
}
wait_for() { # URL [curl args...]
  local url=$1; shift
  for _ in $(seq 200); do
    curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$url did not answer (logs: KEEP=<dir> keeps them)"
}

# ---------------------------------------------------------------- the backend, shared by all
BACKEND=$NET.1:18080 BACKEND_H2C=$NET.1:18081   # HTTP/1.1; h2c (prior knowledge) for direct
start_backend() {
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  keepalive_requests 1000000;
  server {
    listen $BACKEND;
    listen $BACKEND_H2C http2;
    location / { return 200 "hello from the backend\n"; }
  }
}
EOF
  start backend nginx -c "$WORK/nginx/nginx.conf" -e stderr
  wait_for "http://$BACKEND/"
  alive "$LAST" backend
}

# Each setup_<name> sets URL and URL_H2 (where the clients send), PROXIES (pids measured) and
# starts what it needs; teardown_<name> stops it.
setup_direct() { URL="http://$BACKEND/" URL_H2="http://$BACKEND_H2C/" PROXIES=""; }
teardown_direct() { :; }

# ---------------------------------------------------------------- haproxy, mTLS HTTP/2 pair
HA_A=$NET.11 HA_B=$NET.12
certs() { # a CA and one certificate per haproxy, ECDSA P-256 as the mesh issues
  local d=$WORK/pki n
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  for n in a b; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=haproxy-$n" \
      -keyout "$d/$n.key" -out "$d/$n.csr" 2>/dev/null
    openssl x509 -req -in "$d/$n.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
      -extfile <(printf 'subjectAltName=DNS:haproxy-%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$n") \
      -out "$d/$n.crt" 2>/dev/null
    cat "$d/$n.crt" "$d/$n.key" >"$d/$n.pem"
  done
}
setup_haproxy() {
  [ -f "$WORK/pki/a.pem" ] || certs
  local d=$WORK/pki
  cat >"$WORK/haproxy-b.cfg" <<EOF
global
  nbthread 1
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend inbound
  bind $HA_B:10443 ssl crt $d/b.pem ca-file $d/ca.pem verify required alpn h2
  default_backend app
backend app
  http-reuse always
  server app $BACKEND
EOF
  cat >"$WORK/haproxy-a.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend outbound
  bind $HA_A:10080
  default_backend peer
backend peer
  http-reuse always
  # h2load --h1 counts a response with no reason phrase (haproxy's HTTP/2 -> HTTP/1.1) as failed
  http-response set-status 200 reason OK if { status 200 }
  server b $HA_B:10443 ssl crt $d/a.pem ca-file $d/ca.pem verify required verifyhost haproxy-b alpn h2 ssl-min-ver TLSv1.3
EOF
  start haproxy-b haproxy -db -f "$WORK/haproxy-b.cfg"
  local b=$LAST
  start haproxy-a haproxy -db -f "$WORK/haproxy-a.cfg"
  PROXIES="$LAST $b"
  URL="http://$HA_A:10080/" URL_H2="http://$HA_A:10080/"
  wait_for "$URL"
  alive "$b" haproxy-b
  alive "$LAST" haproxy-a
}
teardown_haproxy() { local p; for p in $PROXIES; do stop "$p"; done; }

# ---------------------------------------------------------------- the Isthmus sidecar pair
# A federation (root CA) and one controller (config folder, cluster CA, push) are started for
# the sidecars' config and certificates; they are not measured.
IS_FED=$NET.20 IS_CTL=$NET.21 IS_A=$NET.30 IS_B=$NET.31
setup_isthmus() {
  local d=$WORK/isthmus b=$ISTHMUS_BIN
  mkdir -p "$d/config"
  cat >"$d/config/backend.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: bench}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: ${BACKEND#*:}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: backend, namespace: bench}
spec:
  address: $IS_B
  labels: {app: backend}
  serviceAccount: backend
EOF
  "$b" validate -f "$d/config" >/dev/null || die "the benchmark's config does not validate"
  start isthmus-federation "$b" federation --state-dir "$d/federation" \
    --listen $IS_FED:15200 --admin $IS_FED:15014 --concurrency 1
  local cp="$LAST"
  wait_for "http://$IS_FED:15014/ready"
  alive "$cp" isthmus-federation
  local join
  join=$("$b" token join --state-dir "$d/federation" --cluster bench)
  start isthmus-controller "$b" controller --cluster bench --config-dir "$d/config" \
    --state-dir "$d/controller" --listen $IS_CTL:15012 --admin $IS_CTL:15014 --concurrency 1 \
    --federation $IS_FED:15200 --federation-root "$d/federation/root-cert.pem" --join-token "$join"
  cp="$cp $LAST"
  wait_for "http://$IS_CTL:15014/ready"
  alive "$LAST" isthmus-controller
  local common=(--cluster bench --controller $IS_CTL:15012 --root "$d/federation/root-cert.pem" --concurrency 1)
  start isthmus-sidecar-b "$b" sidecar "${common[@]}" --workload bench/backend --service-account backend \
    --token "$("$b" token workload --state-dir "$d/controller" --cluster bench --namespace bench --service-account backend)" \
    --outbound $IS_B:15001 --inbound $IS_B:15008 --admin $IS_B:15000 --app "$BACKEND"
  local sb=$LAST
  start isthmus-sidecar-a "$b" sidecar "${common[@]}" --workload bench/client --service-account client \
    --token "$("$b" token workload --state-dir "$d/controller" --cluster bench --namespace bench --service-account client)" \
    --outbound $IS_A:15001 --inbound $IS_A:15008 --admin $IS_A:15000
  PROXIES="$LAST $sb" ISTHMUS_CP="$cp"
  URL="http://$IS_A:15001/" URL_H2="http://$IS_A:15001/"
  wait_for "http://$IS_B:15000/ready"
  wait_for "http://$IS_A:15000/ready"
  wait_for "$URL" -H "Host: $HOST"
  alive "$sb" isthmus-sidecar-b
  alive "$LAST" isthmus-sidecar-a
}
teardown_isthmus() { local p; for p in $PROXIES $ISTHMUS_CP; do stop "$p"; done; }

# ---------------------------------------------------------------- measuring
cpu_ticks() { # summed utime+stime of the given pids, in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo $t
}
percentiles() { # h2load log files -> "p50 p99" in us, successful requests only
  awk -F'\t' '$2 >= 200 && $2 < 400 {print $3}' "$@" | sort -n | awk '
    {v[NR] = $1} END {
      if (NR == 0) { print "- -"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      print v[i50], v[i99] }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
per_request() { # ticks requests -> CPU microseconds per request ("-" with no proxies or no requests)
  [ -n "$PROXIES" ] || { echo -; return; }
  awk -v t="$1" -v r="${2:-0}" -v u=$TICK_US 'BEGIN{ if (r + 0 > 0) printf "%.1f", t * u / r; else print "-" }'
}
declare -A R

measure() { # $1 setup, $2 run: fills R[$1.$2.*]
  local s=$1 n=$2 k="$1.$2" host=() authority=() t0 t1 reqs out limit=$((DURATION + 30))
  [ "$s" = isthmus ] && host=(-H "Host: $HOST") authority=(-H ":authority: $HOST")
  # warm up every path (connections, pools, certificates)
  timeout 30 wrk -t2 -c"$CONNS" -d2s "${host[@]}" "$URL" >/dev/null 2>&1 || true

  t0=$(cpu_ticks $PROXIES)
  out=$RAW/$k.wrk
  timeout $limit wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "${host[@]}" "$URL" >"$out" 2>&1 || true
  t1=$(cpu_ticks $PROXIES)
  reqs=$(awk '/ requests in /{print $1}' "$out")
  R[$k.h1]=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")
  R[$k.h1]=${R[$k.h1]:--}
  R[$k.h1err]=$(awk '/^Non-2xx/{s += $NF} /Socket errors/{gsub(",", ""); s += $4 + $6 + $8 + $10} END {print s + 0}' "$out")
  R[$k.cpu1]=$(per_request $((t1 - t0)) "$reqs")

  t0=$(cpu_ticks $PROXIES)
  out=$RAW/$k.h2load
  timeout $limit h2load -c"$H2_CONNS" -m"$H2_STREAMS" -t2 -D "$DURATION" "${authority[@]}" "$URL_H2" >"$out" 2>&1 || true
  t1=$(cpu_ticks $PROXIES)
  reqs=$(awk '/^requests:/{print $8}' "$out")
  R[$k.h2]=$(awk '/^finished in/{gsub(",", ""); printf "%.0f", $4}' "$out")
  R[$k.h2]=${R[$k.h2]:--}
  R[$k.h2err]=$(awk '/^requests:/{print $10 + $12}' "$out")
  R[$k.cpu2]=$(per_request $((t1 - t0)) "$reqs")

  out=$RAW/$k.rate
  rm -f "$out".log*
  timeout $limit h2load --h1 -t1 -c"$RATE_CONNS" --rps=$((RATE / RATE_CONNS)) -D "$DURATION" --log-file="$out.log" \
    "${authority[@]}" "$URL" >"$out" 2>&1 || true
  read -r R[$k.p50] R[$k.p99] < <(percentiles "$out.log")

  local rss="" p
  for p in $PROXIES; do rss="$rss$(awk '/^VmHWM:/{printf "%.1f", $2 / 1024}' "/proc/$p/status")/"; done
  R[$k.rss]=${rss%/}
  R[$k.rss]=${R[$k.rss]:--}
  say "$s run $n: h1 ${R[$k.h1]}/s, h2 ${R[$k.h2]}/s, @${RATE}/s p50 ${R[$k.p50]} p99 ${R[$k.p99]} us, CPU ${R[$k.cpu1]}/${R[$k.cpu2]} us/req, RSS ${R[$k.rss]} MiB"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "-" || b == "-") print "-"; else printf "%d", a - b }'; }

# ---------------------------------------------------------------- the run
start_backend
if [ "${HOLD:-}" = 1 ]; then
  for s in $SETUPS; do "setup_$s"; say "$s: $URL (proxies: ${PROXIES:-none})"; done
  say "holding; Ctrl-C stops everything"
  while true; do sleep 3600; done
fi
for n in $(seq "$RUNS"); do
  for s in $SETUPS; do
    say "$s: starting"
    "setup_$s"
    measure "$s" "$n"
    "teardown_$s"
  done
done

echo "Sidecar-pair benchmark, $(date -u +%F), $(nproc) CPUs, one worker thread per proxy, ${DURATION}s per figure."
echo "HTTP/1.1: wrk -c$CONNS; HTTP/2: h2load -c$H2_CONNS -m$H2_STREAMS (h2c); latency: h2load --h1 at $RATE req/s over $RATE_CONNS connections."
echo
echo "| setup | run | HTTP/1.1 req/s | / direct | HTTP/2 req/s | / direct | p50 µs | p99 µs | added p99 µs | CPU µs/req h1 | CPU µs/req h2 | peak RSS MiB per proxy | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for n in $(seq "$RUNS"); do
  for s in $SETUPS; do
    k=$s.$n d=direct.$n
    echo "| $s | $n | ${R[$k.h1]} | $(ratio "${R[$k.h1]}" "${R[$d.h1]:--}") | ${R[$k.h2]} | $(ratio "${R[$k.h2]}" "${R[$d.h2]:--}") | ${R[$k.p50]} | ${R[$k.p99]} | $(minus "${R[$k.p99]}" "${R[$d.p99]:--}") | ${R[$k.cpu1]} | ${R[$k.cpu2]} | ${R[$k.rss]} | ${R[$k.h1err]}/${R[$k.h2err]} |"
  done
done
if [[ " $SETUPS " == *" isthmus "* && " $SETUPS " == *" haproxy "* ]]; then
  echo
  echo "Isthmus pair / haproxy pair, per run (goals: CPU ≤ 0.80, HTTP/1.1 ≥ 1.20, HTTP/2 ≥ 1.00, added p99 ≤ 1.00):"
  echo
  echo "| run | CPU h1 | CPU h2 | HTTP/1.1 | HTTP/2 | added p99 |"
  echo "|---|---|---|---|---|---|"
  for n in $(seq "$RUNS"); do
    i=isthmus.$n h=haproxy.$n d=direct.$n
    echo "| $n | $(ratio "${R[$i.cpu1]}" "${R[$h.cpu1]}") | $(ratio "${R[$i.cpu2]}" "${R[$h.cpu2]}") | $(ratio "${R[$i.h1]}" "${R[$h.h1]}") | $(ratio "${R[$i.h2]}" "${R[$h.h2]}") | $(ratio "$(minus "${R[$i.p99]}" "${R[$d.p99]:--}")" "$(minus "${R[$h.p99]}" "${R[$d.p99]:--}")") |"
  done
fi
