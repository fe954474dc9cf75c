"""lorakit: train LoRA adapters of a brand's visual style on diffusion models."""

__version__ = "0.1.0"
