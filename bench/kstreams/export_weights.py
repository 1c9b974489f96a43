#!/usr/bin/env python3
"""Exports the weights of models/fraud-mlp.onnx to fraud-mlp-weights.json for the Kafka Streams
reference application (which scores the MLP in plain Java) and for the bench-compare checker.

The graph must be exactly what models/make_models.py writes for the MLP:
  input * scale -> MatMul w0 -> Add b0 -> Relu -> MatMul w1 -> Add b1 -> Sigmoid -> score
Anything else is refused, so a changed model cannot be scored silently with the wrong formula.
The file records the model's SHA-256; scripts/bench-compare.sh compares it with the model.

Usage: export_weights.py <model.onnx> <out.json>   (needs the `onnx` and `numpy` packages)
"""
import hashlib
import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper

EXPECTED_OPS = ["Mul", "MatMul", "Add", "Relu", "MatMul", "Add", "Sigmoid"]


def main(model_path, out_path):
    data = open(model_path, "rb").read()
    model = onnx.load_from_string(data)
    g = model.graph
    ops = [n.op_type for n in g.node]
    if ops != EXPECTED_OPS:
        sys.exit(f"{model_path}: unexpected graph {ops}, expected {EXPECTED_OPS}")
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    # Follow the graph by input names rather than assuming initializer names.
    mul, mm0, add0, _, mm1, add1, _ = g.node
    scale = init[mul.input[1]].reshape(-1)
    w0, b0 = init[mm0.input[1]], init[add0.input[1]].reshape(-1)
    w1, b1 = init[mm1.input[1]], init[add1.input[1]].reshape(-1)
    if w0.shape != (scale.size, b0.size) or w1.shape != (b0.size, b1.size) or b1.size != 1:
        sys.exit(f"{model_path}: unexpected shapes scale {scale.shape} w0 {w0.shape} w1 {w1.shape}")
    out = {
        "model": "fraud-mlp.onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "comment": "score = sigmoid(relu((input * scale) @ w0 + b0) @ w1 + b1), float32; "
        "w0 is [inputs][hidden], w1 is [hidden][1]. Written by export_weights.py.",
        # float32 values written as the shortest decimal that reads back to the same float32.
        "scale": [float(repr_f32(x)) for x in scale],
        "w0": [[float(repr_f32(x)) for x in row] for row in w0],
        "b0": [float(repr_f32(x)) for x in b0],
        "w1": [float(repr_f32(x)) for x in w1[:, 0]],
        "b1": float(repr_f32(b1[0])),
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path}: {scale.size} -> {b0.size} -> 1, sha256 {out['sha256']}")


def repr_f32(x):
    return np.format_float_positional(np.float32(x), unique=True, trim="-")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
