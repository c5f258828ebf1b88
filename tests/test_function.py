"""What the student computes next to the teacher: per-block fidelity, the effect of removing each teacher block,
Wanda-style neuron ranking, bias compensation for dropped blocks, and weight/activation agreement. References are
computed independently with diffusers' WanTransformer3DModel where the measure is exact."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import diffusers_kwargs
from projection import Projector, ProjectionError, Strategy, projected_student
from projection.core.models import open_teacher
from projection.core.plan import Plan, overlap
from projection.engine.export import export_student
from projection.engine.report import student_fidelity
from projection.function import activations as act
from projection.function.calibration import Calibration
from projection.function.fidelity import block_fidelity, velocity_fidelity
from projection.function.fit import fold_targets
from projection.function.forward import StreamedTeacher
from projection.function.noise import noised_set

WIDE = {"layout": "wanlite", "num_layers": 2}  # the teacher's width, fewer blocks


def calibration_for(cfg: dict, n: int = 4, seed: int = 11) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, cfg["in_dim"], 4, 6, generator=g),
                       torch.randn(n, 5, cfg["text_dim"], generator=g), "test latents")


def pruned(tiny_wan, layers: list[int]):
    """diffusers' model with only `layers` (in order), the third-party reference for removed blocks."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**diffusers_kwargs({**tiny_wan.config, "num_layers": len(layers)})).eval()
    full = tiny_wan.model.state_dict()
    state = {k: v for k, v in full.items() if not k.startswith("blocks.")}
    for new, old in enumerate(layers):
        state.update({f"blocks.{new}.{k[len(f'blocks.{old}.'):]}": v for k, v in full.items()
                      if k.startswith(f"blocks.{old}.")})
    model.load_state_dict(state)
    return model


