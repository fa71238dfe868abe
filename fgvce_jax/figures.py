"""The per-query figure of the HTML report (:mod:`fgvce_jax.report`) and the pixel maths behind it.

A feature-map cell (i, j) of an (H, W) map covers the image pixels
``[e_i, e_{i+1}) x [f_j, f_{j+1})`` with ``e_i = round(i * S / H)`` (S = image side), so the
cells tile the image exactly for any S and H.
"""
from __future__ import annotations

import numpy as np

from fgvce_jax.metrics import edited_cells

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
PHI_CMAP = "RdBu_r"  # diverging: red = evidence for the predicted class, blue = against, white = 0


def enlarge(a: np.ndarray, factor: int) -> np.ndarray:
    """An image (H, W, ...) or mask (H, W) enlarged ``factor`` times by nearest neighbour: (kH, kW, ...)."""
    return np.repeat(np.repeat(a, factor, 0), factor, 1)


def _cells(row: dict, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T', r*r, 2) query and reference cells and (T', r*r) bool of the ``n_edits`` edits of one result row
    (the pairing of :func:`fgvce_jax.metrics.edited_cells`; with ``edit_mask`` only the cells written)."""
    n = int(row["n_edits"])
    mask = row.get("edit_mask")
    qc, rc, valid = edited_cells(np.asarray(row["query_region"])[None], np.asarray(row["ref_region"])[None],
                                 np.asarray([n]), int(row["region_size"]), tuple(grid),
                                 None if mask is None else np.asarray(mask)[None])
    return qc[0, :n], rc[0, :n], valid[0, :n]


def region_boxes(row: dict, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell boxes of each edit of a result row: (T', 4) ``(row0, col0, row1, col1)`` inclusive, for the query
    and the reference side, and (T',) bool (the edit changed at least one cell)."""
    qc, rc, valid = _cells(row, grid)

    def box(cells, ok):
        if not ok.any():
            return np.zeros(4, int)
        c = cells[ok]
        return np.concatenate([c.min(0), c.max(0)])

    n = len(valid)
    return (np.array([box(qc[t], valid[t]) for t in range(n)], int).reshape(-1, 4),
            np.array([box(rc[t], valid[t]) for t in range(n)], int).reshape(-1, 4),
            valid.any(-1))


def cell_edges(cells: int, size: int) -> np.ndarray:
    """(cells + 1,) pixel edges of ``cells`` feature-map cells over ``size`` pixels: round(i * size / cells)."""
    return np.rint(np.arange(cells + 1) * size / cells).astype(int)


def _spread(lo: int, hi: int, n: int) -> np.ndarray:
    """``n`` pixel indices spread evenly over ``[lo, hi)`` (nearest neighbour, for cells of unequal size)."""
    return lo + np.arange(n) * (hi - lo) // n


def counterfactual_image(query_image: np.ndarray, reference_images: dict, row: dict, grid) -> np.ndarray:
    """uint8 (S, S, 3): the query with every edited cell's reference pixels pasted in, in edit order
    (a later edit of a cell overwrites an earlier one, as on the feature map).

    Args:
      query_image: uint8 (S, S, 3). reference_images: reference-split row -> uint8 (S, S, 3).
      row: a result row with ``n_edits``, ``region_size``, ``edit_ref_split_index`` and the arrays
        ``query_region``, ``ref_region`` (T, 2) (and optionally ``edit_mask`` (T, H, W)).
      grid: (H, W) of the feature map.
    """
    out = np.array(query_image, copy=True)
    ey, ex = cell_edges(grid[0], out.shape[0]), cell_edges(grid[1], out.shape[1])
    qc, rc, valid = _cells(row, grid)
    for t, ref in enumerate(row["edit_ref_split_index"]):
        src = reference_images[ref]
        for (qi, qj), (ri, rj) in zip(qc[t][valid[t]], rc[t][valid[t]]):
            rows = _spread(ey[ri], ey[ri + 1], ey[qi + 1] - ey[qi])
            cols = _spread(ex[rj], ex[rj + 1], ex[qj + 1] - ex[qj])
            out[ey[qi]:ey[qi + 1], ex[qj]:ex[qj + 1]] = src[np.ix_(rows, cols)]
    return out


