"""Nothing lost, nothing silent: bad input is named before any work, runs resume bit-identically,
failures leave no half-written files, and the optimizers match their reference formulas."""
import errno
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train_gpt_mlx as T
from conftest import ctrl_c_after, load_script, tiny_env


def _log(tmp_path, rid="tiny"):
    return (Path(tmp_path) / f"{rid}.txt").read_text()


def _no_training_happened(log):
    return not re.search(r"^(warmup_step|step):", log, re.M)


# ---------------------------------------------------------------------------- the environment
def test_empty_value_is_an_error_not_the_default():
    with pytest.raises(T.ConfigError, match=r"ITERATIONS=''.*empty value.*20000"):
        T.Hyperparameters.from_env({"ITERATIONS": ""})


@pytest.mark.parametrize("name,expect", [
    ("ENGRAM_LITE_ENABLE", "did you mean ENGRAM_LITE_ENABLED"),
    ("NGRAM_ORDER", "did you mean NGRAM_MAX_ORDER"),
    ("iterations", "did you mean ITERATIONS? (names are upper case)"),
    ("MATRIX_LRR", "did you mean MATRIX_LR"),
    ("MLX_EAGER_EVAL", "not needed"),
    ("QAT_BANANA", "not read by this script"),
])
def test_unknown_variables_are_named_with_the_closest_known_one(name, expect):
    hp = T.Hyperparameters.from_env({name: "1", "PATH": "/bin", "HOME": "/root"})
    assert len(hp.env_notes) == 1 and name in hp.env_notes[0] and expect in hp.env_notes[0]
    with pytest.raises(T.ConfigError, match="STRICT_ENV"):
        T.Hyperparameters.from_env({name: "1", "STRICT_ENV": "1"})


def test_baseline_and_seed_design_spellings_work():
    assert T.Hyperparameters.from_env({"TRAIN_MAX_SEQ_LEN": "256"}).train_seq_len == 256
    assert T.Hyperparameters.from_env({"TRAIN_MAX_SEQ_LEN": "256", "TRAIN_SEQ_LEN": "128"}).train_seq_len == 128
    assert T.Hyperparameters.from_env({"EVAL_MODE": "sliding"}).eval_stride_resolved == 64
    assert T.Hyperparameters.from_env({"EVAL_MODE": "sliding", "EVAL_STRIDE": "32"}).eval_stride_resolved == 32
    assert T.Hyperparameters.from_env({"EVAL_MODE": "standard"}).eval_stride_resolved == 0
    with pytest.raises(T.ConfigError, match="EVAL_MODE=standard"):
        T.Hyperparameters.from_env({"EVAL_MODE": "standard", "EVAL_STRIDE": "64"})


def test_warnings_reach_the_log(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=1, WARMUP_STEPS=0, VAL_MAX_TOKENS=256, ENGRAM_LITE_ENABLE=1)
    assert T.main(env) == 0
    assert "WARNING: ENGRAM_LITE_ENABLE is not read: did you mean ENGRAM_LITE_ENABLED?" in _log(tmp_path)


# ---------------------------------------------------------------------------- before any work
@pytest.mark.parametrize("case", ["tokenizer", "run_id", "nll_dir", "load_artifact", "resume", "memory", "out_dir"])
def test_every_setup_failure_is_named_before_any_step(data, tmp_path, capsys, case):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    (tmp_path / "afile").write_text("x")
    over, needle = {
        "tokenizer": (dict(TOKENIZER_PATH=str(junk)), "TOKENIZER_PATH"),
        "run_id": (dict(RUN_ID="../escape"), "RUN_ID"),
        "nll_dir": (dict(EVAL_TOKEN_NLL_PATH=str(tmp_path / "no" / "such" / "nll.bin")), "EVAL_TOKEN_NLL_PATH"),
        "load_artifact": (dict(EVAL_ONLY=1, LOAD_ARTIFACT=str(tmp_path / "missing.ptz")), "LOAD_ARTIFACT"),
        "resume": (dict(RESUME_FROM=str(tmp_path / "missing.pgck")), "RESUME_FROM"),
        "memory": (dict(VOCAB_SIZE=65536, COMPLEMENT_ALPHA=0.5), "COMPLEMENT_ALPHA"),
        "out_dir": (dict(OUT_DIR=str(tmp_path / "afile" / "sub")), "OUT_DIR"),
    }[case]
    env = tiny_env(data, tmp_path, **over)
    code = T.main(env)
    err = capsys.readouterr()
    text = err.err + err.out
    assert code in (1, 2) and needle in text and "Traceback" not in text
    if (tmp_path / "tiny.txt").exists():
        assert _no_training_happened(_log(tmp_path))


