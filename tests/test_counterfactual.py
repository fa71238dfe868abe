"""The counterfactual engine (SPEC 5) against a constructed case with a known
answer and against plain-Python reference loops written here."""
import dataclasses
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from fgvce_jax.counterfactual import CounterfactualConfig, FeatureBatch, explain
from fgvce_jax.errors import FgvceError
from test_partition import nms_reference


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """SplitModel stand-in: GAP + linear, like ResNet's ``layer4`` head."""
    num_classes: int
    family: str = "resnet"
    at: str = "layer4"

    def head(self, params, z, ctx=None, token_mask=None):
        return z.mean((1, 2)) @ params["w"] + params["b"]


@dataclasses.dataclass(frozen=True)
class ConvHead:
    """SplitModel stand-in: 3x3 conv + ReLU + GAP + linear (a non-linear head)."""
    num_classes: int
    family: str = "resnet"
    at: str = "layer4.0"

    def head(self, params, z, ctx=None, token_mask=None):
        h = jax.lax.conv_general_dilated(z, params["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).mean((1, 2)) @ params["w"] + params["b"]


def conv_params(rng, d, c, e=6):
    return dict(k=jnp.asarray(rng.normal(size=(3, 3, d, e)) / 3, jnp.float32),
                w=jnp.asarray(rng.normal(size=(e, c)), jnp.float32), b=jnp.zeros(c, jnp.float32))


def batch(z, labels, preds):
    z = np.asarray(z, np.float32)
    return FeatureBatch(z, {}, np.asarray(labels), np.asarray(preds), z.mean((1, 2)))


def random_problem(seed, q=5, n_refs=9, grid=4, d=4, c=3):
    rng = np.random.default_rng(seed)
    q_lab = rng.integers(0, c, q)
    q_pred = (q_lab + rng.integers(1, c, q)) % c
    r_lab = np.arange(n_refs) % c
    r_pred = np.where(rng.random(n_refs) < 0.8, r_lab, (r_lab + 1) % c)
    queries = batch(rng.normal(size=(q, grid, grid, d)), q_lab, q_pred)
    refs = batch(rng.normal(size=(n_refs, grid, grid, d)), r_lab, r_pred)
    q_phi = rng.normal(size=(q, grid, grid)).astype(np.float32)
    r_phi = rng.normal(size=(n_refs, grid, grid)).astype(np.float32)
    return ConvHead(c), conv_params(rng, d, c), queries, refs, q_phi, r_phi


# ----------------------------------------------------------------- reference loops
def _cos(a, b):
    n = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / n) if n > 1e-12 else 0.0


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _window(z, center, r):
    h, w = z.shape[:2]
    patch, valid = np.zeros((r, r, z.shape[2]), np.float32), np.zeros((r, r), bool)
    for a in range(r):
        for b in range(r):
            i, j = center[0] + a - (r - 1) // 2, center[1] + b - (r - 1) // 2
            if 0 <= i < h and 0 <= j < w:
                patch[a, b], valid[a, b] = z[i, j], True
    return patch, valid


def _write(z, center, cells, patch, valid):
    z, r = z.copy(), patch.shape[0]
    for i, j in zip(*np.nonzero(cells)):
        a, b = i - center[0] + (r - 1) // 2, j - center[1] + (r - 1) // 2
        if valid[a, b]:
            z[i, j] = patch[a, b]
    return z


def reference_search(model, params, queries, refs, q_phi, r_phi, cfg):
    """Plain-Python FG-VCE loop, one query at a time. Returns a list of dicts."""
    def logits(z):
        return np.asarray(model.head(params, jnp.asarray(z[None])))[0].astype(np.float64)

    results = []
    r, k_max, c = cfg.region_size, cfg.max_regions, cfg.candidates_per_reference
    for qi in range(len(queries.labels)):
        y, y_hat, z0 = queries.labels[qi], queries.preds[qi], queries.z[qi]
        eligible = [i for i in range(len(refs.labels)) if refs.labels[i] == refs.preds[i] == y]
        ranked = sorted(eligible, key=lambda i: -_cos(queries.pooled[qi], refs.pooled[i]))[:cfg.n_references]
        regions = nms_reference(q_phi[qi], r, k_max)
        cands = []
        for ref in ranked:
            found = nms_reference(r_phi[ref], r, max(k_max, c))
            for s in sorted(range(len(found)), key=lambda s: -found[s][2])[:c]:
                patch, valid = _window(refs.z[ref], found[s][0], r)
                cands.append((ref, found[s][0], patch, valid, patch[valid].mean(0)))
        z, used_r, used_c, edits, success = z0.copy(), set(), set(), [], False
        reason = 3 if not ranked else 1
        while ranked and len(edits) < cfg.t_max:
            free_r = [i for i in range(len(regions)) if i not in used_r]
            free_c = [m for m in range(len(cands)) if m not in used_c]
            if not free_r or not free_c:
                reason = 2 if not free_r else 4
                break
            k = max(free_r, key=lambda i: regions[i][2])
            q_feat = z0[regions[k][1]].mean(0)

            def score(m):
                s = _cos(q_feat, cands[m][4])
                if cfg.selection == "joint":
                    edited = _write(z, regions[k][0], regions[k][1], cands[m][2], cands[m][3])
                    lg = logits(edited)
                    s = lg[y] - np.log(np.exp(lg - lg.max()).sum()) - lg.max() + cfg.lam * s
                return s

            m = max(free_c, key=score)
            z = _write(z, regions[k][0], regions[k][1], cands[m][2], cands[m][3])
            used_r.add(k), used_c.add(m)
            probs = _softmax(logits(z))
            edits.append(dict(region=regions[k][0], ref=cands[m][0], ref_region=cands[m][1],
                              sim=_cos(q_feat, cands[m][4]), probs=probs))
            hit = probs.argmax() == y if cfg.stop == "target" else probs.argmax() != y_hat
            if hit and cfg.method != "single-step":
                success, reason = True, 0
                break
        if cfg.method == "single-step" and edits:
            last = edits[-1]["probs"].argmax()
            success = bool(last == y if cfg.stop == "target" else last != y_hat)
            reason = 0 if success else reason
        results.append(dict(edits=edits, success=success, reason=reason))
    return results


def assert_matches(got, expected):
    for qi, exp in enumerate(expected):
        n = len(exp["edits"])
        assert got.n_edits[qi] == n, qi
        assert bool(got.success[qi]) == exp["success"], qi
        assert got.reason[qi] == exp["reason"], qi
        for t, e in enumerate(exp["edits"]):
            assert tuple(got.query_region[qi, t]) == tuple(e["region"]), (qi, t)
            assert got.ref_row[qi, t] == e["ref"], (qi, t)
            assert tuple(got.ref_region[qi, t]) == tuple(e["ref_region"]), (qi, t)
            np.testing.assert_allclose(got.similarity[qi, t], e["sim"], atol=1e-5)
            np.testing.assert_allclose(got.probs[qi, t], e["probs"], atol=1e-5)
        assert np.all(got.ref_row[qi, n:] == -1) and np.all(np.isnan(got.similarity[qi, n:]))


# ----------------------------------------------------------------- tests
def constructed_case(candidate):
    """4x4 map, 3 classes, logits = mean of the 3 channels. The query (true 0,
    predicted 1) carries class-1 evidence (0, 5, 0), (0, 4, 0), (0, 3, 0) at cells
    A=(0,0), B=(1,2), C=(3,3) on a weak class-0 background (0.2, 0, 0)."""
    z = np.zeros((1, 4, 4, 3), np.float32)
    z[0, ..., 0] = 0.2
    evidence = {(0, 0): 5.0, (1, 2): 4.0, (3, 3): 3.0}
    phi = np.zeros((1, 4, 4), np.float32)
    for (i, j), s in evidence.items():
        z[0, i, j] = (0.0, s, 0.0)
        phi[0, i, j] = s
    refs = np.broadcast_to(np.asarray(candidate, np.float32), (2, 4, 4, 3))
    r_phi = np.random.default_rng(0).uniform(0.1, 1.0, size=(2, 4, 4)).astype(np.float32)
    params = dict(w=jnp.eye(3), b=jnp.zeros(3))
    return LinearHead(3), params, batch(z, [0], [1]), batch(refs, [0, 0], [0, 0]), phi, r_phi


def test_constructed_case_target():
    """Candidates (1, 0, 0): 16 * logits after one edit (A) = (3.6, 7, 0) -> still 1;
    after two (A, B) = (4.6, 3, 0) -> 0. The loop must stop right there."""
    model, params, q, refs, phi, r_phi = constructed_case((1.0, 0.0, 0.0))
    cfg = CounterfactualConfig(max_regions=5, n_references=2, candidates_per_reference=3, t_max=5)
    got = explain(model, params, q, refs, cfg, key=jax.random.key(0), query_phi=phi, reference_phi=r_phi)
    assert got.success.tolist() == [True] and got.n_edits.tolist() == [2] and got.reason.tolist() == [0]
    assert got.query_region[0, :2].tolist() == [[0, 0], [1, 2]]
    assert np.all(got.query_region[0, 2:] == -1)
    np.testing.assert_allclose(got.probs[0, 0], _softmax(np.array([3.6, 7.0, 0.0]) / 16), rtol=1e-5)
    np.testing.assert_allclose(got.probs[0, 1], _softmax(np.array([4.6, 3.0, 0.0]) / 16), rtol=1e-5)
    assert got.edit_mask[0, 0].sum() == 1 and got.edit_mask[0, 0, 0, 0]
    pairs = set(zip(got.ref_row[0, :2].tolist(), map(tuple, got.ref_region[0, :2].tolist())))
    assert len(pairs) == 2  # a candidate is used at most once


def test_constructed_case_flip_vs_target():
    """Candidates (0.5, 0, 2): 16 * logits go (3.1, 7, 2) -> (3.6, 3, 4) -> (4.1, 0, 6).
    ``flip`` stops at edit 2 (prediction 2 != 1); ``target`` never reaches 0 and
    runs out of query regions after all three."""
    model, params, q, refs, phi, r_phi = constructed_case((0.5, 0.0, 2.0))
    base = dict(max_regions=5, n_references=2, candidates_per_reference=3, t_max=5)
    flip = explain(model, params, q, refs, CounterfactualConfig(stop="flip", **base), key=jax.random.key(0),
                   query_phi=phi, reference_phi=r_phi)
    assert flip.success.tolist() == [True] and flip.n_edits.tolist() == [2]
    assert flip.probs[0, 1].argmax() == 2
    target = explain(model, params, q, refs, CounterfactualConfig(**base), key=jax.random.key(0),
                     query_phi=phi, reference_phi=r_phi)
    assert target.success.tolist() == [False] and target.n_edits.tolist() == [3]
    assert target.reason.tolist() == [2]
    assert target.query_region[0, :3].tolist() == [[0, 0], [1, 2], [3, 3]]


@pytest.mark.parametrize("selection,stop,method,r", [
    ("similarity", "target", "fgvce", 1), ("similarity", "flip", "fgvce", 2),
    ("joint", "target", "fgvce", 2), ("joint", "flip", "fgvce", 1), ("similarity", "target", "single-step", 2)])
def test_matches_python_loop(selection, stop, method, r):
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=len(selection) + len(stop) + r)
    cfg = CounterfactualConfig(region_size=r, max_regions=4, n_references=3, candidates_per_reference=2,
                               selection=selection, lam=0.7, stop=stop, t_max=3, method=method)
    got = explain(model, params, queries, refs, cfg, key=jax.random.key(0), query_phi=q_phi, reference_phi=r_phi)
    expected = reference_search(model, params, queries, refs, q_phi, r_phi, cfg)
    assert_matches(got, expected)
    assert len({e["reason"] for e in expected}) > 1 or method == "single-step"  # the case is not degenerate


