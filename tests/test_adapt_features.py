"""Feature-level adaptation (MCC, CDAN+E, SHOT), label-free validators and `tftransfer adapt`'s new methods.

Toy two-domain feature sets with a known shift check that each method's loss moves the head the right way; a tiny
fitted run checks the job end to end, that target labels never reach training, and the source-free path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import COLOURS, make_colour_folder, write_solid_images
from sklearn.linear_model import LogisticRegression

from tftransfer.cli import main
from tftransfer.config.experiment import ADAPT_JOB_METHODS, VALIDATOR_NAMES, load_config
from tftransfer.evaluation.validators import VALIDATORS, Candidate, choose, entropy_score, is_collapsed, snd_score
from tftransfer.jobs import adapt as adapt_job
from tftransfer.training.adaptation.feature_head import (
    FeatureRecipe,
    list_feature_methods,
    shot,
    train_head,
)
from tftransfer.training.adaptation.losses import centroid_pseudo_labels, information_maximization, mcc_loss

RECIPE = FeatureRecipe(steps=300, bottleneck=16, discriminator_units=32)


def two_domains(shift_class_axis: float, shift_other_axes: float, n: int = 200, seed: int = 0):
    """Two classes apart on axis 0; the target moved along axis 0 (crossing the source boundary) and/or along
    axes 1-3 (which carry no class information)."""
    rng = np.random.default_rng(seed)

    def domain(on_class: float, other: float):
        y = rng.integers(0, 2, n)
        x = np.zeros((n, 8))
        x[:, 0] = np.where(y == 0, -2.0, 2.0) + on_class
        x[:, 1:4] += other
        return (x + rng.normal(0, 0.6, (n, 8)) + 3.0).astype(np.float32), y

    xs, ys = domain(0.0, 0.0)
    xt, yt = domain(shift_class_axis, shift_other_axes)
    return xs, ys, xt, yt


def accuracy(head, x, y) -> float:
    return float(np.mean(head.predict(x)[1].argmax(1) == y))


# --- losses --------------------------------------------------------------------------------------------------


def test_mcc_is_low_for_confident_unconfused_predictions_and_high_for_confused():
    confident = tf.constant([[8.0, -8.0], [-8.0, 8.0], [8.0, -8.0], [-8.0, 8.0]])
    confused = tf.zeros((4, 2))
    assert float(mcc_loss(confident)) < 0.05
    assert float(mcc_loss(confused)) == pytest.approx(0.5, abs=1e-4)


def test_information_maximization_rewards_confident_and_diverse_predictions():
    diverse = tf.constant([[9.0, -9.0], [-9.0, 9.0]])
    collapsed = tf.constant([[9.0, -9.0], [9.0, -9.0]])
    assert float(information_maximization(diverse)) < float(information_maximization(collapsed)) - 0.5


def test_centroid_pseudo_labels_follow_target_clusters_not_the_source_boundary():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal([5, 1], 0.3, (50, 2)), rng.normal([1, 5], 0.3, (50, 2))])
    truth = np.r_[np.zeros(50), np.ones(50)]
    # A biased classifier: probabilities favour class 0 for 70% of class-1 examples.
    probs = np.where(truth[:, None] == 0, [0.8, 0.2], [0.6, 0.4])
    assert np.mean(probs.argmax(1) == truth) == 0.5
    assert np.mean(centroid_pseudo_labels(feats, probs) == truth) > 0.95


# --- methods on toy features ---------------------------------------------------------------------------------


def test_mcc_lowers_target_class_confusion_and_raises_accuracy_over_source_only():
    xs, ys, xt, yt = two_domains(2.2, 0.0)
    base = train_head("source-only", xs, ys, xt, 2, RECIPE).head
    mcc = train_head("mcc", xs, ys, xt, 2, RECIPE).head

    def confusion(head):
        return float(mcc_loss(tf.math.log(tf.constant(head.predict(xt)[1]) + 1e-9), 1.0))

    assert confusion(mcc) < confusion(base) - 0.03
    assert accuracy(mcc, xt, yt) > accuracy(base, xt, yt) + 0.03


def test_cdan_e_makes_the_domains_harder_to_tell_apart():
    xs, ys, xt, _ = two_domains(0.0, 1.5)

    def discriminability(head) -> float:
        zs, zt = head.predict(xs)[0], head.predict(xt)[0]
        x, d = np.concatenate([zs, zt]), np.r_[np.zeros(len(zs)), np.ones(len(zt))]
        return LogisticRegression(max_iter=2000).fit(x, d).score(x, d)

    base = train_head("source-only", xs, ys, xt, 2, RECIPE)
    cdan = train_head("cdan-e", xs, ys, xt, 2, RECIPE)
    assert discriminability(cdan.head) < discriminability(base.head) - 0.015
    assert cdan.history["adaptation_loss"][-1] > 0  # the discriminator was trained, not skipped


def test_shot_wins_back_a_shift_without_source_data():
    xs, ys, xt, yt = two_domains(2.2, 0.0)
    head = train_head("source-only", xs, ys, xt, 2, RECIPE).head
    before = accuracy(head, xt, yt)
    classifier_before = [w.copy() for w in head.classifier.get_weights()]
    history = shot(head, xt, FeatureRecipe(shot_steps=150))
    assert accuracy(head, xt, yt) > before + 0.2
    assert history["information_maximization"][-1] < history["information_maximization"][0]
    for old, new in zip(classifier_before, head.classifier.get_weights()):
        np.testing.assert_array_equal(old, new)  # the source hypothesis (classifier) stays frozen


def test_training_can_continue_from_a_given_head():
    xs, ys, xt, yt = two_domains(2.2, 0.0)
    source = train_head("source-only", xs, ys, xt, 2, RECIPE).head
    before = accuracy(source, xt, yt)
    continued = train_head("mcc", xs, ys, xt, 2, RECIPE, init=source)
    assert continued.head is source and accuracy(source, xt, yt) > before + 0.03
    with pytest.raises(ValueError, match="head_init"):
        train_head("mcc", xs, ys, xt, 2, FeatureRecipe(steps=2, head_init="bogus"))


def test_training_is_seeded():
    xs, ys, xt, _ = two_domains(2.2, 0.0)
    a = train_head("mcc", xs, ys, xt, 2, FeatureRecipe(steps=20, bottleneck=8)).head.predict(xt)[1]
    b = train_head("mcc", xs, ys, xt, 2, FeatureRecipe(steps=20, bottleneck=8)).head.predict(xt)[1]
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- validators ------------------------------------------------------------------------------------------------


def test_entropy_prefers_confident_candidates_and_choose_skips_collapsed_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    reference = Candidate("none", np.full((60, 3), 1 / 3) * 0.5 + np.eye(3)[labels] * 0.5)
    sharp = Candidate("sharp", np.eye(3)[labels] * 0.9 + 0.1 / 3)
    collapsed = Candidate("collapsed", np.tile([0.999, 0.0005, 0.0005], (60, 1)))
    assert entropy_score(sharp) > entropy_score(reference)
    assert is_collapsed(collapsed, reference) and not is_collapsed(sharp, reference)
    choice = choose([collapsed, sharp], reference)
    assert choice.chosen == "sharp"
    assert choose([collapsed], reference).chosen == "none"
    assert snd_score(sharp) > snd_score(Candidate("noise", rng.dirichlet(np.ones(3), 60)))


def test_choose_keeps_no_adaptation_when_nothing_is_clearly_better():
    probs = np.random.default_rng(1).dirichlet(np.ones(3) * 5, 40)
    assert choose([Candidate("same", probs.copy())], Candidate("none", probs)).chosen == "none"


def test_registries_match_the_cli_choices():
    assert set(VALIDATORS) == set(VALIDATOR_NAMES)
    assert adapt_job.METHODS == ("auto", *adapt_job.BN_METHODS, *list_feature_methods(),
                                 *adapt_job.SOURCE_FREE_METHODS) == ADAPT_JOB_METHODS


# --- the job on a tiny fitted run ------------------------------------------------------------------------------

FAST = {"model.backbone": "tiny", "model.weights": "none", "data.image_size": 32, "data.batch_size": 8,
        "phases.head.epochs": 6, "phases.head.learning_rate": 0.05, "phases.finetune.epochs": 0,
        "runtime.deterministic": True, "export.enabled": False}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tftransfer.jobs.fit import run_fit

    root = tmp_path_factory.mktemp("adaptfeat")
    data = make_colour_folder(root / "colours", per_class=10, splits=True)
    cfg = load_config(values={**FAST, "data.path": str(data), "name": "colours", "runs_dir": str(root / "runs"),
                              "runtime.cache_dir": str(root / "cache")})
    return run_fit(cfg).run_dir, data


def dim_target(root: Path, labeled: bool) -> Path:
    """The three colours darker; `labeled` puts them in class folders whose names are shuffled (wrong labels)."""
    names = list(COLOURS)
    for index, (name, colour) in enumerate(COLOURS.items()):
        folder = root / names[(index + 1) % 3] if labeled else root
        for p in write_solid_images(folder, tuple(int(c * 0.45) for c in colour), 6, 32, seed=70 + index):
            p.rename(p.with_name(f"{name}_{p.name}"))
    return root


def adapt(*args: str):
    return CliRunner().invoke(main, ["adapt", *args], catch_exceptions=False)


@pytest.mark.parametrize("method", ["mcc", "shot", "auto"])
def test_adapt_methods_write_runs_that_load_and_predict(fitted, tmp_path, method):
    import keras

    run_dir, _ = fitted
    target = dim_target(tmp_path / "dim", labeled=False)
    result = adapt(str(run_dir), "--target", str(target), "--method", method, "--name", f"dim-{method}")
    assert result.exit_code == 0, result.output
    out = run_dir.parent / f"dim-{method}"
    info = json.loads((out / "adaptation.json").read_text())
    assert info["requested"] == method and info["target_images"] == 18
    if method == "auto":
        assert info["auto"]["chosen"] == info["method"]
        assert {"none", "adabn-aligned", "mcc", "cdan-e", "source-only"} <= set(info["auto"]["scores"])
    else:
        assert info["method"] == method and info["aligned_to_source"]
    model = keras.models.load_model(out / "model.keras", compile=False)
    probs = tf.nn.softmax(model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)).numpy()
    assert probs.shape == (2, 3) and np.all(np.isfinite(probs))
    assert (run_dir / adapt_job.SOURCE_STATS_FILE).is_file() and (out / adapt_job.SOURCE_STATS_FILE).is_file()


def test_target_labels_never_reach_training(fitted, tmp_path):
    """The same target images, flat and in (wrongly) labeled class folders, give the same adapted model."""
    import keras

    run_dir, _ = fitted
    flat = dim_target(tmp_path / "flat", labeled=False)
    labeled = dim_target(tmp_path / "labeled", labeled=True)
    outs = []
    for name, target in (("flat", flat), ("labeled", labeled)):
        assert adapt(str(run_dir), "--target", str(target), "--method", "mcc", "--name", f"lab-{name}").exit_code == 0
        outs.append(keras.models.load_model(run_dir.parent / f"lab-{name}" / "model.keras", compile=False))
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(outs[0].predict(pixels, verbose=0), outs[1].predict(pixels, verbose=0), atol=1e-5)


def test_source_free_adaptation_uses_kept_statistics_and_says_what_is_missing(fitted, tmp_path):
    run_dir, data = fitted
    target = dim_target(tmp_path / "dim", labeled=False)
    if not (run_dir / adapt_job.SOURCE_STATS_FILE).is_file():  # kept by the first adaptation that measured them
        warm = adapt(str(run_dir), "--target", str(target), "--method", "adabn-aligned", "--name", "warm")
        assert warm.exit_code == 0, warm.output
    # A copy of the run whose training data is gone: only the kept statistics remain.
    copy = tmp_path / "runs" / "orphan"
    shutil.copytree(run_dir, copy)
    cfg = (copy / "config.yaml").read_text().replace(str(data), str(tmp_path / "gone"))
    (copy / "config.yaml").write_text(cfg)
    (copy / adapt_job.SOURCE_STATS_FILE).unlink(missing_ok=True)
    missing = CliRunner().invoke(main, ["adapt", str(copy), "--target", str(target), "--method", "shot"])
    assert missing.exit_code != 0 and adapt_job.SOURCE_STATS_FILE in missing.output
    assert "Traceback" not in missing.output
    shutil.copy2(run_dir / adapt_job.SOURCE_STATS_FILE, copy / adapt_job.SOURCE_STATS_FILE)
    assert adapt(str(copy), "--target", str(target), "--method", "shot").exit_code == 0
    needs_source = CliRunner().invoke(main, ["adapt", str(copy), "--target", str(target), "--method", "mcc"])
    assert needs_source.exit_code != 0 and "source" in needs_source.output


def test_auto_refuses_a_validator_it_cannot_feed(fitted, tmp_path):
    run_dir, _ = fitted
    result = CliRunner().invoke(main, ["adapt", str(run_dir), "--target", str(tmp_path), "--validator", "dev"])
    assert result.exit_code != 0 and "dev" in result.output and "Traceback" not in result.output
