"""Files shipped with the package (the GSM8K data set, the Qwen2 tokenizer, the toy model), and
config paths that name them as `gradflow:NAME`."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def asset_path(*parts: str) -> Path:
    """Path of a shipped asset, checked to exist.

    **Arguments:**

    - `parts`: path components below the assets directory, e.g. `("gsm8k", "train.jsonl")`.

    **Returns:**

    The absolute path of the asset.

    **Raises:**

    `FileNotFoundError` naming the path when the asset does not exist.
    """
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"no shipped asset at {path}")
    return path


ASSET_PREFIX = "gradflow:"


def resolve_path(path: str) -> Path:
    """A config path: `gradflow:NAME` is a shipped asset, anything else is relative to the cwd.

    **Arguments:**

    - `path`: the path as written in the config.

    **Returns:**

    The path.
    """
    if path.startswith(ASSET_PREFIX):
        return ASSETS / path[len(ASSET_PREFIX) :]
    return Path(path)
