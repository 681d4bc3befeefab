#!/usr/bin/env bash
# regmux benchmark harness: real docker-registry backends, nginx as the reference proxy, regmux.
# Measures throughput, CPU, requests/s, latency, memory and startup side by side. See bench/README.md.
#
#   bench/run.sh                  full run (1 GiB blob, 8 x 256 MiB, 256 clients, 5 runs)
#   bench/run.sh --quick          CI mode: small sizes, 2 runs; fails only if something broke
set -euo pipefail
shopt -s inherit_errexit

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)

usage() {
	cat <<EOF
usage: bench/run.sh [--quick] [--regmux PATH] [--runs N] [--out FILE.md] [options]

  --quick              small sizes, 2 runs, short wrk runs (CI); exits non-zero only if something
                       broke (failed or wrong download, a process that did not start), never for a
                       missed target
  --regmux PATH        regmux binary (default: $REPO_DIR/target/release/regmux)
  --runs N             runs per measurement; the table shows median (min-max) (default 5, quick 2)
  --out FILE.md        also write the report (header + table + notes) to FILE.md
  --only LIST          run only these measurements, e.g. --only 1,3 (1 blob, 2 concurrent,
                       3 manifests, 4 fallback, 5 memory, 6 startup)
  --nginx-workers N    nginx worker_processes (default 1; "auto" = one per core)
  --nginx-buffer SIZE  nginx proxy_buffer_size, e.g. 64k (also proxy_buffers 4 SIZE); default: nginx's
                       own (one memory page), i.e. exactly the directives listed in bench/README.md
  --wrk-seconds N      duration of each wrk run (default 10, quick 2)
  --no-regmux          measure only direct and nginx (to test the harness without regmux)
  --keep-lab           keep the scratch folder (logs, configs) instead of deleting it
EOF
}

# ---------------------------------------------------------------- options
QUICK=0 REGMUX="" RUNS="" OUT="" ONLY="1,2,3,4,5,6" NGINX_WORKERS=1 NGINX_BUFFER="" WRK_SECS="" NO_REGMUX=0 KEEP_LAB=0
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--regmux) REGMUX=${2:?--regmux needs a path}; shift ;;
	--regmux=*) REGMUX=${1#*=} ;;
	--runs) RUNS=${2:?--runs needs a number}; shift ;;
	--runs=*) RUNS=${1#*=} ;;
	--out) OUT=${2:?--out needs a file}; shift ;;
	--out=*) OUT=${1#*=} ;;
	--only) ONLY=${2:?--only needs a list}; shift ;;
	--only=*) ONLY=${1#*=} ;;
	--nginx-workers) NGINX_WORKERS=${2:?}; shift ;;
	--nginx-workers=*) NGINX_WORKERS=${1#*=} ;;
	--nginx-buffer) NGINX_BUFFER=${2:?}; shift ;;
	--nginx-buffer=*) NGINX_BUFFER=${1#*=} ;;
	--wrk-seconds) WRK_SECS=${2:?}; shift ;;
	--wrk-seconds=*) WRK_SECS=${1#*=} ;;
	--no-regmux) NO_REGMUX=1 ;;
	--keep-lab) KEEP_LAB=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 64 ;;
	esac
	shift
done

KiB=1024 MiB=1048576 GiB=1073741824
if ((QUICK)); then
	BIG_SIZE=$((32 * MiB)) CONC_N=4 CONC_SIZE=$((16 * MiB))
	MEM_CLIENTS=16 MEM_SIZE=$((16 * MiB))
	RUNS=${RUNS:-2} WRK_SECS=${WRK_SECS:-2} STARTUP_RUNS=3
else
	BIG_SIZE=$GiB CONC_N=8 CONC_SIZE=$((256 * MiB))
	MEM_CLIENTS=256 MEM_SIZE=$((64 * MiB))
	RUNS=${RUNS:-5} WRK_SECS=${WRK_SECS:-10} STARTUP_RUNS=$((RUNS > 5 ? RUNS : 5))
fi
MEM_RUNS=$((RUNS < 3 ? RUNS : 3)) # 256 x 64 MiB = 16 GiB per run and proxy: ~1 min each
SMALL_SIZE=$((4 * KiB)) SMALL_N=16 # measurement 4: per-request cost dominates
WRK_THREADS=2 WRK_CONNS=64
SLOW_RATE=20M # half of the memory-test clients read at this rate (curl --limit-rate)
REPO=bench/data
OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive integer" >&2; exit 64; }
[[ $WRK_SECS =~ ^[1-9][0-9]*$ ]] || { echo "--wrk-seconds must be a positive integer" >&2; exit 64; }
[[ -z $NGINX_BUFFER || $NGINX_BUFFER =~ ^[1-9][0-9]*k$ ]] || { echo "--nginx-buffer takes a size in k, e.g. 64k" >&2; exit 64; }
[[ $NGINX_WORKERS =~ ^([1-9][0-9]*|auto)$ ]] || { echo "--nginx-workers takes a number or auto" >&2; exit 64; }
RUN_START=$EPOCHREALTIME
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---------------------------------------------------------------- helpers
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
FAILURES=() NOTES=()
fail() { FAILURES+=("$*"); log "FAILED: $*"; }
note() { NOTES+=("$*"); log "note: $*"; }

for tool in docker-registry nginx curl wrk python3 awk getconf; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install docker-registry nginx-light curl wrk python3)"
done
if command -v openssl >/dev/null; then
	sha256_stdin() { openssl dgst -sha256 -r | cut -d' ' -f1; } # uses SHA-NI: ~5x coreutils
else
	sha256_stdin() { sha256sum | cut -d' ' -f1; }
fi
CLK_TCK=$(getconf CLK_TCK)

if ((NO_REGMUX)); then
	REGMUX=""
