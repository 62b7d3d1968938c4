"""igds_fast: Information-Guided Diffusion Sampling for dataset distillation, fast and faithful."""

__version__ = "0.1.0"
