"""Fixed module table of the T5 v1.1 XXL encoder (FLUX.1's `text_encoder_2`, SD3's
`text_encoder_3`), for adapters that carry T5 LoRA keys.

lorakit never trains T5, but kohya sd-scripts does (`train_t5xxl=True` in `networks/lora_flux.py`
puts a LoRA on every Linear of `T5Attention` and `T5DenseGatedActDense`, keys
`lora_te3_encoder_block_{i}_layer_0_SelfAttention_{q,k,v,o}` and
`lora_te3_encoder_block_{i}_layer_1_DenseReluDense_{wi_0,wi_1,wo}`), and ComfyUI and Forge load
those keys. Reading them against this table lets lorakit keep, apply and re-export them instead
of calling the whole file foreign. `relative_attention_bias` is an Embedding, never a LoRA target.
"""

from __future__ import annotations

from functools import cache

T5_XXL_LAYERS = 24
"""google/t5-v1_1-xxl encoder blocks (FLUX.1 and SD3 both use this encoder)."""


def t5_encoder_modules(num_layers: int = T5_XXL_LAYERS) -> frozenset[str]:
    """Linear modules of `T5EncoderModel` (gated-GELU feed-forward) in transformers' names."""
    names = set()
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        names |= {f"{b}.0.SelfAttention.{p}" for p in ("q", "k", "v", "o")}
        names |= {f"{b}.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo")}
    return frozenset(names)


@cache
def t5_xxl_modules() -> frozenset[str]:
    return t5_encoder_modules(T5_XXL_LAYERS)