def test_batch_and_device_invariance():
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=7, q=5)
    cfg = CounterfactualConfig(region_size=2, max_regions=4, n_references=3, candidates_per_reference=2,
                               selection="joint", t_max=3, chunk_size=3)
    mesh1 = Mesh(np.array(jax.devices()[:1]), ("q",), axis_types=(AxisType.Auto,))
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("q",), axis_types=(AxisType.Auto,))
    assert len(jax.devices()) >= 4
    run = dict(key=jax.random.key(0), reference_phi=r_phi)
    four = explain(model, params, queries, refs, cfg, query_phi=q_phi, mesh=mesh4, **run)
    one = explain(model, params, queries, refs, cfg, query_phi=q_phi, mesh=mesh1, **run)
    unchunked = explain(model, params, queries, refs, dataclasses.replace(cfg, chunk_size=None),
                        query_phi=q_phi, mesh=mesh4, **run)
    for name in ("success", "n_edits", "reason", "query_region", "ref_row", "ref_region", "edit_mask"):
        np.testing.assert_array_equal(getattr(four, name), getattr(one, name))
        np.testing.assert_array_equal(getattr(four, name), getattr(unchunked, name))
    for name in ("probs", "probs_before", "similarity"):  # bit-identical on 1 and 4 devices, floats included
        np.testing.assert_array_equal(getattr(four, name), getattr(one, name))
    for qi in range(5):
        single = FeatureBatch(*(a[qi:qi + 1] for a in (queries.z,)), {}, queries.labels[qi:qi + 1],
                              queries.preds[qi:qi + 1], queries.pooled[qi:qi + 1])
        alone = explain(model, params, single, refs, cfg, query_phi=q_phi[qi:qi + 1], mesh=mesh4, **run)
        for name in ("success", "n_edits", "reason", "query_region", "ref_row", "ref_region"):
            np.testing.assert_array_equal(getattr(alone, name)[0], getattr(four, name)[qi])
        np.testing.assert_allclose(alone.probs[0], four.probs[qi], atol=1e-6)