else
	REGMUX=${REGMUX:-$REPO_DIR/target/release/regmux}
	[[ $REGMUX == /* ]] || REGMUX=$PWD/$REGMUX
	if [[ ! -x $REGMUX ]]; then
		log "regmux binary not found at $REGMUX"
		log "build it first:  (cd $REPO_DIR && cargo build --release)"
		log "or point to one: bench/run.sh --regmux PATH   (or measure without it: --no-regmux)"
		exit 2
	fi
fi

# ---------------------------------------------------------------- lab, processes, cleanup
LAB=$(mktemp -d "${TMPDIR:-/tmp}/regmux-bench.XXXXXX")
PIDS=()
cleanup() {
	local rc=$? p alive i
	trap - EXIT INT TERM
	local all=("${PIDS[@]}")
	jobs -p >"$LAB/.jobs" 2>/dev/null || true
	mapfile -t -O "${#all[@]}" all <"$LAB/.jobs"
	for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for ((i = 0; i < 50; i++)); do
		alive=0
		for p in "${all[@]}"; do
			if kill -0 "$p" 2>/dev/null; then alive=1; fi
		done
		((alive)) || break
		sleep 0.1
	done
	for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${all[@]}"; do wait "$p" 2>/dev/null || true; done
	if ((KEEP_LAB)); then
		log "lab kept: $LAB"
	else
		rm -rf "$LAB"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free TCP ports on 127.0.0.1, below the ephemeral range so that no client connection takes them.
free_ports() {
	python3 - "$1" <<'PY'
import random, socket, sys
want, held = int(sys.argv[1]), []
for port in random.sample(range(20000, 32000), 2000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    if len(held) == want:
        break
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

# wait_http URL PID NAME [TIMEOUT_S]: until URL answers 200, or fail if PID exits / timeout
wait_http() {
	local url=$1 pid=$2 name=$3 timeout=${4:-30} code start=$EPOCHREALTIME
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			log "$name (pid $pid) exited before answering $url"
			return 1
		fi
		code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) || true
		[[ $code == 200 ]] && return 0
		if awk -v s="$start" -v n="$EPOCHREALTIME" -v t="$timeout" 'BEGIN{exit !(n - s > t)}'; then
			log "$name (pid $pid): no 200 on $url within ${timeout}s (last status $code)"
			return 1
		fi
		sleep 0.02
	done
}

stop_pid() { # stop_pid PID: TERM, wait up to 5 s, KILL
	local p=$1 i
	kill -TERM "$p" 2>/dev/null || return 0
	for ((i = 0; i < 50; i++)); do
		kill -0 "$p" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
}

proc_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; } # proc_kib PID VmRSS
cpu_ticks() { # cpu_ticks PID...: utime + stime of all given processes (all threads), clock ticks
	local p s fields total=0
	for p; do
		read -r s <"/proc/$p/stat"
		read -ra fields <<<"${s##*) }" # fields from 3 on; utime = field 14, stime = 15
		total=$((total + fields[11] + fields[12]))
	done
	echo "$total"
}
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
human() { # bytes -> "1 GiB" / "256 MiB" / "4 KiB"
	awk -v b="$1" 'BEGIN { if (b >= 1073741824 && b % 1073741824 == 0) print b / 1073741824 " GiB";
		else if (b >= 1048576) print b / 1048576 " MiB"; else print b / 1024 " KiB" }'
}

# ---------------------------------------------------------------- results store
declare -A V=() # V[key] = space-separated per-run values
add() { V[$1]="${V[$1]:-} $2"; }
# stats KEY -> "median min max" (empty if no values)
stats() {
	local vals=${V[$1]:-}
	[[ -n ${vals// /} ]] || return 0
	# shellcheck disable=SC2086
	printf '%s\n' $vals | sort -g | awk '{ a[NR] = $1 } END {
		m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; print m, a[1], a[NR] }'
}
# cell FMT KEY [PREFIX] -> "median (min–max)" or "n/a"
cell() {
	local s
	s=$(stats "$2")
	if [[ -z $s ]]; then echo "n/a"; return; fi
	awk -v f="$1" -v p="${3:-}" -v s="$s" -v n="$RUNS" 'BEGIN { split(s, a, " ");
		med = p sprintf(f, a[1]); lo = sprintf(f, a[2]); hi = sprintf(f, a[3]);
		if (lo == hi) print med; else print med " (" lo "–" hi ")" }'
}
# met OP LIMIT KEY -> yes / **no** / n/a (on the median)
met() {
	local s
	s=$(stats "$3")
	if [[ -z $s ]]; then echo "n/a"; return; fi
	awk -v op="$1" -v lim="$2" -v s="$s" 'BEGIN { split(s, a, " "); m = a[1];
		ok = (op == "ge") ? (m >= lim) : (m <= lim); print ok ? "yes" : "**no**" }'
}

# ---------------------------------------------------------------- is the machine quiet?
cpu_busy_pct() { # share of all cores busy over the next second, from /proc/stat
	local a b
	a=$(head -1 /proc/stat)
	sleep 1
	b=$(head -1 /proc/stat)
	awk -v a="$a" -v b="$b" 'BEGIN { n = split(a, x); split(b, y); t = 0
		for (i = 2; i <= n; i++) t += y[i] - x[i]; idle = (y[5] - x[5]) + (y[6] - x[6])
		printf "%.0f", t ? 100 * (t - idle) / t : 0 }'
}
BUSY_BEFORE=$(cpu_busy_pct)
if ((BUSY_BEFORE > 15)); then
	note "the machine was ${BUSY_BEFORE}% busy (all cores) in the second before the run started: other processes compete for the CPU, figures are noisier and lower than on a quiet machine"
fi

# ---------------------------------------------------------------- registries
read -r PORT_A PORT_B PORT_NGINX PORT_RM PORT_RM_ADMIN <<<"$(free_ports 5)"
mkdir -p "$LAB/blobs"

start_registry() { # start_registry NAME PORT -> sets REG_PID
	local name=$1 port=$2 dir=$LAB/$1
	mkdir -p "$dir/storage"
	cat >"$dir/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $dir/storage}
  cache: {blobdescriptor: inmemory}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
EOF
	docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
	REG_PID=$!
	PIDS+=("$REG_PID")
}
log "lab $LAB; starting docker-registry A on :$PORT_A and B on :$PORT_B"
start_registry reg-a "$PORT_A"
PID_A=$REG_PID
start_registry reg-b "$PORT_B"
PID_B=$REG_PID
wait_http "http://127.0.0.1:$PORT_A/v2/" "$PID_A" "docker-registry A" || die "docker-registry A did not start: $(tail -5 "$LAB/reg-a/registry.log")"
wait_http "http://127.0.0.1:$PORT_B/v2/" "$PID_B" "docker-registry B" || die "docker-registry B did not start: $(tail -5 "$LAB/reg-b/registry.log")"

# push_file PORT FILE [MEDIA...]: monolithic upload (POST -> Location, PUT ?digest=); prints the hex digest
push_file() {
	local port=$1 file=$2 hex loc sep code
	hex=$(sha256_stdin <"$file")
	loc=$(curl -sS -f -X POST -D - -o /dev/null "http://127.0.0.1:$port/v2/$REPO/blobs/uploads/" |
		tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }') || die "upload POST to :$port failed"
	[[ -n $loc ]] || die "upload POST to :$port gave no Location"
	[[ $loc == http* ]] || loc="http://127.0.0.1:$port$loc"
	if [[ $loc == *\?* ]]; then sep='&'; else sep='?'; fi
	code=$(curl -sS -o "$LAB/push.out" -w '%{http_code}' -X PUT -H 'Expect:' \
		-H 'Content-Type: application/octet-stream' --upload-file "$file" "$loc${sep}digest=sha256:$hex") || true
	[[ $code == 201 ]] || die "blob PUT to :$port answered $code: $(head -c 300 "$LAB/push.out")"
	echo "$hex"
}
# gen_push PORT SIZE: random blob of SIZE bytes, pushed; prints its hex digest
gen_push() {
	local f=$LAB/blobs/tmp hex
	head -c "$2" /dev/urandom >"$f"
	hex=$(push_file "$1" "$f")
	rm -f "$f"
	echo "$hex"
}

log "generating and pushing content: $(human "$BIG_SIZE"), $CONC_N x $(human "$CONC_SIZE"), $(human "$MEM_SIZE"), 2 x $SMALL_N x $(human "$SMALL_SIZE")"
BIG=$(gen_push "$PORT_A" "$BIG_SIZE")
CONC=()
for ((i = 0; i < CONC_N; i++)); do
	d=$(gen_push "$PORT_A" "$CONC_SIZE")
	CONC+=("$d")
done
MEMB=$(gen_push "$PORT_A" "$MEM_SIZE")
SMALL_A=() SMALL_B=()
for ((i = 0; i < SMALL_N; i++)); do
	d=$(gen_push "$PORT_A" "$SMALL_SIZE")
	SMALL_A+=("$d")
	d=$(gen_push "$PORT_B" "$SMALL_SIZE") # only B holds these
	SMALL_B+=("$d")
done
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$LAB/blobs/config.json"
CFG=$(push_file "$PORT_A" "$LAB/blobs/config.json")
CFG_SIZE=$(wc -c <"$LAB/blobs/config.json")
{
	printf '{"schemaVersion":2,"mediaType":"%s",' "$OCI_MANIFEST"
	printf '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[' "$CFG" "$CFG_SIZE"
	sep=""
	for d in "$BIG" "${CONC[@]}" "$MEMB"; do
		if [[ $d == "$BIG" ]]; then s=$BIG_SIZE; elif [[ $d == "$MEMB" ]]; then s=$MEM_SIZE; else s=$CONC_SIZE; fi
		printf '%s{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}' "$sep" "$d" "$s"
		sep=,
	done
	printf ']}'
} >"$LAB/blobs/manifest.json"
MANIFEST=$(sha256_stdin <"$LAB/blobs/manifest.json")
code=$(curl -sS -o "$LAB/push.out" -w '%{http_code}' -X PUT -H "Content-Type: $OCI_MANIFEST" \
	--data-binary "@$LAB/blobs/manifest.json" "http://127.0.0.1:$PORT_A/v2/$REPO/manifests/v1") || true
[[ $code == 201 ]] || die "manifest PUT answered $code: $(head -c 300 "$LAB/push.out")"
log "content ready (manifest sha256:$MANIFEST, $(wc -c <"$LAB/blobs/manifest.json") bytes)"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT_A/v2/$REPO/blobs/sha256:${SMALL_B[0]}") || true
[[ $code == 404 ]] || die "registry A should lack the B-only blobs, but answered $code"

# ---------------------------------------------------------------- nginx
start_nginx() {
	local d=$LAB/nginx user_line="" buffer_lines=""
	mkdir -p "$d/tmp"
	if ((EUID == 0)); then user_line="user $(id -un) $(id -gn);"; fi # run workers as the current user
	if [[ -n $NGINX_BUFFER ]]; then
		buffer_lines="proxy_buffer_size $NGINX_BUFFER; proxy_buffers 4 $NGINX_BUFFER; proxy_busy_buffers_size $((2 * ${NGINX_BUFFER%k}))k;"
	fi
	cat >"$d/nginx.conf" <<EOF
$user_line
worker_processes $NGINX_WORKERS;
worker_rlimit_nofile 16384;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    access_log $d/access.log;
    client_body_temp_path $d/tmp/client;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    upstream registry_a {
        server 127.0.0.1:$PORT_A;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$PORT_NGINX;
        location / {
            proxy_pass http://registry_a;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            $buffer_lines
        }
    }
}
EOF
	nginx -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" >"$d/stdout.log" 2>&1 &
	NGINX_PID=$!
	PIDS+=("$NGINX_PID")
	wait_http "http://127.0.0.1:$PORT_NGINX/v2/" "$NGINX_PID" nginx || die "nginx did not start: $(tail -5 "$d/error.log")"
	mapfile -t NGINX_WORKER_PIDS < <(pgrep -P "$NGINX_PID")
	((${#NGINX_WORKER_PIDS[@]})) || die "nginx has no worker processes"
	PIDS+=("${NGINX_WORKER_PIDS[@]}")
}
log "starting nginx on :$PORT_NGINX (worker_processes $NGINX_WORKERS)"
start_nginx
sleep 0.5
nginx_rss=0
for p in "${NGINX_WORKER_PIDS[@]}"; do nginx_rss=$((nginx_rss + $(proc_kib "$p" VmRSS))); done
add nginx_rss_idle "$(calc "$nginx_rss / 1024")"

# ---------------------------------------------------------------- the bound: a bare TCP relay
# examples/relay.rs: blocking sockets, 256 KiB buffer, no HTTP; with --sha256 it also hashes what it
# passes; with --splice it moves the bytes with splice(2), never into user space (the zero-copy bound,
# out of reach for a proxy that verifies what it passes). Measurement 1 runs all three beside regmux.
# Built with the profile of the regmux binary measured (CI's quick run uses the debug build: a release
# build of the whole crate for it would cost minutes).
RELAY_PROFILE=release
if [[ $REGMUX == */target/debug/* ]]; then RELAY_PROFILE=debug; fi
RELAY_BIN=$REPO_DIR/target/$RELAY_PROFILE/examples/relay
PORT_RELAY="" PORT_RELAY_SHA="" PORT_RELAY_SPLICE=""
start_relay() { # start_relay [--sha256] -> echoes the port; the pid goes to RELAY_PIDS via $LAB/relay.pid
	local out=$LAB/relay${1:-}.port
	"$RELAY_BIN" "127.0.0.1:$PORT_A" "$@" >"$out" 2>"$LAB/relay${1:-}.log" &
	echo $! >"$LAB/relay${1:-}.pid"
	for _ in $(seq 50); do [[ -s $out ]] && break; sleep 0.1; done
}
if want 1; then
	if [[ ! -x $RELAY_BIN || $REPO_DIR/examples/relay.rs -nt $RELAY_BIN ]]; then
		log "building examples/relay.rs ($RELAY_PROFILE)"
		profile_flag=()
		[[ $RELAY_PROFILE == release ]] && profile_flag=(--release)
		(cd "$REPO_DIR" && cargo build --locked "${profile_flag[@]}" --quiet --example relay) >"$LAB/relay-build.log" 2>&1 ||
			note "examples/relay.rs did not build (bound rows left out): $(tail -3 "$LAB/relay-build.log" | tr '\n' ' ')"
	fi
	if [[ -x $RELAY_BIN ]]; then
		start_relay && PORT_RELAY=$(cat "$LAB/relay.port") && RELAY_PID=$(cat "$LAB/relay.pid")
		start_relay --sha256 && PORT_RELAY_SHA=$(cat "$LAB/relay--sha256.port") && RELAY_SHA_PID=$(cat "$LAB/relay--sha256.pid")
		start_relay --splice && PORT_RELAY_SPLICE=$(cat "$LAB/relay--splice.port") && RELAY_SPLICE_PID=$(cat "$LAB/relay--splice.pid")
		for p in "${RELAY_PID:-}" "${RELAY_SHA_PID:-}" "${RELAY_SPLICE_PID:-}"; do [[ -n $p ]] && PIDS+=("$p"); done
	fi
fi

# ---------------------------------------------------------------- regmux
DROP=() # config parts regmux rejected: admin, ledger, noverify
dropped() { [[ " ${DROP[*]} " == *" $1 "* ]]; }
write_regmux_config() { # write_regmux_config FILE PORT ADMIN_PORT LEDGER_PATH
	{
		printf '[server]\nlisten = "127.0.0.1:%s"\n' "$2"
		dropped admin || printf '\n[admin]\nlisten = "127.0.0.1:%s"\n' "$3"
		dropped ledger || printf '\n[ledger]\npath = "%s"\n' "$4"
		printf '\n[backends.a]\nurl = "http://127.0.0.1:%s"\n' "$PORT_A"
		printf '\n[backends.b]\nurl = "http://127.0.0.1:%s"\n' "$PORT_B"
		dropped noverify || printf '\n[backends.a-noverify]\nurl = "http://127.0.0.1:%s"\nverify_digests = false\n' "$PORT_A"
		printf '\n[[routes]]\nname = "bench"\ndefault = true\nbackends = ["a", "b"]\n'
		dropped noverify || printf '\n[[routes]]\nname = "noverify"\nregistries = ["noverify.local"]\nbackends = ["a-noverify"]\n'
	} >"$1"
}
RM_PID="" RM_N=0 REGMUX_ORIG="" RM_MAIN_LOG=""
# start_regmux PORT ADMIN_PORT -> RM_STARTED_PID (a fresh instance with its own config, ledger and log)
start_regmux() {
	RM_N=$((RM_N + 1))
	local cfg=$LAB/regmux-$RM_N.toml
	write_regmux_config "$cfg" "$1" "$2" "$LAB/ledger-$RM_N.db"
	"$REGMUX" serve --config "$cfg" >"$LAB/regmux-$RM_N.log" 2>&1 &
	RM_STARTED_PID=$!
	PIDS+=("$RM_STARTED_PID")
	RM_LOG=$LAB/regmux-$RM_N.log
	if ! wait_http "http://127.0.0.1:$1/v2/" "$RM_STARTED_PID" regmux 15; then
		stop_pid "$RM_STARTED_PID"
		return 1
	fi
}
# main instance; if regmux rejects [admin], [ledger] or verify_digests, drop it and say so
start_main_regmux() {
	local combo first_log=""
	for combo in "" admin ledger noverify "admin ledger" "admin noverify" "ledger noverify" "admin ledger noverify"; do
		read -ra DROP <<<"$combo"
		if start_regmux "$PORT_RM" "$PORT_RM_ADMIN"; then
			RM_PID=$RM_STARTED_PID RM_MAIN_LOG=$RM_LOG
			if [[ -n $combo ]]; then
				note "regmux did not start with the full bench config; it started without: ${combo// /, } (verify_digests = false route: $(dropped noverify && echo dropped || echo kept)). First error: $(tail -3 "$first_log" | tr '\n' ' ')"
			fi
			return 0
		fi
		[[ -n $first_log ]] || first_log=$RM_LOG
	done
	DROP=()
	return 1
}
ensure_regmux() { # restart the main instance if it died (and record that as a failure)
	[[ -n $REGMUX ]] || return 1
	if [[ -n $RM_PID ]] && kill -0 "$RM_PID" 2>/dev/null; then return 0; fi
	if [[ -n $RM_PID ]]; then
		wait "$RM_PID" 2>/dev/null && rc=0 || rc=$?
		fail "regmux (pid $RM_PID) died (exit status $rc) before '$1'; log tail: $(tail -3 "$RM_MAIN_LOG" | cut -c1-200 | tr '\n' ' ')"
		RM_PID=""
	fi
	start_regmux "$PORT_RM" "$PORT_RM_ADMIN" || { fail "regmux could not be restarted: $(tail -5 "$RM_LOG" | tr '\n' ' ')"; return 1; }
	RM_PID=$RM_STARTED_PID RM_MAIN_LOG=$RM_LOG
}
check_regmux() { if [[ -n $REGMUX ]]; then ensure_regmux "$1" || true; fi; }
RM_VERSION="n/a"
if [[ -n $REGMUX ]]; then
	# measure one fixed binary even if a build replaces the original meanwhile
	cp "$REGMUX" "$LAB/regmux" && REGMUX_ORIG=$REGMUX && REGMUX=$LAB/regmux
	RM_VERSION=$("$REGMUX" --version 2>&1 | head -1) || RM_VERSION="unknown ('regmux --version' failed: $RM_VERSION)"
	log "starting regmux on :$PORT_RM ($REGMUX)"
	if ! start_main_regmux; then
		fail "regmux did not start (no 200 on GET /v2/); log of the first attempt: $(tail -5 "$LAB/regmux-1.log" | tr '\n' ' ')"
		REGMUX=""
	fi
fi

# ---------------------------------------------------------------- request helpers
url() { # url TARGET: URL prefix of the repository through TARGET
	case $1 in
	direct | a) echo "http://127.0.0.1:$PORT_A/v2/$REPO" ;;
	b) echo "http://127.0.0.1:$PORT_B/v2/$REPO" ;;
	nginx) echo "http://127.0.0.1:$PORT_NGINX/v2/$REPO" ;;
	regmux) echo "http://127.0.0.1:$PORT_RM/v2/$REPO" ;;
	noverify) echo "http://127.0.0.1:$PORT_RM/v2/noverify.local/$REPO" ;;
	relay) echo "http://127.0.0.1:$PORT_RELAY/v2/$REPO" ;;
	relaysha) echo "http://127.0.0.1:$PORT_RELAY_SHA/v2/$REPO" ;;
	relaysplice) echo "http://127.0.0.1:$PORT_RELAY_SPLICE/v2/$REPO" ;;
	esac
}
targets() { # targets LIST...: those of the given targets that are available (no side effects)
	local t
	for t; do
		case $t in
		regmux | noverify)
			[[ -n $REGMUX ]] || continue
			[[ -n $RM_PID ]] || continue
			if [[ $t == noverify ]] && dropped noverify; then continue; fi
			;;
		relay) [[ -n $PORT_RELAY ]] || continue ;;
		relaysha) [[ -n $PORT_RELAY_SHA ]] || continue ;;
		relaysplice) [[ -n $PORT_RELAY_SPLICE ]] || continue ;;
		esac
		echo "$t"
	done
}
# verify URL HEX SIZE [ACCEPT]: one GET whose bytes must hash to HEX (not timed)
verify() {
	local url=$1 hex=$2 size=$3 accept=${4:-*/*} got meta rc
	got=$(
		if curl -sS --max-time 900 -H "Accept: $accept" -w '%{stderr}%{http_code} %{size_download}\n' "$url" 2>"$LAB/verify.err"; then
			echo 0 >"$LAB/verify.rc"
		else
			echo $? >"$LAB/verify.rc"
		fi | sha256_stdin
	)
	rc=$(cat "$LAB/verify.rc")
	meta=$(tail -1 "$LAB/verify.err")
	if ((rc != 0)) || [[ $meta != "200 $size" || $got != "$hex" ]]; then
		fail "GET $url (Accept: $accept) -> curl exit $rc, HTTP/bytes '$meta' (want '200 $size'), sha256 $got (want $hex); $(head -1 "$LAB/verify.err")"
		return 1
	fi
}
# timed_get URL SIZE: sets T_SECS (curl's time_total), or records a failure
timed_get() {
	local out rc=0
	out=$(curl -sS -o /dev/null --max-time 900 -w '%{http_code} %{size_download} %{time_total}' "$1" 2>"$LAB/get.err") || rc=$?
	if ((rc != 0)) || [[ ${out% *} != "200 $2" ]]; then
		fail "GET $1 -> curl exit $rc, HTTP/bytes '${out% *}' (want '200 $2'); $(head -1 "$LAB/get.err")"
		return 1
	fi
	T_SECS=${out##* }
}
# wrk_run NAME URL [wrk args...]: sets W_RPS W_P50 W_P99 (ms); fails on non-2xx answers
wrk_run() {
	local name=$1 url=$2 out=$LAB/wrk-$1.out
	shift 2
	if ! wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_SECS}s" --latency "$@" "$url" >"$out" 2>&1; then
		fail "wrk $name $url failed: $(tail -3 "$out" | tr '\n' ' ')"
		return 1
	fi
	read -r W_RPS W_P50 W_P99 W_REQS W_NON2XX W_SOCK <<<"$(awk '
		function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0;
			if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v + 0 }
		/Requests\/sec:/ { rps = $2 }
		$1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
		/ requests in / { reqs = $1 }
		/Non-2xx or 3xx responses:/ { bad = $NF }
		/Socket errors:/ { gsub(/,/, ""); sock = $4 + $6 + $8 + $10 }
		END { printf "%s %s %s %s %d %d\n", rps, p50, p99, reqs, bad, sock }' "$out")"
	if [[ -z $W_RPS || $W_REQS == 0 ]]; then
		fail "wrk $name $url: no requests completed: $(tail -5 "$out" | tr '\n' ' ')"
		return 1
	fi
	if ((W_NON2XX > 0)); then
		fail "wrk $name $url: $W_NON2XX of $W_REQS answers were not 2xx/3xx"
		return 1
	fi
	if ((W_SOCK > 0)); then note "wrk $name: $W_SOCK socket errors (connect/read/write/timeout) in $W_REQS requests"; fi
}
lua_paths() { # lua_paths FILE PATH...: wrk script cycling through the paths
	local f=$1 p
	shift
	{
		echo "local paths = {"
		for p; do printf '  "%s",\n' "$p"; done
		cat <<'LUA'
}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format(nil, paths[i])
end
LUA
	} >"$f"
}

