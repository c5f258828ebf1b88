"""The `projection` command line: inspect, map, export, spectra and demo, through `main(argv)` and once through
`python -m projection`. Success prints what the core computes; every error is one line on stderr and exit 2."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from projection import open_checkpoint
from projection.cli import main
from projection.core.mapping import STATUSES
from projection.demo.folder import demo_state_dict
from projection.engine.build import load_student

TEACHER = {"dim": 128, "ffn_dim": 512, "num_heads": 4, "num_layers": 8, "in_dim": 4, "out_dim": 4,
           "text_dim": 64, "freq_dim": 64}  # the demo teacher (trained, float16)
TINY = {"dim": 64, "num_heads": 2, "ffn_dim": 48, "num_layers": 2, "in_dim": 4, "out_dim": 4, "text_dim": 24,
        "freq_dim": 16}
TINY_STUDENT = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, out: str, err: str, *parts: str) -> str:
    """A failed command: exit 2, nothing on stdout, exactly one 'error: ...' line on stderr naming `parts`."""
    assert code == 2
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def header_facts(files: list[Path]) -> tuple[int, int, int]:
    """(keys, params, bytes) straight from the safetensors headers, independently of projection."""
    keys = params = nbytes = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                s = h.get_slice(k)
                n = math.prod(s.get_shape())
                size = {"F16": 2, "BF16": 2, "F32": 4}[s.get_dtype()]
                keys, params, nbytes = keys + 1, params + n, nbytes + n * size
    return keys, params, nbytes


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo, written by the `demo` command itself."""
    out = tmp_path_factory.mktemp("cli") / "demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(out)]) == 0
    assert buf.getvalue() == (f"demo written to {out} (a small Wan teacher trained on handwritten digits, with its "
                              "calibration set)\n")
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Path:
    """A Wan2.2-style root: high_noise_model/ (one file) and low_noise_model/ (sharded), tiny and distinct."""
    root = tmp_path_factory.mktemp("experts") / "Wan2.2-tiny"
    for i, sub in enumerate(("high_noise_model", "low_noise_model")):
        folder = root / sub
        folder.mkdir(parents=True)
        state = demo_state_dict(TINY, seed=i + 1)
        if sub == "high_noise_model":
            save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        else:
            keys = list(state)
            names = [f"diffusion_pytorch_model-0000{j + 1}-of-00002.safetensors" for j in range(2)]
            for j, name in enumerate(names):
                save_file({k: state[k] for k in keys[j::2]}, str(folder / name))
            (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: names[j % 2] for j, k in enumerate(keys)}}))
        (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY}))
    return root


@pytest.fixture
def tiny_student(tmp_path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(TINY_STUDENT))
    return path


# ---------------------------------------------------------------- demo


def test_demo_command_writes_a_teacher_in_two_formats_and_student_configs(demo, capsys):
    assert sorted(p.name for p in demo.iterdir()) == ["README.txt", "calibration.safetensors", "demo.json",
                                                      "student-diffusers.yaml", "student-seed.yaml",
                                                      "student-wanlite.yaml",
                                                      "teacher-diffusers", "teacher-wan"]
    assert "TRAINED" in (demo / "README.txt").read_text()
    assert json.loads((demo / "teacher-wan" / "config.json").read_text())["_class_name"] == "WanModel"
    assert len(list((demo / "teacher-diffusers").glob("diffusion_pytorch_model-0000?-of-00003.safetensors"))) == 3
    assert yaml.safe_load((demo / "student-seed.yaml").read_text())["layout"] == "seed"
    before = snapshot(demo)
    code, out, err = run(capsys, "demo", "--out", demo)  # already there: left as it is
    assert (code, err) == (0, "") and "demo written to" in out
    assert snapshot(demo) == before


