#!/usr/bin/env python3
"""Cross-checks cmaec's safetensors files against the reference implementation.

Usage: check_safetensors.py OURS THEIRS

OURS is a file cmaec wrote (tests/unit/test_safetensors_reference.c writes it
with the contents listed in EXPECTED below); the reference `safetensors`
package must read it and find exactly those tensors, bit for bit, and the
metadata. Then THEIRS is written with the reference package (contents in
WRITTEN below) for the C side to read back and check.

Needs the `safetensors` and `numpy` packages (pip install safetensors numpy).
Exit status: 0 all agree, 1 a mismatch (printed), 3 packages missing.
"""
import struct
import sys

try:
    import numpy as np
    import safetensors
    from safetensors import safe_open
except ImportError as e:  # pragma: no cover
    print("check_safetensors.py: missing python package (pip install safetensors numpy): %s" % e)
    sys.exit(3)


def pack(fmt, values):
    return struct.pack("<%d%s" % (len(values), fmt), *values)


# name -> (dtype, shape, little-endian bytes); what the C test writes.
EXPECTED = {
    "a": ("F32", [2, 3], pack("f", [(i - 2.5) * 0.75 for i in range(6)])),
    "b": ("BF16", [4], pack("H", [0x3F80, 0xC000, 0x7FC1, 0x0001])),
    "c": ("F16", [2, 2], pack("H", [0x3C00, 0xBC00, 0x7E01, 0x8000])),
    "d": ("F64", [3], pack("d", [0.1, -1e300, 5e-324])),
    "e": ("I32", [3], pack("i", [-7, 2147483647, -2147483648])),
    "f": ("I64", [], pack("q", [-1234567890123])),
    "g": ("BOOL", [2, 2], bytes([1, 0, 0, 1])),
    "h": ("F32", [0, 4], b""),
}
EXPECTED_META = {"format": "cmaec", "note": 'x"y'}

# What this script writes for the C side.
WRITTEN = {
    "x": ("F32", [3, 2], (np.arange(6, dtype=np.float32) * 0.5 - 1).tobytes()),
    "y": ("BF16", [2], pack("H", [0x4049, 0xFF80])),
    "z": ("I64", [2], pack("q", [-3, 9007199254740993])),
    "m": ("BOOL", [3], np.array([True, False, True]).tobytes()),
    "hf": ("F16", [2], np.array([1.5, -0.25], dtype=np.float16).tobytes()),
}
WRITTEN_META = {"writer": "safetensors-python"}


def fail(msg):
    print("check_safetensors.py: " + msg)
    sys.exit(1)


def check_ours(path):
    with open(path, "rb") as f:
        raw = f.read()
    got = {name: (info["dtype"], list(info["shape"]), bytes(info["data"]))
           for name, info in safetensors.deserialize(raw)}
    if set(got) != set(EXPECTED):
        fail("%s: tensors %s, expected %s" % (path, sorted(got), sorted(EXPECTED)))
    for name, want in EXPECTED.items():
        dtype, shape, data = got[name]
        if dtype.upper() != want[0] or shape != want[1] or data != want[2]:
            fail("%s: tensor %r is %s %s %s, expected %s %s %s"
                 % (path, name, dtype, shape, data.hex(), want[0], want[1], want[2].hex()))
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        if meta != EXPECTED_META:
            fail("%s: metadata %r, expected %r" % (path, meta, EXPECTED_META))
        # Values through numpy, for the dtypes numpy has.
        a = f.get_tensor("a")
        if a.dtype != np.float32 or not np.array_equal(a.ravel(), (np.arange(6) - 2.5) * 0.75):
            fail("%s: tensor 'a' reads as %r" % (path, a))
        e = f.get_tensor("e")
        if e.tolist() != [-7, 2147483647, -2147483648]:
            fail("%s: tensor 'e' reads as %r" % (path, e))
        g = f.get_tensor("g")
        if g.tolist() != [[True, False], [False, True]]:
            fail("%s: tensor 'g' reads as %r" % (path, g))


LONG_NAMES = {"F32": "float32", "BF16": "bfloat16", "I64": "int64", "BOOL": "bool",
              "F16": "float16"}


def write_theirs(path):
    # Raw-bytes writer; its dtype names are the long ones ("bfloat16"). Newer
    # releases (>= 0.7) take TensorSpec objects, older ones plain dicts.
    buffers = {name: np.frombuffer(data, dtype=np.uint8).copy()
               for name, (_, _, data) in WRITTEN.items()}
    tensors = {}
    for name, (dt, shape, _) in WRITTEN.items():
        buf = buffers[name]
        if hasattr(safetensors, "TensorSpec"):
            tensors[name] = safetensors.TensorSpec(dtype=LONG_NAMES[dt], shape=shape,
                                                   data_ptr=buf.ctypes.data, data_len=buf.nbytes)
        else:
            tensors[name] = {"dtype": LONG_NAMES[dt], "shape": shape, "data": buf.tobytes()}
    safetensors.serialize_file(tensors, path, metadata=WRITTEN_META)
    del buffers  # alive until the file is written


def main():
    if len(sys.argv) != 3:
        sys.stderr.write("usage: check_safetensors.py OURS THEIRS\n")
        return 2
    check_ours(sys.argv[1])
    write_theirs(sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
