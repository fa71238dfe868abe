"""``mirror``: Mirror-CFE (Chowdhury et al., ICCV 2025; issue 12, ``docs/mirror.md``) as a rendering method.

Each query's feature map Z_s is moved along the path Z_k = Z_s + k (Z_1 - Z_s) to its refined reflection across
the boundary between the predicted class s and the true class t (:mod:`fgvce_jax.mirror.geometry`); the
decoder trained by ``fgvce train-decoder`` renders every Z_k of the grid k = 0, 0.05, ..., 1, and the full
classifier reads the renders (:func:`fgvce_jax.mirror.explain.explain`). The counterfactual is the first render
at k >= 0.5 assigned to t; a query with none is a failure with its reason code (``never_t``,
``t_only_below_half``). One edit per query: the whole feature map moves.

Stored per query: ``k_first`` (NaN on failure), ``p_t_path`` (K,) and ``pred_path`` (K,) along the grid, ``l1``
(mean |u_cf - u_src| in [0, 1] pixels) as Parquet columns; in the npz the counterfactual (S, S, 3) in the
classifier's input space (the k = 1 render where none flipped) and the path (K, S, S, 3) as uint8 pixels.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from fgvce_jax import figures, store
from fgvce_jax.counterfactual.methods.registry import Figure, Rendered, RenderingMethod, register
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import explain as mirror_explain
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror import metrics as mm

@dataclasses.dataclass(frozen=True)
class MirrorParams:
    """decoder: the directory ``fgvce train-decoder --out`` wrote for this classifier (required)."""

    decoder: str | None = dataclasses.field(default=None, metadata={
        "type": str, "metavar": "DIR", "help": "directory of a decoder trained for this model by `fgvce train-decoder` (required)"})

    def validate(self) -> None:
        """FgvceError when no decoder is named."""
        if not self.decoder:
            raise FgvceError("method mirror needs a trained decoder: pass --mirror-decoder DIR "
                             "(train one with `fgvce train-decoder`)")


class Prepared(NamedTuple):
    """The loaded decoder and the data's normalisation (per-channel mean and std, (3,))."""

    decoder: mirror_explain.LoadedDecoder
    mean: np.ndarray
    std: np.ndarray