def _outline(ax, box, grid, size, colour, label):
    """Draw cell box ``(r0, c0, r1, c1)`` of an (H, W) grid over a ``size``-pixel image."""
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    ey, ex = cell_edges(grid[0], size[0]), cell_edges(grid[1], size[1])
    r0, c0, r1, c1 = box
    ax.add_patch(Rectangle((ex[c0] - 0.5, ey[r0] - 0.5), ex[c1 + 1] - ex[c0], ey[r1 + 1] - ey[r0],
                           fill=False, edgecolor=colour, linewidth=2,
                           path_effects=[withStroke(linewidth=4, foreground="white")]))  # visible on any image
    ax.text(ex[c0] + 1, ey[r0] + 1, label, color="white", fontsize=9, va="top",
            bbox={"facecolor": colour, "pad": 1, "linewidth": 0})


def phi_norm(phi: np.ndarray):
    """The colour scale of a Phi map: ``Normalize(-m, m)``, m = max |Phi| (1 when all 0), so 0 is the
    middle (white) of :data:`PHI_CMAP`; None when the map has no finite value (``cve``)."""
    from matplotlib.colors import Normalize

    if not np.isfinite(phi).any():
        return None
    m = float(np.nanmax(np.abs(phi))) or 1.0
    return Normalize(-m, m)


def _phi_panel(fig, ax, query_image, phi, pred_name: str) -> None:
    """Phi over the query with a colour bar (see :func:`phi_norm`)."""
    from matplotlib.cm import ScalarMappable

    size = query_image.shape[:2]
    ax.imshow(query_image)
    norm = phi_norm(phi)
    if norm is None:
        ax.set_title("no Phi map for this method", fontsize=10)
        return
    ax.imshow(phi, cmap=PHI_CMAP, norm=norm, alpha=0.6, interpolation="nearest",
              extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5))
    fig.colorbar(ScalarMappable(norm, PHI_CMAP), ax=ax, shrink=0.85, label=f"Phi for {pred_name}")
    ax.set_title(f"Phi on predicted class\n(red: for {pred_name}, blue: against)", fontsize=10)


def query_figure(path, query_image, phi, row: dict, reference_images: dict) -> None:
    """Write the PNG of one query: the plain query, Phi over it, and the counterfactual composite
    (reference pixels pasted into each replaced region, outlined and numbered in edit order).

    Args:
      query_image: uint8 (S, S, 3); phi: (H, W) Phi on ŷ (NaN: the method has none).
      row: a result row (``query_id``, ``true_name``, ``pred_name``, ``n_edits``, ``edit_ref_split_index``, ...)
        with the arrays of :func:`counterfactual_image`.
      reference_images: reference-split row -> uint8 (S, S, 3).
    """
    from matplotlib.figure import Figure

    grid = phi.shape
    fig = Figure(figsize=(10.5, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(query_image)
    axes[0].set_title(f"query {row['query_id']}\ntrue {row['true_name']}, predicted {row['pred_name']}", fontsize=10)
    _phi_panel(fig, axes[1], query_image, phi, row["pred_name"])
    composite = counterfactual_image(query_image, reference_images, row, grid)
    axes[2].imshow(composite)
    q_boxes, _, ok = region_boxes(row, grid)
    for t in np.flatnonzero(ok):
        _outline(axes[2], q_boxes[t], grid, composite.shape[:2], _COLOURS[t % len(_COLOURS)], str(t + 1))
    n = int(row["n_edits"])
    axes[2].set_title(f"counterfactual: {n} region(s) replaced\nby reference pixels" if n else "no edit made",
                      fontsize=10)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.savefig(path, dpi=100)
