"""`projection calibrate`: a calibration set from a tiny random diffusers Wan pipeline (AutoencoderKLWan, UMT5, a
word-level tokenizer, the tiny teacher as its transformer; nothing downloaded) and folders of captioned images.
The set must equal what the pipeline's own VAE and encode_prompt give; bad inputs are one line or listed."""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from PIL import Image, ImageOps  # noqa: E402

from projection.function.calibrate import MAX_CAPTION, MAX_PIXELS, bound, list_data  # noqa: E402
from projection.function.calibration import FORMAT, load_calibration  # noqa: E402
from conftest import TINY, build_tiny_wan  # noqa: E402
from test_cli import assert_error, run  # noqa: E402

SIZE = (32, 48)  # height x width: latents 4 x 6 with the 8x VAE
WORDS = "a cat dog on the mat red blue green image of small big photo".split()
CAPTIONS = {"a.png": "a cat on the mat", "b.jpg": "big red dog", "c.webp": "a " * 1200}  # c: cut, then truncated


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_pipeline(root: Path, transformer=None, z_dim: int = 4, wan22: bool = False, seed: int = 0) -> Path:
    """A tiny random Wan pipeline folder, saved as diffusers saves one."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    stats = dict(latents_mean=torch.linspace(-0.5, 0.5, z_dim).tolist(),
                 latents_std=torch.linspace(0.5, 2.0, z_dim).tolist())
    extra = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16) if wan22 \
        else {}
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, **stats, **extra).eval()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=24, d_kv=12, d_ff=32, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                          decoder_start_token_id=0)).eval()
    WanPipeline(tokenizer=tokenizer(), text_encoder=encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                transformer=transformer).save_pretrained(root)
    return root


def noise_image(h: int, w: int, seed: int, channels: int = 3) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).numpy())


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a few dozen bytes: no pixel data behind it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_wan, tmp_path_factory) -> Path:
    """The pipeline folder; its transformer is the tiny teacher (in_dim 4, text_dim 24 as the VAE and UMT5)."""
    return build_pipeline(tmp_path_factory.mktemp("pipeline") / "wan", transformer=tiny_wan.model)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Captioned png (the exact size), jpg (resized and cropped), webp (RGBA; a caption over the length bound),
    an image without a caption, a caption without an image, and a file that is neither."""
    folder = tmp_path_factory.mktemp("images")
    noise_image(*SIZE, 1).save(folder / "a.png")
    noise_image(50, 90, 2).save(folder / "b.jpg", quality=95)
    noise_image(40, 40, 3, channels=4).save(folder / "c.webp", lossless=True)
    noise_image(*SIZE, 4).save(folder / "d.png")
    for name, caption in CAPTIONS.items():
        (folder / name).with_suffix(".txt").write_text(caption)
    (folder / "orphan.txt").write_text("a dog")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    return folder


