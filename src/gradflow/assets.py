"""Files shipped with the package: the GSM8K data set and the Qwen2 tokenizer."""

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
