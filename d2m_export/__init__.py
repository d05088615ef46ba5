"""d2m-export: dense LLMs to Mixture-of-Experts (LF-UC) and back, exported to edge runtimes.

The pipeline's stages as Python functions (see `d2m_export.api`)::

    from d2m_export import analyze, convert, evaluate, export, bench
    from d2m_export.api import heal, train      # d2m_export.heal and .train are the subpackages

Importing the package loads no torch: each function imports what it needs when called.
"""
from d2m_export._version import __version__
from d2m_export.api import (DEFAULT_TASKS, Analysis, Benchmark, Checkpoint, Evaluation, Export, analyze, bench,
                            convert, evaluate, export)

__all__ = ["__version__", "DEFAULT_TASKS", "Analysis", "Benchmark", "Checkpoint", "Evaluation", "Export", "analyze",
           "bench", "convert", "evaluate", "export"]