def run(model, x, t, ctx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output on one frame and every block's output (forward hooks)."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().double())) for b in model.blocks]
    with torch.no_grad():
        out = model(hidden_states=x[:, :, None], timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    for h in hooks:
        h.remove()
    return out[:, :, 0].double(), outs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


def test_removing_each_block_alone_equals_diffusers_without_it(tiny_wan, monkeypatch):
    calib = calibration_for(tiny_wan.config)
    found = act.removal_effects(open_teacher(str(tiny_wan.original_dir)), calib, draws=2)
    x, t, ctx = noised_set(calib.latents, calib.context, 2)
    full, _ = run(tiny_wan.model, x, t, ctx)
    expected = [rel(run(pruned(tiny_wan, [k for k in range(3) if k != b]), x, t, ctx)[0], full) for b in range(3)]
    assert found == pytest.approx(expected, rel=1e-4)
    assert min(expected) > 1e-3
    monkeypatch.setattr(act, "MAX_REMOVAL_BYTES", 1000)  # bounded before anything runs
    with pytest.raises(ProjectionError, match=r"test latents: 4 latents .*: removing each of 3 blocks in turn holds [\d,]+ bytes .* \(at most 1,000\)"):
        act.removal_effects(open_teacher(str(tiny_wan.original_dir)), calib)


def test_per_block_fidelity_is_exact_for_identity_and_depth_only_students(tiny_wan):
    calib = calibration_for(tiny_wan.config)
    teacher = str(tiny_wan.diffusers_dir)
    same = Projector.open(teacher, {"layout": "wanlite"})
    rows = block_fidelity(same.plan(), {"same": projected_student(same)}, calib.latents, calib.context, draws=1)["same"]
    assert [r["teacher_block"] for r in rows] == [0, 1, 2] and max(r["relative_error"] for r in rows) < 1e-10

    cut = Projector.open(teacher, WIDE, strategy=Strategy(layers=[0, 2]))
    rows = block_fidelity(cut.plan(), {"cut": projected_student(cut)}, calib.latents, calib.context, draws=1)["cut"]
    x, t, ctx = noised_set(calib.latents, calib.context, 1)
    _, teacher_blocks = run(tiny_wan.model, x, t, ctx)
    _, student_blocks = run(pruned(tiny_wan, [0, 2]), x, t, ctx)
    assert rows[0]["relative_error"] < 1e-10  # the teacher's own first block on the teacher's stream
    assert rows[1]["teacher_block"] == 2
    assert rows[1]["relative_error"] == pytest.approx(rel(student_blocks[1], teacher_blocks[2]), rel=1e-4)


def test_student_fidelity_reports_blocks_for_the_student_and_both_references(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 2})
    found = student_fidelity(p, calibration_for(tiny_wan.config), draws=2)
    assert set(found["blocks"]) == {"student", "random init", "svd-per-matrix"}
    blocks = {name: [r["relative_error"] for r in rows] for name, rows in found["blocks"].items()}
    assert all(len(v) == 2 for v in blocks.values())
    assert sum(blocks["student"]) < sum(blocks["random init"])  # the projection carries the teacher's stream


def test_student_fidelity_reads_the_teacher_once_whether_or_not_its_block_outputs_are_kept(tiny_wan, monkeypatch):
    """One pass over the teacher's weights gives the velocities and every block's error: by keeping the teacher's
    block outputs (a small teacher), or, for one too large to keep them, by walking the students' blocks beside
    the teacher's in that same pass. Both give the numbers of the separate measures (velocity_fidelity,
    block_fidelity)."""
    import projection.function.fidelity as fidelity
    import projection.function.forward as forward

    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 2})
    calibration = calibration_for(tiny_wan.config)
    reads: dict[int, int] = {}  # teacher blocks read for a forward (projecting the students reads on its own)
    real_build = forward.build_block
    monkeypatch.setattr(forward, "build_block", lambda teacher, index, *a: reads.update(
        {index: reads.get(index, 0) + 1}) or real_build(teacher, index, *a))
    kept = student_fidelity(p, calibration, draws=2)
    assert reads == {0: 1, 1: 1, 2: 1}
    reads.clear()
    monkeypatch.setattr(fidelity, "REFERENCE_BLOCK_BYTES", 0)  # as for a real teacher: nothing kept
    streamed = student_fidelity(p, calibration, draws=2)
    assert reads == {0: 1, 1: 1, 2: 1}
    monkeypatch.setattr(forward, "build_block", real_build)
    student = projected_student(p)
    alone = velocity_fidelity(student, StreamedTeacher(p.teacher), calibration.latents, calibration.context, draws=2)
    rows = block_fidelity(p.plan(), {"student": student}, calibration.latents, calibration.context, draws=2)
    for found in (kept, streamed):
        assert found["students"]["student"]["relative_error"] == pytest.approx(alone.relative_error, rel=1e-6)
        assert [r["relative_error"] for r in found["blocks"]["student"]] == pytest.approx(
            [r["relative_error"] for r in rows["student"]], rel=1e-6)
        assert found["students"]["random init"]["relative_error"] == pytest.approx(
            kept["students"]["random init"]["relative_error"], rel=1e-6)
    # a student whose blocks stop before the teacher's last: the teacher's remaining blocks run for its velocity
    first = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1,
                                                        "num_layers": 2}, strategy=Strategy(layers="first"))
    streamed = student_fidelity(first, calibration, draws=2)
    monkeypatch.setattr(fidelity, "REFERENCE_BLOCK_BYTES", 256 << 20)
    kept = student_fidelity(first, calibration, draws=2)
    for name, row in kept["students"].items():
        assert streamed["students"][name]["relative_error"] == pytest.approx(row["relative_error"], rel=1e-6)
        assert [r["relative_error"] for r in streamed["blocks"][name]] == pytest.approx(
            [r["relative_error"] for r in kept["blocks"][name]], rel=1e-6)


def test_a_second_measurement_on_the_same_set_reads_the_teachers_outputs_from_the_cache(tiny_wan, tmp_path,
                                                                                      monkeypatch):
    """The teacher's velocities and block outputs on a set go to the cache folder: another strategy measured on
    the same set (another run of `projection fidelity`) builds no teacher block and gets the same numbers; an entry
    that does not fit the request (damaged, or another set's) is computed again."""
    import projection.function.forward as forward

    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 2})
    calibration = calibration_for(tiny_wan.config)
    reads: list[int] = []
    real_build = forward.build_block
    monkeypatch.setattr(forward, "build_block", lambda teacher, index, *a: reads.append(index)
                        or real_build(teacher, index, *a))
    first = student_fidelity(p, calibration, draws=2, cache=tmp_path)
    assert reads == [0, 1, 2]
    reads.clear()
    other = Strategy(width="first")
    again = student_fidelity(p, calibration, draws=2, cache=tmp_path, strategy=other)
    assert reads == []
    fresh = student_fidelity(p, calibration, draws=2, strategy=other)
    assert again["students"] == fresh["students"] and again["blocks"] == fresh["blocks"]
    entry = next((tmp_path / "reference").iterdir())
    entry.write_bytes(entry.read_bytes()[:100])
    reads.clear()
    assert student_fidelity(p, calibration, draws=2, cache=tmp_path)["students"] == first["students"]
    assert reads == [0, 1, 2]
    reads.clear()
    student_fidelity(p, calibration_for(tiny_wan.config, seed=12), draws=2, cache=tmp_path)
    assert reads == [0, 1, 2] and len(list((tmp_path / "reference").iterdir())) == 2


