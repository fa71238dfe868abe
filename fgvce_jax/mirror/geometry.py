"""The geometry of Mirror-CFE in feature space (SPEC 8, issue 12): the mirror, the reflection, the
refinement to the swapped logits and the path from the source to its mirror image.

Notation. A query's feature map is Z (H, W, D) with n = H W positions x_i (D,). The head is GAP + linear,
g(Z) = mean_hw(Z) @ W + b with W (D, C) and b (C,) as :meth:`SplitModel.linear_head` gives them. s is the
source class, t the target class.

- The mirror is the hyperplane w_m . x + b_m = 0 with w_m = W[:, t] - W[:, s] (D,), b_m = b_t - b_s.
- Projection of every position: p_i = x_i - (w_m . x_i + b_m) / ||w_m||^2 w_m; reflection r_i = 2 p_i - x_i.
- Path: Z_k = Z_s + k (Z_end - Z_s), Z_end the reflection or its refinement.

What holds exactly. Write d(Z) = g_t(Z) - g_s(Z) = w_m . mean_hw(Z) + b_m. The reflection is affine in x and
mean_hw commutes with it, so mean_hw(Z_r) = m - 2 d(Z_s) / ||w_m||^2 w_m with m = mean_hw(Z_s), and along the
path d(Z_k) = (1 - 2k) d(Z_s): at k = 0.5 the s and t logits are equal (and Z_0.5 is the projection P), at
k = 1 their difference is -d(Z_s), the opposite sign. The other logits move too,
g_c(Z_k) = g_c(Z_s) - 2k d(Z_s) (W[:, c] . w_m) / ||w_m||^2, so t need not be the top class at k = 1; the
refinement fixes that.

Refinement. The swapped logits y* are g(Z_s) with entries s and t exchanged. L(Z) = ||g(Z) - y*||^2 is
minimised by L-BFGS from the reflection. Because g is affine in mean_hw(Z), the solutions are the affine set
S = {Z : mean_hw(Z) @ W = y* - b} (non-empty when W has full column rank C <= D) and the least-norm step from
any Z_0 to S is closed-form: with e = y* - g(Z_0) (C,),

    min ||dZ||_F^2  s.t.  mean_hw(dZ) @ W = e   =>   dZ_i = delta for every i,  delta = e @ pinv(W) (D,),

because for a fixed mean the Frobenius norm is smallest with every position equal, and delta is then the
least-norm solution of delta @ W = e, i.e. W^T delta = e, delta = pinv(W^T) e. The gradient of L,
dL/dZ_i = (2/n) W (g(Z) - y*), is the same at every position and lies in the row space of W^T, so L-BFGS,
whose steps are combinations of gradients, stays in Z_0 + range and converges to the closed-form
projection of its start Z_0 onto S: from the reflection, ``least_norm(W, b, Z_r, y*)``. With the refined
end, g(Z_k) = (1 - k) g(Z_s) + k y* is exact along the path: only the s and t logits move, and they cross
at k = 0.5.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgvce_jax.errors import FgvceError
from fgvce_jax.sharding import device_mesh, pad_to, padded_length

DEFAULT_KS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


class MirrorPath(NamedTuple):
    """A batch of N queries' paths on a grid of K values of k.

    z: (N, K, H, W, D) feature maps Z_k; logits: (N, K, C) g(Z_k); loss: (N,) ||g(Z_end) - y*||^2 of the end.
    """

    z: jax.Array
    logits: jax.Array
    loss: jax.Array


@jax.jit
def mirror(W: jax.Array, b: jax.Array, s, t) -> tuple[jax.Array, jax.Array]:
    """The s/t decision hyperplane w_m . x + b_m = 0: W (D, C), b (C,) -> (w_m = W[:, t] - W[:, s] (D,), b_m ())."""
    return W[:, t] - W[:, s], b[t] - b[s]


@jax.jit
def head_logits(W: jax.Array, b: jax.Array, z: jax.Array) -> jax.Array:
    """g(Z) = mean_hw(Z) @ W + b: z (..., H, W, D) -> (..., C)."""
    return z.mean((-3, -2)) @ W + b


@jax.jit
def project(z: jax.Array, w_m: jax.Array, b_m: jax.Array) -> jax.Array:
    """Every position onto the mirror: p = x - (w_m . x + b_m) / ||w_m||^2 w_m; z (..., D) -> (..., D)."""
    return z - ((z @ w_m + b_m) / (w_m @ w_m))[..., None] * w_m


@jax.jit
def reflect(z: jax.Array, w_m: jax.Array, b_m: jax.Array) -> jax.Array:
    """Every position across the mirror: r = 2 p - x; z (..., D) -> (..., D)."""
    return 2 * project(z, w_m, b_m) - z


@jax.jit
def swapped(logits: jax.Array, s, t) -> jax.Array:
    """y*: logits (C,) with entries s and t exchanged."""
    return logits.at[s].set(logits[t]).at[t].set(logits[s])


@jax.jit
def least_norm(W: jax.Array, b: jax.Array, z0: jax.Array, target: jax.Array) -> jax.Array:
    """The point of S = {Z : g(Z) = target} nearest z0 (Frobenius): z0 + (target - g(z0)) @ pinv(W) at every
    position. z0 (..., H, W, D), target (..., C) -> (..., H, W, D); exact when W (D, C) has rank C."""
    delta = (target - head_logits(W, b, z0)) @ jnp.linalg.pinv(W)  # (..., D)
    return z0 + delta[..., None, None, :]


def _sq_error(W, b, z, target):
    """||g(Z) - target||^2 for one query: z (H, W, D), target (C,) -> ()."""
    r = head_logits(W, b, z) - target
    return r @ r


def lbfgs(W: jax.Array, b: jax.Array, z0: jax.Array, target: jax.Array, max_steps: int, tol: float):
    """Minimise ||g(Z) - target||^2 from z0 (H, W, D) with ``optax.lbfgs`` (zoom line search) in a
    ``lax.while_loop`` that stops after ``max_steps`` steps or once the loss is <= ``tol``.

    Returns (Z (H, W, D), loss ()). Traceable; vmap it over queries.
    """
    fn = lambda z: _sq_error(W, b, z, target)  # noqa: E731
    opt = optax.lbfgs(memory_size=10)
    value_and_grad = optax.value_and_grad_from_state(fn)

    def running(carry):
        _, _, step, loss = carry
        return (step < max_steps) & (loss > tol)

    def step(carry):
        z, state, i, _ = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=fn)
        z = optax.apply_updates(z, updates)
        return z, state, i + 1, fn(z)

    z, _, _, loss = jax.lax.while_loop(running, step, (z0, opt.init(z0), 0, fn(z0)))
    return z, loss


@functools.partial(jax.jit, static_argnames=("max_steps", "tol"))
def refine(W: jax.Array, b: jax.Array, z0: jax.Array, target: jax.Array, *, max_steps: int = 50,
           tol: float = 1e-12):
    """:func:`lbfgs` vmapped over a batch: z0 (N, H, W, D), target (N, C) -> (Z (N, H, W, D), loss (N,))."""
    return jax.vmap(lambda z, y: lbfgs(W, b, z, y, max_steps, tol))(z0, target)


@jax.jit
def path(z_s: jax.Array, z_end: jax.Array, ks: jax.Array) -> jax.Array:
    """Z_k = Z_s + k (Z_end - Z_s): z_s, z_end (..., H, W, D), ks (K,) -> (..., K, H, W, D)."""
    k = ks.reshape((-1, 1, 1, 1))
    return z_s[..., None, :, :, :] + k * (z_end - z_s)[..., None, :, :, :]


def _one_path(W, b, z_s, s, t, ks, refined: bool, max_steps: int, tol: float):
    """One query: z_s (H, W, D), s, t () -> (Z_k (K, H, W, D), g(Z_k) (K, C), loss ())."""
    w_m, b_m = mirror(W, b, s, t)
    z_end = reflect(z_s, w_m, b_m)
    target = swapped(head_logits(W, b, z_s), s, t)
    if refined:
        z_end, loss = lbfgs(W, b, z_end, target, max_steps, tol)
    else:
        loss = _sq_error(W, b, z_end, target)
    zk = path(z_s, z_end, ks)
    return zk, head_logits(W, b, zk), loss


@functools.partial(jax.jit, static_argnames=("refined", "max_steps", "tol"))
def path_batch(W: jax.Array, b: jax.Array, z_s: jax.Array, s: jax.Array, t: jax.Array, ks: jax.Array, *,
               refined: bool = True, max_steps: int = 50, tol: float = 1e-12) -> MirrorPath:
    """The whole path of a batch in one compiled call: W (D, C), b (C,), z_s (N, H, W, D), s, t (N,) int,
    ks (K,) -> :class:`MirrorPath`. The end is the reflection, refined by L-BFGS to y* when ``refined``."""
    out = jax.vmap(lambda z, si, ti: _one_path(W, b, z, si, ti, ks, refined, max_steps, tol))(z_s, s, t)
    return MirrorPath(*out)


def linear_head(split_model, params) -> tuple[jax.Array, jax.Array]:
    """(W (D, C), b (C,)) of a GAP + linear head; a one-line FgvceError for any other head."""
    head = split_model.linear_head(params)
    if head is None:
        raise FgvceError(f"Mirror-CFE needs a GAP + linear head (logits = mean_hw(Z) @ W + b); {split_model.arch} "
                         f"split at {split_model.at!r} is not one (ResNets: split at 'layer4')")
    return head


def check_classes(s, t, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """s, t as (N,) int32 arrays; a one-line FgvceError if a query has s == t or a class outside [0, C)."""
    s, t = np.asarray(s, np.int32).reshape(-1), np.asarray(t, np.int32).reshape(-1)
    if s.shape != t.shape:
        raise FgvceError(f"source and target classes must pair up, got {s.size} sources and {t.size} targets")
    same = np.flatnonzero(s == t)
    if same.size:
        raise FgvceError(f"query {same[0]}: source and target are both class {s[same[0]]}; the mirror between a "
                         "class and itself is undefined")
    bad = np.flatnonzero((np.minimum(s, t) < 0) | (np.maximum(s, t) >= num_classes))
    if bad.size:
        raise FgvceError(f"query {bad[0]}: classes {s[bad[0]]}, {t[bad[0]]} are outside 0..{num_classes - 1}")
    return s, t


def mirror_path(split_model, params, z_s, s, t, ks=DEFAULT_KS, *, refined: bool = True, mesh=None,
                max_steps: int = 50, tol: float = 1e-12) -> MirrorPath:
    """Checked entry point: the paths of N queries, the batch split over the 1-D device ``mesh``
    (:func:`fgvce_jax.sharding.device_mesh`). z_s (N, H, W, D) at the split, s, t (N,) -> :class:`MirrorPath`
    with K = len(ks). The batch is padded to the mesh by repeating its last query; the padding is dropped."""
    W, b = linear_head(split_model, params)
    s, t = check_classes(s, t, split_model.num_classes)
    n = len(s)
    if np.ndim(z_s) != 4 or len(z_s) != n or np.shape(z_s)[-1] != W.shape[0]:
        raise FgvceError(f"Mirror-CFE takes feature maps (N={n}, H, W, D={W.shape[0]}) for {n} queries, "
                         f"got {tuple(np.shape(z_s))}")
    mesh = device_mesh(mesh)
    rows, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    z_s, s, t = jax.device_put(pad_to((np.asarray(z_s), s, t), padded_length(n, mesh.size)), rows)
    W, b, ks = jax.device_put((W, b, jnp.asarray(ks, z_s.dtype)), rep)
    out = path_batch(W, b, z_s, s, t, ks, refined=refined, max_steps=max_steps, tol=tol)
    return jax.tree.map(lambda a: a[:n], out)
