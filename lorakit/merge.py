"""`lorakit merge`: fuse one or more adapters into the base weights, `W ← W + Σ sᵢ·ΔWᵢ`.

ΔW is each module's `up @ down * alpha / rank` (conv: `[out, in, kh, kw]`), added in fp32 and
cast back to the weight's dtype. The result is saved as a diffusers folder (`family.save`).
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.lora import Adapter, LoraWeights, runtime_name


def merge_into(family, components, adapters: list[tuple[Adapter, float]]) -> int:
    """Add every adapter's ΔW × weight into `components` in place; → number of modules changed."""
    from lorakit.export.validate import check_adapter

    targets = {t.component: t for t in family.targets}
    changed = set()
    for adapter, weight in adapters:
        check_adapter(adapter)  # the rules every reader applies, also for adapters built in code
        if adapter.family != family.name:
            raise LorakitError(
                f"An adapter for {adapter.family} cannot be merged into a {family.name} model."
            )
        for (comp, path), w in adapter.modules.items():
            if not isinstance(w, LoraWeights) or getattr(w, "magnitude", None) is not None:
                raise LorakitError(f"'{comp}.{path}' is not a plain LoRA; merge handles LoRA only.")
            root = getattr(components, comp, None)
            if root is None or comp not in targets:
                raise LorakitError(f"The base model has no component '{comp}' for this adapter.")
            name = runtime_name(targets[comp], root, path)
            try:
                module = root.get_submodule(name)
            except AttributeError:
                raise LorakitError(
                    f"The base model's {comp} has no module '{path}'; the adapter was made for "
                    "another architecture."
                ) from None
            delta = w.delta() * weight
            if delta.numel() != module.weight.numel():
                raise LorakitError(
                    f"'{comp}.{path}': the adapter's update {tuple(delta.shape)} does not fit the "
                    f"weight {tuple(module.weight.shape)}; the adapter is for another model size."
                )
            with torch.no_grad():
                new = module.weight.float() + delta.reshape(module.weight.shape).to(
                    module.weight.device
                )
                module.weight.copy_(new.to(module.weight.dtype))
            changed.add((comp, path))
    return len(changed)
