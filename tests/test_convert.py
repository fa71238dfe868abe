"""``fgvce convert`` through the real CLI: round trip to torchvision's logits, and one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import converters
from fgvce_jax import cli, models


def torch_logits(tm, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return tm.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torch.manual_seed(0)
    tm = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(tm.state_dict(), path)
    return tm, path


def convert_cli(capsys, *args) -> tuple[int, str]:
    rc = cli.main(["convert", *map(str, args)])
    return rc, capsys.readouterr().err.strip()


def assert_one_line_error(rc: int, err: str, *words: str):
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_convert_save_load_gives_torchvision_logits(tmp_path, capsys, resnet18):
    tm, path = resnet18
    names = tmp_path / "classes.txt"
    names.write_text("ant\nbee\ncat\ndog\n")
    out = tmp_path / "ckpt"
    rc = cli.main(["convert", "--arch", "resnet18", "--weights", str(path), "--out", str(out),
                   "--class-names", str(names)])
    assert rc == 0 and "wrote resnet18" in capsys.readouterr().out
    model, info = models.load(out)
    assert (info.arch, info.num_classes, info.class_names) == ("resnet18", 4, ("ant", "bee", "cat", "dog"))
    assert (info.image_size, info.resize_size, info.default_split) == (224, 256, "layer4.0")
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), torch_logits(tm, x), atol=1e-4, rtol=0)
    # the same as converting in memory
    np.testing.assert_array_equal(model(x), converters.convert("resnet18", tm.state_dict())(x))


def test_wrong_arch_exits_nonzero_with_one_line(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), path)
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-m", "fgvce_jax.cli", "convert", "--arch", "resnet18",
                           "--weights", str(path), "--out", str(out)], capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "resnet50", "resnet18")
    assert not out.exists()


def test_truncated_file(tmp_path, capsys, resnet18):
    cut = tmp_path / "cut.pth"
    data = resnet18[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", cut, "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "cut.pth", "truncated")
    assert not (tmp_path / "o").exists() and sorted(os.listdir(tmp_path)) == ["cut.pth"]


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path, capsys, resnet18):
    sd = resnet18[0].state_dict()
    del sd["layer2.0.bn1.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", path, "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "1 missing (layer2.0.bn1.running_var)", "1 unexpected (extra.weight)")
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", resnet18[1], "--num-classes", 5,
                          "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "mis-shaped", "fc.weight (512, 4) != (512, 5)", "fc.bias (4,) != (5,)")
    assert not (tmp_path / "o").exists()


def test_other_bad_inputs(tmp_path, capsys, resnet18):
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", tmp_path / "nope.pth", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "not found")
    (tmp_path / "few.txt").write_text("a\nb\n")
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", resnet18[1], "--out", tmp_path / "o",
                          "--class-names", tmp_path / "few.txt")
    assert_one_line_error(rc, err, "2 class names", "4 classes")
    (tmp_path / "o").mkdir()
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", resnet18[1], "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "already exists")
    torch.save({"a": 1}, tmp_path / "notsd.pth")
    rc, err = convert_cli(capsys, "--arch", "resnet18", "--weights", tmp_path / "notsd.pth", "--out", tmp_path / "p")
    assert_one_line_error(rc, err, "state_dict")


def test_guess_arch_names_every_torchvision_layout():
    for arch in ("resnet18", "resnet50", "vgg16_bn"):
        sd = getattr(torchvision.models, arch)(num_classes=2).state_dict()
        assert converters.torchvision.guess_arch({k: v.numpy() for k, v in sd.items()}) == arch


@pytest.mark.slow
def test_vit_round_trip_keeps_image_size(tmp_path, capsys):
    tm = torchvision.models.vit_b_32(num_classes=3, image_size=64).eval()
    path = tmp_path / "vit.pth"
    torch.save(tm.state_dict(), path)
    assert cli.main(["convert", "--arch", "vit_b_32", "--weights", str(path), "--out", str(tmp_path / "c")]) == 0
    model, info = models.load(tmp_path / "c")
    assert info.image_size == 64 and info.default_split == "block11"
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), torch_logits(tm, x), atol=1e-4, rtol=0)


WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):  # the default install: torch and torchvision are absent
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from fgvce_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_convert_without_torch_says_how_to_install_it(resnet18, tmp_path):
    _, path = resnet18
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "convert", "--arch", "resnet18", "--weights",
                           str(path), "--out", str(tmp_path / "m")], capture_output=True, text=True)
    lines = [ln for ln in done.stderr.splitlines() if "Warning" not in ln and ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "fgvce-jax[convert]" in lines[0] and not (tmp_path / "m").exists()