def test_wanda_ranks_neurons_by_what_they_write(tiny_wan, tmp_path):
    """Neurons whose GELU output is loud but whose ffn.2 column is zero write nothing: `activation` keeps them,
    `wanda` drops them, and the student that keeps the neurons that write is closer to the teacher."""
    calib = calibration_for(tiny_wan.config, n=6)
    loud = act.collect(open_teacher(str(tiny_wan.original_dir)), calib)
    state = load_file(str(tiny_wan.original_dir / "diffusion_pytorch_model.safetensors"))
    silent = {b: torch.topk(loud.score("ffn", b), 16).indices for b in range(3)}
    for b, idx in silent.items():
        state[f"blocks.{b}.ffn.2.weight"][:, idx] = 0
    folder = tmp_path / "silent"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text((tiny_wan.original_dir / "config.json").read_text())

    found = act.collect(open_teacher(str(folder)), calib)
    for b in range(3):
        columns = state[f"blocks.{b}.ffn.2.weight"].double().pow(2).sum(0)
        assert torch.allclose(found.score("ffn_wanda", b), found.score("ffn", b) * columns)
    student = {"layout": "wanlite", "ffn_dim": 24, "num_layers": 3}
    teacher = StreamedTeacher(open_teacher(str(folder)))
    kept, errors = {}, {}
    for ffn in ("activation", "wanda"):
        p = Projector.open(str(folder), student, strategy=Strategy(ffn=ffn))
        p.calibrate(calib, cache=tmp_path / "cache")
        kept[ffn] = set(p.plan().indices("ffn", 0).tolist())
        errors[ffn] = velocity_fidelity(projected_student(p), teacher, calib.latents, calib.context).relative_error
    assert set(silent[0].tolist()) <= kept["activation"] and not set(silent[0].tolist()) & kept["wanda"]
    assert errors["wanda"] < errors["activation"], errors


def test_fold_targets_send_each_dropped_block_to_the_next_kept_one():
    assert fold_targets([0, 2], 4) == {1: [1, 3]}
    assert fold_targets([1, 3], 5) == {0: [0], 1: [2, 4]}
    assert fold_targets([0, 1, 2], 3) == {}