def test_an_older_demo_folder_gains_the_student_configs_it_lacks(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert run(capsys, "demo", "--out", demo)[0] == 0
    (demo / "student-diffusers.yaml").unlink()  # a demo written before the diffusers layout existed
    (demo / "student-seed.yaml").write_text("layout: seed\ndim: 32\n")  # the user's edit
    assert run(capsys, "demo", "--out", demo)[0] == 0
    assert yaml.safe_load((demo / "student-diffusers.yaml").read_text())["layout"] == "diffusers"
    assert (demo / "student-seed.yaml").read_text() == "layout: seed\ndim: 32\n"  # never replaced


def test_demo_command_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert_error(*run(capsys, "demo", "--out", tmp_path), str(tmp_path), "not a demo folder", "--force")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- inspect


def test_inspect_text(demo, capsys):
    teacher = demo / "teacher-diffusers"
    code, out, err = run(capsys, "inspect", teacher)
    assert (code, err) == (0, "")
    keys, params, nbytes = header_facts(sorted(teacher.glob("*.safetensors")))
    lines = out.splitlines()
    assert lines[0] == f"source   {teacher}"
    assert lines[1] == "format   sharded-safetensors (3 file(s))"
    assert lines[2].startswith("family   wan-diffusers: Wan (diffusers WanTransformer3DModel names)")
    assert lines[3].startswith("config   ")
    config = dict(kv.split("=") for kv in lines[3].removeprefix("config   ").split(", "))
    assert {k: int(config[k]) for k in TEACHER} == TEACHER and config["head_dim"] == "32"
    assert lines[4] == f"keys     {keys}" and keys == 15 + 27 * 8
    assert lines[5] == f"params   {params:,}"
    assert lines[6] == "dtypes   {'float16': 231}"
    assert lines[7] == f"size     {nbytes / 1e9:.3f} GB"


def test_inspect_json(demo, capsys):
    teacher = demo / "teacher-wan"
    code, out, err = run(capsys, "inspect", teacher, "--json")
    assert (code, err) == (0, "")
    info = json.loads(out)
    keys, params, nbytes = header_facts([teacher / "diffusion_pytorch_model.safetensors"])
    assert info["format"] == "safetensors" and info["family"] == "wan" and info["layout"] == "wan"
    assert info["files"] == [str(teacher / "diffusion_pytorch_model.safetensors")]
    assert (info["keys"], info["params"], info["bytes"]) == (keys, params, nbytes)
    assert info["dtypes"] == {"float16": keys} and info["expert"] is None
    assert {k: info["config"][k] for k in TEACHER} == TEACHER


def test_inspect_two_expert_root(experts, capsys):
    line = assert_error(*run(capsys, "inspect", experts), str(experts), "choose an expert",
                        "'high' (high_noise_model/)", "'low' (low_noise_model/)")
    assert line.count("error:") == 1
    code, out, err = run(capsys, "inspect", experts, "--expert", "low", "--json")
    assert (code, err) == (0, "")
    info = json.loads(out)
    assert info["expert"] == "low" and info["format"] == "sharded-safetensors"
    assert [Path(f).parent.name for f in info["files"]] == ["low_noise_model"] * 2
    assert info["keys"] == 15 + 27 * 2 and {k: info["config"][k] for k in TINY} == TINY
    code, out, err = run(capsys, "inspect", experts, "--expert", "high")
    assert code == 0 and "format   safetensors (1 file(s)), expert high" in out.splitlines()


def test_inspect_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert_error(*run(capsys, "inspect", missing), str(missing), "no such file or folder")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not valid json!")
    assert_error(*run(capsys, "inspect", bad), str(bad), "corrupt safetensors header")
    (tmp_path / "empty").mkdir()
    assert_error(*run(capsys, "inspect", tmp_path / "empty"), str(tmp_path / "empty"), "unknown layout")
    with pytest.raises(SystemExit) as info:  # argparse: the choices are enforced before anything runs
        main(["inspect", str(tmp_path), "--expert", "medium"])
    assert info.value.code == 2
    assert "invalid choice: 'medium'" in capsys.readouterr().err


# ---------------------------------------------------------------- map


def test_map_json_entries_and_coverage(demo, capsys):
    code, out, err = run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", demo / "student-seed.yaml",
                         "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    entries = data["entries"]
    teacher = open_checkpoint(demo / "teacher-wan")
    assert len(entries) == 10 + 12 * 4  # the seeds' student: 10 top keys + 12 per block
    for e in entries:
        assert {"student_key", "status", "teacher_keys", "student_shape", "teacher_shapes", "params",
                "reason"} <= set(e)
        assert e["status"] in STATUSES
        assert e["params"] == math.prod(e["student_shape"])
        if e["status"] == "skipped":
            assert e["reason"]
        else:
            assert e["teacher_keys"] and all(k in teacher for k in e["teacher_keys"])
            assert e["teacher_shapes"] == [list(teacher.tensors[k].shape) for k in e["teacher_keys"]]
    by_key = {e["student_key"]: e for e in entries}
    qkv = by_key["blocks.2.attn.in_proj_weight"]  # the default layers (first): student block 2 <- teacher block 2
    assert qkv["status"] == "concatenated" and qkv["student_shape"] == [192, 64]
    assert qkv["teacher_keys"] == [f"blocks.2.self_attn.{p}.weight" for p in "qkv"]
    assert by_key["conv_out.bias"]["status"] == "skipped"
    moved = [e for e in entries if e["status"] != "skipped"]
    cov = data["coverage"]
    assert cov["keys"] == {"transferred": len(moved), "total": len(entries), "rate": len(moved) / len(entries)}
    assert cov["params"]["transferred"] == sum(e["params"] for e in moved)
    assert cov["params"]["total"] == sum(e["params"] for e in entries)
    assert data["layers"] == [0, 1, 2, 3]  # the default layers: first


def test_map_csv_and_text_agree_with_json(demo, capsys):
    args = ["map", "--teacher", demo / "teacher-diffusers", "--student", demo / "student-seed.yaml"]
    _, out, _ = run(capsys, *args, "--json")
    data = json.loads(out)
    code, out, err = run(capsys, *args, "--csv")
    assert (code, err) == (0, "")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["student_key", "status", "teacher_keys", "student_shape", "teacher_shapes", "params",
                             "transforms", "retained_weight_energy", "reason"]
    assert len(rows) == len(data["entries"])
    for row, e in zip(rows, data["entries"]):
        assert row["student_key"] == e["student_key"] and row["status"] == e["status"]
        assert row["teacher_keys"].split() == e["teacher_keys"]
        assert row["student_shape"] == "x".join(map(str, e["student_shape"]))
        assert row["teacher_shapes"].split() == ["x".join(map(str, s)) for s in e["teacher_shapes"]]
        assert int(row["params"]) == e["params"] and row["reason"] == e["reason"]
        assert float(row["retained_weight_energy"]) == e["retained_weight_energy"]  # full precision, as in JSON
    code, out, err = run(capsys, *args)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["student", "key", "status", "weight", "energy", "kept", "teacher", "keys", "or",
                                "reason"]
    for e in data["entries"]:
        line = next(line for line in lines if line.split()[:1] == [e["student_key"]])
        assert line.split()[1:3] == [e["status"], f"{e['retained_weight_energy']:.1%}"]
    cov = data["coverage"]
    assert (f"coverage: {cov['keys']['transferred']}/{cov['keys']['total']} keys ({cov['keys']['rate']:.1%}), "
            f"{cov['params']['transferred']:,}/{cov['params']['total']:,} params") in out
    energy = data["retained_weight_energy"]
    assert f"retained weight energy: {energy['mean']:.1%} (" in out and "a weight statistic" in out


def test_map_energy_counts_skipped_keys_as_zero_and_matches_the_core(demo, capsys):
    from projection import Projector

    student = demo / "student-seed.yaml"
    code, out, err = run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", student, "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    p = Projector.open(str(demo / "teacher-wan"), str(student))
    core = p.summary(p.project())["retained_weight_energy"]
    assert data["retained_weight_energy"] == core
    entries = data["entries"]
    assert all(e["retained_weight_energy"] == 0.0 for e in entries if e["status"] == "skipped")
    mean = sum(e["retained_weight_energy"] * e["params"] for e in entries) / sum(e["params"] for e in entries)
    assert core["mean"] == pytest.approx(mean, rel=1e-12)


def test_map_no_energy_leaves_the_energy_column_empty(demo, capsys):
    args = ["map", "--teacher", demo / "teacher-wan", "--student", demo / "student-wanlite.yaml"]
    code, out, err = run(capsys, *args, "--no-energy")
    assert (code, err) == (0, "")
    assert "retained weight energy: not computed" in out and "--energy computes it" in out
    assert all(line.split()[2] == "—" for line in out.splitlines()[1:124])
    code, out, _ = run(capsys, *args, "--no-energy", "--json")
    data = json.loads(out)
    assert data["retained_weight_energy"] is None and all(e["retained_weight_energy"] is None
                                                          for e in data["entries"])


def renamed_student(demo: Path, path: Path) -> Path:
    """The demo's reference student with its own names (layers.N.wq, ...): nothing maps without rules."""
    import re

    from projection.arch.config import student_config
    from projection.arch.layout import build_student
    from projection.core.models import open_teacher

    teacher = open_teacher(str(demo / "teacher-wan"))
    config = student_config("wanlite", {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}, teacher.config)
    names = [(r"^blocks\.", "layers."), (r"\.self_attn\.(q|k|v|o)\.", r".w\1."), (r"\.cross_attn\.", ".cross."),
             (r"\.ffn\.0\.", ".fc1."), (r"\.ffn\.2\.", ".fc2."), (r"^patch_embedding", "patchify"),
             (r"^head\.head", "final.linear"), (r"^head\.modulation", "final.adaln"), (r"^text_embedding", "text_in"),
             (r"^time_embedding", "time_in"), (r"^time_projection", "time_out")]
    state = {}
    for key, value in build_student(config).state_dict().items():
        for pattern, repl in names:
            key = re.sub(pattern, repl, key)
        state[key] = value.contiguous()
    save_file(state, str(path))
    return path


def test_map_exits_1_when_nothing_transfers(demo, tmp_path, capsys):
    student = renamed_student(demo, tmp_path / "custom.safetensors")
    for fmt in ([], ["--json"], ["--csv"]):
        code, out, err = run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", student, *fmt)
        assert code == 1
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("nothing transfers: 0% coverage")
        assert str(student) in lines[0] and "--suggest-rules" in lines[0]
        assert out  # the table, JSON or CSV still shows what failed to map
    assert json.loads(run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", student,
                          "--json")[1])["coverage"]["keys"]["transferred"] == 0


