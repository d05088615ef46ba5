"""Stage 3, convert: the conversion methods, one module each. Dense → MoE behind one interface (`Method`):
lfuc, prune, upcycle; MoE → dense: `moe2dense`."""
from d2m_export.methods.base import METHODS, Method, get_method  # noqa: F401
from d2m_export.methods import lfuc, prune, upcycle  # noqa: F401  (registers them)
