"""`train.stream_encoders` (lorakit/encoder_stream.py): while caching, the text encoders' repeated
layers stream their weights from host memory one at a time. On the CPU the same code path runs
(every layer call makes a real copy of its host weights), so these tests exercise it: the
embeddings and latents are bitwise those of the resident encoders, for every family; a CLI run
writes the identical adapter; captions encoded every step are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit import config as cfg
from lorakit import encoder_stream
from lorakit.encoder_stream import stream_units, streamed
from lorakit.errors import ConfigError
from lorakit.models import FAMILIES

PROMPTS = ["a red cup on a table", "", "tdwl logo, flat"]


def _at_host(units, host) -> bool:
    """Every streamed parameter's storage is its host master's (no device copy held)."""
    return all(p.data_ptr() == host[id(p)].data_ptr() for u in units for p in u.parameters())


def _encoders(fam, comps) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in fam.frozen_modules(comps).items() if n != "vae"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_embeddings_and_latents_are_bitwise_the_resident_ones(family):
    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_text = fam.encode_prompts(comps, PROMPTS)
    ref_lat = fam.encode_images(comps, pixels)

    encoders = _encoders(fam, comps)
    units = [u for m in encoders.values() for u in stream_units(m)]
    assert units, f"{family}: no repeated layers found to stream"
    host = {id(p): p.data for u in units for p in u.parameters()}
    seen_in_forward = []

    def check_bound(module, args):  # runs after the stream's own pre-hook: a fresh copy
        seen_in_forward.append(
            all(p.data.data_ptr() != host[id(p)].data_ptr() for p in module.parameters())
        )

    probes = []
    try:
        with streamed(encoders, "cpu") as stats:
            probes += [u.register_forward_pre_hook(check_bound) for u in units]  # after its own
            # between calls the units hold their host masters, not a device copy
            assert _at_host(units, host)
            text = fam.encode_prompts(comps, PROMPTS)
            assert _at_host(units, host)
            lat = fam.encode_images(comps, pixels)
    finally:
        for h in probes:
            h.remove()
    assert stats.units == len(units) and stats.copies >= len(units)
    assert seen_in_forward and all(seen_in_forward), "a layer ran on its host weights"
    assert text.keys() == ref_text.keys()
    for k in ref_text:
        assert torch.equal(text[k], ref_text[k]), k
    assert torch.equal(lat, ref_lat)
    # after the context: hooks gone, host masters in place, same embeddings again
    copies = stats.copies
    again = fam.encode_prompts(comps, PROMPTS)
    assert stats.copies == copies
    assert _at_host(units, host)
    assert all(torch.equal(again[k], ref_text[k]) for k in ref_text)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.small = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
        self.layers[2].weight = self.small[0].weight  # tied to a resident part: stays resident

    def forward(self, ids):
        x = self.small[0](self.embed(ids))
        for layer in self.layers:
            x = layer(x)
        return x


def test_units_are_the_largest_module_lists_children_and_tied_weights_stay():
    toy = _Toy()
    assert stream_units(toy) == list(toy.layers)
    ids = torch.tensor([[1, 2, 3]])
    ref = toy(ids)
    with streamed({"te": toy}, "cpu") as stats:
        out = toy(ids)
    assert torch.equal(out, ref)
    assert stats.units == 3 and stats.copies == 3 and stats.calls == [0, 1, 2]
    # layer 2: only its bias streams (its weight is the resident small layer's)
    assert stats.unit_bytes == (8 * 8 + 8) * 4
    assert encoder_stream.streamed_bytes(toy, 4) == (3 * (8 * 8 + 8) * 4, (8 * 8 + 8) * 4)


def test_cli_run_with_stream_encoders_writes_the_identical_adapter(tmp_path, monkeypatch):
    common = ("train", SAMPLES, *FAST, "--steps", 2, "--set", "train.batch_size=1",
              "--set", "sample.every=2", "--set", "sample.seeds=[0]")  # fmt: skip
    cli(*common, "--out", tmp_path / "plain")
    streams = []
    real = encoder_stream.streamed

    def keep(*args, **kwargs):
        streams.append(real(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(encoder_stream, "streamed", keep)
    copies = []
    bind = encoder_stream._Unit.bind

    def counted(self, *args):
        copies.append(self.index)
        return bind(self, *args)

    monkeypatch.setattr(encoder_stream._Unit, "bind", counted)
    cli(*common, "--out", tmp_path / "stream", "--set", "train.stream_encoders=true")
    assert len(streams) == 1 and copies, "the run did not stream its text encoder"
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "lorakit.safetensors")
    b = load_file(tmp_path / "stream" / "lorakit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for grid in ("step-000000.png", "step-000002.png"):  # preview prompts encoded while caching
        plain = (tmp_path / "plain" / "samples" / grid).read_bytes()
        assert plain == (tmp_path / "stream" / "samples" / grid).read_bytes()


@pytest.mark.parametrize("key", ["lora.train_text_encoder", "data.shuffle_tags"])
def test_captions_encoded_every_step_are_refused_with_streaming(key):
    with pytest.raises(ConfigError) as e:
        cfg.resolve(preset="tiny-cpu", sets=["train.stream_encoders=true", f"{key}=true"])
    msg = str(e.value)
    assert "train.stream_encoders" in msg and key in msg and "\n" not in msg
    assert "Set train.stream_encoders = false" in msg
    # the spec refuses it too (a config built without `validate`, as the planner's are)
    from dataclasses import replace

    from lorakit.spec import build_spec

    c = cfg.resolve(preset="tiny-cpu", sets=[f"{key}=true"])
    c = replace(c, train=replace(c.train, stream_encoders=True))
    with pytest.raises(ConfigError, match="stream_encoders"):
        build_spec(c, FAMILIES["sd15"])


def test_cli_refusal_is_one_paragraph(tmp_path):
    res = cli("train", SAMPLES, *FAST, "--steps", 1, "--out", tmp_path,
              "--set", "train.stream_encoders=true", "--set", "data.shuffle_tags=true",
              expect=None)  # fmt: skip
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "data.shuffle_tags" in res.output and "train.stream_encoders" in res.output
