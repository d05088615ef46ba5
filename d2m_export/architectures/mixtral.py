"""Mixtral: read as an MoE input of moe2dense (every layer MoE, no shared expert), made dense as Llama."""
from d2m_export.architectures import MoeInput, _dense_common, register


class Mixtral(MoeInput):
    def dense_model(self, moe_config, width, state):
        from transformers import LlamaConfig

        return LlamaConfig(**_dense_common(moe_config, width), attention_bias=False, mlp_bias=False), state


register(Mixtral("mixtral", is_moe=True, params_from_modules=True))
