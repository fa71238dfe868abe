"""The global causal graph over [c_free, u, y_hat] and its linear structural model (docs/glance.md; ours).

Discovery is causal-learn's PC with the Fisher-z test (or GES with the BIC score) on the columns of X (N, P),
each standardised. Tiered background knowledge puts every node in tier 0 and the prediction y_hat in tier
1, so no edge leaves y_hat: an edge between y_hat and a node the test keeps is oriented into y_hat.

The structural model: each node j with directed parents pa(j) is fitted by least squares on the
standardised columns, x_j = sum_{p in pa(j)} w_pj x_p + e_j; ``weights[p, j] = w_pj`` (P, P), zero
elsewhere, and ``noise[j]`` = std(e_j) = sqrt(1 - R^2_j) (1 for a node without directed parents), the part
of x_j its parents do not explain. Undirected edges (left by PC when the data cannot orient them) get no
weight.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fgvce_jax.errors import FgvceError

METHODS = ("pc", "ges")


@dataclasses.dataclass(frozen=True)
class Graph:
    """Nodes (P names), directed edges (parent, child) and undirected pairs, by node index; ``weights`` (P, P)
    the structural model's coefficients on standardised columns (weights[p, j] for p -> j); ``noise`` (P,)
    the standard deviation of each node's noise term e_j on the standardised scale."""

    nodes: tuple[str, ...]
    directed: tuple[tuple[int, int], ...]
    undirected: tuple[tuple[int, int], ...]
    weights: np.ndarray
    noise: np.ndarray

    def has_edge(self, parent: str, child: str) -> bool:
        """Whether ``parent -> child`` is a directed edge."""
        return (self.nodes.index(parent), self.nodes.index(child)) in self.directed

    def parents(self, j: int) -> list[int]:
        """Indices of the directed parents of node ``j``, ascending."""
        return sorted(p for p, c in self.directed if c == j)

    def to_json(self) -> dict:
        """{"nodes": [...], "noise": [...], "directed": [{"from", "to", "weight"}], "undirected": [{"a", "b"}]}
        by name (``noise`` in the order of ``nodes``)."""
        n = self.nodes
        return {"nodes": list(n), "noise": [float(v) for v in self.noise],
                "directed": [{"from": n[p], "to": n[c], "weight": float(self.weights[p, c])} for p, c in self.directed],
                "undirected": [{"a": n[a], "b": n[b]} for a, b in self.undirected]}


def read_graph(path: str | Path) -> Graph:
    """The :class:`Graph` of a JSON file written by :func:`write_graph` (``path`` with or without .json)."""
    path = Path(path).expanduser().absolute().with_suffix(".json")
    if not path.is_file():
        raise FgvceError(f"no causal graph at {path}; run fgvce train-surrogate first")
    data = json.loads(path.read_text())
    if "noise" not in data:
        raise FgvceError(f"the causal graph at {path} was written by an older version (no noise terms); "
                         "run fgvce train-surrogate again into a new --out")
    nodes = tuple(data["nodes"])
    weights = np.zeros((len(nodes), len(nodes)))
    directed = []
    for e in data["directed"]:
        p, c = nodes.index(e["from"]), nodes.index(e["to"])
        directed.append((p, c))
        weights[p, c] = e["weight"]
    undirected = [tuple(sorted((nodes.index(e["a"]), nodes.index(e["b"])))) for e in data["undirected"]]
    return Graph(nodes, tuple(sorted(directed)), tuple(sorted(undirected)), weights, np.asarray(data["noise"], float))


def log_odds(logits: np.ndarray, classes) -> np.ndarray:
    """(N,) y_hat = log sum_{k in S} p_k - log sum_{k not in S} p_k, p = softmax(logits (N, C)), S = ``classes``:
    the prediction node, a continuous score (the log-odds that the classifier says one of S)."""
    logits = np.asarray(logits, np.float64)
    inside = np.zeros(logits.shape[1], bool)
    inside[list(classes)] = True
    if inside.all() or not inside.any():
        raise FgvceError(f"the classes of the prediction node must be a proper subset of 0..{len(inside) - 1}")
    lse = lambda a: np.logaddexp.reduce(a, axis=1)  # noqa: E731
    return lse(logits[:, inside]) - lse(logits[:, ~inside])


def _standardised(x: np.ndarray) -> np.ndarray:
    std = x.std(0)
    if np.any(std == 0):
        raise FgvceError(f"causal discovery needs varying columns; column {int(np.argmin(std))} is constant")
    return (x - x.mean(0)) / std


def _edges(matrix: np.ndarray) -> tuple[list, list]:
    """causal-learn's endpoint matrix G (P, P) -> (directed (i, j) for i -> j, undirected (i, j), i < j).
    G[j, i] = 1 and G[i, j] = -1 mean i -> j; both -1 mean i - j."""
    directed, undirected = [], []
    for i, j in zip(*np.nonzero(np.triu(matrix != 0, 1))):
        a, b = matrix[i, j], matrix[j, i]
        if a == -1 and b == 1:
            directed.append((int(i), int(j)))
        elif a == 1 and b == -1:
            directed.append((int(j), int(i)))
        else:
            undirected.append((int(i), int(j)))
    return sorted(directed), sorted(undirected)


