"""Exports are isolated: seeded values come from per-key generators, never the global RNG, and the library changes
no process-wide setting (environment, allocator, threads); only a program's `setup_runtime()` does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from projection import Projector, Strategy, export_student
from projection.arch.layout import build_student
from projection.arch.wan import Block, modulation
from projection.engine.build import fresh_value, init_parameter_

ROOT = Path(__file__).resolve().parents[1]
SEED_STUDENT = {"layout": "seed", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def test_fresh_values_are_torchs_own_initialisation():
    """Each rule draws what torch's own init of the module draws: the same generator stream gives the same values."""
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(5, 3), nn.Conv2d(2, 4, 3)
            self.mha, self.block = nn.MultiheadAttention(8, 2, batch_first=True), Block(8, 6, 2)

    holder = Holder()
    cases = [("lin", lambda: nn.Linear(5, 3), ["weight", "bias"]),
             ("conv", lambda: nn.Conv2d(2, 4, 3), ["weight", "bias"]),
             # torch draws out_proj's weight and bias, then in_proj_weight, and zeroes both biases
             ("mha", lambda: nn.MultiheadAttention(8, 2, batch_first=True),
              ["out_proj.weight", "out_proj.bias", "in_proj_weight"])]
    for name, make, order in cases:
        with torch.random.fork_rng():
            torch.manual_seed(7)
            ref = dict(make().named_parameters())
        g = torch.Generator().manual_seed(7)
        for key in order:
            t = torch.empty(ref[key].shape)
            if key == "out_proj.bias":  # torch draws it as a Linear bias, then zeroes it: draw the same to stay aligned
                init_parameter_(nn.ModuleDict({"x": nn.Linear(8, 8)}), "x.bias", t, g)
            t = init_parameter_(holder, f"{name}.{key}", t, g)
            assert torch.equal(t, ref[key]), f"{name}.{key}"
        if name == "mha":
            assert torch.equal(init_parameter_(holder, "mha.in_proj_bias", torch.empty(24), g), ref["in_proj_bias"])
    with torch.random.fork_rng():
        torch.manual_seed(7)
        table = modulation(6, 8)
    assert torch.equal(init_parameter_(holder, "block.modulation", torch.empty(1, 6, 8),
                                       torch.Generator().manual_seed(7)), table)
    assert torch.equal(init_parameter_(holder, "block.norm3.weight", torch.empty(8), None), torch.ones(8))


