"""tftransfer.serving.contract."""

from __future__ import annotations

SERVING_SIGNATURE = "serving_default"


PIXELS_SIGNATURE = "predict_pixels"


SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)


BYTES_INPUT = "images"


PIXELS_INPUT = "pixels"


OUTPUT_KEYS = ("probabilities", "classes", "scores", "class_names")


LABELS_FILE = "labels.txt"

