"""`projection calibrate`: a real calibration set from a diffusers Wan pipeline and a folder of captioned images.

    calibrate(pipeline, data, "480x832", "cal.safetensors")

Only the pipeline's tokenizer, text encoder (UMT5) and VAE (AutoencoderKLWan) are loaded, never its transformer,
and never the text encoder and the VAE together: every caption is encoded first (then the encoder is freed), then
the images, one batch at a time. Latents and context are exactly what the pipeline computes (see
`../shared/wan-reference.md` section 11):
  latents  = (vae.encode(video_processor.preprocess_video([image])).latent_dist.mode() - latents_mean) / latents_std,
             first latent frame, the image resized (shorter side) and center-cropped to the size first;
  context  = encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=512): the states cut at
             the caption's token count and zero-padded to 512; context_lengths = the token counts.
The VAE always runs in float32 and the latents are stored in float32 (they are small, and the teacher's input);
`dtype` is the text encoder's dtype and the context's stored dtype (bfloat16 halves a 512 x 4096 context).

diffusers, transformers and Pillow come from the `calibrate` extra; they are imported only when this runs.
"""
from __future__ import annotations

import codecs
import csv
import gc
import hashlib
import importlib
import io
import json
import os
import re
import stat
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

# Project code: kept to these lines, so that moving this module moves only them.
from ..core.project import pick_device
from ..errors import ProjectionError
from ..io.checkpoint import _hub_prefix, hub_source, within
from ..io.digest import file_digest
from ..io.inputs import clip, open_regular, printable, read_json
from .calibration import FORMAT, MAX_CONTEXT, MAX_SAMPLES, MAX_TOKENS, check_shapes, load_calibration

EXTRA = "pip install 'projection-inspector[calibrate]'"
IMAGES = (".png", ".jpg", ".jpeg", ".webp")
VIDEOS = (".mp4", ".webm")
METADATA = ("metadata.jsonl", "metadata.csv")
COMPONENTS = ("vae", "text_encoder", "tokenizer")
MAX_SEQUENCE_LENGTH = 512  # Wan's text length: encode_prompt(..., max_sequence_length=512)
DEFAULT_MAX = 512  # samples when --max is not given (fewer when the format's bounds allow fewer)
MAX_PIXELS = 1 << 26  # pixels of an image or video frame (8192 x 8192), checked from its header before decoding
MAX_CAPTION = 2000  # characters of a caption; longer ones are cut, with a note
MAX_CAPTION_BYTES = 1 << 16  # bytes read of a caption file
MAX_METADATA_BYTES = 64 << 20  # metadata.jsonl / metadata.csv
MAX_FILES = 200_000  # files listed in the data folder (walked in sorted order, so the cut is deterministic)
MAX_VIDEO_FRAMES = 100_000  # frames decoded of one video
MAX_SIDE = 4096  # --size: pixels per side
MAX_BATCH = 64


Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments

def parse_size(text: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' -> (height, width), multiples of 16 (the VAE's rule is checked once its config is read)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 6 for p in parts):
        raise ProjectionError(f"--size {clip(str(text), 40)!r}: give HEIGHTxWIDTH in pixels, e.g. 480x832")
    h, w = (int(p) for p in parts)
    if not (16 <= h <= MAX_SIDE and 16 <= w <= MAX_SIDE) or h % 16 or w % 16:
        raise ProjectionError(f"--size {h}x{w}: height and width must be multiples of 16 (8x VAE, 2x2 patches; 32 "
                              f"for a 16x VAE such as Wan2.2 TI2V-5B's), from 16 to {MAX_SIDE}")
    return h, w


def parse_frames(text: str) -> int | None:
    """'first' -> None; 'every:K' -> K (every K-th frame of a video, from the first)."""
    text = str(text)
    if text == "first":
        return None
    if text.startswith("every:") and text[6:].isdigit() and len(text) <= 12 and int(text[6:]) >= 1:
        return int(text[6:])
    raise ProjectionError(f"--frames {clip(text, 40)!r}: give 'first' or 'every:K' (K a whole number from 1)")


def frames_rule(every: int | None) -> str:
    return "first" if every is None else f"every:{every}"


# ---------------------------------------------------------------- the extra