def discover(x: np.ndarray, nodes: tuple[str, ...], sink: str, *, method: str = "pc",
             alpha: float = 0.01) -> tuple[list, list]:
    """(directed, undirected) edges among the columns of x (N, P) named ``nodes``; ``sink`` has no out-edges.

    PC: Fisher-z conditional independence tests at level ``alpha``, stable skeleton, background knowledge
    applied before the orientation rules. GES: BIC score, then edges out of ``sink`` reversed (GES takes no
    background knowledge; reversing keeps the sink's adjacencies).
    """
    from causallearn.graph.GraphNode import GraphNode
    from causallearn.utils.PCUtils.BackgroundKnowledge import BackgroundKnowledge

    if method not in METHODS:
        raise FgvceError(f"unknown causal discovery method {method!r}; choose one of {', '.join(METHODS)}")
    if sink not in nodes:
        raise FgvceError(f"the sink {sink!r} is not one of the nodes {', '.join(nodes)}")
    x = _standardised(np.asarray(x, np.float64))
    if method == "pc":
        from causallearn.search.ConstraintBased.PC import pc
        knowledge = BackgroundKnowledge()
        for name in nodes:
            knowledge.add_node_to_tier(GraphNode(name), int(name == sink))
        graph = pc(x, alpha, "fisherz", stable=True, background_knowledge=knowledge, node_names=list(nodes),
                   show_progress=False).G.graph
    else:
        from causallearn.search.ScoreBased.GES import ges
        graph = ges(x, score_func="local_score_BIC", node_names=list(nodes))["G"].graph
    directed, undirected = _edges(graph)
    s = nodes.index(sink)
    directed = [(c, p) if p == s else (p, c) for p, c in directed]  # GES may point out of the sink
    directed += [(a + b - s, s) for a, b in undirected if s in (a, b)]  # an unoriented edge at the sink enters it
    return sorted(set(directed)), [e for e in undirected if s not in e]


def fit_linear_sem(x: np.ndarray, nodes: tuple[str, ...], directed, undirected) -> Graph:
    """The :class:`Graph` with each node's least-squares weights on its directed parents and the standard
    deviation of its residual (standardised x)."""
    x = _standardised(np.asarray(x, np.float64))
    weights, noise = np.zeros((len(nodes), len(nodes))), np.ones(len(nodes))
    graph = Graph(tuple(nodes), tuple(sorted(directed)), tuple(sorted(undirected)), weights, noise)
    for j in range(len(nodes)):
        pa = graph.parents(j)
        if pa:
            weights[pa, j] = np.linalg.lstsq(x[:, pa], x[:, j], rcond=None)[0]
            noise[j] = np.std(x[:, j] - x[:, pa] @ weights[pa, j])
    return graph


def causal_graph(x: np.ndarray, nodes: tuple[str, ...], sink: str, *, method: str = "pc",
                 alpha: float = 0.01) -> Graph:
    """Discover the graph (:func:`discover`) and fit its linear structural model (:func:`fit_linear_sem`)."""
    directed, undirected = discover(x, nodes, sink, method=method, alpha=alpha)
    return fit_linear_sem(x, nodes, directed, undirected)


def _sink(graph: Graph) -> int:
    """The node with the most in-edges and no out-edge or undirected edge (the prediction), else the last."""
    busy = {p for p, _ in graph.directed} | {k for e in graph.undirected for k in e}
    ins = [sum(c == k for _, c in graph.directed) if k not in busy else -1 for k in range(len(graph.nodes))]
    return int(np.argmax(ins)) if max(ins) > 0 else len(graph.nodes) - 1


def write_graph(graph: Graph, path: str | Path) -> tuple[Path, Path]:
    """Write ``path``.json (:meth:`Graph.to_json`) and ``path``.png (the sink, a node with in-edges only, in
    the centre and the other nodes on a circle; edges between ring nodes bowed; each weight written 40% of
    the way along its arrow); returns both absolute paths."""
    from matplotlib.figure import Figure

    base = Path(path).expanduser().absolute()
    base.parent.mkdir(parents=True, exist_ok=True)
    js, png = base.with_suffix(".json"), base.with_suffix(".png")
    js.write_text(json.dumps(graph.to_json(), indent=1))
    sink = _sink(graph)
    ring = [k for k in range(len(graph.nodes)) if k != sink]
    angle = np.pi / 2 - 2 * np.pi * np.arange(len(ring)) / len(ring)
    xy = np.zeros((len(graph.nodes), 2))
    xy[ring] = np.stack([np.cos(angle), np.sin(angle)], 1)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    for (a, b), arrow in [(e, True) for e in graph.directed] + [(e, False) for e in graph.undirected]:
        start, end = xy[a] * 0.9 + xy[b] * 0.1, xy[b] * 0.9 + xy[a] * 0.1
        rad = 0.0 if sink in (a, b) else 0.25  # edges on the ring bow away from the centre
        ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>" if arrow else "-", "color": "0.3",
                                                          "connectionstyle": f"arc3,rad={rad}"})
        if arrow:  # the curve's point at 40% of the way (a quadratic Bezier with matplotlib's arc3 control point)
            d = end - start
            control = (start + end) / 2 + rad * np.array([d[1], -d[0]])
            at = 0.36 * start + 0.48 * control + 0.16 * end
            ax.text(*at, f"{graph.weights[a, b]:+.2f}", fontsize=8, ha="center", va="center",
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})
    for k, name in enumerate(graph.nodes):
        ax.text(*xy[k], name, ha="center", va="center", fontsize=10, bbox={"fc": "#dde8f5", "ec": "0.4"})
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.set_axis_off()
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return js, png
