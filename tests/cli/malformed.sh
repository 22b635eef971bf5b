# tests/cli/malformed.sh CMAEC_BINARY SOURCE_ROOT
# Runs `cmaec check` on every malformed graph JSON file listed in
# tests/malformed/expected.tsv and asserts: exit code 2, exactly one line on
# stderr, the line starts with "PATH: " and contains the expected substring,
# and no sanitizer report. Every tests/malformed/*.json must be listed.
set -u
if [ $# -ne 2 ]; then
  echo "usage: bash malformed.sh CMAEC_BINARY SOURCE_ROOT" >&2
  exit 2
fi
cmaec=$1
dir=$2/tests/malformed
table=$dir/expected.tsv
if [ ! -x "$cmaec" ] || [ ! -f "$table" ]; then
  echo "malformed.sh: missing $cmaec or $table" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
listed=" "

while IFS=$'\t' read -r file expect; do
  case "$file" in '' | '#'*) continue ;; esac
  listed="$listed$file "
  path=$dir/$file
  if [ ! -f "$path" ]; then
    echo "FAIL $file: listed in expected.tsv but missing"
    fail=$((fail + 1))
    continue
  fi
  "$cmaec" check "$path" >"$tmp/out" 2>"$tmp/err"
  rc=$?
  lines=$(wc -l <"$tmp/err")
  msg=$(head -n 1 "$tmp/err")
  problem=""
  if grep -q -e "AddressSanitizer" -e "LeakSanitizer" -e "runtime error" "$tmp/err"; then
    problem="sanitizer report"
  elif [ "$rc" -ne 2 ]; then
    problem="exit code $rc, expected 2"
  elif [ "$lines" -ne 1 ]; then
    problem="$lines lines on stderr, expected 1"
  elif [ "${msg#"$path: "}" = "$msg" ]; then
    problem="message does not start with \"$path: \""
  else
    case "$msg" in
    *"$expect"*) ;;
    *) problem="message lacks \"$expect\"" ;;
    esac
  fi
  if [ -n "$problem" ]; then
    echo "FAIL $file: $problem"
    sed 's/^/    stderr: /' "$tmp/err" | head -n 20
    fail=$((fail + 1))
  else
    pass=$((pass + 1))
  fi
done <"$table"

# A new malformed JSON file without an expectation would silently go untested.
for path in "$dir"/*.json; do
  [ -e "$path" ] || continue
  file=${path##*/}
  case "$listed" in
  *" $file "*) ;;
  *)
    echo "FAIL $file: not listed in expected.tsv"
    fail=$((fail + 1))
    ;;
  esac
done

echo "malformed graph JSON: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
