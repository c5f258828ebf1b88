"""Checkpoint sources: every supported format built for real in tmp_path, read lazily and bit-identically,
and every kind of broken input refused with a ProjectionError that names the file and the problem."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shlex
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from projection import ProjectionError, open_checkpoint
from projection.arch.anatomy import wan_tensors
from projection.core.models import view_checkpoint
from projection.demo.folder import demo_state_dict
import projection.io.checkpoint as checkpoint_module

# ---------------------------------------------------------------- helpers


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every dtype family, special float values, a scalar, an empty tensor and a non-matrix shape."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.5])
    return {
        "a.f32": torch.cat([special, torch.randn(10, generator=g)]).reshape(4, 4),
        "b.f16": torch.randn(3, 5, generator=g).half(),
        "c.bf16": torch.randn(7, generator=g).bfloat16(),
        "d.f64": torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        "e.i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "f.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "g.u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "h.bool": torch.tensor([True, False, True]),
        "i.f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "j.scalar": torch.tensor(2.5),
        "k.empty": torch.empty(0, 3),
        "l.conv": torch.randn(8, 4, 1, 2, 2, generator=g),
    }


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor: equality of these is bit-identity (NaN and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(ckpt, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.keys()) == sorted(expected)
    for key, want in expected.items():
        got = ckpt.get(key)
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), key
        assert bits(got) == bits(want), key


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def write_raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3,
                  stem: str = "diffusion_pytorch_model") -> Path:
    """A Hugging Face sharded set: stem-0000N-of-0000M.safetensors + stem.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


TINY = {"dim": 64, "num_heads": 2, "ffn_dim": 48, "num_layers": 2, "in_dim": 4, "out_dim": 4, "text_dim": 24,
        "freq_dim": 16}