def test_eval_only_revalidates_against_the_artifact_shape(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=2, WARMUP_STEPS=0, VAL_MAX_TOKENS=1000)
    assert T.main(env) == 0
    art = str(tmp_path / "tiny_model.int6.ptz")
    # the environment's TRAIN_SEQ_LEN (256) would allow stride 100; the artifact's 64 does not
    bad = tiny_env(data, tmp_path, EVAL_ONLY=1, LOAD_ARTIFACT=art, RUN_ID="ev", EVAL_STRIDE=100, TRAIN_SEQ_LEN=256,
                   VAL_MAX_TOKENS=1000)
    assert T.main(bad) == 2
    assert "EVAL_STRIDE=100 must be <= the eval window" in _log(tmp_path, "ev")
    ok = tiny_env(data, tmp_path, EVAL_ONLY=1, LOAD_ARTIFACT=art, RUN_ID="ev2", NUM_LAYERS=7, VAL_MAX_TOKENS=1000)
    assert T.main(ok) == 0
    hparams = re.search(r"^hparams: .*$", _log(tmp_path, "ev2"), re.M)[0]
    assert "NUM_LAYERS=2 " in hparams and "TRAIN_SEQ_LEN=64 " in hparams


def test_eval_windows_refuse_a_stride_longer_than_the_window():
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        T.eval_windows(1000, 64, 100)


# ---------------------------------------------------------------------------- nothing silent
def test_train_stream_says_when_it_wraps(tmp_path):
    bs = load_script("data/build_shards.py")
    bs.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10, dtype=np.uint16))
    said = []
    s = T.TokenStream(T.shard_files(str(tmp_path), "train"), 1024, said.append)
    s.take(10)
    assert said == []
    s.take(5)
    assert len(said) == 1 and "wrapped around" in said[0] and "pass 2" in said[0]


def test_non_finite_loss_stops_the_run_and_names_the_lr(data, tmp_path, monkeypatch):
    real = T.train_step
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        return mx.array(float("nan")) if len(calls) == 4 else real(*a, **kw)

    monkeypatch.setattr(T, "train_step", poisoned)
    assert T.main(tiny_env(data, tmp_path, WARMUP_STEPS=0)) == 1
    log = _log(tmp_path)
    assert "train loss is nan at step 4" in log and "MATRIX_LR" in log
    assert not (tmp_path / "tiny_model.int6.ptz").exists() and " OK" not in log


def test_non_finite_weights_are_never_written_nor_read(tmp_path):
    cfg = T.ModelConfig.from_hparams(T.Hyperparameters.from_env(dict(VOCAB_SIZE="64", NUM_LAYERS="1", MODEL_DIM="32",
                                                                     NUM_HEADS="2", NUM_KV_HEADS="1")))
    flat = T.flat_numpy(T.GPT(cfg))
    flat["blocks.0.attn_scale"][3] = np.nan
    with pytest.raises(T.ArtifactError, match="non-finite"):
        T.write_artifact(str(tmp_path / "a.ptz"), flat, cfg, 6)
    assert list(tmp_path.iterdir()) == []
    header = dict(format="parameter-golf-mlx", version=1, quant_bits=6, config={}, meta={})
    T.write_container(str(tmp_path / "b.ptz"), T.ARTIFACT_MAGIC, header,
                      [("x", "raw", np.array([1.0, np.inf], np.float32))], level=3)
    with pytest.raises(T.ArtifactError, match="non-finite"):
        T.read_artifact(str(tmp_path / "b.ptz"))


def test_trailing_bytes_after_the_artifact_are_rejected(tmp_path):
    cfg = T.ModelConfig.from_hparams(T.Hyperparameters.from_env(dict(VOCAB_SIZE="64", NUM_LAYERS="1", MODEL_DIM="32",
                                                                     NUM_HEADS="2", NUM_KV_HEADS="1")))
    p = tmp_path / "a.ptz"
    T.write_artifact(str(p), T.flat_numpy(T.GPT(cfg)), cfg, 6)
    T.read_artifact(str(p))
    p.write_bytes(p.read_bytes() + b"\0extra")
    with pytest.raises(T.ArtifactError, match="6 unexpected bytes"):
        T.read_artifact(str(p))


def test_hash_multipliers_are_odd():
    assert all(m % 2 == 1 for m in T._HASH_MULT)