def test_map_suggest_rules_then_map_transfers_everything(demo, tmp_path, capsys):
    student = renamed_student(demo, tmp_path / "custom.safetensors")
    base = ["map", "--teacher", demo / "teacher-wan", "--student", student]
    mine = tmp_path / "rules.yaml"
    mine.write_text("# keep this comment\nfinal.linear: {skip: \"trained from scratch\"}\n")
    code, out, err = run(capsys, *base, "--rules", mine, "--suggest-rules")
    assert (code, err) == (0, "")
    assert out.startswith(mine.read_text()) and "# Suggested rules" in out and "review" in out
    rules = yaml.safe_load(out)
    assert rules["layers.{i}.wq"] == "blocks.{i}.self_attn.q" and rules["layers.{i}.cross"] == "blocks.{i}.cross_attn"
    assert rules["final.linear"] == {"skip": "trained from scratch"}  # the user's rule, not a suggestion
    suggested = tmp_path / "suggested.yaml"
    suggested.write_text(out)
    code, out, err = run(capsys, *base, "--rules", suggested, "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    skipped = [e["student_key"] for e in data["entries"] if e["status"] == "skipped"]
    assert skipped == ["final.linear.bias", "final.linear.weight"]
    # with every key transferring there is nothing to suggest: the rules come back as they are
    code, out, err = run(capsys, *base, "--rules", suggested, "--suggest-rules")
    assert code == 0 and out == suggested.read_text()
    assert err == ("no rules to suggest: the 2 student keys that transfer nothing are skipped on purpose or fit no "
                   "unused teacher tensor\n")


def test_map_csv_into_head_is_quiet(demo):
    command = (f"{shlex.quote(sys.executable)} -m projection map --teacher {shlex.quote(str(demo / 'teacher-wan'))} "
               f"--student {shlex.quote(str(demo / 'student-seed.yaml'))} --csv | head -2")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.splitlines()[0].startswith("student_key,status,") and len(done.stdout.splitlines()) == 2


def test_map_rules_and_strategy_files(demo, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"blocks.{i}.mlp.2": {"skip": "kept random on purpose"}}))
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text("layers: last\nwidth: uniform\n")
    base = ["map", "--teacher", demo / "teacher-wan", "--student", demo / "student-seed.yaml", "--json"]
    before = json.loads(run(capsys, *base)[1])
    code, out, err = run(capsys, *base, "--rules", rules, "--strategy", strategy)
    assert (code, err) == (0, "")
    after = json.loads(out)
    assert after["layers"] == [4, 5, 6, 7] and before["layers"] == [0, 1, 2, 3]
    changed = {e["student_key"] for e in after["entries"] if e["reason"] == "kept random on purpose"}
    assert changed == {f"blocks.{i}.mlp.2.{p}" for i in range(4) for p in ("weight", "bias")}
    assert all(e["status"] == "skipped" for e in after["entries"] if e["student_key"] in changed)
    assert after["coverage"]["keys"]["transferred"] == before["coverage"]["keys"]["transferred"] - 8
    mlp0 = next(e for e in after["entries"] if e["student_key"] == "blocks.0.mlp.0.weight")
    assert mlp0["teacher_keys"] == ["blocks.4.ffn.0.weight"] and "uniform" in " ".join(mlp0["transforms"])


