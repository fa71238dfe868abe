"""Local (saliency partition) Shapley values, SPEC 3.

For each position p of an H x W grid the players are the positions of the
k x k window W_p centred on p (clipped at the borders), and

    phi_p = E_S [ v_p(S + {p}) - v_p(S) ],   S drawn with Shapley weights from W_p minus {p}:

its size uniform in 0..|W_p|-1, then a uniform subset of that size. Positions
outside W_p are held absent (``outside="absent"``) or present. With ``paired``
each draw S also uses its complement in W_p minus {p} (whose size is again
uniform), so M samples are M/2 pairs; either way a window costs 2 M
evaluations and the map 2 HW M. With ``stratified`` the sizes of a window's
draws are stratified (:func:`stratified_subset`), at the same cost.

Item i = (window p, draw j) with i = p * draws + j uses the key
``fold_in(image_key, i)``. The estimator is :class:`LocalWindows`, an
:class:`~fgvce_jax.shapley.registry.Estimator` of the unit engine
(:mod:`fgvce_jax.shapley.estimate`), which splits its units over a 1-D device
mesh, walks them in blocks and sums their statistics in one canonical order, so
neither the chunk size nor the device count changes the result -- the same
guarantee, and the same code, as every global estimator.

For an affine game (``game.is_affine``: the GAP + linear head) a unit is a whole
window: the same draws are evaluated from the window's own contributions, one
(k^2,) x (k^2, C) product per draw giving the sums of all its 2 or 4
coalitions, instead of one (HW,) x (HW, C) product per coalition.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fgvce_jax.errors import FgvceError
from fgvce_jax import sharding
from fgvce_jax.shapley.estimate import MAX_BLOCK_EVALUATIONS, Plan, plan_units
from fgvce_jax.shapley.estimate import run_batch as run_engine
from fgvce_jax.shapley.game import as_game, check_game, is_affine, is_croppable
from fgvce_jax.shapley.permutation import uniform_ranks
from fgvce_jax.shapley.registry import Estimator

OUTSIDE = ("absent", "present")


def window(grid: tuple[int, int], kernel: int, p: jax.Array) -> jax.Array:
    """bool (H, W): the k x k window centred on flat position p, clipped to the grid."""
    h, w = grid
    r, c = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    half = kernel // 2
    return (jnp.abs(r - p // w) <= half) & (jnp.abs(c - p % w) <= half)


def window_players(grid: tuple[int, int], kernel: int, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(W_p, W_p minus {p}), both bool (H, W)."""
    win = window(grid, kernel, p)
    return win, win & (jnp.arange(grid[0] * grid[1]) != p).reshape(grid)


def shapley_subset(key: jax.Array, players: jax.Array) -> jax.Array:
    """bool like ``players``: a subset S with |S| uniform in 0..|players| and S uniform given its size.

    Drawn as the players that precede p in a random order: with u_q, t iid uniform, S = {q : u_q < t}.
    Given t, |S| is Binomial(n, t); over t uniform that makes |S| uniform on 0..n, and by symmetry S is
    uniform given its size -- the Shapley weights, with no sort or ranking.
    """
    u = jax.random.uniform(key, (players.size + 1,))  # one draw: the u_q and t (a split would cost a second)
    return players & (u[:-1].reshape(players.shape) < u[-1])


def stratified_subset(key: jax.Array, players: jax.Array, stratum: tuple[jax.Array, int]) -> jax.Array:
    """bool like ``players``: draw j of M = ``stratum`` (j, M) with its size in stratum j of the uniform size law.

    |S| = floor((j + t) (n + 1) / M) for t uniform and n = |players|, then S uniform given its size (the
    players of lowest u_q). Over j uniform this is the Shapley law of ``shapley_subset``; over the M
    draws of a window each stratum is drawn once, so their mean is unbiased and its variance is the
    within-strata part only -- never above iid draws', and the size-driven part of the marginal (the
    whole of it in a game of |S| alone, e.g. a probability saturating with the number of present
    positions) is gone. It is the ideal size control variate g(|S|) = E[Delta | |S|], at no evaluations.
    """
    j, strata = stratum
    u = jax.random.uniform(key, (players.size + 1,))
    size = jnp.floor((j + u[-1]) / strata * (players.sum() + 1))
    rank = uniform_ranks(jnp.where(players.reshape(-1), u[:-1], 2.0)).reshape(players.shape)
    return players & (rank < size)


def draw_subset(key: jax.Array, players: jax.Array, stratum) -> jax.Array:
    """``shapley_subset`` (stratum None) or ``stratified_subset`` (stratum = (draw j, draws M))."""
    return shapley_subset(key, players) if stratum is None else stratified_subset(key, players, stratum)


