#!/usr/bin/env bash
# The sidecar-pair benchmark: the Isthmus pair beside the closest L7 peer and beside no proxy,
# driven with the same load in one run, so the ratios hold on a noisy machine.
#
#   direct      client -> nginx backend
#   haproxy     client -> haproxy A --(HTTP/2 over mTLS 1.3, one pooled connection)--> haproxy B -> backend
#   isthmus     client -> sidecar A --(HTTP/2 over mTLS 1.3, SPIFFE IDs checked)--> sidecar B -> backend
#   isthmus-xc  client -> sidecar A (cluster east) -> east's gateway --QUIC--> west's gateway
#               -> sidecar B (cluster west) -> backend; the TLS between the sidecars is end to end
#   isthmus-wasm  as isthmus, with a WebAssembly plugin on sidecar B (by default one that does
#               nothing: tests/plugins/assembly/noop.ts; WASM_MODULE=<file> WASM_PLUGIN_NAME=<root
#               id> for another); not in the default SETUPS
#
# Every proxy runs one worker thread. Per setup and run: HTTP/1.1 throughput (wrk, keep-alive),
# HTTP/2 throughput (h2load, h2c, many streams per connection), latency at a fixed request rate
# (h2load --rps, percentiles from its per-request log), CPU time per request of the proxies
# (from /proc/<pid>/stat over the throughput runs; for isthmus-xc also the gateways' share) and
# each proxy's peak RSS (VmHWM). Then, as root with nft, a loss phase: LOSS% of the packets
# between haproxy A and B (TCP), and between the two gateways (QUIC), dropped while HTTP/2
# requests run at RATE req/s on LOSS_CONNS connections of LOSS_STREAMS concurrent streams.
#
# Usage (tools from Debian: apt-get install wrk nghttp2-client nginx-light haproxy nftables):
#   cargo build --release && bench/run.sh
# Env: SETUPS="direct haproxy isthmus isthmus-xc" RUNS=1 DURATION=10 CONNS=64 H2_CONNS=64
#      H2_STREAMS=10 RATE=1000 RATE_CONNS=10 LOSS=1 (percent; 0: no loss phase) LOSS_CONNS=4
#      LOSS_STREAMS=64 ISTHMUS_BIN=target/release/isthmus KEEP=<dir for raw outputs and logs>
#      HOLD=1 (start the setups, print their addresses, wait for Ctrl-C: for profiling)
# Addresses: 127.0.210.0/24 only, so nothing collides with the demo or the tests.
set -euo pipefail
if [ $# -gt 0 ]; then   # no arguments: everything is set through the environment
  sed -n '2,/^# Addresses/s/^# \{0,1\}//p' "$0"
  case $1 in -h | --help) exit 0 ;; *) echo "bench/run.sh takes no arguments: $1" >&2; exit 2 ;; esac
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUPS="${SETUPS:-direct haproxy isthmus isthmus-xc}"
RUNS="${RUNS:-1}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
H2_CONNS="${H2_CONNS:-64}"
H2_STREAMS="${H2_STREAMS:-10}"
RATE="${RATE:-1000}"
RATE_CONNS="${RATE_CONNS:-10}"
LOSS="${LOSS:-1}"
LOSS_CONNS="${LOSS_CONNS:-4}"
LOSS_STREAMS="${LOSS_STREAMS:-64}"
ISTHMUS_BIN="$(realpath -m "${ISTHMUS_BIN:-$ROOT/target/release/isthmus}")"
HOST=backend.bench.svc.cluster.local
NET=127.0.210
WORK="$(mktemp -d /tmp/isthmus-bench.XXXXXX)"
RAW="${KEEP:-$WORK/raw}"
mkdir -p "$RAW"
PIDS=()
PROXIES="" GATEWAYS=""   # the measured pids of the current setup, and which of them are gateways

say() { echo "[bench] $*" >&2; }
die() { say "error: $*"; exit 1; }
for tool in wrk h2load nginx haproxy openssl curl awk sort; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install wrk nghttp2-client nginx-light haproxy)"
done
[ -x "$ISTHMUS_BIN" ] || [[ " $SETUPS " != *" isthmus "* ]] || die "no isthmus binary at $ISTHMUS_BIN (cargo build --release)"

