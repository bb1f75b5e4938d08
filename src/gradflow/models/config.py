"""The decoder's shape: a typed view of a Hugging Face `config.json` (Qwen2 / Qwen2.5 / Llama)."""

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The parameters each RoPE type reads (besides `rope_theta`).
ROPE_PARAMETERS = {
    "linear": ("factor",),
    "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Qwen2/Llama decoder, read from (and written back to) HF `config.json`.

    `rope_scaling` holds the non-default RoPE parameters as sorted `(name, value)` pairs so that the
    config stays hashable (it is a static field of the model).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float | int], ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; gradflow supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Reads an HF config dictionary.

        **Arguments:**

        - `hf`: the parsed `config.json`.
        - `source`: where it came from, for error messages.

        **Returns:**

        The `ModelConfig`.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; gradflow supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        for key in ("mlp_bias",):
            if hf.get(key, False):
                raise ValueError(f"{source}: {key}=true is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        # As transformers reads it: `rope_scaling` before `rope_parameters`, the dict's own
        # `rope_theta` before the top-level one.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{source}: unsupported rope type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (only 1)")
        if rope_type == "llama3":
            rope["original_max_position_embeddings"] = hf.get(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings")),
            )
        needed = ROPE_PARAMETERS.get(rope_type, ())
        missing = [name for name in needed if not isinstance(rope.get(name), int | float)]
        if missing:
            raise ValueError(f"{source}: {rope_type} RoPE needs {', '.join(missing)}")
        scaling = tuple(sorted((name, rope[name]) for name in needed))
        # Qwen2 always has q/k/v biases; Llama's `attention_bias` also puts one on o_proj.
        attention_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        if model_type == "llama" and attention_bias:
            raise ValueError(
                f"{source}: attention_bias=true (Llama with biases on q/k/v/o_proj) is not "
                "supported"
            )
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=rope_theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rope_type=rope_type,
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def load(cls, config: "str | Path | dict[str, Any] | ModelConfig") -> "ModelConfig":
        """Reads a config from a `config.json` path, a directory holding one, or a dictionary.

        **Arguments:**

        - `config`: a path, an HF config dictionary or a `ModelConfig` (returned as is).

        **Returns:**

        The `ModelConfig`.
        """
        if isinstance(config, ModelConfig):
            return config
        if isinstance(config, dict):
            return cls.from_hf(config)
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}: pass a HF model directory")
        return cls.from_hf(json.loads(path.read_text()), source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dictionary that `transformers` reads back to the same model.

        **Returns:**

        A JSON-serialisable dictionary.
        """
        architecture = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        rope = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            **dict(self.rope_scaling),
        }
        hf: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
        }
        if self.rope_type != "default":
            hf["rope_scaling"] = rope
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        return hf

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (used for small test and benchmark shapes).

        **Arguments:**

        - `changes`: field names and their new values.

        **Returns:**

        The new `ModelConfig`.
        """
        return dataclasses.replace(self, **changes)

    @property
    def num_parameters(self) -> int:
        """The number of parameters (embedding and head counted once when tied)."""
        d, i, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        layer = attn + 3 * d * i + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head
