"""One browser session: its state (`state.SessionState`) and what the screen asks of it (`answers/`: the weights'
numbers, what the student computes, the Gallery's rows, the export). Every number comes from the core; a session
decides only *when* to ask, and keeps its objects apart from every other session's."""
from __future__ import annotations

from .answers.export import ExportAnswers
from .answers.gallery import GalleryAnswers
from .answers.weights import WeightAnswers


class Session(WeightAnswers, GalleryAnswers, ExportAnswers):
    """A session's state with every answer the screen asks of it (`Session.open` opens one)."""