declare -A BORN   # pid -> its start time, so a pid the kernel reused is never signalled
born() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
stop() { # TERM, then KILL after 5 s; only a process this script started
  local pid=$1
  [ -n "${BORN[$pid]:-}" ] && [ "$(born "$pid")" = "${BORN[$pid]}" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  declare -F loss_off >/dev/null && loss_off
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
  BORN[$LAST]=$(born "$LAST")
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
setup_direct() { URL="http://$BACKEND/" URL_H2="http://$BACKEND_H2C/" PROXIES="" GATEWAYS=""; }
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
  PROXIES="$LAST $b" GATEWAYS=""
  URL="http://$HA_A:10080/" URL_H2="http://$HA_A:10080/"
  wait_for "$URL"
  alive "$b" haproxy-b
  alive "$LAST" haproxy-a
}
teardown_haproxy() { local p; for p in $PROXIES; do stop "$p"; done; }

# ---------------------------------------------------------------- Isthmus
# A federation (root CA) and a controller per cluster (config folder, cluster CA, push) are
# started for the proxies' config and certificates; they are not measured.
IS_FED=$NET.20
is_federation() { # starts the federation; sets IS_ROOT, IS_CP
  local d=$WORK/isthmus
  start isthmus-federation "$ISTHMUS_BIN" federation --state-dir "$d/federation" \
    --listen $IS_FED:15200 --admin $IS_FED:15014 --concurrency 1
  IS_CP="$LAST" IS_ROOT="$d/federation/root-cert.pem"
  wait_for "http://$IS_FED:15014/ready"
  alive "$LAST" isthmus-federation
}
is_controller() { # CLUSTER IP: the cluster's controller, its config from $WORK/isthmus/CLUSTER/config
  local d=$WORK/isthmus/$1 join
  "$ISTHMUS_BIN" validate -f "$d/config" >/dev/null || die "the benchmark's config does not validate"
  join=$("$ISTHMUS_BIN" token join --state-dir "$WORK/isthmus/federation" --cluster "$1")
  start "isthmus-$1-controller" "$ISTHMUS_BIN" controller --cluster "$1" --config-dir "$d/config" \
    --state-dir "$d/state" --listen "$2:15012" --admin "$2:15014" --concurrency 1 \
    --federation $IS_FED:15200 --federation-root "$IS_ROOT" --join-token "$join"
  IS_CP="$IS_CP $LAST"
  wait_for "http://$2:15014/ready"
  alive "$LAST" "isthmus-$1-controller"
}
is_proxy() { # NAME ROLE CLUSTER CONTROLLER_IP NAMESPACE SERVICE_ACCOUNT ARGS...: one proxy, one worker
  local name=$1 role=$2 cluster=$3 ctl=$4 ns=$5 sa=$6 token
  shift 6
  token=$("$ISTHMUS_BIN" token workload --state-dir "$WORK/isthmus/$cluster/state" \
    --cluster "$cluster" --namespace "$ns" --service-account "$sa")
  start "$name" "$ISTHMUS_BIN" "$role" --cluster "$cluster" --controller "$ctl:15012" \
    --root "$IS_ROOT" --token "$token" --concurrency 1 "$@"
}
backend_config() { # CLUSTER IP: the backend service (exported to other clusters), its endpoint at IP
  mkdir -p "$WORK/isthmus/$1/config"
  cat >"$WORK/isthmus/$1/config/backend.yaml" <<YAML
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
  address: $2
  labels: {app: backend}
  serviceAccount: backend
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: backend, namespace: bench}
YAML
}
is_ready() { # URL of the client sidecar, then every pid that must still run
  local url=$1 p
  shift
  URL=$url URL_H2=$url
  wait_for "$URL" -H "Host: $HOST"
  for p in "$@"; do alive "$p" "isthmus (pid $p)"; done
}

# The sidecar pair, in one cluster.
IS_CTL=$NET.21 IS_A=$NET.30 IS_B=$NET.31
setup_isthmus() {
  backend_config bench $IS_B
  is_pair
}
is_pair() { # the pair's control plane and sidecars, on the config written
  is_federation
  is_controller bench $IS_CTL
  is_proxy isthmus-sidecar-b sidecar bench $IS_CTL bench backend --workload bench/backend \
    --service-account backend --app "$BACKEND" \
    --outbound $IS_B:15001 --inbound $IS_B:15008 --admin $IS_B:15000
  local sb=$LAST
  is_proxy isthmus-sidecar-a sidecar bench $IS_CTL bench client --workload bench/client \
    --service-account client --outbound $IS_A:15001 --inbound $IS_A:15008 --admin $IS_A:15000
  PROXIES="$LAST $sb" GATEWAYS=""
  is_ready "http://$IS_A:15001/" $PROXIES
}
teardown_isthmus() { local p; for p in $PROXIES $IS_CP; do stop "$p"; done; }

