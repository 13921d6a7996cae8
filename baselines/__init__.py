"""Faithful reimplementations of the methods ILoRA is compared with; each registers itself."""

from baselines import fedit  # noqa: F401