# ---------------------------------------------------------------------------- warmdown
def test_time_capped_warmdown_never_starts_decayed_on_a_slow_machine():
    hp = T.Hyperparameters.from_env(dict(MAX_WALLCLOCK_SECONDS="600"))  # defaults: 20000 iters, 1200 warmdown
    assert T.lr_multiplier(1, 5_000, hp) == 1.0  # 5 s steps: 1200 x 5 s would exceed the whole budget
    assert T.lr_multiplier(60, 300_000, hp) == pytest.approx(1.0)  # warmdown = the last half at most
    assert T.lr_multiplier(90, 450_000, hp) == pytest.approx(0.5)
    hp = T.Hyperparameters.from_env(dict(MAX_WALLCLOCK_SECONDS="600", WARMDOWN_FRAC="0.25", ITERATIONS="1000"))
    assert T.lr_multiplier(1, 5_000, hp) == 1.0
    assert T.lr_multiplier(10, 525_000, hp) == pytest.approx(0.5)  # time ends the run: 7/8 of the budget
    assert T.lr_multiplier(875, 1_000, hp) == pytest.approx(0.5)  # steps end the run
    assert T.lr_multiplier(1000, 1_000, hp) == 0.0


def test_warmup_of_one_step_still_primes_the_qat_graphs(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=4, WARMUP_STEPS=1, QAT_START_FRAC=0.5, VAL_MAX_TOKENS=256)
    assert T.main(env) == 0
    log = _log(tmp_path)
    assert "warmup_step:1/2" in log and "warmup_step:2/2 (qat graphs)" in log and "qat:on step:2" in log


# ---------------------------------------------------------------------------- interruption and failure
def test_ctrl_c_during_warmup_and_roundtrip_is_a_message_not_a_traceback(data, tmp_path, monkeypatch, capsys):
    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_step", boom)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="w")) == 130
    assert "interrupted (Ctrl-C) during warmup" in _log(tmp_path, "w")
    monkeypatch.undo()
    ctrl_c_after(monkeypatch, T, 1, "evaluate")  # the round-trip evaluation, after the final one
    assert T.main(tiny_env(data, tmp_path, RUN_ID="r", ITERATIONS=2, VAL_MAX_TOKENS=256)) == 130
    assert "during the round-trip evaluation; the artifact above is complete" in _log(tmp_path, "r")
    assert "Traceback" not in capsys.readouterr().err


def test_disk_full_at_the_artifact_saves_a_checkpoint_and_says_where(data, tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "write_artifact", full)
    assert T.main(tiny_env(data, tmp_path, ITERATIONS=3, VAL_MAX_TOKENS=256)) == 1
    log = _log(tmp_path)
    ckpt = tmp_path / "tiny_ckpt.pgck"
    assert "No space left on device" in log and f"saved in the checkpoint {ckpt}" in log and ckpt.exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def broken_replace(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T.os, "replace", broken_replace)
    with pytest.raises(OSError):
        T.atomic_write(str(p), b"new")
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["f.bin"]


def test_reused_run_id_is_announced(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=1, WARMUP_STEPS=0, VAL_MAX_TOKENS=256)
    assert T.main(env) == 0 and T.main(env) == 0
    assert _log(tmp_path).count("note: RUN_ID=tiny was used before") == 1


# ---------------------------------------------------------------------------- checkpoints and resume
def test_resume_refuses_another_shape(data, tmp_path, capsys):
    env = tiny_env(data, tmp_path, ITERATIONS=2, WARMUP_STEPS=0, VAL_MAX_TOKENS=256, CHECKPOINT_EVERY=1)
    assert T.main(env) == 0
    ckpt = tmp_path / "tiny_ckpt.pgck"
    assert T.main(tiny_env(data, tmp_path, RUN_ID="r", RESUME_FROM=str(ckpt), NUM_LAYERS=3)) == 2
    assert "NUM_LAYERS=3 but the checkpoint was trained with 2" in capsys.readouterr().err
    assert not (tmp_path / "r.txt").exists()
    with pytest.raises(T.ArtifactError, match="not a parameter-golf-mlx artifact"):
        T.read_artifact(str(ckpt))  # a checkpoint is not an artifact