def enlarge(image: np.ndarray, side: int = 128) -> np.ndarray:
    """(S, S, 3) uint8 -> nearest-neighbour enlarged to at least ``side`` pixels (an integer factor)."""
    return figures.enlarge(image, max(1, -(-side // image.shape[0])))


def difference_map(cf: np.ndarray, src: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 x2 -> (S, S, 3) uint8: mean |cf - src| over channels, scaled to its maximum, as red on
    white (white: unchanged)."""
    d = np.abs(cf.astype(np.float32) - src.astype(np.float32)).mean(-1)
    d = d / d.max() if d.max() > 0 else d
    fade = np.round(255 * (1 - d)).astype(np.uint8)
    return np.stack([np.full_like(fade, 255), fade, fade], -1)


@register("mirror")
class Mirror(RenderingMethod):
    """Mirror-CFE: the decoded path to the reflection across the s/t boundary; the first render assigned to t."""

    Params = MirrorParams
    needs = "decoder (fgvce train-decoder)"
    metric_columns = {"d_val": "D.Val ↑", "l1": "L1 ↓", "lpips": "LPIPS ↓", "fd_classifier": "FD-classifier ↓",
                      "failures": "Failures ↓", "mean_k_first": "Mean k_first"}

    def prepare(self, split_model, params, dataset) -> Prepared:
        """The decoder of ``--mirror-decoder`` for these weights (one-line errors: a head that is not GAP +
        linear, no decoder there, one trained for other weights)."""
        geo.linear_head(split_model, params)
        decoder = mirror_explain.load_decoder(self.params.decoder, split_model, params)
        # on the devices the classifier's weights are on (the pipeline replicates them over its mesh)
        decoder = decoder._replace(weights=jax.device_put(decoder.weights, jax.tree.leaves(params)[0].sharding))
        pre = dataset.preprocessing
        return Prepared(decoder, np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32))

    def artefact(self) -> dict:
        """The decoder's content fingerprint: results of a decoder retrained in the same directory are not reused."""
        root = Path(self.params.decoder).expanduser().absolute()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {"decoder": store.config_hash({str(p.relative_to(root)): store.file_digest(p) for p in files})}

    def explain_batch(self, prepared, split_model, params, images, true, pred, keys) -> Rendered:
        """Mirror-CFE on the queries (mistakes: the pipeline refuses others), s = pred, t = true (see the module
        docstring)."""
        ks = np.asarray(geo.DEFAULT_KS, np.float32)
        e = mirror_explain.explain(split_model, params, prepared.decoder, images, pred, true, ks)
        q = np.arange(len(true))
        cf = e.images[q, mirror_explain.counterfactual_index(e.k_first, ks)]  # the k = 1 render on failure
        return Rendered(success=e.success, reason=e.reason, n_edits=np.ones(len(q), np.int32),
                        columns={"k_first": e.k_first.astype(np.float32), "p_t_path": e.p_t.astype(np.float32),
                                 "pred_path": e.pred.astype(np.int32),
                                 "l1": mm.l1(cf, images, prepared.mean, prepared.std).astype(np.float32)},
                        arrays={"counterfactual": cf, "source": np.asarray(images, np.float32),
                                "path": mm.to_pixels(e.images, prepared.mean, prepared.std)})

    def metrics(self, split_model, params, dataset, stored) -> dict[str, float]:
        """D.Val of all counterfactuals; L1 and LPIPS to the source and the mean k_first over the successful
        ones; the share of failures; FD-classifier between the query split's images of the target classes and
        the counterfactuals (NaN with fewer than 2 of either)."""
        mean, std = (np.asarray(v, np.float32) for v in (dataset.preprocessing.mean, dataset.preprocessing.std))
        a, ok = stored.arrays, np.asarray(stored.success, bool)
        cf, src, t = a["counterfactual"], a["source"], np.asarray(stored.true)
        real = np.flatnonzero(np.isin(dataset.labels, np.unique(t)))
        return {"d_val": mm.d_val(split_model, params, cf, t) if len(t) else float("nan"),
                "l1": float(a["l1"][ok].mean()) if ok.any() else float("nan"),
                "lpips": float(mm.lpips(cf[ok], src[ok], mean, std).mean()) if ok.any() else float("nan"),
                "fd_classifier": (mm.fd_classifier(split_model, params, dataset.images(real), cf)
                                  if min(len(real), len(cf)) >= 2 else float("nan")),
                "failures": float(1 - ok.mean()) if len(ok) else float("nan"),
                "mean_k_first": float(a["k_first"][ok].mean()) if ok.any() else float("nan")}

    def figures(self, row: dict, arrays: dict, query_image: np.ndarray) -> list[Figure]:
        """Source | first counterfactual | difference; the path as a strip (every other k) and as a GIF."""
        path = arrays["path"]
        src, cf = path[0], path[mirror_explain.counterfactual_index([row["k_first"]])[0]]
        where = f"k = {row['k_first']:.2f}" if row["success"] else "none flipped: the k = 1 render"
        white = np.full((path.shape[1], 2, 3), 255, np.uint8)
        trio = np.concatenate([enlarge(x) for x in (src, white, cf, white, difference_map(cf, src))], 1)
        strip = np.concatenate([enlarge(x, 64) for x in path[::2]], 1)
        return [Figure(f"source (k = 0) | counterfactual ({where}) | |difference| (red: changed)", trio),
                Figure("the path k = 0, 0.1, ..., 1 (k = 0.5: the boundary, 1: the mirror image)", strip),
                Figure("the path, animated (k = 0 to 1 in steps of 0.05)", np.stack([enlarge(x) for x in path]))]
