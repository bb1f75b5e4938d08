"""Hugging Face checkpoint I/O: `config.json` + safetensors (single file or sharded), no torch.

The model is first built shape-only (`eqx.filter_eval_shape`), then every array is filled from the
checkpoint, checked against the expected shape and cast to the requested dtype.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray
from safetensors import safe_open
from safetensors.numpy import save_file

from ..files import write_replacing
from .config import ModelConfig
from .decoder import Decoder

LAYER_TENSORS = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
# Gemma's `post_attention_layernorm` norms the attention output; its MLP has a norm on each side.
GEMMA_LAYER_TENSORS = {
    **LAYER_TENSORS,
    "attention_out_norm": "post_attention_layernorm.weight",
    "post_norm": "pre_feedforward_layernorm.weight",
    "mlp_out_norm": "post_feedforward_layernorm.weight",
}
TOP_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
MAX_SHARD_BYTES = 4 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


def init_from_config(
    config: "str | Path | dict[str, Any] | ModelConfig",
    *,
    key: PRNGKeyArray,
    dtype=jnp.float32,
) -> Decoder:
    """A model with random weights and the shapes of an HF `config.json`.

    **Arguments:**

    - `config`: a `config.json` path, a directory holding one, a dictionary or a `ModelConfig`.
    - `key`: PRNG key.
    - `dtype`: parameter and compute dtype.

    **Returns:**

    The `Decoder`.
    """
    return Decoder.init(ModelConfig.load(config), key=key, dtype=dtype)


class _Reader:
    """Finds each tensor name in a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        self.used: set[str] = set()
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors in {directory}: pass a HF model directory with weights"
                )
            self.files = {}
            for file in files:
                with safe_open(file, framework="numpy") as f:
                    self.files.update({name: file for name in f.keys()})  # noqa: SIM118

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
        if name not in self.files:
            files = sorted({str(p) for p in self.files.values()})
            raise CheckpointError(f"tensor {name!r} is missing from {', '.join(files)}")
        file = self.files[name]
        self.used.add(name)
        with safe_open(file, framework="flax") as f:
            array = f.get_tensor(name)
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        return jnp.asarray(array, dtype=dtype)


def layer_tensors(config: ModelConfig) -> dict[str, str]:
    """`DecoderLayer` field → HF tensor name (after `model.layers.<i>.`) for the config's family.

    **Arguments:**

    - `config`: the model config.

    **Returns:**

    The mapping (fields the family does not have are `None` in the model and skipped).
    """
    return GEMMA_LAYER_TENSORS if config.family.gemma else LAYER_TENSORS


def load_hf(path: "str | Path", *, dtype=jnp.float32, compute_dtype=None) -> Decoder:
    """Loads a model from a local HF directory (`config.json` + `*.safetensors`) of any family
    `ModelConfig` reads.

    **Arguments:**

    - `path`: the model directory.
    - `dtype`: parameter dtype.
    - `compute_dtype`: activation dtype (default: `dtype`).

    **Returns:**

    The `Decoder`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist: pass a local HF model directory "
            "(config.json + *.safetensors)"
        )
    config = ModelConfig.load(directory)
    reader = _Reader(directory)
    skeleton = eqx.filter_eval_shape(Decoder.init, config, key=jax.random.key(0), dtype=dtype)
    names = layer_tensors(config)

    def fill_layer(field: str, spec: jax.ShapeDtypeStruct | None):
        if spec is None:
            return None
        per_layer = spec.shape[1:]
        return jnp.stack(
            [
                reader.read(f"model.layers.{i}.{names[field]}", per_layer, dtype)
                for i in range(config.num_layers)
            ]
        )

    layers = type(skeleton.layers)(
        **{
            field.name: fill_layer(field.name, getattr(skeleton.layers, field.name))
            for field in dataclasses.fields(skeleton.layers)
        }
    )
    vocab_hidden = (config.vocab_size, config.hidden_size)
    head = None
    if not config.tie_word_embeddings:
        head = reader.read(TOP_TENSORS["lm_head"], vocab_hidden, dtype)
    model = Decoder(
        embed=reader.read(TOP_TENSORS["embed"], vocab_hidden, dtype),
        layers=layers,
        final_norm=reader.read(TOP_TENSORS["final_norm"], (config.hidden_size,), dtype),
        lm_head=head,
        config=config,
        compute_dtype=jnp.dtype(compute_dtype or dtype).name,
    )
    # Weights left unread would silently change what the model computes. Rotary buffers are
    # recomputed, and a tied model's saved head copy is not used (as in transformers).
    unused = sorted(
        name
        for name in set(reader.files) - reader.used
        if not name.endswith("rotary_emb.inv_freq")
        and not (config.tie_word_embeddings and name == TOP_TENSORS["lm_head"])
    )
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise CheckpointError(
            f"{directory}: tensors a {config.model_type} model of this config.json does not "
            f"have: {', '.join(unused[:3])}{more}"
        )
    return model


def hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """The model's weights under their HF names, as numpy arrays in the parameter dtype (LoRA
    adapters merged in).

    **Arguments:**

    - `model`: the decoder.

    **Returns:**

    A name → array dictionary.
    """
    model = model.merge_adapters()
    tensors: dict[str, np.ndarray] = {}
    for field, name in layer_tensors(model.config).items():
        stacked = getattr(model.layers, field)
        if stacked is None:
            continue
        host = np.asarray(jax.device_get(stacked))
        for i in range(model.config.num_layers):
            tensors[f"model.layers.{i}.{name}"] = np.ascontiguousarray(host[i])
    tensors[TOP_TENSORS["embed"]] = np.asarray(jax.device_get(model.embed))
    tensors[TOP_TENSORS["final_norm"]] = np.asarray(jax.device_get(model.final_norm))
    if model.lm_head is not None:
        tensors[TOP_TENSORS["lm_head"]] = np.asarray(jax.device_get(model.lm_head))
    return tensors


def save_hf(model: Decoder, path: "str | Path", *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes `config.json` and safetensors that `transformers.AutoModelForCausalLM` loads (a
    model with LoRA adapters is written with them merged).

    Checkpoints over `max_shard_bytes` are sharded with a `model.safetensors.index.json`. Each
    file is written beside its final name and renamed into place; weight files of an earlier save
    into the same directory are removed.

    **Arguments:**

    - `model`: the decoder.
    - `path`: the output directory (created if needed).
    - `max_shard_bytes`: the largest shard.

    **Returns:**

    Nothing.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    config_text = json.dumps(hf_config, indent=2) + "\n"
    write_replacing(directory / "config.json", lambda tmp: tmp.write_text(config_text))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        files = {"model.safetensors": shards[0]}
    else:
        files = {
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard
            for i, shard in enumerate(shards)
        }
    for file, shard in files.items():
        write_replacing(directory / file, lambda tmp, shard=shard: _save_shard(shard, tmp))
    index_path = directory / "model.safetensors.index.json"
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": {name: file for file, shard in files.items() for name in shard},
        }
        text = json.dumps(index, indent=2) + "\n"
        write_replacing(index_path, lambda tmp: tmp.write_text(text))
    else:
        index_path.unlink(missing_ok=True)
    # Weights of an earlier save into this directory would be read instead of (or with) these.
    for stale in directory.glob("model*.safetensors"):
        if stale.name not in files:
            stale.unlink()


def _save_shard(shard: dict[str, np.ndarray], path: Path) -> None:
    save_file(shard, str(path), metadata={"format": "pt"})
