"""Projection Inspector core: load -> map -> plan -> project -> measure -> export.

    from projection import Projector, Strategy, export_student
    p = Projector.open("Wan2.2-T2V-A14B", "student.yaml", expert="low")
    p.mapping().coverage(); export_student(p, "out/")

Importing it changes no process-wide state; programs choose those settings in `projection.runtime`.
"""
from .arch.layout import build_student
from .arch.seed import SeedStudent
from .arch.wan import WanLite
from .core.mapping import Mapping, build_mapping, parse_rules, preset_rules
from .core.models import ModelView, open_student, open_teacher
from .core.strategy import Strategy
from .engine.build import load_student
from .engine.build import projected_student
from .engine.export import export_student
from .engine.projector import Projector
from .errors import ProjectionError
from .io.checkpoint import Checkpoint, open_checkpoint

__all__ = [
    "Checkpoint", "Mapping", "ModelView", "ProjectionError", "Projector", "SeedStudent", "Strategy", "WanLite",
    "build_mapping", "build_student", "export_student", "load_student", "open_checkpoint", "open_student",
    "open_teacher", "parse_rules", "preset_rules", "projected_student",
]
