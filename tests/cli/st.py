#!/usr/bin/env python3
"""Tiny safetensors writer/reader for the CLI tests (standard library only).

  st.py write OUT.safetensors NAME:SHAPE:V,V,... ...   (f32; SHAPE like 4x3, or - for a scalar)
  st.py read FILE NAME                                 prints the values, one per line
"""
import json
import struct
import sys

FORMATS = {"F32": "f", "F64": "d", "I32": "i", "I64": "q"}


def write(path, specs):
    header, data = {}, b""
    for spec in specs:
        name, shape, values = spec.split(":")
        dims = [] if shape == "-" else [int(d) for d in shape.split("x")]
        vals = [float(v) for v in values.split(",")] if values else []
        blob = struct.pack("<%df" % len(vals), *vals)
        header[name] = {"dtype": "F32", "shape": dims, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def read(path, name):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    entry = header[name]
    begin, end = entry["data_offsets"]
    fmt = FORMATS[entry["dtype"]]
    size = struct.calcsize(fmt)
    blob = raw[8 + n + begin : 8 + n + end]
    for i in range(len(blob) // size):
        print(repr(struct.unpack("<" + fmt, blob[i * size : (i + 1) * size])[0]))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3:])
    else:
        read(sys.argv[2], sys.argv[3])
