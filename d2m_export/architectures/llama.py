"""Llama (and the SmolLM2 family): dense, no biases; converted into Qwen2-MoE without q/k/v biases."""
from d2m_export.architectures import Architecture, register

register(Architecture("llama", is_moe=False, fuses_into="qwen2_moe"))
