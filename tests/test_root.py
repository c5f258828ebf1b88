"""The app's --root holds: every file a source leads to (links, index shards, hub subfolders) is resolved and
checked before it is read; an index's shards and a hub subfolder stay inside their folder for the CLI too;
errors never quote a non-checkpoint's bytes; hub ids are allowed only on loopback unless --allow-hub says so,
and a download waits for the user to confirm its size. The hostile inputs are built for real in tmp_path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from safetensors.torch import save_file
from test_browser import ARGS, CHROMIUM, TIMEOUT
from test_checkpoint import COMMIT_MAIN, cache_repo
from test_cli import assert_error, run
from test_inspector import WANLITE, call, free_port, load, rows

from projection import ProjectionError, open_checkpoint
from projection.demo.folder import write_demo
import projection.io.checkpoint as checkpoint_module

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # inside gradio
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
ENVIRON = Path("/proc/self/environ")
INDEX = "model.safetensors.index.json"
OUTSIDE = "outside the folders this app may open"


def env_leaks(message: str) -> list[str]:
    """Traces of this process's environment in a message: its first 8 bytes read as a safetensors header length
    (how the leak showed), or 8 bytes of its first variable verbatim, around the '='."""
    env = ENVIRON.read_bytes()
    first = env.split(b"\0")[0].decode(errors="replace")
    traces = [str(int.from_bytes(env[:8], "little"))] + [first[i:i + 8] for i in range(max(1, len(first) - 7))
                                                         if "=" in first[i:i + 8]]
    return [t for t in traces if t in message]


def write_index(folder: Path, shards: dict[str, str]) -> Path:
    """An index mapping tensor name -> shard name, exactly as given (hostile names included)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / INDEX
    index.write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return index


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A genuine Hugging Face cache at tmp_path/hub (offline, as in every test), holding org/name."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cache_repo(cache, "org/name", COMMIT_MAIN, {"config.json": b"{}"}, refs=("main",))
    return cache, snapshot


# ------------------------------------------------------------------ the core and the CLI (no --root)


@pytest.mark.parametrize("shard", ["ABSOLUTE", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors", str(ENVIRON)],
                         ids=["absolute", "parent", "nested-parent", "backslash-parent", "proc-environ"])
def test_index_shards_stay_in_the_index_folder(tmp_path, capsys, shard):
    outside = tmp_path / "models" / "outside.safetensors"  # where every '..' name below lands
    outside.parent.mkdir()
    save_file({"w": torch.ones(2)}, str(outside))
    name = str(outside) if shard == "ABSOLUTE" else shard
    index = write_index(tmp_path / "models" / "m", {"w": name})
    (index.parent / "sub").mkdir()
    if "\\" in name:  # an ordinary character on POSIX: give that name a real file, so only the rule refuses it
        save_file({"w": torch.ones(2)}, str(index.parent / name))
    with pytest.raises(ProjectionError) as info:
        open_checkpoint(index)
    message = str(info.value)
    assert str(index) in message and "is not a .safetensors file inside the index's folder" in message
    assert not env_leaks(message)
    line = assert_error(*run(capsys, "inspect", index.parent), "inside the index's folder")
    assert not env_leaks(line)


def test_shards_in_a_subfolder_and_linked_shards_are_fine_without_a_root(tmp_path):
    """The rule is on the names an index gives; where a named shard links to is --root's business (a hub
    snapshot's shards are links into its blob store)."""
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    save_file({"b": torch.ones(3)}, str(blob))
    index = write_index(tmp_path / "m", {"a": "sub/a.safetensors", "b": "b.safetensors"})
    (index.parent / "sub").mkdir()
    save_file({"a": torch.zeros(2)}, str(index.parent / "sub" / "a.safetensors"))
    (index.parent / "b.safetensors").symlink_to(blob)
    ckpt = open_checkpoint(index)
    assert torch.equal(ckpt.get("a"), torch.zeros(2)) and torch.equal(ckpt.get("b"), torch.ones(3))


def test_errors_never_quote_a_non_checkpoint(tmp_path, capsys):
    # the environment, reached through a link named like a checkpoint (the CLI has no root: it follows links)
    link = tmp_path / "w.safetensors"
    link.symlink_to(ENVIRON)
    with pytest.raises(ProjectionError, match="corrupt safetensors header") as info:
        open_checkpoint(link)
    assert not env_leaks(str(info.value))
    assert not env_leaks(assert_error(*run(capsys, "inspect", link), "corrupt safetensors header"))
    # a text file named like a torch file: never unpickled, so no pickle opcode quotes it
    secret = tmp_path / "notes.pt"
    secret.write_text("cpassword\nhunter2_secret\n(tR.")
    with pytest.raises(ProjectionError, match="not a plain torch.save") as info:
        open_checkpoint(secret)
    assert "hunter2" not in str(info.value) and "password" not in str(info.value)
    # an index whose weight_map is text, and JSON that is not UTF-8
    index = write_index(tmp_path / "i", {})
    index.write_text(json.dumps({"weight_map": "hunter2_secret"}))
    with pytest.raises(ProjectionError, match="got a JSON string") as info:
        open_checkpoint(index)
    assert "hunter2" not in str(info.value)
    index.write_bytes(b'{"weight_map": "\xe9hunter2"}')
    with pytest.raises(ProjectionError, match="not UTF-8 text") as info:
        open_checkpoint(index)
    assert "xe9" not in str(info.value) and "hunter2" not in str(info.value)


def test_hub_subfolder_cannot_leave_the_snapshot(tmp_path, hub, capsys):
    cache, snapshot = hub
    teacher = tmp_path / "outside" / "teacher"  # where snapshot/../../../../outside/teacher lands
    teacher.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(teacher / "model.safetensors"))
    escape = "../../../../outside/teacher"
    assert (snapshot / escape).resolve() == teacher  # without the rule, this id would open that folder
    for source in (f"org/name:{escape}", "org/name@main:sub/../../../../../outside/teacher"):
        with pytest.raises(ProjectionError, match=r"leaves the repository \('\.\.' is not allowed\)"):
            open_checkpoint(source)
        assert_error(*run(capsys, "inspect", source), "leaves the repository")