def test_t_max_reached_is_failure():
    model, params, q, refs, phi, r_phi = constructed_case((1.0, 0.0, 0.0))
    cfg = CounterfactualConfig(max_regions=5, n_references=2, candidates_per_reference=3, t_max=1)
    got = explain(model, params, q, refs, cfg, key=jax.random.key(0), query_phi=phi, reference_phi=r_phi)
    assert got.success.tolist() == [False] and got.n_edits.tolist() == [1] and got.reason.tolist() == [1]
    assert got.probs.shape == (1, 1, 3) and got.probs[0, 0].argmax() == 1


def brute_force_cve(model, params, queries, refs, n_refs, t_max):
    """Goyal et al. greedy: each step the unused (query cell, reference cell) pair
    whose swap maximises log p_y; every cell used at most once."""
    out = []
    for qi in range(len(queries.labels)):
        y = queries.labels[qi]
        eligible = [i for i in range(len(refs.labels)) if refs.labels[i] == refs.preds[i] == y]
        chosen = sorted(eligible, key=lambda i: -_cos(queries.pooled[qi], refs.pooled[i]))[:n_refs]
        z = queries.z[qi].copy()
        h, w = z.shape[:2]
        cells = [(i, j) for i in range(h) for j in range(w)]
        pairs = [(qc, ref, rc) for qc in cells for ref in chosen for rc in cells]
        used_q, used_r, edits, success = set(), set(), [], False
        while len(edits) < t_max:
            free = [p for p in pairs if p[0] not in used_q and (p[1], p[2]) not in used_r]
            trial = np.repeat(z[None], len(free), 0)
            for n, (qc, ref, rc) in enumerate(free):
                trial[n, qc[0], qc[1]] = refs.z[ref][rc]
            logp = np.asarray(jax.nn.log_softmax(model.head(params, jnp.asarray(trial))))[:, y]
            qc, ref, rc = free[int(np.argmax(logp))]
            z[qc], _ = refs.z[ref][rc], used_q.add(qc)
            used_r.add((ref, rc))
            probs = _softmax(np.asarray(model.head(params, jnp.asarray(z[None])))[0])
            edits.append((qc, ref, rc, probs))
            if probs.argmax() == y:
                success = True
                break
        out.append((edits, success))
    return out


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_cve_matches_brute_force(chunk_size):
    """cve scores only the open pairs (in chunks of 5: not a divisor of the 18 candidates) and still picks
    the edits of the brute force, which scores every open pair of every step."""
    model, params, queries, refs, _, _ = random_problem(seed=3, q=4, n_refs=6, grid=3)
    cfg = CounterfactualConfig(method="cve", n_references=2, t_max=4, chunk_size=chunk_size)
    got = explain(model, params, queries, refs, cfg, key=jax.random.key(0))
    assert np.all(np.isnan(got.query_phi)) and got.region_size == 1
    assert got.n_edits.max() > 1  # later steps, with closed pairs, are compared too
    for qi, (edits, success) in enumerate(brute_force_cve(model, params, queries, refs, 2, 4)):
        assert got.n_edits[qi] == len(edits) and bool(got.success[qi]) == success
        for t, (qc, ref, rc, probs) in enumerate(edits):
            assert tuple(got.query_region[qi, t]) == qc
            assert got.ref_row[qi, t] == ref and tuple(got.ref_region[qi, t]) == rc
            np.testing.assert_allclose(got.probs[qi, t], probs, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_open_pair_scores_writes_open_pairs_only(chunk):
    """Against the table masked at closed pairs, for none, some and all pairs open. The table is NaN at
    closed pairs, so a closed pair that were scored would show."""
    from fgvce_jax.counterfactual.search import open_pair_scores

    rng = np.random.default_rng(chunk)
    for open_ in (np.zeros((5, 7), bool), rng.random((5, 7)) < 0.4, np.ones((5, 7), bool)):
        table = jnp.asarray(np.where(open_, rng.normal(size=(5, 7)), np.nan), jnp.float32)
        got = jax.jit(open_pair_scores, static_argnums=(0, 2))(lambda k, m: table[k, m], jnp.asarray(open_), chunk)
        np.testing.assert_array_equal(got, np.where(open_, table, -np.inf))


def test_no_positive_phi_in_query():
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=4, q=3)
    q_phi[1] = -np.abs(q_phi[1])
    cfg = CounterfactualConfig(n_references=2, t_max=3)
    got = explain(model, params, queries, refs, cfg, key=jax.random.key(0), query_phi=q_phi, reference_phi=r_phi)
    assert got.reason[1] == 2 and got.n_edits[1] == 0 and not got.success[1]
    assert np.all(got.query_region[1] == -1) and np.all(np.isnan(got.probs[1]))
    assert got.n_edits[0] > 0 and got.n_edits[2] > 0


