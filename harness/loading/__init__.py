"""What goes in: data and models.

``models`` (model cards, timm models and checkpoints), ``data`` (ImageNet-val folders, CIFAR-10,
synthetic inputs, through each model's own timm transform), ``datacache`` (decoded tensors packed
once, memory-mapped) and ``inputs`` (what a sweep reads once: weights, eval and calibration sets).
"""
