"""Recoverability: rank candidate starts by how far a short distillation brings them (`recovery.probe`), on
teacher targets computed once per set (`targets`), with random init's ladder as the scale (`ladder`); choose a
student's blocks that way (`choose`: `layers: recoverable`)."""
from .choose import resolve_layers
from .recovery import Candidate, Outcome, ProbeConfig, ProbeResult, candidates, probe

__all__ = ["Candidate", "Outcome", "ProbeConfig", "ProbeResult", "candidates", "probe", "resolve_layers"]
