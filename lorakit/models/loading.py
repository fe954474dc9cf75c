"""Loading helpers shared by the families: error messages, freezing, temp saves."""

from __future__ import annotations

import contextlib
import contextvars
import tempfile
from collections.abc import Iterator

from lorakit.errors import LorakitError

_LOAD_DTYPE: contextvars.ContextVar = contextvars.ContextVar("load_dtype", default=None)
"""The run's weight dtype while `load_in` is active (None: the libraries' default, fp32)."""


@contextlib.contextmanager
def load_in(weight_dtype) -> Iterator[None]:
    """Families' `load` (folders and hub ids) and single-file reads inside this block build the
    denoiser and text encoders straight in `weight_dtype` (`dtype_kwargs`, `target_dtype`): a
    bf16 run of FLUX.1 holds 24 GB of transformer in RAM while loading, not the 48 GB of an
    fp32 load cast afterwards. `train` wraps `load_model` in it."""
    token = _LOAD_DTYPE.set(weight_dtype)
    try:
        yield
    finally:
        _LOAD_DTYPE.reset(token)


def target_dtype(part: str):
    """The dtype a component loads in (None = the library's default): inside `load_in`, the run's
    weight dtype, except what `spec.frozen_dtype` keeps wider (`vae`: fp32; `t5` under fp16:
    bf16 where supported, else fp32)."""
    import torch

    dtype = _LOAD_DTYPE.get()
    if dtype is None or dtype == torch.float32 or part == "vae":
        return None  # fp32 is the libraries' own default: their loading path, unchanged
    if part == "t5":
        from lorakit.spec import frozen_dtype_of

        return frozen_dtype_of("text_encoder", "T5EncoderModel", dtype)
    return dtype