# The same pair with a WebAssembly plugin on sidecar B (SERVER: every request to the
# backend runs through it): by default one that does nothing (tests/plugins/assembly/
# noop.ts, no SDK), so the difference to `isthmus` is what the proxy-wasm host costs.
# WASM_MODULE (and WASM_PLUGIN_NAME) measure another module.
setup_isthmus-wasm() {
  local module=${WASM_MODULE:-$ROOT/tests/plugins/build/noop.wasm}
  [ -f "$module" ] || "$ROOT/tests/plugins/build.sh" || die "cannot build the plugins (node and npm)"
  backend_config bench $IS_B
  cat >>"$WORK/isthmus/bench/config/backend.yaml" <<YAML
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: measured, namespace: bench}
spec:
  selector: {matchLabels: {app: backend}}
  url: file://$(realpath "$module")
  pluginName: "${WASM_PLUGIN_NAME:-}"
  pluginConfig: {}
YAML
  is_pair
  local i
  for i in $(seq 1 100); do
    curl -fsS "http://$IS_B:15000/config_dump" | grep -Eq '"loaded": ?true' && return 0
    sleep 0.1
  done
  die "sidecar B did not load the plugin (see its log)"
}
teardown_isthmus-wasm() { teardown_isthmus; }

# Across clusters: sidecar A in `east` -> east's gateway (mTLS HTTP/2 CONNECT) -> QUIC ->
# west's gateway -> sidecar B in `west` (the TLS inside the tunnel is end to end, A to B).
# `east` runs no backend: the federation tells it that west does.
XC_ECTL=$NET.50 XC_EGW=$NET.51 XC_A=$NET.52 XC_WCTL=$NET.60 XC_WGW=$NET.61 XC_B=$NET.62
setup_isthmus-xc() {
  backend_config west $XC_B
  mkdir -p "$WORK/isthmus/east/config"
  is_federation
  is_controller east $XC_ECTL
  is_controller west $XC_WCTL
  local gw=(isthmus-system isthmus-eastwestgateway) gw_w gw_e sb
  is_proxy isthmus-west-gateway gateway west $XC_WCTL "${gw[@]}" \
    --tunnel $XC_WGW:15008 --quic $XC_WGW:15443 --admin $XC_WGW:15000
  gw_w=$LAST
  is_proxy isthmus-east-gateway gateway east $XC_ECTL "${gw[@]}" \
    --tunnel $XC_EGW:15008 --quic $XC_EGW:15443 --admin $XC_EGW:15000
  gw_e=$LAST
  is_proxy isthmus-sidecar-b sidecar west $XC_WCTL bench backend --workload bench/backend \
    --service-account backend --app "$BACKEND" \
    --outbound $XC_B:15001 --inbound $XC_B:15008 --admin $XC_B:15000
  sb=$LAST
  is_proxy isthmus-sidecar-a sidecar east $XC_ECTL bench client --workload bench/client \
    --service-account client --outbound $XC_A:15001 --inbound $XC_A:15008 --admin $XC_A:15000
  PROXIES="$LAST $gw_e $gw_w $sb" GATEWAYS="$gw_e $gw_w"
  is_ready "http://$XC_A:15001/" $PROXIES
}
teardown_isthmus-xc() { teardown_isthmus; }

