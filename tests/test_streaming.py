"""The streaming engine: how tensors are read, ranked, selected and cached (fast paths must equal the plain ones)."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from projection import Projector, Strategy, open_checkpoint
from projection.core.project import SvdCache, gather_rows_and_columns, select, svd_project
import projection.core.project as project_module
from projection.core.spectra import slice_energy, squared_norm
from projection.engine.projector import PLANS_KEPT
from projection.io.streaming import in_order, read_ahead

SMALL = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def reference_energy(t: torch.Tensor, axis: int) -> torch.Tensor:
    t64 = t.double()
    return t64.square().sum(dim=[d for d in range(t.ndim) if d != axis]) if t.ndim > 1 else t64.square()


@pytest.mark.parametrize("shape", [(300, 7), (7, 300), (1, 6, 40), (40, 16, 1, 2, 2), (5,), (3, 5, 7), (1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_slice_energy_equals_a_float64_sum_along_every_axis(shape, dtype):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for axis in range(t.ndim):
        got = slice_energy(t, axis)
        assert got.dtype == torch.float64 and got.shape == (shape[axis],)
        torch.testing.assert_close(got, reference_energy(t, axis), rtol=1e-5, atol=0)
    assert squared_norm(t) == pytest.approx(t.double().square().sum().item(), rel=1e-6)


def test_selection_takes_slices_as_views_and_gathers_the_rest():
    t = torch.randn(40, 30)
    rows, cols = torch.tensor([1, 5, 6, 20, 39]), torch.tensor([0, 2, 3, 29])
    assert torch.equal(gather_rows_and_columns(t, rows, cols, block_bytes=64), t[rows][:, cols])
    assert torch.equal(select(t, [rows, cols]), t[rows][:, cols])
    sliced = select(t, [torch.arange(3, 9), None])  # consecutive indices: a view, no copy
    assert sliced._base is t and torch.equal(sliced, t[3:9])
    assert torch.equal(select(t, [torch.arange(3, 9), cols]), t[3:9][:, cols])
    cube = torch.randn(4, 5, 6)
    assert torch.equal(select(cube, [torch.tensor([0, 3]), None, torch.tensor([1, 4])]), cube[[0, 3]][:, :, [1, 4]])


def test_projected_tensors_own_their_memory(tiny_wan):
    """A slice of a memory-mapped teacher tensor must not be handed out: it would pin the file's pages."""
    p = Projector.open(str(tiny_wan.original_dir), {**SMALL, "dim": 64, "ffn_dim": 48, "num_heads": 2},
                       strategy=Strategy(width="first", heads="first", ffn="first", head_dim="first"))
    for r in p.project():
        if r.tensor is not None:
            assert r.tensor._base is None and r.tensor.is_contiguous(), r.entry.student_key


