"""Mirror-CFE between given classes (the paper's MNIST pairs 3<->8, 4<->9, 5<->6), not only toward a mistake's
true class: for each ordered pair (a, b), the first images of class a that the classifier assigns to a are
explained with source s = a and target t = b (:func:`fgvce_jax.mirror.explain.explain`).

:func:`decoder_figures` measures a trained decoder on every image of a split that the classifier assigns to a
class of a pair, with t that class's partner (the acceptance test's and ``benchmarks/mirror_ablation.py``'s
protocol, docs/mirror.md).
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import scipy.stats

from fgvce_jax import store
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import decoder as dec
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


def partner_queries(split_model, params, dataset, pairs=PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image of ``dataset`` the classifier assigns to a class a of ``pairs``, with t = b for (a, b):
    (x (N, S, S, 3), s (N,), t (N,)). Each a must have one partner. The whole split is classified in one call:
    meant for small splits such as the digits' test split."""
    partner = dict(pairs)
    x = np.asarray(dataset.images(np.arange(len(dataset))))
    s = np.asarray(split_model.logits(params, jnp.asarray(x)).argmax(-1))
    rows = np.flatnonzero(np.isin(s, list(partner)))
    return x[rows], s[rows], np.array([partner[int(c)] for c in s[rows]], np.int32)


def explain_in_chunks(split_model, params, decoder: mx.LoadedDecoder, x, s, t, chunk: int = 48):
    """:func:`fgvce_jax.mirror.explain.explain` over chunks of ``chunk`` queries (memory: each decodes K images
    per query), its fields concatenated."""
    parts = [mx.explain(split_model, params, decoder, x[i:i + chunk], s[i:i + chunk], t[i:i + chunk])
             for i in range(0, len(t), chunk)]
    return mx.MirrorExplanation(*(np.concatenate(field) for field in zip(*parts)))


def decoder_figures(split_model, params, decoder: mx.LoadedDecoder, dataset, pairs=PAIRS, real: int = 200,
                    rec_images: int = 64) -> dict:
    """A decoder measured on :func:`partner_queries` of ``dataset``, at the mirror images x_1 (k = 1) of every
    query, flipped or not:

    - ``queries``; ``validity_k1``: the share of x_1 the classifier assigns to t; ``success`` and
      ``mean_k_first``: a first counterfactual at some k >= 0.5, and its mean k (NaN when none);
    - ``p_t_spearman_above_half``: the share of queries whose p_t(k) has a Spearman correlation with k above
      0.5 (a constant curve counts as 0); ``p_t_rising``: the share with p_t(0) < p_t(0.5) < p_t(1);
    - ``L1_pixels``, ``LPIPS``: x_1 to the source in [0, 1] pixel units; ``D_Val``: validity after the blur;
      ``FD_classifier``: x_1 against the first ``real`` images of ``dataset`` (and ``FD_classifier_sources``,
      the sources themselves, for scale);
    - ``rec_l1``: mean |x - G(f(x))| (k = 0, normalised units) on the first ``rec_images`` images.
    """
    pre = dataset.preprocessing
    x, s, t = partner_queries(split_model, params, dataset, pairs)
    if not len(t):
        raise FgvceError(f"no image of {dataset.name} is assigned to a class of the pairs {pairs}")
    e = explain_in_chunks(split_model, params, decoder, x, s, t)
    x1, ks = e.images[:, -1], np.asarray(geo.DEFAULT_KS)
    half = len(ks) // 2
    rho = np.array([scipy.stats.spearmanr(ks, curve).statistic for curve in e.p_t])
    first = jnp.asarray(dataset.images(np.arange(min(real, len(dataset)))))
    W, _ = geo.linear_head(split_model, params)
    r = first[:rec_images]
    z, skips = dec.source_stages(split_model, params, r)
    s_r = split_model.logits(params, r).argmax(-1)
    x_0 = dec.decode(decoder.graphdef, decoder.weights, decoder.config, W, z, skips, s_r,
                     (s_r + 1) % split_model.num_classes, jnp.zeros(len(r)))
    return {"queries": int(len(t)), "validity_k1": float(np.mean(e.pred[:, -1] == t)),
            "success": float(e.success.mean()),
            "mean_k_first": float(np.nanmean(e.k_first)) if e.success.any() else float("nan"),
            "p_t_spearman_above_half": float(np.mean(np.nan_to_num(rho) > 0.5)),
            "p_t_rising": float(np.mean((e.p_t[:, -1] > e.p_t[:, half]) & (e.p_t[:, half] > e.p_t[:, 0]))),
            "L1_pixels": float(mm.l1(x1, x, pre.mean, pre.std).mean()),
            "LPIPS": float(mm.lpips(x1, x, pre.mean, pre.std).mean()),
            "D_Val": mm.d_val(split_model, params, x1, t),
            "FD_classifier": mm.fd_classifier(split_model, params, first, x1),
            "FD_classifier_sources": mm.fd_classifier(split_model, params, first, x),
            "rec_l1": float(jnp.abs(r - x_0).mean())}


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
