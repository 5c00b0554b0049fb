"""The one-call pipeline: segment -> register -> crop -> classify -> Grad-CAM, with safety checks.

Modules:

* :mod:`.checks`: pure sanity checks that protect the patient. Each returns a list of
  :class:`~.checks.Finding` (a warning, or a refusal where an answer would be meaningless):
  image spacing and metal, missing or implausible bones, the syndesmosis outside the field of
  view, both legs in one scan, a poor registration; :func:`~.checks.gate_classification`
  withholds or flags the Weber class accordingly.
* :mod:`.pipeline`: :class:`~.pipeline.Pipeline` (models loaded once, reused across cases),
  each stage callable alone, :meth:`~.pipeline.Pipeline.run` for the whole chain with one
  progress fraction, cancellation and per-stage timings, and :func:`~.pipeline.write_outputs`
  (every file atomically, ``result.json`` last).
* :mod:`.report`: the one-page summary (``report.png``, optionally ``report.pdf``).
* :mod:`.batch`: many CTs (files, DICOM folders, folders of them) with one output folder per
  case and a resumable ``results.csv``.

Nothing heavy is imported here: ``from AnkleFractureLib.pipeline import Pipeline`` loads the
submodule on first use (torch itself only when a model is loaded).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Finding": "checks",
    "gate_classification": "checks",
    "Pipeline": "pipeline",
    "PipelineOptions": "pipeline",
    "PipelineResult": "pipeline",
    "write_outputs": "pipeline",
    "discover_inputs": "batch",
    "run_batch": "batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy re-exports (PEP 562), so importing the package stays cheap."""
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
