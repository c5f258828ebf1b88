"""The Function tab's calibration sets (issue 21, in the app): an uploaded set, the sets found beside the teacher
and in the calibration cache, and every card and table naming the set it measured on. Driven with gradio_client
against the real app, as tests/test_inspector.py does, with its own --root and calibration cache."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import save_file

from projection import Strategy
from projection.demo.folder import write_demo
from test_inspector import output_names

TABLE = [["exact", "mapped", "concatenated", "skipped"], "", "student order"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def a_set(path: Path, n: int = 4, source: str | None = None, channels: int = 4, width: int = 64) -> Path:
    torch.manual_seed(n)
    metadata = {"format": "projection-calibration/1", **({"source": source} if source else {})}
    save_file({"latents": torch.randn(n, channels, 8, 8), "context": torch.randn(n, 8, width)}, str(path), metadata)
    return path


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets-root")
    write_demo(root / "demo")
    write_demo(root / "synthetic", synthetic=True)
    outside = tmp_path_factory.mktemp("sets-outside")
    cache = tmp_path_factory.mktemp("sets-cache") / "cache"
    (cache / "calibration").mkdir(parents=True)
    a_set(root / "demo" / "beside.safetensors", source="captioned photos\x1b[31m, beside the teacher")
    save_file({"weights": torch.randn(4, 4)}, str(root / "demo" / "weights-only.safetensors"))
    a_set(outside / "secret.safetensors", source="the secret set")
    (root / "demo" / "linked-out.safetensors").symlink_to(outside / "secret.safetensors")
    a_set(cache / "calibration" / "cached.safetensors", n=6, source="made by projection calibrate")
    from projection.core.models import open_teacher

    wan = open_teacher(str(root / "synthetic" / "teacher-wan")).config  # 16 channels, as Wan's
    a_set(root / "synthetic" / "wan-set.safetensors", n=4, source="wan frames", channels=wan.in_dim,
          width=wan.text_dim)
    return {"root": root, "outside": outside, "cache": cache}


@pytest.fixture(scope="module")
def app(places):
    from inspector.cli import start

    before, threads = os.environ.get("PROJECTION_CACHE"), torch.get_num_threads()
    os.environ["PROJECTION_CACHE"] = str(places["cache"])
    blocks = start(["--root", str(places["root"]), "--port", str(free_port())], prevent_thread_lock=True,
                   quiet=True)
    yield blocks
    blocks.close()
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("PROJECTION_CACHE", None)
    else:
        os.environ["PROJECTION_CACHE"] = before


@pytest.fixture
def client(app) -> Client:
    return Client(app.local_url, verbose=False)


def call(client: Client, app, api: str, *args: Any) -> dict[str, Any]:
    """An endpoint's outputs by elem_id, updates kept whole (a dropdown's choices; test_inspector.call keeps only
    their values)."""
    result = client.predict(*args, api_name=f"/{api}")
    result = result if isinstance(result, tuple) else (result,)
    return dict(zip(output_names(app, api), result))


def load(client: Client, app, teacher: str = "demo/teacher-wan", student: str = "demo/student-wanlite.yaml") -> None:
    client.predict(teacher, "single model", "file", student, None, "wanlite", 64, 4, 2, 256, *TABLE, None,
                   api_name="/load")


def test_the_sets_found_beside_the_teacher_and_in_the_cache(client, app, places):
    load(client, app)
    found = call(client, app, "function_sets")["function-found"]
    choices = {value: label for label, value in found["choices"]}
    names = {Path(v).name for v in choices}
    assert names == {"beside.safetensors", "cached.safetensors", "calibration.safetensors"}  # the demo's own too
    beside = next(label for value, label in choices.items() if value.endswith("beside.safetensors"))
    assert beside == "demo/beside.safetensors · 4 latents of 4x8x8 · captioned photos [31m, beside the teacher"
    # (the escape character shown as a space)
    cached = next(label for value, label in choices.items() if value.endswith("cached.safetensors"))
    assert cached.endswith("cached.safetensors · 6 latents of 4x8x8 · made by projection calibrate")
    # not a file linked outside the roots, not a safetensors without latents and context
    assert not any("secret" in label or "weights-only" in value for value, label in choices.items())
    assert found["info"].startswith("3 found")
    # a set found is measured as a file under the roots (the cache is a read-only root)
    out = call(client, app, "function", "file", str(places["cache"] / "calibration" / "cached.safetensors"), 8)
    assert "made by projection calibrate: 6 latents of 4x8x8" in out["function-msg"]
    with pytest.raises(AppError, match="outside the folders this app may open"):
        call(client, app, "function", "file", "demo/linked-out.safetensors", 8)


def test_the_sets_found_are_bounded_and_only_under_the_roots(tmp_path, monkeypatch):
    from inspector import function
    from inspector.paths import Roots

    root, cache = tmp_path / "root", tmp_path / "cache"
    (root / "models" / "teacher").mkdir(parents=True)
    (cache / "calibration").mkdir(parents=True)
    for name in ("a", "b", "c"):
        a_set(root / "models" / f"{name}.safetensors", n=2)
    a_set(cache / "calibration" / "cached.safetensors", n=2)
    monkeypatch.setenv("PROJECTION_CACHE", str(cache))
    monkeypatch.setattr(function, "MAX_FOUND", 2)  # headers read per folder: the first by name
    roots = Roots.create(root, [cache / "calibration"])
    teacher = str(root / "models" / "teacher")
    assert [v for _, v in function.found_sets(teacher, roots)] == [
        "models/a.safetensors", "models/b.safetensors", str(cache / "calibration" / "cached.safetensors")]
    # the cache is listed only while it is a root; a folder outside the roots is not looked at
    assert [v for _, v in function.found_sets(teacher, Roots.create(root))] == ["models/a.safetensors",
                                                                               "models/b.safetensors"]
    assert function.found_sets(teacher, Roots.create(root / "models" / "teacher")) == []
    assert function.found_sets("org/name", Roots.create(root)) == []  # a hub id: nothing beside it here


def test_an_uploaded_set_is_measured_and_named(client, app, places, tmp_path):
    load(client, app)
    upload = a_set(tmp_path / "my-set.safetensors", n=5, source="my own frames")
    out = call(client, app, "function", "upload", "", 8, handle_file(str(upload)))
    assert "inline-ok" in out["function-msg"]
    assert "Measured on my own frames (uploaded my-set.safetensors): 5 latents of 4x8x8" in out["function-msg"]
    plain = a_set(tmp_path / "plain.safetensors", n=3)
    out = call(client, app, "function", "upload", "", 8, handle_file(str(plain)))
    assert "Measured on uploaded plain.safetensors: 3 latents" in out["function-msg"]
    # errors: one line, named by the uploaded name, never the server's copy
    text = tmp_path / "notes.txt"
    text.write_text("not a set")
    with pytest.raises(AppError, match=r"Invalid file type.*\.safetensors"):  # Gradio's own check (file_types)
        call(client, app, "function", "upload", "", 8, handle_file(str(text)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a set, though named like one")
    with pytest.raises(AppError) as info:
        call(client, app, "function", "upload", "", 8, handle_file(str(bad)))
    message = str(info.value)
    assert message.startswith("bad.safetensors: ") and "\n" not in message.strip(), message
    assert "gradio" not in message and str(tmp_path) not in message and "not a set" not in message
    wrong = a_set(tmp_path / "wrong.safetensors", channels=3)
    with pytest.raises(AppError, match=r"wrong.safetensors.*'latents'"):
        call(client, app, "function", "upload", "", 8, handle_file(str(wrong)))
    with pytest.raises(AppError, match="no file uploaded"):
        call(client, app, "function", "upload", "", 8)


def test_an_upload_is_read_from_the_upload_folder_only_and_bounded(app, places, monkeypatch):
    from projection import ProjectionError
    from projection.core.models import open_teacher
    from inspector import function

    config = open_teacher(str(places["root"] / "demo" / "teacher-wan")).config
    bound = function.MAX_CALIBRATION_UPLOAD_BYTES
    with pytest.raises(ProjectionError, match="beside.safetensors': not a file uploaded to this app"):
        function.open_upload(str(places["root"] / "demo" / "beside.safetensors"), config)
    folder = function.upload_folder()
    (folder / "t").mkdir(parents=True, exist_ok=True)
    copy = a_set(folder / "t" / "big.safetensors", n=2)
    monkeypatch.setattr(function, "MAX_CALIBRATION_UPLOAD_BYTES", 100)
    with pytest.raises(ProjectionError, match=r"'big.safetensors' is .*; uploads are accepted up to 100 B"):
        function.open_upload(str(copy), config)
    copy.unlink()
    # Gradio refuses any upload over the calibration bound (it applies to every file); a strategy YAML has its own
    # bound in its handler (tests/test_inspector.py::test_strategy_uploads_are_bounded)
    assert app.max_file_size == bound == 256 << 20
    from inspector.uploads import MAX_UPLOAD_BYTES

    assert MAX_UPLOAD_BYTES >= 2 * bound  # a client may hold two sets


def test_every_card_and_table_names_the_set(client, app, places):
    load(client, app)  # the demo: its card measures on the held-out digits
    cards = call(client, app, "measure", *TABLE, None)["cards"]
    on = "demo held-out digits: 64 of 269 latents × 2 noise draws"  # one set and one name on every screen
    assert '<div class="card-set"' in cards and f"on <bdi>{on}" in cards
    a, b = Strategy().to_yaml(), Strategy(width="first").to_yaml()
    compared = call(client, app, "compare", a, b)["compare-table"]
    assert compared["data"][0][0] == f"velocity error vs teacher, step 0 (lower is better), on {on}"
    gallery = call(client, app, "gallery", a, b)
    assert f"measured on {on}" in gallery["gallery-msg"]
    # another teacher: the card shows the Function tab's last measurement, and names its set
    load(client, app, "synthetic/teacher-wan", "synthetic/student-wanlite.yaml")
    call(client, app, "function", "file", "synthetic/wan-set.safetensors", 4)
    cards = call(client, app, "measure", *TABLE, None)["cards"]
    assert "on <bdi>wan frames: 4 latents of 16x8x8, as measured in the Function tab</bdi>" in cards
    compared = call(client, app, "compare", a, b)["compare-table"]
    assert compared["data"][0][0].endswith(", on wan frames: 4 latents of 16x8x8 × 2 noise draws")
