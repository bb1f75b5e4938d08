"""The decoder's shape: a typed view of a Hugging Face `config.json`.

One decoder serves every supported family; a family is a few typed options (`Family`) fixed by
its `model_type`, plus the config fields its `config.json` may set (sliding windows, soft-capping,
the attention scale, the RoPE bases).
"""

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

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
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# gradflow's names of the fields that `config.json` holds under other keys: overrides
# (`ModelConfig.load`) take either name. Gemma's activation is `hidden_activation` (others read
# `hidden_act` itself), and only Gemma reads `rope_local_base_freq`.
CONFIG_JSON_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "hidden_act": "hidden_activation",
    "rope_local_theta": "rope_local_base_freq",
}


class OverrideError(ValueError):
    """An override `ModelConfig.load` cannot apply: a key the family reads by neither name, a
    field set under both names, or a value that other keys of `config.json` overrule."""


class _ReadRecorder(dict):
    """A `config.json` dictionary that notes every key looked up in it."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a `model_type` fixes about the layer, as transformers builds it.

    - `architecture`: the transformers class `config.json` names.
    - `qkv_bias`: biases on the q/k/v projections (and nowhere else).
    - `qk_norm`: an RMSNorm over `head_dim` on each query and key head, before RoPE.
    - `gemma`: Gemma's layout: RMSNorms scale by `1 + weight` (in float32), norms after the
      attention and the MLP as well as before them, and embeddings scaled by √hidden.
    - `defaults`: the transformers config class's defaults that differ from the common ones
      (`COMMON_DEFAULTS`), used when `config.json` leaves a field out.
    """

    architecture: str
    qkv_bias: bool = False
    qk_norm: bool = False
    gemma: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()


