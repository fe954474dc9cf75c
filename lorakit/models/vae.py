"""VAE configs shared by the families (diffusers `AutoencoderKL`).

- `SD_VAE`: the real KL-f8 VAE of SD1.5 (4 latent channels); SDXL's is the same network with
  another scaling factor, and SD3/FLUX keep its block layout with 16 latent channels
  (`FLOW_VAE`, no quant convs; shift + scale set by the family).
- `TINY_VAE` / `tiny_flow_vae`: small offline versions with the same block types and names.
"""

from __future__ import annotations

from typing import Any

SD_VAE = dict(
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    scaling_factor=0.18215,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
"""stable-diffusion-v1-5 `vae/config.json` (scaling factor 0.18215)."""
FLOW_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
"""The 16-channel VAE layout of SD3/FLUX (parameter counts for `lorakit plan`)."""

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)


def tiny_flow_vae(shift_factor: float, scaling_factor: float) -> dict[str, Any]:
    """A 16-channel VAE config (SD3/FLUX layout: no quant convs, shift + scale)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