# ---------------------------------------------------------------------------- optimizers
def test_adam_and_muon_take_one_step_of_their_reference_formulas():
    hp = T.Hyperparameters.from_env(dict(VOCAB_SIZE="64", NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2",
                                         NUM_KV_HEADS="1", MUON_WEIGHT_DECAY="0.1", GRAD_CLIP_NORM="0.5"))
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    params = dict(tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(0)
    grads = {n: mx.array(rng.normal(size=p.shape).astype(np.float32)) for n, p in params.items()}
    new = opt.apply(params, grads, mx.array(0.5), mx.array(0.9))
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    k = min(1.0, 0.5 / (norm + 1e-6))
    name = "tok_emb.weight"  # Adam, first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
    g, p, lr = np.array(grads[name]) * k, np.array(params[name]), hp.tied_embed_lr * 0.5
    m, v = (1 - hp.beta1) * g, (1 - hp.beta2) * g * g
    want = p - lr * (m / (1 - hp.beta1)) / (np.sqrt(v / (1 - hp.beta2)) + hp.adam_eps)
    np.testing.assert_allclose(np.array(new[name]), want, rtol=1e-5, atol=1e-7)
    name = "blocks.0.mlp.fc.weight"  # Muon, first step: buf = g, update NS(g + mu g), decoupled decay
    g, p, lr = np.array(grads[name]) * k, np.array(params[name]), hp.matrix_lr * 0.5
    x = (g + 0.9 * g) / (np.linalg.norm(g + 0.9 * g) + 1e-7)
    x = x.T if x.shape[0] > x.shape[1] else x
    for _ in range(hp.muon_backend_steps):
        s = x @ x.T
        x = 3.4445 * x + (-4.7750 * s + 2.0315 * s @ s) @ x
    x = x.T if g.shape[0] > g.shape[1] else x
    want = p * (1 - lr * 0.1) - lr * math.sqrt(max(1, g.shape[0] / g.shape[1])) * x
    np.testing.assert_allclose(np.array(new[name]), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- first contact
@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "fineweb_sample").exists(),
                    reason="needs ../shared/fineweb_sample beside the repository")
def test_readme_offline_example_runs_verbatim_on_a_fresh_copy(tmp_path):
    """The README's offline block, run as written from a copy of the repository that has
    ../shared beside it and no data/ downloads."""
    import os
    import shutil
    import subprocess
    import sys
    root = Path(T.__file__).resolve().parent
    readme = (root / "README.md").read_text()
    block = re.search(r"<!-- offline-example -->\n```bash\n(.*?)```\n<!-- /offline-example -->", readme, re.S)[1]
    repo = tmp_path / "clone"
    (repo / "data").mkdir(parents=True)
    shutil.copy(root / "train_gpt_mlx.py", repo)
    for f in (root / "data").glob("*.py"):
        shutil.copy(f, repo / "data")
    (tmp_path / "shared").symlink_to(root.parent / "shared")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "final_int6_zstd_roundtrip_exact" in (repo / "logs" / "offline_smoke.txt").read_text()


def test_memory_check_lets_the_defaults_run_on_a_16_gb_mac(monkeypatch):
    """Training activations are freed before evaluation: the phases' peaks do not add up (they used to, which
    refused the default run on a 16 GB Mac: 13.8 of 13.6 GiB). The 9x512 recipe at a 2,048-token batch on a short
    validation split fits 8 GB (it was refused: 10.45 GiB estimated, ~2.5 GiB measured); two ranks on one host
    need twice one's memory. (tests/test_memory.py bounds the estimate by measured peaks.)"""
    def machine(gib):
        monkeypatch.setattr(T.os, "sysconf", lambda k: 4096 if k == "SC_PAGE_SIZE" else gib * 2**30 // 4096)

    logged = []
    for env in ({}, {"RECIPE": "sp1024_record"}):
        hp = T.Hyperparameters.from_env(env)
        need = T.memory_needs(hp, T.ModelConfig.from_hparams(hp), hp.mlx_max_microbatch_tokens)
        machine(16)
        T.check_memory(need, logged.append)
        machine(8)
        # the largest part, named (the recipe's 4096-token microbatches leave the evaluation batch the largest)
        with pytest.raises(T.SetupError, match="MLX_MAX_MICROBATCH_TOKENS" if not env else "VAL_BATCH_SIZE"):
            T.check_memory(need, logged.append)
    assert logged[0].startswith("memory_estimate:") and "of 16.0GiB" in logged[0]
    hp = T.Hyperparameters.from_env({"RECIPE": "sp1024_record", "TRAIN_BATCH_TOKENS": "2048"})
    need = T.memory_needs(hp, T.ModelConfig.from_hparams(hp), T.micro_tokens(hp, 1), n_val=16384)
    T.check_memory(need, logged.append)
    with pytest.raises(T.SetupError, match="for 4 ranks on this host .* or start fewer ranks"):
        T.check_memory(need, logged.append, local_ranks=4)