FAMILIES = {
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True),
    "llama": Family("LlamaForCausalLM", defaults=(("max_position_embeddings", 2048),)),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, defaults=(("head_dim", 128),)),
    "mistral": Family(
        "MistralForCausalLM",
        defaults=(("max_position_embeddings", 131072), ("sliding_window", 4096)),
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        qk_norm=True,
        gemma=True,
        defaults=(
            ("head_dim", 256),
            ("max_position_embeddings", 131072),
            ("tie_word_embeddings", True),
            ("rope_theta", 1_000_000.0),
            ("rope_local_base_freq", 10_000.0),
            ("query_pre_attn_scalar", 256),
            ("sliding_window", 4096),
            ("sliding_window_pattern", 6),
            ("hidden_activation", "gelu_pytorch_tanh"),
        ),
    ),
}
COMMON_DEFAULTS = {
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder, read from (and written back to) HF `config.json`.

    `model_type` picks the `Family`; the fields after `eos_token_id` are the options a family's
    `config.json` may set (their defaults are Qwen2's and Llama's). `rope_scaling` holds the
    non-default RoPE parameters as sorted `(name, value)` pairs and `layer_types` is a tuple, so
    that the config stays hashable (it is a static field of the model).

    - `hidden_act`: the gated MLP's activation, `silu` or `gelu_pytorch_tanh`.
    - `query_pre_attn_scalar`: attention scores are scaled by its inverse square root (default:
      `head_dim`).
    - `final_logit_softcapping`: `cap · tanh(x / cap)` on the output logits (`None`: off).
    - `sliding_window`: how many slots a query of a `sliding_attention` layer sees (itself
      included).
    - `layer_types`: `full_attention` or `sliding_attention` per layer (empty: all full).
    - `rope_local_theta`: the RoPE base of sliding layers (default RoPE; `None`: `rope_theta`).
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
    hidden_act: str = "silu"
    query_pre_attn_scalar: int | float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; gradflow supports "
                f"{', '.join(FAMILIES)}"
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
        if self.attention_bias != self.family.qkv_bias:
            raise ValueError(
                f"attention_bias={self.attention_bias} is not a {self.model_type} layout "
                f"(it has q/k/v biases: {self.family.qkv_bias})"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported (only "
                f"{', '.join(map(repr, SUPPORTED_ACTIVATIONS))})"
            )
        # TOML overrides give lists.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers "
                "(set layer_types with num_layers)"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types: {unknown[0]!r} is not one of {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but no sliding_window")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def family(self) -> Family:
        """The options `model_type` fixes."""
        return FAMILIES[self.model_type]

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: how many slots a query sees (itself included), or `None` (all before it)."""
        types = self.layer_types or ("full_attention",) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    @property
    def attention_scale(self) -> float:
        """The factor on query·key scores."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Reads an HF config dictionary, as transformers reads it (its class defaults for the
        fields it leaves out); what gradflow cannot compute exactly is refused, naming the field.

        **Arguments:**

        - `hf`: the parsed `config.json`.
        - `source`: where it came from, for error messages.

        **Returns:**

        The `ModelConfig`.
        """
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            raise ValueError(
                f"{source}: model_type 'gemma3' (Gemma3ForConditionalGeneration, with vision) is "
                "not supported; the text-only 'gemma3_text' (Gemma3ForCausalLM) is"
            )
        if model_type not in FAMILIES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; gradflow supports "
                f"{', '.join(FAMILIES)}"
            )
        family = FAMILIES[model_type]
        defaults = {**COMMON_DEFAULTS, **dict(family.defaults)}

        def get(key: str) -> Any:
            return hf.get(key, defaults.get(key))

        for key in ("mlp_bias", "use_bidirectional_attention"):
            if hf.get(key, False):
                raise ValueError(f"{source}: {key}=true is not supported")
        if hf.get("attn_logit_softcapping") is not None:
            # Gemma 2's; transformers' Gemma 3 keeps the field but never applies it.
            raise ValueError(
                f"{source}: attn_logit_softcapping={hf['attn_logit_softcapping']} is not "
                f"supported (transformers' {family.architecture} does not apply it either)"
            )
        act_key = "hidden_activation" if family.gemma else "hidden_act"
        act = get(act_key)
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"{source}: {act_key} {act!r} is not supported (only "
                f"{', '.join(map(repr, SUPPORTED_ACTIVATIONS))})"
            )
        if model_type != "qwen2" and hf.get("attention_bias", False):
            raise ValueError(
                f"{source}: attention_bias=true ({model_type} with biases on q/k/v/o_proj) is "
                "not supported"
            )
        if family.gemma:
            rope_theta, rope_type, scaling, local_theta = _gemma_rope(hf, get, source)
        else:
            rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
            rope_theta, rope_type, scaling = _rope(rope, hf, get("rope_theta"), source)
            local_theta = None
        sliding_window, layer_types = _attention_layers(hf, model_type, get, source)
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
            head_dim=get("head_dim") or hidden // heads,
            rope_theta=rope_theta,
            rms_norm_eps=float(get("rms_norm_eps")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            attention_bias=family.qkv_bias,
            max_position_embeddings=get("max_position_embeddings"),
            rope_type=rope_type,
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            hidden_act=act,
            query_pre_attn_scalar=get("query_pre_attn_scalar"),
            final_logit_softcapping=_float(hf.get("final_logit_softcapping")),
            sliding_window=sliding_window,
            layer_types=layer_types,
            rope_local_theta=local_theta,
        )

    @classmethod
    def load(
        cls,
        config: "str | Path | dict[str, Any] | ModelConfig",
        overrides: dict[str, Any] | None = None,
    ) -> "ModelConfig":
        """Reads a config from a `config.json` path, a directory holding one, or a dictionary,
        with some of its keys changed.

        **Arguments:**

        - `config`: a path, an HF config dictionary or a `ModelConfig` (returned as is when
            nothing is overridden).
        - `overrides`: `config.json` keys and their new values, read as transformers reads them
            (e.g. fewer `num_hidden_layers` re-derive Gemma's layer types, a `hidden_size`
            re-derives `head_dim` when `config.json` has none); gradflow's names of the fields
            `config.json` spells otherwise (`CONFIG_JSON_KEYS`: `num_layers`, ...) stand for
            their keys.

        **Returns:**

        The `ModelConfig`.

        **Raises:**

        `OverrideError` for an override key that the config's family does not read from
        `config.json` by either name (listing the keys it reads), one field set under both
        names, or an override that leaves its field as it was (other keys decide it, e.g.
        `rope_parameters` the RoPE base over `rope_theta`); `ValueError` for a config gradflow
        cannot compute exactly.
        """
        if isinstance(config, ModelConfig):
            if not overrides:
                return config
            hf, source = config.to_hf(), "config"
        elif isinstance(config, dict):
            hf, source = config, "config"
        else:
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no model config at {path}: pass a HF model directory")
            hf, source = json.loads(path.read_text()), str(path)
        if not overrides:
            return cls.from_hf(hf, source=source)
        return cls._overridden(hf, overrides, source)

    @classmethod
    def _overridden(
        cls, hf: dict[str, Any], overrides: dict[str, Any], source: str
    ) -> "ModelConfig":
        """`from_hf` of `hf` with `overrides` applied; the keys `from_hf` reads from either
        dictionary (this family's, given these values) are the valid ones."""
        original = _ReadRecorder(hf)
        cls.from_hf(original, source=source)
        keys = {}
        for key in overrides:
            alias = CONFIG_JSON_KEYS.get(key)
            keys[key] = alias if key not in original.read and alias in original.read else key
        targets = list(keys.values())
        for key, target in keys.items():
            if target != key and targets.count(target) > 1:
                raise OverrideError(f"{key} and {target} set the same field; keep one")
        changed = _ReadRecorder({**hf, **{keys[k]: v for k, v in overrides.items()}})
        config, error = None, None
        try:
            config = cls.from_hf(changed, source=f"{source} with the overrides")
        except ValueError as e:
            error = e  # raised once every key is known to be read
        read = original.read | changed.read
        for key, target in keys.items():
            if target not in read:
                close = difflib.get_close_matches(key, [*read, *CONFIG_JSON_KEYS], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                aliases = [f"{a} ({t})" for a, t in CONFIG_JSON_KEYS.items() if t in read]
                raise OverrideError(
                    f"{key!r}{hint} is not a key gradflow reads from this "
                    f"{hf.get('model_type')} config.json ({source}); valid: its keys "
                    f"{', '.join(sorted(read))}, or gradflow's names {', '.join(aliases)}"
                )
        if error is not None:
            raise error
        fields = {f.name for f in dataclasses.fields(cls)}
        named = {t: a for a, t in CONFIG_JSON_KEYS.items()}
        for key, value in overrides.items():
            field = key if key in fields else named.get(keys[key])
            wanted = tuple(value) if isinstance(value, list) else value
            if field is None or isinstance(value, dict) or getattr(config, field) == wanted:
                continue
            raise OverrideError(
                f"{key} = {value!r} does not take: read as transformers reads {source}, it "
                f"leaves {field} = {getattr(config, field)!r} (other keys there decide it, "
                "e.g. rope_parameters the RoPE base: override those)"
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dictionary that `transformers` reads back to the same model.

        **Returns:**

        A JSON-serialisable dictionary.
        """
        family = self.family
        rope = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            **dict(self.rope_scaling),
        }
        hf: dict[str, Any] = {
            "architectures": [family.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation" if family.gemma else "hidden_act": self.hidden_act,
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
        if self.model_type != "qwen2":
            hf["attention_bias"] = False
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        layer_types = list(self.layer_types) or ["full_attention"] * self.num_layers
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            hf["layer_types"] = layer_types
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if family.gemma:
            local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
            hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
            hf["rope_local_base_freq"] = local["rope_theta"]
            hf["sliding_window"] = self.sliding_window
            hf["layer_types"] = layer_types
            hf["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
            hf["final_logit_softcapping"] = self.final_logit_softcapping
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
        if self.family.qk_norm:
            attn += 2 * hd
        norms = (4 if self.family.gemma else 2) * d
        layer = attn + 3 * d * i + norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head


def _float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def _rope(
    rope: dict[str, Any], hf: dict[str, Any], default_theta: float, source: str
) -> tuple[float, str, tuple[tuple[str, float | int], ...]]:
    """`(rope_theta, rope_type, scaling)` of one RoPE parameter dictionary, as transformers
    reads it: the dictionary's own `rope_theta` before the top-level one."""
    rope = dict(rope)
    rope_theta = float(rope.pop("rope_theta", None) or default_theta)
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
    return rope_theta, rope_type, tuple(sorted((name, rope[name]) for name in needed))


def _gemma_rope(hf: dict[str, Any], get, source: str):
    """Gemma 3's two RoPEs: `full_attention` (any supported type) and `sliding_attention`
    (default type, base `rope_local_base_freq`), from `rope_parameters` keyed by layer type or
    from the older top-level `rope_theta` / `rope_local_base_freq` / `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", get("rope_theta"))
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", get("rope_local_base_freq"))
    rope_theta, rope_type, scaling = _rope(full, hf, get("rope_theta"), source)
    local_theta, local_type, _ = _rope(local, hf, get("rope_local_base_freq"), source)
    if local_type != "default":
        raise ValueError(
            f"{source}: rope_parameters.sliding_attention of type {local_type!r} is not "
            "supported (only 'default')"
        )
    return rope_theta, rope_type, scaling, local_theta


def _attention_layers(
    hf: dict[str, Any], model_type: str, get, source: str
) -> tuple[int | None, tuple[str, ...]]:
    """`(sliding_window, layer_types)` as transformers builds each family's attention masks."""
    layers = hf["num_hidden_layers"]
    if model_type == "llama":
        return None, ()
    if model_type == "mistral":
        if "layer_types" in hf:
            raise ValueError(
                f"{source}: layer_types is not read by transformers' MistralForCausalLM (it "
                "gives every layer sliding_window); remove it"
            )
        window = get("sliding_window")
        return window, ("sliding_attention",) * layers if window is not None else ()
    if model_type == "gemma3_text":
        window = get("sliding_window")
        pattern = get("sliding_window_pattern")
        default = tuple(
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        )
    else:  # qwen2, qwen3: sliding layers from `max_window_layers` on, with `use_sliding_window`
        window = get("sliding_window") if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", 28)
        default = tuple(
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(layers)
        )
    layer_types = tuple(hf.get("layer_types") or default)
    if "sliding_attention" in layer_types and window is None:
        raise ValueError(
            f"{source}: layer_types has sliding_attention layers but sliding_window is unset "
            "(use_sliding_window=false)"
        )
    if "sliding_attention" not in layer_types:
        return None, ()
    return window, layer_types