def test_map_bad_rules_or_strategy_is_one_line(demo, tmp_path, capsys):
    base = ["map", "--teacher", demo / "teacher-wan", "--student", demo / "student-seed.yaml"]
    rules = tmp_path / "rules.yaml"
    rules.write_text("a: [\n  b\n")  # yaml's own message spans several lines
    assert_error(*run(capsys, *base, "--rules", rules), str(rules), "invalid YAML")
    assert_error(*run(capsys, *base, "--rules", tmp_path / "none.yaml"), "none.yaml", "cannot read rules")
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text("width: widest\nfoo: 1\n")
    assert_error(*run(capsys, *base, "--strategy", strategy), str(strategy), "width", "foo")
    assert_error(*run(capsys, "map", "--teacher", demo / "student-seed.yaml", "--student",
                      demo / "student-seed.yaml"), "student-seed.yaml", "unknown file type")
    with pytest.raises(SystemExit) as info:
        main([*map(str, base), "--json", "--csv"])
    assert info.value.code == 2
    capsys.readouterr()


def test_map_a_two_expert_teacher_needs_expert(experts, tiny_student, capsys):
    base = ["map", "--teacher", experts, "--student", tiny_student, "--json"]
    assert_error(*run(capsys, *base), "choose an expert", "'high'", "'low'")
    code, out, err = run(capsys, *base, "--expert", "low")
    assert (code, err) == (0, "")
    entries = json.loads(out)["entries"]
    q = next(e for e in entries if e["student_key"] == "blocks.1.self_attn.q.weight")
    assert q["teacher_shapes"] == [[64, 64]] and q["student_shape"] == [32, 32]


