#!/usr/bin/env python3
"""A small FileCheck: checks a program's output against the CHECK lines of a
test file, as LLVM's FileCheck does (a subset).

  filecheck.py TEST_FILE < output

Directives, in '#' comments of the test file:
  CHECK: text        the next match of `text` at or after the current line
  CHECK-NEXT: text   `text` on the line right after the previous match
  CHECK-SAME: text   `text` later on the same line as the previous match
  CHECK-NOT: text    `text` on no line between the previous match and the next
  CHECK-COUNT-N: text  exactly N lines from the current position on contain `text`
Exit 0 when every directive holds, else 1 with the first failure."""
import re
import sys

DIRECTIVE = re.compile(r"#\s*(CHECK(?:-NEXT|-SAME|-NOT|-COUNT-\d+)?):\s?(.*)$")


def main(test_path):
    directives = []
    for line in open(test_path):
        m = DIRECTIVE.search(line)
        if m:
            directives.append((m.group(1), m.group(2).rstrip()))
    if not directives:
        print(f"{test_path}: no CHECK lines")
        return 1
    out = sys.stdin.read().splitlines()
    pos = 0  # first line the next CHECK may match
    last = -1  # line of the previous match
    col = 0
    pending_not = []
    for kind, text in directives:
        if kind == "CHECK-NOT":
            pending_not.append(text)
            continue
        if kind == "CHECK":
            found = next((i for i in range(pos, len(out)) if text in out[i]), None)
        elif kind == "CHECK-NEXT":
            found = last + 1 if last + 1 < len(out) and text in out[last + 1] else None
        elif kind == "CHECK-SAME":
            found = last if last >= 0 and text in out[last][col:] else None
        else:  # CHECK-COUNT-N
            n = int(kind.rsplit("-", 1)[1])
            hits = [i for i in range(pos, len(out)) if text in out[i]]
            if len(hits) != n:
                print(f"{test_path}: {kind}: {text!r} found {len(hits)} times, expected {n}")
                return 1
            continue  # a count is an assertion over the rest; it does not move the position
        if found is None:
            print(f"{test_path}: {kind}: {text!r} not found (after line {pos + 1})")
            print("output:\n" + "\n".join(out))
            return 1
        for banned in pending_not:
            for i in range(pos, found):
                if banned in out[i]:
                    print(f"{test_path}: CHECK-NOT: {banned!r} found on line {i + 1}: {out[i]}")
                    return 1
        pending_not = []
        col = out[found].find(text) + len(text) if kind == "CHECK-SAME" else 0
        last = found
        pos = found + 1
    for banned in pending_not:
        for i in range(pos, len(out)):
            if banned in out[i]:
                print(f"{test_path}: CHECK-NOT: {banned!r} found on line {i + 1}: {out[i]}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
