"""SDXL's `AgreementSupport` (see `lorakit/models/base.py`): the default tiny UNet as it is, its
VAE's `scaling_factor` set so the training image's latent has RMS 1 (`UNetAgreement`). Its
default run is slow-tier: the UNet, ε target and DDPM schedule are SD1.5's, whose default run
stays in the default tier; tests/test_sdxl.py checks SDXL's own conditioning (time ids, pooled
embeddings, two encoders) against its pipeline."""

from __future__ import annotations

from lorakit.models.agreement import UNetAgreement

AGREEMENT = UNetAgreement("sdxl", default_tier=False)