# ---------------------------------------------------------------- 1. one big blob
if want 1; then
	log "1. one $(human "$BIG_SIZE") blob: direct / nginx / regmux / regmux verify_digests=false, $RUNS runs"
	check_regmux "1. big blob"
	mapfile -t T1 < <(targets direct nginx regmux noverify relay relaysha relaysplice)
	for t in "${T1[@]}"; do verify "$(url "$t")/blobs/sha256:$BIG" "$BIG" "$BIG_SIZE" || true; done
	for ((r = 1; r <= RUNS; r++)); do
		check_regmux "1. big blob, run $r"
		mapfile -t T1 < <(targets direct nginx regmux noverify relay relaysha relaysplice)
		declare -A thr=()
		for t in "${T1[@]}"; do
			case $t in
			direct) cpids=("$PID_A") ;;
			nginx) cpids=("${NGINX_WORKER_PIDS[@]}") ;;
			relay) cpids=("$RELAY_PID") ;;
			relaysha) cpids=("$RELAY_SHA_PID") ;;
			relaysplice) cpids=("$RELAY_SPLICE_PID") ;;
			*) cpids=("$RM_PID") ;;
			esac
			c0=$(cpu_ticks "${cpids[@]}")
			timed_get "$(url "$t")/blobs/sha256:$BIG" "$BIG_SIZE" || continue
			c1=$(cpu_ticks "${cpids[@]}")
			thr[$t]=$(calc "$BIG_SIZE / $MiB / $T_SECS")
			add "big_$t" "${thr[$t]}"
			add "big_cpu_$t" "$(calc "($c1 - $c0) / $CLK_TCK / ($BIG_SIZE / $GiB)")"
			log "   run $r $t: $(printf %.0f "${thr[$t]}") MiB/s"
		done
		[[ -n ${thr[direct]:-} && -n ${thr[nginx]:-} ]] && add big_nginx_direct "$(calc "${thr[nginx]} / ${thr[direct]}")"
		[[ -n ${thr[regmux]:-} && -n ${thr[nginx]:-} ]] && add big_regmux_nginx "$(calc "${thr[regmux]} / ${thr[nginx]}")"
		[[ -n ${thr[regmux]:-} && -n ${thr[direct]:-} ]] && add big_regmux_direct "$(calc "${thr[regmux]} / ${thr[direct]}")"
		[[ -n ${thr[noverify]:-} && -n ${thr[direct]:-} ]] && add big_noverify_direct "$(calc "${thr[noverify]} / ${thr[direct]}")"
		[[ -n ${thr[relay]:-} && -n ${thr[direct]:-} ]] && add big_relay_direct "$(calc "${thr[relay]} / ${thr[direct]}")"
		[[ -n ${thr[relaysha]:-} && -n ${thr[direct]:-} ]] && add big_relaysha_direct "$(calc "${thr[relaysha]} / ${thr[direct]}")"
		[[ -n ${thr[relaysplice]:-} && -n ${thr[direct]:-} ]] && add big_relaysplice_direct "$(calc "${thr[relaysplice]} / ${thr[direct]}")"
		unset thr
	done
