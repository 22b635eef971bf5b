# tests/cli/pass_tests.sh CMAEC SOURCE_ROOT — pass tests as text: each
# tests/pass/*.ir holds input IR, a "# RUN: PIPELINE" line and CHECK lines that
# the output of `cmaec opt FILE -p PIPELINE --verify-each` must match.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
n=0
for test in "$root"/tests/pass/*.ir; do
  n=$((n + 1))
  pipeline=$(sed -n 's/^# RUN: *//p' "$test" | head -n 1)
  if [ -z "$pipeline" ]; then
    bad "$test: no RUN line"
    continue
  fi
  if ! "$cmaec" opt "$test" -p "$pipeline" --verify-each >"$tmp/out" 2>"$tmp/err"; then
    bad "$test: cmaec opt failed: $(cat "$tmp/err")"
    continue
  fi
  if python3 "$root/tests/pass/filecheck.py" "$test" <"$tmp/out" >"$tmp/fc" 2>&1; then
    ok
  else
    bad "$(cat "$tmp/fc")"
  fi
done
[ "$n" -ge 10 ] || bad "only $n pass tests"
finish