# ---------------------------------------------------------------- export


def test_export_writes_the_student_and_never_touches_the_teacher(demo, tmp_path, capsys):
    teacher = demo / "teacher-diffusers"
    before = snapshot(teacher)
    out_dir = tmp_path / "student"
    args = ["export", "--teacher", teacher, "--student", demo / "student-seed.yaml", "--out", out_dir]
    code, out, err = run(capsys, *args, "--dtype", "bfloat16")
    assert code == 0
    assert out.startswith(f"wrote {out_dir}: 34/58 keys")
    exported = json.loads((out_dir / "projection_report.json").read_text())["retained_weight_energy"]["mean"]
    assert f"retained weight energy {100 * exported:.1f}% (a weight statistic), " in out  # the app's format
    assert "function: not measured; --calibration" in out
    assert "[58/58]" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "projection_report.json", "strategy.yaml"]
    student = open_checkpoint(out_dir)
    report = json.loads((out_dir / "projection_report.json").read_text())
    assert sorted(student.keys()) == sorted(e["student_key"] for e in report["entries"])
    assert student.dtypes() == {"bfloat16": 58}
    assert report["provenance"]["teacher"] == str(teacher)
    assert report["provenance"]["layout"] == "seed"
    assert "layout" not in json.loads((out_dir / "config.json").read_text())  # the report holds it
    assert snapshot(teacher) == before

    # an existing folder is refused without --force, and left as it was
    (out_dir / "stale.txt").write_text("old")
    kept = snapshot(out_dir)
    assert_error(*run(capsys, *args), str(out_dir), "already exists", "--force")
    assert snapshot(out_dir) == kept
    assert_error(*run(capsys, *args, "--force"), str(out_dir), "holds stale.txt besides a previous export")
    assert snapshot(out_dir) == kept
    (out_dir / "stale.txt").unlink()
    code, out, err = run(capsys, *args, "--force")
    assert code == 0
    assert open_checkpoint(out_dir).dtypes() == {"float32": 58}
    assert snapshot(teacher) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no partial or old folders left behind


def test_export_refuses_the_teacher_folder(demo, capsys):
    teacher = demo / "teacher-wan"
    before = snapshot(teacher)
    for out_dir in (teacher, teacher / "student"):
        assert_error(*run(capsys, "export", "--teacher", teacher, "--student", demo / "student-seed.yaml",
                          "--out", out_dir, "--force"), "refusing to write into or over the teacher's folder")
    assert snapshot(teacher) == before


