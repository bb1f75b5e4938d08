"""The decoder in equinox (Qwen2/2.5/3, Llama, Mistral and Gemma 3 text as typed options), LoRA
adapters, its KV cache, decoding layout, HF checkpoint, GGUF file and PEFT adapter I/O."""

from .config import ModelConfig
from .decoder import Decoder, positions_from_mask, trainable
from .decoding import DecodingModel
from .gguf_io import gguf_config, gguf_tokenizer, load_gguf
from .hf_io import CheckpointError, init_from_config, load_hf, save_hf
from .kv_cache import KVCache
from .lora import LoraAdapters, LoraPair, base_fingerprint
from .peft_io import load_peft, lora_policy, save_peft

__all__ = [
    "CheckpointError",
    "Decoder",
    "DecodingModel",
    "KVCache",
    "LoraAdapters",
    "LoraPair",
    "ModelConfig",
    "base_fingerprint",
    "gguf_config",
    "gguf_tokenizer",
    "init_from_config",
    "load_gguf",
    "load_hf",
    "load_peft",
    "lora_policy",
    "positions_from_mask",
    "save_hf",
    "save_peft",
    "trainable",
]
