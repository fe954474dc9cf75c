"""SDXL's `AgreementSupport` (see `lorakit/models/base.py`): the default tiny UNet as it is, its
VAE's `scaling_factor` set so the training image's latent has RMS 1 (`UNetAgreement`)."""

from __future__ import annotations

from lorakit.models.agreement import UNetAgreement

AGREEMENT = UNetAgreement("sdxl")
