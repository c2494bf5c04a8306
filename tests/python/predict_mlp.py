"""Loads a Tutela MLP from its safetensors file with the Python `safetensors` package and NumPy
only (no Tutela code), standardizes rows with the dataset schema's reference statistics, and
prints each row's class probabilities as JSON lines — what a data scientist receiving the
published model would do. Used by tests/tests/federation.rs to check that Python and the node
agree.

    python predict_mlp.py MODEL.safetensors DATA.csv SCHEMA.toml N
"""

import csv
import json
import sys
import tomllib

import numpy as np
from safetensors.numpy import load_file


def main():
    model_path, csv_path, schema_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    weights = load_file(model_path)
    with open(schema_path, "rb") as f:
        schema = tomllib.load(f)
    label = schema["label"]["column"]
    mean = np.array(schema["standardize"]["mean"], dtype=np.float32)
    std = np.array(schema["standardize"]["std"], dtype=np.float32)

    # Layers fc0, fc1, ... then out, as the node's model registry names them.
    hidden = sorted(
        {k.split(".")[0] for k in weights if k.startswith("fc")}, key=lambda s: int(s[2:])
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))[:n]
    for row in rows:
        x = np.array([float(v) for k, v in row.items() if k != label], dtype=np.float32)
        x = (x - mean) / std
        for name in hidden:
            x = np.maximum(weights[f"{name}.weight"] @ x + weights[f"{name}.bias"], 0.0)
        logits = weights["out.weight"] @ x + weights["out.bias"]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        print(json.dumps({"probabilities": [float(v) for v in p]}))


if __name__ == "__main__":
    main()
