"""The benchmarks' default model shape: a small Qwen2 with Qwen's real vocabulary."""

import argparse
import json

DEFAULT_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151646,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "initializer_range": 0.02,
}


def hf_config_dict(args: argparse.Namespace) -> dict:
    """The HF config of a benchmark run: `--config` (a `config.json`) or `DEFAULT_CONFIG`, with
    `--vocab` overriding its vocabulary size."""
    config = dict(DEFAULT_CONFIG) if args.config is None else json.loads(args.config.read_text())
    if args.vocab is not None:
        config["vocab_size"] = args.vocab
    return config