def test_fewer_references_than_n_and_none_at_all():
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=5, q=4)
    queries = queries._replace(labels=np.array([0, 1, 0, 2]), preds=np.array([1, 2, 2, 0]))
    # Class 0 (queries 0 and 2) keeps one correct reference, class 1 (query 1) none.
    y0, y1 = 0, 1
    labels, preds = refs.labels.copy(), refs.preds.copy()
    keep = np.nonzero((labels == y0) & (labels == preds))[0][:1]
    preds[(labels == y0) & (labels == preds)] = (y0 + 1) % 3
    preds[keep] = y0
    preds[labels == y1] = (y1 + 1) % 3
    refs = refs._replace(preds=preds)
    cfg = CounterfactualConfig(n_references=4, candidates_per_reference=2, t_max=3)
    got = explain(model, params, queries, refs, cfg, key=jax.random.key(0), query_phi=q_phi, reference_phi=r_phi)
    used = got.ref_row[0][got.ref_row[0] >= 0]
    assert used.size == got.n_edits[0] > 0 and set(used.tolist()) == set(keep.tolist())
    for qi in np.nonzero(queries.labels == y1)[0]:
        assert got.reason[qi] == 3 and got.n_edits[qi] == 0 and not got.success[qi]
    empty = batch(np.zeros((0, 4, 4, 4)), np.zeros(0, int), np.zeros(0, int))
    none = explain(model, params, queries, empty, cfg, key=jax.random.key(0), query_phi=q_phi)
    assert none.reason.tolist() == [3] * 4 and none.n_edits.tolist() == [0] * 4