fi

# ---------------------------------------------------------------- 2. concurrent blobs
if want 2; then
	log "2. $CONC_N concurrent $(human "$CONC_SIZE") blobs: direct / nginx / regmux, $RUNS runs"
	check_regmux "2. concurrent"
	mapfile -t T2 < <(targets direct nginx regmux)
	for t in "${T2[@]}"; do
		for d in "${CONC[@]}"; do verify "$(url "$t")/blobs/sha256:$d" "$d" "$CONC_SIZE" || true; done
	done
	for ((r = 1; r <= RUNS; r++)); do
		check_regmux "2. concurrent, run $r"
		mapfile -t T2 < <(targets direct nginx regmux)
		declare -A agg=()
		for t in "${T2[@]}"; do
			cpids=()
			start=$EPOCHREALTIME
			for ((i = 0; i < CONC_N; i++)); do
				curl -sS -o /dev/null --max-time 900 -w '%{http_code} %{size_download}' \
					"$(url "$t")/blobs/sha256:${CONC[i]}" >"$LAB/conc-$i.out" 2>"$LAB/conc-$i.err" &
				cpids+=($!)
			done
			ok=1
			for ((i = 0; i < CONC_N; i++)); do
				rc=0
				wait "${cpids[i]}" || rc=$?
				if ((rc != 0)) || [[ $(cat "$LAB/conc-$i.out") != "200 $CONC_SIZE" ]]; then
					fail "concurrent GET $(url "$t")/blobs/sha256:${CONC[i]} -> curl exit $rc, HTTP/bytes '$(cat "$LAB/conc-$i.out")' (want '200 $CONC_SIZE'); $(head -1 "$LAB/conc-$i.err")"
					ok=0
				fi
			done
			end=$EPOCHREALTIME
			((ok)) || continue
			agg[$t]=$(calc "$CONC_N * $CONC_SIZE / $MiB / ($end - $start)")
			add "conc_$t" "${agg[$t]}"
			log "   run $r $t: $(printf %.0f "${agg[$t]}") MiB/s aggregate"
		done
		[[ -n ${agg[regmux]:-} && -n ${agg[nginx]:-} ]] && add conc_regmux_nginx "$(calc "${agg[regmux]} / ${agg[nginx]}")"
		[[ -n ${agg[nginx]:-} && -n ${agg[direct]:-} ]] && add conc_nginx_direct "$(calc "${agg[nginx]} / ${agg[direct]}")"
		[[ -n ${agg[regmux]:-} && -n ${agg[direct]:-} ]] && add conc_regmux_direct "$(calc "${agg[regmux]} / ${agg[direct]}")"
		unset agg
	done
