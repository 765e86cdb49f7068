"""diffdistill: generative dataset distillation with a class-conditional DiT and self-adaptive memory."""

__version__ = "0.1.0"