def write_wan_original(folder: Path, seed: int = 0, config: dict = TINY) -> dict[str, torch.Tensor]:
    """An original Wan folder: config.json (_class_name WanModel) + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    state = demo_state_dict(config, seed=seed)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", **config}))
    return state


def raises(source, match_all: list[str], expert: str | None = None) -> str:
    with pytest.raises(ProjectionError) as info:
        open_checkpoint(source, expert)
    message = str(info.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- single safetensors files


def test_safetensors_file_metadata_counts_and_bit_identical_tensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.files == [path] and ckpt.source == str(path)
    assert len(ckpt) == len(tensors) and "a.f32" in ckpt and "nope" not in ckpt
    for key, t in tensors.items():
        info = ckpt.tensors[key]
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype and info.file == path
        assert info.nbytes == t.numel() * t.element_size()
    assert ckpt.num_params == sum(t.numel() for t in tensors.values())
    assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert ckpt.file_bytes == path.stat().st_size
    assert ckpt.dtypes() == {"float32": 4, "float16": 1, "bfloat16": 1, "float64": 1, "int64": 1, "int8": 1,
                             "uint8": 1, "bool": 1, "float8_e4m3fn": 1}
    assert ckpt.bytes_read == 0
    assert_bit_identical(ckpt, tensors)
    assert ckpt.bytes_read == ckpt.nbytes  # every tensor once
    ckpt.get("b.f16")
    assert ckpt.bytes_read == ckpt.nbytes + tensors["b.f16"].numel() * 2
    assert [k for k, _ in ckpt.iter_tensors(["g.u8", "h.bool"])] == ["g.u8", "h.bool"]
    ckpt.close()
    assert torch.equal(ckpt.get("e.i64"), tensors["e.i64"])  # reopens after close


class CountingFile:
    """Wraps a file object and counts every byte read through it."""

    def __init__(self, f, counter: list[int]):
        self._f, self._counter = f, counter

    def read(self, n=-1):
        data = self._f.read(n)
        self._counter[0] += len(data)
        return data

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._counter[0] += n
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_opening_reads_only_the_header_and_get_reads_only_that_tensor(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.full((64, 64), float(i)) for i in range(16)}  # 256 KiB of data
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    counter = [0]
    real_open = checkpoint_module.open_regular
    counting_open = lambda *a, **k: CountingFile(real_open(*a, **k), counter)  # noqa: E731
    monkeypatch.setattr(checkpoint_module, "open_regular", counting_open)
    ckpt = open_checkpoint(path)
    assert counter[0] == 8 + header_length(path) < path.stat().st_size // 100
    assert ckpt.bytes_read == 0
    mapped: list[tuple[int, int]] = []  # (offset, length) of every mapping get() makes
    real_mmap = checkpoint_module.mmap.mmap

    def recording_mmap(fd, length, **kw):
        mapped.append((kw.get("offset", 0), length))
        return real_mmap(fd, length, **kw)

    monkeypatch.setattr(checkpoint_module.mmap, "mmap", recording_mmap)
    counter[0] = 0
    assert torch.equal(ckpt.get("t7"), tensors["t7"])
    info = ckpt.tensors["t7"]
    ((offset, length),) = mapped  # one mapping: the tensor's own bytes, from the page holding its start
    assert offset <= info.offset and offset + length == info.offset + info.nbytes
    assert info.offset - offset < mmap.ALLOCATIONGRANULARITY
    assert counter[0] == 0 and ckpt.bytes_read == 64 * 64 * 4  # no read() of data


def test_data_is_read_at_get_time_not_at_open_time(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as f:  # same bytes count, new values: only a lazy reader sees them
        f.seek(-64, os.SEEK_END)
        f.write(torch.ones(4, 4).numpy().tobytes())
    assert torch.equal(ckpt.get("w"), torch.ones(4, 4))


def test_get_returns_memory_the_caller_owns(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    torch.save({"w": torch.zeros(3)}, tmp_path / "w.pt")
    for source in (path, tmp_path / "w.pt"):
        ckpt = open_checkpoint(source)
        ckpt.get("w").add_(5)
        assert torch.equal(ckpt.get("w"), torch.zeros(3)), source  # an in-place edit does not leak back
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.zeros(3))


def test_concurrent_gets_return_the_right_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((64, 64), float(i)) for i in range(32)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    ckpt = open_checkpoint(path)
    wrong: list[str] = []
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for r in range(150):
                key = f"t{(seed * 7 + r) % 32}"
                if not torch.equal(ckpt.get(key), tensors[key]):
                    wrong.append(key)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert ckpt.bytes_read == 8 * 150 * 64 * 64 * 4


def test_unknown_key_names_the_key_and_source(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ProjectionError, match=r"w\.safetensors: no tensor named 'missing\.weight'"):
        open_checkpoint(str(path)).get("missing.weight")


def test_metadata_block_is_not_a_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt", "note": "x"})
    assert open_checkpoint(path).keys() == ["w"]


# ---------------------------------------------------------------- sharded sets and folders


def test_sharded_set_through_its_index_and_through_its_folder(tmp_path):
    tensors = sample_tensors()
    index = write_sharded(tmp_path / "sharded", tensors, shards=3)
    for source in (index, index.parent, str(index.parent)):
        ckpt = open_checkpoint(source)
        assert ckpt.format == "sharded-safetensors"
        assert [f.name for f in ckpt.files] == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors"
                                                for i in (1, 2, 3)]
        assert {info.file.name for info in ckpt.tensors.values()} == {f.name for f in ckpt.files}
        assert_bit_identical(ckpt, tensors)
        assert ckpt.bytes_read == ckpt.nbytes


def test_folder_holding_a_single_safetensors_file(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "README.md").write_text("a model")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "safetensors" and [f.name for f in ckpt.files] == ["model.safetensors"]
    assert ckpt.config == {}
    assert_bit_identical(ckpt, tensors)


def test_original_wan_folder(tmp_path):
    state = write_wan_original(tmp_path / "Wan2.1-T2V-tiny")
    ckpt = open_checkpoint(tmp_path / "Wan2.1-T2V-tiny")
    assert ckpt.format == "safetensors" and ckpt.config["_class_name"] == "WanModel"
    assert len(ckpt) == 15 + 27 * TINY["num_layers"]
    assert_bit_identical(ckpt, state)
    view = view_checkpoint(ckpt)
    assert view.family == "wan" and view.layout == "wan"
    assert view.native == {k: k for k in state}
    assert {k: getattr(view.config, k) for k in TINY} == TINY and view.config.head_dim == 32
    # a file opened directly still finds the config.json beside it
    assert open_checkpoint(tmp_path / "Wan2.1-T2V-tiny" / "diffusion_pytorch_model.safetensors").config["dim"] == 64


# ---------------------------------------------------------------- diffusers (real WanTransformer3DModel)

DIFFUSERS_KWARGS = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4,
                    "out_channels": 4, "text_dim": 24, "freq_dim": 16, "ffn_dim": 48, "num_layers": 2,
                    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64}


@pytest.fixture(scope="module")
def diffusers_wan(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**DIFFUSERS_KWARGS).eval()
    with torch.no_grad():  # diffusers zero-inits some tensors: make every one distinct
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("diffusers") / "transformer"
    model.save_pretrained(folder, max_shard_size="50KB")
    return model, folder


def test_diffusers_folder_is_sharded_and_bit_identical(diffusers_wan):
    model, folder = diffusers_wan
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "sharded-safetensors" and len(ckpt.files) > 2
    assert all(f.name.startswith("diffusion_pytorch_model-0") for f in ckpt.files)
    assert ckpt.config["_class_name"] == "WanTransformer3DModel"
    assert_bit_identical(ckpt, model.state_dict())


def test_view_checkpoint_normalizes_diffusers_names_and_infers_config(diffusers_wan):
    model, folder = diffusers_wan
    view = view_checkpoint(open_checkpoint(folder))
    assert view.family == "wan-diffusers" and view.layout == "diffusers"
    config = {"dim": 64, "num_heads": 2, "ffn_dim": 48, "num_layers": 2, "in_dim": 4, "out_dim": 4, "text_dim": 24,
              "freq_dim": 16}
    assert {k: getattr(view.config, k) for k in config} == config and view.config.head_dim == 32
    # exactly the original Wan key set, with the original shapes
    expected = {k: shape for k, (shape, _) in wan_tensors(config).items()}
    assert view.shapes == expected
    native = view.native
    assert native["blocks.0.self_attn.q.weight"] == "blocks.0.attn1.to_q.weight"
    assert native["blocks.1.cross_attn.o.bias"] == "blocks.1.attn2.to_out.0.bias"
    assert native["blocks.0.norm3.weight"] == "blocks.0.norm2.weight"  # the norm2/norm3 swap
    assert native["blocks.1.ffn.0.weight"] == "blocks.1.ffn.net.0.proj.weight"
    assert native["head.modulation"] == "scale_shift_table"
    assert native["blocks.0.modulation"] == "blocks.0.scale_shift_table"
    assert native["blocks.1.modulation"] == "blocks.1.scale_shift_table"
    assert native["head.head.weight"] == "proj_out.weight"
    assert native["time_projection.1.weight"] == "condition_embedder.time_proj.weight"
    assert sorted(native.values()) == sorted(model.state_dict())
    assert torch.equal(view.read("head.modulation"), model.scale_shift_table)
    assert view.shapes["head.modulation"] == (1, 2, 64)
    assert torch.equal(view.read("blocks.1.modulation"), model.blocks[1].scale_shift_table)
    assert view.shapes["blocks.1.modulation"] == (1, 6, 64)
    assert torch.equal(view.read("blocks.0.norm3.weight"), model.blocks[0].norm2.weight)
    assert torch.equal(view.read("blocks.1.self_attn.q.weight"), model.blocks[1].attn1.to_q.weight)


# ---------------------------------------------------------------- two-expert roots and pipeline roots


def test_wan22_two_expert_root(tmp_path):
    root = tmp_path / "Wan2.2-T2V-A14B"
    high = write_wan_original(root / "high_noise_model", seed=1)
    low_tensors = demo_state_dict(TINY, seed=2)
    write_sharded(root / "low_noise_model", low_tensors, shards=2)
    (root / "low_noise_model" / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY}))
    (root / "Wan2.1_VAE.pth").write_bytes(b"not loaded")
    for source in (root, str(root)):
        h = open_checkpoint(source, "high")
        assert h.expert == "high" and h.files[0].parent.name == "high_noise_model" and h.format == "safetensors"
        assert_bit_identical(h, high)
        low = open_checkpoint(source, expert="low")
        assert low.expert == "low" and low.format == "sharded-safetensors"
        assert {f.parent.name for f in low.files} == {"low_noise_model"}
        assert_bit_identical(low, low_tensors)
    message = raises(root, [str(root), "two-expert", "choose an expert", "'high' (high_noise_model/)",
                            "'low' (low_noise_model/)"])
    assert "wan2.2" in message
    raises(root, [str(root), "no expert 'medium'", "'high' (high_noise_model/)", "'low' (low_noise_model/)"],
           expert="medium")


def test_diffusers_pipeline_root_two_transformers(tmp_path):
    root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    t1 = {"blocks.0.attn1.to_q.weight": torch.randn(4, 4)}
    t2 = {"blocks.0.attn1.to_q.weight": torch.randn(4, 4)}
    write_sharded(root / "transformer", t1, shards=1)
    write_sharded(root / "transformer_2", t2, shards=1)
    (root / "model_index.json").write_text("{}")
    (root / "vae").mkdir()
    save_file({"decoder.w": torch.ones(1)}, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    high, low = open_checkpoint(root, "high"), open_checkpoint(root, "low")
    assert (high.expert, low.expert) == ("high", "low")
    assert high.files[0].parent.name == "transformer" and low.files[0].parent.name == "transformer_2"
    assert_bit_identical(high, t1)
    assert_bit_identical(low, t2)
    raises(root, [str(root), "diffusers-pipeline", "'high' (transformer/)", "'low' (transformer_2/)"])
    raises(root, ["no expert 'mid'", "'high' (transformer/)", "'low' (transformer_2/)"], expert="mid")


def test_pipeline_root_with_one_transformer_needs_no_expert(tmp_path):
    root = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    tensors = {"blocks.0.attn1.to_q.weight": torch.randn(4, 4)}
    (root / "transformer").mkdir(parents=True)
    save_file(tensors, str(root / "transformer" / "m.safetensors"))
    ckpt = open_checkpoint(root)
    assert ckpt.expert is None and ckpt.files == [root / "transformer" / "m.safetensors"]
    assert_bit_identical(ckpt, tensors)
    raises(root, [str(root), "no expert 'low'", "'high' (transformer/)"], expert="low")


def test_expert_asked_of_a_folder_without_experts_or_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    raises(tmp_path, [str(tmp_path), "no expert sub-folders", "expert 'high'"], expert="high")


# ---------------------------------------------------------------- torch pickles


class CustomModule:
    """Any class instance in a pickle needs code to rebuild: weights_only refuses it."""

    def __init__(self):
        self.weight = torch.ones(2)


class ShellPayload:
    """Unpickling this runs a shell command (it writes a marker file) unless the loader refuses it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_pickle_every_suffix(tmp_path, suffix):
    tensors = sample_tensors()
    path = tmp_path / f"model{suffix}"
    torch.save(tensors, path)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-pickle" and ckpt.files == [path]
    assert {k: (i.shape, i.dtype) for k, i in ckpt.tensors.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    assert ckpt.bytes_read == 0
    assert_bit_identical(ckpt, tensors)
    assert ckpt.bytes_read == ckpt.nbytes
    assert open_checkpoint(tmp_path).format == "torch-pickle"  # the folder holding one torch file


def test_torch_pickle_legacy_format(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if k != "i.f8"}  # torch cannot reload fp8 in this format
    path = tmp_path / "old.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert_bit_identical(open_checkpoint(path), tensors)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"module": sd},
    lambda sd: {"module": {"state_dict": sd}},
    lambda sd: {"model": {"model": sd}, "config": {"dim": 2}},
], ids=["state_dict", "model", "module", "module.state_dict", "model.model"])
def test_torch_pickle_wrappers_are_unwrapped(tmp_path, wrap):
    tensors = {"blocks.0.ffn.0.weight": torch.randn(3, 2), "head.head.bias": torch.randn(3)}
    path = tmp_path / "wrapped.ckpt"
    torch.save(wrap(tensors), path)
    assert_bit_identical(open_checkpoint(path), tensors)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": ShellPayload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    # the payload is real: an unsafe load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    message = raises(path, [str(path), "refused", "needs code", "weights_only=True", "nothing in it was executed"])
    assert "system" in message  # names what it needed
    assert not marker.exists()
    raises(tmp_path, [str(path), "refused"])  # through its folder too
    assert not marker.exists()


