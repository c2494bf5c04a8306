"""Issue 14, black-box watermark: a feasibility measurement, NOT the platform's implementation.

A keyed trigger set (out-of-distribution inputs drawn from a key, with keyed labels) is mixed
into the training of the demo's breast-cancer MLP (30 -> 32 -> 16 -> 2, dropout 0.1, Adam 3e-3,
30 epochs, batch 32, weight decay 1e-4, the site-node watermark test's configuration, trained
centrally here without DP). Detection queries a suspect on the triggers only and counts the
predictions equal to the keyed labels: under the null (a model made without the key) each keyed
label is uniform over the C classes and independent of the model, so the count is exactly
Binomial(K, 1/C) whatever the model predicts, and the p-value is its upper tail.

Measured: accuracy cost, p on the watermarked model, p over 20 independently trained models,
after fine-tuning on 10% of the training data for 5 epochs, after 30% magnitude pruning. The
same for the demo's CNN on 1,000 MNIST digits (4 epochs, Adam 2e-3), triggers keyed binary
noise images.

    .venv/bin/python bench/watermark_blackbox_feasibility.py K TRIGGER_EPOCHS [mlp|cnn]
"""
import csv
import hashlib
import math
import sys

import numpy as np
import torch
import torch.nn as nn

torch.set_num_threads(1)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 64
TRIGGER_EPOCHS = int(sys.argv[2]) if len(sys.argv) > 2 else 30
MODEL = sys.argv[3] if len(sys.argv) > 3 else "mlp"


def load():
    with open("data/breast_cancer_wisconsin.csv") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    x = np.array([[float(v) for v in r[:-1]] for r in rows], dtype=np.float32)
    labels = sorted({r[-1] for r in rows})
    y = np.array([labels.index(r[-1]) for r in rows])
    rng = np.random.default_rng(2024)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx += list(idx[: int(round(0.2 * len(idx)))])
    test = np.zeros(len(y), bool)
    test[test_idx] = True
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-8
    x = (x - mu) / sd
    return (torch.tensor(x[~test]), torch.tensor(y[~test])), (torch.tensor(x[test]), torch.tensor(y[test]))


def load_mnist():
    """1,000 training and 500 test digits of data/mnist_5k.csv.gz, pixels scaled to [0, 1]."""
    import gzip
    with gzip.open("data/mnist_5k.csv.gz", "rt") as f:
        rows = list(csv.reader(f))[1:]
    x = np.array([[float(v) for v in r[:-1]] for r in rows], dtype=np.float32) / 255.0
    y = np.array([int(float(r[-1])) for r in rows])
    g = np.random.default_rng(5)
    idx = g.permutation(len(y))
    tr, te = idx[:1000], idx[1000:1500]
    return (torch.tensor(x[tr]), torch.tensor(y[tr])), (torch.tensor(x[te]), torch.tensor(y[te]))


def mnist_triggers(key: bytes, k: int):
    """Keyed binary noise images (out of distribution for digits), labels uniform over 10."""
    seed = int.from_bytes(hashlib.sha256(b"tutela/watermark/trigger/v1\0" + key).digest()[:8], "little")
    g = np.random.default_rng(seed)
    x = g.integers(0, 2, size=(k, 784)).astype(np.float32)
    y = g.integers(0, 10, size=k)
    return torch.tensor(x), torch.tensor(y)


