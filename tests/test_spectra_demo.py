"""Spectra, energy measurement and the built-in demo."""
from __future__ import annotations

import torch

from projection import Projector, open_checkpoint
from projection.core.measure import energy_by, kind_of
from projection.core.spectra import batched_singular_values, cumulative_energy, rank_for_energy, singular_values


def test_singular_values_exact_and_batched():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w = (u * s) @ v.T
    assert torch.allclose(singular_values(w)[:5], s, atol=1e-10)
    mats = [w.float(), torch.randn(20, 8), torch.randn(3, 4)]
    for got, m in zip(batched_singular_values(mats), mats):
        assert torch.allclose(got, singular_values(m), atol=1e-4)
    curve = cumulative_energy(s)
    assert torch.isclose(curve[-1], torch.tensor(1.0, dtype=torch.float64))
    assert rank_for_energy(s, 0.5) == 1 and rank_for_energy(s, 0.99) == 4 and rank_for_energy(s, 0.995) == 5
    assert singular_values(torch.randn(6, 2, 2, 2)).shape == (6,)  # conv kernels as [out, in * k]


def test_retained_energy_is_the_kept_share(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24,
                                                     "num_layers": 2})
    results = {r.entry.student_key: r for r in p.project()}
    r = results["blocks.0.ffn.0.weight"]
    teacher = p.teacher.read("blocks.0.ffn.0.weight")
    assert abs(r.energy - r.tensor.double().square().sum().item() / teacher.double().square().sum().item()) < 1e-7  # float32 row norms
    assert 0 < r.energy < 1
    by_layer = energy_by(results.values())
    assert set(by_layer) == {"top", "block 0", "block 1"}
    assert "ffn.0.weight" in energy_by(results.values(), kind_of)
    same = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite"})
    assert all(r.energy == 1.0 for r in same.project() if r.energy is not None)


def test_student_spectrum_is_bounded_by_the_teacher(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24,
                                                     "num_layers": 2})
    t = p.spectrum("blocks.1.ffn.0.weight")
    s = p.spectrum("blocks.1.ffn.0.weight", side="student")
    assert len(s) == 24 and (s <= t[: len(s)] + 1e-6).all()  # interlacing: a submatrix's values are bounded
    assert p.spectrum("blocks.1.ffn.0.weight") is t  # cached


def test_synthetic_demo_is_wan_shaped_in_both_formats_with_trained_like_spectra(synthetic_demo_dir):
    demo_dir = synthetic_demo_dir
    wan = open_checkpoint(demo_dir / "teacher-wan")
    diff = open_checkpoint(demo_dir / "teacher-diffusers")
    assert diff.format == "sharded-safetensors" and len(diff.files) == 3
    assert len(wan) == len(diff) == 15 + 27 * 8
    for name, native in (("blocks.2.ffn.0.weight", "blocks.2.ffn.net.0.proj.weight"),
                         ("head.modulation", "scale_shift_table")):
        assert torch.equal(wan.get(name), diff.get(native))
    s = singular_values(wan.get("blocks.0.self_attn.q.weight"))
    # decaying, heavy-tailed: the top 10% of directions hold most of the energy (flat noise holds ~10-20%)
    assert cumulative_energy(s)[len(s) // 10 - 1] > 0.5
    for student in ("student-wanlite.yaml", "student-seed.yaml"):
        p = Projector.open(str(demo_dir / "teacher-diffusers"), str(demo_dir / student))
        assert p.mapping().coverage()["keys"]["transferred"] > 0
    assert "SYNTHETIC" in (demo_dir / "README.txt").read_text()
