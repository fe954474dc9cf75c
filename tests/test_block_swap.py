"""`train.block_swap` (lorakit/blockswap.py): streamed blocks give bitwise the gradients of an
unswapped run (also on an fp8-stored base: the unswapped fp8 model's), LoRA state never moves,
frozen weights only go host→device, bad input is refused.

On the CPU the CUDA code path runs with `HostStream` standing in for the side stream: its copies
happen only when the compute side waits for their event, so a missing wait reads a stale slot."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit import blockswap
from lorakit.blockswap import BlockSwap, enable_block_swap
from lorakit.config import LoraConfigSection
from lorakit.errors import ConfigError
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES

# (family, N, slots), N > slots: blocks are evicted and streamed again in every forward and
# backward pass. FLUX here: the tiny model with 4 single blocks (1 double + 4 single); tiny SD3
# has 2 blocks. With 3 slots a block may come back into another slot in backward than it had in
# forward, which is what the saved-tensor hooks are for (2 slots alternate, and hide that).
CASES = [("flux", 4, 2), ("flux", 4, 3), ("sd3", 2, 1)]


def _tiny(family: str):
    """(family, components, denoiser) of the tiny model, without LoRA."""
    fam = FAMILIES[family]
    comps = fam.build_tiny(0)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from lorakit.models.flux import TINY_FLUX_TRANSFORMER

        torch.manual_seed(0)
        config = dict(TINY_FLUX_TRANSFORMER, num_single_layers=4)
        comps.transformer = FluxTransformer2DModel(**config).requires_grad_(False)
    return fam, comps, getattr(comps, fam.denoiser_name)


def _model(family: str, quantize: str = ""):
    fam, comps, den = _tiny(family)
    if quantize == "fp8":  # as `train._load_model` does it: before the LoRA, in host memory
        from lorakit.models.quantize import enable_fp8_storage

        enable_fp8_storage(den, torch.float32)
    elif quantize:
        _quantize(den, quantize)
    targets = list(fam.default_targets)
    params = inject_lora(den, LoraConfigSection(rank=4, alpha=4.0, target_modules=targets), 0)
    for p in params:  # lora_B starts at zero: give every LoRA weight a gradient
        torch.nn.init.normal_(p, std=0.1)
    return fam, comps, den, params


def _train(family, n=0, slots=2, checkpointing=True, steps=2, quantize="", swap_hook=None,
           between=None):  # fmt: skip
    """Losses, gradients per step and the final LoRA weights of `steps` AdamW steps (the second
    step runs on updated LoRA weights and the slots the first step left);
    `between(swap)` runs after each forward pass, before its backward."""
    fam, comps, den, params = _model(family, quantize)
    swap = enable_block_swap(den, fam, n, "cpu", slots=slots) if n else None
    if swap_hook:
        swap_hook(swap)
    if checkpointing == "offload":  # train.offload_activations (its CUDA path, forced)
        from lorakit.offload import OffloadedCheckpoint

        den.enable_gradient_checkpointing(gradient_checkpointing_func=OffloadedCheckpoint())
    elif checkpointing:
        den.enable_gradient_checkpointing()
    den.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    cond = fam.encode_prompts(comps, ["tdwl cup", "a dog"])
    losses, grads = [], []
    for _ in range(steps):
        lat = torch.randn(2, 16, 8, 8, generator=g)
        noise, t = torch.randn(lat.shape, generator=g), torch.rand(2, generator=g)
        noisy = (1 - t.view(-1, 1, 1, 1)) * lat + t.view(-1, 1, 1, 1) * noise
        pred = fam.predict(den, noisy, t, cond).float()
        loss = torch.nn.functional.mse_loss(pred, noise - lat)
        if between:
            between(swap)
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params], swap


def _same(a, b) -> bool:
    la, ga, pa = a[:3]
    lb, gb, pb = b[:3]
    return (
        all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))
        and all(
            torch.equal(x, y)
            for s, t in zip(ga, gb, strict=True)
            for x, y in zip(s, t, strict=True)
        )
        and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    )


_BASE: dict = {}


def _baseline(family, checkpointing, quantize=""):
    key = (family, checkpointing, quantize)
    if key not in _BASE:
        _BASE[key] = _train(family, checkpointing=checkpointing, quantize=quantize)
    return _BASE[key]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize(("family", "n", "slots"), CASES)
def test_swapped_gradients_losses_and_weights_are_bitwise_unswapped(
    family, n, slots, checkpointing
):
    base = _baseline(family, checkpointing)
    swapped = _train(family, n, slots, checkpointing)
    assert _same(base, swapped)
    assert any(g.abs().sum() > 0 for g in base[1][0])
    swap = swapped[3]
    # every pass streams the blocks that are not already in a slot: N - slots per pass after
    # the first `slots` copies (forward and backward of each step)
    assert swap.h2d_copies == slots + 2 * 2 * (n - slots)  # 2 steps
    assert swap.bound is None  # nothing left pointing at a slot after backward


def test_with_offloaded_activations_too():
    """`train.offload_activations` holds each block's inputs in host memory while its weights
    stream: still bitwise the plain checkpointed run (which the offload itself equals)."""
    assert _same(_baseline("flux", True), _train("flux", 4, 2, "offload"))


def _expect_mismatch(family, n, slots, checkpointing, hook):
    base = _baseline(family, checkpointing)
    try:
        broken = _train(family, n, slots, checkpointing, swap_hook=hook)
    except RuntimeError:  # also a detection: a shape/placement error instead of wrong numbers
        return
    assert not _same(base, broken)


def test_the_comparison_catches_a_block_used_before_its_copy_arrives(monkeypatch):
    """Late streaming: bind without waiting for the copy event → the slot still holds the
    previous block's weights (HostStream runs a copy only when it is waited for)."""
    monkeypatch.setattr(blockswap._HostStreams, "wait", lambda self, event: None)
    _expect_mismatch("flux", 4, 2, True, None)


