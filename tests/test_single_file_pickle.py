"""No unpickling without consent (issue #16, item 16): a FLUX/SD3 single file whose
`model.single_file_config` folder holds a text encoder only as pickled `.bin` weights was
unpickled without `model.allow_pickle` (`from_pretrained` without `use_safetensors`)."""

from __future__ import annotations

import pytest
import torch
from conftest import cli
from safetensors.torch import save_file

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.models import FAMILIES, load_model


def test_pickled_text_encoder_in_the_config_folder_needs_consent(tmp_path):
    folder = tmp_path / "diffusers"
    cli("tiny-model", "flux", folder)
    fam = FAMILIES["flux"]
    comps = fam.build_tiny(seed=0)
    # the text encoder only as a pickle, as old hub repos ship it
    te = folder / "text_encoder"
    for f in te.glob("*.safetensors"):
        f.unlink()
    torch.save(comps.text_encoder.state_dict(), te / "pytorch_model.bin")
    assert list(te.glob("*.bin")) and not list(te.glob("*.safetensors"))
    path = tmp_path / "tiny-flux.safetensors"
    state = fam.to_single_file(comps)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    with pytest.raises(LorakitError, match=r"--allow-pickle") as e:
        load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
    assert "text_encoder" in str(e.value) and "consent" in str(e.value)
    _, loaded = load_model(
        ModelConfig(name=str(path), single_file_config=str(folder), allow_pickle=True)
    )
    assert loaded.text_encoder is not None