@pytest.mark.parametrize("layout", ["wanlite", "seed"])
def test_every_student_key_has_a_fresh_value_of_its_own(layout):
    meta = build_student({**SEED_STUDENT, "layout": layout, "in_dim": 4, "out_dim": 4, "text_dim": 16,
                          "freq_dim": 16}, "meta")
    keys = list(meta.state_dict())
    values = {k: fresh_value(meta, k, 0) for k in keys}
    assert all(values[k].shape == meta.get_parameter(k).shape for k in keys)
    assert all(torch.equal(fresh_value(meta, k, 0), values[k]) for k in keys)  # the same on every call
    random = [k for k in keys if values[k].std() > 0]
    assert random and not any(torch.equal(fresh_value(meta, k, 1), values[k]) for k in random)  # seed matters
    layers = [k for k in random if k.startswith("blocks.0.")]
    assert not torch.equal(values[layers[0]], values[layers[0].replace("blocks.0.", "blocks.1.")])


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_concurrent_exports_equal_sequential_ones_and_the_clis(tiny_wan, tmp_path):
    """Four exports at once in threads, while another thread keeps reseeding torch's global RNG (as other work in
    the same process may), write the very bytes of the same exports made one at a time and by `projection export`;
    and an export leaves the global RNG as it found it."""
    teacher = str(tiny_wan.original_dir)
    seeds = [0, 1, 2, 2]
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump(SEED_STUDENT))
    for i, seed in enumerate(seeds):
        (tmp_path / f"strategy-{i}.yaml").write_text(Strategy(seed=seed).to_yaml())
    cli = [subprocess.Popen([sys.executable, "-m", "projection", "export", "--teacher", teacher, "--student",
                             str(student), "--strategy", str(tmp_path / f"strategy-{i}.yaml"), "--out",
                             str(tmp_path / f"cli-{i}")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(len(seeds))]

    state = torch.get_rng_state()
    for i, seed in enumerate(seeds):
        export_student(Projector.open(teacher, SEED_STUDENT, strategy=Strategy(seed=seed)), tmp_path / f"seq-{i}")
    assert torch.equal(torch.get_rng_state(), state)

    done = threading.Event()

    def reseed() -> None:
        n = 0
        while not done.is_set():
            torch.manual_seed(n)
            n += 1

    errors: list[BaseException] = []

    def export(i: int) -> None:
        try:
            p = Projector.open(teacher, SEED_STUDENT, strategy=Strategy(seed=seeds[i]))
            export_student(p, tmp_path / f"thread-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    noise = threading.Thread(target=reseed)
    noise.start()
    threads = [threading.Thread(target=export, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    noise.join()
    assert not errors
    for proc in cli:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    for i in range(len(seeds)):
        assert _weights(tmp_path / f"thread-{i}") == _weights(tmp_path / f"seq-{i}") == _weights(tmp_path / f"cli-{i}")
    assert _weights(tmp_path / "seq-2") == _weights(tmp_path / "seq-3") != _weights(tmp_path / "seq-0")


PROBE = r"""
import ctypes, json, os, sys
env = dict(os.environ)
if sys.argv[3] == "cli":
    from projection.cli import main
else:
    from projection import Projector, Strategy, export_student
    from inspector.session import Session
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

def mmap_threshold_pinned():
    # glibc raises its mmap threshold when a mapped chunk is freed, unless mallopt pinned it: after freeing 8 MiB,
    # a 2 MiB block comes from the heap (dynamic) or gets its own mapping (pinned at 1 MiB).
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    pinned = libc.mallinfo2().hblks > before
    libc.free(block)
    return pinned

teacher, out, how = sys.argv[1:4]
threads, rng = torch.get_num_threads(), torch.get_rng_state()
if how == "cli":
    assert main(["export", "--teacher", teacher, "--student", out + ".yaml", "--out", out]) == 0
else:
    from pathlib import Path
    export_student(Projector.open(teacher, {"layout": "seed", "dim": 32, "num_heads": 1, "ffn_dim": 24,
                                            "num_layers": 2}, strategy=Strategy(seed=5)), out)
    os.makedirs(out + "-session")
    s = Session.open(teacher, {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2},
                     None, Strategy(), folder=Path(out + "-session"))
    s.measure(force=True)
    s.export(Path(out + "-app"))
    s.spectrum(s.matrices("0")[0][1])
    if how == "setup":
        from projection.runtime import setup_runtime
        setup_runtime()
print(json.dumps({"env": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
                  "threads": [threads, torch.get_num_threads()], "rng": bool(torch.equal(rng, torch.get_rng_state())),
                  "mmap_pinned": mmap_threshold_pinned()}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or os.uname().sysname != "Linux", reason="glibc probe")
def test_library_changes_no_process_wide_setting(tiny_wan, tmp_path):
    """Importing projection and exporting through it (and through an app session) changes no environment variable,
    thread count, allocator setting or RNG state; the programs' setup_runtime() does (which shows the probe sees it)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = str(ROOT)
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(SEED_STUDENT))

    def run(how: str) -> dict:
        out = tmp_path / how
        proc = subprocess.run([sys.executable, "-c", PROBE, str(tiny_wan.original_dir), str(out), how], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    library = run("library")
    assert library == {"env": [], "threads": [library["threads"][0]] * 2, "rng": True, "mmap_pinned": False}
    setup = run("setup")
    assert setup["mmap_pinned"] and setup["env"] == ["THP_MEM_ALLOC_ENABLE"]
    cli = run("cli")
    assert cli["env"] == ["THP_MEM_ALLOC_ENABLE"] and cli["mmap_pinned"]


def test_narrow_models_run_on_one_thread_and_the_count_comes_back(monkeypatch):
    """Threads pay only for wide models (runtime.parallel_pays): a CLI command on a narrow teacher runs on one
    thread, the app's heavy work on one keeps the interactive count; both give back what was there."""
    from projection import runtime

    assert not runtime.parallel_pays(128) and runtime.parallel_pays(1536) and runtime.parallel_pays(None)
    before = torch.get_num_threads()
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # what setup_runtime sets: given back after the test
    try:
        torch.set_num_threads(2)
        with runtime.command_threads(128):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with runtime.command_threads(5120):
            assert torch.get_num_threads() == 2
        runtime.setup_runtime(interactive_threads=1)  # the app's setting: one thread, every core for heavy work
        with runtime.heavy_work(128):
            assert torch.get_num_threads() == 1
        with runtime.heavy_work(5120):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        runtime._interactive_threads, runtime._all_threads = None, 0
        torch.set_num_threads(before)