def test_export_into_a_folder_that_cannot_be_created_is_one_line(demo, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run(capsys, "export", "--teacher", demo / "teacher-wan", "--student", demo / "student-seed.yaml",
                         "--out", blocker / "student")
    progress, _, last = err.strip("\n").rpartition("\n")  # the projection's progress line comes first
    assert_error(code, out, last + "\n", str(blocker), "Not a directory")
    assert "error" not in progress and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- spectra


def test_spectra_json_matches_an_independent_svd(demo, capsys):
    teacher = demo / "teacher-wan"
    code, out, err = run(capsys, "spectra", "--teacher", teacher, "--key", "blocks.3.self_attn.q.weight", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    with safe_open(str(teacher / "diffusion_pytorch_model.safetensors"), "pt") as h:
        w = h.get_tensor("blocks.3.self_attn.q.weight")
    expected = torch.linalg.svdvals(w.double())
    assert data["key"] == "blocks.3.self_attn.q.weight" and data["shape"] == [128, 128]
    s = torch.tensor(data["singular_values"], dtype=torch.float64)
    assert torch.allclose(s, expected, rtol=1e-9, atol=1e-12)
    curve = torch.tensor(data["cumulative_energy"], dtype=torch.float64)
    assert len(curve) == 128 and (curve.diff() >= 0).all() and abs(curve[-1].item() - 1) < 1e-12
    assert torch.allclose(curve, expected.square().cumsum(0) / expected.square().sum(), atol=1e-12)


def test_spectra_text_and_native_names(demo, capsys):
    code, out, err = run(capsys, "spectra", "--teacher", demo / "teacher-diffusers", "--key",
                         "blocks.3.attn1.to_q.weight")  # a diffusers name resolves to the canonical one
    assert (code, err) == (0, "")
    _, js, _ = run(capsys, "spectra", "--teacher", demo / "teacher-wan", "--key", "blocks.3.self_attn.q.weight",
                   "--json")
    curve = torch.tensor(json.loads(js)["cumulative_energy"])
    lines = out.splitlines()
    assert lines[0] == "blocks.3.self_attn.q.weight [128, 128]: 128 singular values"
    for line, share in zip(lines[1:4], (0.5, 0.9, 0.99)):
        assert line == f"  rank for {share:.0%} of energy: {int((curve < share).sum()) + 1}"
    top = [float(v) for v in lines[4].removeprefix("  top 10: ").split(", ")]
    assert len(top) == 10 and top == sorted(top, reverse=True)


def test_spectra_errors(demo, tmp_path, capsys):
    assert_error(*run(capsys, "spectra", "--teacher", demo / "teacher-wan", "--key", "blocks.99.ffn.0.weight"),
                 str(demo / "teacher-wan"), "no tensor named 'blocks.99.ffn.0.weight'")
    other = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.ones(2, 2)}, str(other))
    assert_error(*run(capsys, "spectra", "--teacher", other, "--key", "encoder.layer.0.weight"), str(other),
                 "not a Wan checkpoint")


# ---------------------------------------------------------------- the module entry point and argparse


def test_python_dash_m_projection(demo):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "projection", "inspect", str(demo / "teacher-wan"), "--json"],
                        check=False, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["keys"] == 231


