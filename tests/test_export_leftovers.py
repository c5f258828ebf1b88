"""Exports leave nothing behind and lose nothing: interrupted runs (SIGTERM, kill -9), --force, a full disk,
parent folders an export created, and folder names with control characters."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from projection import ProjectionError, Projector, Strategy, export_student, load_student
from projection.cli import main

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}
SEED = {**STUDENT, "layout": "seed"}

HOLD = """# sitecustomize, imported at start-up: the export stops after its first tensor until a signal ends it
import os, time
from pathlib import Path
import projection.engine.export as export
write = export.WeightsWriter.write
def held(self, key, t):
    write(self, key, t)
    Path(os.environ["HELD_EXPORT_READY"]).touch()
    time.sleep(600)
export.WeightsWriter.write = held
"""


@pytest.fixture
def student_file(tmp_path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(STUDENT))
    return path


def held_export(tmp_path: Path, teacher: Path, student: Path, out: Path) -> subprocess.Popen:
    """A real `python -m projection export`, held mid-export: its first tensor written, the rest not."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOLD)
    ready = tmp_path / f"ready-{out.name}"
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "HELD_EXPORT_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "projection", "export", "--teacher", str(teacher), "--student",
                             str(student), "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the export did not reach its first tensor: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def cli(capsys, *argv: object) -> tuple[int, str]:
    """Exit code and the one error line of a failed command."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    return code, err


# ---------------------------------------------------------------- interrupted exports


def test_sigterm_mid_export_leaves_no_partial_folder(tiny_wan, tmp_path, student_file):
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = held_export(tmp_path, tiny_wan.original_dir, student_file, parent / "student")
    assert len(partials(parent)) == 1  # mid-export
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # the export's cleanup ran, then the conventional status
    assert list(parent.iterdir()) == []


def test_next_export_removes_partials_of_dead_exports_only(tiny_wan, tmp_path, student_file):
    from projection.io.writer import MARKER, write_marker

    parent = tmp_path / "exports"
    parent.mkdir()
    proc = held_export(tmp_path, tiny_wan.original_dir, student_file, parent / "student")
    proc.kill()  # kill -9: no cleanup can run
    proc.communicate(timeout=120)
    [killed] = partials(parent)
    assert (parent / killed / MARKER).is_file()

    foreign = parent / ".student.partial-0badc0de"  # the same name pattern, not made by this tool
    foreign.mkdir()
    (foreign / "mine.bin").write_bytes(b"keep me")
    live = parent / ".other.partial-00c0ffee"  # an export of a live process (this one) into the same folder
    live.mkdir()
    write_marker(live)
    owner = json.loads((live / MARKER).read_text())
    elsewhere = parent / ".other.partial-0e1e0e1e"  # another machine's (a shared disk): cannot tell, keep
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text(json.dumps({**owner, "host": "another-machine"}))
    reused = parent / ".other.partial-00000001"  # this pid, but an earlier process that had it: dead
    reused.mkdir()
    (reused / MARKER).write_text(json.dumps({**owner, "process": "an-earlier-boot/1"}))

    export_student(Projector.open(str(tiny_wan.original_dir), STUDENT), parent / "student")
    assert partials(parent) == sorted([foreign.name, live.name, elsewhere.name])
    assert (foreign / "mine.bin").read_bytes() == b"keep me"
    assert (parent / "student" / "projection_report.json").is_file()


# ---------------------------------------------------------------- --force


def test_force_replaces_only_a_previous_export_and_only_once_the_new_one_is_complete(tiny_wan, tmp_path,
                                                                                      monkeypatch):
    teacher = str(tiny_wan.original_dir)
    out = tmp_path / "student"
    export_student(Projector.open(teacher, STUDENT), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ProjectionError, match="holds notes.txt besides a previous export"):
        export_student(Projector.open(teacher, STUDENT), out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()

    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with monkeypatch.context() as m:  # a replacement that fails leaves the previous export as it was
        m.setattr("projection.engine.export.WeightsWriter.write", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            export_student(Projector.open(teacher, STUDENT), out, force=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    p = Projector.open(teacher, STUDENT, strategy=Strategy(layers="last"))
    export_student(p, out, force=True)
    assert yaml.safe_load((out / "strategy.yaml").read_text())["layers"] == "last"
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    model = load_student(out)
    for r in p.project():
        assert (model.state_dict()[r.entry.student_key] == r.tensor).all()
    assert [f.name for f in tmp_path.iterdir()] == ["student"]  # neither the old export nor a partial is left

    monkeypatch.setattr("projection.engine.export.exchange", lambda a, b: False)  # no renameat2: two renames instead
    export_student(Projector.open(teacher, STUDENT), out, force=True)
    assert yaml.safe_load((out / "strategy.yaml").read_text())["layers"] == "first"  # the default again
    assert [f.name for f in tmp_path.iterdir()] == ["student"]


def test_force_refuses_a_folder_that_is_holds_or_lies_inside_an_input(tiny_wan, tmp_path):
    teacher = str(tiny_wan.original_dir)
    filled = tmp_path / "filled"  # a previous export, now the student checkpoint to fill
    export_student(Projector.open(teacher, SEED), filled)
    checkpoint = filled / "model.safetensors"
    nested = filled / "previous"  # a previous export inside the student's folder
    export_student(Projector.open(teacher, SEED), nested)
    before = {f: f.read_bytes() for f in filled.rglob("*") if f.is_file()}

    with pytest.raises(ProjectionError, match=f"holds {checkpoint}, an input of this export"):
        export_student(Projector.open(teacher, str(checkpoint)), filled, force=True)
    with pytest.raises(ProjectionError, match=f": is {filled}, an input of this export"):
        export_student(Projector.open(teacher, str(filled)), filled, force=True)
    with pytest.raises(ProjectionError, match=f"is inside {filled}, an input of this export"):
        export_student(Projector.open(teacher, str(filled)), nested, force=True)
    link = tmp_path / "link"
    link.symlink_to(nested)
    with pytest.raises(ProjectionError, match="symbolic link"):
        export_student(Projector.open(teacher, SEED), link, force=True)
    assert {f: f.read_bytes() for f in filled.rglob("*") if f.is_file()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["filled", "link"]


def test_force_in_the_cli_refuses_a_folder_holding_the_strategy_or_rules_file(tiny_wan, tmp_path, student_file,
                                                                              capsys):
    out = tmp_path / "student"
    export_student(Projector.open(str(tiny_wan.original_dir), STUDENT), out)
    base = ["export", "--teacher", tiny_wan.original_dir, "--student", student_file, "--out", out, "--force"]
    for option, name in (("--strategy", "strategy.yaml"), ("--rules", "strategy.yaml")):
        if option == "--rules":
            (out / "strategy.yaml").write_text("{}\n")  # now valid rules (none): the export's file as --rules
        code, err = cli(capsys, *base, option, out / name)
        assert code == 2 and f"holds {out / name}, an input of this export" in err
    assert (out / "projection_report.json").is_file()


# ---------------------------------------------------------------- failed writes


def _fail(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("call, code", [("pwrite", errno.ENOSPC), ("posix_fallocate", errno.EFBIG)])
def test_disk_full_or_file_too_large_is_one_line_naming_the_file_and_leaves_nothing(
        tiny_wan, tmp_path, student_file, monkeypatch, capsys, call, code):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "a" / "b" / "c"  # a/ does not exist: the export creates it, and removes it on failure
    monkeypatch.setattr(os, call, _fail(code))
    status, err = cli(capsys, "export", "--teacher", tiny_wan.original_dir, "--student", student_file, "--out", out)
    assert status == 2
    assert f"{out / 'model.safetensors'}: cannot write the export: {os.strerror(code)}" in err
    assert list(disk.iterdir()) == []


def test_a_failed_export_removes_the_folders_it_created_and_only_those(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    (tmp_path / "kept").mkdir()

    def interrupt(i: int, n: int, what: str) -> None:
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_student(p, tmp_path / "kept" / "a" / "b" / "student", progress=interrupt)
    assert [f.name for f in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name, char", [("bad\nname", "000A"), ("bad\x1b[31mname", "001B"), ("bad\x7f", "007F"),
                                        ("bad\u202etxt", "202E"), ("bad\rdir/student", "000D")])
def test_export_names_with_control_characters_are_refused(tiny_wan, tmp_path, student_file, capsys, name, char):
    out = tmp_path / "exports" / name
    code, err = cli(capsys, "export", "--teacher", tiny_wan.original_dir, "--student", student_file, "--out", out)
    assert code == 2 and f"control character U+{char}" in err
    assert not (tmp_path / "exports").exists()
