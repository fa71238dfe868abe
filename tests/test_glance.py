"""GLANCE-style surrogate, causal graph and local explanations (fgvce_jax.glance; docs/glance.md).

Most default tests use synthetic latents, heads and data with known structure; the test bed trains a
resnet_tiny on the morpho-digits twins, once at SMALL_BED's size in the default suite and once at FULL_BED's in
the slow tests (thresholds and measured figures in their docstrings).
"""
import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import causal, explain, surrogate
from fgvce_jax.glance.context import load_context_table

NAMES = ("a", "b", "c")
FITTED = surrogate.SurrogateConfig(n_free=4, hidden=64, epochs=20, batch_size=64)
TINY = surrogate.SurrogateConfig(n_free=2, hidden=32, epochs=2, batch_size=32, save_every=3)


def synthetic_classifier(n: int, seed: int = 0):
    """Pooled latents h (n, 16) >= 0 of 5 classes (prototypes + noise), a linear head (W, b) that reads the
    prototypes, context features u (n, 3) = linear functions of h plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 2, (5, 16))
    labels = rng.integers(0, 5, n)
    h = np.maximum(protos[labels] + rng.normal(0, 0.2, (n, 16)), 0).astype(np.float32)
    w = (protos - protos.mean(0)).T.astype(np.float32)
    b = np.zeros(5, np.float32)
    u = h[:, :3] @ np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 2]]) + rng.normal(0, 0.1, (n, 3))
    return h, u, (w, b)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A surrogate trained on 400 synthetic latents (20 epochs of 6 steps), with 300 held-out ones."""
    h, u, head = synthetic_classifier(700)
    out = tmp_path_factory.mktemp("surrogate")
    config = FITTED
    fit = surrogate.train_surrogate(h[:400], u[:400], head, jax.random.key(0), out, fingerprint="weights-A",
                                    names=NAMES, config=config)
    return fit, h, u, head, out


def test_surrogate_agrees_with_the_classifier(fitted):
    """argmax g(D(E(h))) == argmax g(h) on >= 95% of 300 held-out latents; the context concepts track the
    standardised context features after 120 steps (R^2 > 0.3 each; an untrained encoder gives R^2 < 0)."""
    fit, h, u, head, _ = fitted
    test = jnp.asarray(h[400:])
    c = fit.model.encode(test)
    agree = np.mean(np.argmax(surrogate.head_logits(head, fit.model.decode(c)), -1)
                    == np.argmax(surrogate.head_logits(head, test), -1))
    assert agree >= 0.95
    us = surrogate.standardise(u[400:], fit.u_mean, fit.u_std)[0]
    r2 = 1 - np.mean((np.asarray(c[:, :3]) - us) ** 2, 0) / us.var(0)
    assert np.all(r2 > 0.3), r2


def test_surrogate_refuses_another_classifier(fitted):
    """Loading or resuming a surrogate with another classifier's fingerprint is one line naming both."""
    fit, h, u, head, out = fitted
    loaded = surrogate.load_surrogate(out, "weights-A", h.shape[1])
    np.testing.assert_array_equal(loaded.model.encode(jnp.asarray(h[:5])), fit.model.encode(jnp.asarray(h[:5])))
    for call in (lambda: surrogate.load_surrogate(out, "weights-B", h.shape[1]),
                 lambda: surrogate.train_surrogate(h[:400], u[:400], head, jax.random.key(0), out,
                                                   fingerprint="weights-B", names=NAMES,
                                                   config=FITTED)):
        with pytest.raises(FgvceError, match="another classifier") as e:
            call()
        assert "\n" not in str(e.value) and "weights-A" in str(e.value) and "weights-B" in str(e.value)


