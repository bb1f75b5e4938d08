"""`pipelines/eval.py` as a user runs it: where the completions go, and that it says so."""

import json
import sys
from pathlib import Path

import jax
import pytest
from child_run import MODEL_OVERRIDES, ROOT, tiny_config

from gradflow.assets import resolve_path
from gradflow.models import ModelConfig, init_from_config, save_hf
from gradflow.tasks import save_tokenizer

sys.path.insert(0, str(ROOT / "pipelines"))
from eval import main  # noqa: E402


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory the user runs from: nothing may be written there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_config_writes_its_completions_into_its_output_dir(capsys, tmp_path, elsewhere):
    config = tiny_config(tmp_path, tmp_path / "out", "tiny")
    assert main([str(config)]) == 0
    written = tmp_path / "out" / "eval" / "test_tiny.jsonl"
    assert len(_records(written)) == 4
    assert f"completions: {written}" in capsys.readouterr().out
    assert not list(elsewhere.iterdir())
    # Without run.output_dir: the directory runs/CONFIG, where runs go.
    assert main([str(config), 'run.output_dir=""', "--size", "2"]) == 0
    written = Path("runs") / "tiny" / "eval" / "test_tiny.jsonl"
    assert len(_records(elsewhere / written)) == 2
    assert f"completions: {written}" in capsys.readouterr().out
    assert [p.name for p in elsewhere.iterdir()] == ["runs"]


def test_a_run_directory_gets_its_completions_beside_the_run(capsys, tmp_path, elsewhere):
    """A finished run (its resolved config and exported policy): completions in <run>/eval/."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, run, "tiny")
    (run / "hf").mkdir(parents=True)
    (run / "config.toml").write_text(config.read_text())
    shape = ModelConfig.load(resolve_path("gradflow:qwen2/qwen2-1.5b-instruct.config.json"))
    save_hf(init_from_config(shape.replace(**MODEL_OVERRIDES), key=jax.random.key(0)), run / "hf")
    save_tokenizer(run / "hf")
    assert main([str(run), "--split", "train", "--size", "2"]) == 0
    written = run / "eval" / "train_hf.jsonl"
    assert len(_records(written)) == 2
    assert f"completions: {written}" in capsys.readouterr().out
    assert not list(elsewhere.iterdir())
