"""A family of two stacks of blocks (issue 19): a made-up family, registered here only, runs Wan's blocks and then
Wan blocks without cross-attention under names of their own (as Flux runs its single-stream blocks after its
double-stream ones). It is detected, read with its blocks per stack, mapped with each student block taking a teacher
block of its own stack, exported under its own names, run streamed with each stack's block class, ranked by its
activation statistics and fitted, without editing any other module."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_family import NO_CROSS, NoCrossBlock
from test_family import RUNNABLE as NO_CROSS_RUNNABLE
from torch import nn

from inspector.cards import model_card
from projection import ProjectionError, Projector
from projection.arch.anatomy import WAN_SHAPES, WAN_TENSORS, native_name, template_of
from projection.arch.config import ModelConfig
from projection.arch.family import Family, Stack, register, unregister
from projection.arch.wan import RUNNABLE, Block, WanLite, rope_bands, wan_state_dict
from projection.core.mapping import stack_ranges, top_blocks
from projection.core.models import open_teacher, view_checkpoint
from projection.core.plan import keep_top
from projection.core.strategy import Strategy
from projection.engine.export import export_student
from projection.function.calibration import synthetic_calibration
from projection.function.fit import fit_student
from projection.function.forward import StreamedTeacher
from projection.io.checkpoint import open_checkpoint

BLOCK = "blocks.{i}."
T2V = {t: axes for t, axes in WAN_TENSORS.items() if "img" not in t}
DOUBLE = {t.rpartition(".")[0]: "double_" + t.rpartition(".")[0] for t in T2V if t.startswith(BLOCK)}
SINGLE = {**{f"self_attn.{p}": f"attn.to_{p}" for p in ("q", "k", "v")}, "self_attn.o": "attn.to_out",
          "self_attn.norm_q": "attn.norm_q", "self_attn.norm_k": "attn.norm_k", "ffn.0": "mlp.up", "ffn.2": "mlp.down"}
SINGLES = Stack("single_blocks", {t.removeprefix(BLOCK): axes for t, axes in NO_CROSS.items() if t.startswith(BLOCK)},
                SINGLE, NO_CROSS_RUNNABLE)
FAMILY = Family("test-two-stacks", "Wan blocks, then Wan blocks without cross-attention (a test's family)",
                "double_blocks.{i}.self_attn.q.weight", DOUBLE, tensors=T2V, shapes=WAN_SHAPES, rope_bands=rope_bands,
                runnable=RUNNABLE, stacks=(SINGLES,))
SIZES = dict(in_dim=4, out_dim=4, text_dim=24, freq_dim=16)
TEACHER = dict(dim=64, num_heads=2, ffn_dim=48, **SIZES)


@pytest.fixture
def family():
    register(FAMILY)
    yield FAMILY
    unregister(FAMILY.name)


def model(config: dict, stacks: tuple[int, int], seed: int = 0) -> WanLite:
    """The family's model in memory: WanLite's embeddings and head around `stacks[0]` Wan blocks, then `stacks[1]`
    blocks without cross-attention."""
    torch.manual_seed(seed)  # tests own the process's generator; library code never touches it
    wan = WanLite(**config, num_layers=sum(stacks))
    sizes = (config["dim"], config["ffn_dim"], config["num_heads"])
    wan.blocks = nn.ModuleList([*(Block(*sizes) for _ in range(stacks[0])),
                                *(NoCrossBlock(*sizes) for _ in range(stacks[1]))])
    return wan.eval()


def own_name(canonical: str, first: int) -> str:
    """The family's name for a canonical key, written out here by hand (the test's reference)."""
    template, block = template_of(canonical)
    if block is None:
        return canonical
    if block < first:
        return canonical.replace("blocks.", "double_blocks.", 1)
    module, _, param = template.removeprefix(BLOCK).rpartition(".")
    return f"single_blocks.{block - first}.{SINGLE.get(module, module)}.{param}" if module else \
        f"single_blocks.{block - first}.{param}"


def write(folder, wan: WanLite, first: int) -> dict[str, str]:
    """The model as a checkpoint of the family; returns canonical -> its names."""
    state = wan_state_dict(wan)
    names = {k: own_name(k, first) for k in state}
    folder.mkdir()
    save_file({names[k]: v for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_heads": wan.num_heads}))
    return names


def test_a_two_stack_checkpoint_is_read_with_its_blocks_per_stack(family, tmp_path):
    names = write(tmp_path / "teacher", model(TEACHER, (3, 2)), 3)
    view = view_checkpoint(open_checkpoint(str(tmp_path / "teacher")))
    assert view.family == "test-two-stacks"
    assert (view.config.num_layers, view.config.stack_layers) == (5, (3, 2))
    assert view.native == names  # the second stack's blocks continue the canonical sequence: single_blocks.0 is 3
    assert view.native["blocks.3.self_attn.q.weight"] == "single_blocks.0.attn.to_q.weight"
    assert all(native_name(c, FAMILY.name, (3, 2)) == n for c, n in names.items())  # and back
    assert view.config.to_dict()["stack_layers"] == [3, 2]  # written out as a list (JSON, YAML)
    assert FAMILY.stack_of(2, view.config) == 0 and FAMILY.stack_of(3, view.config) == 1
    assert "5 blocks (3 + 2 in stacks)" in model_card("teacher", view.summary())  # the app's card says so


def test_each_student_block_takes_a_teacher_block_of_its_own_stack(family, tmp_path):
    write(tmp_path / "teacher", model(TEACHER, (3, 2)), 3)
    names = write(tmp_path / "student", model(TEACHER, (2, 1), seed=1), 2)
    p = Projector.open(str(tmp_path / "teacher"), str(tmp_path / "student"))
    for rule, layers in (("first", [0, 1, 3]), ("uniform", [0, 2, 3]), ("last", [1, 2, 4]), ([2, 0, 4], [2, 0, 4])):
        assert p.mapping(Strategy(layers=rule)).layers == layers, rule
    keys = p.mapping().coverage()["keys"]
    assert keys["transferred"] == keys["total"] == len(names)  # every key has its source in the same stack
    with pytest.raises(ProjectionError, match=r"^layers: student block 1 is in stack 0, whose teacher blocks are "
                                              r"0\.\.2, but takes teacher block 3$"):
        p.mapping(Strategy(layers=[0, 3, 4]))

    export_student(p, tmp_path / "out", strategy=Strategy(layers="last"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    teacher = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    assert set(exported) == set(names.values())  # under the family's own names
    assert torch.equal(exported["double_blocks.1.cross_attn.q.weight"], teacher["double_blocks.2.cross_attn.q.weight"])
    assert torch.equal(exported["single_blocks.0.attn.to_q.weight"], teacher["single_blocks.1.attn.to_q.weight"])
    again = view_checkpoint(open_checkpoint(str(tmp_path / "out")))  # the export reads back as the family's
    assert (again.family, again.config.stack_layers) == ("test-two-stacks", (2, 1))


def test_stacks_pair_up_and_a_different_count_is_refused():
    assert stack_ranges((3, 2), (2, 1)) == [(range(0, 3), range(0, 2)), (range(3, 5), range(2, 3))]
    assert stack_ranges((3, 2), (4,)) == [(range(0, 5), range(0, 4))]  # a one-stack student reads them as one
    assert top_blocks([1, 5, 3, 2, 9], (3, 2), (2, 1)) == [1, 2, 4]  # the best of each stack, in order
    assert top_blocks([1, 1, 1, 1, 1], (3, 2), (2, 1)) == [0, 1, 3]  # ties: the earlier block
    with pytest.raises(ProjectionError, match=r"^the student has 2 stacks of blocks \[1, 1\] and the teacher 3 "):
        stack_ranges((1, 1, 1), (1, 1))


def test_a_config_s_blocks_per_stack_add_up_to_its_blocks():
    assert ModelConfig.from_dict({"num_layers": 5, "stack_layers": [3, 2]}).stack_layers == (3, 2)
    with pytest.raises(ProjectionError, match=r"^config: 'stack_layers' \[3, 1\] adds up to 4 blocks, not num_layers "
                                              r"5$"):
        ModelConfig(num_layers=5, stack_layers=(3, 1))
    with pytest.raises(ProjectionError, match=r"^config: 'stack_layers' must be a list of block counts"):
        ModelConfig.from_dict({"num_layers": 5, "stack_layers": "3,2"})


def test_a_two_stack_teacher_runs_each_stack_s_blocks_streamed(family, tmp_path):
    wan = model(TEACHER, (3, 2))
    write(tmp_path / "teacher", wan, 3)
    teacher = open_teacher(str(tmp_path / "teacher"))
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([100.0, 500.0, 900.0]), torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(StreamedTeacher(teacher)(x, t, ctx), wan(x, t, ctx))

    from dataclasses import replace
    register(replace(FAMILY, stacks=(replace(SINGLES, runnable=None),)))  # a second stack that cannot run here
    with pytest.raises(ProjectionError, match=r"has no runnable block here for block 3 \(stack 1\)$"):
        StreamedTeacher(open_teacher(str(tmp_path / "teacher")))


def test_a_two_stack_projection_is_ranked_by_each_stack_s_statistics_and_fitted(family, tmp_path):
    write(tmp_path / "teacher", model(TEACHER, (3, 2)), 3)
    small = dict(dim=32, num_heads=1, ffn_dim=24, **SIZES)
    names = write(tmp_path / "student", model(small, (2, 1), seed=1), 2)
    strategy = Strategy(width="activation", heads="activation", ffn="activation", layers="influence")
    p = Projector.open(str(tmp_path / "teacher"), str(tmp_path / "student"), strategy=strategy)
    calibration = synthetic_calibration(p.teacher.config, n=4, size=(8, 8), tokens=5)
    found = p.calibrate(calibration, cache=tmp_path / "cache")
    assert {space for space, _ in found.scores} == {"resid", "sa_heads", "sa_vo", "ca_heads", "ca_vo", "ffn",
                                                   "ffn_wanda", "update"}
    assert ("ca_heads", 2) in found.scores and ("ca_heads", 3) not in found.scores  # each stack's own outputs

    layers = p.mapping().layers  # the most influential blocks within each stack
    rank = found.influence.__getitem__
    assert layers == sorted(sorted(range(3), key=rank, reverse=True)[:2]) + [max((3, 4), key=rank)]
    plan = p.plan()
    for b in layers:
        assert torch.equal(plan.indices("ffn", b), keep_top(found.score("ffn", b), small["ffn_dim"]))
    export_student(p, tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(names.values())

    module = model(small, (2, 1))
    module.load_state_dict({**{c: exported[n] for c, n in names.items()},
                            "patch_embedding.weight": exported["patch_embedding.weight"].squeeze(2)})
    report = fit_student(p.plan(), module, calibration, draws=1)  # each block refits its own stack's linears
    assert list(report.layers) == [f"blocks.{i}.{n}" for i in range(2) for n in RUNNABLE.linears] + \
        [f"blocks.2.{n}" for n in NO_CROSS_RUNNABLE.linears]
