#!/usr/bin/env python3
"""Checks source sizes: no C function over 150 lines, no source file over 1500 lines.

Usage: scripts/check_lengths.py [--all] [--allow FILE] [PATH ...]
       scripts/check_lengths.py --self-test
  PATH        files or folders to scan (default: ir frontend passes codegen runtime models tools
              tests bench)
  --all       print every function over the limit, allowlisted or not, with its length
  --allow     the allowlist (default: scripts/check_lengths.allow)
  --self-test check the function scanner on a sample with known answers

A function is a top-level definition found by a simple scan: after comments,
strings and character literals are blanked out, a '{' at brace depth 0 whose
preceding text (since the last ';', '}' or preprocessor line) ends in ')' opens
a function; its name is the identifier before the first '(' of that text that
is not __attribute__ or the like. Its length is the count of lines from the
line holding the name to the line of the matching '}'. Tables (initializers after '=') and struct/enum bodies are not
functions. The file length is its line count.

Allowlist lines: `PATH[:FUNCTION]  reason` (blank lines and '#' comments are
ignored); each entry needs a reason. An entry that no longer matches an
offender is reported as stale (and fails the check), so the list only shrinks.

Exit status: 0 when every offender is allowlisted, 1 otherwise, 2 on bad usage.
"""
import os
import re
import sys

FUNC_LIMIT = 150
FILE_LIMIT = 1500
DEFAULT_DIRS = [
    "ir", "frontend", "passes", "codegen", "runtime", "models", "tools", "tests", "bench"
]
EXTS = (".c", ".h", ".cpp", ".def")
# Identifiers followed by '(' that are not a function's name.
NOT_NAMES = ("__attribute__", "__declspec", "_Alignas", "alignas", "__asm__")
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def blank_literals(text):
    """Comments, strings and char literals replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + re.sub(r"[^\n]", " ", text[i + 1 : j - 1]) + c)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(text):
    """[(name, first_line, last_line)] of the top-level function definitions."""
    code = blank_literals(text)
    # Preprocessor lines (with continuations) separate declarations like ';' does.
    lines = code.split("\n")
    keep = []
    cont = False
    for ln in lines:
        pp = cont or ln.lstrip().startswith("#")
        cont = pp and ln.rstrip().endswith("\\")
        keep.append(";" + " " * (len(ln) - 1) if pp and ln else ("" if pp else ln))
    code = "\n".join(keep)
    found = []
    depth = 0
    start = 0  # index where the current top-level declaration text starts
    i = 0
    n = len(code)
    while i < n:
        c = code[i]
        if depth == 0 and c in ";}":
            start = i + 1
        elif c == "{":
            if depth == 0:
                head = code[start:i]
                name = None
                h = head.rstrip()
                if h.endswith(")") and "=" not in head.split("(")[0]:
                    for m in re.finditer(r"([A-Za-z_]\w*)\s*\(", head):
                        if m.group(1) not in NOT_NAMES:
                            if m.group(1) not in ("if", "for", "while", "switch"):
                                name = m.group(1)
                                name_at = start + m.start(1)
                            break
                if name:
                    close = match_brace(code, i)
                    first = code.count("\n", 0, name_at) + 1
                    last = code.count("\n", 0, close) + 1
                    found.append((name, first, last))
                    i = close + 1
                    start = i
                    continue
            depth += 1
        elif c == "}":
            depth = max(depth - 1, 0)
            if depth == 0:
                start = i + 1
        i += 1
    return found


def match_brace(code, i):
    depth = 0
    for j in range(i, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


def read_allow(path):
    allow = {}
    if not os.path.exists(path):
        return allow
    with open(path) as f:
        for no, ln in enumerate(f, 1):
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            parts = ln.split(None, 1)
            if len(parts) < 2:
                sys.exit("%s:%d: allowlist entry without a reason: %s" % (path, no, ln))
            allow[parts[0]] = parts[1]
    return allow


def sources(paths):
    for p in paths:
        full = os.path.join(ROOT, p)
        if os.path.isfile(full):
            yield os.path.relpath(full, ROOT)
            continue
        for d, _, files in sorted(os.walk(full)):
            for f in sorted(files):
                if f.endswith(EXTS):
                    yield os.path.relpath(os.path.join(d, f), ROOT)


SAMPLE = r"""/* a comment with { braces } and f(x) { */
#include <stdio.h>
#define BODY(x) { return x; }
struct pair {
  int a, b;
};
static const int table[] = {1, 2,
                            3};
static int one(int x)
{
  const char *s = "}{ not a brace";
  char c = '}';
  // } neither
  if (x) {
    return s[0] + c;
  }
  return 0;
}
enum e { A, B };
int two(void) { return table[0]; }
#if 0
#endif
static void __attribute__((unused)) three(struct pair *p,
                                          int n) {
  for (int i = 0; i < n; i++) {
    p[i].a = p[i].b;
  }
}
"""


def self_test():
    """Exit status 0 when the scanner finds exactly the sample's three functions."""
    want = [("one", 9, 18), ("two", 20, 20), ("three", 23, 28)]
    got = functions(SAMPLE)
    if got != want:
        print("self-test FAILED: found %s, expected %s" % (got, want))
        return 1
    print("self-test ok: %s" % ", ".join("%s %d-%d" % f for f in got))
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    show_all = False
    allow_path = os.path.join(ROOT, "scripts", "check_lengths.allow")
    paths = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--all":
            show_all = True
        elif a == "--allow" and args:
            allow_path = args.pop(0)
        elif a.startswith("-"):
            print(__doc__, file=sys.stderr)
            return 2
        else:
            paths.append(a)
    allow = read_allow(allow_path)
    used = set()
    bad = 0
    for rel in sources(paths or DEFAULT_DIRS):
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        nlines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        offenders = []
        if nlines > FILE_LIMIT:
            offenders.append((rel, "file %s: %d lines (limit %d)" % (rel, nlines, FILE_LIMIT)))
        if rel.endswith((".c", ".cpp")):
            for name, first, last in functions(text):
                length = last - first + 1
                if length > FUNC_LIMIT:
                    key = "%s:%s" % (rel, name)
                    offenders.append(
                        (key, "function %s:%d %s: %d lines (limit %d)" % (rel, first, name, length, FUNC_LIMIT))
                    )
        for key, msg in offenders:
            if key in allow:
                used.add(key)
                if show_all:
                    print("allowed  %s — %s" % (msg, allow[key]))
            else:
                print("OVER     %s" % msg)
                bad += 1
    for key in sorted(set(allow) - used):
        # Entries for files outside the scanned paths are not stale, just not looked at.
        path = key.split(":")[0]
        if paths and not any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths):
            continue
        print("STALE    allowlist entry %s no longer over the limit: remove it" % key)
        bad += 1
    if bad:
        print("%d offender(s)" % bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