def test_projection_alone_prints_help_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["projection"])  # `python -m projection` calls main() with no arguments
    code = main()
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.startswith("usage: projection") and "demo" in out and "export" in out
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(capsys):
    for argv in (["inspect"], ["map", "--teacher", "t"], ["nonsense"], ["export", "--teacher", "t",
                                                                             "--student", "s"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "usage: projection" in capsys.readouterr().err


# ---------------------------------------------------------------- students: heads, rules, nothing to export, device


def test_a_checkpoint_students_heads_are_inferred_loudly_or_given_with_num_heads(tmp_path, capsys):
    from projection.demo.folder import write_shape_only_teacher
    from test_mapping import SMALL_TEACHER, bare_seed_student

    teacher = write_shape_only_teacher(tmp_path / "teacher", SMALL_TEACHER)  # 4 heads of 12
    student = bare_seed_student(tmp_path / "student")  # width 24, heads not recorded
    code, out, err = run(capsys, "map", "--teacher", teacher, "--student", student)
    assert code == 0, err
    assert "WARNING: Student heads inferred: 2 x 12; the checkpoint does not record heads" in out
    code, out, _ = run(capsys, "map", "--teacher", teacher, "--student", student, "--json")
    assert any("heads inferred: 2 x 12" in w for w in json.loads(out)["warnings"])
    assert_error(*run(capsys, "map", "--teacher", teacher, "--student", student, "--num-heads", "1"),
                 "1 heads of 24", "e.g. num_heads 2 (head dim 12)")
    code, out, err = run(capsys, "export", "--teacher", teacher, "--student", student, "--out", tmp_path / "a")
    assert code == 0, err
    assert "WARNING: Student heads inferred: 2 x 12" in out
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["dim"], config["num_heads"]) == (24, 2)
    model = load_student(tmp_path / "a")  # the one config builds the exported student
    assert model.blocks[0].attn.num_heads == 2
    assert model(torch.randn(1, 4, 6, 6), torch.tensor([3.0]), torch.randn(1, 2, 32)).shape == (1, 4, 6, 6)
    code, out, err = run(capsys, "export", "--teacher", teacher, "--student", student, "--out", tmp_path / "b",
                         "--num-heads", "4")
    assert code == 0 and "heads inferred" not in out, err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_heads"] == 4
    code, out, _ = run(capsys, "inspect", student)
    assert "heads    inferred: 1 x 24; the checkpoint does not record heads" in out  # no teacher: the layout's default


def test_a_rule_that_matches_no_student_key_is_one_line(demo, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("blocks.{i}.mlpp.0: blocks.{i}.ffn.0\n")
    assert_error(*run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", demo / "student-seed.yaml",
                      "--rules", rules), "rule 'blocks.{i}.mlpp.0' matches no student key",
                 "did you mean 'blocks.{i}.mlp.0'")


def test_export_where_nothing_maps_writes_nothing(demo, tmp_path, capsys):
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(tmp_path / "unknown.safetensors"))
    assert_error(*run(capsys, "export", "--teacher", demo / "teacher-wan", "--student",
                      tmp_path / "unknown.safetensors", "--out", tmp_path / "out"),
                 "nothing to export", "none of the student's 1 keys maps")
    assert [f.name for f in tmp_path.iterdir()] == ["unknown.safetensors"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_device_cuda_without_cuda_is_one_line(demo, tmp_path, capsys):
    assert_error(*run(capsys, "export", "--teacher", demo / "teacher-wan", "--student", demo / "student-wanlite.yaml",
                      "--out", tmp_path / "out", "--device", "cuda"), "device 'cuda'", "CUDA is not available")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- hostile input and unexpected errors


def test_hostile_inputs_are_one_line_errors_naming_the_file(demo, tmp_path, capsys, fifo):
    base = ["map", "--teacher", demo / "teacher-wan", "--student", demo / "student-wanlite.yaml"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1\n# réglage\n".encode("latin-1"))
    for option in ("--strategy", "--rules"):
        assert_error(*run(capsys, *base, option, latin1), str(latin1), "not UTF-8 text (invalid byte at offset 11, line 2)")
    seed = tmp_path / "seed.yaml"
    seed.write_text("seed: 9223372036854775808\n")
    assert_error(*run(capsys, *base, "--strategy", seed), str(seed), "seed: Input should be less than")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"b{i}: [*a, *a, *a, *a]\n" for i in range(300)))
    assert_error(*run(capsys, *base, "--rules", bomb), str(bomb), "YAML anchors and aliases are not accepted")
    pipe = fifo(tmp_path / "pipe.yaml")
    for option in ("--strategy", "--rules", "--student"):  # the last --student wins
        assert_error(*run(capsys, *base, option, pipe), str(pipe), "not a regular file (a FIFO)")
    student = tmp_path / "student.yaml"
    for text, problem in (("num_layers: 50000\n", "num_layers 50000 is more than the teacher's 8 blocks"),
                          ("num_layer: 2\n", "unknown field 'num_layer' (did you mean 'num_layers'?)"),
                          ("dim: true\n", "'dim' must be a positive integer, got True")):
        student.write_text(text)
        assert_error(*run(capsys, "map", "--teacher", demo / "teacher-wan", "--student", student), str(student),
                     problem)
    deep = tmp_path / "deep.safetensors"
    raw = b"[" * 200_000 + b"]" * 200_000
    deep.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_error(*run(capsys, "inspect", deep), str(deep), "JSON nested too deeply")
    torch_pipe = fifo(tmp_path / "x.pt")
    assert_error(*run(capsys, "inspect", torch_pipe), str(torch_pipe), "not a regular file (a FIFO)")


