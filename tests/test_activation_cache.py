"""The activation cache: entries are used only when they hold what they describe, are written without following
planted links, and are keyed by the teacher's content (issue 18)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from itertools import chain, count
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import projection.function.activations as act
import projection.io.diskcache as diskcache
import projection.io.digest as digest
from projection.cache import Lru
from projection.function.calibration import Calibration
from projection.core.models import open_teacher
from projection.demo.teacher import ASSETS
from projection.engine.projector import teacher_fingerprint

DEMO_TEACHER = ASSETS / "teacher-wan"  # width 128, 8 blocks, 4 heads, ffn 512
FP = "fp-cache-test"


@pytest.fixture(scope="module")
def teacher():
    return open_teacher(str(DEMO_TEACHER))


@pytest.fixture(scope="module")
def calib(teacher):
    g = torch.Generator().manual_seed(3)
    return Calibration(torch.randn(2, teacher.config.in_dim, 4, 4, generator=g),
                       torch.randn(2, 3, teacher.config.text_dim, generator=g), "cache test latents")


@pytest.fixture(scope="module")
def clean(teacher, calib):
    """The statistics and removal effects measured without any cache."""
    return act.collect(teacher, calib), act.removal_effects(teacher, calib)


@pytest.fixture
def counted(monkeypatch):
    """Counts the measurements the cache runs."""
    calls = {"collect": 0, "removal": 0}
    collect, removal = act.collect, act.removal_effects

    def counting_collect(*a, **k):
        calls["collect"] += 1
        return collect(*a, **k)

    def counting_removal(*a, **k):
        calls["removal"] += 1
        return removal(*a, **k)

    monkeypatch.setattr(act, "collect", counting_collect)
    monkeypatch.setattr(act, "removal_effects", counting_removal)
    return calls


def entry_path(cache: Path, calib: Calibration, removal: bool = False) -> Path:
    key = act.cache_key(FP, calib, 1 if removal else 2, 0, (0.0, 1.0))
    return cache / "activations" / (f"{key}-removal.json" if removal else f"{key}.safetensors")


def same_as(found: act.Activations, clean: act.Activations) -> None:
    assert found.influence == pytest.approx(clean.influence)
    assert set(found.scores) == set(clean.scores)
    for k, v in clean.scores.items():
        assert torch.allclose(found.scores[k], v), k


def tamper_and_reload(teacher, calib, clean, counted, tmp_path, change) -> None:
    """Plant the clean entry changed by `change` and check the next call measures again, returns the clean
    statistics and leaves a valid entry that is used from then on."""
    path = entry_path(tmp_path, calib)
    path.parent.mkdir(parents=True)
    tensors = {k: v.clone() for k, v in clean[0].to_tensors().items()}  # the fixture stays clean
    change(tensors)
    save_file(tensors, str(path))
    found = act.teacher_activations(teacher, FP, calib, cache=tmp_path)
    assert counted["collect"] == 1  # measured again, no error
    same_as(found, clean[0])
    act.checked_entry(load_file(str(path)), act.expected_shapes(teacher))  # the entry was rewritten valid
    act.teacher_activations(teacher, FP, calib, cache=tmp_path)
    assert counted["collect"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_entry_with_wrong_influence_length_is_measured_again(teacher, calib, clean, counted, tmp_path):
    tamper_and_reload(teacher, calib, clean, counted, tmp_path,
                      lambda t: t.__setitem__("influence", t["influence"][:3].clone()))  # 3 values for 8 blocks


@pytest.mark.parametrize("width", [100, 328])
def test_entry_with_wrong_residual_width_is_measured_again(teacher, calib, clean, counted, tmp_path, width):
    tamper_and_reload(teacher, calib, clean, counted, tmp_path,
                      lambda t: t.__setitem__("resid/global", torch.rand(width, dtype=torch.float64)))


def test_entry_with_nan_values_is_measured_again(teacher, calib, clean, counted, tmp_path):
    def nan(t):
        t["ffn/2"][5] = float("nan")
    tamper_and_reload(teacher, calib, clean, counted, tmp_path, nan)


def test_entry_with_int64_values_is_measured_again(teacher, calib, clean, counted, tmp_path):
    tamper_and_reload(teacher, calib, clean, counted, tmp_path,
                      lambda t: t.__setitem__("sa_heads/1", (t["sa_heads/1"] * 1000).to(torch.int64)))


def test_entry_with_a_missing_group_is_measured_again(teacher, calib, clean, counted, tmp_path):
    tamper_and_reload(teacher, calib, clean, counted, tmp_path, lambda t: t.pop("update/7"))


@pytest.mark.parametrize("text", [
    '{"removal": [0.5, 0.25, 0.125]}',  # 3 effects for 8 blocks
    '{"removal": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, Infinity]}',
    '{"removal": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1e999]}',
    '{"removal": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, NaN]}',
    '{"removal": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, true]}',
    '{"removal": "12345678"}',  # iterates as 8 numbers
    '{"removal": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0, "6": 0, "7": 0, "8": 0}}',  # so does this
    '[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]',
    '\x00garbage\xff{',
], ids=["short", "infinity", "overflow", "nan", "bool", "string", "mapping", "not-a-dict", "garbage"])
def test_bad_removal_entry_is_measured_again(teacher, calib, clean, counted, tmp_path, text):
    path = entry_path(tmp_path, calib, removal=True)
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("latin-1"))
    found = act.teacher_removal(teacher, FP, calib, cache=tmp_path)
    assert counted["removal"] == 1  # measured again, no error
    assert found == pytest.approx(clean[1])
    assert json.loads(path.read_text()) == {"removal": found}  # rewritten valid
    assert act.teacher_removal(teacher, FP, calib, cache=tmp_path) == found and counted["removal"] == 1


def test_oversized_removal_entry_is_not_read(teacher, calib, clean, counted, tmp_path):
    path = entry_path(tmp_path, calib, removal=True)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"removal": clean[1]}) + " " * (1 << 20))  # valid JSON, but no entry is this big
    assert act.teacher_removal(teacher, FP, calib, cache=tmp_path) == pytest.approx(clean[1])
    assert counted["removal"] == 1


def test_links_planted_in_the_cache_folder_are_not_followed(teacher, calib, clean, counted, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = cache / "activations"
    folder.mkdir(parents=True)
    victims = {}
    for name in ("temp", "removal-temp", "entry", "removal", "candidate"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_bytes(b"precious " + name.encode())
    path, removal = entry_path(cache, calib), entry_path(cache, calib, removal=True)
    for entry, victim in ((path, "temp"), (removal, "removal-temp")):  # the names the cache used to write through
        entry.with_suffix(f".tmp-{os.getpid()}").symlink_to(victims[victim])
    path.symlink_to(victims["entry"])  # links at the entries' own names: neither read nor written through
    removal.symlink_to(victims["removal"])
    # The first name mkstemp will try for the entry: a link there is skipped (O_EXCL), never opened.
    names = chain(["planted"], (f"name{i}" for i in count()))
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    (folder / f".{path.name}.planted.tmp").symlink_to(victims["candidate"])

    found = act.teacher_activations(teacher, FP, calib, cache=cache)
    same_as(found, clean[0])
    assert act.teacher_removal(teacher, FP, calib, cache=cache) == pytest.approx(clean[1])
    for name, victim in victims.items():
        assert victim.read_bytes() == b"precious " + name.encode(), name
    assert not path.is_symlink() and not removal.is_symlink()  # the links were replaced by real entries
    act.checked_entry(load_file(str(path)), act.expected_shapes(teacher))
    assert counted == {"collect": 1, "removal": 1}


def test_link_to_a_fifo_at_the_entry_name_does_not_block(teacher, calib, clean, counted, tmp_path, fifo):
    cache = tmp_path / "cache"
    path = entry_path(cache, calib)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)  # a FIFO at the entry's own name: refused without blocking on the open
    same_as(act.teacher_activations(teacher, FP, calib, cache=cache), clean[0])
    path.unlink()
    path.symlink_to(fifo(tmp_path / "pipe"))  # a link to one: not followed
    same_as(act.teacher_activations(teacher, FP, calib, cache=cache), clean[0])
    assert counted["collect"] == 2 and path.is_file() and not path.is_symlink()


def test_failed_write_leaves_no_temporary_file(teacher, calib, clean, counted, tmp_path, monkeypatch):
    def fail(*a):
        raise OSError("disk full")
    monkeypatch.setattr(diskcache.os, "replace", fail)
    same_as(act.teacher_activations(teacher, FP, calib, cache=tmp_path), clean[0])  # still returned
    assert list((tmp_path / "activations").iterdir()) == []


def copy_teacher(tmp_path: Path) -> Path:
    folder = tmp_path / "teacher"
    shutil.copytree(DEMO_TEACHER, folder)
    return folder


def rewrite_in_place(file: Path, offset: int) -> None:
    """Change 8 bytes at `offset`, same inode and size, and set the modification time back."""
    st = file.stat()
    with open(file, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = file.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_teacher_rewritten_in_place_gets_a_new_fingerprint(tmp_path):
    folder = copy_teacher(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    before = teacher_fingerprint(open_teacher(str(folder)))
    assert teacher_fingerprint(open_teacher(str(folder))) == before  # stable
    assert teacher_fingerprint(open_teacher(str(DEMO_TEACHER))) == before  # content, not place
    rewrite_in_place(weights, weights.stat().st_size // 2)  # one weight in the middle
    assert teacher_fingerprint(open_teacher(str(folder))) != before


def test_large_teacher_file_is_fingerprinted_by_header_and_sampled_blocks(tmp_path, monkeypatch):
    weights = copy_teacher(tmp_path) / "diffusion_pytorch_model.safetensors"
    monkeypatch.setattr(digest, "WHOLE_FILE_BYTES", 1 << 20)  # the 4 MB demo teacher counts as large
    monkeypatch.setattr(digest, "SAMPLE_BYTES", 4096)  # its 21 kB header reaches past the first block
    size = weights.stat().st_size
    blocks = [i * (size - 4096) // (digest.SAMPLES - 1) for i in range(digest.SAMPLES)]
    gap = blocks[1] + 4096 + 1000  # between the second and third sampled blocks
    assert gap + 8 < blocks[2]
    digests = [digest.file_digest(weights, True)]
    for offset in (blocks[5] + 100, 10_000, gap):  # a sampled block, the header past block 0, neither
        rewrite_in_place(weights, offset)
        digests.append(digest.file_digest(weights, True))
    assert len(set(digests[:3])) == 3  # a change in a sampled block or in the header is seen
    assert digests[3] == digests[2]  # as documented: a change outside both is not


def test_fingerprint_is_kept_per_file_state_within_the_process(tmp_path, monkeypatch):
    folder = copy_teacher(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    view = open_teacher(str(folder))
    monkeypatch.setattr(digest, "SETTLED_NS", -(1 << 62))  # keep digests of files however recently changed
    monkeypatch.setattr(digest, "_digests", Lru(digest._digests.bound))
    reads = []
    real = digest.os.pread
    monkeypatch.setattr(digest.os, "pread", lambda *a: reads.append(1) or real(*a))
    first = teacher_fingerprint(view)
    n = len(reads)
    assert n and teacher_fingerprint(view) == first and len(reads) == n  # not hashed again
    time.sleep(0.02)  # past the file system's timestamp granularity
    rewrite_in_place(weights, weights.stat().st_size // 2)  # ctime moves even though mtime is set back
    assert teacher_fingerprint(view) != first and len(reads) > n
