"""FG-VCE and our ``cve`` against the reference PyTorch pair search of visual-counterfactuals.

The peer is the greedy search of Goyal et al. as implemented by Vandenhende et al.
(facebookresearch/visual-counterfactuals, ``counterfactuals/explainer/counterfactuals.py``):
every step scores each still-open (query cell, distractor cell) pair by running the
classification head on the edited map, and applies the best one. We import their module
from a local copy (``--reference-dir``; nothing of it is committed here) and drive
their own step functions (``_get_feature_representations_of_all_edits``,
``_find_single_best_edit``) with their loop, capped at ``--t-max`` edits (their
``compute_counterfactual`` has no cap). Their ``.cuda()`` calls are made no-ops
on a machine without CUDA.

The workload, the same for all three (``--head trained``, the default):

- one torchvision ResNet-50 with random weights whose BatchNorm statistics are re-estimated on the
  embedded train digits upsampled to each ``--sizes`` (``recalibrate_batchnorm``: the random layers get
  trained-like scales, so features vary across images), and whose 10-class fc is then fitted to the pooled
  features of those digits (``train_fc``: softmax regression, ``--epochs``); converted to ours. The split
  is ``layer4.0`` (224 px -> 7 x 7, 448 px -> 14 x 14 maps): the head is the two random ``layer4`` blocks,
  the pooling and the fitted fc;
- the queries are its first ``--queries`` misclassified test digits, the target is the true class, and the
  distractor is the first correctly classified train digit of that class. Every method gets exactly that
  one distractor (FG-VCE's references = [distractor]), lambda = 0, stop when the target is predicted.
  The feature maps come from the torch encoder and are fed to both sides (our encoder agrees, printed).

``--head calibrated`` is the earlier workload: 200 classes, random weights everywhere, the fc calibrated
on ``--pool`` random smooth images (``end_to_end.calibrate_fc``); its window games are degenerate (Phi
below 1e-13: with the rest of the map absent the calibrated head's probabilities saturate), so FG-VCE finds
no candidates there. It is kept to reproduce the older figures.

Reported per size: seconds per explanation (after a warm-up explanation; FG-VCE's
include query and reference Phi), validity (target reached within ``--t-max``),
mean edits, and whether our ``cve`` picks the same edits in the same order as theirs.

    python benchmarks/vs_pair_search.py --reference-dir /path/to/visual-counterfactuals
    python benchmarks/vs_pair_search.py --reference-dir DIR --sizes 224 448 --queries 3   # on a GPU

Without ``--reference-dir`` it tries ``git clone`` of the public repository into a temporary
directory and says how to point it at a local copy when that fails. Their search keeps every
open pair's edited map in memory at once (``(HW)^2 x D x HW`` floats: 0.9 GB at 7 x 7, 61 GB at
14 x 14); a size whose need exceeds the memory this machine has is skipped with a note.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import common
import end_to_end

REPOSITORY = "https://github.com/facebookresearch/visual-counterfactuals"
PEER_MODULE = Path("counterfactuals") / "explainer" / "counterfactuals.py"
CLASSES = 200


def peer_module(reference_dir: str | None):
    """Their ``counterfactuals.py`` as a module, from ``reference_dir`` or a fresh clone."""
    if reference_dir is None:
        reference_dir = Path(tempfile.mkdtemp(prefix="visual-counterfactuals-"))
        done = subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, str(reference_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"could not clone {REPOSITORY} ({done.stderr.strip().splitlines()[-1:]}); "
                             "clone it elsewhere and pass --reference-dir DIR")
    path = Path(reference_dir) / PEER_MODULE
    if not path.is_file():
        raise SystemExit(f"{path} not found: --reference-dir must be a visual-counterfactuals checkout")
    spec = importlib.util.spec_from_file_location("vc_counterfactuals", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models_at(size: int, pool: int, seed: int):
    """(torch model, our split model, params, torch features (P, D, h, w), predictions (P,))."""
    import jax.numpy as jnp
    import torch
    import torchvision

    import converters
    from fgvce_jax import models

    torch.manual_seed(seed)
    net = torchvision.models.resnet50(num_classes=CLASSES).eval()
    ours = converters.convert("resnet50", net.state_dict(), num_classes=CLASSES)
    images = end_to_end.smooth_images(pool, size, seed) / 255.0  # (P, S, S, 3) in [0, 1]
    x = torch.from_numpy(((images - 0.45) / 0.25).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                   net.layer4[0])
        feats = body(x)
        pooled = net.layer4[1:](feats).mean((2, 3)).numpy()
    end_to_end.calibrate_fc(ours, pooled)
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(np.asarray(ours.fc.kernel[...]).T))
        net.fc.bias.copy_(torch.from_numpy(np.asarray(ours.fc.bias[...])))
    split_model, params = models.split(ours, "layer4.0")
    z_ours, _ = split_model.encode(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    gap = float(np.abs(np.asarray(z_ours) - feats.numpy().transpose(0, 2, 3, 1)).max())
    head = torch.nn.Sequential(net.layer4[1:], net.avgpool, torch.nn.Flatten(1), net.fc).eval()
    with torch.no_grad():
        preds = head(feats).argmax(1).numpy()
    return head, split_model, params, feats, preds, gap


DIGITS = 10


def recalibrate_batchnorm(module, inputs, batch: int = 16) -> None:
    """Re-estimate every BatchNorm's running statistics of ``module`` on ``inputs`` (N, ...) (their plain average
    over batches of ``batch``), then leave it in eval mode: a random network's layers get the scales they would
    have after training, so its features vary across images instead of saturating."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    module.train()
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            module(inputs[i:i + batch])
    module.eval()


