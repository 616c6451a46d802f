"""tftransfer: transfer learning for keras.applications backbones, from a folder of images to TF Serving."""

__version__ = "0.1.0"