def test_pickle_with_a_custom_class_instance_is_refused(tmp_path):
    path = tmp_path / "custom.bin"
    torch.save({"w": torch.ones(2), "m": CustomModule()}, path)
    message = raises(path, [str(path), "refused", "needs code", "CustomModule"])
    assert "\x1b" not in message and "\n" not in message  # one clean line


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_python_pickle_is_refused(tmp_path):
    import pickle

    path = tmp_path / "plain.bin"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    raises(path, [str(path), "cannot load torch file", "not a plain torch.save", "nothing in it was executed"])


@pytest.mark.parametrize("content,problem", [
    (b"", "cannot load torch file"),
    (b"definitely not a torch file", "cannot load torch file"),
    ("truncated", "cannot load torch file"),
    ("tensor", "holds no state dict (found Tensor)"),
    ("no-tensors", "holds no tensors"),
    ("empty-dict", "holds no state dict"),
], ids=["empty-file", "garbage", "truncated-zip", "bare-tensor", "no-tensors", "empty-dict"])
def test_broken_torch_files(tmp_path, content, problem):
    path = tmp_path / "broken.pt"
    if content == "truncated":
        torch.save({"w": torch.randn(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "tensor":
        torch.save(torch.ones(3), path)
    elif content == "no-tensors":
        torch.save({"epoch": 3, "name": "x"}, path)
    elif content == "empty-dict":
        torch.save({}, path)
    else:
        path.write_bytes(content)
    raises(path, [str(path), problem])


def test_folder_with_several_torch_files_asks_for_one(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "a.pt")
    torch.save({"b": torch.ones(1)}, tmp_path / "b.bin")
    raises(tmp_path, [str(tmp_path), "2 torch files", "a.pt", "b.bin", "pass one"])


# ---------------------------------------------------------------- prefixes


def test_known_prefixes_are_stripped(tmp_path):
    tensors = {"blocks.0.self_attn.q.weight": torch.randn(4, 4), "head.modulation": torch.randn(1, 2, 4)}
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "comfy.safetensors"))
    ckpt = open_checkpoint(tmp_path / "comfy.safetensors")
    assert sorted(ckpt.keys()) == sorted(tensors)
    assert ckpt.tensors["head.modulation"].raw_key == "model.diffusion_model.head.modulation"
    assert_bit_identical(ckpt, tensors)
    assert view_checkpoint(ckpt).family == "wan"

    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "ddp.pt")
    ckpt = open_checkpoint(tmp_path / "ddp.pt")
    assert sorted(ckpt.keys()) == sorted(tensors)
    assert_bit_identical(ckpt, tensors)