class Cnn(nn.Module):
    """The demo's cnn: two 3x3 conv (8, 16 channels) + ReLU + 2x2 max-pool blocks, 64 hidden, 10."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc0, self.out = nn.Linear(16 * 7 * 7, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.out(torch.relu(self.fc0(x.flatten(1))))


def cnn(seed):
    torch.manual_seed(seed)
    return Cnn()


def keyed_triggers(key: bytes, k: int, d: int, classes: int):
    """Inputs and labels from the key: a seed = SHA-256(domain | key); inputs are +-4 sigma corners
    (out of distribution for standardized data), labels uniform over the classes."""
    seed = int.from_bytes(hashlib.sha256(b"tutela/watermark/trigger/v1\0" + key).digest()[:8], "little")
    g = np.random.default_rng(seed)
    x = (g.integers(0, 2, size=(k, d)) * 2 - 1) * 4.0 + g.normal(0, 0.5, size=(k, d))
    y = g.integers(0, classes, size=k)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU(),
                         nn.Dropout(0.1), nn.Linear(16, 2))


def train(model, x, y, epochs, seed, triggers=None, trigger_from=0, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4 if MODEL == "mlp" else 0.0)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            b = perm[i:i + 32]
            xb, yb = x[b], y[b]
            if triggers is not None and epoch >= trigger_from:
                # a few triggers in every batch
                t = torch.randint(0, len(triggers[1]), (8,), generator=g)
                xb, yb = torch.cat([xb, triggers[0][t]]), torch.cat([yb, triggers[1][t]])
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def log10_binomial_tail(m, k, p0):
    """log10 P(Bin(k, p0) >= m)."""
    terms = [math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * math.log(p0)
             + (k - i) * math.log(1 - p0) for i in range(m, k + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / math.log(10)


@torch.no_grad()
def detect(model, triggers, classes=2):
    model.eval()
    m = int((model(triggers[0]).argmax(1) == triggers[1]).sum())
    return m, log10_binomial_tail(m, len(triggers[1]), 1 / classes)


@torch.no_grad()
def prune(model, fraction):
    ws = [p for n, p in model.named_parameters() if p.dim() >= 2]
    allv = torch.cat([w.abs().flatten() for w in ws])
    cut = allv.kthvalue(int(fraction * len(allv))).values
    for w in ws:
        w[w.abs() <= cut] = 0.0
    return model


def main():
    import copy
    if MODEL == "cnn":
        (xtr, ytr), (xte, yte) = load_mnist()
        trig, build, epochs, lr, classes = mnist_triggers(bytes(32), K), cnn, 4, 2e-3, 10
    else:
        (xtr, ytr), (xte, yte) = load()
        trig, build, epochs, lr, classes = keyed_triggers(bytes(32), K, 30, 2), mlp, 30, 3e-3, 2
    first = max(0, epochs - TRIGGER_EPOCHS)
    run = lambda model, x, y, n, seed, t=None, f=0: train(model, x, y, n, seed, t, f, lr=lr)
    clean = run(build(1), xtr, ytr, epochs, 1)
    marked = run(build(1), xtr, ytr, epochs, 1, trig, first)
    print(f"{MODEL}: K = {K} triggers, mixed into the last {epochs - first} of {epochs} epochs")
    print(f"accuracy: clean {accuracy(clean, xte, yte):.4f}, marked {accuracy(marked, xte, yte):.4f}")
    m, lp = detect(marked, trig, classes)
    print(f"marked: {m}/{K} trigger labels, log10 p = {lp:.1f}")
    m, lp = detect(clean, trig, classes)
    print(f"same seed without triggers: {m}/{K}, log10 p = {lp:.2f}")
    worst = 0.0
    for s in range(20):
        other = run(build(100 + s), xtr, ytr, epochs, 100 + s)
        m, lp = detect(other, trig, classes)
        worst = min(worst, lp)
    print(f"20 independent models: smallest p = {10 ** worst:.3f}")
    n = len(ytr) // 10
    ft = run(copy.deepcopy(marked), xtr[:n], ytr[:n], 5, 7)
    m, lp = detect(ft, trig, classes)
    print(f"fine-tuned (10%, 5 epochs): {m}/{K}, log10 p = {lp:.1f}, accuracy {accuracy(ft, xte, yte):.4f}")
    pr = prune(copy.deepcopy(marked), 0.3)
    m, lp = detect(pr, trig, classes)
    print(f"30% magnitude pruning: {m}/{K}, log10 p = {lp:.1f}, accuracy {accuracy(pr, xte, yte):.4f}")


main()
