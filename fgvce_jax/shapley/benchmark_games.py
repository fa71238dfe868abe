"""Games with exact Shapley values, for benchmarking estimators (issue 11).

Every game here is a jax-traceable :class:`~fgvce_jax.shapley.game.Game`
(masks bool[B, n] -> float[B]), so any registered estimator runs on it, and
each family comes with its exact Shapley values phi (n,) in float64:

- **AND/OR trees** (:func:`tree_game`). v(S) = sum_r c_r F_r(S), each F_r a
  read-once AND/OR formula over the players (a gate's children never share a
  player; different roots may). Exact values by Owen's multilinear extension
  (Owen 1972, "Multilinear extensions of games", Management Science 18(5)):

      phi_i = int_0^1 d f / d x_i (t, ..., t) dt,   f(x) = E[v(S)],  S ~ independent Bernoulli(x_j),

  because the Shapley weights are the Beta integrals
  s! (n - s - 1)! / n! = int_0^1 t^s (1 - t)^(n - s - 1) dt. For a read-once
  formula the children of a gate are independent under the product measure,
  so f propagates exactly from the leaves, p_AND = prod_j p_j and
  p_OR = 1 - prod_j (1 - p_j), and by the chain rule d f / d x_i is the sum
  over the paths from the roots to i of c_r times the product along the path
  of the local derivatives, prod_{siblings} p (AND) or prod_{siblings} (1 - p)
  (OR). d f / d x_i (t 1) is a polynomial in t of degree <= n - 1, so
  Gauss-Legendre quadrature with floor(n / 2) + 1 nodes integrates it exactly
  (up to float64 rounding). Example: a product of ORs over disjoint groups
  G_1..G_K, v(S) = prod_k [S meets G_k], gives for i in G_k
  phi_i = int_0^1 (1 - t)^(|G_k| - 1) prod_{j != k} (1 - (1 - t)^|G_j|) dt.
- **Sums of unanimity games** (:func:`unanimity_game`), the one-level case
  (AND gates only): v(S) = sum_T c_T [T subset of S] and, in closed form,
  phi_i = sum_{T containing i} c_T / |T| (:func:`unanimity_shapley`).
  :func:`random_unanimity` draws random terms; :func:`local_unanimity` puts
  one term on every 2x2 and 3x3 window of a 14 x 14 grid.
- **Look-up tables** (:func:`table_game`): the value of every coalition,
  e.g. the shapiq project's precomputed image-classifier games
  (:func:`load_table_game` reads one ``.npz``), with phi by enumeration
  (:func:`table_shapley`).
- **The CUB-sized affine softmax game** (:func:`affine_softmax_game`): a
  14 x 14 x 2048 feature map under a GAP + linear head with 200 classes,
  through :func:`~fgvce_jax.shapley.game.feature_game`; no closed form (a
  benchmark estimates its reference by a long antithetic run).

Float32 throughout the games (the engine's precision); phi in float64.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.exact import shapley_weights
from fgvce_jax.shapley.game import Game, feature_game

OPS = ("and", "or")
REGIMES = ("independent", "size_dominated")


class BenchmarkGame(NamedTuple):
    """A game, its number of players and its exact Shapley values phi (n,) float64."""

    name: str
    game: Game
    n_players: int
    phi: np.ndarray


class Gate(NamedTuple):
    """One level of an AND/OR tree: ``children`` bool (K, K_prev) (row k = the inputs of gate k, players
    for the first level, the previous level's gates after), ``is_and`` bool (K,) (False = OR)."""

    children: np.ndarray
    is_and: np.ndarray


# --------------------------------------------------------------------------- AND/OR trees
@dataclasses.dataclass(frozen=True)
class AndOrTree:
    """v(S) = sum_r coef_r x_r(S), with x the last level's gates evaluated bottom-up from the players.

    args: ``levels`` a tuple of dicts ``children`` float32 (K, K_prev) 0/1, ``is_and`` bool (K,);
    ``coef`` float32 (K_last,). A gate's count of present inputs is a 0/1 product (exact in float32,
    TF32 included); the coefficients are applied elementwise, not by a matmul, so no matmul precision
    setting rounds them.
    """

    def __call__(self, args, masks):
        x = masks.reshape(masks.shape[0], -1).astype(jnp.float32)
        for level in args["levels"]:
            present = x @ level["children"].T
            x = jnp.where(level["is_and"], present == level["children"].sum(-1), present > 0).astype(jnp.float32)
        return (x * args["coef"]).sum(-1)


def _check_tree(levels: Sequence[Gate], coef: np.ndarray, n: int) -> None:
    """FgvceError unless the levels chain, every gate has an input, and every gate is read-once."""
    support = np.eye(n, dtype=np.int64)  # support[k, i]: how often player i occurs below node k
    for depth, gate in enumerate(levels):
        if gate.children.ndim != 2 or gate.children.shape[1] != len(support) or gate.is_and.shape != (
                gate.children.shape[0],):
            raise FgvceError(f"tree level {depth}: children must be bool (K, {len(support)}) and is_and bool (K,), "
                             f"got {gate.children.shape} and {gate.is_and.shape}")
        if not gate.children.any(axis=1).all():
            raise FgvceError(f"tree level {depth}: every gate needs at least one input")
        support = gate.children.astype(np.int64) @ support
        if support.max() > 1:
            raise FgvceError(f"tree level {depth}: a gate's inputs share a player; the formula must be read-once")
    if coef.shape != (len(support),):
        raise FgvceError(f"coef must have one entry per top-level gate ({len(support)}), got shape {coef.shape}")


def tree_game(levels: Sequence[Gate], coef, n_players: int) -> Game:
    """The AND/OR tree game v(S) = sum_r coef_r F_r(S) (see the module docstring) as a Game.

    Args:
      levels: bottom-up :class:`Gate` levels; the first level's inputs are the n players.
      coef: (K_last,) the weight of each top-level gate.
      n_players: n.
    """
    levels = [Gate(np.asarray(g.children, bool), np.asarray(g.is_and, bool)) for g in levels]
    coef = np.asarray(coef, np.float64)
    _check_tree(levels, coef, n_players)
    args = {"levels": tuple({"children": jnp.asarray(g.children, jnp.float32), "is_and": jnp.asarray(g.is_and)}
                            for g in levels),
            "coef": jnp.asarray(coef, jnp.float32)}
    return Game(AndOrTree(), args, 4 * (n_players + sum(len(g.is_and) for g in levels)) * 2)


def _exclusive_products(f: np.ndarray) -> np.ndarray:
    """(Q, s) -> (Q, s): entry j = prod_{j' != j} f[:, j'], by prefix and suffix products (no division)."""
    ones = np.ones((f.shape[0], 1))
    before = np.cumprod(np.concatenate([ones, f[:, :-1]], axis=1), axis=1)
    after = np.cumprod(np.concatenate([ones, f[:, :0:-1]], axis=1), axis=1)[:, ::-1]
    return before * after


def tree_shapley(levels: Sequence[Gate], coef, n_players: int) -> np.ndarray:
    """Exact phi (n,) float64 of :func:`tree_game` by Owen's formula (module docstring):
    phi_i = int_0^1 df/dx_i(t 1) dt, the polynomial integrated exactly by Gauss-Legendre quadrature."""
    levels = [Gate(np.asarray(g.children, bool), np.asarray(g.is_and, bool)) for g in levels]
    coef = np.asarray(coef, np.float64)
    _check_tree(levels, coef, n_players)
    t, w = np.polynomial.legendre.leggauss(n_players // 2 + 1)
    t, w = (t + 1) / 2, w / 2  # nodes and weights on [0, 1]
    probs = [np.broadcast_to(t[:, None], (len(t), n_players))]  # P(node present) at each node t, per level
    for gate in levels:
        p = probs[-1][:, None, :]
        all_in = np.where(gate.children[None], p, 1.0).prod(-1)
        any_in = 1.0 - np.where(gate.children[None], 1.0 - p, 1.0).prod(-1)
        probs.append(np.where(gate.is_and[None], all_in, any_in))
    grad = np.broadcast_to(coef[None], (len(t), len(coef)))  # d f / d (node present), top level first
    for gate, p in zip(reversed(levels), reversed(probs[:-1])):
        below = np.zeros_like(p)
        for k in range(len(gate.is_and)):
            idx = np.flatnonzero(gate.children[k])
            local = p[:, idx] if gate.is_and[k] else 1.0 - p[:, idx]
            below[:, idx] += grad[:, k:k + 1] * _exclusive_products(local)
        grad = below
    return w @ grad


def unanimity_game(terms, coef) -> Game:
    """v(S) = sum_T c_T [T subset of S]: terms bool (K, n) (row = T), coef (K,). A one-level AND tree."""
    terms = np.asarray(terms, bool)
    return tree_game([Gate(terms, np.ones(len(terms), bool))], coef, terms.shape[1])


def unanimity_shapley(terms, coef) -> np.ndarray:
    """phi (n,) float64 of :func:`unanimity_game`: phi_i = sum_{T containing i} c_T / |T|."""
    terms = np.asarray(terms, bool)
    return (np.asarray(coef, np.float64) / terms.sum(1)) @ terms


def random_unanimity(key: jax.Array, n: int = 196, n_terms: int = 200, max_size: int = 8) -> BenchmarkGame:
    """A sum of ``n_terms`` unanimity games on uniform random subsets of 1..max_size players, c_T ~ N(0, 1)."""
    k_size, k_members, k_coef = jax.random.split(key, 3)
    size = np.asarray(jax.random.randint(k_size, (n_terms, 1), 1, max_size + 1))
    u = np.asarray(jax.random.uniform(k_members, (n_terms, n)))
    terms = np.argsort(np.argsort(u, axis=1), axis=1) < size  # the `size` players with the smallest draws
    coef = np.asarray(jax.random.normal(k_coef, (n_terms,)), np.float64)
    return BenchmarkGame(f"unanimity_random_{n}", unanimity_game(terms, coef), n, unanimity_shapley(terms, coef))


def window_terms(grid: tuple[int, int], size: int) -> np.ndarray:
    """bool (W, H*W): one row per size x size window of an H x W grid (row-major players)."""
    h, w = grid
    rows = []
    for i in range(h - size + 1):
        for j in range(w - size + 1):
            m = np.zeros(grid, bool)
            m[i:i + size, j:j + size] = True
            rows.append(m.reshape(-1))
    return np.array(rows, bool).reshape(-1, h * w)


def local_unanimity(key: jax.Array, grid: tuple[int, int] = (14, 14), windows: Sequence[int] = (2, 3)
                    ) -> BenchmarkGame:
    """A sum of unanimity games, one on every k x k window of the grid for k in ``windows``, c_T ~ N(0, 1)."""
    terms = np.concatenate([window_terms(grid, k) for k in windows])
    coef = np.asarray(jax.random.normal(key, (len(terms),)), np.float64)
    n = grid[0] * grid[1]
    name = f"unanimity_local_{grid[0]}x{grid[1]}"
    return BenchmarkGame(name, unanimity_game(terms, coef), n, unanimity_shapley(terms, coef))


def _group(key: jax.Array, n_inputs: int, fan_in: tuple[int, int]) -> np.ndarray:
    """children bool (K, n_inputs): the inputs shuffled and cut into consecutive groups of fan_in sizes."""
    k_perm, k_size = jax.random.split(key)
    order = np.asarray(jax.random.permutation(k_perm, n_inputs))
    sizes = np.asarray(jax.random.randint(k_size, (n_inputs,), fan_in[0], fan_in[1] + 1))
    ends = np.minimum(np.cumsum(sizes), n_inputs)
    ends = ends[:np.searchsorted(ends, n_inputs) + 1]
    starts = np.concatenate([[0], ends[:-1]])
    children = np.zeros((len(ends), n_inputs), bool)
    for k, (a, b) in enumerate(zip(starts, ends)):
        children[k, order[a:b]] = True
    return children


def random_tree(key: jax.Array, n: int = 196, ops: Sequence[str] = ("or", "and"),
                fan_in: tuple[int, int] = (2, 4)) -> BenchmarkGame:
    """A sum of random read-once formulas: level l gates are ``ops[l]`` over groups of ``fan_in`` sizes of
    the previous level's nodes (a random partition); the top-level gates get c_r ~ N(0, 1). The default
    is a sum of products of ORs, v(S) = sum_r c_r prod_{G in r} [S meets G]."""
    if not ops or any(op not in OPS for op in ops):
        raise FgvceError(f"ops must be a non-empty sequence of {' / '.join(OPS)}, got {ops!r}")
    if not 1 <= fan_in[0] <= fan_in[1]:
        raise FgvceError(f"fan_in must be (low, high) with 1 <= low <= high, got {fan_in!r}")
    keys = jax.random.split(key, len(ops) + 1)
    levels, width = [], n
    for k, op in zip(keys[:-1], ops):
        children = _group(k, width, fan_in)
        levels.append(Gate(children, np.full(len(children), op == "and")))
        width = len(children)
    coef = np.asarray(jax.random.normal(keys[-1], (width,)), np.float64)
    name = f"tree_{'_'.join(ops)}_{n}"
    return BenchmarkGame(name, tree_game(levels, coef, n), n, tree_shapley(levels, coef, n))


# --------------------------------------------------------------------------- look-up tables
@dataclasses.dataclass(frozen=True)
class Table:
    """v(S) = table[sum_{i in S} 2^i]; args: ``table`` (2^n,)."""

    def __call__(self, args, masks):
        n = args["table"].shape[0].bit_length() - 1
        index = (masks.reshape(masks.shape[0], n).astype(jnp.int32) << jnp.arange(n, dtype=jnp.int32)).sum(-1)
        return jnp.take(args["table"], index)


def _by_bits(coalitions, values) -> np.ndarray:
    """values re-ordered so that entry sum_i 2^i z_i is the value of coalition z; checks the table."""
    coalitions, values = np.asarray(coalitions, bool), np.asarray(values, np.float64)
    if coalitions.ndim != 2 or not 1 <= coalitions.shape[1] <= 24:
        raise FgvceError(f"coalitions must be bool (2^n, n) with 1 <= n <= 24, got shape {coalitions.shape}")
    n = coalitions.shape[1]
    if coalitions.shape[0] != 2 ** n or values.shape != (2 ** n,):
        raise FgvceError(f"a table of {n} players needs 2^{n} = {2 ** n} coalitions and values, got "
                         f"{coalitions.shape[0]} and {values.shape}")
    index = coalitions.astype(np.int64) @ (1 << np.arange(n, dtype=np.int64))
    if not np.array_equal(np.sort(index), np.arange(2 ** n)):
        raise FgvceError("the table must list every coalition exactly once")
    table = np.empty(2 ** n)
    table[index] = values
    return table


def table_game(coalitions, values) -> Game:
    """The game of a full table: coalitions bool (2^n, n) in any order, values (2^n,).

    The table is kept in jax's default float type (float32 unless x64 is enabled)."""
    table = _by_bits(coalitions, values)
    return Game(Table(), {"table": jnp.asarray(table)}, 4 * (len(table).bit_length() + 1))


def table_shapley(coalitions, values) -> np.ndarray:
    """Exact phi (n,) float64 of a full table: phi_j = sum_S v(S) c_j(S), with c_j(S) = w(|S| - 1) for j in S
    and -w(|S|) otherwise, w(s) = s! (n - s - 1)! / n! (the exact estimator's regrouping, in float64)."""
    table = _by_bits(coalitions, values)
    n = len(table).bit_length() - 1
    z = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1 == 1
    s = z.sum(1, keepdims=True)
    w = shapley_weights(n)
    return table @ np.where(z, w[np.maximum(s - 1, 0)], -w[np.minimum(s, n - 1)])


def load_table_game(path: str | Path) -> BenchmarkGame:
    """A table game from an ``.npz`` holding ``coalitions`` bool (2^n, n) and ``values`` (2^n,) (the layout of
    shapiq's precomputed games), named after the file, with phi from :func:`table_shapley`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            coalitions, values = data["coalitions"], data["values"]
    except (OSError, KeyError, ValueError) as e:
        raise FgvceError(f"cannot read a coalition table from {path}: {e}") from None
    return BenchmarkGame(path.stem, table_game(coalitions, values), coalitions.shape[1],
                         table_shapley(coalitions, values))


# --------------------------------------------------------------------------- the CUB-sized affine softmax game
@dataclasses.dataclass(frozen=True)
class GapLinear:
    """A split model cut before global average pooling + a linear layer: ``head(z) = mean_p z_p W + b``
    (z (B, H, W, D), params ``W`` (D, C), ``b`` (C,)); ``linear_head`` gives feature_game its fast path."""

    family = "resnet"
    num_classes: int

    def head(self, params, z, ctx=None, token_mask=None):
        return z.mean((1, 2)) @ params["W"] + params["b"]

    def linear_head(self, params):
        return params["W"], params["b"]


def affine_softmax_game(key: jax.Array, regime: str, *, grid: tuple[int, int] = (14, 14), channels: int = 2048,
                        classes: int = 200, spread: float = 2.0) -> Game:
    """The CUB-sized game of a ResNet-50 split at ``layer4`` (448 px): Z (H, W, D), v(S) = softmax(l(S))_c with
    l(S) = b + sum_{p in S} Z_p W / HW (zero baseline), c the class predicted on the whole map.

    W ~ N(0, 1 / D), rescaled so that the full map's logits (centred for size_dominated) have std ``spread``.

    - ``independent``: Z ~ N(0, 1), b = 0. The positions' logit contributions Z_p W / HW are independent
      and centred, so v is far from a function of |S| alone.
    - ``size_dominated``: Z_p = relu(E_p + g), E_p ~ N(0, 1) per position and g ~ N(0, 1) (D,) one shift per
      channel shared by all positions (features that recur across the image, as in a real one), and a bias
      centred on the population's mean pooled feature, b = -mu 1 W with mu = E relu(N(0, 2)) = 1 / sqrt(pi),
      as a trained fc would have. Every position then adds about the same vector, and l(S) moves from
      l(empty) = b towards l(full) roughly in proportion to |S|: v depends mostly on |S|, as for a real
      ResNet with a zero baseline.
    """
    if regime not in REGIMES:
        raise FgvceError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    k_z, k_w, k_g = jax.random.split(key, 3)
    h, w = grid
    z = jax.random.normal(k_z, (h, w, channels))
    W = jax.random.normal(k_w, (channels, classes)) / math.sqrt(channels)
    mu = 0.0
    if regime == "size_dominated":
        z, mu = jax.nn.relu(z + jax.random.normal(k_g, (channels,))), 1.0 / math.sqrt(math.pi)
    full = (z.mean((0, 1)) - mu) @ W
    W = W * (spread / full.std())
    b = -mu * W.sum(0)
    cls = int(jnp.argmax(z.mean((0, 1)) @ W + b))
    return feature_game(GapLinear(classes), {"W": W, "b": b}, z, None, cls, baseline="zero", output="prob")
