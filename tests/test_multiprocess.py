"""Two processes (`jax.distributed` over loopback, gloo collectives) train like one.

The two processes hold two CPU devices each and split the parameters over them
(`mesh.fsdp = 2`, `mesh.tensor = 2`), so every array spans both processes: the prompts are built
on each process and assembled into global arrays, the host reward runs once on the whole batch,
and checkpoints and the HF export gather the arrays on process 0, which alone writes.
"""

import socket

import numpy as np
from child_run import child_env, read_metrics, run_child, tiny_config
from safetensors.numpy import load_file

TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, what: str) -> None:
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=what)


def test_two_processes_match_one(tmp_path):
    config = tiny_config(
        tmp_path, tmp_path / "unused", train={"steps": 2}, algorithm={"kl_coef": 0.0}
    )
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    cache = tmp_path / "jax_cache"
    single = run_child(
        config,
        f"run.output_dir={single_dir}",
        env=child_env(devices=1, cache=cache, CHILD_REWARD="digits"),
    )
    port = _free_port()
    workers = []
    for process in range(2):
        env = child_env(
            devices=2,
            CHILD_REWARD="digits",
            GRADFLOW_COORDINATOR=f"127.0.0.1:{port}",
            GRADFLOW_NUM_PROCESSES="2",
            GRADFLOW_PROCESS_ID=str(process),
        )
        overrides = [f"run.output_dir={multi_dir}", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]
        workers.append(run_child(config, *overrides, env=env))
    outputs = []
    try:
        for child in (single, *workers):
            out, _ = child.communicate(timeout=TIMEOUT)
            outputs.append(out)
            assert child.returncode == 0, out
    finally:
        for child in (single, *workers):
            child.kill()
    assert "done:" in outputs[1] and "done:" not in outputs[2]  # process 0 reports

    single_metrics, multi_metrics = read_metrics(single_dir), read_metrics(multi_dir)
    assert [r["step"] for r in multi_metrics] == [r["step"] for r in single_metrics]
    assert len(single_metrics) == 4  # eval 0, step 1, step 2, eval 2
    for a, b in zip(single_metrics, multi_metrics, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key], f"step {a['step']} {key}")

    for name in ("hf/model.safetensors", "checkpoints/step_00000002/state.safetensors"):
        a, b = load_file(str(single_dir / name)), load_file(str(multi_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key].astype(np.float64), b[key].astype(np.float64), f"{name} {key}")
    start = load_file(str(single_dir / "checkpoints/step_00000001/state.safetensors"))
    moved = max(np.abs(start[k] - a[k]).max() for k in a if k.startswith(".policy."))
    assert moved > 1e-4  # the second step changed the parameters
