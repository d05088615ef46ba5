"""Mistral and Ministral (`mistral`): Llama with an optional sliding attention window and an explicit
head_dim (Mistral-Nemo's 128 beside 5120/32). With no window (null, as from Mistral 7B v0.2 on), or a window
no shorter than the model's positions (Ministral), a token attends to every earlier position, as in Llama:
the model is read as Llama, tensors as stored. A shorter window (Mistral 7B v0.1: 4096 of 32768) is refused:
convert's outputs and every export target attend over all positions, so past the window they would differ.
"""
from d2m_export.architectures import ReadAs, register


class Mistral(ReadAs):
    def view_config(self, config):
        d = config.to_dict()
        for key in ("sliding_window", "architectures", "model_type", "transformers_version"):
            d.pop(key, None)
        return {**d, "model_type": "llama", "attention_bias": False, "mlp_bias": False, "head_dim": config.head_dim}

    def refusal(self, config):
        window, positions = config.sliding_window, config.max_position_embeddings
        if window is not None and window < positions:
            return (f"mistral with sliding_window {window} < max_position_embeddings {positions}: its attention is "
                    f"windowed to {window} positions, which the onnx, gguf, executorch and coreml targets and "
                    f"convert's outputs (llama, qwen2_moe) do not hold (they attend over all positions); "
                    f"mistral models with sliding_window null or >= their positions are read as llama")
        return None


register(Mistral("mistral", is_moe=False, fuses_into="qwen2_moe", reads_as="llama"))
