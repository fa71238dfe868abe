"""Every Shapley estimator, ours and the peers', on games with exact answers (issue 11).

Families (``fgvce_jax.shapley.benchmark_games``), and where their answer comes from:

- ``resnet18_14superpixels``, ``vit_9patches``, ``vit_16patches``: the shapiq project's precomputed
  image-classifier games in ``--tables`` (default ``../shared/data/shapiq_image_games``, see its README),
  15 images each, one run per image; exact values from the full tables (``table_shapley``).
- ``unanimity_random``, ``unanimity_local`` (every 2x2 and 3x3 window of the 14 x 14 grid), ``tree``
  (a sum of products of ORs): 196 players, exact closed forms; ``--trials`` seeds.
- ``cub_independent``, ``cub_size_dominated``: the CUB-sized affine softmax game (14 x 14 x 2048 map,
  200 classes, ``affine_softmax_game``); the reference is our ``antithetic`` at ``--reference-budget``
  evaluations in two independent halves, whose difference gives its relative standard error.

For each family, budget and estimator, means over the runs of: relative L2 error ||phi - phi*|| / ||phi*||,
MSE, Spearman's rank correlation, precision@5 (the share of the 5 largest |phi*| among the 5 largest
|phi|); the evaluations used (the engine's count for ours, counted calls for the peers) and the median
wall seconds of one estimate (ours after one untimed compile call per family, estimator and budget).

Estimators: every registered one (``fgvce_jax.shapley.names()``; ``exact`` where 2^n fits the budget),
shapiq's SVARM, KernelSHAP with ``pairing_trick=True``, kADD-SHAP (order 2, paired; n <= 20: its
regression has n + C(n, 2) columns) and permutation sampling, and Captum's ShapleyValueSampling and
KernelShap. Every peer evaluates the same JAX game through :class:`NumpyGame` (jitted, in
power-of-two batches compiled beforehand), so the comparison is of estimators, not of game code.

    python benchmarks/estimators.py             # the full run (the 10^7-evaluation references included)
    python benchmarks/estimators.py --quick     # 1-2 minutes: a smoke test, not a measurement
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

import common

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / ".." / "shared" / "data" / "shapiq_image_games"
IMAGE_MODELS = ("resnet18_14superpixels", "vit_9patches", "vit_16patches")
SHAPIQ = {"SVARM": ("SVARM", {}), "KernelSHAP (paired)": ("KernelSHAP", {"pairing_trick": True}),
          "kADD-SHAP (paired)": ("kADDSHAP", {"max_order": 2, "pairing_trick": True}),
          "PermutationSamplingSV": ("PermutationSamplingSV", {})}
CAPTUM = ("ShapleyValueSampling", "KernelShap")
KADD_MAX_PLAYERS = 20
TARGET_ERROR = 0.05  # the relative error of the CUB goal: time to reach it
EXACT_ERROR = 1e-6  # relative errors below this are float32 rounding: exact


class Run(NamedTuple):
    """One estimate's game, its reference phi* (n,) float64 and its seed."""

    game: object
    phi: np.ndarray
    seed: int


class Family(NamedTuple):
    name: str
    n: int
    runs: list
    budgets: tuple
    reference: dict  # how phi* was obtained


# --------------------------------------------------------------------------- the game for the peers
class NumpyGame:
    """coalitions bool (B, n) or (n,) -> values float64 (B,), the JAX game in padded power-of-two batches
    (64 .. MAX_BATCH rows, all compiled by :meth:`warm`); ``calls`` counts the coalitions evaluated."""

    MIN_BATCH, MAX_BATCH = 64, 4096

    def __init__(self, game, n: int):
        from fgvce_jax.shapley import as_game
        self.game, self.n, self.calls = as_game(game), n, 0

    def warm(self):
        import jax.numpy as jnp
        size = self.MIN_BATCH
        while size <= self.MAX_BATCH:
            np.asarray(_evaluator()(self.game, jnp.zeros((size, self.n), bool)))
            size *= 2
        return self

    def __call__(self, coalitions) -> np.ndarray:
        import jax.numpy as jnp
        masks = np.atleast_2d(np.asarray(coalitions, bool))
        self.calls += len(masks)
        out = []
        for start in range(0, len(masks), self.MAX_BATCH):
            part = masks[start:start + self.MAX_BATCH]
            size = max(self.MIN_BATCH, 1 << (len(part) - 1).bit_length())
            padded = np.zeros((size, self.n), bool)
            padded[:len(part)] = part
            out.append(np.asarray(_evaluator()(self.game, jnp.asarray(padded)), np.float64)[:len(part)])
        return np.concatenate(out)


