"""Shared fixtures: a tiny Wan teacher built with diffusers' WanTransformer3DModel (the third-party reference),
saved in the diffusers format (sharded) and in the original Wan format (same weights, original names)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A custom student: the demo's reference student under other names, so nothing maps until rules say how.
CUSTOM_RENAMES = [(r"^blocks\.", "layers."), (r"\.self_attn\.", ".attn."), (r"\.cross_attn\.", ".xattn."),
                  (r"\.ffn\.", ".mlp."), (r"^patch_embedding", "stem"), (r"^text_embedding", "text_in"),
                  (r"^time_embedding", "time_in"), (r"^time_projection", "time_out"), (r"^head\.head", "out.proj"),
                  (r"^head\.modulation", "out.modulation")]
CUSTOM_RULES = """\
layers.{i}.attn: blocks.{i}.self_attn
layers.{i}.xattn: blocks.{i}.cross_attn
layers.{i}.mlp: blocks.{i}.ffn
layers.{i}.norm3: blocks.{i}.norm3
layers.{i}.modulation: blocks.{i}.modulation
stem: patch_embedding
text_in: text_embedding
time_in: time_embedding
time_out: time_projection
out.proj: head.head
out.modulation: head.modulation
"""


def custom_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference student's state dict under the custom names above."""
    out = {}
    for key, value in state.items():
        for pattern, repl in CUSTOM_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value.contiguous()
    return out


TINY = dict(dim=64, num_heads=2, ffn_dim=48, num_layers=3, in_dim=4, out_dim=4, text_dim=24, freq_dim=16)


@dataclass
class TinyWan:
    model: torch.nn.Module  # diffusers WanTransformer3DModel
    diffusers_dir: Path
    original_dir: Path
    config: dict


def diffusers_kwargs(cfg: dict) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"],
                attention_head_dim=cfg["dim"] // cfg["num_heads"], in_channels=cfg["in_dim"],
                out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
                ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def build_tiny_wan(root: Path, cfg: dict = TINY, seed: int = 0) -> TinyWan:
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from projection.arch.anatomy import to_canonical

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():  # diffusers zero-inits some tensors; give every weight a distinct value
        for p in model.parameters():
            p.normal_(0, 0.2)
    diff = root / "diffusers"
    model.save_pretrained(diff, max_shard_size="60KB")
    state = model.state_dict()
    original = {c: state[n].contiguous() for c, n in to_canonical(list(state), "wan-diffusers").items()}
    orig = root / "original"
    orig.mkdir()
    save_file(original, str(orig / "diffusion_pytorch_model.safetensors"))
    (orig / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "eps": 1e-6,
                                                  "text_len": 512, **cfg}))
    return TinyWan(model, diff, orig, cfg)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> TinyWan:
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default demo: the trained teacher (width 128, 8 blocks, 4 heads; float16) and its students."""
    from projection.demo.folder import write_demo

    return write_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def synthetic_demo_dir(tmp_path_factory) -> Path:
    """The synthetic demo: random weights with trained-like spectra (width 256, 8 blocks, 4 heads)."""
    from projection.demo.folder import write_demo

    return write_demo(tmp_path_factory.mktemp("synthetic") / "demo", synthetic=True)


@pytest.fixture(scope="session")
def wan14b_headers(tmp_path_factory) -> Path:
    """Wan 14B's 1095 real headers over a sparse (empty) data section."""
    from projection.demo.folder import write_shape_only_teacher

    return write_shape_only_teacher(tmp_path_factory.mktemp("wan14b"))


@pytest.fixture
def fifo():
    """make(path): a FIFO at `path` whose writer sends a few bytes to every reader that opens it, so a reader
    that wrongly opens it gets a wrong answer instead of hanging; the writer is released at teardown."""
    stop, feeders = threading.Event(), []

    def make(path: Path) -> Path:
        os.mkfifo(path)

        def feed() -> None:
            while not stop.is_set():
                with contextlib.suppress(BrokenPipeError), open(path, "wb") as f:  # waits for a reader
                    f.write(b"\0" * 16)

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        feeders.append((path, thread))
        return path

    yield make
    stop.set()
    for path, thread in feeders:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer still waiting for a reader finish
        thread.join()
        with contextlib.suppress(OSError):
            os.close(fd)
