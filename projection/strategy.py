"""The projection strategy: one pydantic model, every field defaulted, round-trips through YAML."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProjectionError

Rank = Literal["magnitude", "uniform", "first"]


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: Union[Literal["uniform", "first", "last"], list[int]] = Field(
        "uniform", description="teacher block per student block: uniform (evenly spaced, the first and last "
                               "blocks included: round(i*(T-1)/(S-1))), first N, last N, or a list")
    width: Literal["magnitude", "uniform", "first", "svd-per-matrix"] = Field(
        "magnitude", description="residual (and every other free) width: one shared index set; "
                                 "svd-per-matrix is the seeds' basis-inconsistent comparator")
    heads: Rank = Field("magnitude", description="which whole heads to keep")
    head_dim: Literal["frequency", "first", "uniform"] = Field(
        "frequency", description="within a head: q/k RoPE pairs by nearest frequency inside each t/h/w band, "
                                 "v/o and cross-attention dims by magnitude; or first/uniform")
    ffn: Rank = Field("magnitude", description="FFN neurons: |ffn.0 row| x |ffn.2 column|")
    conv: Literal["center", "mean", "sum"] = Field("sum", description="Conv3d -> Conv2d temporal collapse")
    rescale: Literal["none", "variance"] = Field(
        "none", description="variance: scale each matrix by sqrt(teacher_in / student_in) of its input axis")
    expert: Literal["high", "low"] | None = Field(None, description="two-expert teachers: which expert")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="export dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    seed: int = Field(0, description="initial values of skipped student tensors")

    @property
    def basis_consistent(self) -> bool:
        return self.width != "svd-per-matrix"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "strategy") -> "Strategy":
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ProjectionError(f"{origin}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ProjectionError(f"{origin}: expected a mapping of strategy fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'strategy'}: {e['msg']}" for e in exc.errors())
            raise ProjectionError(f"{origin}: {problems}") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        path = Path(path)
        try:
            return cls.from_yaml(path.read_text(), str(path))
        except OSError as exc:
            raise ProjectionError(f"{path}: cannot read strategy: {exc}") from exc
