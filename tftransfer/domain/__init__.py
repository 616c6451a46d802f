"""Domain shift: measure it (shift), price it (corruptions, the domain report), win it back cheaply (adapters).

`run_domain` (tftransfer.jobs.domain) is the `tftransfer domain` job; the modules are usable on their own:
shift measures take NumPy feature arrays, corruptions are TensorFlow ops for tf.data, adapters take a tftransfer
model and in-memory target images.
"""
