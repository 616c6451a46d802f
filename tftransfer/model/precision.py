"""bf16 inference copies of a float32 model, and the probe that measures whether they pay on this machine.

`bf16_copy(model)` rebuilds the model's architecture under the mixed_bfloat16 policy (float32 variables, bf16
compute; the head's logits layer stays float32, as in training) with the same weights. `Bf16Probe` times batch
inference of both on a few batches and applies the rule in tftransfer.runtime.bf16_pays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from tftransfer.core.numerics import stable_softmax
from tftransfer.model.classifier import HEAD_LAYER, build_inference_fn
from tftransfer.runtime import Bf16Verdict, bf16_pays

logger = logging.getLogger(__name__)

BF16_POLICY = "mixed_bfloat16"


def _bf16_config(node: Any, keep: frozenset[str]) -> Any:
    """The serialized model with every float32 layer policy made mixed_bfloat16, but the layers named in `keep`."""
    if isinstance(node, list):
        return [_bf16_config(item, keep) for item in node]
    if not isinstance(node, dict):
        return node
    inner = node.get("config")
    if node.get("class_name") == "DTypePolicy" and isinstance(inner, dict) and inner.get("name") == "float32":
        return {**node, "config": {**inner, "name": BF16_POLICY}}
    if isinstance(inner, dict) and inner.get("name") in keep and "dtype" in inner:
        return node  # a kept layer stays float32
    return {key: _bf16_config(value, keep) for key, value in node.items()}


def bf16_copy(model: keras.Model, keep: Sequence[str] = (HEAD_LAYER,)) -> keras.Model:
    """The model rebuilt under mixed_bfloat16 compute with the same (float32) weights: for inference only."""
    config = _bf16_config(keras.saving.serialize_keras_object(model), frozenset(keep))
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _seconds(infer: Callable[[Any], np.ndarray], batches: Sequence[np.ndarray], repeats: int) -> float:
    """The best of `repeats` passes over the batches, after one traced warm-up call."""
    infer(batches[0])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            np.asarray(infer(batch))
        best = min(best, time.perf_counter() - started)
    return best


@dataclass(frozen=True)
class Bf16Probe:
    """Times float32 vs bf16 batch inference of a model on a few batches and judges the bf16 copy."""

    repeats: int = 2

    def measure(self, model: keras.Model, batches: Sequence[np.ndarray]) -> Bf16Verdict:
        """The verdict of bf16_pays on `batches` (float32 pixels): timings, max |dp| and top-1 agreement."""
        if not batches:
            raise ValueError("the bf16 probe needs at least one batch of images")
        copy = bf16_copy(model)
        plain, reduced = build_inference_fn(model), build_inference_fn(copy)
        float32_s = _seconds(plain, batches, self.repeats)
        bf16_s = _seconds(reduced, batches, self.repeats)
        p32 = stable_softmax(np.concatenate([np.asarray(plain(b), np.float32) for b in batches]))
        p16 = stable_softmax(np.concatenate([np.asarray(reduced(b), np.float32) for b in batches]))
        verdict = bf16_pays(float32_s, bf16_s, float(np.max(np.abs(p32 - p16))),
                            float(np.mean(np.argmax(p32, 1) == np.argmax(p16, 1))))
        logger.info("bf16 probe on %d batches: float32 %.3f s, bf16 %.3f s: %s", len(batches), float32_s, bf16_s,
                    verdict.reason)
        return verdict
