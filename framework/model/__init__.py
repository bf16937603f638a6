"""The plain single-device GPT (no torch.distributed, deepspeed or accelerate imports here)."""

from framework.model.gpt import GPT, ModelConfig, ModelShapeError, num_params

__all__ = ["GPT", "ModelConfig", "ModelShapeError", "num_params"]