def test_surrogate_resume_gives_the_same_weights(tmp_path):
    """Killed after step 4 of 6 (checkpoints every 3 steps and after the last, so it resumes mid-epoch from
    step 3) and run again: the weights and the loss history equal those of an uninterrupted run bit for bit."""
    h, u, head = synthetic_classifier(96, seed=1)
    whole = surrogate.train_surrogate(h, u, head, jax.random.key(3), tmp_path / "whole", fingerprint="w",
                                      names=NAMES, config=TINY)

    def kill(step, _):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surrogate.train_surrogate(h, u, head, jax.random.key(3), tmp_path / "cut", fingerprint="w", names=NAMES,
                                  config=TINY, on_step=kill)
    resumed = surrogate.train_surrogate(h, u, head, jax.random.key(3), tmp_path / "cut", fingerprint="w",
                                        names=NAMES, config=TINY)
    for a, b in zip(jax.tree.leaves(surrogate._pure(whole.model)), jax.tree.leaves(surrogate._pure(resumed.model))):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == whole.history and len(whole.history) == 2


def test_surrogate_needs_a_pooled_latent(tmp_path):
    """A split without a GAP + linear head (resnet_tiny at layer3: linear_head is None) is one line."""
    from fgvce_jax import models
    from fgvce_jax.models.split import split

    from flax import nnx

    split_model, params = split(nnx.eval_shape(lambda: models.create("resnet_tiny", 10)), "layer3")  # shapes only
    h, u, _ = synthetic_classifier(64)
    with pytest.raises(FgvceError, match="no GAP \\+ linear head") as e:
        surrogate.train_surrogate(h, u, split_model.linear_head(params), jax.random.key(0), tmp_path,
                                  fingerprint="w", names=NAMES, config=TINY)
    assert "\n" not in str(e.value)