def test_hub_files_stay_in_the_repository_cache(tmp_path, hub):
    cache, snapshot = hub
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.ones(2)}, str(outside))
    (snapshot / "model.safetensors").symlink_to(outside)
    with pytest.raises(ProjectionError, match="outside the repository's Hugging Face cache folder"):
        open_checkpoint("org/name")


# ------------------------------------------------------------------ the app: --root holds


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> dict[str, Path]:
    """ROOT (the app's --root, with the demo) and, beside it, a teacher the app must never read."""
    base = tmp_path_factory.mktemp("root-space")
    root, outside = base / "root", base / "outside"
    demo = write_demo(root / "demo")
    shutil.copytree(demo / "teacher-wan", outside / "teacher")
    return {"base": base, "root": root, "outside": outside / "teacher", "demo": demo}


@pytest.fixture(scope="module")
def app(space):
    from inspector.cli import start

    threads = torch.get_num_threads()
    blocks = start(["--root", str(space["root"]), "--port", str(free_port())], prevent_thread_lock=True, quiet=True)
    yield blocks
    blocks.close()
    torch.set_num_threads(threads)


@pytest.fixture
def client(app) -> Client:
    return Client(app.local_url, verbose=False)


def refused(client, app, teacher: str, *parts: str) -> str:
    with pytest.raises(Exception) as info:
        load(client, app, teacher=teacher)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert not env_leaks(message)
    return message


def test_weights_linked_outside_the_root_are_refused_by_the_app(client, app, space, capsys):
    root, outside = space["root"], space["outside"]
    folder = root / "linked"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(outside / "diffusion_pytorch_model.safetensors")
    shutil.copy(outside / "config.json", folder)
    refused(client, app, "linked", OUTSIDE, "a link to", str(outside / "diffusion_pytorch_model.safetensors"))
    assert run(capsys, "inspect", folder)[0] == 0  # the CLI has no root: the same folder opens there
    # a link that stays inside the root is fine
    inside = root / "linked-inside"
    inside.mkdir()
    target = space["demo"] / "teacher-wan"
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        (inside / name).symlink_to(target / name)
    assert len(rows(load(client, app, teacher="linked-inside"))) == 123


def test_expert_folder_and_config_linked_outside_are_refused(client, app, space):
    root, outside = space["root"], space["outside"]
    experts = root / "experts"
    experts.mkdir()
    (experts / "low_noise_model").symlink_to(outside, target_is_directory=True)
    refused(client, app, "experts", OUTSIDE, "low_noise_model")
    folder = root / "config-linked"
    shutil.copytree(space["demo"] / "teacher-wan", folder)
    (folder / "config.json").unlink()
    secret = space["base"] / "secret.json"
    secret.write_text(json.dumps({"dim": 256, "api_key": "hunter2"}))
    (folder / "config.json").symlink_to(secret)
    assert "hunter2" not in refused(client, app, "config-linked", OUTSIDE, "config.json")