@functools.cache
def _evaluator():
    """jit of ``game(masks)``: compiled once per game function and shape (a Game is a pytree, fn static)."""
    import jax
    return jax.jit(lambda game, masks: game(masks))


# --------------------------------------------------------------------------- estimators
def ours(method: str) -> Callable:
    """run(game, numpy_game, n, budget, seed) -> (phi (n,), evaluations) for a registered estimator."""
    import jax

    from fgvce_jax import shapley

    def run(game, numpy_game, n, budget, seed):
        res = shapley.estimate(game, n, method=method, budget=budget, key=jax.random.key(seed))
        return np.asarray(res.phi, np.float64), res.evaluations
    return run


def shapiq_estimator(name: str, kwargs: dict) -> Callable:
    """run(...) for a shapiq approximator of the Shapley value; evaluations are counted calls. Approximators
    whose ``approximate`` takes ``batch_size`` get the whole budget (as few game calls as they allow)."""
    from shapiq import approximator

    cls = getattr(approximator, name)
    batched = "batch_size" in inspect.signature(cls.approximate).parameters

    def run(game, numpy_game, n, budget, seed):
        numpy_game.calls = 0
        batching = {"batch_size": budget} if batched else {}
        values = cls(n, random_state=seed, **kwargs).approximate(budget, numpy_game, **batching)
        return np.array([values[(i,)] for i in range(n)], np.float64), numpy_game.calls
    return run


