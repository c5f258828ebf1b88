"""A session's export: the core's, recording the Function view's measurement when it measured this very
projection, with copies of the small files (and weights up to SMALL_WEIGHTS_BYTES) offered for download."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from projection import export_student

from ..state import Progress, SessionState

SMALL_WEIGHTS_BYTES = 256 << 20  # exported weights offered for download up to this size
MEASURED_ON = "the app's Function view: this projection in memory, in float32, before export"


class ExportAnswers(SessionState):
    """The app's export of the session's projection."""

    def export(self, out: Path, progress: Progress | None = None) -> tuple[dict[str, Any], list[Path]]:
        """The core's export (refuses existing folders); returns the report and copies to offer for download."""
        measured = self.function if self.function is not None and self._function_for == self.projection_key() else None
        # the Function view measured this very projection: the report records it, as the CLI's --calibration does
        measure = (lambda _: {**measured["fidelity"], "measured_on": MEASURED_ON}) if measured else None
        with self._heavy():
            report = export_student(self.projector, out, force=False, progress=progress, strategy=self.strategy,
                                    measure=measure)
        names = ["projection_report.json", "config.json", "strategy.yaml", "README.md"]
        weights = report["provenance"]["weights"]
        if sum((out / w).stat().st_size for w in weights) <= SMALL_WEIGHTS_BYTES:
            index = report["provenance"]["weights_index"]
            names += weights + ([index] if index else [])
        copies = self.folder / out.name  # downloads come from the session's folder, not the root
        copies.mkdir(parents=True, exist_ok=True)
        return report, [Path(shutil.copy2(out / n, copies / n)) for n in names]