@pytest.mark.parametrize("shard", ["ABSOLUTE", "../../outside/teacher/diffusion_pytorch_model.safetensors",
                                   str(ENVIRON)], ids=["absolute", "parent", "proc-environ"])
def test_hostile_index_in_the_root_is_refused(client, app, space, shard):
    target = space["outside"] / "diffusion_pytorch_model.safetensors"
    keys = list(open_checkpoint(target).tensors)
    name = str(target) if shard == "ABSOLUTE" else shard
    folder = space["root"] / f"hostile-{abs(hash(shard))}"
    write_index(folder, {k: name for k in keys})
    shutil.copy(space["outside"] / "config.json", folder)
    refused(client, app, folder.name, "is not a .safetensors file inside the index's folder")


def test_hub_subfolder_with_dots_is_refused_by_the_app(client, app, space, monkeypatch):
    from huggingface_hub import constants

    cache = space["base"] / "hub"  # snapshot/../../../../outside/teacher is the teacher outside the root
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cache_repo(cache, "org/name", COMMIT_MAIN, {"config.json": b"{}"}, refs=("main",))
    assert (snapshot / "../../../../outside/teacher").resolve() == space["outside"]
    refused(client, app, "org/name:../../../../outside/teacher", "leaves the repository")


def test_export_into_a_dangling_link_is_refused(client, app, space):
    load(client, app, teacher="demo/teacher-wan")
    (space["root"] / "out").mkdir(exist_ok=True)
    target = space["base"] / "exported-outside"
    (space["root"] / "out" / "dangling").symlink_to(target)
    with pytest.raises(Exception, match="already exists"):
        call(client, app, "export", "out/dangling", "float32", "cpu")
    assert not target.exists() and (space["root"] / "out" / "dangling").is_symlink()


# ------------------------------------------------------------------ hub ids: who may, and how much


def test_hub_ids_are_allowed_by_default_only_on_loopback():
    from inspector.cli import build_parser, hub_allowed

    def allowed(*argv: str) -> bool:
        args = build_parser().parse_args(list(argv))
        return hub_allowed(args.host, args.allow_hub)

    assert allowed() and allowed("--host", "localhost") and allowed("--host", "127.0.0.2")
    assert allowed("--host", "::1")
    assert not allowed("--host", "0.0.0.0") and not allowed("--host", "192.168.1.5")
    assert not allowed("--host", "::") and not allowed("--host", "my-box.example")
    assert allowed("--host", "0.0.0.0", "--allow-hub")
    assert not allowed("--no-allow-hub")


def test_app_without_hub_refuses_typed_hub_ids_and_trusts_its_command_line(space, hub):
    from inspector.cli import start

    # the operator's teacher: outside the root, its weights a link to yet another folder
    chosen = space["base"] / "operator-teacher"
    chosen.mkdir()
    shutil.copy(space["outside"] / "config.json", chosen)
    weights = "diffusion_pytorch_model.safetensors"
    (chosen / weights).symlink_to(space["outside"] / weights)
    blocks = start(["--root", str(space["root"]), "--port", str(free_port()), "--no-allow-hub", "--teacher",
                    str(chosen), "--student", str(space["root"] / WANLITE)], prevent_thread_lock=True, quiet=True)
    try:
        client = Client(blocks.local_url, verbose=False)
        with pytest.raises(Exception, match="hub ids are off in this app.*--allow-hub"):
            load(client, blocks, teacher="org/name")
        assert len(rows(load(client, blocks, teacher=str(chosen)))) == 123
        with pytest.raises(Exception, match=OUTSIDE):
            load(client, blocks, teacher=str(space["outside"]))  # the link's target, typed: not the operator's
        assert len(rows(load(client, blocks, teacher="demo/teacher-wan"))) == 123  # paths under the root open
    finally:
        blocks.close()