fi

# ---------------------------------------------------------------- 3. manifests by digest
if want 3; then
	log "3. manifest GET by digest, wrk -t$WRK_THREADS -c$WRK_CONNS -d${WRK_SECS}s: direct / nginx / regmux, $RUNS runs"
	MSIZE=$(wc -c <"$LAB/blobs/manifest.json")
	check_regmux "3. manifests"
	mapfile -t T3 < <(targets direct nginx regmux)
	for t in "${T3[@]}"; do
		verify "$(url "$t")/manifests/sha256:$MANIFEST" "$MANIFEST" "$MSIZE" "$OCI_MANIFEST" || true
		WRK_SECS=1 wrk_run "warm-$t" "$(url "$t")/manifests/sha256:$MANIFEST" -H "Accept: $OCI_MANIFEST" || true
	done
	for ((r = 1; r <= RUNS; r++)); do
		check_regmux "3. manifests, run $r"
		mapfile -t T3 < <(targets direct nginx regmux)
		declare -A rps=() p50=() p99=()
		for t in "${T3[@]}"; do
			wrk_run "manifest-$t" "$(url "$t")/manifests/sha256:$MANIFEST" -H "Accept: $OCI_MANIFEST" || continue
			rps[$t]=$W_RPS p50[$t]=$W_P50 p99[$t]=$W_P99
			add "man_rps_$t" "$W_RPS"
			add "man_p50_$t" "$W_P50"
			add "man_p99_$t" "$W_P99"
			log "   run $r $t: $W_RPS req/s, p50 $W_P50 ms, p99 $W_P99 ms"
		done
		for t in nginx regmux; do
			[[ -n ${rps[$t]:-} && -n ${rps[direct]:-} ]] || continue
			add "man_${t}_direct" "$(calc "${rps[$t]} / ${rps[direct]}")"
			add "man_${t}_p50_added" "$(calc "${p50[$t]} - ${p50[direct]}")"
			add "man_${t}_p99_added" "$(calc "${p99[$t]} - ${p99[direct]}")"
		done
		unset rps p50 p99
	done