def test_candidates_exhausted():
    """One reference with one candidate: the second step has nothing left (reason 4)."""
    model, params, q, refs, phi, r_phi = constructed_case((0.5, 0.0, 0.0))
    cfg = CounterfactualConfig(max_regions=5, n_references=1, candidates_per_reference=1, t_max=5)
    got = explain(model, params, q, refs, cfg, key=jax.random.key(0), query_phi=phi, reference_phi=r_phi)
    assert got.n_edits.tolist() == [1] and got.reason.tolist() == [4] and not got.success[0]


def test_random_baseline_seeded():
    model, params, queries, refs, _, _ = random_problem(seed=6)
    cfg = CounterfactualConfig(method="random", n_references=2, t_max=3, region_size=2, seed=11)
    a = explain(model, params, queries, refs, cfg, key=jax.random.key(0))
    b = explain(model, params, queries, refs, cfg, key=jax.random.key(1))
    c = explain(model, params, queries, refs, dataclasses.replace(cfg, seed=12), key=jax.random.key(0))
    np.testing.assert_array_equal(a.query_region, b.query_region)
    np.testing.assert_array_equal(a.query_phi, b.query_phi)
    assert not np.array_equal(a.query_phi, c.query_phi)
    assert np.all(a.query_phi > 0) and np.all(a.n_edits > 0)