def test_compensation_adds_the_dropped_blocks_mean_update_and_export_writes_it(tiny_wan, tmp_path):
    calib = calibration_for(tiny_wan.config)
    student = {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 2}
    plain = Projector.open(str(tiny_wan.original_dir), student, strategy=Strategy(layers=[0, 2]))
    folded = Projector.open(str(tiny_wan.original_dir), student, strategy=Strategy(layers=[0, 2], compensate="mean"))
    with pytest.raises(ProjectionError, match="this strategy ranks by the teacher's activations: give a calibration set"):
        projected_student(folded)
    acts = folded.calibrate(calib, cache=tmp_path / "cache")
    kept = folded.plan().indices("resid", None)
    before, after = projected_student(plain).state_dict(), projected_student(folded).state_dict()
    key = "blocks.1.cross_attn.o.bias"  # teacher block 1 (dropped) folds into student block 1 (teacher block 2)
    assert torch.allclose(after[key] - before[key], acts.score("update", 1)[kept].float(), atol=1e-6)
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    # the mean update is what it says: the teacher stream's h_out - h_in of block 1, averaged over tokens
    x, t, ctx = noised_set(calib.latents, calib.context, 2)
    seen = []
    StreamedTeacher(open_teacher(str(tiny_wan.original_dir)))(
        x, t, ctx, lambda b, h_in, h_out: seen.append((h_out - h_in).double().flatten(0, 1)) if b == 1 else None)
    assert torch.allclose(acts.score("update", 1), torch.cat(seen).mean(0), atol=1e-6)

    export_student(folded, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.allclose(written[key], after[key])
    svd = Projector.open(str(tiny_wan.original_dir), student,
                         strategy=Strategy(layers=[0, 2], compensate="mean", width="svd-per-matrix"))
    svd.calibrate(calib, cache=tmp_path / "cache")
    with pytest.raises(ProjectionError, match="basis-consistent width"):
        projected_student(svd)


def test_overlap_of_two_plans_per_space():
    class Sizes:
        teacher_sizes = {"resid": 8, "ffn": 4}

    a = Plan(Sizes(), {("resid", None): torch.tensor([0, 1, 2, 3]), ("ffn", 0): torch.tensor([0, 1]),
                       ("ffn", 1): torch.tensor([2, 3]), ("sa_heads", 0): torch.arange(2)})
    b = Plan(Sizes(), {("resid", None): torch.tensor([2, 3, 4, 5]), ("ffn", 0): torch.tensor([0, 1]),
                       ("ffn", 1): torch.tensor([0, 3])})
    assert overlap(a, b) == {"resid": (0.5, 0.5), "ffn": (0.75, 0.5)}


def test_weights_and_activations_disagree_where_channels_are_never_read(tiny_wan, tmp_path):
    from test_activations import dead_channel_teacher

    dead = list(range(0, 64, 4))
    folder = dead_channel_teacher(tiny_wan, tmp_path, dead)
    p = Projector.open(str(folder), {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 3})
    with pytest.raises(ProjectionError, match="agreement ranks by the teacher's activations"):
        act.ranking_agreement(p)
    p.calibrate(calibration_for(tiny_wan.config, n=8), cache=tmp_path / "cache")
    found = act.ranking_agreement(p)
    assert found["resid"][0] <= 0.5 and found["resid"][1] == 0.5  # the 16 loud dead channels split the sets
    assert set(found) == {"resid", "sa_heads", "ca_heads"} and all(0 <= o <= 1 for o, _ in found.values())
    assert p.strategy == Strategy()  # restored


def test_one_survey_pass_gives_what_the_three_measurements_give_apart(tiny_wan, monkeypatch):
    """The statistics, the removal effects and the teacher's outputs (velocities and block outputs) from one pass
    over the weights equal `collect`, `removal_effects` and `teacher_reference` run apart (the same streams and
    micro-batches: equal to the bit), and that pass reads each block tensor once, where the three read it three
    times. Where a request is too large, nothing is read."""
    from projection.function.fidelity import teacher_reference
    from projection.function.survey import survey
    from projection.io.checkpoint import Checkpoint

    calib = calibration_for(tiny_wan.config, n=5)
    teacher = open_teacher(str(tiny_wan.original_dir))
    reads: dict[str, int] = {}
    real_get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: reads.update({key: reads.get(key, 0) + 1}) or
                        real_get(self, key))
    stats = act.collect(teacher, calib, draws=2, seed=3, key="k")
    removal = act.removal_effects(teacher, calib, draws=1, seed=3)
    reference = teacher_reference(StreamedTeacher(teacher), calib.latents, calib.context, 2, 3, keep_blocks=True)
    apart = max(n for k, n in reads.items() if k.startswith("blocks."))
    reads.clear()
    found = survey(teacher, calib, draws=2, seed=3, removal_draws=1, key="k")
    assert apart == 3 and max(n for k, n in reads.items() if k.startswith("blocks.")) == 1
    assert found.activations.scores.keys() == stats.scores.keys()
    assert all(torch.equal(found.activations.scores[k], v) for k, v in stats.scores.items())
    assert found.activations.influence == stats.influence and found.activations.key == "k"
    assert found.activations.about == stats.about and found.removal == removal
    assert torch.equal(found.reference.velocity, reference.velocity) and reference.blocks is not None
    assert all(torch.equal(a, b) for a, b in zip(found.reference.blocks, reference.blocks))
    only = survey(teacher, calib, draws=2, seed=3, statistics=False, reference=False)
    assert only.activations is None and only.reference is None and only.removal == removal
    reads.clear()
    monkeypatch.setattr(act, "MAX_REMOVAL_BYTES", 1000)
    with pytest.raises(ProjectionError, match="removing each of 3 blocks in turn"):
        survey(teacher, calib)
    assert not reads


def test_a_sets_contents_are_hashed_once_for_all_the_keys_of_a_function_report(tiny_wan, monkeypatch):
    """The statistics', removal effects' and teacher outputs' cache keys all name the set by its digest: the set's
    tensors (for a real set, hundreds of MB of text context) are hashed once per set, not once per key."""
    import hashlib

    import projection.function.calibration as calibration_module
    from projection.engine.report import function_report

    hashed = []

    class Counting:
        @staticmethod
        def sha256():
            hashed.append(1)
            return hashlib.sha256()

    monkeypatch.setattr(calibration_module, "hashlib", Counting)
    p = Projector.open(str(tiny_wan.original_dir), WIDE)
    calibration = calibration_for(tiny_wan.config)
    function_report(p, calibration)
    assert len(hashed) == 1
    assert calibration.digest == calibration_for(tiny_wan.config).digest and len(hashed) == 2  # a new object: again