def test_the_comparison_catches_a_stale_slot():
    """A prefetch that forgets to copy: the slot keeps another block's weights."""

    def hook(swap: BlockSwap):
        orig = swap.streams.copy
        calls = []

        def copy(dst, src, after):
            calls.append(1)
            if len(calls) == 4:  # one block in one backward pass: the slot is not refreshed
                return swap.streams.side.record_event()
            return orig(dst, src, after)

        swap.streams.copy = copy

    _expect_mismatch("flux", 4, 2, True, hook)


def _other_slots(swap: BlockSwap):
    """Forget what the slots hold and fill them from the other end: in backward every block is
    streamed again, into another slot than it had in forward. (The default policy puts a block
    back where it was whenever the ring is full, which would hide a saved weight that still
    points at its forward slot.)"""
    swap.in_slot[:] = [None] * len(swap.ring)
    swap._victim = lambda free: max(free)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradients_do_not_depend_on_which_slot_a_block_lands_in(checkpointing):
    base = _baseline("flux", checkpointing)
    assert _same(base, _train("flux", 4, 3, checkpointing, between=_other_slots))


def test_the_comparison_catches_saved_weights_without_the_saved_tensor_hooks():
    """Without checkpointing, autograd's saved weights (views such as `weight.t()`) must be
    re-read from the block's CURRENT slot in backward; kept as they were saved, they read
    whatever block took that slot since."""

    def hook(swap: BlockSwap):
        swap._pack = lambda t: t
        swap._unpack = lambda t: t

    base = _baseline("flux", False)
    assert not _same(base, _train("flux", 4, 3, False, swap_hook=hook, between=_other_slots))


# --- fp8 storage (model.quantize = 'fp8') --------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_CASES = [("flux", 4, 2), ("z-image", 4, 3)]  # z-image: noise/context refiners + 2 layers


def _fp8_entries(swap: BlockSwap):
    """The host-buffer entries of the swapped blocks' layers that fp8 storage holds (chosen by
    name over the whole denoiser, as `enable_fp8_storage` picks them)."""
    from lorakit.models.quantize import fp8_layers

    layers = {id(m) for m in fp8_layers(swap.denoiser)}
    return [e for b in swap.blocks for e in b.entries if id(e.owner) in layers]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize(("family", "n", "slots"), FP8_CASES)