def captum_estimator(name: str, batch: int) -> Callable:
    """run(...) for Captum's ShapleyValueSampling (``(budget - 1) // n`` permutations) or KernelShap
    (``budget`` samples) on input 1 and baseline 0, ``batch`` perturbations per forward call."""
    import torch
    from captum.attr import KernelShap, ShapleyValueSampling

    def run(game, numpy_game, n, budget, seed):
        numpy_game.calls = 0
        forward = lambda x: torch.from_numpy(numpy_game(x.numpy() > 0.5))  # noqa: E731
        x, mask = torch.ones(1, n, dtype=torch.float64), torch.arange(n)[None]
        torch.manual_seed(seed)
        if name == "ShapleyValueSampling":
            algo, samples = ShapleyValueSampling(forward), max(1, (budget - 1) // n)
        else:
            algo, samples = KernelShap(forward), budget
        attr = algo.attribute(x, baselines=0.0, feature_mask=mask, n_samples=samples, perturbations_per_eval=batch)
        return attr[0].numpy().astype(np.float64), numpy_game.calls
    return run


def estimators(args) -> list[tuple[str, str, Callable]]:
    """(library, name, run) of every estimator in this run: ours by registry name, then the peers present."""
    from fgvce_jax import shapley

    out = [("ours", name, ours(name)) for name in shapley.names()]
    if not args.no_peers:
        try:
            out += [("shapiq", label, shapiq_estimator(*spec)) for label, spec in SHAPIQ.items()]
        except ImportError as e:
            print(f"shapiq not installed ({e}); its rows are left out", flush=True)
        try:
            out += [("captum", name, captum_estimator(name, args.torch_batch)) for name in CAPTUM]
        except ImportError as e:
            print(f"captum not installed ({e}); its rows are left out", flush=True)
    return out


def skip_reason(library: str, name: str, n: int, budget: int, args) -> str | None:
    """Why an (estimator, game size, budget) is not run, or None."""
    if library == "ours" and name == "exact" and (n > 20 or 2 ** n > budget):
        return f"exact needs 2^{n} evaluations"
    from fgvce_jax.shapley.stratified_kernel import MAX_PLAYERS

    if library == "ours" and name == "stratified_kernel" and n > MAX_PLAYERS:
        return f"stratified_kernel ranks coalitions in int32: at most {MAX_PLAYERS} players"
    if name.startswith("kADD") and n > KADD_MAX_PLAYERS:
        return f"order-2 regression on n + C(n, 2) = {n + math.comb(n, 2)} columns"
    if library != "ours" and budget > args.peer_max_budget:
        return f"budget above --peer-max-budget {args.peer_max_budget}"
    if library != "ours" and n > args.peer_max_players:
        return f"more players than --peer-max-players {args.peer_max_players}"
    return None


# --------------------------------------------------------------------------- metrics
def top(phi: np.ndarray, k: int) -> set:
    """The k players of largest |phi|."""
    return set(np.argsort(-np.abs(phi), kind="stable")[:k].tolist())


def metrics(phi: np.ndarray, ref: np.ndarray, k: int = 5) -> dict:
    """relative_error, mse, spearman and precision_at_5 of one estimate against the reference."""
    from scipy.stats import spearmanr

    rho = spearmanr(phi, ref).statistic if np.ptp(phi) > 0 and np.ptp(ref) > 0 else float("nan")
    k = min(k, len(ref))
    return {"relative_error": float(np.linalg.norm(phi - ref) / np.linalg.norm(ref)),
            "mse": float(np.mean((phi - ref) ** 2)), "spearman": float(rho),
            "precision_at_5": len(top(phi, k) & top(ref, k)) / k}


def measure(run: Callable, family: Family, numpy_games: list, budget: int, warm: bool) -> dict:
    """Run one estimator on every run of a family: the mean metrics, evaluations and median seconds."""
    first = family.runs[0]
    if warm:  # compilation, untimed
        run(first.game, numpy_games[0], family.n, budget, 10 ** 6)
    per_run, seconds, evals = [], [], []
    for r, numpy_game in zip(family.runs, numpy_games):
        t0 = time.perf_counter()
        phi, used = run(r.game, numpy_game, family.n, budget, r.seed)
        seconds.append(time.perf_counter() - t0)
        per_run.append(metrics(phi, r.phi))
        evals.append(used)
    out = {key: float(np.mean([m[key] for m in per_run])) for key in per_run[0]}
    errors = [m["relative_error"] for m in per_run]
    out["relative_error_se"] = float(np.std(errors, ddof=1) / math.sqrt(len(errors))) if len(errors) > 1 else None
    return {"evaluations": float(np.mean(evals)), "seconds": float(np.median(seconds)), "runs": len(per_run), **out}


def bench_family(family: Family, ests, args) -> list[dict]:
    """Rows {library, estimator, budget, ...measure} or {..., skipped} for every estimator and budget."""
    numpy_games = [NumpyGame(r.game, family.n) for r in family.runs]
    if any(lib != "ours" for lib, _, _ in ests):
        numpy_games[0].warm()  # compiles the batch shapes for every run of the family (same function)
    rows, too_slow = [], {}
    for budget in family.budgets:
        for library, name, run in ests:
            row = {"library": library, "estimator": name, "budget": budget}
            reason = skip_reason(library, name, family.n, budget, args) or too_slow.get((library, name))
            if reason is None:
                try:
                    row.update(measure(run, family, numpy_games, budget, warm=library == "ours"))
                except Exception as e:  # noqa: BLE001 -- a budget an estimator refuses, or a peer failing
                    reason = f"{type(e).__name__}: {e}"[:200]
            if reason is not None:
                row["skipped"] = reason
            elif row["seconds"] * row["runs"] > args.max_seconds:
                too_slow[(library, name)] = f"over --max-seconds at budget {budget} ({row['seconds']:.3g} s each)"
            rows.append(row)
            print(f"  {family.name:26s} {budget:8d} {library:6s} {name:28s} " + (
                f"skipped: {row['skipped'][:70]}" if "skipped" in row else
                f"{row['evaluations']:9.0f} evals {row['seconds']:9.4f} s  rel. err {row['relative_error']:.4f}  "
                f"rho {row['spearman']:.3f}  p@5 {row['precision_at_5']:.2f}"), flush=True)
    return rows


# --------------------------------------------------------------------------- families
def image_families(tables: Path, images: int, budgets) -> list[Family]:
    """The shapiq image games: one family per model, ``images`` files each, exact phi from the tables."""
    from fgvce_jax.shapley import benchmark_games as bg

    out = []
    for model in IMAGE_MODELS:
        paths = sorted(tables.glob(f"{model}_*.npz"))[:images]
        if not paths:
            continue
        games = [bg.load_table_game(p) for p in paths]
        runs = [Run(g.game, g.phi, i) for i, g in enumerate(games)]
        out.append(Family(model, games[0].n_players, runs, tuple(budgets),
                          {"kind": "exact (full table)", "files": [p.name for p in paths]}))
    return out


def closed_form_families(trials: int, budgets) -> list[Family]:
    """The 196-player games with closed-form phi, ``trials`` seeds each."""
    import jax

    from fgvce_jax.shapley import benchmark_games as bg

    games = {"unanimity_random": bg.random_unanimity(jax.random.key(1)),
             "unanimity_local": bg.local_unanimity(jax.random.key(2)),
             "tree": bg.random_tree(jax.random.key(3))}
    return [Family(name, g.n_players, [Run(g.game, g.phi, s) for s in range(trials)], tuple(budgets),
                   {"kind": "closed form", "game": g.name}) for name, g in games.items()]


def reference(game, n: int, budget: int) -> tuple[np.ndarray, float]:
    """(phi*, relative standard error): antithetic in two halves of ``budget`` evaluations with their own keys;
    the mean's error is estimated by ||a - b|| / 2 / ||phi*||."""
    import jax

    from fgvce_jax import shapley

    a, b = (np.asarray(shapley.estimate(game, n, method="antithetic", budget=budget // 2,
                                        key=jax.random.key(20_000 + i)).phi, np.float64) for i in range(2))
    phi = (a + b) / 2
    return phi, float(np.linalg.norm(a - b) / 2 / np.linalg.norm(phi))


def cub_families(trials: int, budgets, reference_budget: int) -> list[Family]:
    """The CUB-sized affine softmax game in both regimes, with antithetic references."""
    import jax

    from fgvce_jax.shapley import benchmark_games as bg

    out = []
    for regime in bg.REGIMES:
        game = bg.affine_softmax_game(jax.random.key(4), regime)
        t0 = time.perf_counter()
        phi, noise = reference(game, 196, reference_budget)
        seconds = time.perf_counter() - t0
        print(f"reference for cub_{regime}: antithetic, {reference_budget} evaluations in {seconds:.1f} s, "
              f"relative standard error {noise:.2e}", flush=True)
        out.append(Family(f"cub_{regime}", 196, [Run(game, phi, s) for s in range(trials)], tuple(budgets),
                          {"kind": "antithetic", "evaluations": reference_budget, "relative_noise": noise,
                           "seconds": seconds}))
    return out


# --------------------------------------------------------------------------- summary
def measured(rows, ours: bool | None = None, budget: int | None = None) -> list[dict]:
    """The rows that ran: ours only (True), the peers only (False) or all (None); at one budget or all."""
    return [r for r in rows if "skipped" not in r and (ours is None or (r["library"] == "ours") == ours)
            and (budget is None or r["budget"] == budget)]


def best(rows) -> dict | None:
    """The row of least MSE, or None."""
    return min(rows, key=lambda r: r["mse"]) if rows else None


def equal_mse_saving(rows) -> tuple[float, dict] | None:
    """min over budgets of (evaluations plain permutation needs for our best's MSE) / (our best's evaluations),
    and the row where it is least. Permutation's units are independent, so its MSE is c / evaluations: c is
    fitted as the mean of MSE x evaluations over its budgets (extrapolation along that exact law)."""
    perm = [r for r in measured(rows, True) if r["estimator"] == "permutation"]
    if not perm:
        return None
    c = float(np.mean([r["mse"] * r["evaluations"] for r in perm]))
    savings = []
    for budget in sorted({r["budget"] for r in rows}):
        b = best(measured(rows, True, budget))
        if b is not None and b["mse"] > 0:
            savings.append((c / b["mse"] / b["evaluations"], b))
    return min(savings, key=lambda s: s[0]) if savings else None


def time_to_error(rows, target: float) -> float | None:
    """Seconds at which an estimator's relative error reaches ``target``: at its smallest budget that reaches
    it, interpolated log-log from the budget before (rows of one estimator); None if no budget reaches it."""
    pts = [(r["seconds"], r["relative_error"]) for r in sorted(rows, key=lambda r: r["budget"])]
    for i, (s, e) in enumerate(pts):
        if e <= target:
            if i == 0:
                return s
            (s0, e0) = pts[i - 1]
            f = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e)) if e0 > e else 1.0
            return math.exp(math.log(s0) + f * (math.log(s) - math.log(s0)))
    return None


