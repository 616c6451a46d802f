"""adapt: moved from tftransfer.jobs.domain."""

from __future__ import annotations

import logging
from pathlib import Path

from tftransfer.config.experiment import load_config, save_config
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.core.io import write_json
from tftransfer.domain.adapters import adabn_model
from tftransfer.domain.targets import load_labeled_domain, load_unlabeled_domain
from tftransfer.jobs.domain import DEFAULT_MAX_IMAGES
from tftransfer.runs.finished import load_run
from tftransfer.runs.layout import RunDir, create_run_dir

logger = logging.getLogger(__name__)


# --- adapt: an adapted model as a new run ----------------------------------------------------------------------

SAVEABLE_ADAPTERS = ("adabn", "adabn-aligned")  # the methods that change only stored statistics: a plain model


def run_adapt(model_path: str | Path, target: str, method: str = "adabn", name: str | None = None,
              overwrite: bool = False, batch_size: int = 32, max_images: int = DEFAULT_MAX_IMAGES,
              seed: int = 0) -> Path:
    """`tftransfer adapt`: writes MODEL adapted to the (unlabeled) target images as a new run that export ships.

    The new run (next to MODEL, default name <model>-<method>) has the adapted model.keras, the original run's
    config (with the new name), split and labels, and adaptation.json saying what was done.
    """
    import re
    import shutil
    from dataclasses import replace


    if method not in SAVEABLE_ADAPTERS:
        raise ConfigError(f"--method {method!r}: adapt writes a model only for {', '.join(SAVEABLE_ADAPTERS)} "
                          "(TENT and bn-batch adapt per batch at prediction time; compare them with `domain`)")
    run = load_run(model_path)
    source_run = RunDir(run.path)
    target_data = load_unlabeled_domain(target, run, batch_size=batch_size, max_images=max_images, seed=seed)
    source_images = None
    if method == "adabn-aligned":
        if run.data_config is None:
            raise RunDirError(f"{source_run.config}: needed to find the source data for adabn-aligned")
        source_images = load_labeled_domain(run.data_config.path, run, held_out=True, batch_size=batch_size,
                                            max_images=max_images, seed=seed, what="source").images
    adapted, info = adabn_model(run.model, target_data.images, batch_size, source_images=source_images)
    new_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run.path.name}-{method}")
    out = create_run_dir(run.path.parent, new_name, overwrite=overwrite)
    cfg = replace(load_config(source_run.config), name=new_name, runs_dir=str(run.path.parent))
    save_config(cfg, out.config)
    for file in (source_run.split, source_run.labels):
        if file.is_file():
            shutil.copy2(file, out.path / file.name)
    adapted.save(out.model)
    write_json(out.path / "adaptation.json", {
        "method": method, "adapted_from": str(run.path), "target": target, "target_images": len(target_data.images),
        "target_skipped": len(target_data.skipped), "aligned_to_source": source_images is not None,
        "source_images": None if source_images is None else len(source_images),
        "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}})
    logger.info("adapted %s to %s with %s (%d target images): %s", run.path, target, method,
                len(target_data.images), out.path)
    return out.path
