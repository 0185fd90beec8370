"""Interrupts as they really happen: a real SIGINT (Ctrl-C) or SIGKILL sent to the training script running in
its own process, then RESUME_FROM. The resumed run's final `_exact` line must equal an uninterrupted run's,
wherever the signal landed (inside a step, a periodic evaluation, a checkpoint write)."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_env

# QAT switches on at step 21, EMA on, checkpoints every 4 steps, a periodic evaluation every 6
OVER = dict(ITERATIONS=30, WARMDOWN_ITERS=8, VAL_MAX_TOKENS=8192, EMA_DECAY=0.9, GRAD_CLIP_NORM=1.0,
            QAT_START_FRAC=0.7, MUON_WEIGHT_DECAY=0.01, CHECKPOINT_EVERY=4, VAL_LOSS_EVERY=6)


def _env(data, tmp_path, **over):
    return {**os.environ, **tiny_env(data, tmp_path, **{**OVER, **over})}


def _exact(text):
    found = re.findall(r"^final_int6_zstd_roundtrip_exact .*$", text, re.M)
    assert len(found) == 1, text[-3000:]
    return found[0]


def _start(env):
    return subprocess.Popen([sys.executable, str(ROOT / "train_gpt_mlx.py")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until(env, needle: str, sig: int, delay: float):
    """Start a run, send `sig` `delay` seconds after the first output line starting with `needle`;
    return (exit code, whole output)."""
    p = _start(env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(needle):
            time.sleep(delay)
            p.send_signal(sig)
            break
    lines += p.stdout.readlines()
    return p.wait(timeout=120), "".join(lines)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt_mlx.py")], env=_env(data, tmp, RUN_ID="full"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return _exact(out.stdout)


# where the signal lands: right after a step's line (inside the next step or the checkpoint write that
# follows step 8), while the periodic evaluation at step 12 runs, or at a random moment (delay None)
CASES = [("step:8/30 train_loss", 0.0), ("step:12/30 train_loss", 0.02), ("step:3/30 train_loss", 0.0),
         ("step:17/30 train_loss", None)]


@pytest.mark.parametrize("needle,delay", CASES)
def test_real_ctrl_c_then_resume_equals_an_uninterrupted_run(data, tmp_path, uninterrupted, needle, delay):
    delay = random.uniform(0.0, 0.3) if delay is None else delay
    code, out = _run_until(_env(data, tmp_path, RUN_ID="cut"), needle, signal.SIGINT, delay)
    assert code == 130, out[-3000:]  # interrupted: not a success, though the artifact is written
    assert "Traceback" not in out and (tmp_path / "cut_model.int6.ptz").exists()
    step = int(re.search(r"^interrupted \(Ctrl-C\) at step (\d+)", out, re.M)[1])
    assert re.search(rf"^checkpoint: step:{step} ", out, re.M)
    resumed = subprocess.run([sys.executable, str(ROOT / "train_gpt_mlx.py")], capture_output=True, text=True,
                             env=_env(data, tmp_path, RUN_ID="resumed", RESUME_FROM=str(tmp_path / "cut_ckpt.pgck")),
                             cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"step:{step} " in resumed.stdout and "resumed from" in resumed.stdout
    assert _exact(resumed.stdout) == uninterrupted


def test_kill_9_then_resume_from_the_last_periodic_checkpoint(data, tmp_path, uninterrupted):
    code, out = _run_until(_env(data, tmp_path, RUN_ID="cut"), "step:14/30 train_loss", signal.SIGKILL, 0.05)
    assert code == -signal.SIGKILL
    assert "checkpoint: step:12 " in out and not list(Path(tmp_path).glob("*.tmp*"))
    resumed = subprocess.run([sys.executable, str(ROOT / "train_gpt_mlx.py")], capture_output=True, text=True,
                             env=_env(data, tmp_path, RUN_ID="resumed", RESUME_FROM=str(tmp_path / "cut_ckpt.pgck")),
                             cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _exact(resumed.stdout) == uninterrupted


def test_a_second_ctrl_c_aborts_at_once(data, tmp_path):
    p = _start(_env(data, tmp_path, RUN_ID="cut", ITERATIONS=2000, CHECKPOINT_EVERY=0))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step:5/"):
            p.send_signal(signal.SIGINT)
        if line.startswith("interrupted (Ctrl-C) at step"):
            p.send_signal(signal.SIGINT)
            break
    lines += p.stdout.readlines()
    out = "".join(lines)
    assert p.wait(timeout=120) == 130 and "Traceback" not in out
    assert "interrupted (Ctrl-C) during" in out


def test_sigterm_stops_like_ctrl_c_and_resume_equals_an_uninterrupted_run(data, tmp_path, uninterrupted):
    """SIGTERM (schedulers, `timeout`): stop at the step boundary, checkpoint, write the artifact, exit 143."""
    code, out = _run_until(_env(data, tmp_path, RUN_ID="cut"), "step:8/30 train_loss", signal.SIGTERM, 0.0)
    assert code == 143, out[-3000:]
    assert "Traceback" not in out and (tmp_path / "cut_model.int6.ptz").exists() and _exact(out)
    step = int(re.search(r"^interrupted \(SIGTERM\) at step (\d+): saving a checkpoint", out, re.M)[1])
    assert re.search(rf"^checkpoint: step:{step} ", out, re.M) and re.search(r"^exit 143: interrupted \(SIGTERM\)",
                                                                            out, re.M)
    resumed = subprocess.run([sys.executable, str(ROOT / "train_gpt_mlx.py")], capture_output=True, text=True,
                             env=_env(data, tmp_path, RUN_ID="resumed", RESUME_FROM=str(tmp_path / "cut_ckpt.pgck")),
                             cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _exact(resumed.stdout) == uninterrupted


@pytest.mark.parametrize("first,second", [("step:5/", "interrupted (SIGTERM) at step"),  # a second SIGTERM
                                          (None, "writing artifact")])  # after training: the first aborts
def test_sigterm_that_aborts_says_what_was_written(data, tmp_path, first, second):
    p = _start(_env(data, tmp_path, RUN_ID="cut", ITERATIONS=2000 if first else 30, CHECKPOINT_EVERY=0))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if first and line.startswith(first):
            p.send_signal(signal.SIGTERM)
        if line.startswith(second):
            p.send_signal(signal.SIGTERM)
            break
    lines += p.stdout.readlines()
    out = "".join(lines)
    assert p.wait(timeout=120) == 143 and "Traceback" not in out, out[-3000:]
    assert re.search(r"^interrupted \(SIGTERM\) during (training|writing the artifact|the round-trip evaluation); ",
                     out, re.M), out[-3000:]


# the same, in-process and deterministic: a real SIGINT arrives inside each place outside the step (item 2)
@pytest.mark.parametrize("name,calls", [("evaluate", 1), ("write_checkpoint", 1), ("ranks_max", 9), ("log_step", 5)])
def test_ctrl_c_outside_the_step_checkpoints_exactly_and_resumes(data, tmp_path, monkeypatch, uninterrupted,
                                                                  name, calls):
    import train_gpt_mlx as T
    from conftest import ctrl_c_after
    ctrl_c_after(monkeypatch, T, calls, name)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="cut", **OVER)) == 130
    monkeypatch.undo()
    log = (tmp_path / "cut.txt").read_text()
    step = int(re.search(r"^interrupted \(Ctrl-C\) at step (\d+)", log, re.M)[1])
    assert re.search(rf"^checkpoint: step:{step} ", log, re.M) and _exact(log)
    env = tiny_env(data, tmp_path, RUN_ID="resumed", RESUME_FROM=str(tmp_path / "cut_ckpt.pgck"), **OVER)
    assert T.main(env) == 0
    assert _exact((tmp_path / "resumed.txt").read_text()) == uninterrupted


def test_a_checkpoint_at_the_capped_step_resumes_without_another_step(data, tmp_path):
    """The wall-clock cap is reached at step 1, which is checkpointed (CHECKPOINT_EVERY=1): the stop is part of the
    saved state, so the resumed run trains no step 2 (EMA and Adam would move) and ends like the capped run."""
    import train_gpt_mlx as T
    over = dict(ITERATIONS=20, MAX_WALLCLOCK_SECONDS=0.001, CHECKPOINT_EVERY=1, EMA_DECAY=0.9, VAL_MAX_TOKENS=2048)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="capped", **over)) == 0
    capped = (tmp_path / "capped.txt").read_text()
    assert "stopping_early: wallclock_cap" in capped and re.search(r"^checkpoint: step:1 ", capped, re.M)
    assert "step:2/" not in capped
    env = tiny_env(data, tmp_path, RUN_ID="resumed", RESUME_FROM=tmp_path / "capped_ckpt.pgck", **over)
    assert T.main(env) == 0
    resumed = (tmp_path / "resumed.txt").read_text()
    assert "resumed from" in resumed and "step:2/" not in resumed
    assert _exact(resumed) == _exact(capped)
