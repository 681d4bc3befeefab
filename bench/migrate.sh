#!/usr/bin/env bash
# Migration benchmark: `regmux migrate --mode copy` against `skopeo sync`, same images, same machine.
#
# An "old" docker-registry 2.8.2 is filled with 12 repositories x 2 tags (Docker schema2, OCI and one
# two-platform OCI index; base layers shared between images, random bytes so nothing compresses).
# Then, for each tool and each run, a fresh empty target registry: the first copy (timed), a re-run
# against the filled target (timed), the requests each registry's access log saw, the target's storage,
# and a check that every repo:tag on the target has the old registry's manifest digest.
# Everything listens on 127.0.0.1 (ephemeral ports) inside a mktemp -d folder that is removed at the end.
#
#   bench/migrate.sh              full run (~400 MiB of images, 3 runs per tool)
#   bench/migrate.sh --quick      ~34 MiB, 1 run per tool
set -euo pipefail
shopt -s inherit_errexit

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)

usage() {
	cat <<EOF
usage: bench/migrate.sh [--quick] [--regmux PATH] [--runs N] [--concurrency N] [--out FILE.md] [--keep-lab]

  --quick            ~34 MiB of images instead of ~400 MiB, 1 run per tool instead of 3
  --regmux PATH      regmux binary (default: $REPO_DIR/target/release/regmux; when that is missing
                     or too old to have \`migrate --from\`, $REPO_DIR/target/debug/regmux, and the
                     report says so; when neither exists, \`cargo build\` makes the debug one)
  --runs N           runs per tool; the table shows median (min-max)
  --concurrency N    regmux migrate --concurrency (default 4)
  --out FILE.md      also write the report to FILE.md
  --keep-lab         keep the scratch folder (configs, access logs, tool output)
EOF
}

QUICK=0 REGMUX="" RUNS="" CONCURRENCY=4 OUT="" KEEP_LAB=0
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--regmux) REGMUX=${2:?--regmux needs a path}; shift ;;
	--regmux=*) REGMUX=${1#*=} ;;
	--runs) RUNS=${2:?--runs needs a number}; shift ;;
	--runs=*) RUNS=${1#*=} ;;
	--concurrency) CONCURRENCY=${2:?--concurrency needs a number}; shift ;;
	--concurrency=*) CONCURRENCY=${1#*=} ;;
	--out) OUT=${2:?--out needs a file}; shift ;;
	--out=*) OUT=${1#*=} ;;
	--keep-lab) KEEP_LAB=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 64 ;;
	esac
	shift
done
if [[ -z $RUNS ]]; then
	if ((QUICK)); then RUNS=1; else RUNS=3; fi
fi
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive number" >&2; exit 64; }
[[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || { echo "--concurrency must be a positive number" >&2; exit 64; }

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

for tool in docker-registry skopeo umoci curl jq ss awk sha256sum; do
	command -v "$tool" >/dev/null || die "$tool is not installed (Debian: docker-registry skopeo umoci curl jq iproute2)"
done

NOTES=()     # lines printed under the table
FAILURES=()  # anything that broke; makes the exit code 1

# ---------------------------------------------------------------- the regmux binary
# (no `| head` or `| grep -q` anywhere: with pipefail an early-closing reader fails the pipeline)
has_migrate_copy() { grep -q -- '--from <' <<<"$("$1" migrate --help 2>&1 || true)"; }
first_line() { awk 'NR == 1'; }
newer_sources() { { find "$REPO_DIR/src" "$REPO_DIR/Cargo.toml" "$REPO_DIR/Cargo.lock" -newer "$1" -type f 2>/dev/null || true; } | awk 'NR <= 3'; }
REGMUX_NOTE=""
if [[ -n $REGMUX ]]; then
	[[ -x $REGMUX ]] || die "--regmux $REGMUX: not an executable"
	has_migrate_copy "$REGMUX" || die "--regmux $REGMUX has no \`migrate --from\` (an old build?)"
else
	rel=$REPO_DIR/target/release/regmux dbg=$REPO_DIR/target/debug/regmux
	if [[ -x $rel ]] && has_migrate_copy "$rel"; then
		REGMUX=$rel
	else
		if [[ -x $rel ]]; then
			REGMUX_NOTE="target/release/regmux is an old build without \`migrate --from\` (\"$("$rel" migrate --help 2>&1 | first_line)\")"
		else
			REGMUX_NOTE="target/release/regmux does not exist"
		fi
		if [[ ! -x $dbg ]]; then
			log "no regmux binary: cargo build (debug; waits if another cargo holds the target-dir lock)"
			(cd "$REPO_DIR" && cargo build --bin regmux) >&2 || die "cargo build failed"
		fi
		has_migrate_copy "$dbg" || die "$dbg has no \`migrate --from\`"
		REGMUX=$dbg
		REGMUX_NOTE="$REGMUX_NOTE: measured the DEBUG build target/debug/regmux (unoptimised; its times are not release figures). \`cargo build --release\` and re-run for release figures"
		log "$REGMUX_NOTE"
	fi
fi
REGMUX=$(cd "$(dirname "$REGMUX")" && pwd)/$(basename "$REGMUX")
stale=$(newer_sources "$REGMUX")
if [[ -n $stale ]]; then
	NOTES+=("The regmux binary is older than some sources (e.g. ${stale//$'\n'/, }): it may not be the current code.")
fi

# ---------------------------------------------------------------- lab, processes, cleanup
LAB=$(mktemp -d "${TMPDIR:-/tmp}/regmux-migrate-bench.XXXXXX")
PIDS=()
CHILD=""
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local p
	if [[ -n $CHILD ]]; then
		pkill -TERM -P "$CHILD" 2>/dev/null || true # skopeo under the sync loop's subshell
		kill "$CHILD" 2>/dev/null || true
		wait "$CHILD" 2>/dev/null || true
	fi
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	if ((KEEP_LAB)); then log "lab kept: $LAB"; else rm -rf "$LAB"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Frozen copy: another build replacing target/*/regmux mid-run must not change what is measured.
cp "$REGMUX" "$LAB/regmux"
RX=$LAB/regmux

# start_registry NAME -> REG_PID, REG_PORT; storage in $LAB/NAME/storage, access log $LAB/NAME/log
start_registry() {
	local name=$1 dir=$LAB/$1
	mkdir -p "$dir/storage"
	cat >"$dir/cfg.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $dir/storage}
  delete: {enabled: true}
  cache: {blobdescriptor: inmemory}
http: {addr: "127.0.0.1:0"}
EOF
	docker-registry serve "$dir/cfg.yml" >"$dir/log" 2>&1 &
	REG_PID=$!
	PIDS+=("$REG_PID")
	REG_PORT=""
	local i
	for ((i = 0; i < 200; i++)); do
		kill -0 "$REG_PID" 2>/dev/null || die "registry $name exited at start: $(tail -n 5 "$dir/log")"
		REG_PORT=$(ss -Hltnp 2>/dev/null | awk -v p="pid=$REG_PID," 'index($0, p) { n = split($4, a, ":"); print a[n]; exit }')
		if [[ -n $REG_PORT ]] && curl -sf -o /dev/null "http://127.0.0.1:$REG_PORT/v2/"; then
			echo "$REG_PORT" >"$dir/port"
			return 0
		fi
		sleep 0.05
	done
	die "registry $name did not answer GET /v2/ within 10 s"
}

stop_registry() {
	local pid=$1 keep=() p
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

# run_timed OUTFILE ERRFILE CMD... -> ELAPSED (seconds), RC. The command runs as a tracked child.
run_timed() {
	local out=$1 err=$2
	shift 2
	local t0=$EPOCHREALTIME
	"$@" >"$out" 2>"$err" &
	CHILD=$!
	RC=0
	wait "$CHILD" || RC=$?
	CHILD=""
	ELAPSED=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
}

# Sum of file sizes under the blob store (what `du -sb` counts, without the directory entries).
storage_bytes() {
	local d=$1/docker/registry/v2/blobs
	if [[ -d $d ]]; then find "$d" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; else echo 0; fi
}

ACCEPT=(
	-H 'Accept: application/vnd.oci.image.index.v1+json'
	-H 'Accept: application/vnd.oci.image.manifest.v1+json'
	-H 'Accept: application/vnd.docker.distribution.manifest.list.v2+json'
	-H 'Accept: application/vnd.docker.distribution.manifest.v2+json'
)
# manifest_digest PORT REPO REF -> Docker-Content-Digest (empty when not found)
manifest_digest() {
	{ curl -sf -I "${ACCEPT[@]}" "http://127.0.0.1:$1/v2/$2/manifests/$3" || true; } |
		tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }'
}

# access-log counters for lines FROM..TO of a docker-registry log (combined log format lines only)
# prints: requests blob_gets blob_get_bytes manifest_gets blob_heads uploads mounts failed_mounts manifest_puts patches
#         duplicate_uploads (uploads of a digest this log already saw uploaded, to any repository)
log_counts() {
	local file=$1 from=$2 to=$3
	sed -n "$((from + 1)),${to}p" "$file" | awk -F'"' '
		$1 ~ /^[0-9.]+ - - \[/ {
			split($2, r, " "); m = r[1]; u = r[2]
			split($3, s, " "); st = s[1]; sz = s[2]
			req++
			if (u ~ /^\/v2\/.+\/blobs\/sha256:[0-9a-f]+$/) {
				if (m == "GET" && (st == 200 || st == 206)) { bg++; bb += sz }
				if (m == "HEAD") bh++
			}
			if (m == "GET" && u ~ /^\/v2\/.+\/manifests\//) mg++
			if (u ~ /^\/v2\/.+\/blobs\/uploads\//) {
				d = ""
				if (m == "PUT" && st == 201) d = u
				if (m == "POST" && u ~ /[?&]mount=/) { if (st == 201) mo++; else fm++ }
				else if (m == "POST" && u ~ /[?&]digest=/ && st == 201) d = u
				if (d != "") {
					up++
					sub(/.*[?&]digest=/, "", d); sub(/&.*/, "", d); sub(/%3[Aa]/, ":", d)
					if (seen[d]++) dup++
				}
				if (m == "PATCH") pa++
			}
			if (m == "PUT" && u ~ /^\/v2\/.+\/manifests\// && st == 201) mp++
		}
		END { printf "%d %d %d %d %d %d %d %d %d %d %d\n", req, bg, bb, mg, bh, up, mo, fm, mp, pa, dup }'
}
lines_of() { wc -l <"$1"; }
# Which digests were uploaded more than once (lines FROM..TO): "sha256:… N× MiB into repo,repo"
duplicate_uploads() {
	sed -n "$(($2 + 1)),${3}p" "$1" | awk -F'"' -v blobs="$LAB/old/storage/docker/registry/v2/blobs/sha256" '
		$1 ~ /^[0-9.]+ - - \[/ && $3 ~ /^ 201 / {
			split($2, r, " ")
			if (r[2] !~ /\/blobs\/uploads\/.*[?&]digest=/ || r[2] ~ /[?&]mount=/ || (r[1] != "PUT" && r[1] != "POST")) next
			d = r[2]; sub(/.*[?&]digest=/, "", d); sub(/&.*/, "", d); sub(/%3[Aa]/, ":", d)
			repo = r[2]; sub(/^\/v2\//, "", repo); sub(/\/blobs\/uploads\/.*/, "", repo)
			n[d]++; where[d] = where[d] (where[d] == "" ? "" : ", ") repo
		}
		END {
			for (d in n) if (n[d] > 1) {
				h = substr(d, 8); size = 0
				f = blobs "/" substr(h, 1, 2) "/" h "/data"
				cmd = "stat -c %s " f; cmd | getline size; close(cmd)
				printf "%s… %.1f MiB uploaded %d× (%s)\n", substr(d, 1, 19), size / 1048576, n[d], where[d]
			}
		}' | sort
}

# ---------------------------------------------------------------- the images
# Layers: name, parent ("-" = a new image), size in KiB (full mode), architecture of a new image.
# Sizes are loosely modelled on the real images; base layers are shared like real base images.
LAYERS="
debian     -       30720 amd64
debslim    -       12288 amd64
alpine     -        3584 amd64
alpine320  -        3584 amd64
ubuntu     -       28672 amd64
alparm     -        3072 arm64
py311      debian  20480
py312      debian  22528
node20     debian  16384
node22     debian  17408
jre21      ubuntu  46080
jre17      ubuntu  43008
nginx      debian   6144
nginxa     alpine   3072
redis      debian   5120
redisa     alpine   4096
pg16       debian  35840
pg15       debian  33792
api140     py311    3072
api141     py311    3072
web200     node20   8192
web201     node20   8192
worker09   jre17   12288
worker10   jre21   12288
ci2024     alpine  10240
ci2025amd  alpine  10240
ci2025arm  alparm  10240
"
# Images: repository, tag, top layer (or index:AMD64,ARM64), format pushed to the old registry.
IMAGES="
library/debian          12           debian      v2s2
library/debian          12-slim      debslim     v2s2
library/alpine          3.19         alpine      v2s2
library/alpine          3.20         alpine320   v2s2
library/python          3.11         py311       v2s2
library/python          3.12         py312       v2s2
library/node            20           node20      v2s2
library/node            22           node22      v2s2
library/eclipse-temurin 21           jre21       oci
library/eclipse-temurin 17           jre17       oci
library/nginx           1.27         nginx       v2s2
library/nginx           1.27-alpine  nginxa      v2s2
library/redis           7            redis       oci
library/redis           7-alpine     redisa      oci
bitnami/postgresql      16           pg16        oci
bitnami/postgresql      15           pg15        oci
myorg/api               1.4.0        api140      oci
myorg/api               1.4.1        api141      oci
myorg/web               2.0.0        web200      v2s2
myorg/web               2.0.1        web201      v2s2
myorg/worker            0.9          worker09    oci
myorg/worker            1.0          worker10    oci
myorg/tools/ci          2024         ci2024      oci
myorg/tools/ci          2025         index:ci2025amd,ci2025arm oci
"
DIVISOR=1
if ((QUICK)); then DIVISOR=12; fi

START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$EPOCHREALTIME
start_registry old
OLD_PORT=$REG_PORT OLD_LOG=$LAB/old/log
log "old registry on 127.0.0.1:$OLD_PORT"

OCI=$LAB/layout
umoci init --layout "$OCI"
mkdir -p "$LAB/src"
log "making layers (random bytes) with umoci"
while read -r name parent kib arch; do
	[[ -n $name ]] || continue
	f=$LAB/src/data
	head -c "$((kib * 1024 / DIVISOR))" /dev/urandom >"$f"
	if [[ $parent == - ]]; then
		umoci new --image "$OCI:$name"
		umoci config --image "$OCI:$name" --os linux --architecture "$arch"
		umoci insert --image "$OCI:$name" "$f" "/opt/$name/data"
	else
		umoci insert --image "$OCI:$parent" --tag "$name" "$f" "/opt/$name/data"
	fi
	rm -f "$f"
done <<<"$LAYERS"

# index:AMD,ARM -> an OCI index in the layout (umoci cannot make one), tagged NAME
make_index() {
	local name=$1 amd=$2 arm=$3 entries blob hex
	entries=$(jq -c --arg a "$amd" --arg b "$arm" '[.manifests[]
		| select(.annotations["org.opencontainers.image.ref.name"] == $a or .annotations["org.opencontainers.image.ref.name"] == $b)
		| {mediaType, digest, size, platform: {os: "linux",
			architecture: (if .annotations["org.opencontainers.image.ref.name"] == $a then "amd64" else "arm64" end)}}]' "$OCI/index.json")
	[[ $(jq length <<<"$entries") == 2 ]] || die "index $name: layout tags $amd/$arm not found"
	blob=$(jq -c '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: .}' <<<"$entries")
	hex=$(printf '%s' "$blob" | sha256sum | cut -d' ' -f1)
	printf '%s' "$blob" >"$OCI/blobs/sha256/$hex"
	jq --arg d "sha256:$hex" --argjson s "${#blob}" --arg n "$name" \
		'.manifests += [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s,
			annotations: {"org.opencontainers.image.ref.name": $n}}]' "$OCI/index.json" >"$OCI/index.json.new"
	mv "$OCI/index.json.new" "$OCI/index.json"
}

log "pushing $(grep -c . <<<"$IMAGES") images to the old registry with skopeo copy"
: >"$LAB/expected"
REPOS=()
while read -r repo tag top format; do
	[[ -n $repo ]] || continue
	src=$top all=()
	if [[ $top == index:* ]]; then
		IFS=, read -r amd arm <<<"${top#index:}"
		src="idx-$repo-$tag"
		src=${src//\//-}
		make_index "$src" "$amd" "$arm"
		all=(--all)
	fi
	fmt=()
	[[ $format == v2s2 ]] && fmt=(--format v2s2)
	skopeo copy -q --retry-times 2 --dest-tls-verify=false "${all[@]}" "${fmt[@]}" \
		"oci:$OCI:$src" "docker://127.0.0.1:$OLD_PORT/$repo:$tag" >/dev/null
	d=$(manifest_digest "$OLD_PORT" "$repo" "$tag")
	[[ -n $d ]] || die "old registry does not serve $repo:$tag after the push"
	echo "$repo $tag $d" >>"$LAB/expected"
	[[ " ${REPOS[*]} " == *" $repo "* ]] || REPOS+=("$repo")
done <<<"$IMAGES"
rm -rf "$OCI" "$LAB/src"
N_IMAGES=$(lines_of "$LAB/expected")
OLD_BYTES=$(storage_bytes "$LAB/old/storage")
OLD_BLOBS=$(find "$LAB/old/storage/docker/registry/v2/blobs" -type f -name data | wc -l)
# What each repository needs (blobs linked per repository): the minimum a copy without mounts reads.
PER_REPO_BYTES=$(find "$LAB/old/storage/docker/registry/v2/repositories" -path '*/_layers/sha256/*/link' -printf '%h\n' |
	while read -r l; do
		h=${l##*/}
		stat -c %s "$LAB/old/storage/docker/registry/v2/blobs/sha256/${h:0:2}/$h/data"
	done | awk '{ s += $1 } END { print s + 0 }')
LAYER_BLOBS=$(find "$LAB/old/storage/docker/registry/v2/repositories" -path '*/_layers/sha256/*/link' -printf '%h\n' |
	awk -F/ '{ print $NF }' | sort -u | wc -l)
T_SETUP=$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
log "old registry: $N_IMAGES images in ${#REPOS[@]} repositories, $OLD_BLOBS blobs, $OLD_BYTES bytes (setup ${T_SETUP}s)"
[[ ${#REPOS[@]} == 12 && $N_IMAGES == 24 ]] || die "expected 12 repositories x 2 tags on the old registry"
catalog=$(curl -sf "http://127.0.0.1:$OLD_PORT/v2/_catalog?n=1000" | jq -r '.repositories[]' | sort)
[[ $catalog == "$(printf '%s\n' "${REPOS[@]}" | sort)" ]] || die "old registry catalog differs from what was pushed"

# skopeo sync 1.9.3 names the destination <DEST>/<last path element of the source repository> (or, with
# --scoped, <DEST>/<source host:port>/<repository>, which is no valid reference when the host has a port).
# So: one sync per namespace, with a YAML source listing that namespace's repositories, every tag ([]).
NAMESPACES=()
for repo in "${REPOS[@]}"; do
	ns=${repo%/*}
	[[ " ${NAMESPACES[*]} " == *" $ns "* ]] || NAMESPACES+=("$ns")
done
for ns in "${NAMESPACES[@]}"; do
	y=$LAB/sync-${ns//\//-}.yaml
	{
		echo "127.0.0.1:$OLD_PORT:"
		echo "  tls-verify: false"
		echo "  images:"
		for repo in "${REPOS[@]}"; do
			[[ ${repo%/*} == "$ns" ]] && echo "    $repo: []"
		done
	} >"$y"
done
skopeo_sync_all() {
	local port=$1 ns
	for ns in "${NAMESPACES[@]}"; do
		skopeo sync --all --src yaml --dest docker --dest-tls-verify=false \
			"$LAB/sync-${ns//\//-}.yaml" "127.0.0.1:$port/$ns" || return $?
	done
}

regmux_config() {
	local target_port=$1 dir=$2
	cat >"$dir/regmux.toml" <<EOF
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[ledger]
path = "$dir/ledger.db"
[backends.target]
url = "http://127.0.0.1:$target_port"
[backends.old]
url = "http://127.0.0.1:$OLD_PORT"
[[routes]]
name = "hub"
registries = ["docker.io"]
backends = ["target", "old"]
target = "target"
default = true
EOF
}

# verify PORT DIR -> "OK TOTAL"; mismatches listed in DIR/digest-mismatches
verify_target() {
	local port=$1 dir=$2 ok=0 total=0 repo tag want got tags
	: >"$dir/digest-mismatches"
	while read -r repo tag want; do
		total=$((total + 1))
		got=$(manifest_digest "$port" "$repo" "$tag")
		if [[ $got == "$want" ]]; then ok=$((ok + 1)); else echo "$repo:$tag old $want target ${got:-missing}" >>"$dir/digest-mismatches"; fi
	done <"$LAB/expected"
	# Nothing else either: same repositories, same tags.
	got=$(curl -sf "http://127.0.0.1:$port/v2/_catalog?n=1000" | jq -r '.repositories[]' | sort)
	if [[ $got != "$(printf '%s\n' "${REPOS[@]}" | sort)" ]]; then
		echo "catalog differs: $(tr '\n' ' ' <<<"$got")" >>"$dir/digest-mismatches"
		ok=$((ok - 1))
	fi
	for repo in "${REPOS[@]}"; do
		tags=$(curl -sf "http://127.0.0.1:$port/v2/$repo/tags/list" | jq -r '.tags[]?' | sort | tr '\n' ' ')
		if [[ $tags != "$(awk -v r="$repo" '$1 == r { print $2 }' "$LAB/expected" | sort | tr '\n' ' ')" ]]; then
			echo "$repo: target tags $tags" >>"$dir/digest-mismatches"
			ok=$((ok - 1))
		fi
	done
	echo "$ok $total"
}

# ---------------------------------------------------------------- the runs
# results: rep tool phase seconds rc, old(the 11 log_counts fields), target(the same 11), storage, ok, total
RESULTS=$LAB/results
: >"$RESULTS"
: >"$LAB/regmux-summaries"
: >"$LAB/duplicates"
INVENTORY_TIMES=()
INVENTORY_OLD=""

measure_phase() { # rep tool phase dir target_port old_mark target_mark
	local rep=$1 tool=$2 phase=$3 dir=$4 port=$5 om=$6 tm=$7 o t st v
	sleep 0.3 # the registries write an access line after the response is sent
	o=$(log_counts "$OLD_LOG" "$om" "$(lines_of "$OLD_LOG")")
	t=$(log_counts "$dir/log" "$tm" "$(lines_of "$dir/log")")
	st=$(storage_bytes "$dir/storage")
	v=$(verify_target "$port" "$dir")
	cp "$dir/digest-mismatches" "$dir/digest-mismatches.$phase"
	echo "$rep $tool $phase $ELAPSED $RC $o $t $st $v" >>"$RESULTS"
}

run_tool() { # rep tool
	local rep=$1 tool=$2 dir=$LAB/$2-$1 port om tm phase
	start_registry "$tool-$rep"
	local tpid=$REG_PID
	port=$REG_PORT
	if [[ $tool == regmux ]]; then
		regmux_config "$port" "$dir"
		om=$(lines_of "$OLD_LOG")
		run_timed "$dir/inventory.txt" "$dir/inventory.err" "$RX" inventory --config "$dir/regmux.toml" --backend old
		((RC == 0)) || FAILURES+=("regmux inventory (run $rep) exited $RC: $(tail -n 3 "$dir/inventory.err")")
		INVENTORY_TIMES+=("$ELAPSED")
		sleep 0.3
		[[ -n $INVENTORY_OLD ]] || INVENTORY_OLD=$(log_counts "$OLD_LOG" "$om" "$(lines_of "$OLD_LOG")")
		local want
		want=$(awk '{ print $1 ":" $2 "@" $3 }' "$LAB/expected" | sort)
		if [[ $(sort "$dir/inventory.txt") != "$want" ]]; then
			FAILURES+=("regmux inventory (run $rep) differs from what the old registry holds: $({ diff <(echo "$want") <(sort "$dir/inventory.txt") || true; } | awk 'NR <= 6' | tr '\n' ' ')")
		fi
	fi
	for phase in first rerun; do
		om=$(lines_of "$OLD_LOG")
		tm=$(lines_of "$dir/log")
		log "run $rep/$RUNS $tool: $phase"
		if [[ $tool == regmux ]]; then
			run_timed "$dir/$phase.json" "$dir/$phase.err" \
				"$RX" migrate --config "$dir/regmux.toml" --route hub --from "$dir/inventory.txt" \
				--mode copy --concurrency "$CONCURRENCY" --format json
			if ((RC != 0)); then
				FAILURES+=("regmux migrate ($phase, run $rep) exited $RC: $(tail -n 5 "$dir/$phase.err" | tr '\n' ' ') $({ jq -c '.failed' "$dir/$phase.json" 2>/dev/null || true; } | cut -c 1-1500)")
			fi
			jq -r --arg p "$phase" --arg r "$rep" \
				'"regmux \($p) (run \($r)): moved \(.moved | length), already there \(.already | length), failed \(.failed | length), stale tags \(.stale_tags | length)"' \
				"$dir/$phase.json" >>"$LAB/regmux-summaries" 2>/dev/null ||
				echo "regmux $phase (run $rep): no JSON summary on stdout" >>"$LAB/regmux-summaries"
		else
			run_timed "$dir/$phase.out" "$dir/$phase.err" skopeo_sync_all "$port"
			((RC == 0)) || FAILURES+=("skopeo sync ($phase, run $rep) exited $RC: $(tail -n 3 "$dir/$phase.err" | tr '\n' ' ')")
		fi
		log "  $ELAPSED s (exit $RC)"
		measure_phase "$rep" "$tool" "$phase" "$dir" "$port" "$om" "$tm"
		duplicate_uploads "$dir/log" "$tm" "$(lines_of "$dir/log")" | sed "s/^/$tool $phase (run $rep): /" >>"$LAB/duplicates"
		if [[ -s $dir/digest-mismatches ]]; then
			FAILURES+=("$tool $phase (run $rep): target differs from old: $(head -n 4 "$dir/digest-mismatches" | tr '\n' ';')")
		fi
	done
	stop_registry "$tpid"
	if ((!KEEP_LAB)); then rm -rf "$dir/storage"; fi
}

for ((rep = 1; rep <= RUNS; rep++)); do
	# Alternate the order so that neither tool always runs on a warmer page cache.
	if ((rep % 2)); then order=(regmux skopeo); else order=(skopeo regmux); fi
	for tool in "${order[@]}"; do run_tool "$rep" "$tool"; done
done

# ---------------------------------------------------------------- report
# column numbers in $RESULTS
C_SEC=4 C_OREQ=6 C_OBG=7 C_OBB=8 C_OMG=9 C_OBH=10
C_TREQ=17 C_TBH=21 C_TUP=22 C_TMO=23 C_TFM=24 C_TMP=25 C_TPA=26 C_TDUP=27 C_ST=28 C_OK=29 C_TOT=30

# cell TOOL PHASE COL KIND -> "median (min–max)" over the runs; KIND: s (seconds), mib, n
cell() {
	awk -v t="$1" -v p="$2" -v c="$3" -v k="$4" '
		$2 == t && $3 == p { v[++n] = $c }
		function f(x) { if (k == "s") return sprintf("%.2f s", x); if (k == "mib") return sprintf("%.1f MiB", x / 1048576); return sprintf("%d", x) }
		END {
			if (!n) { print "n/a"; exit }
			for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { x = v[i]; v[i] = v[j]; v[j] = x }
			med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
			out = f(med)
			if (n > 1 && f(v[1]) != f(v[n])) out = out " (" f(v[1]) "–" f(v[n]) ")"
			print out
		}' "$RESULTS"
}
# both phases: "first / re-run"
pair() { echo "$(cell "$1" first "$2" "$3") / $(cell "$1" rerun "$2" "$3")"; }
digests_cell() {
	awk -v t="$1" -v ok="$C_OK" -v tot="$C_TOT" '
		$2 == t { all++; if ($ok == $tot && $5 == 0) good++ }
		END { if (!all) print "n/a"; else if (good == all) print "yes"; else printf "**no** (%d of %d checks)\n", all - good, all }' "$RESULTS"
}
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
rx_version=$("$RX" --version 2>&1 | first_line)
sk_version=$(skopeo --version 2>&1 | first_line)
dr_version=$(docker-registry --version 2>&1 | first_line)
mode="full"
if ((QUICK)); then mode="quick"; fi
rx_label="regmux migrate --mode copy --concurrency $CONCURRENCY"
if [[ -n $REGMUX_NOTE ]]; then rx_label="$rx_label (DEBUG build)"; fi
sync_cmds=""
for ns in "${NAMESPACES[@]}"; do sync_cmds+="${sync_cmds:+; }$ns"; done

report() {
	echo "## regmux migrate vs skopeo sync ($mode run, $RUNS run(s) per tool, $(date -u +%Y-%m-%dT%H:%MZ))"
	echo
	echo "$rx_version ($REGMUX) · $sk_version · $dr_version · nproc $(nproc) · $cpu_model · load at start $START_LOAD"
	echo
	echo "Old registry: ${#REPOS[@]} repositories, $N_IMAGES tags ($(grep -c ' v2s2' <<<"$IMAGES") Docker schema2, $(grep -c ' oci$' <<<"$IMAGES") OCI of which 1 is a two-platform index), $OLD_BLOBS blobs of which $LAYER_BLOBS layers and configs (the fewest uploads a copy can do) and $((OLD_BLOBS - LAYER_BLOBS)) manifests, $(awk -v b="$OLD_BYTES" 'BEGIN { printf "%.1f MiB", b / 1048576 }') stored; per repository (blobs linked into each repository, summed) $(awk -v b="$PER_REPO_BYTES" 'BEGIN { printf "%.1f MiB", b / 1048576 }')."
	echo
	echo "| tool | first run | re-run | blob GETs from old (first / re-run) | bytes read from old (first / re-run) | blob uploads to target (first / re-run) | target storage bytes | digests identical |"
	echo "|---|---|---|---|---|---|---|---|"
	local t label
	for t in regmux skopeo; do
		if [[ $t == regmux ]]; then label=$rx_label; else label="skopeo sync --all (yaml, ${#NAMESPACES[@]} namespaces)"; fi
		echo "| $label | $(cell "$t" first $C_SEC s) | $(cell "$t" rerun $C_SEC s) | $(pair "$t" $C_OBG n) | $(pair "$t" $C_OBB mib) | $(pair "$t" $C_TUP n) | $(cell "$t" rerun $C_ST mib) ($(cell "$t" rerun $C_ST n) B) | $(digests_cell "$t") |"
	done
	echo
	echo "Other requests (first / re-run):"
	echo
	echo "| tool | requests to old | manifest GETs on old | blob HEADs on old | requests to target | blob HEADs on target | cross-repo mounts | failed mount attempts | uploads of a digest already uploaded | upload PATCHes | manifest PUTs |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
	for t in regmux skopeo; do
		echo "| $t | $(pair "$t" $C_OREQ n) | $(pair "$t" $C_OMG n) | $(pair "$t" $C_OBH n) | $(pair "$t" $C_TREQ n) | $(pair "$t" $C_TBH n) | $(pair "$t" $C_TMO n) | $(pair "$t" $C_TFM n) | $(pair "$t" $C_TDUP n) | $(pair "$t" $C_TPA n) | $(pair "$t" $C_TMP n) |"
	done
	echo
	echo "Notes:"
	echo
	if [[ -n $REGMUX_NOTE ]]; then echo "- **$REGMUX_NOTE.**"; fi
	echo "- Times are wall clock, median (min–max) of $RUNS run(s), each on a fresh empty target; the re-run is the same command again against the target the first run filled. Runs alternate which tool goes first."
	echo "- regmux: \`regmux inventory --backend old\` first (not timed: $(printf '%s\n' "${INVENTORY_TIMES[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "%.2f s", v[int((NR + 1) / 2)] }') median; old saw $(awk '{ printf "%d requests, %d blob HEADs, %d blob GETs", $1, $5, $2 }' <<<"$INVENTORY_OLD")), then \`migrate --from\` that file. skopeo lists the tags itself, inside its timed run."
	echo "- skopeo sync 1.9.3 puts \`<source repo>\` at \`<DEST>/<last path element>\` (\`--scoped\` prefixes \`127.0.0.1:PORT/\`, an invalid reference), so it runs once per namespace ($sync_cmds) with a YAML source listing that namespace's repositories with \`[]\` (every tag): \`skopeo sync --all --src yaml --dest docker --dest-tls-verify=false NS.yaml 127.0.0.1:NEW/NS\`. It copies one image at a time; \`--all\` keeps the index whole. It keeps its blob-info cache (/var/lib/containers/cache as root) between runs; each target has a new port, so no entry applies to a fresh target."
	echo "- Counted from the registries' access logs: blob GETs = 200/206 GETs of \`/v2/<repo>/blobs/sha256:…\` on old; bytes read = their logged response sizes; blob uploads = 201 answers to PUT \`…/blobs/uploads/<id>?digest=\` (or a one-POST upload) on the target; mounts = 201 answers to POST \`?mount=&from=\`. Target storage = the sum of the file sizes under \`docker/registry/v2/blobs\` after the re-run (like \`du -sb\`, without directory entries)."
	echo "- Digests identical: after each run, every repo:tag on the target answers (HEAD, Accept: OCI index, OCI manifest, Docker list, Docker schema2) with the old registry's Docker-Content-Digest, and the target has exactly the old catalog and tags."
	# identical summaries of several runs on one line
	sed -E 's/ \(run [0-9]+\)//' "$LAB/regmux-summaries" | sort | uniq -c |
		awk '{ n = $1; $1 = ""; sub(/^ /, ""); print "- " $0 (n > 1 ? " (each of " n " runs)" : "") }'
	if [[ -s $LAB/duplicates ]]; then
		echo "- The same blob uploaded more than once to the target (read from old each time):"
		while read -r line; do echo "  - $line"; done <"$LAB/duplicates"
	fi
	local n
	for n in "${NOTES[@]}"; do echo "- $n"; done
	echo "- Whole benchmark: $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f s", b - a }') (setup ${T_SETUP} s)."
	if ((${#FAILURES[@]})); then
		echo
		echo "FAILURES:"
		echo
		local f
		for f in "${FAILURES[@]}"; do echo "- $f"; done
	fi
}
report | tee "${OUT:-/dev/null}"
if ((KEEP_LAB)); then cp "$RESULTS" "$LAB/results.tsv"; fi
((${#FAILURES[@]} == 0))
