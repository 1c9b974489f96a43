#!/usr/bin/env python3
"""Trains streamscore's tiny test models on synthetic data and writes them as ONNX.

Models (input: float32 [N, 4] = [tx_1h, amount_24h, rides_1h, amount]):
  fraud-logreg.onnx  logistic regression  -> output "score" [N, 1] (probability of fraud)
  fraud-mlp.onnx     MLP 4 -> 16 (ReLU) -> 1 (sigmoid) -> output "score" [N, 1]
  nan-score.onnx     sqrt(-amount) -> output "score" [N, 1]: finite for amount <= 0 (so the
                     worker's probe on zeros passes), NaN for any positive amount; not trained,
                     it exists to test what the worker does with a NaN score
  fraud-gbt-sklearn.onnx, fraud-lgbm.onnx, fraud-xgb.onnx
                     gradient-boosted trees (scikit-learn, LightGBM, XGBoost; 60 trees each) in
                     their libraries' ONNX converters (ai.onnx.ml TreeEnsembleClassifier, no
                     ZipMap): output #0 the label [N], output #1 the probabilities [N, 2]. Their
                     reference scores are the training library's predict_proba.

The graphs use only standard ONNX operators (MatMul, Add, Relu, Sigmoid) so every
runtime loads them. Each model comes with `<name>.reference.json`: fixed inputs and
the scores computed here with numpy from the trained weights; the worker's tests
compare tract's scores with these. Deterministic: fixed seeds, so re-running
reproduces the committed files byte for byte.

Usage: python make_models.py <output-dir>
       python make_models.py --bench-tree <file.onnx>   (the benchmark's 300-tree model)
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


# Tree ensembles: scored by ONNX Runtime (model.runtime: onnxruntime or auto). Each is trained on
# the same synthetic data by its own library and converted by that library's ONNX converter,
# without ZipMap, so output #1 is the probability tensor [N, 2]. The reference scores are the
# training library's own predict_proba (P(fraud)), on the probe rows and on TREE_ROWS rows of
# held-out data, so the worker's tests check the conversion and the runtime end to end.
TREE_ROWS = 200


def stable(model, name):
    """The converters name the graph with a random UUID and list opsets in set order: fix both
    so that the files are reproducible byte for byte."""
    model.graph.name = name
    # LightGBM's converter declares the label output as [1] whatever the batch: declare [N], as
    # the runtime produces (ONNX Runtime warns about the mismatch at every run otherwise).
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
    opsets = sorted(((o.domain, o.version) for o in model.opset_import))
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.append(helper.make_opsetid(domain, version))
    return model


def tree_models(rng):
    """Yields (name, onnx bytes, predict_proba function) for each training library."""
    from lightgbm import LGBMClassifier
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType as MlFloat
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier
    from xgboost import XGBClassifier

    x, y = synthetic(20000, rng)
    opsets = {"": 15, "ai.onnx.ml": 3}
    gbt = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=7).fit(x, y)
    m = to_onnx(gbt, x[:1], options={id(gbt): {"zipmap": False}}, target_opset=opsets)
    yield "fraud-gbt-sklearn", stable(m, "fraud-gbt-sklearn"), gbt.predict_proba
    lgbm = LGBMClassifier(n_estimators=60, num_leaves=15, random_state=7, deterministic=True,
                          force_row_wise=True, n_jobs=1, verbose=-1).fit(x, y)
    m = convert_lightgbm(lgbm, initial_types=[("input", MlFloat([None, len(FEATURES)]))],
                         zipmap=False, target_opset=15)
    yield "fraud-lgbm", stable(m, "fraud-lgbm"), lgbm.predict_proba
    xgb = XGBClassifier(n_estimators=60, max_depth=4, random_state=7, n_jobs=1, tree_method="exact").fit(x, y)
    m = convert_xgboost(xgb, initial_types=[("input", MlFloat([None, len(FEATURES)]))], target_opset=15)
    yield "fraud-xgb", stable(m, "fraud-xgb"), xgb.predict_proba


def bench_tree_model(out, trees=300, depth=6):
    """The benchmark's tree model: LightGBM, `trees` trees of depth `depth`."""
    from lightgbm import LGBMClassifier
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType as MlFloat

    x, y = synthetic(50000, np.random.default_rng(11))
    lgbm = LGBMClassifier(n_estimators=trees, max_depth=depth, num_leaves=2 ** depth, min_child_samples=5,
                          random_state=7, deterministic=True, force_row_wise=True, n_jobs=1,
                          verbose=-1).fit(x, y)
    m = convert_lightgbm(lgbm, initial_types=[("input", MlFloat([None, len(FEATURES)]))],
                         zipmap=False, target_opset=15)
    data = stable(m, f"bench-trees-{trees}x{depth}").SerializeToString()
    Path(out).write_bytes(data)
    print(f"{out}: {trees} trees of depth {depth}, {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}")


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
        f32 = [(w.astype(np.float32), b.astype(np.float32), a) for w, b, a in layers]
        write_model(out, name, graph(name, f32), probe, forward(f32, probe)[:, 0], indent=2)
    # The reference holds only inputs with a finite score (JSON has no NaN).
    inputs = np.array([[0, 0, 0, 0], [1, 50, 0, -4], [3, 300, 1, -0.25]], dtype=np.float32)
    write_model(out, "nan-score", nan_score_model(), inputs, np.sqrt(-inputs[:, 3]), indent=2)
    held_out, _ = synthetic(TREE_ROWS, np.random.default_rng(99))
    inputs = np.concatenate([probe, held_out]).astype(np.float32)
    for name, model, predict_proba in tree_models(np.random.default_rng(7)):
        write_model(out, name, model, inputs, predict_proba(inputs)[:, 1])


def write_model(out, name, model, inputs, scores, indent=None):
    """Writes <name>.onnx and <name>.reference.json (the inputs and their expected scores)."""
    data = model.SerializeToString()
    (out / f"{name}.onnx").write_bytes(data)
    ref = {
        "model": f"{name}.onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "features": FEATURES,
        "inputs": inputs.tolist(),
        "scores": [float(s) for s in scores],
    }
    (out / f"{name}.reference.json").write_text(json.dumps(ref, indent=indent) + "\n")
    print(f"{name}: {len(data)} bytes sha256={ref['sha256']} scores[:6]={np.round(scores[:6], 4).tolist()}")

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--bench-tree":
        bench_tree_model(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else ".")