def test_phi_computed_on_predicted_and_own_class(monkeypatch):
    """Without precomputed Phi, saliency.compute is called with the method's saliency
    on the queries' predicted classes and on every reference's own class."""
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=8, q=3)
    calls = []

    def compute(split_model, params, z, ctx, classes, *, method, keys, **kw):
        calls.append((np.asarray(z).copy(), np.asarray(classes).copy(), method))
        assert keys.shape == (np.shape(z)[0],)  # one key per image
        return jnp.asarray(np.asarray(z).sum(-1))

    engine = importlib.import_module("fgvce_jax.counterfactual.explain")
    monkeypatch.setattr(engine, "saliency", types.SimpleNamespace(compute=compute))
    cfg = CounterfactualConfig(n_references=2, t_max=2, method="gradient")
    got = explain(model, params, queries, refs, cfg, key=jax.random.key(0))
    (zq, cq, mq), (zr, cr, mr) = calls
    assert mq == mr == "gradient"
    np.testing.assert_array_equal(zq, queries.z)
    np.testing.assert_array_equal(cq, queries.preds)
    np.testing.assert_array_equal(zr, refs.z)
    np.testing.assert_array_equal(cr, refs.labels)
    np.testing.assert_allclose(got.query_phi, queries.z.sum(-1), rtol=1e-6)
    given = explain(model, params, queries, refs, cfg, key=jax.random.key(0),
                    query_phi=queries.z.sum(-1), reference_phi=refs.z.sum(-1))
    assert len(calls) == 2  # nothing computed when Phi is given
    np.testing.assert_array_equal(given.ref_row, got.ref_row)
    np.testing.assert_array_equal(given.query_region, got.query_region)


@pytest.mark.parametrize("change,message", [
    (dict(preds="labels"), "misclassified"), (dict(z="3d"), "query features"), (dict(labels=7), "0..2"),
    (dict(query_phi=(2, 2)), "query_phi")])
def test_bad_input_is_clear_error(change, message):
    model, params, queries, refs, q_phi, r_phi = random_problem(seed=9, q=2)
    if "preds" in change:
        queries = queries._replace(preds=queries.labels)
    if "labels" in change:
        queries = queries._replace(labels=np.full_like(queries.labels, 7))
    if "z" in change:
        queries = queries._replace(z=queries.z[..., 0])
    if "query_phi" in change:
        q_phi = q_phi[:, :2, :2]
    with pytest.raises(FgvceError, match=message):
        explain(model, params, queries, refs, CounterfactualConfig(), key=jax.random.key(0),
                query_phi=q_phi, reference_phi=r_phi)


@pytest.mark.parametrize("field,value", [("method", "nope"), ("t_max", 0), ("region_size", 1.5),
                                         ("selection", "best"), ("chunk_size", 0), ("stratified", "yes")])
def test_bad_config_is_clear_error(field, value):
    with pytest.raises(FgvceError, match=field):
        CounterfactualConfig(**{field: value})


def test_stratified_and_phi_tolerance_do_not_combine():
    with pytest.raises(FgvceError, match=r"^--stratified and --phi-tolerance do not combine: .*; choose one$"):
        CounterfactualConfig(stratified=True, phi_tolerance=0.01)


def test_second_call_does_not_recompile():
    from fgvce_jax.counterfactual.search import _search_sharded

    model, params, q, refs, phi, r_phi = constructed_case((1.0, 0.0, 0.0))
    cfg = CounterfactualConfig(max_regions=5, n_references=2, candidates_per_reference=3, t_max=5)
    explain(model, params, q, refs, cfg, key=jax.random.key(0), query_phi=phi, reference_phi=r_phi)
    size = _search_sharded._cache_size()
    other = q._replace(z=q.z * 1.5, pooled=q.pooled * 1.5)
    again = explain(model, params, other, refs, cfg, key=jax.random.key(1), query_phi=phi[:, ::-1, ::-1],
                    reference_phi=r_phi)
    assert _search_sharded._cache_size() == size
    assert again.query_region[0, 0].tolist() == [3, 3]  # the new data was used: (3, 3) now has Phi 5


def test_default_chunk_keeps_candidate_scoring_within_the_memory_budget():
    """cve on a CUB-sized map scores H W x N H W pairs; unchunked that is tens of GB (it was OOM-killed)."""
    from fgvce_jax.counterfactual.explain import HEAD_ACTIVATION_FACTOR, default_chunk_size
    from fgvce_jax.counterfactual.search import SEARCH_GROUP
    from fgvce_jax.sharding import memory_budget

    for shape, n_q in [((14, 14, 2048), 64), ((7, 7, 2048), 3), ((8, 8, 128), 1)]:
        chunk = default_chunk_size(shape, n_q)
        together = min(SEARCH_GROUP, n_q)  # queries whose candidates are scored at once on a device
        live = chunk * together * 4 * np.prod(shape) * HEAD_ACTIVATION_FACTOR
        assert chunk >= 1 and (live <= memory_budget() or chunk == 1)
    assert default_chunk_size((8, 8, 128), 1) > default_chunk_size((8, 8, 128), 64)
