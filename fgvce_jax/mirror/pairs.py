"""Mirror-CFE between given classes (the paper's MNIST pairs 3<->8, 4<->9, 5<->6), not only toward a mistake's
true class: for each ordered pair (a, b), the first images of class a that the classifier assigns to a are
explained with source s = a and target t = b (:func:`fgvce_jax.mirror.explain.explain`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgvce_jax import store
from fgvce_jax.mirror import explain as mx
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror import metrics as mm

PAIRS = ((3, 8), (8, 3), (4, 9), (9, 4), (5, 6), (6, 5))


def explain_pairs(split_model, params, decoder: mx.LoadedDecoder, dataset, pairs=PAIRS, per_pair: int = 8,
                  batch: int = 64) -> dict:
    """{"a->b": {"queries", "validity", "mean_k_first", "l1", "ids", "path" (K, S, S, 3) uint8 of the first
    query}} for each pair (a, b): up to ``per_pair`` images of class a, among the first ``batch`` of that class,
    that the classifier assigns to a. ``validity`` is the share that flips to b at some k >= 0.5; ``l1`` and
    ``mean_k_first`` are over those (NaN when none)."""
    mean, std = (np.asarray(v, np.float32) for v in (dataset.preprocessing.mean, dataset.preprocessing.std))
    out = {}
    for a, b in pairs:
        idx = np.flatnonzero(dataset.labels == a)[:batch]
        x = dataset.images(idx)
        right = np.asarray(split_model.logits(params, x)).argmax(-1) == a
        idx, x = idx[right][:per_pair], x[right][:per_pair]
        if not len(idx):
            out[f"{a}->{b}"] = {"queries": 0}
            continue
        e = mx.explain(split_model, params, decoder, x, np.full(len(idx), a), np.full(len(idx), b))
        l1 = mm.l1(e.images[np.arange(len(idx)), mx.counterfactual_index(e.k_first)], x, mean, std)
        ok = e.success
        out[f"{a}->{b}"] = {"queries": int(len(idx)), "validity": float(ok.mean()),
                            "mean_k_first": float(e.k_first[ok].mean()) if ok.any() else float("nan"),
                            "l1": float(l1[ok].mean()) if ok.any() else float("nan"),
                            "ids": [str(i) for i in dataset.ids[idx]],
                            "path": mm.to_pixels(e.images[0], mean, std)}
    return out


def write_pairs(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``out``.json (the numbers) and ``out``.png (one row per pair: the first query's path at k = 0, 0.1, ...,
    1), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = [(name, r) for name, r in result.items() if r["queries"]]
    numbers = {name: {k: v for k, v in r.items() if k != "path"} for name, r in result.items()}
    store.atomic_write_json(out.with_suffix(".json"), numbers)
    fig, axes = plt.subplots(max(len(rows), 1), 1, figsize=(11, 1.3 * max(len(rows), 1)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], rows):
        ax.imshow(np.concatenate(list(r["path"][::2]), 1))
        ax.set_yticks([])
        ax.set_xticks((np.arange(len(r["path"][::2])) + 0.5) * r["path"].shape[2])
        ax.set_xticklabels([f"{k:.1f}" for k in np.asarray(geo.DEFAULT_KS)[::2]], fontsize=7)
        ax.set_ylabel(f"{name}\nvalid {r['validity']:.2f}", rotation=0, ha="right", va="center", fontsize=8)
    axes[-1, 0].set_xlabel("k (0.5: the decision boundary, 1: the mirror image)")
    fig.tight_layout()
    png = out.with_suffix(".png")
    store.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out.with_suffix(".json"), png