# ---------------------------------------------------------------- measuring
cpu_ticks() { # summed utime+stime of the given pids, in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo $t
}
percentiles() { # h2load log files -> "p50 p99 p99.9" in us, successful requests only
  awk -F'\t' '$2 >= 200 && $2 < 400 {print $3}' "$@" | sort -n | awk '
    {v[NR] = $1} END {
      if (NR == 0) { print "- - -"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      i999 = int(NR * 0.999); if (i999 < 1) i999 = 1
      print v[i50], v[i99], v[i999] }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
per_request() { # ticks requests [pids] -> CPU microseconds per request ("-" with no pids or requests)
  [ -n "${3-$PROXIES}" ] || { echo -; return; }
  awk -v t="$1" -v r="${2:-0}" -v u=$TICK_US 'BEGIN{ if (r + 0 > 0) printf "%.1f", t * u / r; else print "-" }'
}
declare -A R
timed() { # OUT CMD...: runs CMD (output in OUT); sets TICKS and GW_TICKS, the CPU the proxies
  # and the gateways among them spent meanwhile
  local out=$1 t0 g0
  shift
  t0=$(cpu_ticks $PROXIES) g0=$(cpu_ticks $GATEWAYS)
  timeout $((DURATION + 30)) "$@" >"$out" 2>&1 || true
  TICKS=$(($(cpu_ticks $PROXIES) - t0)) GW_TICKS=$(($(cpu_ticks $GATEWAYS) - g0))
}

measure() { # $1 setup, $2 run: fills R[$1.$2.*]
  local s=$1 n=$2 k="$1.$2" host=() authority=() reqs out limit=$((DURATION + 30))
  [[ $s == isthmus* ]] && host=(-H "Host: $HOST") authority=(-H ":authority: $HOST")
  # warm up every path (connections, pools, certificates)
  timeout 30 wrk -t2 -c"$CONNS" -d2s "${host[@]}" "$URL" >/dev/null 2>&1 || true

  out=$RAW/$k.wrk
  timed "$out" wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "${host[@]}" "$URL"
  reqs=$(awk '/ requests in /{print $1}' "$out")
  R[$k.h1]=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")
  R[$k.h1]=${R[$k.h1]:--}
  R[$k.h1err]=$(awk '/^Non-2xx/{s += $NF} /Socket errors/{gsub(",", ""); s += $4 + $6 + $8 + $10} END {print s + 0}' "$out")
  R[$k.cpu1]=$(per_request "$TICKS" "$reqs")
  R[$k.gw1]=$(per_request "$GW_TICKS" "$reqs" "$GATEWAYS")

  out=$RAW/$k.h2load
  timed "$out" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -t2 -D "$DURATION" "${authority[@]}" "$URL_H2"
  reqs=$(awk '/^requests:/{print $8}' "$out")
  R[$k.h2]=$(awk '/^finished in/{gsub(",", ""); printf "%.0f", $4}' "$out")
  R[$k.h2]=${R[$k.h2]:--}
  R[$k.h2err]=$(awk '/^requests:/{print $10 + $12}' "$out")
  R[$k.cpu2]=$(per_request "$TICKS" "$reqs")
  R[$k.gw2]=$(per_request "$GW_TICKS" "$reqs" "$GATEWAYS")

  out=$RAW/$k.rate
  rm -f "$out".log*
  timeout $limit h2load --h1 -t1 -c"$RATE_CONNS" --rps=$((RATE / RATE_CONNS)) -D "$DURATION" --log-file="$out.log" \
    "${authority[@]}" "$URL" >"$out" 2>&1 || true
  read -r R[$k.p50] R[$k.p99] _ < <(percentiles "$out.log")

  local rss="" p
  for p in $PROXIES; do rss="$rss$(awk '/^VmHWM:/{printf "%.1f", $2 / 1024}' "/proc/$p/status")/"; done
  R[$k.rss]=${rss%/}
  R[$k.rss]=${R[$k.rss]:--}
  say "$s run $n: h1 ${R[$k.h1]}/s, h2 ${R[$k.h2]}/s, @${RATE}/s p50 ${R[$k.p50]} p99 ${R[$k.p99]} us, CPU ${R[$k.cpu1]}/${R[$k.cpu2]} us/req, RSS ${R[$k.rss]} MiB"
}

# Loss between the two proxies of a pair (HTTP/2 on one TCP connection for haproxy; QUIC
# between the gateways across clusters), injected with nftables (root only): many
# concurrent streams at a fixed rate, latency with and without LOSS% of packets dropped.
LOSS_TABLE=isthmus_bench_$$
# One match per direction, so each packet is sampled once.
loss_rules_haproxy() { printf '%s\n' "ip daddr $HA_B tcp dport 10443" "ip saddr $HA_B tcp sport 10443"; }
loss_rules_isthmus-xc() { printf '%s\n' "ip daddr $XC_WGW udp dport 15443" "ip daddr $XC_EGW udp dport 15443"; }
loss_on() { # SETUP PERCENT: every packet between the pair's two proxies is dropped with PERCENT% chance
  local r
  {
    echo "add table inet $LOSS_TABLE"
    echo "add chain inet $LOSS_TABLE out { type filter hook output priority 0; policy accept; }"
    while read -r r; do
      echo "add rule inet $LOSS_TABLE out $r numgen random mod 100 < $2 drop"
    done < <("loss_rules_$1")
  } | nft -f - || die "nft refused the loss rules (root and nftables needed)"
}
loss_off() { nft delete table inet "$LOSS_TABLE" 2>/dev/null || true; }
measure_loss() { # SETUP PERCENT: fills L[SETUP.PERCENT.*]
  local s=$1 pct=$2 k="$1.$2" out=$RAW/$1.loss$2 authority=()
  [[ $s == isthmus* ]] && authority=(-H ":authority: $HOST")
  [ "$pct" = 0 ] || loss_on "$s" "$pct"
  rm -f "$out".log*
  timeout $((DURATION + 30)) h2load -t1 -c"$LOSS_CONNS" -m"$LOSS_STREAMS" --rps=$((RATE / LOSS_CONNS)) \
    -D "$DURATION" --log-file="$out.log" "${authority[@]}" "$URL_H2" >"$out" 2>&1 || true
  loss_off
  read -r L[$k.p50] L[$k.p99] L[$k.p999] < <(percentiles "$out.log")
  L[$k.rps]=$(awk '/^finished in/{gsub(",", ""); printf "%.0f", $4}' "$out")
  L[$k.err]=$(awk '/^requests:/{print $10 + $12}' "$out")
  say "$s, ${pct}% loss: p50 ${L[$k.p50]} p99 ${L[$k.p99]} p99.9 ${L[$k.p999]} us, ${L[$k.err]} failed"
}
declare -A L

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "-" || b == "-") print "-"; else printf "%d", a - b }'; }

