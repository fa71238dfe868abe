"""Saliency maps Phi (N, H, W) for a batch of feature maps, one compiled call per request.

Methods:
- ``local``: the saliency-partition Shapley estimate (SPEC 3), ``fgvce_jax.shapley.local`` per image.
- ``global``: permutation Shapley values over all H*W positions (default budget 2 HW * samples,
  the cost of ``local``).
- ``gradient``: gradient x activation summed over channels, ``sum_d z_hwd * d out_c / d z_hwd``.
- ``gradcam``: ``relu(sum_d alpha_d z_hwd)`` with ``alpha_d = mean_hw d out_c / d z_hwd`` (Selvaraju et al.).

Image i uses the key ``fold_in(key, i)`` (or ``keys[i]``, given one key per image), so ``compute(...)[i]``
equals the single-image estimator on image i's game with that key. Shapley work is split over the devices of a 1-D mesh and chunked by a memory budget;
neither changes the result.

``dtype="bfloat16"`` evaluates the head in bfloat16 (weights, feature maps and baseline rounded to it; the
output read and every Shapley sum stay float32), for the bf16 units of GPUs and TPUs. Its effect on Phi and
on the explanations is measured in ``benchmarks/bf16_head.py``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fgvce_jax import sharding
from fgvce_jax.errors import FgvceError
from fgvce_jax.keys import row_keys
from fgvce_jax.shapley.estimate import plan as plan_global
from fgvce_jax.shapley.estimate import run_batch as run_global
from fgvce_jax.shapley.game import feature_game, is_affine, read_output
from fgvce_jax.shapley.local import check_local
from fgvce_jax.shapley.local import plan as plan_local
from fgvce_jax.shapley.local import run_batch as run_local
from fgvce_jax.shapley.local_screening import check_screen, merge, saves, screen_key, select_windows
from fgvce_jax.shapley.local_tolerance import ToleranceResult, bucket_size, check_tolerance
from fgvce_jax.shapley.local_tolerance import run_batch as run_tolerance

METHODS = ("local", "global", "gradient", "gradcam")
HEAD_DTYPES = ("float32", "bfloat16")


def in_dtype(params, z, ctx, baseline, dtype: str):
    """(params, z, ctx, baseline) with every floating array cast to ``dtype`` (the head then runs in it)."""
    if dtype not in HEAD_DTYPES:
        raise FgvceError(f"head dtype must be one of {', '.join(HEAD_DTYPES)}; got {dtype!r}")
    if dtype == "float32":
        return params, z, ctx, baseline
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a  # noqa: E731
    return (jax.tree.map(cast, params), cast(z), jax.tree.map(cast, ctx),
            baseline if isinstance(baseline, str) else cast(jnp.asarray(baseline)))


_FNS: dict = {}  # (split_model, baseline kind, output, shapes) -> (game fn, bytes/evaluation, shared keys)

SHARED = ("params",)  # game arguments that are the same for every image: never given an image axis


def _baseline_kind(baseline) -> tuple[str, jax.Array | None]:
    """(static kind, array or None): strings are their own kind; arrays are passed to jit as ``array``."""
    return (baseline, None) if isinstance(baseline, str) else ("array", jnp.asarray(baseline))


@functools.partial(jax.jit, static_argnames=("split_model", "kind", "output"))
def _batch_args(split_model, params, z, ctx, classes, base, *, kind, output):
    """The games' per-image array arguments for N images (leading N axis, the shared ones left out),
    built in one compiled call."""
    baseline = base if kind == "array" else kind

    def one(zi, ci, cls):
        args = feature_game(split_model, params, zi, ci, cls, baseline=baseline, output=output).args
        return {k: v for k, v in args.items() if k not in SHARED}
    return jax.vmap(one)(z, ctx, classes)


def batch_games(split_model, params, z, ctx, classes, baseline, output):
    """(fn, per-image args with a leading N axis, shared args, bytes per evaluation): the games of N images
    (SPEC 2). Image i's game is ``fn(with_shared(shared, args[i]), masks)``; the model parameters are shared,
    so batched engines run each layer with one set of weights for all images."""
    kind, base = _baseline_kind(baseline)
    ctx0 = jax.tree.map(lambda a: a[0], ctx)
    shapes = (z.shape[1:], jax.tree.structure(ctx0), tuple(a.shape for a in jax.tree.leaves(ctx0)),
              None if base is None else base.shape)
    cache_key = (split_model, kind, output, shapes)
    if cache_key not in _FNS:  # the static game function depends only on the model, options and shapes
        shape = jax.eval_shape(lambda zi, ci, b: feature_game(split_model, params, zi, ci, 0,
                                                              baseline=b if kind == "array" else kind,
                                                              output=output), z[0], ctx0, base)
        _FNS[cache_key] = (shape.fn, shape.bytes_per_evaluation, tuple(k for k in SHARED if k in shape.args))
    fn, bytes_per_eval, shared_keys = _FNS[cache_key]
    shared = {"params": params} if shared_keys else None
    args = _batch_args(split_model, params, z, ctx, classes, base, kind=kind, output=output)
    return fn, args, shared, bytes_per_eval


def _input_gradients(split_model, params, z, ctx, cls, output):
    """d out_c / d z (H, W, D) for one image."""
    def value(zi):
        logits = split_model.head(params, zi[None], jax.tree.map(lambda a: a[None], ctx))
        return read_output(logits, cls, output)[0]
    return jax.grad(value)(z)


@functools.partial(jax.jit, static_argnames=("split_model", "method", "output", "mesh"))
def gradient_maps(split_model, params, z, ctx, classes, *, method, output, mesh):
    """Phi (N, H, W) by gradient x activation or Grad-CAM, images sharded over the mesh (N divisible by it)."""
    def one(zi, ci, cls):
        g = _input_gradients(split_model, params, zi, ci, cls, output)
        if method == "gradient":
            return (g * zi).sum(-1)
        return jax.nn.relu((g.mean(axis=(0, 1)) * zi).sum(-1))

    axis = mesh.axis_names[0]
    return jax.shard_map(lambda zz, cc, kk: jax.vmap(one)(zz, cc, kk), mesh=mesh,
                         in_specs=(P(axis), P(axis), P(axis)), out_specs=P(axis), check_vma=False)(z, ctx, classes)


def _keys(key, keys, n: int, method: str) -> jax.Array:
    """One key per image (N,) from ``key`` (row i: ``fold_in(key, i)``) or ``keys``; FgvceError without either."""
    if (key is None) == (keys is None):
        raise FgvceError(f"method {method!r} samples coalitions and needs a PRNG key (key) or one per image (keys)")
    if keys is None:
        return row_keys(key, n)
    if keys.shape != (n,):
        raise FgvceError(f"keys must hold one key per image ({n}), got shape {tuple(keys.shape)}")
    return keys


def _checked_batch(split_model, z, classes) -> tuple[jax.Array, jax.Array]:
    """(z (N, H, W, D), classes int32 (N,)); FgvceError for a wrong shape or a class outside the model's."""
    z = jnp.asarray(z)
    if z.ndim != 4 or z.shape[0] < 1:
        raise FgvceError(f"z must be a batch of feature maps (N, H, W, D), got shape {tuple(z.shape)}")
    n = z.shape[0]
    classes = jnp.asarray(classes, jnp.int32).reshape(-1)
    if classes.shape != (n,):
        raise FgvceError(f"classes must have one entry per feature map ({n}), got {classes.shape[0]}")
    num_classes = getattr(split_model, "num_classes", None)
    if num_classes is not None and not bool(((classes >= 0) & (classes < num_classes)).all()):
        raise FgvceError(f"classes must lie in 0..{num_classes - 1}")
    return z, classes