def train_fc(fc, pooled, labels, epochs: int, seed: int) -> None:
    """Fit the linear layer ``fc`` (torch) to pooled features (N, D) and labels (N,), in place: softmax
    regression on the standardised features (zero start, Adam lr 1e-2, batches of 64, weight decay 1e-3,
    ``epochs`` passes), then the standardisation folded into ``fc``'s weights and bias."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6
    x = (pooled - mean) / std
    lin = torch.nn.Linear(x.shape[1], fc.out_features)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    for epoch in range(epochs):
        order, total = torch.randperm(len(y), generator=g), 0.0
        for start in range(0, len(y), 64):
            idx = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch + 1 in (1, epochs):
            print(f"  fc epoch {epoch + 1}/{epochs}: loss {total / len(y):.3f}", flush=True)
    with torch.no_grad():  # lin((p - mean) / std) = p @ (W / std)^T + (b - (W / std) mean)
        w = lin.weight / std
        fc.weight.copy_(w)
        fc.bias.copy_(lin.bias - w @ mean)


def trained_models_at(size: int, args):
    """(torch head, our split model, params, torch features (P, D, h, w), predictions (P,), labels (P,), is_test
    (P,), encoder gap): the digits-trained head (see the module docstring); P = train + test digits."""
    import jax.numpy as jnp
    import torch
    import torchvision

    import converters
    from fgvce_jax import data, models

    torch.manual_seed(args.seed)
    net = torchvision.models.resnet50(num_classes=DIGITS).eval()
    sets = [data.load("digits", split, image_size=size) for split in ("train", "test")]
    keep = [np.arange(min(len(ds), n)) for ds, n in zip(sets, (args.train_images, args.test_images))]
    x = np.concatenate([ds.images(k) for ds, k in zip(sets, keep)])  # (P, S, S, 3), normalised
    labels = np.concatenate([ds.labels[k] for ds, k in zip(sets, keep)])
    is_test = np.arange(len(x)) >= len(keep[0])
    body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                               net.layer4[0])
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    train = torch.from_numpy(~is_test)
    recalibrate_batchnorm(body, xt[train])
    with torch.no_grad():
        feats = torch.cat([body(xt[i:i + 16]) for i in range(0, len(xt), 16)])
    head = torch.nn.Sequential(net.layer4[1:], net.avgpool, torch.nn.Flatten(1), net.fc)
    recalibrate_batchnorm(head, feats[train])
    with torch.no_grad():
        pooled = torch.cat([head[:-1](feats[i:i + 64]) for i in range(0, len(feats), 64)])
    train_fc(net.fc, pooled[train], labels[~is_test], args.epochs, args.seed)
    with torch.no_grad():
        preds = torch.cat([head(feats[i:i + 64]) for i in range(0, len(feats), 64)]).argmax(1).numpy()
    print(f"  trained head: train accuracy {np.mean(preds[~is_test] == labels[~is_test]):.3f}, test accuracy "
          f"{np.mean(preds[is_test] == labels[is_test]):.3f}", flush=True)
    ours = converters.convert("resnet50", net.state_dict(), num_classes=DIGITS)
    split_model, params = models.split(ours, "layer4.0")
    z_ours, _ = split_model.encode(params, jnp.asarray(x[:4]))
    gap = float(np.abs(np.asarray(z_ours) - feats[:4].numpy().transpose(0, 2, 3, 1)).max())
    return head, split_model, params, feats, preds, labels, is_test, gap


def mistakes(preds: np.ndarray, labels: np.ndarray, is_test: np.ndarray, n_queries: int) -> list[tuple[int, int, int]]:
    """(query, distractor, target) per query: a misclassified test image, the first correctly classified train
    image of its true class, and that class."""
    out = []
    for q in np.flatnonzero(is_test & (preds != labels)):
        ok = np.flatnonzero(~is_test & (preds == labels) & (labels == labels[q]))
        if ok.size:
            out.append((int(q), int(ok[0]), int(labels[q])))
        if len(out) == n_queries:
            break
    if len(out) < n_queries:
        raise SystemExit(f"only {len(out)} test mistakes with a correct train image of their class; "
                         "raise --test-images or lower --queries")
    return out


def problems(preds: np.ndarray, n_queries: int) -> list[tuple[int, int, int]]:
    """(query, distractor, target) per query: the first other image with another prediction."""
    out = []
    for q in range(len(preds)):
        others = np.flatnonzero(preds != preds[q])
        if others.size:
            out.append((q, int(others[0]), int(preds[others[0]])))
        if len(out) == n_queries:
            break
    if len(out) < n_queries:
        raise SystemExit("too few images with another prediction; raise --pool")
    return out


def their_search(vc, head, query, distractor, target: int, t_max: int):
    """(edits [(query cell, distractor cell)], reached target) by their step functions, capped at t_max."""
    import torch

    n_feat, n_pix = query.shape[0], query.shape[1]
    query_fl = query.reshape(n_feat, -1).t()
    distractor_fl = distractor[None].permute(0, 2, 3, 1).reshape(-1, n_feat)
    n = query_fl.shape[0]
    all_edits = [(i, j) for i in range(n) for j in range(distractor_fl.shape[0])]
    current, edits = query_fl.clone(), []

    def predicted():
        with torch.no_grad():
            return int(head(current.t().contiguous().view(1, n_feat, n_pix, n_pix)).argmax(1))

    while predicted() != target and len(edits) < t_max:
        combos = vc._get_feature_representations_of_all_edits(current, distractor_fl, all_edits)
        q_cell, d_cell = vc._find_single_best_edit(combos, all_edits, target, head, None, None, lambd=0.0,
                                                   dims=(n_feat, n_pix, n), temperature=1.0)
        edits.append((int(q_cell), int(d_cell)))
        current[q_cell].copy_(distractor_fl[d_cell])
        all_edits = [(i, j) for i, j in all_edits if i != q_cell and j != d_cell]
    return edits, predicted() == target


def our_search(split_model, params, z, preds, q, d, target, config):
    """(edits [(query cell, reference cell)], success) of our ``explain`` with the one distractor as reference."""
    import jax
    import jax.numpy as jnp

    from fgvce_jax.counterfactual import FeatureBatch, explain

    def batch(i, label):
        zi = jnp.asarray(z[i:i + 1])
        return FeatureBatch(zi, {}, np.array([label]), np.array([preds[i]]), zi.mean((1, 2)))

    ex = explain(split_model, params, batch(q, target), batch(d, target), config, key=jax.random.key(0))
    w = z.shape[2]
    k = int(ex.n_edits[0])
    cells = [(int(r * w + c), int(rr * w + cc)) for (r, c), (rr, cc) in zip(ex.query_region[0, :k],
                                                                            ex.ref_region[0, :k])]
    return cells, bool(ex.success[0])


def timed_each(run, items) -> tuple[list, list[float]]:
    """Results and seconds of ``run(item)`` for each item, after one untimed warm-up on the first."""
    run(items[0])
    outs, secs = [], []
    for item in items:
        t0 = time.perf_counter()
        outs.append(run(item))
        secs.append(time.perf_counter() - t0)
    return outs, secs


def measure(size: int, vc, args) -> dict:
    from fgvce_jax.counterfactual import CounterfactualConfig

    n_pix, dim = size // 32, 2048
    need = (n_pix ** 2) ** 2 * dim * n_pix ** 2 * 4
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        return {"size": size, "skipped": f"their search needs {need / 2**30:.0f} GiB at once; "
                                          f"this machine has {have / 2**30:.0f} GiB"}
    if args.head == "trained":
        head, split_model, params, feats, preds, labels, is_test, gap = trained_models_at(size, args)
        items = mistakes(preds, labels, is_test, args.queries)
    else:
        head, split_model, params, feats, preds, gap = models_at(size, args.pool, args.seed)
        items = problems(preds, args.queries)
    z = feats.numpy().transpose(0, 2, 3, 1)
    configs = {"fgvce": CounterfactualConfig(t_max=args.t_max, stop="target", screen_samples=None),
               "fgvce --screen 4": CounterfactualConfig(t_max=args.t_max, stop="target", screen_samples=4),
               "cve": CounterfactualConfig(method="cve", n_references=1, t_max=args.t_max, stop="target")}
    row = {"size": size, "grid": n_pix, "queries": len(items), "encoder_max_abs_diff": gap}
    theirs, t_theirs = timed_each(lambda it: their_search(vc, head, feats[it[0]], feats[it[1]], it[2], args.t_max),
                                  items)
    row["theirs"] = {"seconds_per_explanation": float(np.mean(t_theirs)),
                     "validity": float(np.mean([ok for _, ok in theirs])),
                     "edits": float(np.mean([len(e) for e, _ in theirs]))}
    for name, config in configs.items():
        out, secs = timed_each(lambda it: our_search(split_model, params, z, preds, *it, config), items)
        row[name] = {"seconds_per_explanation": float(np.mean(secs)), "validity": float(np.mean([ok for _, ok in out])),
                     "edits": float(np.mean([len(e) for e, _ in out])), "cells": [e for e, _ in out]}
        if name == "cve":
            row["cve"]["same_edits_as_theirs"] = all(o[0] == t[0] for o, t in zip(out, theirs))
            del row["cve"]["cells"]
    row["fgvce_time_over_theirs"] = row["fgvce"]["seconds_per_explanation"] / row["theirs"]["seconds_per_explanation"]
    row["fgvce_screened_time_over_theirs"] = (row["fgvce --screen 4"]["seconds_per_explanation"]
                                              / row["theirs"]["seconds_per_explanation"])
    row["screened_same_edits_as_full"] = row["fgvce --screen 4"].pop("cells") == row["fgvce"].pop("cells")
    row["cve_time_over_theirs"] = row["cve"]["seconds_per_explanation"] / row["theirs"]["seconds_per_explanation"]
    return row


def main(argv=None) -> None:
    p = common.parser(__doc__, "vs_pair_search")
    p.add_argument("--reference-dir", default=None, help="a local visual-counterfactuals checkout")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default 224; 224 448 on a GPU)")
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--pool", type=int, default=12, help="images drawn (queries and distractors come from them)")
    p.add_argument("--t-max", type=int, default=10, help="most edits per explanation, every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", choices=("trained", "calibrated"), default="trained",
                   help="the digits-trained head, or the earlier random head with a calibrated fc")
    p.add_argument("--epochs", type=int, default=100, help="passes of the fc's softmax regression")
    p.add_argument("--train-images", type=int, default=600, help="train digits the head learns from")
    p.add_argument("--test-images", type=int, default=300, help="test digits the queries come from")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.pool, args.t_max = [64], 1, 6, 1
        args.epochs, args.train_images, args.test_images = 5, 64, 64
    sizes = args.sizes or ([224, 448] if common.on_accelerator() else [224])
    import torch
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # their module moves tensors with .cuda()
    vc = peer_module(args.reference_dir)
    env = common.environment()
    print(common.describe(env), flush=True)
    rows = []
    for size in sizes:
        row = measure(size, vc, args)
        rows.append(row)
        if "skipped" in row:
            print(f"{size} px: skipped ({row['skipped']})", flush=True)
            continue
        print(f"{size} px ({row['grid']}x{row['grid']}): theirs {row['theirs']['seconds_per_explanation']:.2f} s, "
              f"cve {row['cve']['seconds_per_explanation']:.2f} s (same edits: {row['cve']['same_edits_as_theirs']}), "
              f"FG-VCE {row['fgvce']['seconds_per_explanation']:.2f} s, screened "
              f"{row['fgvce --screen 4']['seconds_per_explanation']:.2f} s per explanation; validity theirs "
              f"{row['theirs']['validity']:.2f} cve {row['cve']['validity']:.2f} "
              f"FG-VCE {row['fgvce']['validity']:.2f} screened {row['fgvce --screen 4']['validity']:.2f}", flush=True)
    summary = {}
    for row in rows:
        if "skipped" in row:
            summary[f"{row['size']} px"] = "skipped: " + row["skipped"]
            continue
        tag = f"{row['size']} px"
        for name in ("theirs", "cve", "fgvce", "fgvce --screen 4"):
            r = row[name]
            summary[f"{tag}: {name} s/explanation, validity, edits"] = (
                f"{r['seconds_per_explanation']:.3g}, {r['validity']:.2f}, {r['edits']:.1f}")
        summary[f"{tag}: FG-VCE time / theirs (goal <= 0.1)"] = row["fgvce_time_over_theirs"]
        summary[f"{tag}: FG-VCE --screen 4 time / theirs (goal <= 0.1)"] = row["fgvce_screened_time_over_theirs"]
        summary[f"{tag}: --screen 4 gives the unscreened edits"] = "yes" if row["screened_same_edits_as_full"] else "no"
        summary[f"{tag}: cve picks their edits"] = "yes" if row["cve"]["same_edits_as_theirs"] else "no"
    workload = ("torchvision ResNet-50 at layer4.0, random weights with BatchNorm statistics re-estimated on digits "
                "and the fc fitted to them (queries: test mistakes; distractor: a correct train digit of the true "
                "class)" if args.head == "trained"
                else "random-weight torchvision ResNet-50 at layer4.0, fc calibrated on the images")
    notes = [f"{workload}; one distractor per query for every method; lambda 0; stop at the target; times after one "
             "warm-up explanation",
             "FG-VCE seconds include the query's and the reference's Phi (defaults: k 3, M 32; screened: --screen 4, "
             "margin 3)"]
    if not common.on_accelerator():
        notes.append("CPU run: 448 px needs the memory of their all-pairs batch; run it on a GPU")
    doc = common.document("vs_pair_search", env, {k: v for k, v in vars(args).items() if k != "out"}, summary,
                          rows, notes)
    print(f"wrote {common.write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