def reference(pipeline: Path, folder: Path, names: list[str], captions: list[str]):
    """What the pipeline's own code gives (wan-reference section 11), computed here independently of calibrate."""
    from diffusers import WanPipeline
    from diffusers.utils import load_image

    pipe = WanPipeline.from_pretrained(pipeline, transformer=None)
    ctx, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
    lens = pipe.tokenizer(captions, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                          return_attention_mask=True, return_tensors="pt").attention_mask.sum(1)
    h, w = SIZE
    frames = [ImageOps.fit(load_image(str(folder / n)), (w, h), method=Image.Resampling.LANCZOS) for n in names]
    with torch.no_grad():
        video = torch.cat([pipe.video_processor.preprocess_video([f], h, w) for f in frames])
        z = pipe.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    return ((z - mean) / std)[:, :, 0], ctx, lens


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_set_equals_the_pipelines_own_encoding_and_fidelity_runs_on_it(pipeline, images, tmp_path, capsys,
                                                                         monkeypatch):
    import diffusers

    def never(*a, **k):
        raise AssertionError("calibrate loaded the transformer")

    monkeypatch.setattr(diffusers.WanTransformer3DModel, "from_pretrained", never)
    out = tmp_path / "cal.safetensors"
    code, stdout, err = run(capsys, "calibrate", "--pipeline", pipeline, "--data", images, "--size", "32x48",
                            "--out", out, "--batch", 2, "--teacher", pipeline / "transformer")
    assert code == 0, err
    assert "3 captioned images from" in stdout and f"checked against {pipeline / 'transformer'}" in stdout
    skipped = next(line for line in err.splitlines() if line.startswith("skipped "))
    assert "3 file(s)" in skipped and "notes.pdf (not an image or video" in skipped
    assert "d.png (no caption (d.txt missing))" in skipped and "orphan.txt (a caption without an image)" in skipped
    assert f"longer than {MAX_CAPTION:,} characters were cut there (first: c.webp)" in err
    monkeypatch.undo()

    found = load_calibration(out)
    names = ["a.png", "b.jpg", "c.webp"]
    captions = [CAPTIONS[n].strip()[:MAX_CAPTION] for n in names]
    latents, context, lengths = reference(pipeline, images, names, captions)
    assert found.latents.shape == (3, 4, 4, 6) and found.context.shape == (3, 512, 24)
    assert rel(found.latents, latents) < 1e-4 and rel(found.context, context) < 1e-4
    words = [len(c.split()) + 1 for c in captions]  # the word-level tokenizer: one token a word, then </s>
    assert words == [6, 4, 1001]  # the long caption: cut at 2,000 characters, then by the tokenizer at 512 tokens
    assert found.context_lengths.tolist() == lengths.tolist() == [6, 4, 512]
    for i, n in enumerate(found.context_lengths.tolist()):
        assert found.context[i, n:].abs().sum() == 0 and found.context[i, :n].abs().sum(-1).min() > 0
    meta = found.metadata
    assert meta["format"] == FORMAT and meta["samples"] == "3" and meta["size"] == "32x48"
    assert meta["source"] == f"3 captioned images from {images}, encoded by {pipeline} at 32x48"
    assert meta["frames"] == "first" and meta["dtype"] == "float32" and meta["pipeline"] == str(pipeline)
    assert all(meta[f"{c}_fingerprint"].startswith("sha256:") for c in ("vae", "text_encoder", "tokenizer"))
    assert meta["data"] == str(images) and meta["tool"].startswith("projection-inspector ")
    assert not list(tmp_path.glob(".*partial*"))  # written atomically: no temporary file left

    # the pipeline's own transformer runs on it
    student = tmp_path / "shallow.yaml"
    student.write_text("layout: wanlite\nnum_layers: 2\n")
    code, stdout, err = run(capsys, "fidelity", "--teacher", pipeline / "transformer", "--student", student,
                            "--calibration", out, "--draws", 1, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["calibration"].startswith("3 captioned images from") and not result["calibration_synthetic"]
    assert all(f["relative_error"] >= 0 for f in result["students"].values())

    # an existing --out is refused without --force; with it, replaced (metadata.jsonl, bfloat16 context, --max)
    assert_error(*run(capsys, "calibrate", "--pipeline", pipeline, "--data", images, "--size", "32x48", "--out", out),
                 str(out), "already exists; --force replaces it")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    for n in ("a.png", "b.jpg"):
        (meta_dir / n).write_bytes((images / n).read_bytes())
    (meta_dir / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": CAPTIONS[n]})
                                                       for n in ("b.jpg", "a.png")) + "\n")
    code, stdout, err = run(capsys, "calibrate", "--pipeline", pipeline, "--data", meta_dir, "--size", "32x48",
                            "--out", out, "--force", "--dtype", "bfloat16", "--max", 1)
    assert code == 0, err
    again = load_calibration(out)
    assert len(again) == 1 and again.metadata["dtype"] == "bfloat16" and "skipped" not in err
    with __import__("safetensors").safe_open(str(out), "pt") as f:
        assert f.get_slice("context").get_dtype() == "BF16" and f.get_slice("latents").get_dtype() == "F32"
    assert rel(again.latents, found.latents[:1]) < 1e-5 and again.context_lengths.tolist() == [6]  # a.png first
    assert rel(again.context, found.context[:1]) < 1e-2  # bfloat16


def test_a_48_channel_16x_vae(tmp_path, capsys):
    """A Wan2.2 TI2V-5B-shaped VAE (48 channels, patchified 16x): sizes are multiples of 32; latents as its encode."""
    from diffusers import AutoencoderKLWan

    pipe = build_pipeline(tmp_path / "ti2v", z_dim=48, wan22=True)
    data = tmp_path / "data"
    data.mkdir()
    noise_image(64, 96, 5).save(data / "x.png")
    (data / "x.txt").write_text("a small cat")
    out = tmp_path / "cal.safetensors"
    capsys.readouterr()
    assert_error(*run(capsys, "calibrate", "--pipeline", pipe, "--data", data, "--size", "48x96", "--out", out),
                 "--size 48x96", "downsamples 16x", "multiples of 32")
    code, _, err = run(capsys, "calibrate", "--pipeline", pipe, "--data", data, "--size", "64x96", "--out", out)
    assert code == 0, err
    found = load_calibration(out)
    assert found.latents.shape == (1, 48, 4, 6) and found.metadata["vae_scale_factor"] == "16"
    vae = AutoencoderKLWan.from_pretrained(pipe / "vae")
    from diffusers.video_processor import VideoProcessor

    with torch.no_grad():
        z = vae.encode(VideoProcessor(vae_scale_factor=16).preprocess_video([Image.open(data / "x.png")], 64, 96))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert rel(found.latents, ((z.latent_dist.mode() - mean) / std)[:, :, 0]) < 1e-4


