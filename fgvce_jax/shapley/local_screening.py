"""Screened local Shapley values: the full estimate only where a region can come from.

FG-VCE reads a saliency map only through its top regions (SPEC 4): K regions of a query, the top
``candidates_per_reference`` of a reference. With r x r regions chosen by non-maximum suppression, a
map's top K regions are grown from its K largest cells, so only the cells near the top of the map
need an accurate Phi. Screening spends the samples there:

1. a cheap pass: the local estimate with M0 samples per window (keys from ``screen_key(key)``, so
   its draws are independent of the full pass), Phi0 (H, W);
2. the S = ``keep`` windows of largest Phi0 (ties to the lower flat index; sorted by position);
3. the full estimate (M samples) at those S windows only, with the keys the full map would use,
   so each value equals the unscreened Phi at that window;
4. Phi = Phi0 with the S screened windows overwritten by their full values.

Cost per map: 2 HW M0 + 2 S M evaluations, against 2 HW M unscreened; :func:`saves` says when that is
less (otherwise the map is computed unscreened). The result differs from the unscreened map only at the
HW - S windows left at Phi0, and the regions differ only if one of those outranks a screened cell:
``benchmarks/screening.py`` measures how often the regions and the explanations change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fgvce_jax.errors import FgvceError

SCREEN_STREAM = 0x5C2EE4  # fold_in(key, SCREEN_STREAM) keys the cheap pass


def screen_key(key: jax.Array) -> jax.Array:
    """The cheap pass's key: independent of ``key``'s own draws."""
    return jax.random.fold_in(key, SCREEN_STREAM)


def check_screen(screen_samples: int, keep: int, paired: bool) -> None:
    """FgvceError unless screen_samples >= 1 (even when paired) and keep >= 1 (a first pass of at least the
    full samples is allowed: it saves nothing, so the map is computed unscreened)."""
    if not isinstance(screen_samples, int) or isinstance(screen_samples, bool) or screen_samples < 1 \
            or (paired and screen_samples % 2):
        raise FgvceError(f"screening samples must be {'an even' if paired else 'a positive'} integer "
                         f"(at least {2 if paired else 1}); got {screen_samples!r}")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise FgvceError(f"screened windows per map must be a positive integer; got {keep!r}")


def saves(n_windows: int, keep: int, screen_samples: int, samples: int) -> bool:
    """Whether screening costs fewer evaluations: HW M0 + S M < HW M."""
    return keep < n_windows and n_windows * screen_samples + keep * samples < n_windows * samples


def select_windows(phi0: jax.Array, keep: int) -> jax.Array:
    """int32 (N, keep): each map's ``keep`` windows of largest Phi0 (N, H, W), sorted by flat position.
    ``lax.top_k`` breaks ties toward the lower index, so the choice is deterministic."""
    flat = phi0.reshape(phi0.shape[0], -1)
    return jnp.sort(jax.lax.top_k(flat, keep)[1], axis=1).astype(jnp.int32)


def merge(phi0: jax.Array, windows: jax.Array, values: jax.Array) -> jax.Array:
    """Phi (N, H, W): Phi0 with ``values`` (N, S) written at the flat ``windows`` (N, S)."""
    n = phi0.shape[0]
    flat = phi0.reshape(n, -1).at[jnp.arange(n)[:, None], windows].set(values)
    return flat.reshape(phi0.shape)
