"""d2m-export: dense LLMs to Mixture-of-Experts (LF-UC) and back, exported to edge runtimes."""

__version__ = "0.1.0"