@pytest.mark.parametrize("exc,line", [
    (ValueError("bad value\nsecond line"), "error: bad value second line"),
    (json.JSONDecodeError("Expecting value", "x", 0), "error: Expecting value: line 1 column 1 (char 0)"),
    (yaml.YAMLError("bad yaml"), "error: bad yaml"),
    (PermissionError(13, "Permission denied", "/out/x"), "error: /out/x: Permission denied"),
    (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),
], ids=["value", "json", "yaml", "os-with-path", "os-without-path"])
def test_errors_the_cli_can_name_are_one_line_with_exit_2(demo, capsys, monkeypatch, exc, line):
    import projection.cli as cli

    def failing(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_inspect", failing)
    assert run(capsys, "inspect", demo / "teacher-wan") == (2, "", line + "\n")


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(demo, capsys, monkeypatch):
    import projection.cli as cli

    def broken(args):
        raise RuntimeError("boom\n  on two lines")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    line = "error: unexpected RuntimeError: boom on two lines"
    assert run(capsys, "inspect", demo / "teacher-wan") == (1, "", f"{line} (run with --debug for the traceback)\n")
    for argv in (["--debug", "inspect", demo / "teacher-wan"], ["inspect", demo / "teacher-wan", "--debug"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (1, "")
        assert err.startswith("Traceback (most recent call last):") and "RuntimeError: boom" in err
        assert err.rstrip("\n").rsplit("\n", 1)[-1] == line
    code, out, err = run(capsys, "spectra", "--teacher", demo / "missing", "--key", "k", "--debug")  # named: too
    assert code == 2 and "Traceback" in err and err.rstrip("\n").rsplit("\n", 1)[-1].startswith("error: ")


# ------------------------------------------------------------------ fidelity


def test_fidelity_reports_the_student_against_random_and_svd(capsys, demo_dir, tmp_path):
    teacher, student = demo_dir / "teacher-wan", demo_dir / "student-wanlite.yaml"
    code, out, _ = run(capsys, "fidelity", "--teacher", teacher, "--student", student, "--samples", 32, "--draws", 2,
                       "--json")
    assert code == 0
    found = json.loads(out)
    assert not found["calibration_synthetic"] and found["noise_levels"] == [0.0, 1.0]
    errors = {name: f["relative_error"] for name, f in found["students"].items()}
    assert list(errors) == ["student", "random init", "svd-per-matrix"]
    assert errors["student"] < errors["random init"] < 2 < 10 < errors["svd-per-matrix"]
    blocks = {name: [r["relative_error"] for r in rows] for name, rows in found["blocks"].items()}
    assert list(blocks) == list(errors) and all(len(v) == 4 for v in blocks.values())  # the student's 4 blocks
    assert blocks["student"][0] < blocks["random init"][0]
    # export --calibration records the same table first in the report, measured on the exported weights
    code, out, _ = run(capsys, "export", "--teacher", teacher, "--student", student, "--out", tmp_path / "s",
                       "--calibration", "demo", "--samples", 32, "--draws", 2)
    assert code == 0 and "velocity error" in out and "(a weight statistic)" in out
    report = json.loads((tmp_path / "s" / "projection_report.json").read_text())
    assert next(iter(report)) == "function"
    assert report["function"]["students"]["student"]["relative_error"] == pytest.approx(errors["student"], rel=1e-6)
    # an exported student is measured as it is (its own weights), not projected again
    code, out, _ = run(capsys, "fidelity", "--teacher", demo_dir / "teacher-diffusers", "--student", tmp_path / "s",
                       "--samples", 32, "--draws", 2, "--json")
    assert json.loads(out)["students"]["student"]["relative_error"] == pytest.approx(errors["student"], rel=1e-4)


def test_fidelity_says_which_calibration_a_teacher_needs(capsys, tiny_wan, demo_dir, tmp_path):
    shallow = tmp_path / "shallow.yaml"
    shallow.write_text("layout: wanlite\nnum_layers: 2\n")
    assert_error(*run(capsys, "fidelity", "--teacher", tiny_wan.original_dir, "--student", shallow),
                 "give --calibration")
    assert_error(*run(capsys, "fidelity", "--teacher", tiny_wan.original_dir, "--student", shallow,
                      "--calibration", "demo"), "tensor 'context' has width 64; the teacher's text_dim is 24")
    code, out, _ = run(capsys, "fidelity", "--teacher", tiny_wan.original_dir, "--student", shallow,
                       "--calibration", "synthetic", "--draws", 1)
    assert code == 0 and "random init" in out
    assert "per student block" in out and "S1<-T1" in out  # the default layers (first): teacher blocks 0 and 1
    student = demo_dir / "student-wanlite.yaml"
    code, out, _ = run(capsys, "fidelity", "--teacher", demo_dir / "teacher-wan", "--student", student,
                       "--calibration", "synthetic", "--draws", 1)
    assert code == 0 and "SYNTHETIC calibration" in out and "WARNING: synthetic calibration" in out


def test_activation_strategies_need_and_use_a_calibration_set(capsys, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    strategy = tmp_path / "act.yaml"
    strategy.write_text("width: activation\nffn: activation\nlayers: influence\n")
    base = ["--teacher", demo_dir / "teacher-wan", "--student", demo_dir / "student-wanlite.yaml", "--strategy", strategy]
    assert_error(*run(capsys, "map", *base), "layers: influence ranks by the teacher's activations",
                 "give a calibration set")
    code, out, _ = run(capsys, "map", *base, "--calibration", "demo", "--json")
    assert code == 0 and json.loads(out)["layers"] not in ([0, 1, 2, 3], [0, 2, 5, 7])  # neither first nor uniform
    code, out, _ = run(capsys, "export", *base, "--calibration", "demo", "--draws", 1, "--out", tmp_path / "s")
    report = json.loads((tmp_path / "s" / "projection_report.json").read_text())
    assert code == 0 and "held-out" in report["activations_from"] and "2 noise draws" in report["activations_from"]
    assert report["layers"] == json.loads(run(capsys, "map", *base, "--calibration", "demo", "--json")[1])["layers"]
    assert list((tmp_path / "cache" / "activations").glob("*.safetensors"))  # cached outside the teacher's folder
