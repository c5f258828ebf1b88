"""The projection strategy: one pydantic model, every field defaulted, round-trips through YAML."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ProjectionError
from ..io.inputs import load_yaml, read_text

Rank = Literal["magnitude", "activation", "uniform", "first"]
LAYER_METHODS = ("uniform", "first", "last", "influence")
DEFAULT_LAYERS = "first"  # trained fastest of the rules at 5% of the demo teacher's samples (README, Convergence)
RECOVERABLE = "recoverable"  # chosen by short distillation probes (`projection.probe.choose`), not by a rule
MAX_LAYER_LIST = 1024  # entries of an explicit layer list: the deepest student it can ask for
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (a torch generator's int64)


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: Union[Literal["uniform", "first", "last", "influence", "recoverable"], list[int]] = Field(
        DEFAULT_LAYERS, description="teacher block per student block: first N (the default: it trained fastest "
                                    "of the rules in the convergence benchmark), uniform (evenly spaced, the first "
                                    "and last blocks included: round(i*(T-1)/(S-1))), last N, influence (the N most "
                                    "influential on a calibration set, in order), recoverable (of a few candidate "
                                    "subsets, the one a short distillation on a calibration set recovers best), or "
                                    "a list")
    width: Literal["magnitude", "activation", "uniform", "first", "svd-per-matrix"] = Field(
        "magnitude", description="residual (and every other free) width: one shared index set; activation ranks "
                                 "by the teacher's activations on a calibration set; svd-per-matrix is the seeds' "
                                 "basis-inconsistent comparator")
    heads: Rank = Field("magnitude", description="which whole heads to keep")
    head_dim: Literal["frequency", "activation", "first", "uniform"] = Field(
        "frequency", description="within a head: q/k RoPE pairs by nearest frequency inside each t/h/w band, "
                                 "v/o and cross-attention dims by magnitude (activation: v/o dims by the "
                                 "attention output's activations); or first/uniform")
    ffn: Literal["magnitude", "activation", "wanda", "uniform", "first"] = Field(
        "magnitude", description="FFN neurons: |ffn.0 row| x |ffn.2 column|; activation: the GELU output's energy "
                                 "on a calibration set; wanda: that energy x |ffn.2 column|^2 (what the neuron "
                                 "writes)")
    fit: Literal["none", "least-squares"] = Field(
        "none", description="least-squares: refit every block matrix on a calibration set to reproduce the "
                            "teacher's outputs on the kept indices, on the student's own inputs (ridge, float64)")
    compensate: Literal["none", "mean"] = Field(
        "none", description="mean: fold each dropped teacher block's mean update of the residual stream (on a "
                            "calibration set) into the ungated cross-attention output bias of the next kept block")
    conv: Literal["center", "mean", "sum"] = Field("sum", description="Conv3d -> Conv2d temporal collapse")
    rescale: Literal["none", "variance"] = Field(
        "none", description="variance: scale each matrix by sqrt(teacher_in / student_in) of its input axis")
    expert: Literal["high", "low"] | None = Field(None, description="two-expert teachers: which expert")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="export dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, strict=True, description="initial values of skipped student tensors")

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_list(cls, value: object) -> object:
        """One clear message for a bad layer choice (the union's own errors list every alternative)."""
        if isinstance(value, str) and value in (*LAYER_METHODS, RECOVERABLE):
            return value
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected one of {', '.join((*LAYER_METHODS, RECOVERABLE))} or a list of teacher block "
                             f"indices, got {value!r:.60}")
        if len(value) > MAX_LAYER_LIST:
            raise ValueError(f"{len(value)} entries; a layer list has at most {MAX_LAYER_LIST}")
        for i, block in enumerate(value):
            if type(block) is not int or not 0 <= block < 2**31:  # not a bool, a float or a huge number
                shown = ("a boolean" if isinstance(block, bool) else "too large" if isinstance(block, int) and block > 0
                         else f"{block!r:.60}")
                raise ValueError(f"entry {i} is {shown}: a teacher block is a whole number from 0")
        return list(value)

    @property
    def needs_activations(self) -> bool:
        """Some choice ranks by the teacher's activations (a calibration set must be given)."""
        return (self.layers in ("influence", RECOVERABLE) or self.ffn == "wanda" or self.compensate != "none"
                or "activation" in (self.width, self.heads, self.ffn, self.head_dim))

    @property
    def needs_calibration(self) -> bool:
        return self.needs_activations or self.fit != "none"

    @property
    def refits(self) -> bool:
        """The student's weights are changed after projection (fit or compensation), so a whole student is built."""
        return self.fit != "none" or self.compensate != "none"

    @property
    def basis_consistent(self) -> bool:
        return self.width != "svd-per-matrix"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "strategy") -> "Strategy":
        data = load_yaml(text, origin) or {}
        if not isinstance(data, dict):
            raise ProjectionError(f"{origin}: expected a mapping of strategy fields, got {type(data).__name__}")
        return cls.checked(data, origin)

    @classmethod
    def checked(cls, data: dict, origin: str = "strategy") -> "Strategy":
        """Validate fields from anywhere (a file, the app's controls); a ProjectionError names each problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'strategy'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}{cls._did_you_mean(e)}" for e in exc.errors())
            raise ProjectionError(f"{origin}: {problems}") from exc

    @classmethod
    def _did_you_mean(cls, error: dict) -> str:
        """For an unknown field, the closest known one (`widht` -> `width`), as student configs say."""
        if error["type"] != "extra_forbidden" or not error["loc"]:
            return ""
        close = difflib.get_close_matches(str(error["loc"][-1]), list(cls.model_fields), 1)
        return f" (did you mean '{close[0]}'?)" if close else f" (the fields are {', '.join(cls.model_fields)})"

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        return cls.from_yaml(read_text(path, "strategy"), str(path))
