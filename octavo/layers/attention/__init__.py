from octavo.layers.attention.backend import AttentionBackend, get_attention_backend
from octavo.layers.attention.layer import Attention
from octavo.layers.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "get_attention_backend"]
