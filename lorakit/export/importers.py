"""Third-party LoRA layouts, normalised to lorakit's kohya or diffusers key forms before reading.

- SimpleTuner / raw peft: `transformer.base_model.model.<path>.lora_A.weight` →
  `transformer.<path>…`.
- ai-toolkit: peft keys (`transformer.<path>.lora_A.weight`, FLUX) are already the diffusers form;
  its ComfyUI-style `diffusion_model.<path>` prefix becomes `transformer.`.
- old diffusers (≤ 0.20): `….processor.to_q_lora.down.weight`, `….to_q.lora.down.weight`,
  `….lora_linear_layer.down.weight` → `….to_q.lora_A.weight`; their optional `….alpha` tensors
  become a per-module alpha pattern in the `lora_adapter_metadata` header.
Conversions are renames only: tensors are never changed, so nothing is lost.
"""

from __future__ import annotations

import json
import re

import torch

_OLD_ATTN = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_LORA = re.compile(r"\.(lora|lora_linear_layer)\.(down|up)\.weight$")


def _old_diffusers(key: str) -> str | None:
    m = _OLD_ATTN.search(key)
    if m:
        leaf = "to_out.0" if m[1] == "to_out" else m[1]
        return key[: m.start()] + f".{leaf}.lora_{'A' if m[2] == 'down' else 'B'}.weight"
    m = _OLD_LORA.search(key)
    if m:
        return key[: m.start()] + f".lora_{'A' if m[2] == 'down' else 'B'}.weight"
    return None


def normalize(
    tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """→ (tensors, metadata, source label or None when the layout is already lorakit's)."""
    keys = list(tensors)
    if any(".base_model.model." in k for k in keys):
        out = {k.replace(".base_model.model.", ".", 1): v for k, v in tensors.items()}
        return out, meta, "SimpleTuner/peft"
    if keys and all(k.startswith("diffusion_model.") and ".lora_" in k for k in keys):
        out = {"transformer." + k.removeprefix("diffusion_model."): v for k, v in tensors.items()}
        return out, meta, "ai-toolkit"
    if any(_old_diffusers(k) for k in keys):
        out, alphas = {}, {}
        for k, v in tensors.items():
            new = _old_diffusers(k)
            if new is not None:
                out[new] = v
            elif k.endswith(".alpha"):
                base = k.removesuffix(".alpha").replace(".processor.", ".")
                base = re.sub(r"\.(to_q|to_k|to_v)_lora$", r".\1", base)
                base = re.sub(r"\.to_out_lora$", ".to_out.0", base)
                base = re.sub(r"\.(lora|lora_linear_layer)$", "", base)
                alphas[base] = float(v)
            else:
                out[k] = v  # left for the reader to report as unplaceable
        meta = dict(meta)
        if alphas:
            packed: dict = {}
            for full, a in alphas.items():
                comp, _, path = full.partition(".")
                packed.setdefault(f"{comp}.alpha_pattern", {})[path] = a
            meta["lora_adapter_metadata"] = json.dumps(packed)
        return out, meta, "old diffusers"
    return tensors, meta, None
