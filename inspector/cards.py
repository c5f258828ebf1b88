"""The summary cards and banners above the tabs: the core's summary, made readable from the back of a room."""
from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from projection.arch.config import as_config

from .palette import STATUS_COLORS, STUDENT, TEACHER
from .units import human_bytes, human_count, percent

if TYPE_CHECKING:
    from .state import Step0

LAYOUTS = {
    "diffusers": "Wan, diffusers' WanTransformer3DModel",
    "wan": "Wan, original WanModel names",
    "wanlite": "reference 2D Wan student",
    "seed": "the seeds' layout (fused in_proj)",
    "custom": "custom names: mapped by rules",
}


def _config_line(config: dict[str, Any]) -> str:
    """A summary's config (its dict) in one line."""
    cfg = as_config(config)
    parts = []
    if cfg.dim is not None:
        parts.append(f"width {cfg.dim}")
    if cfg.num_layers is not None:
        stacks = f" ({' + '.join(map(str, cfg.stack_layers))} in stacks)" if cfg.stack_layers else ""
        parts.append(f"{cfg.num_layers} blocks{stacks}")
    if cfg.num_heads is not None:
        head = f" × {cfg.head_dim}" if cfg.head_dim else ""
        parts.append(f"{cfg.num_heads} heads{head}")
    if cfg.ffn_dim is not None:
        parts.append(f"FFN {cfg.ffn_dim}")
    return " · ".join(parts) or "config unknown"


def _heads_inferred(s: dict[str, Any]) -> str:
    """A guess, shown as one: a state dict does not record heads."""
    if not s.get("heads_inferred"):
        return ""
    cfg = as_config(s["config"])
    shape = f"{cfg.num_heads} × {cfg.head_dim}" if cfg.head_dim else str(cfg.num_heads)
    return (f'<div class="card-line heads-inferred" title="Set them in the Sources tab (Heads), with --num-heads, '
            f'or in a config.json beside the checkpoint">⚠ heads inferred: {shape}; the checkpoint does not record '
            f'heads</div>')


def _dtypes(d: dict[str, int]) -> str:
    return ", ".join(d) if len(d) <= 2 else f"{len(d)} dtypes"


def model_card(side: str, s: dict[str, Any]) -> str:
    family = s["description"] if side == "teacher" else LAYOUTS.get(s["layout"], s["layout"])
    expert = f" · expert {s['expert']}" if s.get("expert") else ""
    files = f"{s['format']}, {len(s['files'])} file{'s' if len(s['files']) != 1 else ''}" if s["files"] else s["format"]
    color = TEACHER if side == "teacher" else STUDENT
    return (f'<div class="card model-card" data-side="{side}" style="border-top: 4px solid {color}">'
            f'<div class="card-title">{side.capitalize()}</div>'
            f'<div class="card-main">{escape(family)}{expert}</div>'
            f'<div class="card-line">{_config_line(s["config"])}</div>{_heads_inferred(s)}'
            f'<div class="card-line"><b>{human_count(s["params"])}</b> params · {_dtypes(s["dtypes"])} · '
            f'{human_bytes(s["bytes"])} · {escape(files)}</div>'
            f'<div class="card-source" title="{escape(s["source"])}"><bdi>{escape(s["source"])}</bdi></div></div>')


def _status_bar(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    segments = "".join(f'<span style="width:{100 * n / total:.2f}%;background:{STATUS_COLORS[s]}" title="{s}: {n}">'
                       f'</span>' for s, n in counts.items() if n)
    return f'<div class="status-bar">{segments}</div>'


def metric_card(title: str, value: str, detail: str, tone: str = "", hint: str = "") -> str:
    tip = f' title="{escape(hint)}"' if hint else ""
    return (f'<div class="card metric-card {tone}"{tip}><div class="card-title">{title}</div>'
            f'<div class="metric">{value}</div><div class="card-line">{detail}</div></div>')


def function_card(step0: Step0 | None) -> str:
    """What the student computes, first: its velocity error against the teacher before training."""
    if step0 is None:
        return ""
    tone = "" if step0.synthetic else "good" if step0.error < 0.5 else "bad" if step0.error >= step0.random else ""
    guess = " · on SYNTHETIC inputs: a guess" if step0.synthetic else ""
    on = escape(step0.on)  # the set it was measured on, named on the card itself (a file's source is the user's)
    return metric_card("Velocity error", f"{step0.error:.2f}",
                       f"vs the teacher, step 0; random init {step0.random:.2f}{guess}"
                       f'<div class="card-set" title="{on}">on <bdi>{on}</bdi></div>', tone,
                       hint=f"sum |v_student - v_teacher|^2 / sum |v_teacher|^2 on {step0.on}, before any training; "
                            "0 is the teacher's function. The Gallery tab draws the samples.")


def summary_cards(summary: dict[str, Any], energy_note: str, step0: Step0 | None = None) -> str:
    keys, params = summary["coverage"]["keys"], summary["coverage"]["params"]
    tone = "bad" if keys["transferred"] == 0 else ("good" if keys["rate"] == 1 else "")
    energy = summary.get("retained_weight_energy")
    mean = energy["mean"] if energy else None
    cards = [
        model_card("teacher", summary["teacher"]),
        model_card("student", summary["student"]),
        function_card(step0),
        metric_card("Keys transferred", percent(keys["rate"], 0),
                    f'{keys["transferred"]} of {keys["total"]} student keys · {percent(params["rate"], 0)} of params'
                    + _status_bar(summary["counts"]), tone,
                    hint=f'{human_count(params["transferred"])} of {human_count(params["total"])} parameters'),
        metric_card("Retained weight energy", percent(mean) if mean is not None else "—", energy_note,
                    hint=energy["meaning"] if energy else ""),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def warnings_banner(warnings: list[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
    return f'<div class="warning-banner" role="alert"><div class="warning-title">⚠ Warning</div><ul>{items}</ul></div>'


def inline_error(message: str) -> str:
    return f'<div class="inline-error" role="alert">{escape(message)}</div>' if message else ""


def inline_ask(message: str) -> str:
    """A question waiting for the user (e.g. a download to confirm)."""
    return f'<div class="inline-ask" role="status">{escape(message)}</div>'


def inline_ok(message: str) -> str:
    return f'<div class="inline-ok">{escape(message)}</div>'