def test_unaligned_tensor_data_is_read_without_mapping(tmp_path):
    """A hand-written header whose length is not a multiple of 4 leaves float32 data unaligned for a view."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header = json.dumps({"t": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}).encode() + b" "
    assert (8 + len(header)) % 4
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + t.numpy().tobytes())
    got = open_checkpoint(path).get("t")
    assert torch.equal(got, t) and got.data_ptr() % 4 == 0


def test_read_ahead_prefetches_each_group_once_ahead_of_use():
    asked: list[list[str]] = []
    order = []
    for i in read_ahead([["a"], [], ["b", "c"], ["d"]], asked.append, depth=2):
        order.append((i, len(asked)))
    assert asked == [["a"], [], ["b", "c"], ["d"]]
    assert order == [(0, 3), (1, 4), (2, 4), (3, 4)]  # group i + 2 asked before group i is worked on
    assert list(read_ahead([["a"]], None)) == [0]


def test_prefetch_is_harmless_for_every_format(tiny_wan, tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pt")
    for source in (tiny_wan.original_dir, tiny_wan.diffusers_dir, tmp_path / "w.pt"):
        ckpt = open_checkpoint(source)
        ckpt.prefetch(ckpt.keys())
        ckpt.prefetch(["no such key"])
        assert ckpt.bytes_read == 0


def test_magnitude_statistics_read_each_teacher_tensor_once(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), SMALL)
    reads: list[str] = []
    plain = p.stats.read
    p.stats.read = lambda key: reads.append(key) or plain(key)
    p.plan()
    assert reads and len(reads) == len(set(reads))
    for key in reads:  # and the projection reuses their squared norms, exactly as it would take them
        assert p.stats.squared_norm(key) == squared_norm(p.teacher.read(key))
    reads.clear()
    p.plan(p.strategy.model_copy(update={"rescale": "variance"}))
    assert reads == []  # a new plan on the same blocks reads nothing


def test_svd_per_matrix_takes_one_svd_per_teacher_matrix(tiny_wan, monkeypatch):
    calls = []
    plain = project_module.svd_bases
    monkeypatch.setattr(project_module, "svd_bases", lambda w, complete=False: calls.append(1) or plain(w, complete))
    p = Projector.open(str(tiny_wan.original_dir), SMALL, strategy=Strategy(width="svd-per-matrix"))
    first = {r.entry.student_key: r.tensor for r in p.project()}
    n = len(calls)
    assert n > 0
    centered = p.strategy.model_copy(update={"conv": "center"})  # a new plan: same matrices, cached bases
    again = {r.entry.student_key: r.tensor for r in p.project(centered)}
    assert len(calls) == n
    w = p.teacher.read("blocks.0.self_attn.q.weight")
    assert torch.equal(again["blocks.0.self_attn.q.weight"], svd_project(w, 32, 32))
    assert torch.equal(first["blocks.0.ffn.0.weight"], again["blocks.0.ffn.0.weight"])


def test_svd_cache_is_bounded():
    cache = SvdCache(budget=3 * 2 * 8 * 8 * 8)  # room for three 8x8 pairs of float64 bases
    for i in range(5):
        cache.bases(f"k{i}", torch.randn(8, 8), 4, 4)
    assert [k for _, k, _, _ in cache.items] == ["k2", "k3", "k4"]
    cache.bases("big", torch.randn(16, 16), 4, 4)  # larger than the whole budget: computed, not kept
    assert [k for _, k, _, _ in cache.items] == ["k2", "k3", "k4"]


def test_stream_modes_and_cache(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), SMALL)
    count = {"n": 0}
    plain = p.read
    p.read = lambda key: count.__setitem__("n", count["n"] + 1) or plain(key)
    p.plan()
    yielded = list(p.stream(tensors="yield"))  # tensors out, numbers kept
    projected = [r for r in yielded if r.tensor is not None]
    assert all(r.tensor.numel() == math.prod(r.entry.student_shape) for r in projected)
    reads = count["n"]
    numbers = list(p.stream(tensors="numbers"))  # served from the cache: no reads, no tensors
    assert count["n"] == reads
    assert [r.energy for r in numbers] == [r.energy for r in yielded]
    assert all(r.tensor is None or r.tensor.numel() == 0 for r in numbers)
    kept = list(p.stream(tensors="keep"))  # tensors needed again: projected again, now cached whole
    assert count["n"] > reads
    reads = count["n"]
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(kept, yielded) if a.tensor is not None)
    list(p.stream(tensors="keep"))
    assert count["n"] == reads


def test_cached_plans_are_bounded(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), SMALL)
    signatures = set()
    for i in range(PLANS_KEPT + 3):  # 11 distinct strategies
        rescale = ("none", "variance")[i // 9]
        strategy = p.strategy.model_copy(update={"layers": [i % 3, i // 3 % 3], "rescale": rescale})
        list(p.stream(strategy, tensors="numbers"))
        signatures.add(p.signature(strategy))
    assert len(signatures) == PLANS_KEPT + 3
    assert len(p._results) == PLANS_KEPT and p.signature(strategy) in p._results


def test_custom_student_config_comes_from_the_mapped_shapes(tiny_wan, tmp_path):
    names = {"embed.w": ("patch_embedding.weight", (32, 4, 2, 2)), "b0.q": ("blocks.0.self_attn.q.weight", (32, 32)),
             "b0.up": ("blocks.0.ffn.0.weight", (24, 32)), "b1.q": ("blocks.1.self_attn.q.weight", (32, 32))}
    save_file({k: torch.zeros(s) for k, (_, s) in names.items()}, str(tmp_path / "custom.safetensors"))
    rules = {"embed.w": "patch_embedding.weight", "b{i}.q": "blocks.{i}.self_attn.q.weight",
             "b{i}.up": "blocks.{i}.ffn.0.weight"}
    p = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "custom.safetensors"), rules=rules)
    config = p.summary()["student"]["config"]
    assert config["dim"] == 32 and config["ffn_dim"] == 24 and config["num_layers"] == 2


def test_map_into_a_closed_pipe_stops_quietly(demo_dir):
    proc = subprocess.Popen([sys.executable, "-m", "projection", "map", "--teacher", str(demo_dir / "teacher-wan"),
                             "--student", str(demo_dir / "student-wanlite.yaml"), "--csv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the first line (as `| head -0` would)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_in_order_keeps_order_bounds_work_in_flight_and_raises():
    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (x % 3))  # later items often finish first
        with lock:
            running[0] -= 1
        return x * x

    assert list(in_order(slow_square, list(range(12)), 3)) == [x * x for x in range(12)]
    assert 1 < peak[0] <= 3
    assert list(in_order(slow_square, [2], 3)) == [4] and list(in_order(slow_square, [], 3)) == []

    def fails_on_5(x: int) -> int:
        if x == 5:
            raise ValueError("item 5")
        return x

    results = in_order(fails_on_5, list(range(9)), 3)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="item 5"):
        next(results)
