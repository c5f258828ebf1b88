"""Residual-stream rotation (SliceGPT) as a start for a narrower Wan student, measured at step 0 (issue 23).

SliceGPT rotates the residual stream by the principal directions of its activations and keeps the top k, applying
the rotation to every reader and writer. On Wan this is exact only in part: the blocks' LayerNorms subtract the
mean over channels, and the modulation (shift, scale, gate per channel, from the time embedding) and norm3's
weight act per channel, so they are diagonal in the teacher's basis and dense in the rotated one. Here each such
per-channel scale d becomes its diagonal in the rotated basis, (Q_k * Q_k)^T d; additive vectors (biases,
shifts) and matrices rotate exactly (Q_k^T b, Q_k^T W, W Q_k); the time embedding e, which the head uses both as
a shift and as a scale, becomes the mean of its two images, and the time projection (a function of the timestep
alone) is refitted by least squares on 1,000 timesteps. Heads, head dims and FFN neurons are kept as the default
plan keeps them.

The basis: the uncentered second moment of the teacher's residual stream (every block's input and the last
block's output) on the training part of the demo's held-out digits (2 noise draws per latent); scored on the
last 20% (the probe's split), 2 noise draws per latent.

    python benchmarks/bench_rotation.py

Rows: random init, the default projection, `width: activation`, the default plan's channels run through this
code as a "rotation" (a check: without the refit it must equal the default; with it, what the refit alone
gives), the rotation at k = the student's width, and a student keeping all channels and heads with and without
the rotation to all directions (nothing sliced: what the approximations alone cost).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from projection import Projector, Strategy  # noqa: E402
from projection.arch.anatomy import WAN_TENSORS, space_sizes, template_of  # noqa: E402
from projection.arch.layout import build_student  # noqa: E402
from projection.arch.wan import WanLite, sinusoid  # noqa: E402
from projection.core.plan import Plan  # noqa: E402
from projection.demo.teacher import ASSETS, demo_calibration, load_teacher  # noqa: E402
from projection.engine.build import projected_student, random_student  # noqa: E402
from projection.function.fidelity import Reference, teacher_reference  # noqa: E402
from projection.function.noise import TIMESTEPS, noised_set  # noqa: E402
from projection.probe.targets import split  # noqa: E402

SHAPES = {"width only (64 x 8 blocks)": {"dim": 64, "num_heads": 2, "ffn_dim": 256},
          "half width, half depth (64 x 4 blocks)": {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}}
SHIFTS, HEAD_SHIFTS = (0, 3), (0,)  # modulation chunks added (the rest scale or gate: per channel)


@torch.no_grad()
def residual_moment(teacher: WanLite, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The uncentered second moment [D, D] of the residual stream: every block's input and the last output."""
    e = teacher.embed(x, t, ctx)
    h, moment = e.tokens, torch.zeros(teacher.dim, teacher.dim, dtype=torch.float64)
    for block in [*teacher.blocks, None]:
        moment += h.flatten(0, 1).double().T @ h.flatten(0, 1).double()
        if block is not None:
            h = block(h, e.e0, e.ctx, e.freqs)
    return moment


def principal(moment: torch.Tensor) -> torch.Tensor:
    """The principal directions [D, D] (columns, by decreasing energy)."""
    energy, vectors = torch.linalg.eigh(moment)
    return vectors[:, energy.argsort(descending=True)].float()


def along(x: torch.Tensor, axis: int, m: torch.Tensor) -> torch.Tensor:
    """x with axis `axis` (teacher channels) contracted with m [teacher, student]."""
    return torch.movedim(torch.tensordot(torch.movedim(x, axis, -1), m, dims=1), -1, axis)


def transform(x: torch.Tensor, axes: tuple[tuple[str, ...], ...], plan: Plan, block: int | None,
              sizes: dict[str, int], resid: dict[str, torch.Tensor], role: str) -> torch.Tensor:
    """A teacher tensor in the student's basis: resid axes through `resid[role]`, every other space by the plan's
    kept indices (a compound axis, e.g. heads x dims, split into its spaces first)."""
    dim = 0
    for axis in axes:
        parts = [sizes[s] for s in axis]
        x = x.unflatten(dim, parts) if len(parts) > 1 else x
        for j, space in enumerate(axis):
            if space == "resid":
                x = along(x, dim + j, resid[role])
            else:
                kept = plan.indices(space, block)
                if kept is not None:
                    x = x.index_select(dim + j, kept)
        x = x.flatten(dim, dim + len(parts) - 1) if len(parts) > 1 else x
        dim += 1
    return x