def summarize(results: list[dict]) -> dict:
    """The headline figures, one README row each (flat {label: value})."""
    out = {}
    for fam in results:
        rows, name = fam["rows"], fam["name"]
        if fam["reference"]["kind"].startswith("exact"):  # real image games: our best vs shapiq's best
            for budget in fam["budgets"]:
                mine = best(measured(rows, True, budget))
                peer = best([r for r in measured(rows, budget=budget) if r["library"] == "shapiq"])
                if mine and peer:
                    both = f"(ours {mine['estimator']} {mine['relative_error']:.3g}; shapiq {peer['estimator']} " \
                           f"{peer['relative_error']:.3g})"
                    ratio = "both exact" if max(mine["relative_error"], peer["relative_error"]) < EXACT_ERROR else \
                        f"{mine['relative_error'] / max(peer['relative_error'], 1e-300):.3g}"
                    out[f"{name} at {budget}: our best / shapiq's best relative error"] = f"{ratio} {both}"
            continue
        saving = equal_mse_saving(rows)
        if saving:
            s, r = saving
            out[f"{name}: x fewer evaluations than permutation at equal MSE (our best, least over budgets)"] = (
                f"{s:.3g} ({r['estimator']} at {r['budget']})")
        if fam["reference"]["kind"] == "antithetic":
            out[f"{name}: reference relative standard error"] = fam["reference"]["relative_noise"]
            times = {}
            for lib, est in {(r["library"], r["estimator"]) for r in measured(rows)}:
                t = time_to_error([r for r in measured(rows) if (r["library"], r["estimator"]) == (lib, est)],
                                  TARGET_ERROR)
                if t is not None:
                    times[(lib, est)] = t
            mine = min(((t, k) for k, t in times.items() if k[0] == "ours"), default=None)
            peer = min(((t, k) for k, t in times.items() if k[0] != "ours"), default=None)
            label = f"{name}: time to {TARGET_ERROR:.0%} relative error, fastest peer / our fastest"
            if mine and peer:
                out[label] = f"{peer[0] / mine[0]:.3g}x (ours {mine[1][1]} {mine[0]:.3g} s; {' '.join(peer[1])} " \
                             f"{peer[0]:.3g} s)"
            elif mine:
                out[label] = f"no peer reached it (ours {mine[1][1]} {mine[0]:.3g} s)"
    big = [fam for fam in results if not fam["reference"]["kind"].startswith("exact")]
    for est in sorted({r["estimator"] for fam in big for r in measured(fam["rows"], True)} - {"antithetic"}):
        ratios = []
        for fam in big:
            rows = measured(fam["rows"], True)
            anti = {r["budget"]: r["mse"] for r in rows if r["estimator"] == "antithetic"}
            ratios += [r["mse"] / anti[r["budget"]] for r in rows if r["estimator"] == est and anti.get(r["budget"])]
        if ratios:
            out[f"{est}: worst MSE / antithetic's MSE over the 196-player families and budgets"] = max(ratios)
    return out


