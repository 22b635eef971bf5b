# tests/cli/tune_report.sh CMAEC SOURCE_ROOT — cmaec tune --report (docs/runtime.md "Tuning
# database"): a database written by another SQLite client (Python's) is reported per device with
# its speedups; a missing default file is "no records" and is not created; a bad CMAEC_TUNE, a
# file that is no database and a missing --db file are exit 2 with one line naming them.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"

# expect_out PATTERN...: the last command's stdout contains every fixed string
expect_out() {
  for p in "$@"; do
    grep -qF -- "$p" "$tmp/out" || bad "stdout lacks \"$p\": $(head -c 600 "$tmp/out")"
  done
}

db=$tmp/t.db
# the records are of this build's search-space version (codegen.h, CM_TUNE_SPACE_VERSION)
space_version=$(sed -n '/#define CM_TUNE_SPACE_VERSION/,+1p' "$root/codegen/codegen.h" |
  grep -oE '^ +[0-9]+' | tr -d ' ')
python3 - "$db" "$space_version" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
v = int(sys.argv[2])
c.executescript("""
CREATE TABLE trials (id INTEGER PRIMARY KEY, kernel TEXT NOT NULL, stage INTEGER NOT NULL,
  device TEXT NOT NULL, version INTEGER NOT NULL, point TEXT NOT NULL, ms REAL, failure TEXT,
  recorded TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE TABLE best (kernel TEXT NOT NULL, stage INTEGER NOT NULL, device TEXT NOT NULL,
  version INTEGER NOT NULL, point TEXT NOT NULL, best_ms REAL NOT NULL, default_ms REAL NOT NULL,
  label TEXT NOT NULL, recorded TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  PRIMARY KEY (kernel, stage, device, version));
PRAGMA user_version = 1;
""")
h = "ab" * 32
cpu = "cpu znver3 256 threads 2"
c.executemany("INSERT INTO trials (kernel, stage, device, version, point, ms, failure) VALUES (?,?,?,?,?,?,?)",
              [(h, 0, cpu, v, "mr=6,nr=16", 1.0, None), (h, 0, cpu, v, "mr=4,nr=16", 2.0, None),
               (h, 0, cpu, v, "mr=8,nr=16", None, "compile: spills"),
               (h, 1, "emulated sm_90", v, "bm=64", 3.0, None)])
c.executemany("INSERT INTO best (kernel, stage, device, version, point, best_ms, default_ms, label) VALUES (?,?,?,?,?,?,?,?)",
              [(h, 0, cpu, v, "mr=6,nr=16", 1.0, 2.0, "k3_gemm s0 gemm 64x64x64"),
               (h, 1, "emulated sm_90", v, "bm=64", 3.0, 3.0, "k3_attn s1")])
c.commit()
PY

# the records, per device, with their speedups
if expect_ok env -u CMAEC_TUNE "$cmaec" tune --report --db "$db"; then
  expect_out "CMAEC_TUNE: cached" "tuning database $db" "device cpu znver3 256 threads 2" \
    "k3_gemm s0 gemm 64x64x64" "2.00x" "mr=6,nr=16" "device emulated sm_90" "k3_attn s1" \
    "total: 1 tuned stage, default 2.0000 ms, best 1.0000 ms, speedup 2.00x, 3 trials, 1 failed"
fi
# one device only
if expect_ok env CMAEC_TUNE=search "$cmaec" tune --report --db "$db" --device-id "emulated sm_90"; then
  expect_out "CMAEC_TUNE: search" "device emulated sm_90" "k3_attn s1"
  grep -qF znver3 "$tmp/out" && bad "--device-id emulated sm_90 printed the cpu records"
fi
# the default file under an empty cache root: no records, and no file made
mkdir -p "$tmp/cache"
if expect_ok env CMAEC_CACHE_DIR="$tmp/cache" "$cmaec" tune --report; then
  expect_out "tuning database $tmp/cache/tuning.db: no records"
  [ -e "$tmp/cache/tuning.db" ] && bad "the report created $tmp/cache/tuning.db"
fi
if expect_ok env CMAEC_CACHE_DIR= "$cmaec" tune --report; then
  expect_out "caching disabled"
fi
if expect_ok "$cmaec" tune --report --help; then
  expect_out "usage: cmaec tune --report [--db PATH] [--device-id ID]"
fi

# exit 2, one line naming the cause
expect_fail 2 "CMAEC_TUNE=bogus: expected off, cached or search" \
  env CMAEC_TUNE=bogus "$cmaec" tune --report --db "$db"
head -c 8192 /dev/zero | tr '\0' '\245' >"$tmp/noise.db"
printf 'SQLite format 3\0' | dd of="$tmp/noise.db" conv=notrunc status=none # a header, no database
expect_fail 2 "tuning database $tmp/noise.db: not a usable SQLite database" \
  "$cmaec" tune --report --db "$tmp/noise.db"
for i in $(seq 100); do echo "not a database"; done >"$tmp/text.db"
expect_fail 2 "tuning database $tmp/text.db: not a usable SQLite database" \
  "$cmaec" tune --report --db "$tmp/text.db"
expect_fail 2 "$tmp/none.db: no such tuning database" "$cmaec" tune --report --db "$tmp/none.db"
expect_fail 2 "unknown option --bogus" "$cmaec" tune --report --bogus
expect_fail 2 "--report takes no MODEL" "$cmaec" tune --report "$root/models/cmae_vit_tiny_fmnist.json"

finish