def compute(split_model, params, z, ctx, classes, *, method: str = "local", kernel: int = 3, samples: int = 32,
            key: jax.Array | None = None, keys: jax.Array | None = None, baseline="zero", output: str = "prob", outside: str = "absent",
            paired: bool = True, stratified: bool = False, budget: int | None = None, chunk_size: int | None = None,
            dtype: str = "float32", screen_samples: int | None = None, screen_keep: int | None = None,
            mesh=None) -> jax.Array:
    """Phi (N, H, W) float32 for feature maps z (N, H, W, D), contexts ctx (per-image, leading N) and classes (N,).

    See the module docstring for the methods; ``kernel``, ``samples``, ``outside``, ``paired`` and
    ``stratified`` are ``local``'s (SPEC 3), ``budget`` is ``global``'s (default 2 H W samples evaluations per image).
    ``baseline`` and ``output`` define the game (SPEC 2, ``fgvce_jax.shapley.feature_game``); ``dtype`` is the
    head's (module docstring). ``screen_samples`` M0 and ``screen_keep`` S screen ``local``
    (``fgvce_jax.shapley.local_screening``): a pass of M0 samples per window, then the full M samples at the S
    windows of largest Phi only (unscreened when that would not save evaluations); image i's first pass uses
    ``screen_key`` of its key. ``key`` gives image i ``fold_in(key, i)``; ``keys`` (N,) instead gives it
    ``keys[i]`` (one key per image, ``fgvce_jax.keys``). Sampling methods need one of them.
    """
    if method not in METHODS:
        raise FgvceError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    z, classes = _checked_batch(split_model, z, classes)
    params, z, ctx, baseline = in_dtype(params, z, ctx, baseline, dtype)
    n, h, w, _ = z.shape
    ctx = {} if ctx is None else ctx
    mesh = sharding.device_mesh(mesh)
    if method in ("gradient", "gradcam"):
        z, ctx, classes = sharding.pad_to((z, ctx, classes), sharding.padded_length(n, mesh.size))
        return gradient_maps(split_model, params, z, ctx, classes, method=method, output=output, mesh=mesh)[:n].astype(jnp.float32)
    keys = _keys(key, keys, n, method)
    fn, args, shared, bytes_per_eval = batch_games(split_model, params, z, ctx, classes, baseline, output)
    if method == "local":
        draws = check_local((h, w), kernel, samples, outside, paired)

        def run(keys, draws, windows=None):
            p = plan_local((h, w), kernel, draws, outside, paired, n, bytes_per_eval, chunk_size, mesh,
                           affine=is_affine(fn), stratified=stratified,
                           windows=None if windows is None else windows.shape[1])
            return run_local(fn, args, keys, p, mesh=mesh, shared=shared, windows=windows)
        if screen_samples is None:
            return run(keys, draws)
        check_screen(screen_samples, screen_keep, paired)
        if not saves(h * w, screen_keep, screen_samples, samples):
            return run(keys, draws)
        phi0 = run(jax.vmap(screen_key)(keys), screen_samples // 2 if paired else screen_samples)
        windows = select_windows(phi0, screen_keep)
        return merge(phi0, windows, run(keys, draws, windows))
    budget = 2 * h * w * samples if budget is None else budget
    p = plan_global("permutation", h * w, budget, bytes_per_eval, n, chunk_size, mesh)
    phi = run_global(p.est, fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks, mesh=mesh, r=p.r,
                     shared=shared)
    return phi.reshape(n, h, w)


def compute_to_tolerance(split_model, params, z, ctx, classes, *, kernel: int = 3, tolerance: float,
                         key: jax.Array | None = None, keys: jax.Array | None = None, max_samples: int = 256, round_samples: int = 8, baseline="zero",
                         output: str = "prob", outside: str = "absent", paired: bool = True,
                         dtype: str = "float32", mesh=None) -> ToleranceResult:
    """Local Phi (N, H, W) with each window sampled until its standard error is at most ``tolerance``
    (``fgvce_jax.shapley.local_tolerance``), and the samples each window used (N, H, W).

    Image i uses ``fold_in(key, i)`` or ``keys[i]``, as in :func:`compute`; images are split over the mesh (padded to it),
    which never changes a result. ``dtype`` is the head's (module docstring)."""
    z, classes = _checked_batch(split_model, z, classes)
    params, z, ctx, baseline = in_dtype(params, z, ctx, baseline, dtype)
    n, h, w, _ = z.shape
    keys = _keys(key, keys, n, "local")
    max_draws = check_local((h, w), kernel, max_samples, outside, paired)
    round_draws = check_local((h, w), kernel, round_samples, outside, paired)
    check_tolerance(tolerance, round_draws, max_draws)
    mesh = sharding.device_mesh(mesh)
    ctx = {} if ctx is None else ctx
    n_pad = sharding.padded_length(n, mesh.size)
    z, ctx, classes = sharding.pad_to((z, ctx, classes), n_pad)
    fn, args, shared, bytes_per_eval = batch_games(split_model, params, z, ctx, classes, baseline, output)
    bucket = bucket_size((h, w), round_draws, paired, bytes_per_eval)
    out = run_tolerance(fn, args, sharding.pad_to(keys, n_pad), tolerance, grid=(h, w), kernel=kernel, outside=outside,
                        paired=paired, round_draws=round_draws, max_draws=max_draws, bucket=bucket, mesh=mesh,
                        shared=shared)
    return ToleranceResult(out.phi[:n], out.samples[:n])