@pytest.fixture
def online_hub(space, monkeypatch):
    """The hub, faked at its two network calls: the file list (sizes from metadata) and the download (which
    fills the genuine local cache the way huggingface_hub does). Nothing touches the network."""
    from huggingface_hub import constants

    cache = space["base"] / "online-hub"
    shutil.rmtree(cache, ignore_errors=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    teacher = space["demo"] / "teacher-wan"
    content = {name: (teacher / name).read_bytes() for name in ("config.json", "diffusion_pytorch_model.safetensors")}
    content["README.md"] = b"# a model"
    sizes = {name: len(data) for name, data in content.items()}
    sizes["models_t5_umt5-xxl-enc-bf16.pth"] = 11_361_920_418  # Wan's text encoder: not the transformer's
    sizes["google/umt5-xxl/tokenizer.json"] = 16_837_417
    listed, downloaded = [], []

    def listing(repo, revision):
        assert repo == "org/wan" and revision in (None, "main")
        listed.append(repo)
        return COMMIT_MAIN, dict(sizes)

    def download(repo, revision, files):
        snapshot = cache / "models--org--wan" / "snapshots" / COMMIT_MAIN
        new = [f for f in files if not (snapshot / f).exists()]
        if new:
            downloaded.append(sorted(new))
            cache_repo(cache, repo, COMMIT_MAIN, {f: content[f] for f in new}, refs=("main",))
        return snapshot

    monkeypatch.setattr(checkpoint_module, "_hub_listing", listing)
    monkeypatch.setattr(checkpoint_module, "_hub_fetch", download)
    return {"sizes": sizes, "listed": listed, "downloaded": downloaded}


def test_a_download_waits_for_the_user_to_confirm_its_size(client, app, online_hub):
    from inspector.units import human_bytes

    sizes = online_hub["sizes"]
    needed = ["config.json", "diffusion_pytorch_model.safetensors"]
    size = human_bytes(sum(sizes[f] for f in needed))
    with pytest.raises(Exception, match="Press Load first"):
        client.predict("org/wan", "single model", "file", WANLITE, api_name="/download")
    asked = load(client, app, teacher="org/wan")
    assert online_hub["listed"] and online_hub["downloaded"] == []  # the size comes from metadata alone
    message = asked["source-msg"]
    assert "org/wan" in message and f"2 files, {size}" in message and "sizes from the hub" in message
    assert f"Nothing has been downloaded yet: “Download {size} and load” fetches them" in message
    assert not asked["mapping-table"]  # nothing loaded

    # the user changed the teacher before confirming: nothing downloads, Load asks again
    changed = client.predict("demo/teacher-wan", "single model", "file", WANLITE, api_name="/download")
    assert "nothing was downloaded" in str(changed) and online_hub["downloaded"] == []

    load(client, app, teacher="org/wan")
    done = client.predict("org/wan", "single model", "file", WANLITE, api_name="/download")
    assert online_hub["downloaded"] == [needed]  # exactly the transformer's files: no text encoder, no README
    assert "Downloaded" in str(done)
    loaded = load(client, app, teacher="org/wan")
    assert len(rows(loaded)) == 123 and "Loaded in" in loaded["source-msg"]
    assert online_hub["downloaded"] == [needed]  # cached now: no second download, no question

    # offline, a cached id opens without asking the hub anything
    from huggingface_hub import constants

    online_hub["listed"].clear()
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    assert len(rows(load(client, app, teacher="org/wan"))) == 123 and not online_hub["listed"]


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_the_download_button_shows_the_size_and_loads_after_the_download(app, online_hub):
    from playwright.sync_api import expect, sync_playwright

    from inspector.units import human_bytes

    size = human_bytes(sum(online_hub["sizes"][f] for f in ("config.json", "diffusion_pytorch_model.safetensors")))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(TIMEOUT)
            page.goto(app.local_url)
            page.get_by_text("patch_embedding.weight").first.wait_for()  # the demo, loaded on opening
            page.get_by_role("tab", name="Sources").click()
            page.locator("#teacher-path textarea").fill("org/wan")
            page.locator("#load-button").click()
            button = page.locator("#download-button")
            expect(button).to_have_text(f"Download {size} and load")
            expect(page.locator("#source-msg")).to_contain_text(f"2 files, {size}")
            assert online_hub["downloaded"] == []
            button.click()
            expect(page.locator("#source-msg")).to_contain_text("Loaded in")
            expect(button).to_be_hidden()
            assert online_hub["downloaded"] == [["config.json", "diffusion_pytorch_model.safetensors"]]
            expect(page.locator("#cards")).to_contain_text("org/wan")
        finally:
            browser.close()
