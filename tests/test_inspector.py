"""The inspector's API, driven with gradio_client against the real app launched on 127.0.0.1.

Every number the screen shows must be the core's: the tests compare what the app returns with what
`projection` computes directly, and run the CLI command the app displays.
"""
from __future__ import annotations

import html
import json
import os
import re
import socket
import subprocess
import sys
from html import escape
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # inside gradio
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

from gradio_client import Client
from safetensors.torch import load_file, save_file

from conftest import CUSTOM_RULES, custom_names
from inspector.palette import A_SIDE, B_SIDE
from projection import Projector, Strategy
from projection.core.measure import MEANING
from projection.demo.folder import write_demo, write_shape_only_teacher

ALL = ["exact", "mapped", "concatenated", "skipped"]
TABLE = [ALL, "", "student order"]  # status filter, search, sort
WANLITE = "demo/student-wanlite.yaml"
SEED = "demo/student-seed.yaml"
TEACHER = "demo/teacher-wan"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The app's --root: the demo, a custom-named student and (later) exports live here."""
    from projection.arch.config import student_config
    from projection.arch.layout import build_student
    from projection.core.models import open_teacher

    root = tmp_path_factory.mktemp("inspector-root")
    demo = write_demo(root / "demo")
    teacher = open_teacher(str(demo / "teacher-wan"))
    fields = {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
    state = build_student(student_config("wanlite", fields, teacher.config)).state_dict()
    save_file(custom_names(state), str(root / "custom-student.safetensors"))
    return root


@pytest.fixture(scope="module")
def app(root):
    from inspector.cli import start

    threads = torch.get_num_threads()
    blocks = start(["--root", str(root), "--port", str(free_port())], prevent_thread_lock=True, quiet=True)
    yield blocks
    blocks.close()
    torch.set_num_threads(threads)  # the app runs interactive work single-threaded; give other tests theirs


@pytest.fixture
def client(app) -> Client:
    return Client(app.local_url, verbose=False)


def output_names(app, api: str) -> list[str]:
    fn = next(f for f in app.fns.values() if f.api_name == api)
    return [o.elem_id or o.label or type(o).__name__ for o in fn.outputs if not o.skip_api]


def call(client: Client, app, api: str, *args: Any) -> dict[str, Any]:
    """Call an endpoint; its outputs by elem_id (or label)."""
    result = client.predict(*args, api_name=f"/{api}")
    result = result if isinstance(result, tuple) else (result,)
    names = output_names(app, api)
    assert len(names) == len(result)
    return {name: value.get("value") if isinstance(value, dict) and value.get("__type__") == "update" else value
            for name, value in zip(names, result)}


def load(client: Client, app, teacher: str = TEACHER, student: str = WANLITE, kind: str = "file",
         form: tuple = ("wanlite", 64, 4, 2, 256), heads: int | None = None, preset: str = "none") -> dict[str, Any]:
    return call(client, app, "load", teacher, "single model", kind, student, heads, *form, *TABLE, None, preset)


def sliders(layers: list[int]) -> list[int]:
    return layers + [0] * (48 - len(layers))


def rows(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    table = out["mapping-table"]
    return {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}


def figure(out: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads(out[name]["plot"])


def core(root: Path, student: str = WANLITE, **strategy: Any) -> tuple[Projector, list]:
    p = Projector.open(str(root / TEACHER), str(root / student), strategy=Strategy(**strategy))
    return p, p.project()


# ------------------------------------------------------------------ load and map


def test_load_shows_the_cores_mapping_and_energies(client, app, root):
    out = load(client, app)
    p, results = core(root)
    table = rows(out)
    assert len(table) == len(p.mapping().entries) == 123
    for r in results:
        row = table[r.entry.student_key]
        assert row["status"] == r.entry.status
        assert row["retained weight energy"] == pytest.approx(r.energy, abs=1e-12)
    summary = p.summary(results)
    assert f"{100 * summary['retained_weight_energy']['mean']:.1f}%" in out["cards"]
    assert "Retained weight energy" in out["cards"] and "a weight statistic, not output quality" in out["cards"]
    assert f'title="{escape(MEANING)}"' in out["cards"]  # the whole definition on hover
    assert "123 of 123 student keys" in out["cards"]
    # what the student computes leads: its velocity error at step 0 on 64 held-out demo latents, the core's
    from projection import projected_student
    from projection.demo.teacher import demo_calibration
    from projection.engine.build import random_student, wanlite_from_teacher
    from projection.function.fidelity import fidelity_table

    held_out = demo_calibration().subset(64)
    found = fidelity_table({"student": projected_student(p), "random": random_student(p.student_config(), 0)},
                           wanlite_from_teacher(root / TEACHER), held_out.latents, held_out.context, draws=2)
    card = re.search(r'Velocity error</div><div class="metric">([0-9.]+)</div><div class="card-line">([^<]*)<',
                     out["cards"])
    assert card and card[1] == f"{found['student'].relative_error:.2f}", out["cards"]
    assert card[2] == f"vs the teacher, step 0; random init {found['random'].relative_error:.2f}"
    assert "Loaded in" in out["source-msg"]
    # every status is coloured from the one palette, in the table and in the legend
    from inspector.palette import STATUS_COLORS

    styles = {row[0]: cell for row, cells in zip(out["mapping-table"]["data"], out["mapping-table"]["metadata"]["styling"])
              for cell in cells[1:2]}
    assert STATUS_COLORS["exact"] in styles["head.head.bias"] or STATUS_COLORS["mapped"] in styles["head.head.bias"]
    assert all(STATUS_COLORS[table[k]["status"]] in css for k, css in styles.items())
    assert all(STATUS_COLORS[s] in out["legend"] for s in ALL)


def test_seed_student_shows_concatenated_and_skipped_with_reasons(client, app, root):
    out = load(client, app, teacher="demo/teacher-diffusers", student=SEED)
    table = rows(out)
    stacked = table["blocks.0.attn.in_proj_weight"]
    assert stacked["status"] == "concatenated"
    assert stacked["teacher keys"].split("\n") == [f"blocks.0.attn1.to_{x}.weight" for x in "qkv"]
    assert table["blocks.0.norm1.weight"]["status"] == "skipped"
    assert "no affine" in table["blocks.0.norm1.weight"]["reason"]
    p, _ = core(root, SEED)
    assert {s: sum(r["status"] == s for r in table.values()) for s in ALL} == p.mapping().counts()


def test_bad_paths_get_clear_messages(client, app, root):
    with pytest.raises(Exception, match="no such file or folder"):
        load(client, app, teacher="./no-such-teacher")
    with pytest.raises(Exception, match="outside the folders this app may open"):
        load(client, app, teacher=str(root.parent))
    with pytest.raises(Exception, match="not a Wan checkpoint"):
        load(client, app, teacher="custom-student.safetensors")
    with pytest.raises(Exception, match="heads are kept whole"):
        load(client, app, kind="form", form=("wanlite", 128, 4, 2, 384))  # 2 heads of 64: the teacher's are 32


def test_student_from_the_form(client, app, root):
    out = load(client, app, kind="form", form=("seed", 128, 2, 4, 256))
    table = rows(out)
    assert {k.split(".")[1] for k in table if k.startswith("blocks.")} == {"0", "1"}
    assert "layout: seed" in out["cli"] and 'cat > "$inputs/student.yaml"' in out["cli"]


def test_a_form_preset_reaches_the_student_config(client, app):
    out = load(client, app, kind="form", preset="wan2.1-1.3b")  # the numbers beside it override its widths
    assert "preset: wan2.1-1.3b" in out["cli"] and "dim: 64" in out["cli"]
    table = rows(out)
    assert table["patch_embedding.weight"]["status"] == "skipped"  # the preset's 16 latent channels, not the demo's 4
    assert table["blocks.0.ffn.0.weight"]["status"] != "skipped"
    none = rows(load(client, app, kind="form"))  # no preset: the teacher's latent channels
    assert none["patch_embedding.weight"]["status"] != "skipped"
    with pytest.raises(Exception, match="dim 1536 is more than the teacher's 128"):
        load(client, app, kind="form", form=("wanlite", 1536, 30, 12, 8960), preset="wan2.1-1.3b")


def test_plan_a_student_for_the_loaded_teacher_and_fill_the_form(client, app, root):
    from inspector.sources import NO_PRESET, SourcesView, form_values
    from projection.arch.sizing import plan_students
    from projection.core.models import open_teacher

    load(client, app)
    out = call(client, app, "plan_student", "300k")
    found = plan_students(open_teacher(str(root / TEACHER)).config, 300_000)
    lines = [line for line in out["student-plan"].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(lines) == len(found) == 4
    first = found[0]
    assert lines[0] == (f"| 1 |  | 64 | 256 | 2×32 | 4 | {first.params:,} | {first.share:.1%} | {first.flops:,} | "
                        "diffusers, Wan |")
    assert "ComfyUI needs head dim 128 and freq dim 256" in out["student-plan"]
    with pytest.raises(Exception, match="is not a parameter count"):
        call(client, app, "plan_student", "lots")
    # a row fills the form (and shows it); a preset fills the form's numbers
    filled = SourcesView.fill_form([c.fields for c in found], "2")
    assert filled[0] == "form" and filled[3] == NO_PRESET and filled[4:] == ("diffusers", 96, 1, 3, 384)
    assert form_values({"preset": "wan2.1-1.3b"}) == ("diffusers", 1536, 30, 12, 8960)
    filled = SourcesView.fill_form([{"preset": "wan2.1-1.3b"}], "1")
    assert filled[3:] == ("wan2.1-1.3b", "diffusers", 1536, 30, 12, 8960)


# ------------------------------------------------------------------ refreshes


def test_slider_moves_a_block_and_reuses_cached_tensors(client, app, root):
    load(client, app)
    out = call(client, app, "set_layers", *TABLE, None, *sliders([0, 3, 4, 6]))
    edges = figure(out, "layer-map")["data"][0]["x"]
    assert edges[3] == 3  # student block 1 now reads teacher block 3
    energy = figure(out, "layer-energy")["data"][0]
    assert energy["x"][2] == "S1 ← T3"
    _, results = core(root, layers=[0, 3, 4, 6])
    table = rows(out)
    assert table["blocks.1.ffn.0.weight"]["teacher keys"] == "blocks.3.ffn.0.weight"
    assert table["blocks.1.ffn.0.weight"]["retained weight energy"] == pytest.approx(
        next(r.energy for r in results if r.entry.student_key == "blocks.1.ffn.0.weight"), abs=1e-12)
    assert out["layer-method"] == "custom"
    # moving back reads nothing from the teacher: its tensors are cached
    back = call(client, app, "set_layers", *TABLE, None, *sliders([0, 1, 2, 3]))  # the default (first) again
    assert "read 0 B from the teacher" in back["refresh-info"]


def test_a_slider_value_that_is_no_teacher_block_is_answered_beside_it(client, app):
    load(client, app)
    for bad, words in ((12, "no teacher block 12 (0–7)"), (-1, "no teacher block -1 (0–7)"),
                       (2.5, "2.5 is not a whole block number")):
        result = client.predict(*TABLE, None, *sliders([0, bad, 2, 3]), api_name="/set_layers")
        names = output_names(app, "set_layers")
        slider = result[names.index("S1 ← T")]
        assert slider["value"] == 1 and words in slider["info"] and "invalid" in slider["elem_classes"]
        changed = [n for n, v in zip(names, result) if n != "S1 ← T" and v is not None
                   and not (isinstance(v, dict) and "value" not in v and "value" not in v.get("props", {}))]
        assert not changed  # nothing else is touched: no error on every output
    # the projection kept its layers; the next refresh takes the note away
    view = client.predict(*TABLE, None, api_name="/measure")
    names = output_names(app, "measure")
    energy = json.loads(view[names.index("layer-energy")]["plot"])["data"][0]["x"]
    assert energy[1:] == ["S0 ← T0", "S1 ← T1", "S2 ← T2", "S3 ← T3"]
    cleared = view[names.index("S1 ← T")]
    assert cleared["info"] == "" and "invalid" not in cleared["elem_classes"]
    good = call(client, app, "set_layers", *TABLE, None, *sliders([0, 3, 5, 7]))
    assert figure(good, "layer-energy")["data"][0]["x"][2] == "S1 ← T3"


def test_layer_method_sets_blocks(client, app):
    load(client, app)
    out = call(client, app, "set_strategy", "last", "magnitude", "magnitude", "frequency", "magnitude", "sum",
               "none", 0, *TABLE, None)
    assert figure(out, "layer-energy")["data"][0]["x"][1:] == ["S0 ← T4", "S1 ← T5", "S2 ← T6", "S3 ← T7"]
    assert "layers: last" in out["strategy-yaml"]


def test_strategy_option_changes_numbers_as_the_core_does(client, app, root):
    load(client, app)
    out = call(client, app, "set_strategy", "uniform", "uniform", "first", "first", "uniform", "center",
               "variance", 3, *TABLE, None)
    p, results = core(root, layers="uniform", width="uniform", heads="first", head_dim="first", ffn="uniform",
                      conv="center", rescale="variance", seed=3)
    table = rows(out)
    for r in results:
        assert table[r.entry.student_key]["retained weight energy"] == pytest.approx(r.energy, abs=1e-12)
        steps = [s for s in r.entry.transforms if not s.startswith("from ")]  # the source has its own column
        assert table[r.entry.student_key]["transform"] == "; ".join(steps)
    assert f"{100 * p.summary(results)['retained_weight_energy']['mean']:.1f}%" in out["cards"]
    assert "seed: 3" in out["strategy-yaml"] and "rescale: variance" in out["cli"]


def test_activation_choices_rank_on_the_demos_calibration_set(client, app, root, tmp_path, monkeypatch):
    from projection.demo.teacher import demo_calibration

    load(client, app)
    out = call(client, app, "set_strategy", "influence", "activation", "activation", "activation", "activation",
               "sum", "none", 0, *TABLE, None)
    p = Projector.open(str(root / TEACHER), str(root / WANLITE),
                       strategy=Strategy(layers="influence", width="activation", heads="activation",
                                         head_dim="activation", ffn="activation"))
    p.calibrate(demo_calibration())
    results = p.project()
    assert "layers: influence" in out["strategy-yaml"] and "width: activation" in out["strategy-yaml"]
    layers = [f"S{i} ← T{t}" for i, t in enumerate(p.mapping().layers)]
    assert figure(out, "layer-energy")["data"][0]["x"][1:] == layers
    table = rows(out)
    for r in results:
        assert table[r.entry.student_key]["retained weight energy"] == pytest.approx(r.energy, abs=1e-12)


def test_basis_inconsistent_strategy_warns_loudly(client, app):
    load(client, app)
    out = call(client, app, "set_strategy", "uniform", "svd-per-matrix", "magnitude", "frequency", "magnitude",
               "sum", "none", 0, *TABLE, None)
    assert "basis-inconsistent" in out["warnings"]
    calm = call(client, app, "set_strategy", "uniform", "magnitude", "magnitude", "frequency", "magnitude",
                "sum", "none", 0, *TABLE, None)
    assert "basis-inconsistent" not in (calm["warnings"] or "")


def test_table_filter_search_and_sort(client, app):
    load(client, app, teacher="demo/teacher-diffusers", student=SEED)
    only = call(client, app, "filter_table", ["skipped"], "norm1", "student order")["mapping-table"]
    assert only["data"] and all(r[1] == "skipped" and "norm1" in r[0] for r in only["data"])
    ranked = call(client, app, "filter_table", ALL, "", "params (largest first)")["mapping-table"]
    params = [r[5] for r in ranked["data"]]
    assert params == sorted(params, reverse=True)


def test_details_spectra_and_index_choices_come_from_the_core(client, app, root):
    load(client, app)
    key = "blocks.1.self_attn.q.weight"
    out = call(client, app, "details", key)
    assert "blocks.1.self_attn.q.weight" in out["details"] and "teacher block 1" in out["details"]  # layers: first
    p, _ = core(root)
    index = figure(out, "index-plot")
    kept = [t["x"] for t in index["data"] if t.get("mode") == "markers"]
    plan = p.plan()
    assert plan.indices("sa_heads", 1).tolist() in kept  # heads are chosen per teacher block
    assert plan.indices("resid", None).tolist() in kept
    hist = figure(out, "hist-plot")
    assert [t["name"] for t in hist["data"]] == ["teacher", "student"]

    spec = call(client, app, "spectrum", f"{key}#0")
    sv = figure(spec, "sv-plot")["data"]
    teacher_sv = p.spectrum("blocks.1.self_attn.q.weight", "teacher")
    assert sv[0]["y"] == pytest.approx(teacher_sv.tolist(), rel=1e-9)
    assert len(sv[1]["y"]) == 64  # the student's q: 64 x 64 of the teacher's 128 x 128
    curve = figure(spec, "cum-plot")
    assert curve["data"][1]["x"] == [64]  # the student's kept rank is marked, as an upper bound
    label = curve["data"][1]["text"][0]
    assert label.strip().startswith("upper bound at rank 64: ") and "basis-inconsistent" in label
    assert "best possible" not in json.dumps(curve)


# ------------------------------------------------------------------ rules


def test_rules_bring_a_zero_transfer_student_to_full_coverage(client, app):
    out = load(client, app, student="custom-student.safetensors")
    assert "0 of 123 student keys" in out["cards"]
    assert "Nothing transfers" in out["warnings"]
    assert "0 of 123 student keys map" in out["source-msg"] and "inline-error" in out["source-msg"]
    bad = call(client, app, "apply_rules", "layers.{i}.attn: [unclosed", *TABLE, None)
    assert "invalid YAML" in bad["rules-msg"]
    wrong = call(client, app, "apply_rules", "layers.{i}.attn: 3", *TABLE, None)
    assert "expected a teacher key" in wrong["rules-msg"]
    typo = call(client, app, "apply_rules", CUSTOM_RULES + "layers.{i}.atn: blocks.{i}.self_attn\n", *TABLE, None)
    message = html.unescape(typo["rules-msg"])
    assert "rule 'layers.{i}.atn' matches no student key" in message and "Applied" not in message
    assert "did you mean 'layers.{i}.attn'?" in message  # the closest student module
    good = call(client, app, "apply_rules", CUSTOM_RULES, *TABLE, None)
    assert "123 of 123 student keys" in good["cards"]
    assert "123 of 123 student keys map" in good["rules-msg"] and "123 of 123" in good["source-msg"]
    none = call(client, app, "apply_rules", "stem: no_such_teacher_key\n", *TABLE, None)
    assert "Applied: 0 of 123 student keys map" in none["rules-msg"] and "inline-error" in none["rules-msg"]
    good = call(client, app, "apply_rules", CUSTOM_RULES, *TABLE, None)
    # its heads are not recorded: inferred as the teacher's head dim (2 x 32, not the teacher's 4 heads), and said
    assert "2 heads × 32" in good["cards"] and "heads inferred: 2 × 32" in good["cards"]
    assert "heads inferred: 2 x 32; the checkpoint does not record heads" in good["warnings"]
    assert {r["status"] for r in rows(good).values()} == {"mapped"}
    assert '--rules "$inputs/rules.yaml"' in good["cli"] and "layers.{i}.attn: blocks.{i}.self_attn" in good["cli"]


def test_suggest_rules_fills_the_editor_without_applying(client, app):
    out = load(client, app, student="custom-student.safetensors")
    assert "0 of 123 student keys" in out["cards"]
    mine = "# my rules\nout.proj: {skip: \"trained from scratch\"}\n"
    suggested = call(client, app, "suggest_rules", mine)
    text = suggested["rules-editor"]
    assert text.startswith(mine) and "# Suggested rules (" in text and "review" in text
    assert "layers.{i}.attn: blocks.{i}.self_attn" in text and "stem: patch_embedding" in text
    assert "Review them, then press Apply rules" in suggested["rules-msg"]
    assert "10 suggested rules" in suggested["rules-msg"]  # out.proj (2 keys) stays skipped on purpose
    assert "would map 121 of the 123 student keys" in suggested["rules-msg"]
    still = call(client, app, "filter_table", *TABLE)["mapping-table"]
    assert {r[1] for r in still["data"]} == {"skipped"}  # suggested, not applied
    applied = call(client, app, "apply_rules", text, *TABLE, None)
    assert "121 of 123 student keys" in applied["cards"]
    assert {r["status"] for k, r in rows(applied).items() if not k.startswith("out.proj")} == {"mapped"}
    again = call(client, app, "suggest_rules", applied["rules-editor"])
    assert again["rules-editor"] is None or again["rules-editor"] == applied["rules-editor"]
    assert "No rules to suggest" in again["rules-msg"]


# ------------------------------------------------------------------ strategy files and A/B


def test_strategy_yaml_apply_save_and_errors(client, app):
    load(client, app)
    bad = call(client, app, "apply_strategy_yaml", "width: widest\n", *TABLE, None)
    assert "width" in bad["strategy-msg"] and "inline-error" in bad["strategy-msg"]
    good = call(client, app, "apply_strategy_yaml", "layers: [1, 3, 5, 7]\nwidth: first\n", *TABLE, None)
    assert good["layer-method"] == "custom"
    assert figure(good, "layer-energy")["data"][0]["x"][1] == "S0 ← T1"
    saved = client.predict(api_name="/save_strategy")
    path = saved["value"] if isinstance(saved, dict) else saved
    assert Strategy.from_yaml(Path(path).read_text()).layers == [1, 3, 5, 7]


def test_ab_comparison(client, app, root):
    load(client, app)
    a, b = Strategy().to_yaml(), Strategy(width="svd-per-matrix").to_yaml()
    out = call(client, app, "compare", a, b)
    measures = {r[0]: r for r in out["compare-table"]["data"]}
    _, ra = core(root)
    mean_a = Projector.open(str(root / TEACHER), str(root / WANLITE)).summary(ra)["retained_weight_energy"]["mean"]
    assert measures["retained weight energy (weight statistic)"][1] == f"{100 * mean_a:.1f}%"
    assert "basis-inconsistent" in out["compare-msg"]
    # what the students compute leads the table; the weight statistics follow, labelled as such
    names = [r[0] for r in out["compare-table"]["data"]]
    on = "demo held-out digits: 64 of 269 latents × 2 noise draws"
    assert names[0] == f"velocity error vs teacher, step 0 (lower is better), on {on}"
    assert not any("prompt accuracy" in n for n in names)  # no samples drawn yet: the Gallery draws them
    error_a, error_b = (float(x) for x in measures[names[0]][1:3])
    assert 0.5 < error_a < 1.5 and error_b > 10 * error_a  # the seeds' method: far worse, whatever its energy
    assert all("weight" in n for n in names if "energy" in n)
    # the lead chart: velocity error per noise level and per student block, A beside B, random init as reference
    lead = figure(out, "compare-plot")
    assert on in lead["layout"]["title"]["text"] and "What the students compute" in lead["layout"]["title"]["text"]
    levels = [t for t in lead["data"] if t.get("xaxis") != "x2"]
    blocks = [t for t in lead["data"] if t.get("xaxis") == "x2"]
    assert [t["name"] for t in levels] == ["strategy A", "strategy B", "random init"] == [t["name"] for t in blocks]
    assert len(levels[0]["x"]) == 2 and len(blocks[0]["x"]) == 4  # 2 noise bands (2 draws), 4 student blocks
    assert lead["layout"]["yaxis"]["type"] == "log"  # B's errors are 100x A's
    # the same numbers as the Function view's on its default set (64 latents, 2 draws)
    report = call(client, app, "function", "demo held-out digits", "", 64)
    summary = report["function-msg"]
    assert f"student {error_a:.3f}, random init " in summary
    random = float(re.search(r"random init (\d+\.\d+)", summary).group(1))  # and the card's, on the same set
    assert f"random init {random:.2f}" in call(client, app, "measure", *TABLE, None)["cards"]
    # svd-per-matrix keeps more weight energy, but in a basis of its own: no "win" for B, in table or chart
    assert measures["keys transferred"][3] == "+0.0 pt"
    assert all(r[3] == "not comparable" for m, r in measures.items() if "energy" in m)
    fig = figure(out, "compare-energy-plot")
    assert fig["layout"]["title"]["text"].startswith("Weight statistic")
    bar_a, bar_b = fig["data"]
    assert bar_a["name"] == "strategy A" and bar_a["marker"]["color"] == A_SIDE and "pattern" not in bar_a["marker"]
    assert bar_b["name"] == "strategy B (basis-inconsistent: not comparable)"
    assert bar_b["marker"]["pattern"]["shape"] == "/" and bar_b["marker"]["color"] != B_SIDE
    note = " ".join(a["text"] for a in fig["layout"]["annotations"])
    assert "B is basis-inconsistent" in note and "does not compute" in note and "not comparable" in note
    assert "weight" in fig["layout"]["yaxis"]["title"]["text"]
    # two basis-consistent strategies compare as usual
    calm = call(client, app, "compare", a, Strategy(width="first").to_yaml())
    assert [t["name"] for t in figure(calm, "compare-energy-plot")["data"]] == ["strategy A", "strategy B"]
    assert not figure(calm, "compare-energy-plot")["layout"].get("annotations")
    assert re.fullmatch(r"[+-]\d+\.\d pt", {r[0]: r for r in calm["compare-table"]["data"]}
                        ["retained weight energy (weight statistic)"][3])


def test_gallery_draws_teacher_students_and_random_init_with_their_scores(client, app, root):
    from projection import projected_student
    from projection.demo import teacher as demo_teacher
    from projection.demo.teacher import demo_calibration
    from projection.function.fidelity import velocity_fidelity

    load(client, app)
    a, b = Strategy().to_yaml(), Strategy(width="svd-per-matrix").to_yaml()
    out = call(client, app, "gallery", a, b)
    on = "demo held-out digits: 64 of 269 latents × 2 noise draws"  # the card's, the A/B's and the Function view's
    assert "inline-ok" in out["gallery-msg"] and f"measured on {on}" in out["gallery-msg"]
    for name in ("teacher", "a", "b", "random"):
        picture = out[f"gallery-{name}"]
        assert Path(picture["path"] if isinstance(picture, dict) else picture).stat().st_size > 100
    table = {r[0]: dict(zip(out["gallery-table"]["headers"], r)) for r in out["gallery-table"]["data"]}
    assert list(table) == ["Teacher", "Student, strategy A (default strategy)",
                           "Student, strategy B (width svd-per-matrix)", "Random init, same shape"]
    accuracy = {k: float(r["prompt accuracy"].rstrip("%")) for k, r in table.items()}
    assert accuracy["Teacher"] >= 90 and accuracy["Random init, same shape"] <= 40
    assert table["Teacher"]["velocity error vs teacher (step 0)"] == "—"
    # the student's velocity error is the core's, on the first 64 of the demo's held-out latents, 2 noise draws
    calibration = demo_calibration().subset(64)
    student = projected_student(Projector.open(str(root / TEACHER), str(root / WANLITE)))
    expected = velocity_fidelity(student, demo_teacher.load_teacher(), calibration.latents,
                                 calibration.context, draws=2).relative_error
    a_row, b_row = table["Student, strategy A (default strategy)"], table["Student, strategy B (width svd-per-matrix)"]
    assert a_row["velocity error vs teacher (step 0)"] == f"{expected:.3f}"
    assert float(b_row["velocity error vs teacher (step 0)"]) > 10 * expected
    # the A/B comparison shows the same error, and the samples' prompt accuracy now that they are drawn
    compared = {r[0]: r for r in call(client, app, "compare", a, b)["compare-table"]["data"]}
    assert compared[f"velocity error vs teacher, step 0 (lower is better), on {on}"][1] == f"{expected:.3f}"
    assert compared["prompt accuracy of 100 samples"][1] == a_row["prompt accuracy"]
    bad = call(client, app, "gallery", "width: widest\n", b)
    assert "inline-error" in bad["gallery-msg"] and "strategy A" in bad["gallery-msg"]


def test_gallery_previews_other_teachers_on_the_function_tabs_calibration_set(client, app, root, tmp_path,
                                                                               monkeypatch):
    from projection import projected_student
    from projection.engine.build import wanlite_from_teacher
    from projection.function.calibration import synthetic_calibration
    from projection.function.fidelity import velocity_fidelity

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    synthetic = write_demo(root / "synthetic", synthetic=True)
    load(client, app, teacher="synthetic/teacher-wan", student="synthetic/student-wanlite.yaml")
    out = call(client, app, "gallery", Strategy().to_yaml(), Strategy().to_yaml())
    assert "inline-error" in out["gallery-msg"] and "Function tab" in out["gallery-msg"]
    assert "Velocity error" not in call(client, app, "measure", *TABLE, None)["cards"]  # nothing measured yet
    call(client, app, "function", "synthetic (a guess)", "", 4)
    # the summary card shows the Function tab's measurement, flagged as a guess, while the projection is the same
    from projection.engine.report import function_report
    from projection.function.calibration import synthetic_calibration as synthetic_set

    projector = Projector.open(str(synthetic / "teacher-wan"), str(synthetic / "student-wanlite.yaml"))
    report = function_report(projector, synthetic_set(open_teacher_config(synthetic / "teacher-wan"), n=4))
    students = report["fidelity"]["students"]
    cards = call(client, app, "measure", *TABLE, None)["cards"]
    assert (f'<div class="metric">{students["student"]["relative_error"]:.2f}</div><div class="card-line">vs the '
            f'teacher, step 0; random init {students["random init"]["relative_error"]:.2f} · on SYNTHETIC') in cards
    other = call(client, app, "set_strategy", "first", "first", "magnitude", "frequency", "magnitude", "sum",
                 "none", 0, *TABLE, None)
    assert "Velocity error" not in other["cards"]  # a different projection: not what was measured
    back = call(client, app, "set_strategy", "first", "magnitude", "magnitude", "frequency", "magnitude", "sum",
                "none", 0, *TABLE, None)
    assert f'{students["student"]["relative_error"]:.2f}</div>' in back["cards"]  # the measured projection again
    out = call(client, app, "gallery", Strategy().to_yaml(), Strategy(width="svd-per-matrix").to_yaml())
    assert "SYNTHETIC calibration" in out["gallery-msg"] and "not a VAE decode" in out["gallery-msg"]
    for name in ("teacher", "a", "b", "random"):
        picture = out[f"gallery-{name}"]
        assert Path(picture["path"] if isinstance(picture, dict) else picture).stat().st_size > 100
    table = {r[0]: dict(zip(out["gallery-table"]["headers"], r)) for r in out["gallery-table"]["data"]}
    assert {r["prompt accuracy"] for r in table.values()} == {"not scored"}
    calibration = synthetic_calibration(open_teacher_config(synthetic / "teacher-wan"), n=4)
    student = projected_student(Projector.open(str(synthetic / "teacher-wan"), str(synthetic / "student-wanlite.yaml")))
    expected = velocity_fidelity(student, wanlite_from_teacher(synthetic / "teacher-wan"), calibration.latents,
                                 calibration.context, draws=2).relative_error
    assert f'{expected:.3f}' == f'{students["student"]["relative_error"]:.3f}'  # the Function view's measurement
    assert table["Student, strategy A (default strategy)"]["velocity error vs teacher (step 0)"] == f"{expected:.3f}"
    compared = call(client, app, "compare", Strategy().to_yaml(), Strategy(width="svd-per-matrix").to_yaml())
    first = compared["compare-table"]["data"][0]
    assert first[0].startswith("velocity error vs teacher") and "SYNTHETIC" in first[0] and first[1] == f"{expected:.3f}"


def test_the_probe_ranks_the_starts_and_the_gallery_draws_each_after_it(client, app, root, tmp_path, monkeypatch):
    """Probe recoverability through the app: a strategy file outside --root is refused in one line; one under it
    is probed with random init and the default; the Gallery then draws each start untrained and after its probe."""
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    load(client, app)
    outside = tmp_path / "outside.yaml"
    outside.write_text(Strategy(width="first").to_yaml())
    with pytest.raises(Exception, match="outside the folders this app may open") as err:
        call(client, app, "probe", "demo held-out digits", "", 12, None, [], str(outside), 3, "", "")
    assert "\n" not in str(err.value)
    (root / "first.yaml").write_text(Strategy(width="first").to_yaml())
    out = call(client, app, "probe", "demo held-out digits", "", 12, None, [], "first.yaml", 3, "", "")
    assert {r[1] for r in out["probe-table"]["data"]} == {"random init", "default", "first (first.yaml)"}
    assert "error after 3 steps" in out["probe-table"]["headers"]
    assert "Probed on" in out["probe-msg"] and "10 latents trained on, 2 held out" in out["probe-msg"]
    drawn = call(client, app, "gallery", Strategy().to_yaml(), Strategy(width="first").to_yaml())
    table = {r[0]: dict(zip(drawn["gallery-table"]["headers"], r)) for r in drawn["gallery-table"]["data"]}
    step0 = "velocity error vs teacher (step 0)"
    for name in ("random init", "default", "first"):
        start, after = table[f"{name}, untrained (the probe's start)"], table[f"{name} after 3-step probe"]
        assert after["velocity error vs teacher after the probe"] not in ("—", start[step0])
        assert after["prompt accuracy"].endswith("%")
    # the default's start is strategy A's student (the default strategy), scored on the same set
    default_start = table["default, untrained (the probe's start)"]
    assert default_start[step0] == table["Student, strategy A (default strategy)"][step0]
    picture = drawn["gallery-probe-0-after"]
    assert Path(picture["path"] if isinstance(picture, dict) else picture).stat().st_size > 100
    assert drawn["gallery-probe-3-start"] is None  # three starts: the other slots stay hidden


def open_teacher_config(path: Path) -> dict:
    from projection.core.models import open_teacher

    return open_teacher(str(path)).config


# ------------------------------------------------------------------ export


def test_export_matches_the_cli_and_never_overwrites(client, app, root):
    load(client, app)
    call(client, app, "set_layers", *TABLE, None, *sliders([0, 1, 5, 7]))
    out = call(client, app, "export", "out/from-app", "bfloat16", "cpu")
    files = {Path(f).name: Path(f) for f in out["export-files"]}
    assert {"projection_report.json", "config.json", "strategy.yaml", "model.safetensors"} <= set(files)
    report = json.loads(files["projection_report.json"].read_text())
    assert report["layers"] == [0, 1, 5, 7] and report["coverage"]["keys"]["rate"] == 1.0
    assert (root / "out" / "from-app" / "model.safetensors").is_file()
    assert out["out-dir"] != "out/from-app"  # the next export gets a fresh folder

    # the command the app shows reproduces the export bit for bit, and overwrites no file of the user's
    command = out["cli"].replace("--out out/from-app", "--out out/from-cli")
    command = command.replace("projection export", f"{sys.executable} -m projection export")
    mine = {name: f"# the user's own {name}\n" for name in ("strategy.yaml", "student.yaml", "rules.yaml")}
    for name, text in mine.items():
        (root / name).write_text(text)
    subprocess.run(["bash", "-c", command], check=True, cwd=root, capture_output=True)
    assert {name: (root / name).read_text() for name in mine} == mine
    app_weights = load_file(root / "out" / "from-app" / "model.safetensors")
    cli_weights = load_file(root / "out" / "from-cli" / "model.safetensors")
    assert app_weights.keys() == cli_weights.keys()
    assert all(torch.equal(app_weights[k], cli_weights[k]) for k in app_weights)
    assert next(iter(app_weights.values())).dtype == torch.bfloat16

    with pytest.raises(Exception, match="already exists"):
        call(client, app, "export", "out/from-app", "float32", "cpu")
    with pytest.raises(Exception, match="outside the folders this app may write"):
        call(client, app, "export", str(root.parent / "escaped"), "float32", "cpu")
    with pytest.raises(Exception, match="outside the folders this app may write"):
        call(client, app, "export", "../escaped", "float32", "cpu")


def test_the_apps_export_records_the_function_measured_on_that_projection(client, app, root, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    load(client, app, student="demo/student-diffusers.yaml")
    measured = call(client, app, "function", "demo held-out digits", "", 16)
    levels = {r[0]: dict(zip(measured["function-levels"]["headers"], r)) for r in measured["function-levels"]["data"]}
    call(client, app, "export", "out/measured", "float32", "cpu")
    report = json.loads((root / "out" / "measured" / "projection_report.json").read_text())
    student = report["function"]["students"]["student"]
    assert f"{student['relative_error']:.3f}" == levels["all levels"]["student: error"]
    assert "Function view" in report["function"]["measured_on"]
    card = (root / "out" / "measured" / "README.md").read_text()
    assert f"| student | {student['relative_error']:.4f} |" in card and "Not measured" not in card
    call(client, app, "set_layers", *TABLE, None, *sliders([0, 1, 5, 7]))  # another projection: not measured
    call(client, app, "export", "out/changed", "float32", "cpu")
    assert "function" not in json.loads((root / "out" / "changed" / "projection_report.json").read_text())


def test_export_names_with_control_characters_are_refused(client, app, root):
    load(client, app)
    for name, char in (("out/bad\nname", "000A"), ("out/bad\x1b[2Jname", "001B"), ("out/bad\u202etxt", "202E")):
        with pytest.raises(Exception, match=f"control character U\\+{char}"):
            call(client, app, "export", name, "float32", "cpu")
    assert not any(c in p.name for p in root.rglob("*") for c in "\n\x1b\u202e")


def test_sessions_are_separate(app):
    one, two = Client(app.local_url, verbose=False), Client(app.local_url, verbose=False)
    load(one, app)
    load(two, app, teacher="demo/teacher-diffusers", student=SEED)
    moved = call(one, app, "set_layers", *TABLE, None, *sliders([7, 6, 5, 4]))
    assert figure(moved, "layer-energy")["data"][0]["x"][1] == "S0 ← T7"
    other = call(two, app, "filter_table", *TABLE)["mapping-table"]
    assert any(r[0] == "blocks.0.attn.in_proj_weight" for r in other["data"])
    two_view = call(two, app, "measure", *TABLE, None)
    assert figure(two_view, "layer-energy")["data"][0]["x"][1] == "S0 ← T0"
    # default export names differ, so two sessions exporting at once never collide
    a = call(one, app, "export", load(one, app)["out-dir"], "float32", "cpu")
    b = call(two, app, "export", load(two, app, teacher="demo/teacher-diffusers", student=SEED)["out-dir"],
             "float32", "cpu")
    assert Path(a["export-files"][0]).parent.name != Path(b["export-files"][0]).parent.name


def test_calls_before_loading_say_so(app):
    fresh = Client(app.local_url, verbose=False)
    with pytest.raises(Exception, match="Load a teacher and a student first"):
        call(fresh, app, "set_strategy", "uniform", "magnitude", "magnitude", "frequency", "magnitude", "sum",
             "none", 0, *TABLE, None)


# ------------------------------------------------------------------ a 14B-shaped teacher


def test_wan14b_headers_map_without_reading_tensors(client, app, root):
    write_shape_only_teacher(root / "wan14b")
    out = load(client, app, teacher="wan14b", kind="form", form=("wanlite", 1024, 16, 8, 4096))
    table = rows(out)
    assert len(table) > 400 and all(r["status"] != "skipped" for r in table.values())
    assert "read 0 B from the teacher" in out["refresh-info"]
    assert "not computed" in out["cards"]
    energies = [r["retained weight energy"] for r in table.values()]
    assert all(e is None or e != e for e in energies)  # not computed: None or NaN
    moved = call(client, app, "set_layers", *TABLE, None, *sliders(list(range(0, 40, 40 // 16))[:16]))
    assert "read 0 B from the teacher" in moved["refresh-info"]
    details = call(client, app, "details", "blocks.0.self_attn.norm_q.weight")
    assert "Compute retained weight energy" in details["details"]


def test_startup_imports_nothing_heavy_before_parsing():
    code = ("import sys, inspector.cli; inspector.cli.build_parser().parse_args(['--port', '1']); "
            "heavy = {'torch', 'gradio', 'projection', 'pandas'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_checkpoint_students_heads_are_set_in_the_sources_tab(client, app):
    load(client, app, student="custom-student.safetensors", heads=4)
    ruled = call(client, app, "apply_rules", CUSTOM_RULES, *TABLE, None)
    assert "4 heads × 32" in ruled["cards"] and "inferred" not in ruled["cards"] and not ruled["warnings"]
    assert "--num-heads 4" in ruled["cli"]
    assert "4 heads × 32" in load(client, app, heads=4)["cards"]  # a config: the field overrides its num_heads
    load(client, app, student="custom-student.safetensors", heads=3)
    bad = call(client, app, "apply_rules", CUSTOM_RULES, *TABLE, None)
    assert "not divisible by num_heads 3" in bad["rules-msg"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choices and message where CUDA is missing")
def test_cuda_is_refused_clearly_without_a_gpu(client, app):
    device = next(c for c in app.blocks.values() if getattr(c, "label", None) == "device")
    assert [v for _, v in device.choices] == ["auto", "cpu"]  # not offered where there is none
    load(client, app)
    with pytest.raises(Exception, match="cuda"):
        call(client, app, "set_export_options", "out/x", "float32", "cuda")
    after = call(client, app, "set_strategy", "uniform", "magnitude", "magnitude", "frequency", "magnitude", "sum",
                 "none", 0, *TABLE, None)
    assert "device: auto" in after["strategy-yaml"]  # the session kept working on its old device


# ------------------------------------------------------------------ bounded input


def test_student_sizes_are_checked_against_the_teacher_at_once(client, app):
    with pytest.raises(Exception, match="num_layers 20000 is more than the teacher's 8 blocks"):
        load(client, app, kind="form", form=("wanlite", 128, 20000, 2, 384))
    with pytest.raises(Exception, match="dim 512 is more than the teacher's 128"):
        load(client, app, kind="form", form=("wanlite", 512, 4, 8, 384))


def test_editors_refuse_oversized_text_and_yaml_aliases(client, app):
    from projection.io.inputs import MAX_TEXT_BYTES

    load(client, app)
    huge = "# padding\n" * (MAX_TEXT_BYTES // 10 + 1)
    out = call(client, app, "apply_rules", huge, *TABLE, None)
    assert "inline-error" in out["rules-msg"] and f"at most {MAX_TEXT_BYTES:,} are accepted" in out["rules-msg"]
    out = call(client, app, "apply_strategy_yaml", "width: first\n" + huge, *TABLE, None)
    assert "inline-error" in out["strategy-msg"] and f"at most {MAX_TEXT_BYTES:,} are accepted" in out["strategy-msg"]
    bomb = "q: &q blocks.{i}.self_attn.q.weight\n" + "".join(f"k{i}: [*q, *q, *q]\n" for i in range(300))
    out = call(client, app, "apply_rules", bomb, *TABLE, None)
    assert "YAML anchors and aliases are not accepted (&amp;q on line 1)" in out["rules-msg"]


TABLE_VIEW = dict(zip(("statuses", "search", "sort", "key"), (*TABLE, None)))


def handler_of(app):
    return next(f.fn for f in app.fns.values() if getattr(f.fn, "__qualname__", "") == "StrategyView.load_file")


def test_strategy_uploads_are_bounded(app, tmp_path):
    import httpx

    from projection.io.inputs import MAX_TEXT_BYTES

    big = tmp_path / "big.yaml"
    big.write_bytes(b"seed: 1\n" + b"#" * MAX_TEXT_BYTES)
    with big.open("rb") as f:
        response = httpx.post(f"{app.local_url}gradio_api/upload", files={"files": ("big.yaml", f)}, timeout=60)
    assert response.status_code == 200  # Gradio's bound is the calibration sets' (tests/test_function_sets.py)
    messages = [v for v in handler_of(app)(None, response.json()[0], **TABLE_VIEW).values() if isinstance(v, str)]
    assert any(f"big.yaml: strategy of {big.stat().st_size:,} bytes; at most {MAX_TEXT_BYTES:,} are accepted" in m
               for m in messages), messages  # the handler's own bound, named by the uploaded name
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1\n# réglage\n".encode("latin-1"))
    messages = [v for v in handler_of(app)(None, str(latin1), **TABLE_VIEW).values() if isinstance(v, str)]
    assert any("latin1.yaml: not UTF-8 text (invalid byte at offset 11, line 2)" in m for m in messages), messages


def test_typed_strategy_values_are_validated_like_files(client, app):
    load(client, app)
    options = ["uniform", "magnitude", "magnitude", "frequency", "magnitude", "sum", "none"]
    with pytest.raises(Exception, match="seed: Input should be less than 9223372036854775808"):
        call(client, app, "set_strategy", *options, 2**63, *TABLE, None)
    with pytest.raises(Exception, match="seed: Input should be greater than or equal to 0"):
        call(client, app, "set_strategy", *options, -5, *TABLE, None)
    assert call(client, app, "set_strategy", *options, 2**63 - 2**10, *TABLE, None)["cards"]


# ------------------------------------------------------------------ function


def test_function_tab_shows_the_cores_function_report(client, app, root, tmp_path, monkeypatch):
    from projection.demo.teacher import demo_calibration
    from projection.engine.report import function_report

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    load(client, app)
    out = call(client, app, "function", "demo held-out digits", "", 32)
    p = Projector.open(str(root / TEACHER), str(root / WANLITE))
    report = function_report(p, demo_calibration().subset(32))
    students = report["fidelity"]["students"]
    assert "inline-ok" in out["function-msg"] and "32 latents" in out["function-msg"]
    assert "SYNTHETIC" not in out["function-msg"]
    levels = {r[0]: dict(zip(out["function-levels"]["headers"], r)) for r in out["function-levels"]["data"]}
    assert list(levels) == ["s 0.00–0.50", "s 0.50–1.00", "all levels"]
    for name in ("student", "random init", "svd-per-matrix"):
        assert levels["all levels"][f"{name}: error"] == f"{students[name]['relative_error']:.3f}"
        assert levels["s 0.50–1.00"][f"{name}: error"] == f"{students[name]['by_level'][1]['relative_error']:.3f}"
    assert float(levels["all levels"]["student: error"]) < float(levels["all levels"]["random init: error"])
    blocks = out["function-blocks"]
    assert [r[:2] for r in blocks["data"]] == [[i, t] for i, t in enumerate(p.mapping().layers)]
    per_block = report["fidelity"]["blocks"]["student"]
    assert [r[2] for r in blocks["data"]] == [f"{b['relative_error']:.3f}" for b in per_block]
    teacher = out["function-teacher"]["data"]
    assert [r[1] for r in teacher] == [f"{b['influence']:.4f}" for b in report["teacher_blocks"]]
    assert [r[2] for r in teacher] == [f"{b['removal_error']:.4f}" for b in report["teacher_blocks"]]
    assert teacher[0][3] == "0" and "none" in [r[3] for r in teacher]  # uniform 4 of 8: block 1 feeds nobody
    spaces = {r[0]: r for r in out["function-agreement"]["data"]}
    assert set(spaces) == {a["label"] for a in report["agreement"]}
    # the Layers map (redrawn after Measure) draws the same influence, with the removal effect in its hover
    bars = next(d for d in figure(call(client, app, "measure", *TABLE, None), "layer-map")["data"]
                if d.get("name") == "influence")
    assert bars["customdata"] == pytest.approx([b["influence"] for b in report["teacher_blocks"]])
    assert f"{report['teacher_blocks'][3]['removal_error']:.4f}" in bars["hovertext"][3]


def test_function_tab_measures_a_diffusers_layout_student(client, app, root, tmp_path, monkeypatch):
    """The default layout runs here as the reference module it equals: the same function as the wanlite student."""
    from projection.demo.teacher import demo_calibration
    from projection.engine.report import function_report

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    load(client, app, student="demo/student-diffusers.yaml")
    out = call(client, app, "function", "demo held-out digits", "", 16)
    assert "inline-ok" in out["function-msg"]
    twin = Projector.open(str(root / TEACHER), str(root / WANLITE))
    expected = function_report(twin, demo_calibration().subset(16))["fidelity"]["students"]["student"]
    levels = {r[0]: dict(zip(out["function-levels"]["headers"], r)) for r in out["function-levels"]["data"]}
    assert levels["all levels"]["student: error"] == f"{expected['relative_error']:.3f}"


def test_function_tab_labels_synthetic_sets_and_refuses_bad_files(client, app, root, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    load(client, app)
    out = call(client, app, "function", "synthetic (a guess)", "", 4)
    assert "SYNTHETIC calibration" in out["function-msg"] and "a guess" in out["function-msg"]
    outside = tmp_path / "calibration.safetensors"
    save_file({"latents": torch.randn(2, 4, 8, 8), "context": torch.randn(2, 16, 64)}, str(outside))
    with pytest.raises(AppError, match="outside the folders this app may open"):
        call(client, app, "function", "file", str(outside), 8)
    wrong = root / "wrong-channels.safetensors"
    save_file({"latents": torch.randn(2, 3, 8, 8), "context": torch.randn(2, 16, 64)}, str(wrong))
    with pytest.raises(AppError, match=r"wrong-channels.safetensors.*'latents'"):
        call(client, app, "function", "file", "wrong-channels.safetensors", 8)
    (root / "a-folder").mkdir(exist_ok=True)
    with pytest.raises(AppError, match="'a-folder': not a file"):
        call(client, app, "function", "file", "a-folder", 8)
    with pytest.raises(AppError, match=r"100000 .*512"):  # bounded before any work starts
        call(client, app, "function", "demo held-out digits", "", 100000)


def test_a_calibration_path_shaped_like_a_hub_id_is_never_opened_outside_the_root(client, app, root, tmp_path,
                                                                                  monkeypatch):
    """`outside/secret.safetensors` under the app's working directory (not under --root) is neither a hub id
    nor a file to open: the error says it is not under the root and tells nothing of the file."""
    from gradio_client.exceptions import AppError

    (tmp_path / "outside").mkdir()
    save_file({"weights": torch.randn(3)}, str(tmp_path / "outside" / "secret.safetensors"),
              {"source": "the secret's metadata"})
    monkeypatch.chdir(tmp_path)  # the app runs in this process: its working directory holds the file
    load(client, app)
    with pytest.raises(AppError) as info:
        call(client, app, "function", "file", "outside/secret.safetensors", 8)
    message = str(info.value)
    assert "no such file or folder under" in message and str(root) in message and "hub id" not in message
    assert "latents" not in message and "secret's metadata" not in message


def test_a_missing_local_looking_teacher_is_named_missing_not_looked_up_on_the_hub(client, app):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        load(client, app, teacher="demo/does-not-exist")
    message = str(info.value)
    assert "demo/does-not-exist" in message and "no such file or folder" in message
    assert "demo/ is a local folder: not looked up on the hub" in message and "Error" not in message


def test_the_velocity_card_runs_the_teacher_once_per_session(root, tmp_path, monkeypatch):
    import projection.engine.report as report_module
    from inspector.session import Session

    (tmp_path / "s").mkdir()
    s = Session.open(str(root / TEACHER), str(root / WANLITE), None, Strategy(), folder=tmp_path / "s")
    s.measure()
    calls = []
    real = report_module.teacher_reference
    monkeypatch.setattr(report_module, "teacher_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = s.step0_error()
    assert calls  # the teacher's velocities on the card's set
    ran = len(calls)
    s.update_strategy(width="first")
    s.measure()
    second = s.step0_error()
    assert len(calls) == ran  # a new projection is scored against the same teacher velocities
    assert second.error != first.error and second.random == first.random


def test_a_layer_list_made_for_another_student_falls_back_to_the_default_rule(root, tmp_path):
    """Loading a student the current block list does not fit (8 teacher blocks, a 2-block student, a list of 4)
    opens it under the default layer rule rather than refusing it."""
    from inspector.session import Session
    from projection.core.strategy import DEFAULT_LAYERS

    (tmp_path / "s").mkdir()
    two = {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 2}
    s = Session.open(str(root / TEACHER), two, None, Strategy(layers=[0, 3, 5, 7]), folder=tmp_path / "s")
    assert s.strategy.layers == DEFAULT_LAYERS == "first" and s.projector.mapping(s.strategy).layers == [0, 1]