def require_extra() -> None:
    """diffusers, transformers and Pillow, or one line saying which extra installs them."""
    missing = []
    for name in ("diffusers", "transformers", "PIL"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append("Pillow" if name == "PIL" else name)
    if missing:
        raise ProjectionError(f"projection calibrate needs {' and '.join(missing)}, which are not installed: "
                              f"{EXTRA}")


def video_reader() -> str | None:
    """Why videos cannot be read here, or None when PyAV is importable."""
    try:
        importlib.import_module("av")
    except ImportError:
        return "no video reader installed (pip install av)"
    return None


# ---------------------------------------------------------------- the pipeline

@dataclass(frozen=True)
class Pipeline:
    folder: Path  # the pipeline root (vae/, text_encoder/, tokenizer/)
    name: str  # as given: a path or a hub id
    check: Callable[[Path, Path], None] | None  # a hub id's files must resolve inside its cache folder
    vae_config: dict[str, Any]
    text_config: dict[str, Any]

    @property
    def channels(self) -> int:
        return int(self.vae_config.get("z_dim", 16))

    @property
    def scale(self) -> int:
        """The VAE's spatial factor: 8 for Wan 2.1's, 16 for Wan 2.2 TI2V-5B's."""
        given = self.vae_config.get("scale_factor_spatial")
        if given:
            return int(given)
        return 2 ** (len(self.vae_config.get("dim_mult", [1, 2, 4, 4])) - 1) * int(self.vae_config.get("patch_size")
                                                                                   or 1)

    @property
    def text_dim(self) -> int:
        return int(self.text_config.get("d_model", 4096))


def resolve_pipeline(spec: str) -> tuple[Path, Callable[[Path, Path], None] | None]:
    """A local pipeline folder, or a hub id from the local Hugging Face cache (HF_HUB_OFFLINE=1) or downloaded
    (only model_index.json, vae/, text_encoder/ and tokenizer/)."""
    hub = hub_source(spec)
    if hub is None:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ProjectionError(f"{spec}: no such folder (and not a hub id 'org/name')")
        if not path.is_dir():
            raise ProjectionError(f"{spec}: not a folder; a pipeline is a diffusers Wan pipeline folder (vae/, "
                                  "text_encoder/, tokenizer/) or a hub id")
        return path, None
    from huggingface_hub import constants, snapshot_download

    repo, revision, subfolder = hub
    prefix = _hub_prefix(spec, subfolder)
    try:
        if constants.is_offline_mode():
            root = Path(snapshot_download(repo, revision=revision))  # the cached snapshot; nothing downloads
        else:
            _stderr(f"fetching {spec} (model_index.json, vae/, text_encoder/, tokenizer/) from the hub")
            root = Path(snapshot_download(repo, revision=revision, allow_patterns=[
                prefix + p for p in ("model_index.json", "vae/*", "text_encoder/*", "tokenizer/*")]))
    except Exception as exc:
        hint = " (offline: is it in the local Hugging Face cache?)" if constants.is_offline_mode() else ""
        raise ProjectionError(f"{spec}: no such local folder, and cannot resolve it as a hub id{hint}: "
                              f"{type(exc).__name__}: {printable(str(exc))[:300]}") from exc
    folder = root / prefix
    if not folder.resolve().is_relative_to(root.resolve()) or not folder.is_dir():
        raise ProjectionError(f"{spec}: no folder '{subfolder}' in the repository ({root})")
    return folder, within(root.parent.parent, "the repository's Hugging Face cache folder")


def open_pipeline(spec: str) -> Pipeline:
    """The pipeline's folder and its VAE and text-encoder configs (read, not its weights), checked to be Wan's."""
    folder, check = resolve_pipeline(str(spec))
    for name in COMPONENTS:
        part = folder / name
        if not part.is_dir():
            what = {"vae": "a VAE", "text_encoder": "a text encoder", "tokenizer": "a tokenizer"}[name]
            raise ProjectionError(f"{spec}: no {name}/ folder ({what}); a Wan pipeline folder holds vae/, "
                                  "text_encoder/ and tokenizer/ (as diffusers saves them)")
        if check is not None:
            check(part.absolute(), part.resolve())
    configs = {}
    for name in ("vae", "text_encoder"):
        path = folder / name / "config.json"
        if not path.is_file():
            raise ProjectionError(f"{spec}: no {name}/config.json")
        if check is not None:
            check(path.absolute(), path.resolve())
        configs[name] = read_json(path, f"{name} config")
        if not isinstance(configs[name], dict):
            raise ProjectionError(f"{path}: a config is a JSON object")
    vae, text = configs["vae"], configs["text_encoder"]
    if vae.get("_class_name") != "AutoencoderKLWan":
        raise ProjectionError(f"{spec}: vae/ is {clip(str(vae.get('_class_name')), 40)}, not AutoencoderKLWan (a Wan "
                              "pipeline's VAE)")
    if text.get("model_type") not in ("umt5", "t5"):
        raise ProjectionError(f"{spec}: text_encoder/ is model_type {clip(str(text.get('model_type')), 40)}, not "
                              "umt5 (a Wan pipeline's text encoder)")
    channels = int(vae.get("z_dim", 16))
    for key in ("latents_mean", "latents_std"):
        if len(vae.get(key) or []) != channels:
            raise ProjectionError(f"{spec}: vae/config.json '{key}' has {len(vae.get(key) or [])} values; the VAE "
                                  f"has {channels} latent channels")
    return Pipeline(folder, str(spec) if check is not None else str(folder.resolve()), check, vae, text)


def fingerprint(folder: Path, check: Callable[[Path, Path], None] | None = None) -> str:
    """sha256 over a component folder's files: each one's name and content digest (`io.digest.file_digest`: whole
    up to 64 MiB, a safetensors header and sampled blocks above), so it costs milliseconds even for a 22 GB text
    encoder."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if check is not None:
            check(path.absolute(), path.resolve())
        h.update(f"{path.name}\0{file_digest(path, path.suffix == '.safetensors')}\0".encode())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- the data folder

@dataclass
class Item:
    """One image or video with its caption."""
    path: Path  # resolved, inside the folder
    name: str  # relative to the folder, as shown
    caption: str
    video: bool = False
    cut: bool = False  # the caption was longer than MAX_CAPTION characters, and cut there


@dataclass
class Listing:
    folder: Path
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    notes: list[str] = field(default_factory=list)


def _inside(folder: Path, path: Path) -> tuple[Path | None, str]:
    """The resolved path when it stays inside the folder and is a regular file, else None and why."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        return None, f"cannot be resolved: {exc}"
    if not real.is_relative_to(folder):
        return None, f"resolves to {real}, outside the folder"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return real, ""




def _read_caption(path: Path) -> str:
    """At most MAX_CAPTION_BYTES of a UTF-8 caption file (a file cut there may end inside a character)."""
    with open_regular(path, "caption") as f:
        data = f.read(MAX_CAPTION_BYTES + 1)
    cut = len(data) > MAX_CAPTION_BYTES
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:MAX_CAPTION_BYTES], final=not cut)
    except UnicodeDecodeError as exc:
        raise ProjectionError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.removeprefix("\ufeff")


