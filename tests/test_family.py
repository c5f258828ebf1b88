"""A family is one description: a made-up family, registered here only, is detected, read, mapped and exported
without editing any other module (issue 19). Wan blocks without cross-attention, under names of its own."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from projection import Projector
from projection.arch.anatomy import WAN_TENSORS, wan_tensors
from projection.arch.family import Family, register, unregister
from projection.core.models import view_checkpoint
from projection.engine.export import export_student
from projection.io.checkpoint import open_checkpoint

RENAMES = {"patch_embedding": "stem", "text_embedding.0": "text_in.0", "text_embedding.2": "text_in.2",
           "time_embedding.0": "time_in.0", "time_embedding.2": "time_in.2", "time_projection.1": "time_out",
           "head.head": "out.proj", "head.modulation": "out.modulation",
           "blocks.{i}.modulation": "layers.{i}.modulation", "blocks.{i}.norm3": "layers.{i}.norm",
           "blocks.{i}.ffn.0": "layers.{i}.mlp.up", "blocks.{i}.ffn.2": "layers.{i}.mlp.down",
           **{f"blocks.{{i}}.self_attn.{p}": f"layers.{{i}}.attn.{p}"
              for p in ("q", "k", "v", "o", "norm_q", "norm_k")}}
NO_CROSS = {t: axes for t, axes in WAN_TENSORS.items() if "cross_attn" not in t and "img" not in t}
FAMILY = Family("test-no-cross", "Wan blocks without cross-attention (a test's family)", "layers.{i}.attn.q.weight",
                RENAMES, tensors=NO_CROSS, shapes={"dim": ("patch_embedding.weight", 0),
                                                   "ffn_dim": ("blocks.0.ffn.0.weight", 0)})


@pytest.fixture
def family():
    register(FAMILY)
    yield FAMILY
    unregister(FAMILY.name)


def write_student(folder, config: dict) -> dict[str, str]:
    """A checkpoint of the made-up family; returns canonical -> its names."""
    g = torch.Generator().manual_seed(0)
    names, state = {}, {}
    for key, (shape, _) in wan_tensors(config).items():
        if "cross_attn" in key:
            continue
        module, _, param = key.rpartition(".")
        block = key.split(".")[1] if key.startswith("blocks.") else "{i}"
        generic, bare = (name.replace(f"blocks.{block}.", "blocks.{i}.") for name in (module, key))
        native = f"{RENAMES[generic]}.{param}" if generic in RENAMES else RENAMES.get(bare, bare)  # whole modules
        names[key] = native.replace("{i}", block)
        state[names[key]] = torch.randn(shape, generator=g)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_heads": config["num_heads"]}))
    return names


def test_a_family_registered_by_a_test_is_read_mapped_and_exported(family, tiny_wan, tmp_path):
    names = write_student(tmp_path / "student", tiny_wan.config)
    view = view_checkpoint(open_checkpoint(str(tmp_path / "student")))
    assert (view.family, view.layout) == ("test-no-cross", "test-no-cross")  # its own names: no export layout
    assert view.native == names  # every name read back to Wan's
    assert (view.config.dim, view.config.ffn_dim, view.config.num_heads, view.config.head_dim) == (64, 48, 2, 32)
    assert view.config.out_dim == 4  # the output head's rows over the family's 1 x 2 x 2 patch
    assert view.config.num_layers == tiny_wan.config["num_layers"]

    p = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "student"))
    keys = p.mapping().coverage()["keys"]
    assert keys["transferred"] == keys["total"] == len(names)  # no cross-attention to fill, nothing else missing
    export_student(p, tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(names.values())  # written under the family's own names
    teacher = load_file(str(tiny_wan.original_dir / "diffusion_pytorch_model.safetensors"))
    for canonical, native in names.items():  # same sizes as the teacher: the projection keeps every channel
        assert torch.equal(exported[native], teacher[canonical]), native