# --------------------------------------------------------------------------- plot
def plot(results: list[dict], path: Path) -> None:
    """Relative error against evaluations and against seconds, one row of two panels per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    styles = {"ours": "-", "shapiq": "--", "captum": ":"}
    names = sorted({(r["library"] != "ours", r["library"], r["estimator"]) for fam in results for r in fam["rows"]})
    colour = {(lib, est): plt.cm.tab20(i % 20) for i, (_, lib, est) in enumerate(names)}
    for (ax_b, ax_s), fam in zip(axes, results):
        rows = measured(fam["rows"])
        for lib, est in sorted({(r["library"], r["estimator"]) for r in rows}):
            mine = sorted((r for r in rows if (r["library"], r["estimator"]) == (lib, est)), key=lambda r: r["budget"])
            err = [max(r["relative_error"], 1e-8) for r in mine]
            label = est if lib == "ours" else f"{lib} {est}"
            style = {"linestyle": styles[lib], "marker": "o", "ms": 3, "color": colour[(lib, est)]}
            ax_b.loglog([r["evaluations"] for r in mine], err, label=label, **style)
            ax_s.loglog([r["seconds"] for r in mine], err, **style)
        ax_b.set_title(f"{fam['name']} (n = {fam['n']})", fontsize=9)
        ax_b.set_xlabel("evaluations")
        ax_s.set_xlabel("seconds per estimate")
        ax_b.set_ylabel("relative error")
        ax_b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = common.parser(__doc__, "estimators")
    p.add_argument("--tables", default=str(TABLES), help="the shapiq image games (*.npz); absent = left out")
    p.add_argument("--images", type=int, default=15, help="image games per model")
    p.add_argument("--image-budgets", type=int, nargs="*", default=[200, 500, 1000])
    p.add_argument("--budgets", type=int, nargs="*", default=[1000, 3000, 10_000, 30_000, 100_000],
                   help="budgets of the 196-player families")
    p.add_argument("--trials", type=int, default=5, help="seeds per 196-player family")
    p.add_argument("--reference-budget", type=int, default=10_000_000)
    p.add_argument("--peer-max-budget", type=int, default=100_000, help="peers run up to this budget")
    p.add_argument("--peer-max-players", type=int, default=196, help="peers run on games up to this size")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="an estimator whose runs at one budget take longer skips the family's larger budgets")
    p.add_argument("--torch-batch", type=int, default=256, help="Captum perturbations_per_eval")
    p.add_argument("--no-peers", action="store_true", help="only our estimators")
    p.add_argument("--families", nargs="*", default=None, help="run only these families")
    args = p.parse_args(argv)
    if args.quick:
        args.image_budgets, args.budgets = [200, 1000], [1000, 4000]
        args.images, args.trials, args.reference_budget, args.peer_max_players = 1, 2, 100_000, 20
    env = common.environment()
    print(f"estimators on {common.describe(env)}", flush=True)
    notes = []
    families = image_families(Path(args.tables), args.images, args.image_budgets)
    if not families:
        notes.append(f"no image games found in {args.tables}; those families are left out")
        print(notes[-1], flush=True)
    families += closed_form_families(args.trials, args.budgets)
    families += cub_families(args.trials, args.budgets, args.reference_budget)
    if args.families:
        families = [f for f in families if f.name in args.families]
    ests = estimators(args)
    results = []
    for fam in families:
        t0 = time.perf_counter()
        rows = bench_family(fam, ests, args)
        results.append({"name": fam.name, "n": fam.n, "budgets": list(fam.budgets), "runs": len(fam.runs),
                        "reference": fam.reference, "rows": rows, "seconds": time.perf_counter() - t0})
    summary = summarize(results)
    for k, v in summary.items():
        print(f"{k}: {v}")
    notes += ["error = mean over runs (images, or seeds) of ||phi - phi*|| / ||phi*||; our best = least MSE of our "
              "registered estimators at that budget; seconds = median wall time of one estimate",
              "peers evaluate the same JAX game through numpy (padded power-of-two batches compiled beforehand); "
              "their evaluations are counted calls",
              f"x fewer evaluations: permutation's MSE is c / evaluations (independent units); c is fitted over its "
              f"budgets; time to {TARGET_ERROR:.0%}: log-log interpolation between budgets"]
    doc = common.document("estimators", env, vars(args), summary, {"families": results}, notes)
    common.write_json_and_plot(args.out, doc, lambda png: plot(results, png))


if __name__ == "__main__":
    main()