def test_fp8_swapped_gradients_are_bitwise_the_unswapped_fp8_model(family, n, slots, checkpointing):
    """fp8 storage + block swap: bitwise the fp8 model without streaming, and the swapped
    layers' weights are float8 in the host buffer (1 byte per element: half of bf16)."""
    base = _baseline(family, checkpointing, "fp8")
    swapped = _train(family, n, slots, checkpointing, quantize="fp8")
    assert _same(base, swapped)
    assert any(g.abs().sum() > 0 for g in base[1][0])
    swap = swapped[3]
    assert swap.h2d_copies == slots + 2 * 2 * (n - slots)
    assert swap.bound is None and not swap._casts
    fp8 = _fp8_entries(swap)
    assert fp8 and all(e.dtype == FP8 for e in fp8)
    for b in swap.blocks:
        for e in b.entries:
            if e.dtype == FP8:  # the bytes in the host buffer ARE the fp8 codes
                view = blockswap._view(b.host, e.offset, e.dtype, e.shape)
                assert view.nbytes == view.numel()
    # the same blocks unquantized (fp32 here) lay out the same tensors: the fp8 layers take a
    # quarter of their bytes, every other tensor the same
    fam, _, ref = _tiny(family)
    plain = sum(blockswap.block_bytes(m) for _, m in blockswap.swapped_blocks(ref, fam, n))
    pad = blockswap.padded
    saved = sum(pad(4 * math.prod(e.shape)) - pad(math.prod(e.shape)) for e in fp8)
    assert saved > 0 and swap.host_bytes == plain - saved


