"""The user's path (issue 16): a smoke test that trains at its peak LR, a recipe at any depth."""
import glob
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import ROOT, tiny_env

TINY_WIDTH = dict(MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2")


def public_lr_mul(step: int, iterations: int, warmdown_iters: int) -> float:
    """The public baseline's schedule without a wall-clock cap, written out from its formula."""
    if warmdown_iters <= 0:
        return 1.0
    warmdown_start = max(iterations - warmdown_iters, 0)
    if warmdown_start <= step < iterations:
        return max((iterations - step) / max(warmdown_iters, 1), 0.0)
    return 1.0


def test_smoke_test_starts_at_its_peak_lr():
    hp = T.Hyperparameters.from_env(dict(ITERATIONS="100"))  # the smoke test: default warmdown, 600 s cap
    assert T.lr_multiplier(0, 0.0, hp) == 1.0
    assert T.lr_multiplier(1, 100.0, hp) == 1.0  # 100 ms/step
    assert T.lr_multiplier(50, 5_000.0, hp) == 1.0  # the warmdown is the last half
    assert T.lr_multiplier(75, 7_500.0, hp) == pytest.approx(0.5)
    assert T.lr_multiplier(100, 10_000.0, hp) == 0.0
    assert "shortened to the last half" in T.describe_warmdown(hp)


@pytest.mark.parametrize("iterations, warmdown", [(20000, 1200), (2400, 1200), (100, 50), (7, 3), (10, 0)])
def test_schedule_is_the_public_baselines_when_the_run_is_twice_the_warmdown(iterations, warmdown):
    hp = T.Hyperparameters.from_env(dict(ITERATIONS=str(iterations), WARMDOWN_ITERS=str(warmdown),
                                         MAX_WALLCLOCK_SECONDS="0"))
    steps = set(np.linspace(0, iterations - 1, 200).astype(int)) | {iterations - warmdown, iterations - 1}
    for step in sorted(steps):  # the steps a run takes: 0 .. ITERATIONS-1
        assert T.lr_multiplier(step, 0.0, hp) == public_lr_mul(step, iterations, warmdown), step
    assert "shortened" not in T.describe_warmdown(hp)


def test_time_capped_schedule_is_the_public_baselines_while_time_ends_the_run():
    """The public formula under a cap: linear over the warmdown's estimated time (here 100 ms/step)."""
    hp = T.Hyperparameters.from_env(dict(ITERATIONS="100000", WARMDOWN_ITERS="1200", MAX_WALLCLOCK_SECONDS="600"))
    for step in (1, 2000, 4800, 5000, 5400, 5999):
        elapsed = step * 100.0
        remaining, warmdown_ms = 600_000 - elapsed, 1200 * 100.0
        public = remaining / warmdown_ms if remaining <= warmdown_ms else 1.0
        assert T.lr_multiplier(step, elapsed, hp) == pytest.approx(public, rel=1e-12)


def _final_bpb(log: str) -> float:
    return float(re.search(r"^final_int6_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log, re.M)[1])


def test_short_run_with_the_default_schedule_trains_like_a_sane_one(data, tmp_path):
    """60 steps and nothing about the warmdown set: as good as WARMDOWN_FRAC=0.5 (the old default decayed the
    LR from 5% of its peak and scored ~0.4 bpb worse at this size)."""
    bpb = {}
    for rid, over in (("default", {}), ("frac", dict(WARMDOWN_FRAC="0.5"))):
        env = tiny_env(data, tmp_path, RUN_ID=rid, ITERATIONS="60", VAL_MAX_TOKENS="2048", **over)
        del env["WARMDOWN_ITERS"]
        assert T.main(env) == 0
        log = (tmp_path / f"{rid}.txt").read_text()
        bpb[rid] = _final_bpb(log)
    assert re.search(r"^warmdown: last 30 steps \(WARMDOWN_ITERS=1200 is more than half of ITERATIONS=60",
                     (tmp_path / "default.txt").read_text(), re.M)
    assert abs(bpb["default"] - bpb["frac"]) < 0.03


@pytest.mark.parametrize("layers, recur, parallel, xsa", [(2, "0,1", 1, 4), (3, "0,1", 2, 5), (5, "1,2", 3, 7),
                                                          (9, "3,4", 5, 11), (11, "4,5", 6, 13)])
def test_recipe_depth_values_follow_num_layers(layers, recur, parallel, xsa):
    hp = T.Hyperparameters.from_env(dict(RECIPE="sp1024_record", NUM_LAYERS=str(layers)))
    assert (hp.recur_layers, hp.parallel_start_layer, hp.xsa_last_n) == (recur, parallel, xsa)
    assert set(hp.derived) == {"RECUR_LAYERS", "PARALLEL_START_LAYER", "XSA_LAST_N"}


def test_recipe_depth_values_set_by_the_user_win_and_feed_the_rest():
    hp = T.Hyperparameters.from_env(dict(RECIPE="sp1024_record", NUM_LAYERS="5", RECUR_LAYERS="off"))
    assert (hp.recur_layers, hp.xsa_last_n) == ("off", 5)  # no recurrence: XSA on the 5 real layers
    assert "RECUR_LAYERS" not in hp.derived and "XSA_LAST_N" in hp.derived
    hp = T.Hyperparameters.from_env(dict(RECIPE="sp1024_record", NUM_LAYERS="5", RECUR_LAYERS="2,4"))
    assert hp.xsa_last_n == 8
    assert T.Hyperparameters.from_env(dict(NUM_LAYERS="5")).xsa_last_n == 0  # no recipe, nothing derived


def test_a_bad_value_from_the_recipe_says_so():
    with pytest.raises(T.ConfigError, match=r"ROPE_DIMS=16 .*ROPE_DIMS set by RECIPE"):
        T.Hyperparameters.from_env(dict(RECIPE="sp1024_record", MODEL_DIM="96", NUM_HEADS="8"))
    with pytest.raises(T.ConfigError, match="NUM_LAYERS >= 2"):
        T.Hyperparameters.from_env(dict(RECIPE="sp1024_record", NUM_LAYERS="1"))


@pytest.mark.parametrize("layers", [2, 3, 5])
def test_recipe_runs_at_any_depth(data, tmp_path, layers):
    """Nothing but the depth and a tiny width: the derived values must make a valid, trainable model."""
    env = tiny_env(data, tmp_path, RECIPE="sp1024_record", NUM_LAYERS=str(layers), ITERATIONS="4",
                   VAL_MAX_TOKENS="1024", **TINY_WIDTH)
    del env["WARMDOWN_ITERS"]
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    hparams = re.search(r"^hparams: (.*)$", log, re.M)[1].split()
    span = f"{layers // 2 - 1},{layers // 2}"
    assert f"RECUR_LAYERS={span}[derived]" in hparams and f"XSA_LAST_N={layers + 2}[derived]" in hparams
    assert re.search(r"^recurrence:on step:2 layers " + span, log, re.M)  # RECUR_START_FRAC=0.5 of 4 steps
    assert re.search(r"^artifact: .* cap:16000000 OK", log, re.M)
    assert math.isfinite(_final_bpb(log))


def test_recipe_depth_over_the_cap_is_refused_before_training(data, tmp_path, capsys):
    """The recipe's 11 layers fit with GPTQ + SDClip + brotli (issue 22); 16 do not."""
    env = tiny_env(data, tmp_path, RECIPE="sp1024_record")
    for k in ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS"):  # the recipe at full width
        env.pop(k, None)
    hp = T.Hyperparameters.from_env(env)
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    assert hp.num_layers == 11 and T.estimate_model_bytes(model, T.quant_plan(hp), T.QuantSpec.from_hparams(hp),
                                                          hp.compressor) < 15_000_000
    env["NUM_LAYERS"] = "16"
    assert T.main(env) == 2
    log = (tmp_path / "tiny.txt").read_text()
    assert re.search(r"RECIPE=sp1024_record at NUM_LAYERS=16: the artifact would be about 17\.\d MB", log)
    assert "warmup_step" not in log and "step:1/" not in log


@pytest.mark.skipif(not sys.platform.startswith("linux") or T._on_gpu(), reason="MLX's Linux CPU wheel only")
@pytest.mark.parametrize("preload", ["", "openblas"])
def test_a_linux_cpu_run_says_which_blas_runs_and_warns_on_the_slow_one(data, tmp_path, preload):
    """Started as a newcomer would, without LD_PRELOAD: the log names the BLAS and its matmul rate, and where it is
    MLX's bundled reference BLAS at that rate, warns with the README's fix. With OpenBLAS preloaded: no warning."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        found = sorted(glob.glob("/usr/lib/*-linux-gnu/libopenblas.so.0"))
        if not found:
            pytest.skip("OpenBLAS is not installed here")
        env["LD_PRELOAD"] = found[0]
    env.update(tiny_env(data, tmp_path, ITERATIONS=1, VAL_MAX_TOKENS=1024))
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt_mlx.py")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    name, rate = re.search(r"^blas: (.+) ([0-9.]+) GFLOP/s", p.stdout, re.M).groups()
    warned = re.search(r"^WARNING: matmuls run at .* LD_PRELOAD=\S*libopenblas\.so\.0", p.stdout, re.M)
    assert name == "OpenBLAS" or not preload
    assert bool(warned) == (name != "OpenBLAS" and float(rate) < T.BLAS_SLOW_GFLOPS), p.stdout[:2000]
