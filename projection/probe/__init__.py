"""Recoverability: rank candidate starts by how far a short distillation brings them (`recovery.probe`), on
teacher targets computed once per set (`targets`), with random init's ladder as the scale (`ladder`)."""
from .recovery import Candidate, Outcome, ProbeConfig, ProbeResult, candidates, probe

__all__ = ["Candidate", "Outcome", "ProbeConfig", "ProbeResult", "candidates", "probe"]
