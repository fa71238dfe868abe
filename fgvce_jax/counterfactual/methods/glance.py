"""``glance``: GLANCE-style twin-surrogate explanations (issue 13, ``docs/glance.md``; a reconstruction from the
paper's abstract, every choice ours) as a rendering method.

Per query x with true class y: the concepts c = E(h(x)) of the surrogate that ``fgvce train-surrogate`` fitted
for this classifier; each concept's importance, its average causal effect on p_y through the linear
structural model of the causal graph; the smallest greedy set of interventions that moves the surrogate's
prediction to y (:func:`fgvce_jax.glance.explain.explain`); and, when a generator was distilled, the rendered
strips G(c + a effects[j]) for every concept j and shift a in s_j (the standard deviation of c_j's noise
term), each scored by the full classifier (:func:`fgvce_jax.glance.explain.strips`, G's noise from the
query's own key). Success: the intervention set
moves the surrogate's prediction to y (``reason`` ``flipped``, else ``set_exhausted``); ``n_edits``: the
interventions in the set.

Stored per query (Parquet): ``p_y`` and ``p_y_after`` (the surrogate's p_y before and after the set),
``top_concept`` (index of the largest |importance|), lists ``concepts`` (P), ``importance`` (P),
``intervention_set`` (max_set concept indices, -1 once done) and ``intervention_steps`` (their shifts in
s_j, the standard deviation of the concept's noise term);
in the npz with a generator: ``strips`` (P, M, S, S, 3) uint8 pixels and ``strip_p_y`` (P, M), p_y of the full
classifier on each rendered frame. Concept j's name is node j of the run's graph (``graph.json``).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from fgvce_jax import morphometrics
from fgvce_jax.counterfactual.methods.registry import Figure, Rendered, RenderingMethod, register
from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import explain as glance_explain
from fgvce_jax.glance import fit
from fgvce_jax.glance import metrics as gm
from fgvce_jax.mirror import metrics as mm
from fgvce_jax.store import config_hash, file_digest

METRIC_IMAGES = 512  # images of the query split the global model's metrics read (the first ones)


@dataclasses.dataclass(frozen=True)
class GlanceParams:
    """surrogate: the directory ``fgvce train-surrogate --out`` wrote for this classifier (required);
    max_set: the most interventions in a query's set."""

    surrogate: str | None = dataclasses.field(default=None, metadata={
        "type": str, "metavar": "DIR", "help": "directory of the concept surrogate, graph and generator that `fgvce train-surrogate` fitted for "
                "this model (required)"})
    max_set: int = dataclasses.field(default=3, metadata={"help": "most interventions in a query's set"})

    def validate(self) -> None:
        """FgvceError when no surrogate is named or ``max_set`` is not a positive integer."""
        if not self.surrogate:
            raise FgvceError("method glance needs a fitted surrogate: pass --glance-surrogate DIR "
                             "(fit one with `fgvce train-surrogate`)")
        if isinstance(self.max_set, bool) or not isinstance(self.max_set, int) or self.max_set < 1:
            raise FgvceError(f"--glance-max-set must be a positive integer; got {self.max_set!r}")


class Prepared(NamedTuple):
    """The loaded global model (on the classifier's devices) and the data's normalisation (3,)."""

    loaded: fit.Loaded
    mean: np.ndarray
    std: np.ndarray


def on_devices(loaded: fit.Loaded, sharding) -> fit.Loaded:
    """``loaded`` with the surrogate's and the generator's weights and the head placed with ``sharding``."""
    graphdef, state = nnx.split(loaded.fitted.model)
    model = nnx.merge(graphdef, jax.device_put(state, sharding))
    generator = loaded.generator and dataclasses.replace(loaded.generator,
                                                         params=jax.device_put(loaded.generator.params, sharding))
    return dataclasses.replace(loaded, fitted=dataclasses.replace(loaded.fitted, model=model), generator=generator,
                               head=tuple(jax.device_put(a, sharding) for a in loaded.head))


def strip_figure(strips: np.ndarray, p_y: np.ndarray, deltas, names, importance: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 picture of a query's strips (P, M, S, S, 3): a row per concept (its name and
    importance), a column per shift, p_y of the full classifier above each frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, m = strips.shape[:2]
    fig, axes = plt.subplots(p, m, figsize=(1.1 * m + 1.6, 1.1 * p), squeeze=False)
    for j in range(p):
        for k in range(m):
            ax = axes[j, k]
            ax.imshow(strips[j, k])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{p_y[j, k]:.2f}", fontsize=6, pad=1)
            if j == p - 1:
                ax.set_xlabel(f"{deltas[k]:+g} sd", fontsize=6)
        axes[j, 0].set_ylabel(f"{names[j]}\nACE {importance[j]:+.2f}", rotation=0, ha="right", va="center",
                              fontsize=6)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


