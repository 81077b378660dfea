"""Independent reference values for probex's evaluate metrics, computed with scikit-learn/NumPy.

Writes metrics.json beside this script; stages/tests/golden_metrics.rs checks the Rust code
against it. Regenerate (only when a case is added or changed) with:

    python -m venv /tmp/venv && /tmp/venv/bin/pip install scikit-learn numpy
    /tmp/venv/bin/python stages/tests/golden/make_golden.py

Every input is rounded to float32 first, so Rust (which stores encodings as f32) sees exactly the
numbers scikit-learn saw; scikit-learn computes in float64 on them. The one-class, kNN and
retrieval references follow the official ProbeX `downstream_generative.py` (FAISS IndexFlatL2 =
squared L2; LedoitWolf().mahalanobis = squared distances; anomalies are the ROC positives), with
scikit-learn's brute-force neighbours standing in for FAISS.
"""

import json
import os

import numpy as np
import sklearn
from sklearn.covariance import LedoitWolf
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

rng = np.random.default_rng(20250607)


def f32(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def flat(a):
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def sq_dists(q, ref):
    return ((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1)


# ---------------------------------------------------------------- ROC-AUC
roc = []
s = f32(rng.normal(size=50))
y = rng.random(50) < 0.3 + 0.4 * (s > 0)
roc.append(("continuous", s, y))
s = f32(rng.integers(0, 5, size=40))  # heavy ties
y = rng.random(40) < 0.2 * s
roc.append(("ties", s, y))
s = f32(rng.normal(size=20))
y = np.zeros(20, dtype=bool)
y[7] = True  # a single positive
roc.append(("one_positive", s, y))
roc_cases = [
    {"name": n, "scores": flat(s), "positives": [bool(v) for v in y], "auc": float(roc_auc_score(y, s))}
    for n, s, y in roc
]

# ---------------------------------------------------------------- Ledoit-Wolf
lw_cases = []
for name, n, d in [("tall", 30, 5), ("wide", 8, 12), ("many", 200, 3), ("one_feature", 15, 1),
                   ("two_samples", 2, 4), ("constant_column", 40, 6)]:
    a = rng.normal(size=(d, d))
    x = f32(rng.normal(size=(n, d)) @ a + rng.normal(size=d))
    if name == "constant_column":
        x[:, 2] = 1.5
    q = f32(rng.normal(size=(7, d)) @ a)
    lw = LedoitWolf().fit(x)
    lw_cases.append({
        "name": name, "n": n, "d": d, "x": flat(x), "queries": flat(q),
        "location": flat(lw.location_), "covariance": flat(lw.covariance_),
        "shrinkage": float(lw.shrinkage_), "precision": flat(lw.get_precision()),
        "mahalanobis": flat(lw.mahalanobis(q)),
    })


# ---------------------------------------------------------------- one-class, kNN, retrieval
def occ(train, train_member, test, test_member, classes, method, k=2):
    """Per-class AUC as the official code: normal = test rows in the class, anomalies = the rest."""
    per_class = {}
    for c in range(classes):
        ref = train[train_member[:, c]]
        normal = test[test_member[:, c]]
        anomal = test[~test_member[:, c]]
        if len(ref) == 0 or len(normal) == 0 or len(anomal) == 0:
            continue
        if method == "knn":
            nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(ref)
            score = lambda z: (nn.kneighbors(z)[0] ** 2).mean(axis=1)
        else:
            lw = LedoitWolf().fit(ref)
            score = lw.mahalanobis
        truth = np.concatenate([np.zeros(len(normal)), np.ones(len(anomal))])
        per_class[c] = float(roc_auc_score(truth, np.concatenate([score(normal), score(anomal)])))
    return {"per_class": {str(c): v for c, v in per_class.items()},
            "mean": float(np.mean(list(per_class.values())))}


# Single-label: 5 classes with their own centres; class 4 has train models but no test models.
classes, d = 5, 6
centres = rng.normal(scale=1.5, size=(classes, d))
train_y = np.repeat(np.arange(classes), [6, 9, 4, 7, 5])
test_y = np.repeat(np.arange(4), [4, 3, 5, 3])
train_x = f32(centres[train_y] + rng.normal(size=(len(train_y), d)))
test_x = f32(centres[test_y] + rng.normal(size=(len(test_y), d)))
onehot = lambda y: np.eye(classes, dtype=bool)[y]

knn_single = KNeighborsClassifier(n_neighbors=2, algorithm="brute").fit(train_x, train_y)
pred_single = knn_single.predict(test_x)

single = {
    "d": d, "classes": classes,
    "train": flat(train_x), "train_labels": [int(v) for v in train_y],
    "test": flat(test_x), "test_labels": [int(v) for v in test_y],
    "occ_knn": occ(train_x, onehot(train_y), test_x, onehot(test_y), classes, "knn"),
    "occ_ledoit": occ(train_x, onehot(train_y), test_x, onehot(test_y), classes, "ledoit"),
    "knn_predictions": [int(v) for v in pred_single],
    "knn_accuracy": float(accuracy_score(test_y, pred_single)),
}

# Multi-label: 6 classes, each model in 2-4 of them (as Model-J's multi-hot CIFAR targets).
classes_m, d_m = 6, 5
mix = rng.normal(size=(classes_m, d_m))


def multi_hot(n):
    hot = np.zeros((n, classes_m), dtype=bool)
    for row in hot:
        row[rng.choice(classes_m, size=rng.integers(2, 5), replace=False)] = True
    return hot


train_h, test_h = multi_hot(30), multi_hot(14)
train_m = f32(train_h @ mix + 0.7 * rng.normal(size=(30, d_m)))
test_m = f32(test_h @ mix + 0.7 * rng.normal(size=(14, d_m)))
knn_multi = KNeighborsClassifier(n_neighbors=2, algorithm="brute").fit(train_m, train_h.astype(int))
pred_multi = knn_multi.predict(test_m)

multi = {
    "d": d_m, "classes": classes_m,
    "train": flat(train_m), "train_hot": flat(train_h), "test": flat(test_m), "test_hot": flat(test_h),
    "occ_knn": occ(train_m, train_h, test_m, test_h, classes_m, "knn"),
    "occ_ledoit": occ(train_m, train_h, test_m, test_h, classes_m, "ledoit"),
    "knn_predictions": flat(pred_multi),
    "knn_accuracy": float((pred_multi.astype(bool) == test_h).mean()),
}

# Retrieval over train + test of the single-label set: the first model of each class queries.
pool = np.concatenate([train_x, test_x])
pool_y = np.concatenate([train_y, test_y])
queries = [int(np.argmax(pool_y == c)) for c in range(classes)]
k = 3
nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(pool)
_, idx = nn.kneighbors(pool[queries])
retrieval = {"d": d, "pool": flat(pool), "labels": [int(v) for v in pool_y], "queries": queries, "k": k,
             "neighbours": [], "distances": []}
for q, row in zip(queries, idx):
    row = [int(i) for i in row if i != q][:k]
    retrieval["neighbours"].append(row)
    retrieval["distances"].append(flat(sq_dists(pool[[q]], pool[row])[0]))

# ---------------------------------------------------------------- accuracies
logits = f32(rng.normal(size=(9, 7)))
targets = rng.random((9, 7)) < 0.5
labels = rng.integers(0, 7, size=9)
enc = f32(rng.normal(size=(11, 4)))
class_vecs = f32(rng.normal(size=(3, 4)))
cos_labels = rng.integers(0, 3, size=11)
norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
cos_pred = (norm(enc) @ norm(class_vecs).T).argmax(axis=1)
accuracy = {
    "logits": flat(logits), "classes": 7, "targets": flat(targets), "labels": [int(v) for v in labels],
    "multilabel": float(((1 / (1 + np.exp(-logits)) > 0.5) == targets).mean()),
    "top1": float(accuracy_score(labels, logits.argmax(axis=1))),
    "enc": flat(enc), "class_vecs": flat(class_vecs), "cos_d": 4, "cos_labels": [int(v) for v in cos_labels],
    "cos_predictions": [int(v) for v in cos_pred],
    "cos_top1": float(accuracy_score(cos_labels, cos_pred)),
}

out = {
    "generator": f"make_golden.py, scikit-learn {sklearn.__version__}, numpy {np.__version__}",
    "roc_auc": roc_cases,
    "ledoit_wolf": lw_cases,
    "single_label": single,
    "multi_label": multi,
    "retrieval": retrieval,
    "accuracy": accuracy,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics.json")
# One case per line: small diffs when a case changes, and still valid JSON.
lines = []
for key, value in out.items():
    if isinstance(value, list):
        body = "[\n" + ",\n".join("  " + json.dumps(v) for v in value) + "\n ]"
    else:
        body = json.dumps(value)
    lines.append(f" {json.dumps(key)}: {body}")
with open(path, "w") as f:
    f.write("{\n" + ",\n".join(lines) + "\n}\n")
print("wrote", path)
