"""The decoder in equinox (Qwen2/2.5/3, Llama, Mistral and Gemma 3 text as typed options), its KV
cache, decoding layout and HF checkpoint I/O."""

from .config import ModelConfig
from .decoder import Decoder, positions_from_mask
from .decoding import DecodingModel
from .hf_io import CheckpointError, init_from_config, load_hf, save_hf
from .kv_cache import KVCache

__all__ = [
    "CheckpointError",
    "Decoder",
    "DecodingModel",
    "KVCache",
    "ModelConfig",
    "init_from_config",
    "load_hf",
    "positions_from_mask",
    "save_hf",
]
