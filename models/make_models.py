#!/usr/bin/env python3
"""Trains streamscore's tiny test models on synthetic data and writes them as ONNX.

Models (input: float32 [N, 4] = [tx_1h, amount_24h, rides_1h, amount]):
  fraud-logreg.onnx  logistic regression  -> output "score" [N, 1] (probability of fraud)
  fraud-mlp.onnx     MLP 4 -> 16 (ReLU) -> 1 (sigmoid) -> output "score" [N, 1]
  nan-score.onnx     sqrt(-amount) -> output "score" [N, 1]: finite for amount <= 0 (so the
                     worker's probe on zeros passes), NaN for any positive amount; not trained,
                     it exists to test what the worker does with a NaN score

The graphs use only standard ONNX operators (MatMul, Add, Relu, Sigmoid) so every
runtime loads them. Each model comes with `<name>.reference.json`: fixed inputs and
the scores computed here with numpy from the trained weights; the worker's tests
compare tract's scores with these. Deterministic: fixed seeds, so re-running
reproduces the committed files byte for byte.

Usage: python make_models.py <output-dir>
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

FEATURES = ["tx_1h", "amount_24h", "rides_1h", "event.amount"]
# Inputs are scaled inside the graph so the model takes raw feature values.
SCALE = np.array([1 / 20.0, 1 / 2000.0, 1 / 10.0, 1 / 500.0], dtype=np.float32)


def synthetic(n, rng):
    tx = rng.poisson(3, n).astype(np.float32)
    amount = rng.gamma(2.0, 40.0, n).astype(np.float32)
    amount_24h = (amount * rng.uniform(1, 8, n)).astype(np.float32)
    rides = rng.poisson(1, n).astype(np.float32)
    # fraud-like: bursts of transactions and large amounts
    fraud = (rng.uniform(0, 1, n) < 0.08)
    tx[fraud] += rng.poisson(12, fraud.sum())
    amount[fraud] *= rng.uniform(3, 8, fraud.sum()).astype(np.float32)
    amount_24h[fraud] += amount[fraud] * 3
    x = np.stack([tx, amount_24h, rides, amount], axis=1)
    return x, fraud.astype(np.int64)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def graph(name, layers):
    """layers: list of (W, b, activation) applied to the scaled input."""
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(SCALE.reshape(1, -1), "scale"))
    nodes.append(helper.make_node("Mul", ["input", "scale"], ["x0"]))
    cur = "x0"
    for i, (w, b, act) in enumerate(layers):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32).reshape(1, -1), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]))
        out = "score" if i == len(layers) - 1 else f"h{i}"
        pre = f"z{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [pre]))
        nodes.append(helper.make_node(act, [pre], [out]))
        cur = out
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", len(FEATURES)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="streamscore-make-models")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def forward(layers, x):
    h = x * SCALE
    for w, b, act in layers:
        z = h @ w + b
        h = np.maximum(z, 0) if act == "Relu" else sigmoid(z)
    return h


def nan_score_model():
    """score = sqrt(-amount): NaN for amount > 0."""
    pick = numpy_helper.from_array(np.array([[0], [0], [0], [1]], dtype=np.float32), "pick")
    nodes = [
        helper.make_node("MatMul", ["input", "pick"], ["amount"]),
        helper.make_node("Neg", ["amount"], ["neg"]),
        helper.make_node("Sqrt", ["neg"], ["score"]),
    ]
    g = helper.make_graph(
        nodes, "nan-score",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", len(FEATURES)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [pick],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="streamscore-make-models")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    x, y = synthetic(20000, rng)
    xs = x * SCALE
    lr = LogisticRegression(max_iter=500).fit(xs, y)
    logreg = [(lr.coef_.T, lr.intercept_, "Sigmoid")]
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=7).fit(xs, y)
    mlp_layers = [(mlp.coefs_[0], mlp.intercepts_[0], "Relu"), (mlp.coefs_[1], mlp.intercepts_[1], "Sigmoid")]
    probe = np.array([
        [0, 0, 0, 0],
        [1, 50, 0, 50],
        [3, 300, 1, 80],
        [15, 4000, 0, 900],
        [30, 9000, 5, 2500],
        [2, 120.5, 2, 10.25],
    ], dtype=np.float32)
    for name, layers in [("fraud-logreg", logreg), ("fraud-mlp", mlp_layers)]:
        model = graph(name, [(w.astype(np.float32), b.astype(np.float32), a) for w, b, a in layers])
        data = model.SerializeToString()
        (out / f"{name}.onnx").write_bytes(data)
        f32 = [(w.astype(np.float32), b.astype(np.float32), a) for w, b, a in layers]
        scores = forward(f32, probe)[:, 0]
        ref = {
            "model": f"{name}.onnx",
            "sha256": hashlib.sha256(data).hexdigest(),
            "features": FEATURES,
            "inputs": probe.tolist(),
            "scores": [float(s) for s in scores],
        }
        (out / f"{name}.reference.json").write_text(json.dumps(ref, indent=2) + "\n")
        print(f"{name}: {len(data)} bytes sha256={ref['sha256']} scores={np.round(scores, 4).tolist()}")
    # The reference holds only inputs with a finite score (JSON has no NaN).
    data = nan_score_model().SerializeToString()
    (out / "nan-score.onnx").write_bytes(data)
    inputs = np.array([[0, 0, 0, 0], [1, 50, 0, -4], [3, 300, 1, -0.25]], dtype=np.float32)
    scores = np.sqrt(-inputs[:, 3])
    ref = {
        "model": "nan-score.onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "features": FEATURES,
        "inputs": inputs.tolist(),
        "scores": [float(s) for s in scores],
    }
    (out / "nan-score.reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    print(f"nan-score: {len(data)} bytes sha256={ref['sha256']} scores={scores.tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
