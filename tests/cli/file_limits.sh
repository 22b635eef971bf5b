# tests/cli/file_limits.sh CMAEC SOURCE_ROOT — every reader takes regular files only and
# caps what it reads: /dev/zero, a FIFO and a directory are refused before anything is
# read, and a file over its format's cap is refused naming the file and the cap (exit 2).
# Each command runs with 4 GB of address space (4 GB of RSS under ASan) and 30 s, so a reader that reads on and on
# fails here instead of taking the machine's memory or hanging.
set -u
cmaec=$1
root=$2
. "$root/tests/cli/lib.bash"
# AddressSanitizer reserves terabytes of shadow address space, so under it (the sanitizer build)
# the cap is its own RSS limit instead of ulimit -v.
if nm -an "$cmaec" 2>/dev/null | grep -q __asan_init; then
  limited() { ASAN_OPTIONS="${ASAN_OPTIONS:-}:hard_rss_limit_mb=4000" timeout 30 "$@"; }
else
  limited() { (ulimit -v 4000000 && timeout 30 "$@"); }
fi

mkfifo "$tmp/fifo"
mkdir "$tmp/dir"
truncate -s 65M "$tmp/big.json" # sparse: no disk space used
mlp="$root/examples/mlp.json"

for bad in /dev/zero "$tmp/fifo"; do
  kind="a character device"
  [ "$bad" = "$tmp/fifo" ] && kind="a FIFO"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" check "$bad"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" run "$mlp" --inputs "$bad"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" eval "$bad"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" summary "$bad"
  printf '{"extends": "%s"}\n' "$bad" >"$tmp/m.json"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" summary "$tmp/m.json"
  expect_fail 2 "$bad: not a regular file ($kind)" limited "$cmaec" plot "$bad" -o "$tmp/p.png"
done
expect_fail 2 "$tmp/dir: not a regular file (a directory)" limited "$cmaec" check "$tmp/dir"
expect_fail 2 "$tmp/dir: not a regular file (a directory)" limited "$cmaec" run "$mlp" \
  --inputs "$tmp/dir"

# over the cap of a graph or model file (64 MiB): refused before reading, naming the cap
expect_fail 2 "$tmp/big.json: 68157440 bytes, more than the 64 MiB limit" limited "$cmaec" \
  check "$tmp/big.json"
expect_fail 2 "$tmp/big.json: 68157440 bytes, more than the 64 MiB limit" limited "$cmaec" \
  summary "$tmp/big.json"
printf '{"extends": "big.json"}\n' >"$tmp/m.json"
expect_fail 2 "$tmp/big.json: 68157440 bytes, more than the 64 MiB limit" limited "$cmaec" \
  summary "$tmp/m.json"

# a safetensors file of 3 GiB whose header is nonsense: refused from its header, in little
# memory (the data is mapped, not read)
truncate -s 3G "$tmp/huge.safetensors"
expect_fail 2 "header is not valid JSON" limited "$cmaec" run "$mlp" --inputs "$tmp/huge.safetensors"
expect_fail 2 "header is not valid JSON" limited "$cmaec" eval "$tmp/huge.safetensors"
finish
