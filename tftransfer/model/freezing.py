"""Freezing as pure, config-driven functions: whole blocks only, BatchNorm always frozen; each returns what changed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras

from tftransfer.model.backbones import Block
from tftransfer.model.classifier import count_params, get_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezeReport:
    """Which blocks are trainable now and how many parameters train."""

    unfrozen_blocks: list[str] = field(default_factory=list)
    trainable_params: int = 0
    non_trainable_params: int = 0
    trainable_layers: int = 0


def _report(model: keras.Model, blocks: list[str], layers: int) -> FreezeReport:
    return FreezeReport(unfrozen_blocks=blocks, trainable_params=count_params(model.trainable_weights),
                        non_trainable_params=count_params(model.non_trainable_weights), trainable_layers=layers)


def freeze_backbone(model: keras.Model) -> FreezeReport:
    """Phase 1: the whole backbone is frozen; only the head trains."""
    get_backbone(model).trainable = False
    return _report(model, [], 0)


def _is_normalization(layer: keras.layers.Layer) -> bool:
    # BatchNorm statistics from ImageNet are better than what a few hundred images give; LayerNorm (ConvNeXt) has
    # no running statistics and fine-tunes normally.
    return isinstance(layer, keras.layers.BatchNormalization)


def top_blocks(blocks: Sequence[Block], n: int) -> list[Block]:
    """The top `n` blocks (all of them when n exceeds their count): what phase 2 unfreezes."""
    return list(blocks)[-n:] if n > 0 else []


def unfreeze_top_blocks(model: keras.Model, blocks: Sequence[Block], n: int) -> FreezeReport:
    """Phase 2: the top `n` whole blocks of the backbone train, except their BatchNorm layers; the rest stays frozen."""
    if n < 0:
        raise ValueError(f"cannot unfreeze {n} blocks")
    backbone = get_backbone(model)
    chosen = top_blocks(blocks, n)
    if n > len(blocks):
        logger.info("unfreezing all %d blocks (asked for %d)", len(blocks), n)
    names = {name for block in chosen for name in block.layer_names}
    backbone.trainable = True
    trainable = 0
    for layer in backbone.layers:
        layer.trainable = layer.name in names and not _is_normalization(layer)
        trainable += int(layer.trainable and bool(layer.weights))
    return _report(model, [b.name for b in chosen], trainable)
