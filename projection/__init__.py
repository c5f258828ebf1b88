"""Projection Inspector core: load -> map -> plan -> project -> measure -> export.

    from projection import Projector, Strategy, export_student
    p = Projector.open("Wan2.2-T2V-A14B", "student.yaml", expert="low")
    p.mapping.coverage(); export_student(p, "out/")

Importing it changes no process-wide state; programs choose those settings in `projection.runtime`.
"""
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ProjectionError
from .export import export_student, projected_student
from .mapping import Mapping, build_mapping, parse_rules, preset_rules
from .models import ModelView, open_student, open_teacher
from .pipeline import Projector
from .strategy import Strategy
from .student import SeedStudent, WanLite, build_student, load_student

__all__ = [
    "Checkpoint", "Mapping", "ModelView", "ProjectionError", "Projector", "SeedStudent", "Strategy", "WanLite",
    "build_mapping", "build_student", "export_student", "load_student", "open_checkpoint", "open_student",
    "open_teacher", "parse_rules", "preset_rules", "projected_student",
]
