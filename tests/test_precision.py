"""bf16 inference on CPU: the rule, AMX detection, the probe's cache, the bf16 copy, the non-AMX path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_colour_folder

import tftransfer
from tftransfer import runtime
from tftransfer.core.io import write_json
from tftransfer.runtime import (
    BF16_MAX_PROB_DIFF,
    BF16_MIN_SPEEDUP,
    BF16_MIN_TOP1_AGREEMENT,
    Bf16Verdict,
    bf16_pays,
    bf16_verdict_path,
    has_amx_bf16,
    inference_precision,
)


@pytest.mark.parametrize("f32, bf16, diff, agree, expected", [
    (1.49, 1.0, 0.01, 1.0, True),  # ResNet50 on the earlier probe: passes
    (0.78, 1.0, 0.01, 1.0, False),  # MobileNetV2-0.35 on this (non-AMX) CPU: slower
    (1.19, 1.0, 0.0, 1.0, False),  # just under the speed-up
    (BF16_MIN_SPEEDUP, 1.0, BF16_MAX_PROB_DIFF, BF16_MIN_TOP1_AGREEMENT, True),  # every threshold is inclusive
    (2.0, 1.0, BF16_MAX_PROB_DIFF + 0.01, 1.0, False),  # fast but the probabilities moved
    (2.0, 1.0, 0.01, 0.98, False),  # fast but top-1 changed on 2 % of the images
])
def test_the_rule_decides_from_timings_and_agreement(f32, bf16, diff, agree, expected):
    verdict = bf16_pays(f32, bf16, diff, agree)
    assert verdict.use_bf16 is expected
    assert verdict.precision == ("mixed_bfloat16" if expected else "float32")
    assert verdict.float32_seconds == f32 and verdict.reason


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not has_amx_bf16(info) and runtime.cpu_model(info) == "Some CPU"
    info.write_text("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert has_amx_bf16(info)
    assert not has_amx_bf16(tmp_path / "missing")


def test_without_amx_inference_stays_float32_with_the_reason_and_no_probe(tmp_path):
    def probe() -> Bf16Verdict:
        raise AssertionError("no probe without AMX")

    verdict = inference_precision("auto", "cpu", probe, tmp_path / "v.json", amx=lambda: False)
    assert verdict.precision == "float32" and "no AMX" in verdict.reason
    assert not (tmp_path / "v.json").exists()
    explicit = inference_precision("float32", "cpu", probe, tmp_path / "v.json", amx=lambda: True)
    assert not explicit.use_bf16 and "explicitly" in explicit.reason


def test_the_probe_runs_once_then_its_verdict_is_read_from_the_cache(tmp_path):
    calls = []

    def probe() -> Bf16Verdict:
        calls.append(1)
        return bf16_pays(1.5, 1.0, 0.01, 1.0)

    path = bf16_verdict_path(tmp_path, "resnet50", 224, cpu="Some CPU")
    assert path.parent == tmp_path / "precision"
    first = inference_precision("auto", "cpu", probe, path, amx=lambda: True)
    second = inference_precision("auto", "cpu", probe, path, amx=lambda: True)
    assert calls == [1] and first.use_bf16 and second.use_bf16 and second.from_cache and not first.from_cache
    assert json.loads(path.read_text())["precision"] == "mixed_bfloat16"
    assert bf16_verdict_path(tmp_path, "resnet50", 224, cpu="Other CPU") != path  # per CPU model
    assert bf16_verdict_path(tmp_path, "resnet50", 160, cpu="Some CPU") != path  # per image size


def _tiny_model():
    import keras

    from tftransfer.config.experiment import ModelConfig
    from tftransfer.model import backbones
    from tftransfer.model.classifier import build_model

    keras.utils.set_random_seed(3)
    return build_model(ModelConfig(backbone="tiny", weights="none"), backbones.get_backbone_spec("tiny"), 3, 32)


def test_the_bf16_copy_computes_in_bf16_and_agrees_with_float32():
    from tftransfer.evaluation.inference import predict_probabilities
    from tftransfer.model.classifier import HEAD_LAYER
    from tftransfer.model.precision import bf16_copy

    model = _tiny_model()
    copy = bf16_copy(model)
    assert copy.get_layer("backbone").dtype_policy.name == "mixed_bfloat16"
    assert copy.get_layer(HEAD_LAYER).dtype_policy.name == "float32"  # the logits stay float32
    assert model.get_layer("backbone").dtype_policy.name == "float32"  # the original is untouched
    images = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    p32, p16 = predict_probabilities(model, images), predict_probabilities(copy, images)
    assert np.max(np.abs(p32 - p16)) < BF16_MAX_PROB_DIFF
    assert not np.array_equal(p32, p16)  # it really computed in bf16


def test_forced_amx_runs_the_probe_on_the_model_and_records_a_verdict(tmp_path, monkeypatch):
    from tftransfer.model.precision import Bf16Probe

    monkeypatch.setattr(runtime, "has_amx_bf16", lambda *a: True)
    model = _tiny_model()
    batches = [np.random.default_rng(i).uniform(0, 255, (8, 32, 32, 3)).astype("float32") for i in range(2)]
    path = bf16_verdict_path(tmp_path, "tiny", 32)
    verdict = inference_precision("auto", "cpu", lambda: Bf16Probe(repeats=1).measure(model, batches), path,
                                  amx=runtime.has_amx_bf16)
    assert verdict.float32_seconds > 0 and verdict.bf16_seconds > 0
    assert verdict.top1_agreement >= 0.9 and verdict.max_prob_diff < BF16_MAX_PROB_DIFF
    assert verdict == bf16_pays(verdict.float32_seconds, verdict.bf16_seconds, verdict.max_prob_diff,
                                verdict.top1_agreement)  # the rule, applied to what it measured
    assert path.exists()


def test_fit_extracts_and_evaluates_with_the_bf16_copy_when_the_cached_verdict_says_so(tmp_path, monkeypatch):

    monkeypatch.setattr(runtime, "has_amx_bf16", lambda *a: True)
    cache = tmp_path / "cache"
    path = bf16_verdict_path(cache, "tiny", 32)
    path.parent.mkdir(parents=True)
    write_json(path, bf16_pays(2.0, 1.0, 0.0, 1.0).to_dict())  # as if measured once before
    from tftransfer.jobs import fit as fit_job
    from tftransfer.model.precision import bf16_copy
    from tftransfer.training import phases

    copied: list[str] = []

    def counting_copy(model, *args):
        copied.append(model.name)
        return bf16_copy(model, *args)

    monkeypatch.setattr(fit_job, "bf16_copy", counting_copy)  # evaluation
    monkeypatch.setattr(phases, "bf16_copy", counting_copy)  # phase 1's feature extraction
    data = make_colour_folder(tmp_path / "data", per_class=6)
    result = tftransfer.fit(values={
        "data.path": str(data), "model.backbone": "tiny", "model.weights": "none", "data.image_size": 32,
        "data.batch_size": 8, "phases.head.epochs": 2, "phases.finetune.epochs": 0, "runtime.cache_dir": str(cache),
        "runs_dir": str(tmp_path / "runs"), "export.enabled": False, "name": "bf16"})
    recorded = result.metrics["run"]["runtime"]["inference_precision"]
    assert recorded["precision"] == "mixed_bfloat16" and recorded["from_cache"] and recorded["float32_seconds"] == 2.0
    assert json.loads((result.run_dir / "runtime.json").read_text())["inference_precision"] == recorded
    assert result.metrics["run"]["runtime"]["precision"] == "float32"  # training stays float32 on CPU
    assert result.metrics["final"]["val"]["accuracy"] is not None
    assert len(copied) >= 2  # the features and the phase's evaluation went through bf16 copies