def test_fp8_swapped_layers_compute_from_their_slot_and_keep_no_copy():
    """The bug fp8 + block swap had with diffusers' own layerwise-casting hook: after each call
    it gives the layer a NEW fp8 Parameter (a device copy outside the slot), and without
    gradient checkpointing autograd keeps every swapped layer's compute-dtype copy until
    backward (all the streamed weights on the device again, at compute precision). Here: after
    each swapped fp8 layer runs its weight is still the slot view, no compute copy of a swapped
    weight outlives the forward, and no fp8 copy is made; gradients bitwise as unswapped even
    when backward re-casts from another slot than forward used."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    fam, comps, den, _ = _model("flux", "fp8")
    swap = enable_block_swap(den, fam, 4, "cpu", slots=3)
    fp8 = _fp8_entries(swap)
    in_slot = []

    def after(module, args, output):
        ptr = module.weight.untyped_storage().data_ptr()
        in_slot.append(module.weight.dtype == FP8 and ptr in swap._slot_ptrs)

    handles = [m.register_forward_hook(after) for m in {id(e.owner): e.owner for e in fp8}.values()]
    alive: set[int] = set()
    stored = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and swap.bound is not None:
                if args[0].dtype == FP8 and out.dtype != FP8:  # a swapped weight's cast
                    key = id(out.untyped_storage())
                    alive.add(key)
                    weakref.finalize(out.untyped_storage(), alive.discard, key)
                elif out.dtype == FP8:
                    stored.append(out.shape)
            return out

    den.train()
    cond = fam.encode_prompts(comps, ["tdwl cup", "a dog"])
    lat = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with Casts():
        loss = fam.predict(den, lat, torch.full((2,), 0.5), cond).float().square().mean()
    left = in_slot.count(False)
    assert (left, len(stored), len(alive)) == (0, 0, 0), (
        f"{left} of {len(in_slot)} swapped fp8 layer calls left the layer's weight outside its "
        f"slot; {len(stored)} fp8 copies of swapped weights were made; {len(alive)} "
        "compute-dtype copies of swapped weights are kept for backward"
    )
    assert len(in_slot) == len({id(e.owner) for e in fp8}) > 0  # each layer ran once
    loss.backward()
    for h in handles:
        h.remove()
    base = _baseline("flux", False, "fp8")
    assert _same(base, _train("flux", 4, 3, False, quantize="fp8", between=_other_slots))


def test_planner_counts_fp8_streamed_blocks_as_the_host_buffer_holds_them():
    """`planner.blocks_bytes` (what `swap_bytes` / `_block_bytes` compute on the real model) on
    the tiny denoisers against the real fp8 host buffer and ring slot: within 10 % (the tiny
    tensors' 256-byte padding is the difference), and fp8 counts below the plain bytes."""
    from lorakit import planner

    for family, n, slots in FP8_CASES:
        fam, _, den, _ = _model(family, "fp8")
        swap = enable_block_swap(den, fam, n, "cpu", slots=slots)
        _, _, plain = _tiny(family)  # as the planner's real model: no LoRA
        rows = planner.blocks_bytes(plain, family, 4, "fp8")[-n:]
        host, slot = sum(h for h, _ in rows), max(s for _, s in rows)
        assert abs(host - swap.host_bytes) <= 0.1 * swap.host_bytes, (family, host, swap)
        assert abs(slot - swap.slot_bytes) <= 0.1 * swap.slot_bytes, (family, slot)
        none = planner.blocks_bytes(plain, family, 4, "none")[-n:]
        assert sum(h for h, _ in none) > 2 * host


def test_cli_run_with_fp8_and_block_swap_writes_the_identical_adapter(tmp_path, monkeypatch):
    """`--set model.quantize='fp8' --set train.block_swap=2`: the adapter and the preview grids
    of the run without block swap, and the run's host buffer holds the fp8 layers as fp8 (the
    placement step does not upcast the fp8-stored denoiser before streaming)."""
    common = ("train", SAMPLES, *FAST, "--model", "tiny:flux", "--steps", 2,
              "--set", "train.batch_size=1", "--set", "model.t5_max_length=16",
              "--set", "model.quantize='fp8'",
              "--set", "sample.every=2", "--set", "sample.seeds=[0]")  # fmt: skip
    cli(*common, "--out", tmp_path / "plain")
    swaps = []
    enable = blockswap.enable_block_swap

    def keep(*args, **kwargs):
        swaps.append(enable(*args, **kwargs))
        return swaps[-1]

    monkeypatch.setattr(blockswap, "enable_block_swap", keep)
    out = cli(*common, "--out", tmp_path / "swap", "--set", "train.block_swap=2").output
    assert "block swap: the frozen weights of the last 2 transformer blocks" in out
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "lorakit.safetensors")
    b = load_file(tmp_path / "swap" / "lorakit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (swap,) = swaps
    fp8 = _fp8_entries(swap)
    assert fp8 and all(e.dtype == FP8 for e in fp8), "the run streams fp8 layers upcast"
    for grid in ("step-000000.png", "step-000002.png"):  # previews run the streamed blocks too
        plain = (tmp_path / "plain" / "samples" / grid).read_bytes()
        assert plain == (tmp_path / "swap" / "samples" / grid).read_bytes()


def test_lora_state_stays_put_and_weights_only_go_host_to_device():
    from torch.utils._python_dispatch import TorchDispatchMode

    fam, comps, den, params = _model("flux")
    ptrs = [p.data_ptr() for p in params]
    swap = enable_block_swap(den, fam, 4, "cpu")
    entries = {id(e.get()) for b in swap.blocks for e in b.entries}
    assert not any(id(p) in entries for p in params), "a LoRA weight is streamed"
    assert [p.data_ptr() for p in params] == ptrs, "LoRA weights were moved"
    host = {b.host.untyped_storage().data_ptr() for b in swap.blocks}
    ring = {r.untyped_storage().data_ptr() for r in swap.ring}

    class Copies(TorchDispatchMode):
        h2d = d2h = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                dst, src = args[0].untyped_storage().data_ptr(), args[1].untyped_storage()
                if dst in host:
                    Copies.d2h += 1
                if dst in ring and src.data_ptr() in host:
                    Copies.h2d += 1
            return func(*args, **(kwargs or {}))

    den.enable_gradient_checkpointing()
    den.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    cond = fam.encode_prompts(comps, ["tdwl cup"])
    before = swap.h2d_copies
    with Copies():
        for _ in range(2):
            lat = torch.randn(1, 16, 8, 8)
            fam.predict(den, lat, torch.rand(1), cond).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert Copies.d2h == 0, "a frozen weight was copied back into host memory"
    assert Copies.h2d == swap.h2d_copies - before > 0
    assert [p.data_ptr() for p in params] == ptrs, "LoRA weights were moved"
    state = [t for s in opt.state.values() for t in s.values() if t.dim()]
    assert state and not {t.untyped_storage().data_ptr() for t in state} & (host | ring)
    # between uses a streamed tensor is an empty placeholder: nothing of it stays on the device
    assert all(e.get().numel() == 0 for b in swap.blocks for e in b.entries)


def _quantize(module: torch.nn.Module, mode: str) -> None:
    """Every Linear of `module` as a bitsandbytes NF4 (double-quantized) or LLM.int8 layer,
    quantized on the CPU, as diffusers' bitsandbytes quantizer swaps them on CUDA."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, child in list(module.named_children()):
        if type(child) is not torch.nn.Linear:
            _quantize(child, mode)
            continue
        args = (child.in_features, child.out_features, child.bias is not None)
        w = child.weight.data.clone()
        if mode == "nf4":
            q = bnb.nn.Linear4bit(*args, compute_dtype=torch.float32, quant_type="nf4")
            w = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
        else:
            q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
            w = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        q.weight = w._quantize("cpu")
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(module, name, q)


@pytest.mark.parametrize(
    ("mode", "state"), [("nf4", {"absmax", "code"}), ("int8", {"CB", "SCB"})]
)  # fmt: skip
def test_quantized_base_streams_its_codes_and_quant_state_bitwise(mode, state):
    """bitsandbytes layers on the CPU (the same Python paths as on CUDA; peft wraps them with
    its generic LoRA layer here, its bitsandbytes one on CUDA)."""
    try:
        base = _train("flux", steps=2, quantize=mode, checkpointing=False)
    except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes without CPU kernels
        pytest.skip(f"bitsandbytes {mode} does not run on this CPU: {e}")
    swapped = _train("flux", 4, 3, steps=2, quantize=mode, checkpointing=False)
    assert _same(base, swapped)
    names = {e.name for b in swapped[3].blocks for e in b.entries if e.kind == "attr"}
    assert state <= names


def test_cli_run_with_block_swap_writes_the_identical_adapter(tmp_path):
    common = ("train", SAMPLES, *FAST, "--model", "tiny:flux", "--steps", 2,
              "--set", "train.batch_size=1", "--set", "model.t5_max_length=16",
              "--set", "sample.every=2", "--set", "sample.seeds=[0]")  # fmt: skip
    cli(*common, "--out", tmp_path / "plain")
    out = cli(*common, "--out", tmp_path / "swap", "--set", "train.block_swap=3").output
    assert "block swap: the frozen weights of the last 3 transformer blocks" in out
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "lorakit.safetensors")
    b = load_file(tmp_path / "swap" / "lorakit.safetensors")  # its metadata names the config
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_unet_single_blocks_") for k in a)
    for grid in ("step-000000.png", "step-000002.png"):  # previews run the streamed blocks too
        plain = (tmp_path / "plain" / "samples" / grid).read_bytes()
        assert plain == (tmp_path / "swap" / "samples" / grid).read_bytes()


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["train.block_swap=-1"], "must be 0 \\(off\\) or more"),
        (["train.block_swap=2", "train.compile=true"], "train.compile = false"),
    ],
)
def test_bad_block_swap_config_is_one_paragraph(sets, match):
    from lorakit.config import resolve

    with pytest.raises(ConfigError, match=match):
        resolve(preset="tiny-cpu", sets=sets)


@pytest.mark.parametrize("preset", ["tiny-cpu", "z-image-16gb", "flux2-klein-24gb"])
def test_fp8_presets_take_block_swap(preset):
    from lorakit.config import resolve

    c = resolve(preset=preset, sets=["model.quantize='fp8'", "train.block_swap=2"])
    assert c.model.quantize == "fp8" and c.train.block_swap == 2


def test_unet_family_and_too_many_blocks_are_refused():
    from lorakit.config import resolve
    from lorakit.spec import build_spec

    c = resolve(preset="tiny-cpu", sets=["train.block_swap=2"])
    with pytest.raises(ConfigError, match="'sd15' family has no repeated transformer blocks"):
        build_spec(c, FAMILIES["sd15"])
    fam, _, den, _ = _model("sd3")
    with pytest.raises(ConfigError, match=r"has only 2 transformer blocks.*at most 2"):
        enable_block_swap(den, fam, 3, "cpu")


def test_cli_refuses_more_blocks_than_the_model_has(tmp_path):
    res = cli("train", SAMPLES, *FAST, "--model", "tiny:sd3", "--steps", 1, "--out", tmp_path,
              "--set", "train.block_swap=3", expect=None)  # fmt: skip
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "train.block_swap' is 3, but this model has only 2 transformer blocks" in res.output


def test_planner_counts_the_streamed_blocks_as_the_storage_meter_measures_them():
    """The planner's step model with `block_swap` (frozen bytes of the last N blocks replaced
    by the ring) against a MEASURED CPU step of the swapped model (`planner.StorageMeter`; the
    host buffers are not device memory, the ring is)."""
    import importlib.util
    from pathlib import Path

    from lorakit import planner

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "planner_cpu.py"
    spec = importlib.util.spec_from_file_location("planner_cpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    family, config, side = bench.MODELS["flux mid"]  # 2 double + 4 single blocks

    def measured(n):
        den = bench.build(family, config, "cpu")
        swap = enable_block_swap(den, FAMILIES[family], n, "cpu") if n else None
        peak, _ = planner.measure_step(den, family, *bench.batch(family, config, side, "cpu"), True)
        return peak, swap

    def predicted(n):
        den = bench.build(family, config, "meta")
        batch = bench.batch(family, config, side, "meta")
        return planner.step_rows(den, family, *batch, True, block_swap=n)

    plain, _ = measured(0)
    peak, swap = measured(4)
    rows = predicted(4)
    assert rows["block swap ring"] == swap.device_bytes  # the ring as allocated
    saved = sum(predicted(0).values()) - sum(rows.values())
    assert saved > 0 and abs((plain - peak) - saved) <= 0.02 * saved, (plain - peak, saved)
    assert abs(sum(rows.values()) - peak) < 0.15 * peak


def test_planner_swap_bytes_for_the_real_flux():
    """The last N blocks of FLUX.1-dev's 19 double + 38 single: single blocks first."""
    from lorakit import planner

    den = planner.build_denoiser("flux")
    single = den.single_transformer_blocks[0]
    one = planner.weight_bytes(single, 2)  # bf16
    host, slot, slots = planner.swap_bytes("flux", 20, 2)
    assert host == 20 * one and slots == 2
    assert one <= slot < one + 512 * sum(1 for _ in single.parameters())  # padding only
    double = planner.weight_bytes(den.transformer_blocks[0], 2)
    assert planner.swap_bytes("flux", 39, 2)[1] >= double > slot  # a double block: larger slots
    with pytest.raises(ConfigError, match="only 57 transformer blocks"):
        planner.swap_bytes("flux", 58, 2)


@pytest.mark.slow  # ~30 s: real FLUX traces
def test_plan_proposes_the_smallest_block_swap_that_fits():
    from lorakit import config as cfg
    from lorakit import planner

    c = cfg.resolve(preset="flux-24gb", sets=["train.offload_activations=true"])
    sets, fitted = planner.propose(c, 16.0)
    swap = [s for s in sets if s.startswith("train.block_swap=")]
    assert swap, sets
    n = int(swap[0].split("=")[1])
    other = [s for s in sets if not s.startswith("train.block_swap=")]
    assert fitted.fits(16.0) and fitted.host
    base = ["train.offload_activations=true", *other]
    one_less = cfg.resolve(preset="flux-24gb", sets=[*base, f"train.block_swap={n - 1}"])
    assert not planner.plan(one_less).fits(16.0)
    table = planner.table(fitted, 16.0)
    assert f"host memory, {n} streamed blocks" in table and "block swap ring" in table