fi

# ---------------------------------------------------------------- 4. fallback to the second backend
if want 4; then
	log "4. fallback: $SMALL_N B-only vs $SMALL_N A $(human "$SMALL_SIZE") blobs, wrk -c$WRK_CONNS -d${WRK_SECS}s, $RUNS runs"
	paths_a=() paths_b=()
	for d in "${SMALL_A[@]}"; do paths_a+=("/v2/$REPO/blobs/sha256:$d"); done
	for d in "${SMALL_B[@]}"; do paths_b+=("/v2/$REPO/blobs/sha256:$d"); done
	lua_paths "$LAB/small-a.lua" "${paths_a[@]}"
	lua_paths "$LAB/small-b.lua" "${paths_b[@]}"
	for d in "${SMALL_A[@]}"; do verify "$(url a)/blobs/sha256:$d" "$d" "$SMALL_SIZE" || true; done
	for d in "${SMALL_B[@]}"; do verify "$(url b)/blobs/sha256:$d" "$d" "$SMALL_SIZE" || true; done
	check_regmux "4. fallback"
	if [[ -n $(targets regmux) ]]; then
		for d in "${SMALL_A[@]}" "${SMALL_B[@]}"; do verify "$(url regmux)/blobs/sha256:$d" "$d" "$SMALL_SIZE" || true; done
	fi
	for ((r = 1; r <= RUNS; r++)); do
		check_regmux "4. fallback, run $r"
		declare -A rps=()
		for pair in "direct-a a small-a" "direct-b b small-b" "regmux-a regmux small-a" "regmux-b regmux small-b"; do
			read -r name t script <<<"$pair"
			[[ -n $(targets "$t") ]] || continue
			base=$(url "$t")
			wrk_run "$name" "${base%%/v2/*}" -s "$LAB/$script.lua" || continue
			rps[$name]=$W_RPS
			add "fb_$name" "$W_RPS"
			log "   run $r $name: $W_RPS req/s"
		done
		[[ -n ${rps[direct-a]:-} && -n ${rps[direct-b]:-} ]] && add fb_direct_cost "$(calc "${rps[direct-a]} / ${rps[direct-b]}")"
		[[ -n ${rps[regmux-a]:-} && -n ${rps[regmux-b]:-} ]] && add fb_regmux_cost "$(calc "${rps[regmux-a]} / ${rps[regmux-b]}")"
		[[ -n ${rps[regmux-a]:-} && -n ${rps[direct-a]:-} ]] && add fb_regmux_direct "$(calc "${rps[regmux-a]} / ${rps[direct-a]}")"
		unset rps
	done
fi