def test_videos_first_or_every_kth_frame_or_skipped_without_a_reader(pipeline, tmp_path, capsys, monkeypatch):
    av = pytest.importorskip("av")
    data = tmp_path / "clips"
    data.mkdir()
    with av.open(str(data / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_image(noise_image(32, 48, 10 + i))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (data / "clip.txt").write_text("a dog on the mat")
    noise_image(*SIZE, 1).save(data / "still.png")
    (data / "still.txt").write_text("a cat")
    out = tmp_path / "v.safetensors"
    code, _, err = run(capsys, "calibrate", "--pipeline", pipeline, "--data", data, "--size", "32x48", "--out", out,
                       "--frames", "every:2")
    assert code == 0, err
    found = load_calibration(out)
    assert len(found) == 4 and found.context_lengths.tolist() == [6, 6, 6, 3]  # frames 0, 2, 4; then the image
    assert found.metadata["source"].startswith("1 captioned image and 3 frames of 1 captioned video from")
    assert found.metadata["frames"] == "every:2"
    with av.open(str(data / "clip.mp4")) as container:
        first = next(container.decode(video=0)).to_image()
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(pipeline, transformer=None)
    with torch.no_grad():
        z = pipe.vae.encode(pipe.video_processor.preprocess_video([first], *SIZE)).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert rel(found.latents[:1], ((z - mean) / std)[:, :, 0]) < 1e-4
    code, _, err = run(capsys, "calibrate", "--pipeline", pipeline, "--data", data, "--size", "32x48", "--out", out,
                       "--force")
    assert code == 0 and len(load_calibration(out)) == 2  # the first frame and the image
    monkeypatch.setitem(sys.modules, "av", None)  # no video reader installed
    listing = list_data(data)
    assert [i.name for i in listing.items] == ["still.png"]
    assert listing.skipped == [("clip.mp4", "no video reader installed (pip install av)")]


def test_bad_inputs_are_one_line_or_listed(pipeline, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cal.safetensors"
    base = ["calibrate", "--pipeline", pipeline, "--size", "32x48", "--out", out]
    # an empty folder; a folder whose only files are a bomb (header alone: 20000 x 20000) and a non-image
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(*run(capsys, *base, "--data", empty), str(empty), "no usable sample")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    bomb_png(bombs / "huge.png", 20000, 20000)
    (bombs / "huge.txt").write_text("a cat")
    bomb_png(bombs / "large.png", 9000, 9000)  # under PIL's own error, over MAX_PIXELS
    (bombs / "large.txt").write_text("a dog")
    (bombs / "fake.jpg").write_bytes(b"not a jpeg at all")
    (bombs / "fake.txt").write_text("a mat")
    line = assert_error(*run(capsys, *base, "--data", bombs), "no usable sample",
                        "huge.png (400,000,000 pixels, more than the limit", "decompression bomb is refused",
                        "large.png (9000x9000 pixels, more than the limit", "fake.jpg (not a readable image")
    assert f"{MAX_PIXELS:,}" in line and not out.exists()
    # a symlink leaving the folder is skipped with the reason
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "out.png").symlink_to(images / "a.png")
    (linked / "out.txt").write_text("a cat")
    noise_image(*SIZE, 1).save(linked / "real.png")
    (linked / "in.png").symlink_to(linked / "real.png")
    for name in ("in", "real"):
        (linked / f"{name}.txt").write_text("a dog")
    listing = list_data(linked)
    assert [i.name for i in listing.items] == ["in.png", "real.png"]
    assert ("out.png", f"resolves to {images / 'a.png'}, outside the folder") in listing.skipped
    # wrong sizes, a pipeline folder without a VAE, a bad --frames, --max beyond the format's bound
    for size in ("30x48", "32x40x1", "0x0", "big"):
        assert_error(*run(capsys, *base[:3], "--size", size, "--out", out, "--data", images), "--size")
    assert_error(*run(capsys, *base[:3], "--size", "24x48", "--out", out, "--data", images), "multiples of 16")
    novae = tmp_path / "novae"
    for part in ("text_encoder", "tokenizer"):
        (novae / part).mkdir(parents=True)
    assert_error(*run(capsys, "calibrate", "--pipeline", novae, "--data", images, "--size", "32x48", "--out", out),
                 str(novae), "no vae/ folder")
    assert_error(*run(capsys, *base, "--data", images, "--frames", "every:0"), "--frames")
    assert_error(*run(capsys, "calibrate", "--pipeline", tmp_path / "nowhere", "--data", images, "--size", "32x48",
                      "--out", out), "no such folder")
    assert_error(*run(capsys, *base[:6], tmp_path / "cal.bin", "--data", images), ".safetensors")
    # a teacher whose text width differs is refused before anything is encoded
    other = build_tiny_wan(tmp_path / "other", {**TINY, "text_dim": 16, "num_layers": 1}).diffusers_dir
    assert_error(*run(capsys, *base, "--data", images, "--teacher", other), str(other),
                 "tensor 'context' has width 24; the teacher's text_dim is 16")
    assert_error(*run(capsys, *base, "--data", images, "--teacher", images / "notes.pdf"), "notes.pdf")
    assert not out.exists()
    # without the extra: which extra to install
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert_error(*run(capsys, *base, "--data", images), "needs diffusers",
                 "pip install 'projection-inspector[calibrate]'")


def test_metadata_csv_and_listing_rules(tmp_path):
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    noise_image(8, 8, 0).save(data / "sub" / "z.png")
    noise_image(8, 8, 0).save(data / "y.PNG")
    noise_image(8, 8, 0).save(data / "x.jpeg")
    (data / "metadata.csv").write_text('file_name,text\nsub/z.png,"a cat, small"\ny.PNG,a dog\n../evil.png,x\n'
                                       'gone.png,a mat\n')
    listing = list_data(data)
    assert [(i.name, i.caption) for i in listing.items] == [("sub/z.png", "a cat, small"), ("y.PNG", "a dog")]
    assert dict(listing.skipped) == {"x.jpeg": "no caption (not in metadata.csv)",
                                     "../evil.png": "metadata.csv line 4: outside the folder",
                                     "gone.png": "metadata.csv line 5: no such image or video"}
    (data / "metadata.jsonl").write_text("{}")
    with pytest.raises(Exception, match="both metadata.jsonl and metadata.csv"):
        list_data(data)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name, caption in (("u", "caf\u00e9 ".encode() * 20000), ("v", b"\xff\xfe bad"), ("w", b"\xef\xbb\xbfa cat")):
        noise_image(8, 8, 0).save(plain / f"{name}.png")
        (plain / f"{name}.txt").write_bytes(caption)
    listing = list_data(plain)
    assert [(i.name, len(i.caption), i.cut) for i in listing.items] == [("u.png", MAX_CAPTION, True),
                                                                         ("w.png", 5, False)]
    assert listing.skipped == [("v.png", "v.txt: not UTF-8 text (invalid start byte at byte 0)")]


def cache_repo(cache: Path, repo: str, commit: str, folder: Path) -> None:
    """A huggingface_hub cache entry holding `folder`'s files: blobs by hash, snapshot symlinks, refs/main."""
    import hashlib
    import os

    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = base / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)


def test_a_hub_id_resolves_from_the_offline_cache(pipeline, images, tmp_path, capsys, monkeypatch):
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    local = tmp_path / "local"
    shutil.copytree(pipeline, local, ignore=shutil.ignore_patterns("transformer"))
    cache_repo(cache, "org/wan", "3" * 40, local)
    outs = {}
    for source in ("org/wan", str(local)):
        outs[source] = tmp_path / f"{len(outs)}.safetensors"
        code, _, err = run(capsys, "calibrate", "--pipeline", source, "--data", images, "--size", "32x48", "--out",
                           outs[source], "--max", 2)
        assert code == 0, err
    hub, here = (load_calibration(outs[s]) for s in ("org/wan", str(local)))
    assert hub.metadata["pipeline"] == "org/wan" and "encoded by org/wan at 32x48" in hub.metadata["source"]
    assert torch.equal(hub.latents, here.latents) and torch.equal(hub.context, here.context)
    assert all(hub.metadata[k] == here.metadata[k] for k in hub.metadata if k.endswith("_fingerprint"))
    assert_error(*run(capsys, "calibrate", "--pipeline", "org/missing", "--data", images, "--size", "32x48", "--out",
                      tmp_path / "x.safetensors"), "org/missing", "offline")


def test_the_format_bounds_a_real_wan_set():
    """projection.calibration's bounds: a 512 x 4096 UMT5 context allows 1,024 samples (2^31 values), as Minitron
    calibrates on; latents of 480x832 at 8x alone would allow 1,344 (2^23 latent pixels)."""
    assert bound(480, 832, 8, 4096) == 1024 and bound(704, 1280, 16, 4096) == 1024
    assert bound(480, 832, 8, 24) == (1 << 23) // (60 * 104) == 1344 and bound(32, 48, 8, 24) == 4096