def draw_stratum(idx: jax.Array, draws: int, stratified: bool):
    """The stratum (j, M) of item idx = p * draws + j, or None when not ``stratified``."""
    return (idx % draws, draws) if stratified else None


def window_frame(p: jax.Array, grid: tuple[int, int], kernel: int):
    """(rows (k,), cols (k,), players bool (k, k)): the k x k window around flat position p in its own
    coordinates -- grid rows/cols of its cells (possibly off the grid) and its players (on the grid, not p)."""
    h, w = grid
    half = kernel // 2
    rows, cols = p // w - half + jnp.arange(kernel), p % w - half + jnp.arange(kernel)
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    centre = (jnp.arange(kernel) == half)[:, None] & (jnp.arange(kernel) == half)[None, :]
    return rows, cols, inside & ~centre


def in_window_coordinates(grid: tuple[int, int], kernel: int) -> bool:
    """Whether draws are made among the k^2 window cells (k^2 < H W) rather than on the whole grid."""
    return kernel * kernel < grid[0] * grid[1]


def window_subset(key: jax.Array, p: jax.Array, grid: tuple[int, int], kernel: int, stratum=None) -> jax.Array:
    """bool (H, W): a Shapley-weighted subset S of W_p minus {p}, drawn in the k x k window's own coordinates.

    Sampling among the k^2 window cells (not the H W grid) keeps the draw small; the subset is then
    placed onto the grid by one-hot products (cheaper than a vmapped gather on CPU).
    Used when k^2 < H W; otherwise the grid itself is sampled.
    """
    h, w = grid
    rows, cols, players = window_frame(p, grid, kernel)
    s_local = draw_subset(key, players, stratum).astype(jnp.float32)
    to_rows = (rows[:, None] == jnp.arange(h)[None, :]).astype(jnp.float32)  # (k, H) one-hot placement
    to_cols = (cols[:, None] == jnp.arange(w)[None, :]).astype(jnp.float32)  # (k, W)
    return (to_rows.T @ s_local @ to_cols) > 0.5


def item_masks(key: jax.Array, p: jax.Array, grid: tuple[int, int], kernel: int, outside: str,
               paired: bool, stratum=None) -> jax.Array:
    """bool (E, H, W) for one draw at window p: [S, S + p] (+ [S', S' + p] when paired), E = 2 or 4."""
    win, players = window_players(grid, kernel, p)
    here = win & ~players
    s = (window_subset(key, p, grid, kernel, stratum) if in_window_coordinates(grid, kernel)
         else draw_subset(key, players, stratum))
    draws = [s, players & ~s] if paired else [s]
    rest = ~win if outside == "present" else jnp.zeros(grid, bool)
    return jnp.stack([m for d in draws for m in (d | rest, d | rest | here)])


def marginal(values: jax.Array) -> jax.Array:
    """The mean marginal of one draw from values (E,) on ``item_masks``: mean of v(S + p) - v(S)."""
    return (values[1::2] - values[0::2]).mean()


