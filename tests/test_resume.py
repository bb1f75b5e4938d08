"""Runs killed with SIGKILL (mid-step, mid-checkpoint-write) and resumed in a fresh process end
exactly like an uninterrupted run with the same seed; a finished run resumes to a no-op.

Every run is `pipelines/run.py` in its own process (`child_run.py` adds the kill points): one
run goes uninterrupted; another is killed mid-step, resumed, killed mid-checkpoint-write, and
resumed to the end.
"""

import json
import os
import signal

import numpy as np
from child_run import child_env, read_metrics, run_child, tiny_config, wait_for
from safetensors.numpy import load_file

from gradflow.checkpoint import list_checkpoints, read_manifest

TIMEOUT = 300
FINAL_STATE = "checkpoints/step_00000003/state.safetensors"


def _finish(child) -> str:
    out, _ = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 0, out
    return out


def _same_tensors(a_file, b_file) -> None:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "unused")  # 3 steps, a checkpoint every step
    cache = tmp_path / "jax_cache"
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"

    def start(run_dir, resume=False, **hooks):
        overrides = [f"run.output_dir={run_dir}", f"run.resume={str(resume).lower()}"]
        env = child_env(cache=cache, CHILD_REWARD="digits", **hooks)
        return run_child(config, *overrides, env=env)

    def killed_at(child, marker) -> None:
        try:
            wait_for(child, marker, TIMEOUT)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=TIMEOUT)
            child.stdout.close()

    # The uninterrupted run, and beside it a run killed while its second step is in flight.
    whole = start(whole_dir)
    try:
        killed_at(start(killed_dir, CHILD_PAUSE_STEP="1"), "MARKER step")
        _finish(whole)
    finally:
        whole.kill()
    reference = read_metrics(whole_dir)
    assert [r["step"] for r in reference] == [0, 1, 2, 3, 3]
    assert reference[1]["reward/digits"] > 0 and reference[2]["grad_norm"] > 0
    # Determinism: a fresh process with the same seed wrote the same records before its kill.
    assert read_metrics(killed_dir) == reference[:2]

    # Resumed in a fresh process, killed again while it writes the checkpoint of step 2 (after
    # the arrays, before the rename); beside it, resuming the finished run is a no-op.
    again = start(whole_dir, resume=True)
    try:
        killed_at(start(killed_dir, resume=True, CHILD_PAUSE_SAVE="2"), "MARKER save")
        assert "already finished 3 of 3 steps" in _finish(again)
    finally:
        again.kill()
    assert read_metrics(whole_dir) == reference  # the no-op resume kept the records
    assert read_metrics(killed_dir) == reference[:3]
    checkpoints = killed_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000001"]
    assert read_manifest(checkpoints / "step_00000001")["step"] == 1
    assert load_file(str(checkpoints / "step_00000001" / "state.safetensors"))
    assert [p.name.startswith(".tmp-step_00000002") for p in checkpoints.glob(".tmp-*")] == [True]

    # The last resume finishes exactly like the uninterrupted run.
    last = start(killed_dir, resume=True)
    try:
        assert "resuming from" in _finish(last)
    finally:
        last.kill()
    assert read_metrics(killed_dir) == reference
    _same_tensors(whole_dir / "hf/model.safetensors", killed_dir / "hf/model.safetensors")
    _same_tensors(whole_dir / FINAL_STATE, killed_dir / FINAL_STATE)
    assert not list(checkpoints.glob(".tmp-*"))
    samples = [json.loads(line) for line in (killed_dir / "samples.jsonl").open()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4 + [3] * 4