def _walk(folder: Path, listing: Listing) -> list[Path]:
    """Every file under the folder, in sorted order, links to folders not followed, at most MAX_FILES."""
    found: list[Path] = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        here = Path(top)
        for d in sorted(dirs):
            if (here / d).is_symlink():
                listing.skipped.append(((here / d).relative_to(folder).as_posix(), "a link to a folder (not followed)"))
        dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
        for name in sorted(files):
            found.append(here / name)
            if len(found) >= MAX_FILES:
                listing.notes.append(f"listed only the first {MAX_FILES:,} files of the folder")
                return sorted(found)
    return sorted(found)


def _metadata_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line, file_name, text) rows of metadata.jsonl or metadata.csv (the datasets library's image folders)."""
    with open_regular(path, "metadata") as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise ProjectionError(f"{path}: more than {MAX_METADATA_BYTES >> 20} MiB of metadata")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProjectionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ProjectionError(f"{path}: line {i} is not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ProjectionError(f"{path}: line {i} is not a JSON object")
            rows.append((i, row.get("file_name"), row.get("text")))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
            raise ProjectionError(f"{path}: the header must name the columns file_name and text")
        try:
            rows = [(reader.line_num, r.get("file_name"), r.get("text")) for r in reader]
        except csv.Error as exc:
            raise ProjectionError(f"{path}: line {reader.line_num}: {exc}") from None
    for i, name, caption in rows:
        if not isinstance(name, str) or not name:
            raise ProjectionError(f"{path}: line {i} has no file_name")
        if not isinstance(caption, str):
            raise ProjectionError(f"{path}: line {i} ({clip(printable(name))}) has no text (its caption)")
    return rows


def list_data(data: str | os.PathLike, videos: bool = True) -> Listing:
    """The captioned images and videos of a folder, sorted by path; what cannot be used is listed in `skipped`
    with the reason (never fatal here). Every path resolves inside the folder."""
    given = Path(data).expanduser()
    if not given.is_dir():
        raise ProjectionError(f"{data}: no such folder" if not given.exists() else f"{data}: not a folder")
    folder = given.resolve()
    listing = Listing(folder)
    no_video = video_reader() if videos else "videos not read"
    files = _walk(folder, listing)
    present = set(files)
    media = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGES + VIDEOS}
    meta = [folder / m for m in METADATA if (folder / m) in present]
    if len(meta) > 1:
        raise ProjectionError(f"{data}: both metadata.jsonl and metadata.csv; keep one")
    captions: dict[Path, tuple[str, str]] | None = None  # resolved media path -> (caption, caption's name)
    if meta:
        real, why = _inside(folder, meta[0])
        if real is None:
            raise ProjectionError(f"{meta[0]}: {why}")
        captions = {}
        for i, name, caption in _metadata_rows(real):
            target = folder / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                listing.skipped.append((clip(printable(name)), f"{meta[0].name} line {i}: outside the folder"))
                continue
            key = Path(os.path.normpath(target))
            if key in captions:
                listing.skipped.append((clip(printable(name)), f"{meta[0].name} line {i}: named again (the first "
                                        "caption is kept)"))
                continue
            captions[key] = (caption, f"{meta[0].name} line {i}")
    for path in files:
        name = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if path in meta or (suffix == ".txt" and (captions is not None or path.with_suffix("") in media)):
            continue  # a caption (or the metadata), read with its image
        if suffix not in IMAGES + VIDEOS:
            listing.skipped.append((name, "not an image or video: png, jpg, jpeg, webp, mp4, webm" if suffix != ".txt"
                                    else "a caption without an image"))
            continue
        if suffix in VIDEOS and no_video:
            listing.skipped.append((name, no_video))
            continue
        real, why = _inside(folder, path)
        if real is None:
            listing.skipped.append((name, why))
            continue
        if captions is not None:
            found = captions.pop(Path(os.path.normpath(path)), None)
            if found is None:
                listing.skipped.append((name, f"no caption (not in {meta[0].name})"))
                continue
            caption = found[0]
        else:
            text_path = path.with_suffix(".txt")
            if not os.path.lexists(text_path):
                listing.skipped.append((name, f"no caption ({text_path.name} missing)"))
                continue
            real_text, why = _inside(folder, text_path)
            if real_text is None:
                listing.skipped.append((name, f"caption {text_path.name} {why}"))
                continue
            try:
                caption = _read_caption(real_text)
            except ProjectionError as exc:
                listing.skipped.append((name, f"{text_path.name}: {exc}"))
                continue
        caption = caption.strip()
        listing.items.append(Item(real, name, caption[:MAX_CAPTION], suffix in VIDEOS, len(caption) > MAX_CAPTION))
    for key, (_, where) in (captions or {}).items():
        listing.skipped.append((clip(printable(str(key.relative_to(folder)) if key.is_relative_to(folder) else
                                               str(key))), f"{where}: no such image or video"))
    return listing


def describe_skipped(skipped: list[tuple[str, str]], most: int = 8) -> str:
    shown = ", ".join(f"{printable(name)} ({printable(why)})" for name, why in skipped[:most])
    more = f", and {len(skipped) - most} more" if len(skipped) > most else ""
    return f"{len(skipped)} file(s): {shown}{more}"


# ---------------------------------------------------------------- images and frames

def _image_error(exc: BaseException) -> str:
    return printable(f"{type(exc).__name__}: {exc}")[:200] or type(exc).__name__


def _bomb(exc: Exception) -> str:
    """PIL's own refusal (over twice its MAX_IMAGE_PIXELS), said as MAX_PIXELS's."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(found[1]):,} pixels" if found else "more pixels than PIL allows"
    return f"{count}, more than the limit of {MAX_PIXELS:,} (a decompression bomb is refused)"


def _too_big(width: int, height: int) -> str | None:
    if width * height > MAX_PIXELS:
        return f"{width}x{height} pixels, more than the limit of {MAX_PIXELS:,} (a decompression bomb is refused)"
    return None


def read_image(path: Path):
    """The image as diffusers' load_image gives it (EXIF orientation applied, RGB), refused by its header before
    its pixels are decoded when it has more than MAX_PIXELS; ProjectionError with the reason."""
    from PIL import Image, ImageOps

    with open_regular(path, "image") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the stricter bound
        try:
            img = Image.open(f)
        except Image.DecompressionBombError as exc:
            raise ProjectionError(_bomb(exc)) from None
        except Exception as exc:
            raise ProjectionError(f"not a readable image ({_image_error(exc)})") from None
        big = _too_big(*img.size)
        if big:
            raise ProjectionError(big)
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
        except Exception as exc:
            raise ProjectionError(f"unreadable image ({_image_error(exc)})") from None


def probe(item: Item) -> None:
    """Refuse, from its header alone, a file that is no readable image or video or has more than MAX_PIXELS
    (ProjectionError with the reason); the pixels are decoded later, one batch at a time."""
    if item.video:
        with _video(item.path):
            return
    from PIL import Image

    with open_regular(item.path, "image") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            size = Image.open(f).size
        except Image.DecompressionBombError as exc:
            raise ProjectionError(_bomb(exc)) from None
        except Exception as exc:
            raise ProjectionError(f"not a readable image ({_image_error(exc)})") from None
    big = _too_big(*size)
    if big:
        raise ProjectionError(big)


def select(listing: Listing, limit: int) -> list[Item]:
    """The first `limit` items whose headers pass `probe` (each gives at least one sample); those refused are
    added to the listing's skipped files."""
    chosen = []
    for item in listing.items:
        if len(chosen) == limit:
            break
        try:
            probe(item)
        except ProjectionError as exc:
            listing.skipped.append((item.name, str(exc)))
            continue
        chosen.append(item)
    return chosen


def read_frames(path: Path, every: int | None) -> Iterator[tuple[int, Any]]:
    """(frame index, RGB image) of a video: the first frame, or every `every`-th from the first; ProjectionError
    with the reason when the video cannot be read."""
    with _video(path) as (container, stream):
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= MAX_VIDEO_FRAMES:
                    return
                big = _too_big(frame.width, frame.height)
                if big:
                    raise ProjectionError(big)
                if every is None or i % every == 0:
                    yield i, frame.to_image().convert("RGB")
                    if every is None:
                        return
        except ProjectionError:
            raise
        except Exception as exc:
            raise ProjectionError(f"unreadable video frame ({_image_error(exc)})") from None


@contextmanager
def _video(path: Path) -> Iterator[tuple[Any, Any]]:
    """(container, video stream) of a readable video whose frame size passes MAX_PIXELS, from its header;
    ProjectionError with the reason otherwise."""
    import av

    with open_regular(path, "video") as f:
        try:
            container = av.open(f)
        except Exception as exc:
            raise ProjectionError(f"not a readable video ({_image_error(exc)})") from None
        with container:
            if not container.streams.video:
                raise ProjectionError("no video stream")
            stream = container.streams.video[0]
            big = _too_big(stream.codec_context.width or 0, stream.codec_context.height or 0)
            if big:
                raise ProjectionError(big)
            yield container, stream


def fit(image, height: int, width: int):
    """Resized so that its shorter side (relative to the size) fills it, and center-cropped to height x width
    (PIL's ImageOps.fit: one Lanczos resample of the centered crop box)."""
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


@dataclass
class Sample:
    item: int  # index into the listing's items (its caption)
    label: str  # the file, and the frame of a video
    image: Any  # RGB PIL image of height x width


def samples(items: list[Item], height: int, width: int, every: int | None,
            failed: list[tuple[str, str]]) -> Iterator[Sample]:
    """Each item's images, fitted to the size, in order; what cannot be read is appended to `failed`."""
    for k, item in enumerate(items):
        got = 0
        try:
            if item.video:
                for i, frame in read_frames(item.path, every):
                    got += 1
                    yield Sample(k, f"{item.name} frame {i}", fit(frame, height, width))
                if not got:
                    failed.append((item.name, "no frame decoded"))
            else:
                yield Sample(k, item.name, fit(read_image(item.path), height, width))
        except ProjectionError as exc:
            failed.append((item.name, f"after {got} frame(s): {exc}" if got else str(exc)))


# ---------------------------------------------------------------- encoding

def bound(height: int, width: int, scale: int, text_dim: int) -> int:
    """The most samples a calibration set of this size may hold (projection.calibration's bounds)."""
    pixels = (height // scale) * (width // scale)
    return max(0, min(MAX_SAMPLES, MAX_TOKENS // pixels, MAX_CONTEXT // (MAX_SEQUENCE_LENGTH * text_dim)))


def _load(pipe: Pipeline, part: str, load: Callable[[Path], Any]) -> Any:
    """A component loaded from its folder; what the library raises becomes one line naming the folder."""
    try:
        return load(pipe.folder / part)
    except Exception as exc:
        raise ProjectionError(f"{pipe.folder / part}: cannot load the {part.replace('_', ' ')}: "
                              f"{type(exc).__name__}: {printable(str(exc))[:300]}") from exc


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def encode_captions(pipe: Pipeline, captions: list[str], device: torch.device, dtype: torch.dtype, batch: int,
                    progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [n, 512, d] in `dtype` on the CPU, token counts [n] int64) as the Wan pipeline's encode_prompt
    gives them; the text encoder is loaded here and freed before returning."""
    from diffusers import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = _load(pipe, "tokenizer", lambda path: AutoTokenizer.from_pretrained(path))
    encoder = _load(pipe, "text_encoder", lambda path: UMT5EncoderModel.from_pretrained(path, dtype=dtype))
    wan = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)  # only encode_prompt
    contexts, lengths = [], []
    try:
        encoder.to(device).eval()
        for start in range(0, len(captions), batch):
            chunk = captions[start:start + batch]
            ctx, _ = wan.encode_prompt(chunk, do_classifier_free_guidance=False,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH, device=device, dtype=dtype)
            tokens = tokenizer([prompt_clean(c) for c in chunk], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
            contexts.append(ctx.to("cpu", dtype))
            lengths.append(tokens.attention_mask.gt(0).sum(1).to(torch.int64))
            if progress:
                progress(min(start + batch, len(captions)), len(captions), "captions (text encoder)")
    finally:
        del wan, encoder, tokenizer
        _free(device)
    return torch.cat(contexts), torch.cat(lengths)


@torch.inference_mode()
def encode_images(pipe: Pipeline, stream: Iterator[Sample], limit: int, device: torch.device, batch: int,
                  progress: Progress | None = None, expected: int | None = None) -> tuple[torch.Tensor, list[Sample]]:
    """(latents [n, C, h, w] float32 on the CPU, the samples encoded) for at most `limit` samples of the stream,
    `batch` images at a time, as the Wan pipeline encodes a one-frame video; the VAE is freed before returning."""
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = _load(pipe, "vae", lambda path: AutoencoderKLWan.from_pretrained(path, torch_dtype=torch.float32))
    processor = VideoProcessor(vae_scale_factor=pipe.scale)  # as WanPipeline makes it
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
    out, done, pending = [], [], []

    def flush() -> None:
        h, w = pending[0].image.height, pending[0].image.width
        video = torch.cat([processor.preprocess_video([s.image], h, w) for s in pending])  # [B, 3, 1, H, W]
        z = vae.encode(video.to(device, torch.float32)).latent_dist.mode()
        out.append(((z - mean) / std)[:, :, 0].float().cpu())
        done.extend(pending)
        pending.clear()
        if progress:
            progress(len(done), max(len(done), expected or limit), f"images (VAE): {printable(done[-1].label)}")

    try:
        vae.to(device).eval()
        for sample in stream:
            pending.append(sample)
            if len(pending) == batch or len(done) + len(pending) == limit:
                flush()
            if len(done) == limit:
                break
        if pending:
            flush()
        if progress and done and len(done) < (expected or limit):  # fewer than expected: end the progress line
            progress(len(done), len(done), f"images (VAE): {printable(done[-1].label)}")
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # a video left open at the limit
        del vae
        _free(device)
    if not out:
        return torch.empty(0), done
    return torch.cat(out), done


# ---------------------------------------------------------------- writing

def check_out(out: str | os.PathLike, force: bool) -> Path:
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise ProjectionError(f"{out}: a calibration set is one .safetensors file; name --out FILE.safetensors")
    if os.path.lexists(path):
        if path.is_dir():
            raise ProjectionError(f"{out}: is a folder; --out names the .safetensors file to write")
        if not force:
            raise ProjectionError(f"{out}: already exists; --force replaces it")
    if not path.parent.is_dir():
        raise ProjectionError(f"{path.parent}: no such folder (for --out)")
    return path


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     check: Callable[[Path], None]) -> None:
    """Into a temporary file of the destination folder (created exclusively), checked by `check`, then moved to
    `path` with os.replace; nothing is left behind on failure."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("projection-inspector")
    except metadata.PackageNotFoundError:
        return "unknown"


def _source_line(n: int, images: int, frames: int, videos: int, folder: Path, pipeline: str, size: str) -> str:
    parts = []
    if images:
        parts.append(f"{images} captioned image{'s' * (images != 1)}")
    if frames:
        parts.append(f"{frames} frame{'s' * (frames != 1)} of {videos} captioned video{'s' * (videos != 1)}")
    what = " and ".join(parts) or f"{n} samples"
    line = f"{what} from {folder}, encoded by {pipeline} at {size}"
    if len(line) > 200:  # calibration.MAX_SHOWN: keep the end of the folder's path
        line = f"{what} from .../{folder.name}, encoded by {clip(pipeline, 80)} at {size}"
    return printable(line)


# ---------------------------------------------------------------- the command

@dataclass
class Result:
    out: Path
    samples: int
    source: str
    skipped: list[tuple[str, str]]
    metadata: dict[str, str]


def calibrate(pipeline: str, data: str | os.PathLike, size: str, out: str | os.PathLike, *,
              max_samples: int | None = None, frames: str = "first", device: str = "auto", dtype: str = "float32",
              batch: int = 8, teacher: str | None = None, force: bool = False, progress: Progress | None = None,
              log: Log = _stderr) -> Result:
    """Encode a folder of captioned images (and videos) with a Wan pipeline's VAE and text encoder into a
    calibration set at `out`; see the module's documentation. Errors are ProjectionError, one line."""
    require_extra()
    height, width = parse_size(size)
    every = parse_frames(frames)
    if dtype not in ("float32", "bfloat16"):
        raise ProjectionError(f"--dtype {clip(str(dtype), 20)!r}: float32 or bfloat16")
    if not 1 <= int(batch) <= MAX_BATCH:
        raise ProjectionError(f"--batch {batch}: a whole number from 1 to {MAX_BATCH}")
    if max_samples is not None and not 1 <= int(max_samples) <= MAX_SAMPLES:
        raise ProjectionError(f"--max {max_samples}: a whole number from 1 to {MAX_SAMPLES}")
    path = check_out(out, force)
    torch_device = pick_device(device)
    pipe = open_pipeline(pipeline)
    prints = {f"{name}_fingerprint": fingerprint(pipe.folder / name, pipe.check) for name in COMPONENTS}
    if height % (2 * pipe.scale) or width % (2 * pipe.scale):
        raise ProjectionError(f"--size {height}x{width}: this VAE downsamples {pipe.scale}x, so height and width must "
                              f"be multiples of {2 * pipe.scale} (2x2 patches of latents)")
    fits = bound(height, width, pipe.scale, pipe.text_dim)
    if fits < 1:
        raise ProjectionError(f"--size {height}x{width}: one latent of {height // pipe.scale}x{width // pipe.scale} "
                              "is more than a calibration set may hold")
    if max_samples is not None and max_samples > fits:
        raise ProjectionError(f"--max {max_samples}: at most {fits} samples fit a calibration set of "
                              f"{height // pipe.scale}x{width // pipe.scale} latents with a {MAX_SEQUENCE_LENGTH}x"
                              f"{pipe.text_dim} context (at most {MAX_SAMPLES:,} latents, {MAX_TOKENS:,} latent "
                              f"pixels, {MAX_CONTEXT:,} context values)")
    limit = max_samples if max_samples is not None else min(DEFAULT_MAX, fits)
    if max_samples is None and fits < DEFAULT_MAX:
        log(f"note: at most {fits} samples fit a calibration set of {height // pipe.scale}x{width // pipe.scale} "
            f"latents with a {MAX_SEQUENCE_LENGTH}x{pipe.text_dim} context (the format's bounds); taking at most "
            f"{fits}")
    config = None
    if teacher is not None:
        from ..core.models import open_teacher

        config = open_teacher(teacher).config
    dt = torch.float32 if dtype == "float32" else torch.bfloat16
    shapes = {"latents": (limit, pipe.channels, height // pipe.scale, width // pipe.scale),
              "context": (limit, MAX_SEQUENCE_LENGTH, pipe.text_dim), "context_lengths": (limit,)}
    check_shapes(f"{teacher} and {pipeline}" if teacher else str(pipeline), shapes,
                 {"latents": torch.float32, "context": dt, "context_lengths": torch.int64}, config)

    listing = list_data(data)
    items = select(listing, limit)
    if not items:
        raise ProjectionError(f"{data}: no usable sample: no readable captioned image or video"
                              + (f"; skipped {describe_skipped(listing.skipped)}" if listing.skipped else
                                 " (png, jpg, jpeg, webp, mp4, webm with a same-name .txt caption, or "
                                 "metadata.jsonl / metadata.csv with file_name and text)"))
    if listing.skipped:
        log(f"skipped {describe_skipped(listing.skipped)}")
    for note in listing.notes:
        log(f"note: {note}")
    cut = [it.name for it in items if it.cut]
    if cut:
        log(f"note: the caption(s) of {len(cut)} file(s) longer than {MAX_CAPTION:,} characters were cut there "
            f"(first: {printable(cut[0])})")
    log(f"encoding {len(items)} caption(s) with {pipe.name}/text_encoder on {torch_device} ({dtype})")
    context, lengths = encode_captions(pipe, [it.caption for it in items], torch_device, dt, batch, progress)
    expected = len(items) if every is None else limit
    log(f"encoding {'up to ' * (every is not None)}{expected} image(s) with {pipe.name}/vae on {torch_device} "
        f"(float32), {batch} at a time")
    failed: list[tuple[str, str]] = []
    latents, done = encode_images(pipe, samples(items, height, width, every, failed), limit, torch_device, batch,
                                  progress, expected)
    if failed:
        log(f"unreadable, skipped: {describe_skipped(failed)}")
    if not done:
        raise ProjectionError(f"{data}: no usable sample: every image or video failed to read "
                              f"({describe_skipped(failed)})")
    which = torch.tensor([s.item for s in done])
    tensors = {"latents": latents, "context": context[which].contiguous(), "context_lengths": lengths[which].clone()}
    used = {s.item for s in done}
    videos = sorted({s.item for s in done if items[s.item].video})
    frames_n = sum(1 for s in done if items[s.item].video)
    folder = listing.folder
    source = _source_line(len(done), len(done) - frames_n, frames_n, len(videos), folder, pipe.name,
                          f"{height}x{width}")
    metadata = {
        "format": FORMAT, "source": source, "data": str(folder), "samples": str(len(done)),
        "captions": str(len(used)), "pipeline": pipe.name, "pipeline_folder": str(pipe.folder.resolve()),
        **prints,
        "latent_channels": str(pipe.channels), "vae_scale_factor": str(pipe.scale),
        "size": f"{height}x{width}", "frames": frames_rule(every), "dtype": dtype,
        "latents_dtype": "float32", "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        "skipped": str(len(listing.skipped) + len(failed)), "captions_cut": str(len(cut)),
        "tool": f"projection-inspector {_version()} (projection calibrate)",
    }
    write_atomically(path, tensors, metadata, lambda tmp: load_calibration(tmp, config))
    return Result(path, len(done), source, listing.skipped + failed, metadata)
