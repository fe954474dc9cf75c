"""Anti-bleed preservation and the bleed score: a LoRA that changes the output only where its
trigger is.

Preservation (`train.preserve_weight` = w > 0; ai-toolkit's "differential output preservation").
For a micro-batch with captions c, noisy latents x_t and timesteps t, after the usual loss L and
its backward pass, the denoiser predicts the same x_t, t on the preservation prompt P(c) — c with
every occurrence of `data.trigger` replaced by `train.preserve_prompt` (a class word), or the
empty prompt when that is "" — twice:

    base    = f_θ(x_t, t, P(c))          LoRA off, under no_grad: a fixed target
    adapter = f_θ+Δ(x_t, t, P(c))        LoRA on, with gradients
    loss    = L + w · mean((adapter - base)²)     (plain MSE over every element, no weighting)

so each micro-batch runs the denoiser forward three times (two with gradients, one without) and
backward twice. The second backward runs only after the first one has freed its graph (as
ai-toolkit does), so the activation peak stays one plain step's; the base prediction
`[B, C, h, w]` is held during the second pass. The gradients are those of the sum (backward is
linear); the base branch contributes none. `f` is the family's `predict`, and its inputs are
exactly the ones the family's `loss` fed it (`Recording`): the noisy latents, the timesteps in
the family's convention, and the conditioning with the image conditioning (SDXL's time ids) and
training guidance (FLUX) of the plain prediction, only the caption's embeddings swapped for
P(c)'s. P(c) is embedded through the same content-keyed text cache as the captions.

Bleed score (`eval.bleed`, with every held-out loss): on the held-out images and the held-out
loss's fixed draws (`evaluate.heldout_draws`), conditioned on each caption with the trigger
removed (`without_trigger`), the mean over every element of (adapter − base)²; 0 at step 0 for a
plain LoRA. It says how much the adapter changes images whose prompt lacks the trigger.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError, LorakitError

if TYPE_CHECKING:
    from lorakit.config import Config, TrainConfig


@dataclass(frozen=True)
class Preservation:
    """`train.preserve_weight` > 0: what each caption's preservation prompt is, and its weight."""

    weight: float
    trigger: str
    """`data.trigger` (may be "" with an empty `prompt`)."""
    prompt: str
    """`train.preserve_prompt`: replaces the trigger; "" = the empty prompt for every caption."""

    def caption(self, caption: str) -> str:
        """P(c): `caption` with every occurrence of the trigger replaced by the class prompt
        (plain substring replacement, as `data.apply_trigger` finds the trigger); "" when the
        prompt is empty. A caption without the trigger stays as it is."""
        if not self.prompt:
            return ""
        return caption.replace(self.trigger, self.prompt)


def preservation(c: Config) -> Preservation | None:
    """The run's `Preservation`, None when `train.preserve_weight` is 0 (read by `build_spec`)."""
    t = c.train
    if not t.preserve_weight:
        return None
    return Preservation(t.preserve_weight, c.data.trigger, t.preserve_prompt)


def without_trigger(caption: str, trigger: str) -> str:
    """`caption` with every occurrence of `trigger` removed, and the blanks and commas it leaves
    tidied ("tdwl, a cup" → "a cup", "a tdwl mug" → "a mug")."""
    if not trigger or trigger not in caption:
        return caption
    text = re.sub(r"\s+", " ", caption.replace(trigger, " "))
    text = re.sub(r"\s*,(\s*,)+\s*", ", ", text)
    return text.strip(" ,")


def check_preservation(c: Config) -> None:
    """ConfigError for a `train.preserve_weight` run lorakit cannot do (read by `validate`)."""
    t, trigger = c.train, c.data.trigger
    if not t.preserve_weight:
        return
    if c.lora.train_text_encoder:
        raise ConfigError(
            "Config key 'train.preserve_weight' > 0 needs the base model's caption embeddings "
            "(the preservation target is the base model's prediction), but "
            "lora.train_text_encoder = true changes them with the text-encoder LoRA. Set "
            "lora.train_text_encoder = false, or train.preserve_weight = 0."
        )
    if t.preserve_prompt and not trigger:
        raise ConfigError(
            f"Config key 'train.preserve_prompt' = {t.preserve_prompt!r} replaces the trigger "
            "word in each caption, but data.trigger is empty, so there is nothing to replace. "
            "Set the word your captions carry with --trigger WORD (data.trigger), or set "
            "train.preserve_prompt = '' to preserve the model on the empty prompt."
        )
    if trigger and trigger in t.preserve_prompt:
        raise ConfigError(
            f"Config key 'train.preserve_prompt' = {t.preserve_prompt!r} contains the trigger "
            f"'{trigger}' (data.trigger), so the preservation prompt would still trigger the "
            "adapter it is meant to hold back. Use a class word without the trigger (e.g. "
            "'logo'), or '' for the empty prompt."
        )


def cached_captions(
    pres: Preservation | None, bleed_trigger: str, captions: list[str], heldout: list[int]
) -> list[str]:
    """The extra captions a run embeds next to `captions` (through the same text cache):
    every caption's preservation prompt, and the held-out captions (`heldout` indices) without
    the trigger when the bleed score is on (`bleed_trigger` non-empty)."""
    extra = {pres.caption(cap) for cap in captions} if pres else set()
    if bleed_trigger:
        extra |= {without_trigger(captions[i], bleed_trigger) for i in heldout}
    return sorted(extra - set(captions))