def test_decorrelation_penalty():
    """sum of squared off-diagonal covariances: 0 for independent columns (by construction), 2 cov^2 else."""
    c = jnp.asarray([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(surrogate.off_diagonal_cov2(c)) == 0.0
    d = jnp.asarray([[1.0, 2.0], [-1.0, -2.0]])  # cov = [[2, 4], [4, 8]]
    assert float(surrogate.off_diagonal_cov2(d)) == pytest.approx(32.0)


def planted(n: int, edge: bool, seed: int = 0) -> np.ndarray:
    """Columns a -> b -> y, c (-> y when ``edge``), d independent, e = y + noise (a child of y in the data)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = 0.8 * a + 0.6 * rng.normal(size=n)
    c, d = rng.normal(size=n), rng.normal(size=n)
    y = 0.7 * b + (0.6 * c if edge else 0) + 0.5 * rng.normal(size=n)
    e = y + 0.5 * rng.normal(size=n)
    return np.stack([a, b, c, d, y, e], 1)


NODES = ("a", "b", "c", "d", "y", "e")


@pytest.mark.parametrize("method", causal.METHODS)
def test_causal_graph_finds_a_planted_edge_and_keeps_the_sink(method):
    """1000 rows: c -> y is found when planted and absent when not; b -> y always; d is isolated; the
    prediction y has no out-edge although e is its child in the data (e -> y instead); weights on
    standardised columns equal the least-squares ones."""
    for edge in (True, False):
        x = planted(1000, edge)
        g = causal.causal_graph(x, NODES, "y", method=method)
        assert g.has_edge("c", "y") == edge
        assert g.has_edge("b", "y") and g.has_edge("e", "y")
        assert not any(p == 4 for p, _ in g.directed) and not any(4 in e for e in g.undirected)
        assert not any(3 in e for e in g.directed + g.undirected)
        xs = (x - x.mean(0)) / x.std(0)
        pa = g.parents(4)
        np.testing.assert_allclose(g.weights[pa, 4], np.linalg.lstsq(xs[:, pa], xs[:, 4], rcond=None)[0])


def test_graph_files(tmp_path):
    """The JSON lists nodes, directed edges with weights and undirected pairs; the PNG is a picture."""
    g = causal.fit_linear_sem(planted(300, True), NODES, [(1, 4), (2, 4)], [(0, 1)])
    js, png = causal.write_graph(g, tmp_path / "graph")
    data = json.loads(js.read_text())
    assert data["nodes"] == list(NODES) and data["undirected"] == [{"a": "a", "b": "b"}]
    assert [(e["from"], e["to"]) for e in data["directed"]] == [("b", "y"), ("c", "y")]
    assert all(abs(e["weight"]) > 0.1 for e in data["directed"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_log_odds_and_bad_sink():
    """y_hat = log p(S) - log p(not S) by hand; a sink that is not a node and S = all classes are refused."""
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(causal.log_odds(logits, [0, 2]), np.log((p[:, 0] + p[:, 2]) / p[:, 1]))
    with pytest.raises(FgvceError, match="proper subset"):
        causal.log_odds(logits, [0, 1, 2])
    with pytest.raises(FgvceError, match="sink"):
        causal.discover(planted(50, True), NODES, "z")


def test_concept_effects_propagate_to_descendants():
    """a -> b (0.5), b -> c (2), standardised; sigma = (1, 2, 3), noise deviations (1, 0.5, 0.1): moving a's
    noise by 1 (a root: sigma_a) shifts a by 1, b by 0.5 sigma_b = 1 and c by 2 * 0.5 sigma_c = 3; moving b's
    noise by 0.5 shifts b by 0.5 sigma_b = 1 and c by 2 * 0.5 sigma_c = 3; c's by 0.1 sigma_c only c."""
    w = np.zeros((4, 4))
    w[0, 1], w[1, 2] = 0.5, 2.0
    g = causal.Graph(("a", "b", "c", "y"), ((0, 1), (1, 2)), (), w, np.array([1.0, 0.5, 0.1, 0.7]))
    e = explain.concept_effects(g, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(e, [[1.0, 1.0, 3.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.3]])


def test_noise_deviations_are_the_residuals_of_the_structural_model(tmp_path):
    """x0 root, x1 = 0.8 x0 + 0.6 e (standardised: R^2 = 0.64): the fitted noise deviations are 1 and 0.6
    (to sampling error) and survive the JSON round trip; a graph file without them is refused in one line."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=20000)
    x = np.stack([x0, 0.8 * x0 + 0.6 * rng.normal(size=20000)], 1)
    g = causal.fit_linear_sem(x, ("x0", "x1"), [(0, 1)], [])
    np.testing.assert_allclose(g.noise, [1.0, 0.6], atol=0.01)
    js, _ = causal.write_graph(g, tmp_path / "g")
    np.testing.assert_array_equal(causal.read_graph(js).noise, g.noise)
    data = json.loads(js.read_text())
    del data["noise"]
    js.write_text(json.dumps(data))
    with pytest.raises(FgvceError, match="older version"):
        causal.read_graph(js)


def test_explanations(fitted):
    """On 8 held-out latents with y = the class the classifier ranks second: importances are the central
    differences of p_y by hand; the greedy set reaches y for most queries (success agrees with the final
    argmax, and the set stops once reached); a second call with new latents does not recompile."""
    fit, h, u, head, _ = fitted
    effects = np.diag(np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]))
    q = jnp.asarray(h[400:408])
    y = np.argsort(np.asarray(surrogate.head_logits(head, q)), -1)[:, -2]
    out = explain.explain(fit.model, head, effects, h[400:408], y, max_set=2)
    assert out["importance"].shape == (8, 7) and out["set"].shape == (8, 2)
    c = fit.model.encode(q)
    p = lambda cc: np.asarray(jax.nn.softmax(surrogate.head_logits(head, fit.model.decode(cc))))[np.arange(8), y]
    np.testing.assert_allclose(out["importance"][:, 1], (p(c + effects[1]) - p(c - effects[1])) / 2, atol=1e-5)
    np.testing.assert_allclose(out["p_y"], p(c), atol=1e-5)
    assert out["success"].mean() >= 0.5
    for row, steps, ok in zip(out["set"], out["set_steps"], out["success"]):
        chosen = row[row >= 0]
        assert len(set(chosen)) == len(chosen) and np.all(row[len(chosen):] == -1) and np.all(steps[row < 0] == 0)
        assert ok or len(chosen) == 2
    before = explain._explain._cache_size()
    explain.explain(fit.model, head, effects, h[408:416], y, max_set=2)
    assert explain._explain._cache_size() == before


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_context_table(tmp_path):
    """Rows come back in the order of the ids asked for; missing ids, non-numeric columns, repeated ids and
    a missing file are each one line naming the problem."""
    path = write_csv(tmp_path / "ctx.csv", [["id", "wing", "beak"], ["x", "1", "2.5"], ["y", "3", "-1"], ["z", "0", "0"]])
    values, names = load_context_table(path, ["y", "x"])
    assert names == ("wing", "beak")
    np.testing.assert_array_equal(values, [[3, -1], [1, 2.5]])
    bad = [(["x", "q", "r", "s"], "no row for 3 of 4 images \\(e.g. q, r, s\\)", path),
           (["x"], "column 'beak' is not numeric \\(line 3 has 'long'\\)",
            write_csv(tmp_path / "text.csv", [["id", "wing", "beak"], ["x", "1", "2"], ["y", "3", "long"]])),
           (["x"], "image id 'x' appears twice", write_csv(tmp_path / "twice.csv", [["id", "w"], ["x", "1"], ["x", "2"]])),
           (["x"], "does not exist", tmp_path / "absent.csv")]
    for ids, message, file in bad:
        with pytest.raises(FgvceError, match=message) as e:
            load_context_table(file, ids)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the test bed
FEATURES = ("thickness", "slant", "width", "height", "area", "intensity")
EVEN = (0, 2, 4, 6, 8)


@dataclasses.dataclass(frozen=True)
class Bed:
    """One size of the test bed: the classifier's train images (None: the whole train split, else the first
    ``n_train``), its epochs and seed (initialisation and data order), the test images scored (None: all),
    the surrogate's epochs and the number of queries explained."""

    n_train: int | None = None
    epochs: int = 1
    seed: int = 0
    n_test: int | None = None
    surrogate_epochs: int = 20
    n_queries: int = 50


FULL_BED = Bed()  # the slow tests: the paper-like figures of docs/glance.md
# The default suite's: the same classifier (3000 images, 1 epoch: 46 steps, most of the time) and surrogate,
# the first 500 test images and 25 queries: 82 s for both twins on the shared 2-core machine (load about 10).
SMALL_BED = Bed(n_test=500, n_queries=25)


def run_bed(name: str, root, bed: Bed = FULL_BED):
    """resnet_tiny at 28 px trained for ``bed.epochs`` on ``name``'s train split (or its first ``bed.n_train``
    images; lr 0.05, batch 64, seed ``bed.seed``), split at layer4; the global model
    (:func:`fit.fit_global`: surrogate with F = 6 morphometrics of those train images, K = 4 free concepts,
    ``bed.surrogate_epochs`` epochs; PC graph on those images with y_hat = log-odds of an even digit);
    explanations of the ``bed.n_queries`` test images (of the first ``bed.n_test``) whose slant sign
    contradicts the shortcut (even right, odd left) and whose true class the classifier gives the least
    probability, y = the true class. Returns (graph, test agreement, explanations, true effects: the
    :func:`true_effects` of the classifier on the queries)."""
    from fgvce_jax import data as data_lib
    from fgvce_jax.data import morpho_digits
    from fgvce_jax.glance import fit
    from fgvce_jax.models.split import split
    from fgvce_jax.train import TrainConfig, image_reader, train

    train_set, test = (data_lib.load(name, s, image_size=28) for s in ("train", "test"))
    if bed.n_train is not None:
        train_set = train_set.subset(np.arange(bed.n_train))
    if bed.n_test is not None:
        test = test.subset(np.arange(bed.n_test))
    config = TrainConfig(arch="resnet_tiny", dataset=name, epochs=bed.epochs, lr=0.05, image_size=28, seed=bed.seed)
    model, _, _ = train(config, root / "model", train_set=train_set, test_set=test)
    split_model, params = split(model, "layer4")
    head = split_model.linear_head(params)
    u, names = fit.context_features(train_set)
    assert names == FEATURES
    g = fit.fit_global(split_model, params, train_set, u, names, root / "surrogate", key=jax.random.key(0),
                       prediction_classes=EVEN, config=surrogate.SurrogateConfig(epochs=bed.surrogate_epochs))
    h = surrogate.pooled_latents(split_model, params, image_reader(test), len(test))
    logits = np.asarray(surrogate.head_logits(head, jnp.asarray(h)))
    rebuilt = surrogate.head_logits(head, g.fitted.model.decode(g.fitted.model.encode(jnp.asarray(h))))
    agree = np.mean(np.argmax(np.asarray(rebuilt), -1) == np.argmax(logits, -1))
    conflict = np.nonzero(np.sign(morpho_digits.factors(test)["slant"]) != np.where(test.labels % 2 == 0, 1, -1))[0]
    p_true = np.asarray(jax.nn.softmax(logits))[np.arange(len(test)), test.labels]
    queries = conflict[np.argsort(p_true[conflict])[:bed.n_queries]]
    out = explain.explain(g.fitted.model, head, explain.concept_effects(g.graph, g.sigma), h[queries],
                          test.labels[queries])
    return g.graph, agree, out, true_effects(split_model, params, test.subset(queries))


def true_effects(split_model, params, queries) -> dict:
    """The classifier's own response to each true factor of morpho-digits, by re-rendering: for every query
    image (a morpho-digits Dataset) and factor f, the image is drawn again with f shifted by +-1 standard
    deviation of f on the train split (a thickness shift also moves intensity by its coefficient in the
    data's structural model, thickness -> intensity), and the effect is |p_y(+) - p_y(-)| / 2 with y the
    query's label, p from the full classifier (intensity clipped to [0.05, 1]; a query whose shifted glyph
    no longer fits the frame is left out of that factor's mean). Returns {factor: mean effect over the
    queries}: the ground truth that the surrogate's importances should follow (the renderer is the data's)."""
    from fgvce_jax.data import morpho_digits as md

    shortcut = md.NAMES[queries.name]
    spread = {k: v.std() for k, v in md.generate("train", shortcut)[1].items() if k in md.FACTORS}
    mean, std = md.train_pixel_stats(shortcut)
    base, y = md.factors(queries), queries.labels

    def draw(d, thickness, slant, scale, intensity):
        try:
            return md.render(int(d), thickness, slant, scale, float(np.clip(intensity, 0.05, 1.0)))
        except FgvceError:  # does not fit the frame
            return None

    def p_y(f):
        images = [draw(d, *(f[k][i] for k in md.FACTORS)) for i, d in enumerate(y)]
        fits = np.array([im is not None for im in images])
        x = np.stack([im if im is not None else np.zeros((28, 28)) for im in images]) / 255.0
        x = (np.repeat(x[..., None], 3, -1) - mean) / std
        p = np.asarray(jax.nn.softmax(split_model.logits(params, jnp.asarray(x, jnp.float32))))
        return np.where(fits, p[np.arange(len(y)), y], np.nan)

    out = {}
    for factor in md.FACTORS:
        sides = []
        for sign in (1.0, -1.0):
            f = {k: v.copy() for k, v in base.items()}
            f[factor] = f[factor] + sign * spread[factor]
            if factor == "thickness":
                f["intensity"] = f["intensity"] + sign * spread[factor] * md.INTENSITY[1]
            sides.append(p_y(f))
        out[factor] = float(np.nanmean(np.abs(sides[0] - sides[1])) / 2)
    return out


def twins(root, bed: Bed) -> dict:
    """:func:`run_bed` on the shortcut twin and the clean one: name -> (graph, agreement, explanations, true
    effects, dir)."""
    return {name: (*run_bed(name, root / name, bed), root / name) for name in ("morpho-digits-shortcut", "morpho-digits")}


SLANT = FEATURES.index("slant")


def slant_figures(graph, out) -> dict:
    """What the bed's assertions read: whether slant -> y_hat and its weight, whether slant and y_hat are
    adjacent at all, the share of queries where slant has the largest |ACE| of all P concepts (``first``) and
    of the F context features (``first_u``), slant's rank by mean |ACE| among the P concepts (1 = largest),
    and the mean |ACE| of each concept over the queries (P,)."""
    imp = np.abs(out["importance"])
    sink = len(graph.nodes) - 1
    mean = imp.mean(0)
    return {"edge": graph.has_edge("slant", "y_hat"), "weight": graph.weights[SLANT, sink],
            "adjacent": (SLANT, sink) in graph.directed or (SLANT, sink) in graph.undirected,
            "first": np.mean(np.argmax(imp, 1) == SLANT),
            "first_u": np.mean(np.argmax(imp[:, :len(FEATURES)], 1) == SLANT), "mean": mean,
            "rank": 1 + int(np.sum(mean > mean[SLANT]))}


def check_small_bed(beds: dict) -> None:
    """SMALL_BED's thresholds. Shortcut twin: slant -> y_hat with weight > 0.2; surrogate agreement >= 95% on
    the 500 test images; slant has the largest mean |ACE| of the 10 concepts over the 25 queries, >= 2 times
    its mean |ACE| on the clean twin; slant has the largest |ACE| of the 6 context features for >= 40% of the
    queries; and the premise holds: re-rendered, slant moves the classifier's p_y more than any other true
    factor (so a surrogate that ranks intensity first is wrong; this holds on the clean twin's queries too,
    a shear changes any classifier's view, so it is not evidence of the shortcut). Clean twin: slant and
    y_hat not adjacent (no edge either way, no undirected one); agreement >= 95%; slant has the largest |ACE|
    of all concepts for < 20% of the queries and ranks 6th or lower of the 10 by mean |ACE|."""
    graph, agree, out, truth, _ = beds["morpho-digits-shortcut"]
    f = slant_figures(graph, out)
    clean_graph, clean_agree, clean_out, _, _ = beds["morpho-digits"]
    clean = slant_figures(clean_graph, clean_out)
    assert f["edge"] and f["weight"] > 0.2, f
    assert agree >= 0.95
    assert f["rank"] == 1, f["mean"]
    assert f["mean"][SLANT] >= 2 * clean["mean"][SLANT], (f["mean"], clean["mean"])
    assert f["first_u"] >= 0.4, f
    assert max(truth, key=truth.get) == "slant", truth
    assert not clean["adjacent"], clean_graph.to_json()
    assert clean_agree >= 0.95
    assert clean["first"] < 0.2 and clean["rank"] >= 6, clean


@pytest.fixture(scope="module")
def small_beds(tmp_path_factory):
    """The small test bed (``SMALL_BED``) on both twins: the default suite's."""
    return twins(tmp_path_factory.mktemp("small_bed"), SMALL_BED)


@pytest.fixture(scope="module")
def beds(tmp_path_factory):
    """The whole test bed (``FULL_BED``) on both twins: the slow tests'."""
    return twins(tmp_path_factory.mktemp("bed"), FULL_BED)


def test_small_bed_finds_the_shortcut_and_not_in_the_clean_twin(small_beds):
    """:func:`check_small_bed` with the classifier seeded 0 (both twins). Measured with classifier seeds 0, 1,
    2, 3 (interventions of one noise-term deviation, explain.py): weight 0.44, 0.64, 0.49, 0.69; agreement
    0.978, 0.968, 0.982, 0.966; slant first by mean |ACE| at every seed, ahead of the next concept by 1.85x,
    1.05x, 1.71x, 1.30x; slant / its clean-twin value 0.233 / 0.106, 0.230 / 0.031, 0.285 / 0.088, 0.220 /
    0.043; first of the context features for 72%, 80%, 68%, 68% of the queries (of all 10 concepts: 72%, 20%,
    68%, 48%, so not asserted). Clean twin: no edge, agreement 1.000, slant first of all concepts for 0% and
    ranked 7, 10, 7, 9. Seeds 1-3 run in the slow :func:`test_small_bed_holds_for_other_classifier_seeds`."""
    check_small_bed(small_beds)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_bed_holds_for_other_classifier_seeds(seed, tmp_path):
    """The default test's thresholds (:func:`check_small_bed`) with the classifier seeded 1, 2 and 3: the
    robustness the issue asks for. With interventions of one marginal standard deviation (before
    2026-12-06) seed 3 failed: intensity ranked first although re-rendering shows the classifier's p_y moving
    8x less under intensity than under slant (docs/glance.md)."""
    check_small_bed(twins(tmp_path, dataclasses.replace(SMALL_BED, seed=seed)))


@pytest.mark.slow
def test_bed_shortcut_is_found(beds):
    """FULL_BED, shortcut twin: the train-split graph has slant -> y_hat with weight > 0.2; the surrogate agrees
    with the classifier on >= 95% of the 1000 test images; slant has the largest mean |ACE| of all concepts
    and is >= 1.5 times that of every free concept; slant has the largest |ACE| for >= 50% of the 50 queries;
    re-rendered, slant moves p_y the most of the true factors. Measured at seed 0: weight 0.44, agreement 0.978,
    35/50 first, slant 0.241 against 0.128 for the largest free concept. At classifier seeds 2 and 3 these
    thresholds hold too; at seed 1 they do not (a free concept 0.202 against slant 0.209, slant first for
    16%): docs/glance.md."""
    graph, agree, out, truth, _ = beds["morpho-digits-shortcut"]
    f = slant_figures(graph, out)
    assert f["edge"] and f["weight"] > 0.2
    assert agree >= 0.95
    assert f["rank"] == 1
    assert f["first"] >= 0.5
    assert f["mean"][SLANT] >= 1.5 * f["mean"][len(FEATURES):].max()
    assert max(truth, key=truth.get) == "slant", truth


@pytest.mark.slow
def test_bed_clean_twin_has_no_slant_edge(beds):
    """FULL_BED, clean twin (slant independent of the label): no edge between slant and y_hat, agreement
    >= 95%, and slant has the largest |ACE| for < 20% of the queries."""
    graph, agree, out, _, _ = beds["morpho-digits"]
    f = slant_figures(graph, out)
    assert not f["adjacent"]
    assert agree >= 0.95
    assert f["first"] < 0.2


@pytest.mark.slow
def test_train_surrogate_command(beds, capsys):
    """``fgvce train-surrogate`` on the shortcut twin's classifier with the test bed's settings writes the same
    graph as the library (same key and configuration, so the same surrogate), slant among y_hat's parents;
    with ``--generator-steps 3`` it distils a generator that ``fit.load`` reads back and ``strips`` renders
    (10 concepts x 5 shifts of 28 px frames, p_y in [0, 1])."""
    from fgvce_jax import cli, models
    from fgvce_jax.glance import fit

    graph, _, _, _, root = beds["morpho-digits-shortcut"]
    out = root / "cli"
    assert cli.main(["train-surrogate", "--model", str(root / "model"), "--dataset", "morpho-digits-shortcut",
                     "--out", str(out), "--prediction-classes", *map(str, EVEN), "--epochs", "20",
                     "--generator-steps", "3", "--generator-batch", "8"]) == 0
    printed = capsys.readouterr().out
    assert "slant" in printed.split("parents of y_hat: ")[1] and "generator written" in printed
    written = json.loads((out / "graph.json").read_text())
    assert written == graph.to_json() and (out / "graph.png").is_file()
    split_model, params = models.split(models.load(root / "model")[0], "layer4")
    loaded = fit.load(out, split_model, params)
    assert loaded.generator is not None and len(loaded.generator.history) == 3
    strips = explain.strips(loaded.fitted.model, loaded.head, loaded.effects, loaded.generator, split_model, params,
                            np.ones((2, 128), np.float32), np.array([0, 1]), jax.random.key(0))  # any D = 128 latents
    assert strips["images"].shape == (2, 10, 5, 28, 28, 3)
    assert np.all((strips["p_y_classifier"] >= 0) & (strips["p_y_classifier"] <= 1))
