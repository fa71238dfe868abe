"""Training: schedule, batches, weight transfer, a short run, resume after interruption, CLI errors."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fgvce_jax import cli, data, models
from fgvce_jax.errors import FgvceError
from fgvce_jax.models import checkpoint
from fgvce_jax.train import (STATE_DIR, TrainConfig, epoch_batches, json_meta, learning_rate, train,
                             transfer_weights)


@pytest.fixture(scope="module")
def digits_small():
    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    return train_set.subset(np.arange(96)), test_set.subset(np.arange(40))


def _leaves(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


def test_learning_rate_warmup_then_cosine_or_constant():
    cfg = TrainConfig(lr=0.2, warmup_epochs=1.0)
    cos = learning_rate(cfg, total_steps=50, steps_per_epoch=10)
    const = learning_rate(TrainConfig(lr=0.2, warmup_epochs=1.0, schedule="constant"), 50, 10)
    for s in (0, 3, 10):
        assert math.isclose(float(cos(s)), 0.2 * s / 10, abs_tol=1e-7)
        assert math.isclose(float(const(s)), 0.2 * s / 10, abs_tol=1e-7)
    for s in (10, 25, 37, 50):
        assert math.isclose(float(cos(s)), 0.1 * (1 + math.cos(math.pi * (s - 10) / 40)), abs_tol=1e-6)
        assert math.isclose(float(const(s)), 0.2, abs_tol=1e-7)


def test_epoch_batches_are_seeded_permutations_dropping_the_remainder():
    b = epoch_batches(23, 5, seed=3, epoch=1)
    assert b.shape == (4, 5) and len(set(b.ravel())) == 20 and b.max() < 23
    assert np.array_equal(b, epoch_batches(23, 5, seed=3, epoch=1))
    assert not np.array_equal(b, epoch_batches(23, 5, seed=3, epoch=2))


def test_transfer_weights_replaces_only_a_classifier_of_other_width():
    source = models.create("resnet_tiny", 5, seed=1)
    target = models.create("resnet_tiny", 10, seed=2)
    before = nnx.to_flat_state(nnx.state(target))
    fresh = transfer_weights(source, target)
    assert sorted(fresh) == ["fc/bias", "fc/kernel"]
    src = dict(nnx.to_flat_state(nnx.state(source)))
    for path, var in nnx.to_flat_state(nnx.state(target)):
        if path[0] == "fc":
            assert var[...].shape[-1] == 10
            assert np.array_equal(var[...], dict(before)[path][...])
        else:
            assert np.array_equal(var[...], src[path][...]), path


def test_init_from_checkpoint_and_arch_mismatch(tmp_path, digits_small):
    src = models.create("resnet_tiny", 4, seed=7)
    ckpt = checkpoint.save(tmp_path / "init", src, checkpoint.ModelInfo.for_model(src, list("abcd")))
    from fgvce_jax.train import build_model

    model = build_model(TrainConfig(init=str(ckpt), seed=0), num_classes=10, image_size=32)
    np.testing.assert_array_equal(model.conv1.kernel[...], src.conv1.kernel[...])
    assert model.fc.kernel.shape[-1] == 10
    with pytest.raises(FgvceError, match="resnet_tiny checkpoint, but --arch is resnet18"):
        build_model(TrainConfig(arch="resnet18", init=str(ckpt)), 10, 32)


def _train_mode_cross_entropy(model, dataset):
    """Mean cross-entropy with batch statistics (what training minimises), on a copy of ``model``."""
    model = nnx.clone(model)
    model.train()
    logits = model(jnp.asarray(dataset.images(np.arange(len(dataset)))))
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(dataset.labels)).mean())


def test_short_run_lowers_the_loss_and_writes_a_loadable_model(tmp_path, digits_small):
    train_set, test_set = digits_small
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    start = _train_mode_cross_entropy(models.create("resnet_tiny", 10, seed=cfg.seed), train_set)
    model, info, history = train(cfg, tmp_path / "run", train_set=train_set, test_set=test_set)
    assert [h["epoch"] for h in history] == [1, 2]
    assert _train_mode_cross_entropy(model, train_set) < start - 0.3
    loaded, linfo = models.load(tmp_path / "run")
    assert linfo == info and linfo.class_names == tuple(str(c) for c in range(10))
    assert (linfo.image_size, linfo.resize_size, linfo.mean) == (32, 32, train_set.preprocessing.mean)
    x = jnp.asarray(test_set.images(np.arange(8)))
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # the reported test accuracy is that of the saved model
    acc = float(np.mean(np.argmax(loaded(jnp.asarray(test_set.images(np.arange(40)))), -1) == test_set.labels))
    assert math.isclose(history[-1]["test_accuracy"], acc)
    assert (tmp_path / "run" / STATE_DIR).is_dir() and not list((tmp_path).glob("run/.model-*"))


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, digits_small, capsys):
    train_set, test_set = digits_small
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, save_every=2)  # 3 steps per epoch, 6 in all

    straight, _, hist_a = train(cfg, tmp_path / "a", train_set=train_set, test_set=test_set)

    def stop_at_5(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", train_set=train_set, test_set=test_set, on_step=stop_at_5)
    assert not (tmp_path / "b" / "info.json").exists()  # no final model from an interrupted run
    capsys.readouterr()
    resumed, _, hist_b = train(cfg, tmp_path / "b", train_set=train_set, test_set=test_set)
    assert "resuming from step 4/6" in capsys.readouterr().err
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert hist_a == hist_b
    # a finished run re-run is a no-op; a different configuration is refused
    again, _, hist_c = train(cfg, tmp_path / "b", train_set=train_set, test_set=test_set)
    assert hist_c == hist_a
    with pytest.raises(FgvceError, match=r"different configuration \(--lr: 0.05 -> 0.1\); use another --out$"):
        train(TrainConfig(epochs=2, batch_size=32, lr=0.1), tmp_path / "b", train_set=train_set, test_set=test_set)
    with pytest.raises(FgvceError, match=r"\(--epochs: 2 -> 3\)"):  # more epochs is a different run too, named
        train(dataclasses.replace(cfg, epochs=3), tmp_path / "b", train_set=train_set, test_set=test_set)


def test_checkpoint_meta_is_the_state_at_save_not_at_write(tmp_path):
    """Orbax writes a checkpoint's JSON in a background thread; the lists training keeps appending to must be
    stored as they were when ``save`` was called (a live reference stored later steps' losses: CI, stop 23).
    With a bare ``ocp.args.JsonSave`` this test fails."""
    import orbax.checkpoint as ocp
    history = [{"loss": 1.0}]
    manager = ocp.CheckpointManager(tmp_path.absolute() / "m", options=ocp.CheckpointManagerOptions(create=True))
    for step in range(1, 4):
        manager.save(step, args=ocp.args.Composite(meta=json_meta({"history": history})), force=True)
        history.extend({"loss": float(i)} for i in range(200))  # the run goes on while the write is pending
    manager.wait_until_finished()
    stored = [manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["history"]
              for s in (1, 2, 3)]
    manager.close()
    assert [len(h) for h in stored] == [1, 201, 401]


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--arch", "resnet9"], "unknown arch 'resnet9'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--init", "/nonexistent/ckpt"], "not a model checkpoint"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    assert cli.main(["train", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_trains_a_folder_dataset(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("dark", "light")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(200 * c, 56 + 200 * c, (40, 36, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{k}.png")
    out = tmp_path / "model"
    assert cli.main(["train", "--dataset", f"folder:{tmp_path / 'imgs'}", "--image-size", "32", "--epochs", "1",
                     "--batch-size", "5", "--out", str(out)]) == 0
    assert f"model written to {out}" in capsys.readouterr().out
    model, info = models.load(out)
    assert info.class_names == ("dark", "light") and (info.image_size, info.resize_size) == (32, 37)
    assert info.mean == data.Preprocessing.imagenet(32).mean and model.fc.kernel.shape[-1] == 2


@pytest.mark.slow
def test_digits_resnet_tiny_default_run_is_accurate_but_not_perfect(tmp_path):
    _, _, history = train(TrainConfig(), tmp_path / "digits")
    assert 0.9 < history[-1]["test_accuracy"] < 1.0
