"""PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`, HF module names
(`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`), no torch.

`lora_policy` gives a model its adapters, fresh or read from such a directory (checked tensor by
tensor against the base's shapes); `save_peft` writes them so that
`peft.PeftModel.from_pretrained(base, directory)` computes what gradflow computes.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray
from safetensors import safe_open
from safetensors.numpy import save_file

from ..files import write_replacing
from .decoder import Decoder
from .hf_io import CheckpointError, layer_tensors
from .lora import (
    ADAPTER_DTYPE,
    TARGETS,
    LoraAdapters,
    LoraPair,
    projection_shapes,
    resolve_targets,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
_KEY = re.compile(rf"^{re.escape(PREFIX)}\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config.json fields whose non-default values change what PEFT computes, and gradflow
# does not compute: refused by name.
UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "trainable_token_indices": None,
}


def _module(target: str, model: Decoder) -> str:
    """The HF module path of projection `target` inside a layer (`self_attn.q_proj`)."""
    return layer_tensors(model.config)[target].removesuffix(".weight")


def tensor_name(model: Decoder, layer: int, target: str, matrix: str) -> str:
    """PEFT's name of one adapter matrix.

    **Arguments:**

    - `model`: the model (its family's module names).
    - `layer`: the layer index.
    - `target`: the projection (`q_proj` …).
    - `matrix`: `"A"` or `"B"`.

    **Returns:**

    The tensor name in `adapter_model.safetensors`.
    """
    return f"{PREFIX}.{layer}.{_module(target, model)}.lora_{matrix}.weight"


def lora_policy(
    model: Decoder,
    *,
    rank: int,
    alpha: "float | int",
    targets: "str | list[str]",
    dropout: float = 0.0,
    adapter: "str | Path | None" = None,
    key: PRNGKeyArray,
) -> Decoder:
    """`model` with LoRA adapters: fresh ones, or a PEFT adapter directory's, which must have the
    same rank, alpha and targets.

    **Arguments:**

    - `model`: the base model (without adapters).
    - `rank`, `alpha`, `targets`, `dropout`: `[model.lora]` (the dropout is a training setting:
      an adapter's own `lora_dropout` is not read).
    - `adapter`: a PEFT adapter directory to start from (`None`: fresh adapters).
    - `key`: PRNG key of fresh adapters.

    **Returns:**

    The `Decoder` with adapters.
    """
    if rank <= 0:
        raise ValueError(f"model.lora.rank must be >= 1, got {rank}")
    names = resolve_targets(targets)
    if adapter is None:
        return model.with_lora(rank, alpha, names, dropout=dropout, key=key)
    loaded = load_peft(model, adapter, dropout=dropout)
    found = {"rank": loaded.lora.rank, "alpha": loaded.lora.alpha, "targets": loaded.lora.targets}
    wanted = {"rank": rank, "alpha": float(alpha), "targets": names}
    for field, value in wanted.items():
        if found[field] != value:
            shown = list(found[field]) if field == "targets" else found[field]
            raise ValueError(
                f"model.lora.{field} = {list(value) if field == 'targets' else value!r} but the "
                f"adapter in {adapter} has {shown!r}: set model.lora.{field} = {shown!r}"
            )
    return loaded


def load_peft(model: Decoder, path: "str | Path", *, dropout: float = 0.0) -> Decoder:
    """Reads a PEFT LoRA adapter directory onto `model`.

    **Arguments:**

    - `model`: the base model the adapter was trained on (without adapters).
    - `path`: the directory (`adapter_config.json` + `adapter_model.safetensors`).
    - `dropout`: the dropout rate to train the adapters with.

    **Returns:**

    The `Decoder` with the adapter (float32, whatever the file's or the base's dtype).
    """
    directory = Path(path)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"model.lora.adapter: {file} does not exist; pass a PEFT LoRA adapter directory "
                f"({CONFIG_FILE} + {WEIGHTS_FILE})"
            )
    settings = json.loads(config_file.read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {settings['peft_type']!r} is not LORA")
    for field, default in UNSUPPORTED.items():
        if settings.get(field, default) not in (default, None, {}, [], False):
            raise CheckpointError(
                f"{config_file}: {field} = {settings[field]!r} is not supported (gradflow "
                f"computes plain LoRA: {field} = {default!r})"
            )
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    config = model.config
    modules = {_module(t, model): t for t in TARGETS}
    with safe_open(weights_file, framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    found: dict[str, dict[tuple[int, str], np.ndarray]] = {}
    for name, array in tensors.items():
        match = _KEY.match(name)
        module = match and f"{match[2]}.{match[3]}"
        if not match or module not in modules or int(match[1]) >= config.num_layers:
            raise CheckpointError(
                f"{weights_file}: tensor {name!r} is not a LoRA matrix of a "
                f"{config.model_type} model with {config.num_layers} layers (modules: "
                f"{', '.join(modules)})"
            )
        found.setdefault(modules[module], {})[(int(match[1]), match[4])] = array
    shapes = projection_shapes(config)

    def pair(target):
        if target not in found:
            return None
        out, fan_in = shapes[target]
        stacked = {}
        for matrix, shape in (("A", (rank, fan_in)), ("B", (out, rank))):
            layers = []
            for i in range(config.num_layers):
                name = tensor_name(model, i, target, matrix)
                if (i, matrix) not in found[target]:
                    raise CheckpointError(f"{weights_file}: tensor {name!r} is missing")
                array = found[target][(i, matrix)]
                if tuple(array.shape) != shape:
                    raise CheckpointError(
                        f"{weights_file}: tensor {name!r} has shape {tuple(array.shape)}, "
                        f"expected {shape} (an adapter of another base model?)"
                    )
                layers.append(array)
            stacked[matrix] = jnp.asarray(np.stack(layers), ADAPTER_DTYPE)
        return LoraPair(a=stacked["A"], b=stacked["B"])

    adapters = LoraAdapters(
        **{t: pair(t) for t in TARGETS}, rank=rank, alpha=alpha, dropout=dropout
    )
    return model.replace_adapters(adapters)


def save_peft(model: Decoder, path: "str | Path", *, base_model: str = "") -> None:
    """Writes `model`'s adapters as a PEFT LoRA adapter directory.

    **Arguments:**

    - `model`: a `Decoder` with adapters (host or device arrays, one process's view).
    - `path`: the output directory (created if needed).
    - `base_model`: `base_model_name_or_path` in the config (the base's directory or hub name).

    **Returns:**

    Nothing.
    """
    lora = model.lora
    if lora is None:
        raise ValueError("save_peft: the model has no LoRA adapters")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target in lora.targets:
        pair = getattr(lora, target)
        for matrix, stacked in (("A", pair.a), ("B", pair.b)):
            host = np.asarray(jax.device_get(stacked))
            for i in range(model.config.num_layers):
                tensors[tensor_name(model, i, target, matrix)] = np.ascontiguousarray(host[i])
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    text = json.dumps(settings, indent=2) + "\n"
    write_replacing(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    write_replacing(
        directory / WEIGHTS_FILE,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
    )