def rotated_student(teacher: WanLite, plan: Plan, config, basis: torch.Tensor, refit: bool = True) -> WanLite:
    """The student of `config` whose residual stream is `basis` [D, k] (orthonormal columns) of the teacher's.
    refit=False: the time projection transformed chunk by chunk like the modulation (exact for a selection of
    channels, where it must give the default projection)."""
    state = {k: v.detach() for k, v in teacher.state_dict().items()}
    sizes = space_sizes(plan.mapping.teacher.config)
    resid = {"exact": basis, "diagonal": basis * basis}
    student = build_student(config)
    layers = plan.mapping.layers
    out: dict[str, torch.Tensor] = {}
    for key in student.state_dict():
        template, i = template_of(key)
        block = layers[i] if i is not None else None
        teacher_key = template.replace("{i}", str(block)) if i is not None else key
        x = state[teacher_key]
        axes = WAN_TENSORS[template]
        if template == "patch_embedding.weight":  # WanLite's Conv2d: no kt axis
            axes = axes[:2] + axes[3:]
        if template in ("blocks.{i}.modulation", "head.modulation"):
            shifts = SHIFTS if template.startswith("blocks") else HEAD_SHIFTS
            out[key] = torch.stack([transform(x[:, c], axes[:1] + axes[2:], plan, block, sizes, resid,
                                              "exact" if c in shifts else "diagonal") for c in range(x.shape[1])], 1)
        elif template == "blocks.{i}.norm3.weight":
            out[key] = transform(x, axes, plan, block, sizes, resid, "diagonal")
        elif template.startswith("time_embedding.2"):  # e: the head's shift and its scale at once
            both = {"mean": (resid["exact"] + resid["diagonal"]) / 2}
            out[key] = transform(x, axes, plan, block, sizes, both, "mean")
        elif template.startswith("time_projection.1") and refit:
            continue  # refitted below, from the student's own time embedding
        elif template.startswith("time_projection.1"):
            chunks = x.unflatten(0, (6, -1))
            out[key] = torch.cat([transform(chunks[c], ((("resid",),) + axes[1:]), plan, block, sizes, resid,
                                            "exact" if c in SHIFTS else "diagonal") for c in range(6)])
        else:
            out[key] = transform(x, axes, plan, block, sizes, resid, "exact")
    student.load_state_dict({**student.state_dict(), **out})
    if refit:
        fit_time_projection(teacher, student, resid)
    return student.eval()


@torch.no_grad()
def fit_time_projection(teacher: WanLite, student: WanLite, resid: dict[str, torch.Tensor]) -> None:
    """The student's time projection by least squares over 1,000 timesteps: from its own time embedding to each
    chunk of the teacher's modulation in the student's basis (shifts exact, scales and gates diagonal)."""
    t = torch.linspace(0, TIMESTEPS, 1000)
    e_t = teacher.time_embedding(sinusoid(t, teacher.freq_dim).float())
    e_s = student.time_embedding(sinusoid(t, student.freq_dim).float())
    target = teacher.time_projection(e_t).unflatten(1, (6, teacher.dim))
    wanted = torch.cat([target[:, c] @ resid["exact" if c in SHIFTS else "diagonal"] for c in range(6)], 1)
    inputs = torch.cat([torch.nn.functional.silu(e_s), torch.ones(len(t), 1)], 1).double()
    solution = torch.linalg.lstsq(inputs, wanted.double()).solution.float()  # [k + 1, 6k]
    linear = student.time_projection[1]
    linear.weight.copy_(solution[:-1].T)
    linear.bias.copy_(solution[-1])


def kept_energy(moment: torch.Tensor, basis: torch.Tensor) -> float:
    """The share of the residual stream's energy the columns of `basis` hold."""
    b = basis.double()
    return (torch.trace(b.T @ moment @ b) / torch.trace(moment)).item()


def main() -> None:
    torch.set_num_threads(1)
    teacher = load_teacher()
    calibration = demo_calibration()
    train, held = split(calibration, 0.2)
    moment = residual_moment(teacher, *noised_set(train.latents, train.context, 2, seed=1))
    basis = principal(moment)
    reference: Reference = teacher_reference(teacher, held.latents, held.context, draws=2)
    print(f"demo teacher (width {teacher.dim}); basis from {len(train)} latents x 2 draws, scored on {len(held)} "
          "held-out latents x 2 draws: relative velocity error at step 0 (0: the teacher's function; 1: predicting "
          "zero)\n")
    teacher_dir = str(ASSETS / "teacher-wan")
    for shape, fields in SHAPES.items():
        p = Projector.open(teacher_dir, {"layout": "wanlite", **fields})
        plan, config = p.plan(), p.student_config()
        k, kept = int(config.dim), plan.indices("resid", None)
        active = Projector.open(teacher_dir, {"layout": "wanlite", **fields}, strategy=Strategy(width="activation"))
        active.calibrate(train)
        selection = torch.eye(teacher.dim)[:, kept]
        rows = {"random init": random_student(config, 0),
                f"default projection (magnitude; channels hold {kept_energy(moment, selection):.1%} of the "
                "stream's energy)": projected_student(p),
                "width: activation": projected_student(active),
                "check: the default's channels through this code (no refit)": rotated_student(teacher, plan, config,
                                                                                             selection, refit=False),
                "the default's channels, time projection refitted": rotated_student(teacher, plan, config,
                                                                                     selection),
                f"rotation, top {k} of {teacher.dim} directions ({kept_energy(moment, basis[:, :k]):.1%} of the "
                "energy)": rotated_student(teacher, plan, config, basis[:, :k])}
        wide = Projector.open(teacher_dir, {"layout": "wanlite", **fields, "dim": teacher.dim,
                                            "num_heads": teacher.num_heads})
        rows[f"all {teacher.dim} channels, all heads, same FFN and blocks (no rotation)"] = projected_student(wide)
        rows[f"the same, rotated to all {teacher.dim} directions (what the approximations alone cost)"] = \
            rotated_student(teacher, wide.plan(), wide.student_config(), basis)
        errors = {name: reference.score(model.float()).relative_error for name, model in rows.items()}
        print(f"**{shape}**\n\n| start | step-0 velocity error |\n|---|---|")
        print("\n".join(f"| {name} | {error:.4f} |" for name, error in errors.items()) + "\n")
        default, check = (v for name, v in errors.items() if name.startswith(("default projection", "check:")))
        if abs(check - default) > 1e-6 * default:
            sys.exit(f"the rotation code on the default's channels gives {check}, the default {default}: a bug")


if __name__ == "__main__":
    main()
