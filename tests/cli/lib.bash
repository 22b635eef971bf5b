# tests/cli/lib.bash — helpers for the command-line tests (sourced, not run).
# expect_fail CODE SUBSTRING CMD...: the command exits with CODE, prints exactly
# one line on stderr containing SUBSTRING, and no sanitizer report.
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { pass=$((pass + 1)); }
bad() {
  echo "FAIL: $*"
  fail=$((fail + 1))
}

expect_fail() {
  local code=$1 substring=$2
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$? lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -ne "$code" ]; then
    bad "$* -> exit $rc, expected $code: $(head -c 300 "$tmp/err")"
  elif [ "$lines" -ne 1 ]; then
    bad "$* -> $lines lines on stderr, expected 1: $(head -c 300 "$tmp/err")"
  elif ! grep -qF -- "$substring" "$tmp/err"; then
    bad "$* -> \"$(cat "$tmp/err")\" does not contain \"$substring\""
  elif grep -q -e "Sanitizer" -e "runtime error" "$tmp/err"; then
    bad "$* -> sanitizer report"
  else
    ok
  fi
}

expect_ok() {
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$* -> exit $rc: $(head -c 300 "$tmp/err")"
    return 1
  fi
  ok
}

finish() {
  echo "$pass passed, $fail failed"
  [ "$fail" -eq 0 ]
}
