#!/usr/bin/env python3
"""Writes examples/mlp_inputs.safetensors: inputs and params for examples/mlp.json.

Values are small multiples of 1/4, so every intermediate is exact in f32 and the
outputs can be worked out by hand (tests/cli/example_mlp.sh checks them):
loss = 0.0625, y = [[2.75, 3.25], [0.25, -0.75], [2.25, 5.25], [0.75, -1.75]].
Standard library only."""
import json
import struct
import sys

TENSORS = {
    "x": ([4, 3], [1, 0, 2, 0, 1, -1, 2, 2, 0, -1, 0, 1]),
    "target": ([4, 2], [3, 3, 0, -1, 2, 5, 1, -2]),
    "fc1.weight": ([5, 3], [1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, -1, 1, 0]),
    "fc1.bias": ([5], [0, 0.5, -0.5, 0, 1]),
    "fc2.weight": ([2, 5], [1, 0, 1, 0, 0, 0, 1, 0, 1, -1]),
    "fc2.bias": ([2], [0.25, -0.25]),
}


def main(path):
    header, data = {}, b""
    for name, (shape, values) in TENSORS.items():
        blob = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/mlp_inputs.safetensors")