def test_a_prefix_only_some_keys_share_is_kept(tmp_path):
    tensors = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert sorted(open_checkpoint(tmp_path / "w.safetensors").keys()) == ["b", "module.a"]


# ---------------------------------------------------------------- Hugging Face hub ids (offline cache)

COMMIT_MAIN = "1" * 40
COMMIT_DEV = "2" * 40


def cache_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """A genuine huggingface_hub cache entry: blobs by hash, snapshot symlinks, refs holding commit hashes."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = base / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return base / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    single = {"w": torch.arange(6.0).reshape(2, 3)}
    cache_repo(cache, "org/name", COMMIT_MAIN, {
        "config.json": json.dumps({"_class_name": "WanModel", "dim": 2}).encode(),
        "diffusion_pytorch_model.safetensors": save(single), "README.md": b"# model"}, refs=("main",))
    dev = {"w": torch.full((2, 3), 7.0)}
    cache_repo(cache, "org/name", COMMIT_DEV, {"diffusion_pytorch_model.safetensors": save(dev)}, refs=("dev",))
    high, low = {"q": torch.ones(2, 2)}, {"q": torch.zeros(2, 2)}
    cache_repo(cache, "org/experts", COMMIT_MAIN, {
        "configuration.json": b"{}",
        "high_noise_model/config.json": b"{}",
        "high_noise_model/diffusion_pytorch_model.safetensors": save(high),
        "low_noise_model/config.json": b"{}",
        "low_noise_model/diffusion_pytorch_model.safetensors.index.json": json.dumps(
            {"metadata": {}, "weight_map": {"q": "diffusion_pytorch_model-00001-of-00001.safetensors"}}).encode(),
        "low_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors": save(low)}, refs=("main",))
    return {"cache": cache, "single": single, "dev": dev, "high": high, "low": low}


def test_hub_id_resolves_from_the_offline_cache(hub_cache):
    cache = hub_cache["cache"]
    for source in ("org/name", "hf://org/name", f"org/name@{COMMIT_MAIN}", "org/name@main"):
        ckpt = open_checkpoint(source)
        assert ckpt.source == source and ckpt.format == "safetensors"
        assert ckpt.files[0].is_relative_to(cache) and COMMIT_MAIN in str(ckpt.files[0])
        assert ckpt.config == {"_class_name": "WanModel", "dim": 2}
        assert_bit_identical(ckpt, hub_cache["single"])
    for source in ("org/name@dev", f"org/name@{COMMIT_DEV}"):
        assert_bit_identical(open_checkpoint(source), hub_cache["dev"])


def test_hub_id_with_experts_and_subfolders(hub_cache):
    high = open_checkpoint("org/experts", "high")
    assert high.expert == "high" and high.files[0].parent.name == "high_noise_model"
    assert_bit_identical(high, hub_cache["high"])
    low = open_checkpoint(f"org/experts@{COMMIT_MAIN}", "low")
    assert low.expert == "low" and low.format == "sharded-safetensors"
    assert_bit_identical(low, hub_cache["low"])
    assert_bit_identical(open_checkpoint("org/experts:low_noise_model"), hub_cache["low"])
    assert_bit_identical(open_checkpoint("org/experts@main:high_noise_model"), hub_cache["high"])
    with pytest.raises(ProjectionError, match=r"choose an expert: 'high' \(high_noise_model/\), 'low'"):
        open_checkpoint("org/experts")
    with pytest.raises(ProjectionError, match=r"no expert 'medium'; choices: 'high'"):
        open_checkpoint("org/experts", "medium")


def test_hub_id_missing_offline_is_a_clear_error(hub_cache):
    message = raises("org/missing", ["org/missing", "no such local file or folder", "hub id", "offline"])
    assert "\n" not in message
    raises("org/name@nope", ["org/name@nope", "offline"])
    # a relative path that does not exist reads as a hub id: the message still says it is not a local path
    raises("no_such_dir/model.safetensors", ["no_such_dir/model.safetensors", "no such local file or folder"])


def test_hub_id_with_a_subfolder_the_repository_lacks(hub_cache):
    for expert in (None, "high"):
        raises("org/name:nowhere", ["org/name:nowhere", "no folder 'nowhere' in the repository", COMMIT_MAIN],
               expert=expert)


# ---------------------------------------------------------------- broken input


def test_missing_shard(tmp_path):
    index = write_sharded(tmp_path / "m", sample_tensors(), shards=3)
    (index.parent / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    for source in (index, index.parent):
        raises(source, [str(index), "missing shard", "diffusion_pytorch_model-00002-of-00003.safetensors"])


def test_index_lists_a_key_its_shard_lacks(tmp_path):
    index = write_sharded(tmp_path / "m", {"a": torch.ones(1), "b": torch.ones(1)}, shards=1)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "diffusion_pytorch_model-00001-of-00001.safetensors"
    index.write_text(json.dumps(data))
    raises(index, [str(index), "1 key(s) listed but not in their shard", "ghost.weight"])


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not a valid safetensors index"),
    ('{"metadata": {}}', "needs a 'weight_map'"),
    ('{"weight_map": ["a.safetensors"]}', "'weight_map' must map each tensor name to its shard file"),
    ('{"weight_map": {"a": 3}}', "'weight_map' must map each tensor name to its shard file"),
    ('{"weight_map": {}}', "'weight_map' must map each tensor name to its shard file"),
    ("[1, 2]", "not a valid safetensors index"),
], ids=["invalid-json", "no-weight-map", "list", "non-string-file", "empty", "not-object"])
def test_corrupt_index(tmp_path, text, problem):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    raises(index, [str(index), problem])


def test_truncated_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10), "big": torch.randn(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-7])
    raises(path, [str(path), "truncated", "'big'", "ends at byte 440", "data section has 433"])
    path.write_bytes(b"abc")
    raises(path, [str(path), "truncated safetensors file", "3 bytes"])
    path.write_bytes(b"")
    raises(path, [str(path), "truncated safetensors file", "0 bytes"])


def test_file_truncated_after_opening(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10), "z": torch.randn(100)}, str(path))
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    key = max(ckpt.keys(), key=lambda k: ckpt.tensors[k].offset)
    with pytest.raises(ProjectionError, match=rf"w\.safetensors: truncated while reading tensor '{key}'"):
        ckpt.get(key)


def test_file_removed_after_opening(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10)}, str(path))
    ckpt = open_checkpoint(path)
    path.unlink()
    with pytest.raises(ProjectionError, match=r"w\.safetensors: cannot open"):
        ckpt.get("a")


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,length,data,problem", [
    (b"{}", 2**60, b"", "corrupt safetensors header (header length over the 100 MiB limit"),
    (b"{}", 50, b"", "corrupt safetensors header (header length past the end of the file, file size 10)"),
    (b"{}", 0, b"", "corrupt safetensors header (header length 0"),
    (b'{"a": {"dtype": "F32",', None, b"", "corrupt safetensors header: "),
    (b"\xff\xfe\xfd\xfc", None, b"", "corrupt safetensors header"),
    (b"[1, 2]", None, b"", "corrupt safetensors header: not a JSON object"),
    ({"a": {**GOOD, "data_offsets": [100, 108]}}, None, b"\0" * 8, "ends at byte 108 but the data section has 8"),
    ({"a": {**GOOD, "data_offsets": [0, 12]}}, None, b"\0" * 12, "tensor 'a' spans 12 bytes"),
    ({"a": {**GOOD, "data_offsets": [-8, 0]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "shape": [-2, -1]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "shape": [2.0]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "shape": None}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "data_offsets": ["0", "8"]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "dtype": ["F32"]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": [0, 8]}, None, b"\0" * 8, "corrupt safetensors header entry 'a'"),
    ({"a": {**GOOD, "dtype": "C64"}}, None, b"\0" * 8, "tensor 'a' has unsupported dtype C64"),
], ids=["huge-length", "length-past-end", "zero-length", "invalid-json", "not-utf8", "not-object",
        "offsets-beyond-file", "offsets-vs-shape", "negative-offset", "negative-shape", "float-shape", "null-shape", "string-offsets",
        "list-dtype", "no-offsets", "entry-not-object", "unknown-dtype"])
def test_corrupt_safetensors_header(tmp_path, header, length, data, problem):
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    raises(path, [str(path), problem])
    raises(tmp_path, [str(path), problem])  # found through its folder: same message


@pytest.mark.parametrize("setup,problem", [
    (lambda d: None, "unknown layout"),
    (lambda d: [(d / n).write_text("x") for n in ("README.md", "notes.txt", "image.png", "config.json.bak")],
     "unknown layout"),
    (lambda d: (d / "x.safetensors").mkdir(), "unknown layout"),
    (lambda d: [save_file({"a": torch.ones(1)}, str(d / n)) for n in ("a.safetensors", "b.safetensors")],
     "2 .safetensors files but no *.safetensors.index.json"),
    (lambda d: [write_sharded(d, {"a": torch.ones(1)}, 1, stem) for stem in ("one", "two")],
     "several index files (one.safetensors.index.json, two.safetensors.index.json)"),
], ids=["empty", "unrelated-files", "folder-named-like-a-file", "two-files-no-index", "two-indexes"])
def test_unknown_or_ambiguous_folder(tmp_path, setup, problem):
    folder = tmp_path / "folder"
    folder.mkdir()
    setup(folder)
    raises(folder, [str(folder), problem])


def test_unknown_layout_lists_what_was_expected(tmp_path):
    message = raises(tmp_path, [str(tmp_path), "unknown layout"])
    for expected in ("*.safetensors", "*.safetensors.index.json", "torch file", "high_noise_model",
                     "transformer_2"):
        assert expected in message


def test_non_existent_path_and_unknown_file_type(tmp_path):
    raises(tmp_path / "nope" / "model.safetensors", [str(tmp_path / "nope" / "model.safetensors"),
                                                      "no such file or folder"])
    raises("./relative/missing", ["./relative/missing", "no such file or folder"])
    raises("a/b/c", ["a/b/c", "no such file or folder", "not a hub id"])
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK")
    raises(other, [str(other), "unknown file type"])


@pytest.mark.parametrize("text,problem", [("{oops", "invalid JSON"), ("[1, 2]", "expected a JSON object")])
def test_bad_config_json(tmp_path, text, problem):
    save_file({"a": torch.ones(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(text)
    raises(tmp_path, [str(tmp_path / "config.json"), problem])


# ---------------------------------------------------------------- hostile headers and files: bounded, one line


def entry(shape, offsets, dtype="F32") -> bytes:
    """A header entry written by hand: json.dumps cannot write some of these numbers, Python can."""
    return (f'{{"dtype": "{dtype}", "shape": [{", ".join(map(str, shape))}], '
            f'"data_offsets": [{offsets[0]}, {offsets[1]}]}}').encode()


@pytest.mark.parametrize("header,data,problem", [
    (b"[" * 200_000 + b"]" * 200_000, b"", "corrupt safetensors header: JSON nested too deeply"),
    (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"", "corrupt safetensors header: JSON nested too deeply"),
    (b'{"a": ' + entry(["9" * 5000], (0, 4)) + b"}", b"\0" * 4, "an integer of 5,000 digits (at most 20)"),
    (b'{"a": ' + entry([10**4000, 10**4000], (0, 4)) + b"}", b"\0" * 4, "an integer of 4,001 digits"),
    (b'{"a": ' + entry([10**9, 10**9], (0, 4)) + b"}", b"\0" * 4,
     "needs 4000000000000000000 bytes, more than the whole data section (4)"),
    (b'{"a": ' + entry([0, 2**63], (0, 0)) + b"}", b"", "expected non-negative integers below 2^63"),
    (b'{"a": ' + entry([0, 2**62, 4], (0, 0)) + b"}", b"", "its axes span more than 2^63 elements"),
    (b'{"a": ' + entry([1] * 65, (0, 4)) + b"}", b"\0" * 4, "at most 64 dimensions"),
    (b'{"a": ' + entry([1], (0, 2**64)) + b"}", b"\0" * 4, "expected non-negative integers below 2^63"),
    (b'{"__metadata__": {"x": [1]}, "a": ' + entry([1], (0, 4)) + b"}", b"\0" * 4,
     "'__metadata__' must map names to strings"),
], ids=["nested-200000", "nested-in-entry", "5000-digit-int", "shape-10^4000", "shape-past-data", "shape-0-2^63",
        "strides-past-int64", "rank-65", "offset-2^64", "metadata-not-strings"])
def test_hostile_safetensors_headers_are_one_line_errors(tmp_path, header, data, problem):
    path = write_raw_safetensors(tmp_path / "hostile.safetensors", header, data)
    message = raises(path, [str(path), problem])
    assert "\n" not in message and len(message) < 600


@pytest.mark.parametrize("offsets,data,problem", [
    ([(0, 8), (4, 12)], 12, "tensor 'b' starts at byte 4 and overlaps the tensor before it (which ends at byte 8)"),
    ([(0, 8), (0, 8)], 8, "tensor 'b' starts at byte 0 and overlaps the tensor before it"),
    ([(0, 8), (12, 20)], 20, "tensor 'b' starts at byte 12 and leaves bytes 8..12 unused"),
    ([(4, 12), (12, 20)], 20, "tensor 'a' starts at byte 4 and leaves bytes 0..4 unused"),
    ([(0, 8), (8, 16)], 20, "the tensors end at byte 16 but the data section has 20 bytes"),
], ids=["overlap", "same-bytes", "gap", "gap-at-start", "trailing-bytes"])
def test_offsets_must_tile_the_data_section_as_safe_open_requires(tmp_path, offsets, data, problem):
    from safetensors import safe_open

    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": list(span)} for name, span in zip("ab", offsets)}
    path = write_raw_safetensors(tmp_path / "tiles.safetensors", header, b"\0" * data)
    with pytest.raises(Exception):  # noqa: B017 (the reference refuses it too, with its own error type)
        safe_open(str(path), "pt")
    raises(path, [str(path), problem])


def test_empty_tensors_share_offsets_and_tiling_files_open(tmp_path):
    header = {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "z": {"dtype": "F16", "shape": [3, 0], "data_offsets": [8, 8]},
              "__metadata__": {"format": "pt"}}
    path = write_raw_safetensors(tmp_path / "ok.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    ckpt = open_checkpoint(path)
    assert sorted(ckpt.keys()) == ["a", "e", "z"] and ckpt.get("a").tolist() == [1.5, -2.0]


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt", "x.safetensors.index.json"])
def test_a_fifo_is_refused_not_read(tmp_path, fifo, name):
    path = fifo(tmp_path / name)
    raises(path, [str(path), "not a regular file (a FIFO)"])


def test_a_link_to_a_fifo_is_refused_after_resolving(tmp_path, fifo):
    target = fifo(tmp_path / "pipe")
    for name in ("x.safetensors", "x.pt"):
        (tmp_path / name).symlink_to(target)
        raises(tmp_path / name, [str(tmp_path / name), "not a regular file (a FIFO)"])
    (tmp_path / "dev.pt").symlink_to("/dev/zero")  # endless: torch.load would never finish
    raises(tmp_path / "dev.pt", [str(tmp_path / "dev.pt"), "not a regular file (a character device)"])


def test_config_json_is_bounded(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text('{"dim": ' + "[" * 100_000 + "]" * 100_000 + "}")
    raises(tmp_path, [str(tmp_path / "config.json"), "JSON nested too deeply"])
    (tmp_path / "config.json").write_text('{"x": "' + "y" * (1 << 20) + '"}')
    raises(tmp_path, [str(tmp_path / "config.json"), "at most 1,048,576 are accepted"])


def test_a_fifo_swapped_in_after_opening_is_refused_when_read(tmp_path, fifo):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10)}, str(path))
    ckpt = open_checkpoint(path)
    path.unlink()
    fifo(path)
    with pytest.raises(ProjectionError, match=r"w\.safetensors: not a regular file \(a FIFO\)"):
        ckpt.get("a")
