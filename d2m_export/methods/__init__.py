"""Conversion methods, one module each, behind one interface (`Method`)."""
from d2m_export.methods.base import METHODS, Method, get_method  # noqa: F401
from d2m_export.methods import lfuc, prune, upcycle  # noqa: F401  (registers them)
