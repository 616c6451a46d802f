"""The child process of check_parity_fresh_process: loads an export with TensorFlow alone (as TF Serving does)
and writes its outputs for the parent to compare. Run as `python -m tftransfer.serving.probe --wait` (by
FreshProcess): TensorFlow is imported first, then DIR and WORK are read from standard input (nothing there: exit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tftransfer.serving.contract import VALID_OUTPUT
from tftransfer.serving.savedmodel import (
    describe_tensor_spec,
    load_exported,
    predict_exported_bytes,
    predict_exported_pixels,
    signature_defs_text,
)


def probe_main(version_dir: str, work: str) -> None:
    """Runs in the fresh process: loads the export (no tftransfer.model.layers), lists and calls its signatures."""
    work_dir = Path(work)
    text = signature_defs_text(version_dir)
    loaded = load_exported(version_dir)
    summary = {name: {"inputs": {k: describe_tensor_spec(v)
                                 for k, v in sorted(sig.structured_input_signature[1].items())},
                      "outputs": {k: describe_tensor_spec(v) for k, v in sorted(sig.structured_outputs.items())}}
               for name, sig in sorted(loaded.signatures.items())}
    np.save(work_dir / "pixels_probs.npy", predict_exported_pixels(loaded, np.load(work_dir / "pixels.npy")))
    encoded = [p.read_bytes() for p in sorted(work_dir.glob("image_*"))]
    batches = [predict_exported_bytes(loaded, encoded[i : i + 32]) for i in range(0, len(encoded), 32)]
    np.save(work_dir / "bytes_probs.npy", np.concatenate([b["probabilities"] for b in batches]) if batches
            else np.zeros((0, 0), np.float32))
    # Images serving_default refused (over its pixel limit) are compared by nobody: the parent reports them.
    # An export made before per-image checks has no `valid` output: every image counts as served.
    np.save(work_dir / "bytes_valid.npy", np.concatenate([b.get(VALID_OUTPUT, np.ones(len(b["probabilities"]), bool))
                                                          for b in batches]) if batches else np.zeros((0,), bool))
    (work_dir / "probe.json").write_text(json.dumps({
        "signatures_text": text, "signatures": summary,
        # The export must run on TensorFlow alone, as in TF Serving.
        "tftransfer_layers_imported": "tftransfer.model.layers" in sys.modules,
    }))


def wait_main() -> int:
    """Reads the export's folder and the work folder, a line each, from standard input, then probes them; a parent
    that closes the pipe without them (its export failed first, or it was killed) ends this process quietly."""
    lines = sys.stdin.read().splitlines()
    if len(lines) < 2:
        return 0
    probe_main(lines[0], lines[1])
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--wait"]:
        sys.exit(wait_main())
    sys.exit("usage: python -m tftransfer.serving.probe --wait (then VERSION_DIR and WORK_DIR on standard input; "
             "used by check_parity_fresh_process)")