# ---------------------------------------------------------------- 5. memory under many clients
# mem_clients URL: MEM_CLIENTS curls at once on the MEM blob, half rate-limited; fails on any bad download
mem_clients() {
	local url=$1 i rc bad=0 first="" pids=() lim
	for ((i = 0; i < MEM_CLIENTS; i++)); do
		lim=()
		((i % 2)) && lim=(--limit-rate "$SLOW_RATE")
		curl -sS -o /dev/null --max-time 900 "${lim[@]}" -w '%{http_code} %{size_download}' "$url" \
			>"$LAB/mem-$i.out" 2>"$LAB/mem-$i.err" &
		pids+=($!)
	done
	for ((i = 0; i < MEM_CLIENTS; i++)); do
		rc=0
		wait "${pids[i]}" || rc=$?
		if ((rc != 0)) || [[ $(cat "$LAB/mem-$i.out") != "200 $MEM_SIZE" ]]; then
			bad=$((bad + 1))
			[[ -n $first ]] || first="curl exit $rc, HTTP/bytes '$(cat "$LAB/mem-$i.out")' (want '200 $MEM_SIZE') $(head -1 "$LAB/mem-$i.err")"
		fi
	done
	if ((bad)); then
		fail "memory test: $bad of $MEM_CLIENTS concurrent GETs of $url went wrong; first: $first"
		return 1
	fi
}
if want 5; then
	log "5. memory: $MEM_CLIENTS clients x $(human "$MEM_SIZE") ($((MEM_CLIENTS / 2)) at $SLOW_RATE/s), $MEM_RUNS runs"
	verify "$(url nginx)/blobs/sha256:$MEMB" "$MEMB" "$MEM_SIZE" || true
	for ((r = 1; r <= MEM_RUNS; r++)); do
		# nginx: reset the workers' peak RSS (clear_refs 5), then read VmHWM
		for p in "${NGINX_WORKER_PIDS[@]}"; do echo 5 >"/proc/$p/clear_refs"; done
		if mem_clients "$(url nginx)/blobs/sha256:$MEMB"; then
			hwm=0
			for p in "${NGINX_WORKER_PIDS[@]}"; do hwm=$((hwm + $(proc_kib "$p" VmHWM))); done
			add mem_peak_nginx "$(calc "$hwm / 1024")"
			log "   run $r nginx: peak $(calc "$hwm / 1024" | xargs printf %.1f) MiB"
		fi
		# regmux: a fresh instance per run, so that VmHWM is this test's peak
		[[ -n $REGMUX ]] || continue
		read -r mp ma <<<"$(free_ports 2)"
		if ! start_regmux "$mp" "$ma"; then
			fail "memory test: regmux instance did not start: $(tail -5 "$RM_LOG" | tr '\n' ' ')"
			continue
		fi
		mpid=$RM_STARTED_PID
		((r > 1)) || verify "http://127.0.0.1:$mp/v2/$REPO/blobs/sha256:$MEMB" "$MEMB" "$MEM_SIZE" || true
		if mem_clients "http://127.0.0.1:$mp/v2/$REPO/blobs/sha256:$MEMB"; then
			if kill -0 "$mpid" 2>/dev/null; then
				hwm=$(proc_kib "$mpid" VmHWM)
				add mem_peak_regmux "$(calc "$hwm / 1024")"
				log "   run $r regmux: peak $(calc "$hwm / 1024" | xargs printf %.1f) MiB"
			else
				fail "memory test: regmux died under $MEM_CLIENTS clients; log: $(tail -5 "$RM_LOG" | tr '\n' ' ')"
			fi
		fi
		stop_pid "$mpid"
	done
fi

# ---------------------------------------------------------------- 6. startup (+ idle RSS)
if want 6 || want 5; then
	if [[ -n $REGMUX ]]; then
		log "6. startup to first 200 on GET /v2/ and idle RSS, $STARTUP_RUNS runs"
		for ((r = 1; r <= STARTUP_RUNS; r++)); do
			read -r sp sa <<<"$(free_ports 2)"
			RM_N=$((RM_N + 1))
			write_regmux_config "$LAB/regmux-$RM_N.toml" "$sp" "$sa" "$LAB/ledger-$RM_N.db"
			if out=$(python3 "$BENCH_DIR/startup.py" "$REGMUX" "$LAB/regmux-$RM_N.toml" 127.0.0.1 "$sp" \
				"$LAB/regmux-$RM_N.log" 1 2>"$LAB/startup.err"); then
				read -r ms rss _ <<<"$out"
				add startup_ms "$ms"
				add rss_idle "$(calc "$rss / 1024")"
				log "   run $r: ${ms} ms, idle RSS $(calc "$rss / 1024" | xargs printf %.1f) MiB"
			else
				fail "startup run $r: $(cat "$LAB/startup.err") $(tail -3 "$LAB/regmux-$RM_N.log" | tr '\n' ' ')"
			fi
		done
	fi
fi

# ---------------------------------------------------------------- report
if [[ -n $RM_PID ]] && ! kill -0 "$RM_PID" 2>/dev/null; then
	wait "$RM_PID" 2>/dev/null && rc=0 || rc=$?
	fail "the main regmux instance (pid $RM_PID) was gone at the end (exit status $rc); log tail: $(tail -3 "$RM_MAIN_LOG" | cut -c1-200 | tr '\n' ' ')"
	RM_PID=""
fi
BUSY_AFTER=$(cpu_busy_pct) # our processes are idle now: anything busy is someone else
if ((BUSY_AFTER > 15)); then
	note "the machine was ${BUSY_AFTER}% busy (all cores) right after the measurements, with the harness idle: something else was running"
fi
if [[ -n $RM_PID ]] && kill -0 "$RM_PID" 2>/dev/null; then
	note "RSS of the main regmux instance after all measurements: $(calc "$(proc_kib "$RM_PID" VmRSS) / 1024" | xargs printf %.1f) MiB (its peak: $(calc "$(proc_kib "$RM_PID" VmHWM) / 1024" | xargs printf %.1f) MiB)"