def dtype_kwargs(part: str, library: str = "diffusers") -> dict:
    """`from_pretrained` keyword for `target_dtype(part)`: `torch_dtype` (diffusers) or `dtype`
    (transformers 5); {} outside `load_in`."""
    dtype = target_dtype(part)
    if dtype is None:
        return {}
    return {"torch_dtype" if library == "diffusers" else "dtype": dtype}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message without its final period (or its type)."""
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__


def load_error(family: str, name: str, e: BaseException, allow_pickle: bool, parts: str):
    """The LorakitError for a failed `from_pretrained` of `name`: the library's first line, a
    hint when only pickled weights exist, and what a model folder must hold (`parts`)."""
    text = str(e).strip().splitlines()
    first = text[0].rstrip(".") if text else type(e).__name__
    hint = (
        " The folder or repo has only pickled weights (.bin/.ckpt): convert them to safetensors, "
        "or allow unpickling with --allow-pickle if you trust the source."
        if "safetensors" in first.lower() and not allow_pickle
        else ""
    )
    return LorakitError(
        f"Could not load the {family} model '{name}': {first}.{hint} model.name must be a "
        f"diffusers folder (with model_index.json, {parts}) or a hub id you can reach."
    )


def hub_kwargs(revision: str, variant: str, allow_pickle: bool) -> tuple[dict, dict]:
    """`from_pretrained` keyword arguments of a family's `load`: (for every part: the revision;
    for weights besides: the variant, and safetensors only unless the user consented to
    unpickling with `model.allow_pickle`)."""
    common: dict = {"revision": revision or None}
    weights = dict(common, variant=variant or None, use_safetensors=None if allow_pickle else True)
    return common, weights


_DEFER: contextvars.ContextVar = contextvars.ContextVar("defer_denoiser", default=False)
"""True inside `deferred()`: `from_pretrained_streamed` returns the model on the meta device."""


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside this block, a denoiser that `from_pretrained_streamed` reads from a local folder
    is built on the meta device and read later, by `materialize`. `train` loads the model in it
    and materializes the denoiser after caching: while the VAE and text encoders encode, the
    denoiser is not in host memory beside them (SD1.5 fp32: 3.2 GiB less at the run's peak).
    Everything `from_pretrained_streamed` would refuse (keys, dtypes) is checked here, from the
    files' headers, so a deferred read cannot fail differently later."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def is_deferred(module) -> bool:
    """Whether `module` waits for `materialize` (its weights are on the meta device)."""
    return getattr(module, "_lorakit_pending", None) is not None


def materialize(module) -> None:
    """Read the weights of a module built inside `deferred()` (no-op for any other module),
    exactly as `from_pretrained_streamed` would have read them at load time."""
    pending = getattr(module, "_lorakit_pending", None)
    if pending is None:
        return
    plan, dtype = pending
    module.load_state_dict(_read_planned(plan, dtype), strict=True, assign=True)
    module._lorakit_pending = None
    module.eval()


def from_pretrained_streamed(cls, name: str, subfolder: str, **kwargs):
    """`cls.from_pretrained(name, subfolder=subfolder, **kwargs)` (a diffusers model) with the
    weights of a local folder read tensor by tensor with plain file reads, each converted to the
    load dtype on its own: diffusers reads the whole file first, so RSS held the file's copy
    beside the model (SD1.5's fp16 UNet loaded as fp32: 5.3 GiB peak for a 3.2 GiB model; read
    this way, 3.7). Hub ids, variants, quantized loads, pickles, and folders whose keys are not
    exactly the model's go through `from_pretrained` itself. Inside `deferred()` the read waits
    for `materialize`."""
    import json
    from pathlib import Path

    import torch

    folder = Path(name).expanduser() / subfolder
    if (
        kwargs.get("variant")
        or kwargs.get("quantization_config") is not None
        or not (folder / "config.json").is_file()
    ):
        return cls.from_pretrained(name, subfolder=subfolder, **kwargs)
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        files = [folder / f for f in sorted(set(shards))]
    else:
        return cls.from_pretrained(name, subfolder=subfolder, **kwargs)
    from accelerate import init_empty_weights

    dtype = kwargs.get("torch_dtype") or torch.float32
    config = cls.load_config(str(folder))
    with init_empty_weights():
        model = cls.from_config(config)
    plan = _plan_streamed(files, set(model.state_dict()))
    if plan is None:  # another layout (old key names, extra tensors): the library converts it
        return cls.from_pretrained(name, subfolder=subfolder, **kwargs)
    model.register_to_config(_name_or_path=str(name))
    model.eval()
    if _DEFER.get():
        model._lorakit_pending = (plan, dtype)
        if dtype != torch.float32:  # the meta tensors say the dtype the weights will have
            model.to(dtype)
        return model
    model.load_state_dict(_read_planned(plan, dtype), strict=True, assign=True)
    return model


def _plan_streamed(files, expected: set[str]):
    """[(file, data start, key, dtype name, shape, begin, end)] of every tensor in safetensors
    `files` (headers only), in file order; None when their keys are not exactly `expected` (or a
    dtype is not a float lorakit reads)."""
    from lorakit.models.fp8_files import WIDE_DTYPES, read_header_at

    plan = []
    for path in files:
        header, _, data = read_header_at(path)
        if not set(header) <= expected:
            return None
        for key, info in header.items():
            stored = WIDE_DTYPES.get(info["dtype"])
            if stored is None:
                return None
            begin, end = info["data_offsets"]
            plan.append((path, data, key, stored, tuple(info["shape"]), begin, end))
    if {row[2] for row in plan} != expected:
        return None
    return sorted(plan, key=lambda r: (str(r[0]), r[5]))  # sequential reads


def _read_planned(plan, dtype) -> dict:
    """{key: tensor in `dtype`} of a `_plan_streamed` plan. A tensor stored in `dtype` is read
    straight into its own memory; one stored in another dtype is read into one staging buffer,
    reused for every tensor, and converted into its own: no allocation of the file's size
    besides the model (fresh pages cost a fault each on first touch)."""
    from itertools import groupby

    import torch

    state: dict = {}
    largest = max((end - begin for *_, begin, end in plan), default=0)
    staging = torch.empty(largest, dtype=torch.uint8)
    for path, rows in groupby(plan, key=lambda r: r[0]):  # the plan is in file order
        with open(path, "rb") as handle:
            for _, data, key, stored, shape, begin, end in rows:
                handle.seek(data + begin)
                n = end - begin
                out = torch.empty(shape, dtype=dtype)
                same = stored == dtype
                raw = out.view(-1).view(torch.uint8) if same else staging[:n]
                if n and handle.readinto(memoryview(raw.numpy())) != n:
                    raise LorakitError(
                        f"{path} ends inside tensor '{key}': the file is truncated (an "
                        "interrupted download or copy). Download or copy it again."
                    )
                if not same:
                    out.copy_(raw.view(stored).view(shape))
                state[key] = out
    return state


def freeze(*modules) -> None:
    """`requires_grad_(False)` + `eval()` on every module given (None skipped)."""
    # Modules built from configs start in train mode; frozen parts must not run dropout.
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()


def save_for_quantization(module) -> str:
    """Write an in-process module to a temp folder so it can be re-loaded quantized."""
    folder = tempfile.mkdtemp(prefix="lorakit-quant-")
    module.save_pretrained(folder, safe_serialization=True)
    return folder


def load_unconfigured(family, cfg, kind: str):
    """`load_configured` of a family without `model.*` loading options: `build_tiny(seed=0)`
    (`tiny`), the single-file reader (`single_file`) or `load` (`local` / `hub`)."""
    if kind == "tiny":
        return family.build_tiny(seed=0)
    if kind == "single_file":
        from lorakit.models.single_file import load_single_file

        return load_single_file(
            family, cfg.name, cfg.single_file_config, allow_pickle=cfg.allow_pickle
        )
    return family.load(
        cfg.name, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle
    )


def load_quantizable(family, cfg, kind: str):
    """`load_configured` of a family whose only loading option is `model.quantize` of its
    denoiser: tiny models and single files are quantized after loading (`quantize_loaded`:
    bitsandbytes modes; fp8 is applied at placement), folders and hub ids while loading
    (`family.load(..., quantize=...)`)."""
    if kind in ("tiny", "single_file"):
        from lorakit.models.quantize import check_file_not_float8, quantize_loaded

        if kind == "single_file":  # before the (possibly 20 GB) file is read
            check_file_not_float8(cfg.name, cfg.quantize)
        comps = load_unconfigured(family, cfg, kind)
        name = family.denoiser_name
        setattr(comps, name, quantize_loaded(getattr(comps, name), cfg.quantize))
        return comps
    return family.load(
        cfg.name,
        revision=cfg.revision,
        variant=cfg.variant,
        allow_pickle=cfg.allow_pickle,
        quantize=cfg.quantize,
    )
