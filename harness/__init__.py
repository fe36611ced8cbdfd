"""Benchmark harness for token reduction in Vision Transformers.

Import stays light on purpose (`python -m harness ls` must be instant): torch, timm, pandas and
matplotlib are imported by the modules that use them.
"""
__version__ = "0.1.0"