fi
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
reg_version=$(docker-registry --version 2>&1 | head -1)
nginx_version=$(nginx -v 2>&1 | head -1)
curl_version=$(curl --version | head -1 | cut -d' ' -f1-2)
wrk_version=$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2) || true
git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null) || git_rev="none"
B=$(human "$BIG_SIZE") C="$CONC_N × $(human "$CONC_SIZE")" M=$(human "$MEM_SIZE")
dash="—"
report() {
	echo "# regmux benchmark ($( ((QUICK)) && echo quick || echo full) mode, $(date -u '+%Y-%m-%d %H:%M UTC'))"
	echo
	echo "- machine: $(nproc) cores ($cpu_model), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r); client, proxy and registries share the cores"
	echo "- regmux: $RM_VERSION (git $git_rev${REGMUX_ORIG:+, $REGMUX_ORIG})"
	echo "- tools: $reg_version; $nginx_version (worker_processes $NGINX_WORKERS, proxy_buffering off, upstream keepalive 32, proxy_buffer_size ${NGINX_BUFFER:-default}); $curl_version; $wrk_version; Python $(python3 -c 'import platform; print(platform.python_version())')"
	echo "- each cell: median (min–max) of $RUNS runs (memory peak: $MEM_RUNS, startup: $STARTUP_RUNS); ratios are computed per run, then summarised; whole run took $(awk -v s="$RUN_START" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.0f", e - s }') s"
	echo
	echo "| # | measurement | direct | nginx | regmux | ratio | target | met? |"
	echo "|---|---|---|---|---|---|---|---|"
	if want 1; then
		echo "| 1 | $B blob, MiB/s, verify on — regmux ÷ nginx | $(cell %.0f big_direct) | $(cell %.0f big_nginx) | $(cell %.0f big_regmux) | $(cell %.2f big_regmux_nginx) | ≥ 1.3 | $(met ge 1.3 big_regmux_nginx) |"
		echo "| 1 | $B blob, verify on — regmux ÷ direct (≥ 1.3 × the issue's nginx figure 0.53) | | | | $(cell %.2f big_regmux_direct) | ≥ 0.69 | $(met ge 0.69 big_regmux_direct) |"
		echo "| 1 | $B blob — nginx ÷ direct (reference) | | | | $(cell %.2f big_nginx_direct) | ≈ 0.53 | $dash |"
		echo "| 1 | CPU user+sys, s per GiB (that process only), verify on | $(cell %.2f big_cpu_direct) | $(cell %.2f big_cpu_nginx) | $(cell %.2f big_cpu_regmux) | | ≤ 0.8 | $(met le 0.8 big_cpu_regmux) |"
		echo "| 1 | $B blob, MiB/s, \`verify_digests = false\` — regmux ÷ direct | $(cell %.0f big_direct) | | $(cell %.0f big_noverify) | $(cell %.2f big_noverify_direct) | ≥ 0.85 | $(met ge 0.85 big_noverify_direct) |"
		echo "| 1 | CPU user+sys, s per GiB, \`verify_digests = false\` | | | $(cell %.2f big_cpu_noverify) | | $dash | $dash |"
		if [[ -n ${V[big_relay]:-} ]]; then
			echo "| 1 | bound: bare TCP relay, no HTTP (\`examples/relay.rs\`) — MiB/s $(cell %.0f big_relay), CPU $(cell %.2f big_cpu_relay) s/GiB; ÷ direct | | | | $(cell %.2f big_relay_direct) | $dash | $dash |"
			echo "| 1 | bound: the same relay hashing with SHA-256 — MiB/s $(cell %.0f big_relaysha), CPU $(cell %.2f big_cpu_relaysha) s/GiB; ÷ direct | | | | $(cell %.2f big_relaysha_direct) | $dash | $dash |"
			echo "| 1 | bound: the same relay with splice(2), zero-copy, no verification possible — MiB/s $(cell %.0f big_relaysplice), CPU $(cell %.2f big_cpu_relaysplice) s/GiB; ÷ direct | | | | $(cell %.2f big_relaysplice_direct) | $dash | $dash |"
		fi
	fi
	if want 2; then
		echo "| 2 | $C concurrent, aggregate MiB/s — regmux ÷ nginx | $(cell %.0f conc_direct) | $(cell %.0f conc_nginx) | $(cell %.0f conc_regmux) | $(cell %.2f conc_regmux_nginx) | ≥ 1.3 | $(met ge 1.3 conc_regmux_nginx) |"
		echo "| 2 | $C concurrent — regmux ÷ direct (nginx ÷ direct: $(cell %.2f conc_nginx_direct)) | | | | $(cell %.2f conc_regmux_direct) | $dash | $dash |"
	fi
	if want 3; then
		echo "| 3 | manifest GET by digest, $WRK_CONNS conns, req/s — regmux ÷ direct | $(cell %.0f man_rps_direct) | $(cell %.0f man_rps_nginx) | $(cell %.0f man_rps_regmux) | $(cell %.2f man_regmux_direct) | ≥ 1.0 | $(met ge 1.0 man_regmux_direct) |"
		echo "| 3 | manifest latency p50, ms — added by regmux (nginx adds $(cell %+.3f man_nginx_p50_added)) | $(cell %.3f man_p50_direct) | $(cell %.3f man_p50_nginx) | $(cell %.3f man_p50_regmux) | $(cell %+.3f man_regmux_p50_added) | ≤ +0.2 | $(met le 0.2 man_regmux_p50_added) |"
		echo "| 3 | manifest latency p99, ms — added by regmux (nginx adds $(cell %+.3f man_nginx_p99_added)) | $(cell %.3f man_p99_direct) | $(cell %.3f man_p99_nginx) | $(cell %.3f man_p99_regmux) | $(cell %+.3f man_regmux_p99_added) | ≤ +1 | $(met le 1 man_regmux_p99_added) |"
	fi
	if want 4; then
		echo "| 4 | $(human "$SMALL_SIZE") blob req/s, first-backend hits (direct: registry A) — regmux ÷ direct | $(cell %.0f fb_direct-a) | | $(cell %.0f fb_regmux-a) | $(cell %.2f fb_regmux_direct) | $dash | $dash |"
		echo "| 4 | $(human "$SMALL_SIZE") blob req/s, B-only blobs (direct: registry B) — cost ÷ first-backend hits (direct: A÷B $(cell %.2f fb_direct_cost)) | $(cell %.0f fb_direct-b) | | $(cell %.0f fb_regmux-b) | $(cell %.2f fb_regmux_cost) | ≤ 1.1 | $(met le 1.1 fb_regmux_cost) |"
	fi
	if want 5; then
		echo "| 5 | RSS idle, MiB (nginx: workers) | | $(cell %.1f nginx_rss_idle) | $(cell %.1f rss_idle) | | ≤ 15 | $(met le 15 rss_idle) |"
		echo "| 5 | RSS peak, MiB, $MEM_CLIENTS clients × $M at once ($((MEM_CLIENTS / 2)) at $SLOW_RATE/s) | | $(cell %.1f mem_peak_nginx) | $(cell %.1f mem_peak_regmux) | | ≤ 64 | $(met le 64 mem_peak_regmux) |"
	fi
	if want 6; then
		echo "| 6 | startup: exec → first 200 on GET /v2/, ms | | | $(cell %.1f startup_ms) | | ≤ 50 | $(met le 50 startup_ms) |"
	fi
	if ((${#NOTES[@]})); then
		echo
		echo "Notes:"
		printf -- '- %s\n' "${NOTES[@]}"
	fi
	if ((${#FAILURES[@]})); then
		echo
		echo "FAILURES (something broke; figures above exclude the failed runs):"
		printf -- '- %s\n' "${FAILURES[@]}"
	fi
}
report | tee "${OUT:-/dev/null}"
if ((${#FAILURES[@]})); then
	log "${#FAILURES[@]} failure(s); see the report"
	exit 1
fi
log "done"
