"""Model code: checkpoint loading, the decoder families, paged attention, experts, sampling."""

from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.config import ModelConfig
from tokenmill.model.loader import load_model, read_model_config

__all__ = ["AttentionMetadata", "ModelConfig", "load_model", "read_model_config"]