# -- what the family's loss fed its denoiser ------------------------------------------------------


@dataclass
class Call:
    """One `Family.predict` call: its inputs and (detached) output."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]
    output: torch.Tensor


class Recording:
    """`family` with its `predict` watched: `self.family.loss(...)` is the family's own loss,
    and `self.calls` holds every `predict` call it made. Relies on the `Family.loss` contract:
    the loss computes its one prediction by calling `self.predict(denoiser, noisy, timesteps,
    cond)`; `tests/test_preserve.py` checks it for every registered family."""

    def __init__(self, family: Any):
        self.original = family
        self.calls: list[Call] = []
        self.family = copy.copy(family)  # the registry's object stays untouched
        self.family.predict = self._predict

    def _predict(self, denoiser, noisy, timesteps, cond):
        out = self.original.predict(denoiser, noisy, timesteps, cond)
        self.calls.append(Call(noisy, timesteps, dict(cond), out.detach()))
        return out

    def only_call(self) -> Call:
        if len(self.calls) != 1:
            raise LorakitError(
                f"The {self.original.name} family's loss called its predict "
                f"{len(self.calls)} times for one batch; anti-bleed preservation and the bleed "
                "score need exactly one call (Family.loss contract). Set train.preserve_weight = "
                "0 and eval.bleed = false."
            )
        return self.calls[0]


@contextlib.contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[int]:
    """Every peft adapter layer (LoRA, DoRA, LoHa, LoKr) in `modules` computes its base layer
    only inside the block: the base model's output exactly. Yields the number of layers. On
    leaving, the layers that were enabled are enabled again and every parameter's
    `requires_grad` is put back as it was (peft's toggle changes it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [
        m
        for top in modules
        for m in top.modules()
        if isinstance(m, BaseTunerLayer) and not m.disable_adapters
    ]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield len(layers)
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def base_prediction(
    family: Any, base_denoiser: torch.nn.Module, call: Call, cond: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The base model's prediction (adapters off, no gradients) for `call`'s noisy latents and
    timesteps, conditioned on `cond`."""
    with torch.no_grad(), adapters_disabled(base_denoiser):
        return family.predict(base_denoiser, call.noisy, call.timesteps, cond)


def preservation_mse(
    recording: Recording,
    denoiser: torch.nn.Module,
    base_denoiser: torch.nn.Module,
    text: dict[str, torch.Tensor],
) -> torch.Tensor:
    """mean((adapter − base)²), fp32 scalar with gradients into the adapter only, on the inputs
    of the plain prediction `recording` saw, the caption embeddings replaced by `text` (the
    preservation prompts', batch-first, on the device). `denoiser` is the trained module as
    the loop calls it (DDP-wrapped or compiled); `base_denoiser` the same module unwrapped."""
    call = recording.only_call()
    cond = {**call.cond, **text}
    base = base_prediction(recording.original, base_denoiser, call, cond)
    adapter = recording.original.predict(denoiser, call.noisy, call.timesteps, cond)
    return F.mse_loss(adapter.float(), base.float())


@torch.no_grad()
def heldout_bleed(
    family: Any,
    components: Any,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    train_cfg: TrainConfig,
    seed: int,
    *,
    timesteps: int = 4,
    batch_size: int = 4,
    base_cond: dict[str, torch.Tensor] | None = None,
    base_cache: list[torch.Tensor] | None = None,
) -> float:
    """The bleed score: mean over `latents` `[N, ...]` × `timesteps` fixed draws (those of the
    held-out loss, `evaluate.heldout_draws`) of mean((adapter − base)²), conditioned on `cond`
    (N rows: the trigger-less captions' embeddings + image conditioning); the base prediction on
    `base_cond` instead where given (the captions embedded without a text-encoder LoRA). Same
    device, dtype, eval mode and RNG isolation as `evaluate.heldout_loss`. `base_cache`: a list
    the base predictions are kept in (CPU) by the first call and read from by later ones with
    the same arguments — they depend on nothing the training changes — so a run pays the base
    model's forwards once."""
    from lorakit.evaluate import _preserved_rng, _weights_of, heldout_draws

    rep, noise, steps = heldout_draws(family, components, latents, train_cfg, seed, timesteps)
    device, dtype = _weights_of(denoiser)
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16)
        else contextlib.nullcontext()
    )
    flags = [(m, m.training) for m in denoiser.modules()]
    total, count = 0.0, 0
    cached = base_cache if base_cache is not None else []
    fill = not cached
    try:
        denoiser.eval()
        with _preserved_rng(), autocast:
            for chunk, start in enumerate(range(0, rep.shape[0], batch_size)):
                sl = slice(start, start + batch_size)
                idx = torch.arange(rep.shape[0])[sl] // timesteps
                lat = rep[sl].to(device, dtype)
                c = {k: v[idx].to(device, dtype) for k, v in cond.items()}
                rec = Recording(family)
                rec.family.loss(components, denoiser, lat, c, noise[sl], steps[sl], train_cfg)
                call = rec.only_call()
                if fill:
                    swap = {k: v[idx].to(device, dtype) for k, v in (base_cond or {}).items()}
                    base = base_prediction(family, denoiser, call, {**call.cond, **swap})
                    cached.append(base.to("cpu"))
                base = cached[chunk].to(call.output.device)
                diff = F.mse_loss(call.output.float(), base.float())
                total += float(diff) * lat.shape[0]
                count += lat.shape[0]
    finally:
        for m, flag in flags:
            m.training = flag
    return total / count