@register("glance")
class Glance(RenderingMethod):
    """GLANCE-style: concept importances from interventions in a causal graph, the smallest set of interventions
    that fixes the prediction, and the interventions rendered by a generator distilled from the classifier."""

    Params = GlanceParams
    needs = "surrogate, causal graph and generator (fgvce train-surrogate)"
    metric_columns = {"surrogate_agreement": "Surrogate agreement ↑", "concept_r2": "Concept R² (mean) ↑",
                      "generator_agreement": "Generator agreement ↑", "fd_classifier": "FD-classifier ↓",
                      "shd": "SHD to the true graph ↓", "slant_first": "Slant ranks first"}

    def _dir(self) -> Path:
        return Path(self.params.surrogate).expanduser().absolute()

    def prepare(self, split_model, params, dataset) -> Prepared:
        """The artefacts of ``--glance-surrogate`` for these weights (:func:`fgvce_jax.glance.fit.load`: one-line
        errors for a head without a pooled latent, a missing artefact, one fitted for other weights)."""
        loaded = on_devices(fit.load(self._dir(), split_model, params), jax.tree.leaves(params)[0].sharding)
        pre = dataset.preprocessing
        return Prepared(loaded, np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32))

    def artefact(self) -> dict:
        """The content fingerprint of the surrogate directory's files (a refit in place is another config)."""
        root = self._dir()
        return {"surrogate": config_hash({str(p.relative_to(root)): file_digest(p)
                                          for p in sorted(root.rglob("*")) if p.is_file()})}

    def explain_batch(self, prepared, split_model, params, images, true, pred, keys) -> Rendered:
        """The explanations of the module docstring for y = the true class."""
        loaded = prepared.loaded
        model, head = loaded.fitted.model, loaded.head
        h = mm.pooled_features(split_model, params, images)
        e = glance_explain.explain(model, head, loaded.effects, h, true, self.params.max_set)
        arrays = {}
        if loaded.generator is not None:
            rows = [glance_explain.strips(model, head, loaded.effects, loaded.generator, split_model, params,
                                          h[i:i + 1], np.asarray(true)[i:i + 1], keys[i]) for i in range(len(true))]
            arrays = {"strips": np.concatenate([mm.to_pixels(r["images"], prepared.mean, prepared.std) for r in rows]),
                      "strip_p_y": np.concatenate([r["p_y_classifier"] for r in rows]).astype(np.float32)}
        success = np.asarray(e["success"], bool)
        return Rendered(success=success, reason=np.where(success, "flipped", "set_exhausted"),
                        n_edits=(np.asarray(e["set"]) >= 0).sum(1).astype(np.int32),
                        columns={"p_y": e["p_y"].astype(np.float32), "p_y_after": e["p_y_after"].astype(np.float32),
                                 "top_concept": np.abs(e["importance"]).argmax(1).astype(np.int32),
                                 "concepts": e["concepts"].astype(np.float32),
                                 "importance": e["importance"].astype(np.float32),
                                 "intervention_set": e["set"].astype(np.int32),
                                 "intervention_steps": e["set_steps"].astype(np.float32)},
                        arrays=arrays)

    def metrics(self, split_model, params, dataset, stored) -> dict[str, float]:
        """The global model's metrics (:func:`fgvce_jax.glance.metrics.generator_metrics`) on the first
        ``METRIC_IMAGES`` images of the query split (concept R^2, averaged over the context features, when they
        are the morphometrics, which are measured here); on ``morpho-digits`` the SHD to the known graph and the
        share of queries whose top concept is slant (the planted shortcut's cause). NaN where not defined."""
        loaded = self.prepare(split_model, params, dataset).loaded
        idx = np.arange(min(len(dataset), METRIC_IMAGES))
        u = (morphometrics.measure_all(dataset.read(int(i)) for i in idx)
             if tuple(loaded.fitted.names) == morphometrics.FEATURES else None)
        found = gm.generator_metrics(loaded, split_model, params, dataset.images(idx), jax.random.key(0), u=u)
        nan = float("nan")
        out = {"surrogate_agreement": found["surrogate_agreement"],
               "concept_r2": float(np.mean(list(found["concept_r2"].values()))) if "concept_r2" in found else nan,
               "generator_agreement": found.get("generator_agreement", nan),
               "fd_classifier": found.get("fd_classifier", nan), "shd": nan, "slant_first": nan}
        if dataset.name.startswith("morpho-digits"):
            out["shd"] = float(gm.structural_hamming_distance(loaded.graph, gm.morpho_truth(
                dataset.name.endswith("shortcut"))))
            slant = list(loaded.graph.nodes).index("slant")
            out["slant_first"] = float(np.mean(stored.arrays["top_concept"] == slant)) if len(stored.success) else nan
        return out

    @functools.cached_property
    def _nodes(self) -> tuple[str, ...]:
        return tuple(json.loads((self._dir() / "graph.json").read_text())["nodes"])

    def overview(self) -> list[Figure]:
        """The causal graph the surrogate's directory holds (``graph.png``), once per run."""
        from PIL import Image

        path = self._dir() / "graph.png"
        if not path.is_file():
            return []
        with Image.open(path) as im:
            return [Figure("the causal graph over the concepts, the context features and the prediction y_hat "
                           "(edge weights: the linear structural model)", np.asarray(im.convert("RGB")))]

    def figures(self, row: dict, arrays: dict, query_image: np.ndarray) -> list[Figure]:
        """The query; its intervention strips with p_y of the full classifier under each frame (with a
        generator)."""
        out = [Figure(f"the query; intervention set {self._set_text(row)}",
                      np.round(np.asarray(query_image) * 255).astype(np.uint8))]
        if "strips" in arrays:
            deltas = glance_explain.DELTAS
            out.append(Figure("interventions do(c_j += a sd_j) rendered by the generator; above each frame, p(true) "
                              "by the classifier. The frames are only as faithful as the generator: check its "
                              "agreement and FD-classifier in fgvce evaluate before reading them", strip_figure(arrays["strips"], arrays["strip_p_y"], deltas,
                                                               self._nodes, np.asarray(row["importance"]))))
        return out

    def _set_text(self, row: dict) -> str:
        steps = [(j, a) for j, a in zip(row["intervention_set"], row["intervention_steps"]) if j >= 0]
        return ", ".join(f"{self._nodes[j]} {a:+g} sd" for j, a in steps) or "(none needed)"