# ---------------------------------------------------------------- the run
start_backend
if [ "${HOLD:-}" = 1 ]; then
  for s in $SETUPS; do "setup_$s"; say "$s: $URL (proxies: ${PROXIES:-none})"; done
  say "holding; Ctrl-C stops everything"
  while true; do sleep 3600 & wait $!; done   # `wait` lets a signal through at once
fi
for n in $(seq "$RUNS"); do
  for s in $SETUPS; do
    say "$s: starting"
    "setup_$s"
    measure "$s" "$n"
    "teardown_$s"
  done
done
LOSSY=""
if [ "$LOSS" != 0 ]; then
  for s in haproxy isthmus-xc; do [[ " $SETUPS " == *" $s "* ]] && LOSSY="$LOSSY $s"; done
  if [ -n "$LOSSY" ] && { [ "$(id -u)" != 0 ] || ! command -v nft >/dev/null; }; then
    say "no loss runs: they need root and nft"
    LOSSY=""
  fi
fi
for s in $LOSSY; do
  say "$s: starting (loss)"
  "setup_$s"
  measure_loss "$s" 0
  measure_loss "$s" "$LOSS"
  "teardown_$s"
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
if [[ " $SETUPS " == *" isthmus "* && " $SETUPS " == *" isthmus-xc "* ]]; then
  echo
  echo "Across clusters (isthmus-xc: sidecar, gateway, QUIC, gateway, sidecar) beside the same-cluster pair, per run:"
  echo
  echo "| run | gateway pair CPU µs/req h1 | h2 | whole path CPU µs/req h1 | h2 | added by the gateways p50 µs | p99 µs | throughput h1 / same cluster | h2 |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for n in $(seq "$RUNS"); do
    x=isthmus-xc.$n i=isthmus.$n
    echo "| $n | ${R[$x.gw1]} | ${R[$x.gw2]} | ${R[$x.cpu1]} | ${R[$x.cpu2]} | $(minus "${R[$x.p50]}" "${R[$i.p50]}") | $(minus "${R[$x.p99]}" "${R[$i.p99]}") | $(ratio "${R[$x.h1]}" "${R[$i.h1]}") | $(ratio "${R[$x.h2]}" "${R[$i.h2]}") |"
  done
fi
if [ -n "$LOSSY" ]; then
  echo
  echo "${LOSS}% packet loss between the pair's proxies (nft), HTTP/2 at $RATE req/s, $LOSS_STREAMS concurrent streams on each of $LOSS_CONNS connections:"
  echo
  echo "| setup | between the proxies | loss | p50 µs | p99 µs | p99.9 µs | failed |"
  echo "|---|---|---|---|---|---|---|"
  for s in $LOSSY; do
    case $s in haproxy) link="HTTP/2 on one TCP connection";; *) link="QUIC";; esac
    for pct in 0 "$LOSS"; do
      k=$s.$pct
      echo "| $s | $link | $pct% | ${L[$k.p50]} | ${L[$k.p99]} | ${L[$k.p999]} | ${L[$k.err]} |"
    done
  done
fi
