"""Fine-tuning with a method's reduction in place (the ``finetune:<recipe>`` protocol).

``recipes`` (recipes as data from benchmark.toml, read without torch) and ``finetune`` (timm's
optimizer, schedulers, Mixup and losses; checkpoints, resume, DDP).
"""
