#!/usr/bin/env python3
"""Writes malformed .safetensors files (and one valid file) into a directory.

Usage: make_safetensors.py DIR

Each malformed file is listed in expected_safetensors.tsv next to this script
with a substring its error message must contain; valid.safetensors is not
listed (it must load). Standard library only: struct + json.
"""
import json
import os
import struct
import sys


def image(header, data=b"", header_len=None):
    """8-byte little-endian header length, header bytes, data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


def f32(*values):
    return struct.pack("<%df" % len(values), *values)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


SIX = f32(0.5, -1.25, 2.0, 3.5, -4.0, 8.25)  # 24 bytes: F32[2,3]

FILES = {
    "valid.safetensors": image(
        {"__metadata__": {"format": "cmaec"}, "w": entry("F32", [2, 3], 0, 24),
         "b": entry("I64", [1], 24, 32)},
        SIX + struct.pack("<q", -7)),
    "empty.safetensors": b"",
    "truncated_length.safetensors": b"\x10\x00\x00",
    "truncated_header.safetensors": image({"w": entry("F32", [2, 3], 0, 24)})[:20],
    "header_past_end.safetensors": image({"w": entry("F32", [2, 3], 0, 24)}, SIX,
                                         header_len=4096),
    "header_too_large.safetensors": image("{}", b"", header_len=1 << 40),
    "bad_json.safetensors": image('{"w": {"dtype": "F32", "shape": [2, 3],', SIX),
    "not_object.safetensors": image("[1, 2, 3]"),
    "offsets_past_end.safetensors": image({"w": entry("F32", [2, 3], 24, 48)}, SIX),
    "overlap.safetensors": image(
        {"a": entry("F32", [2, 3], 0, 24), "b": entry("F32", [2, 3], 16, 40)}, SIX + SIX[:16]),
    "gap.safetensors": image(
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, SIX[:20]),
    "bad_dtype.safetensors": image({"w": entry("F8_E4M3", [4], 0, 4)}, b"\x01\x02\x03\x04"),
    "size_mismatch.safetensors": image({"w": entry("F32", [2, 3], 0, 20)}, SIX[:20]),
    "rank7.safetensors": image({"w": entry("F32", [1, 1, 1, 1, 1, 1, 1], 0, 4)}, SIX[:4]),
    "negative_dim.safetensors": image({"w": entry("F32", [2, -3], 0, 24)}, SIX),
    "begin_after_end.safetensors": image({"w": entry("F32", [2, 3], 24, 0)}, SIX),
    "missing_dtype.safetensors": image({"w": {"shape": [2, 3], "data_offsets": [0, 24]}}, SIX),
    "trailing_data.safetensors": image({"w": entry("F32", [2, 3], 0, 24)}, SIX + b"\0" * 8),
    "bad_metadata.safetensors": image(
        {"__metadata__": {"epoch": 3}, "w": entry("F32", [2, 3], 0, 24)}, SIX),
    "duplicate_name.safetensors": image(
        '{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
        '"w":{"dtype":"F32","shape":[3],"data_offsets":[12,24]}}', SIX),
    "bad_utf8.safetensors": image(b'{"w\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                                  SIX[:4]),
    "bad_bool.safetensors": image({"m": entry("BOOL", [3], 0, 3)}, b"\x01\x07\x00"),
}


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: make_safetensors.py DIR\n")
        return 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in FILES.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
