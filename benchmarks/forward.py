"""Forward throughput (images/s) of ``logits``: jitted JAX port vs the same torchvision model, in one run.

    python benchmarks/forward.py [--archs resnet50 vit_b_16] [--batch 32] [--size 224] [--reps 3]

Both models hold the same (random) weights; the JAX model is converted from
the torchvision one, and their outputs are compared as a sanity check. Each
framework gets one warm-up call (which includes jit compilation), then
``--reps`` timed calls; the median is reported. Writes benchmarks/results/forward.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import flax
import jax
import numpy as np
import torch
import torchvision

import common
import converters

RESULT = Path(__file__).resolve().parent / "results" / "forward.json"


def timed(fn, reps: int) -> tuple[float, list[float]]:
    """Warm up once, then time ``reps`` calls; returns (warm-up seconds, per-call seconds)."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return warm, times


def bench_arch(arch: str, batch: int, size: int, reps: int) -> dict:
    tm = getattr(torchvision.models, arch)(num_classes=1000).eval()
    head = [m for m in tm.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=head.in_features**-0.5)  # torchvision zero-inits ViT's head
    model = converters.convert(arch, tm.state_dict())
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    xj = jax.device_put(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    logits = jax.jit(lambda images: model(images))
    jax_warm, jax_times = timed(lambda: logits(xj).block_until_ready(), reps)

    def torch_call():
        with torch.inference_mode():
            return tm(xt)

    torch_warm, torch_times = timed(torch_call, reps)
    diff = float(np.abs(np.asarray(logits(xj)) - torch_call().numpy()).max())
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    row = {
        "arch": arch, "batch": batch, "image_size": size, "reps": reps,
        "jax_images_per_s": batch / jax_s, "torch_images_per_s": batch / torch_s,
        "jax_over_torch": torch_s / jax_s,
        "jax_seconds": jax_times, "torch_seconds": torch_times,
        "jax_warmup_seconds_incl_compile": jax_warm, "torch_warmup_seconds": torch_warm,
        "max_abs_logit_diff": diff,
    }
    print(f"{arch:10s} batch {batch} @ {size}px: JAX {row['jax_images_per_s']:7.1f} img/s, "
          f"torch {row['torch_images_per_s']:7.1f} img/s, JAX/torch {row['jax_over_torch']:.2f}x "
          f"(JAX warm-up incl. compile {jax_warm:.1f}s; max |logit diff| {diff:.1e})", flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "vit_b_16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)
    env = {
        "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "flax": flax.__version__,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "platform": platform.platform(),
    }
    print("devices:", env["jax_devices"], "| jax", env["jax"], "flax", env["flax"], "torch", env["torch"],
          "torchvision", env["torchvision"], "| torch threads", env["torch_threads"], flush=True)
    result = {"benchmark": "forward", "measured": "images/s of logits (median of timed calls after warm-up)",
              "env": env, "results": [bench_arch(a, args.batch, args.size, args.reps) for a in args.archs]}
    out = common.write_json(args.out, result)
    print("wrote", out)
    return result


if __name__ == "__main__":
    main()
