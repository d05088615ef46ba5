"""Mixtral: read as an MoE input of moe2dense (every layer MoE, no shared expert)."""
from d2m_export.architectures import Architecture, register

register(Architecture("mixtral", is_moe=True))
