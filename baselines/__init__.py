"""Faithful reimplementations of the methods ILoRA is compared with; each registers itself."""

from baselines import fedit, ffa_lora, flora, lora_fair  # noqa: F401