@dataclasses.dataclass(frozen=True)
class LocalWindows(Estimator):
    """The saliency-partition estimator as an :class:`Estimator` of the unit engine
    (:mod:`fgvce_jax.shapley.estimate`), over ``n`` windows (all H W positions, or the S of a selection).

    A unit is one (window, draw) item -- 2 or 4 evaluations, ``marginal`` of ``item_masks`` -- or, for an
    affine game (``affine``), one window with all its draws (``2 draws`` or ``4 draws`` evaluations, see
    :meth:`window_gains`). Item (p, j) draws from ``fold_in(key, p * draws + j)`` either way, so both paths
    see the same subsets. A unit's statistic is its marginal (summed over its draws) placed at its window's
    slot, ``phi = e_slot * sum_j Delta_pj`` (n,); the engine sums these in its canonical order, and
    :meth:`finalize` divides by the draws: ``Phi_p = (1/M') sum_j Delta_pj``. So chunk size and device count
    change no bit, as for every estimator of the engine.
    """

    grid: tuple[int, int] = (1, 1)
    kernel: int = 1
    draws: int = 1
    outside: str = "absent"
    paired: bool = True
    stratified: bool = False
    affine: bool = False

    def evals_per_item(self) -> int:
        return 4 if self.paired else 2

    def evals_per_unit(self) -> int:
        return self.evals_per_item() * (self.draws if self.affine else 1)

    def units(self) -> int:
        """U: n windows times their draws, or n windows for the affine path."""
        return self.n * (1 if self.affine else self.draws)

    def draw_bytes(self) -> int:
        return 4 * (self.grid[0] * self.grid[1] + 1) * (self.draws if self.affine else 1)

    def stat_shapes(self):
        return {"phi": jax.ShapeDtypeStruct((self.n,), jnp.float32)}

    def item_marginals(self, fn, args, key: jax.Array, item: jax.Array) -> jax.Array:
        """float32 (E,): the marginal of each item (E,) = p * draws + j, the game on its full masks (on the
        windows' receptive fields for a croppable game, ``game.is_croppable``, with ``outside="absent"``)."""
        grid, e = self.grid, self.evals_per_item()
        p = item // self.draws
        masks = jax.vmap(lambda i, q: item_masks(jax.random.fold_in(key, i), q, grid, self.kernel, self.outside,
                                                 self.paired, draw_stratum(i, self.draws, self.stratified)))(item, p)
        masks = masks.reshape(item.shape[0] * e, *grid)
        if is_croppable(fn) and self.outside == "absent":
            values = fn.cropped(args, masks, jnp.repeat(p, e), self.kernel)
        else:
            values = fn(args, masks)
        return jax.vmap(marginal)(values.reshape(-1, e).astype(jnp.float32))

    def window_gains(self, args, key: jax.Array, p: jax.Array, readout) -> jax.Array:
        """float32 (draws,): the marginal of each draw of window p for an affine game (``game.is_affine``).

        The subsets are drawn exactly as on the generic path (same keys, same cells), but the pre-readout
        sums are built from the window's own contributions c (k^2, C):
        s(S) = o + S.c, s(S + p) = s(S) + c_p, s(S') = o + T - S.c, s(S' + p) = s(S') + c_p, with T the
        sum over the window's players and o the offset (plus every contribution outside the window when
        ``outside="present"``). One (k^2,) x (k^2, C) product serves the draw's 2 or 4 coalitions.
        """
        (h, w), kernel, draws = self.grid, self.kernel, self.draws
        contrib = args["contrib"].astype(jnp.float32)  # (HW, C)
        c_p = contrib[p]
        if in_window_coordinates(self.grid, kernel):
            half = kernel // 2
            padded = jnp.pad(contrib.reshape(h, w, -1), ((half, half), (half, half), (0, 0)))
            cells = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(padded, p // w, kernel, 0),
                                                 p % w, kernel, 1).reshape(kernel * kernel, -1)
            players = window_frame(p, self.grid, kernel)[2]
        else:
            cells = contrib
            players = window_players(self.grid, kernel, p)[1]
        subsets = jax.vmap(lambda i: draw_subset(jax.random.fold_in(key, i), players,
                                                 draw_stratum(i, draws, self.stratified)))(
            p * draws + jnp.arange(draws)).reshape(draws, -1).astype(jnp.float32)
        total = (cells * players.reshape(-1, 1)).sum(0)  # T (C,); a masked sum (a batched matvec is slow on CPU)
        offset = args["offset"]
        if self.outside == "present":
            offset = offset + contrib.sum(0) - total - c_p
        a = subsets @ cells  # (draws, C)
        sums = [offset + a, offset + total - a] if self.paired else [offset + a]
        gains = [readout(s + c_p).astype(jnp.float32) - readout(s).astype(jnp.float32)
                 for s in sums]  # no stacking of the values: a stacked reduction output is slow on CPU
        return sum(gains) / len(gains)

    def evaluate(self, fn, args, key, index, select):
        """(slots (E,), marginals (E, 1) or (E, draws)): unit i is window slot i // draws, draw i % draws
        (the affine path: window slot i, all draws); the slot's grid window is the slot itself, or
        ``select[slot]``. Padding units (i >= U) reuse the last slot; the engine zeroes their statistics."""
        slot = jnp.minimum(index // (1 if self.affine else self.draws), self.n - 1)
        p = slot if select is None else select[slot]
        if self.affine:
            readout = functools.partial(fn.readout, args)
            return slot, jax.vmap(lambda q: self.window_gains(args, key, q, readout))(p)
        return slot, self.item_marginals(fn, args, key, p * self.draws + index % self.draws)[:, None]

    def unit_stats(self, slot, gains):
        return {"phi": jnp.where(jnp.arange(self.n) == slot, gains.sum(), 0.0)}

    def finalize(self, total, counts, n_units, anchor_values):
        return total["phi"] / self.draws


def check_local(grid, kernel, samples, outside, paired) -> int:
    """Validate local's arguments; returns the number of draws per window (samples, or samples / 2 paired)."""
    if len(grid) != 2 or min(grid) < 1:
        raise FgvceError(f"grid must be (H, W) with H, W >= 1, got {grid}")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise FgvceError(f"kernel must be a positive odd integer (windows are centred), got {kernel!r}")
    if kernel // 2 >= max(grid):
        raise FgvceError(f"kernel {kernel} is larger than the grid {tuple(grid)} needs: "
                         f"{2 * max(grid) - 1} already covers it from every position")
    if outside not in OUTSIDE:
        raise FgvceError(f"outside must be one of {', '.join(OUTSIDE)}, got {outside!r}")
    if not isinstance(samples, int) or samples < 1 or (paired and samples % 2):
        raise FgvceError(f"samples must be a positive integer{' and even when paired' if paired else ''}, "
                         f"got {samples!r}")
    return samples // 2 if paired else samples


CPU_AFFINE_CHUNK = 4096  # evaluations: keeps an affine chunk's sums in cache on a CPU (measured 3x faster than 50k)


def plan(grid, kernel, draws, outside, paired, n_games, bytes_per_evaluation, chunk_size, mesh, *, affine=False,
         stratified=False, windows: int | None = None) -> Plan:
    """The engine's :class:`~fgvce_jax.shapley.estimate.Plan` for a local request over n_games games
    (``windows`` of each game's windows, default all H W): a :class:`LocalWindows` estimator and its cut.

    The affine path is bound by memory traffic, so on a CPU its default game call is cache-sized
    (CPU_AFFINE_CHUNK evaluations per game)."""
    est = LocalWindows(grid[0] * grid[1] if windows is None else windows, grid=tuple(grid), kernel=kernel,
                       draws=draws, outside=outside, paired=paired, stratified=stratified, affine=affine)
    cap = MAX_BLOCK_EVALUATIONS
    if affine and chunk_size is None and mesh.devices.flat[0].platform == "cpu":
        cap = CPU_AFFINE_CHUNK
    return plan_units(est, est.units(), bytes_per_evaluation, n_games, chunk_size, mesh, max(cap, est.evals_per_unit()))


def run_batch(fn, args, keys, p: Plan, *, mesh, shared=None, windows=None) -> jax.Array:
    """Phi (N, H, W) for N games ``fn(with_shared(shared, args[i]), .)`` (args with a leading N axis,
    ``shared`` without one, e.g. the model parameters) and keys (N,), by the unit engine with plan ``p``
    (:func:`plan`).

    ``windows`` int32 (N, S): estimate only these windows of each game, returning their Phi (N, S).
    Window p's draw j keeps its key ``fold_in(key, p * draws + j)``, so each value is the full map's
    Phi at p (up to the rounding of another batch shape).
    """
    phi = run_engine(p.est, fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks, mesh=mesh, r=p.r,
                     shared=shared, select=windows)
    return phi.reshape(-1, *p.est.grid) if windows is None else phi


def local(game, grid: tuple[int, int], *, kernel: int, samples: int, key: jax.Array, outside: str = "absent",
          paired: bool = True, stratified: bool = False, chunk_size: int | None = None, mesh=None) -> jax.Array:
    """The saliency-partition estimate Phi (H, W) of a game ``bool[B, H, W] -> float[B]``.

    Args:
      game: a :class:`Game` or a jax-traceable callable.
      grid: (H, W).
      kernel: k, the odd window size; k = 2 max(H, W) - 1 makes every window the whole grid.
      samples: M draws per window (including complements when ``paired``); 2 HW M evaluations.
      key: a PRNG key.
      outside: positions outside the window are ``absent`` or ``present``.
      paired: pair each draw with its complement inside the window.
      stratified: draw j of a window's M draws (pairs) takes its size from stratum j of the size law
        (``stratified_subset``): unbiased, never more variance, the size-driven part removed.
      chunk_size: evaluations per chunk on one device (default: from the memory budget).
      mesh: a 1-D device mesh (default: all devices).
    """
    grid = tuple(int(g) for g in grid)
    draws = check_local(grid, kernel, samples, outside, paired)
    game = as_game(game)
    check_game(game, grid)
    mesh = sharding.device_mesh(mesh)
    p = plan(grid, kernel, draws, outside, paired, 1, game.bytes_per_evaluation, chunk_size, mesh,
             affine=is_affine(game.fn), stratified=stratified)
    args = jax.tree.map(lambda a: jnp.asarray(a)[None], game.args)
    return run_batch(game.fn, args, key[None], p, mesh=mesh)[0]
