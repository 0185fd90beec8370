"""Silently wrong results, each now caught before work (issue #18, item 6): resume settings, a foreign
tokenizer, DATA_PATH as a glob, a bad train shard, two runs with one RUN_ID, absurd values."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import ROOT, load_script, tiny_env


def _log(tmp_path, rid):
    return (Path(tmp_path) / f"{rid}.txt").read_text()


def _exact(text):
    return re.search(r"^final_int6_zstd_roundtrip_exact .*$", text, re.M)[0]


def _no_step(text):
    return not re.search(r"^(warmup_step|step):", text, re.M)


# ---------------------------------------------------------------------------- RESUME_FROM
def test_resume_takes_the_checkpoints_settings_and_refuses_a_changed_one(data, tmp_path, capsys):
    over = dict(ITERATIONS=8, WARMDOWN_FRAC=0.5, CHECKPOINT_EVERY=4, VAL_MAX_TOKENS=1024, EMA_DECAY=0.9)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="full", **over)) == 0
    ckpt = str(tmp_path / "full_ckpt.pgck")
    assert "checkpoint: step:4 " in _log(tmp_path, "full")
    # the shape, WARMDOWN_FRAC, MAX_WALLCLOCK_SECONDS, EMA_DECAY... all come from the checkpoint
    bare = {k: v for k, v in tiny_env(data, tmp_path).items() if k in ("DATA_PATH", "TOKENIZER_PATH", "OUT_DIR")}
    assert T.main(dict(bare, RUN_ID="resumed", RESUME_FROM=ckpt)) == 0
    resumed = _log(tmp_path, "resumed")
    assert "resume: WARMDOWN_FRAC=0.5 from the checkpoint" in resumed and "resumed from" in resumed
    assert _exact(resumed) == _exact(_log(tmp_path, "full"))
    # a result-changing value set to something else: refused before any work, unless RESUME_OVERRIDE=1
    changed = tiny_env(data, tmp_path, RUN_ID="changed", RESUME_FROM=ckpt, **dict(over, WARMDOWN_FRAC=0.2))
    assert T.main(changed) == 2
    err = capsys.readouterr().err
    assert "WARMDOWN_FRAC=0.2 but the checkpoint was trained with 0.5" in err and "RESUME_OVERRIDE=1" in err
    assert T.main(dict(changed, RESUME_OVERRIDE="1")) == 0
    assert "resume: WARMDOWN_FRAC=0.2 overrides the checkpoint's 0.5" in _log(tmp_path, "changed")
    # a checkpoint past ITERATIONS
    assert T.main(dict(changed, RUN_ID="past", RESUME_OVERRIDE="1", ITERATIONS="3")) == 2
    assert "the checkpoint is at step 4, past ITERATIONS=3" in capsys.readouterr().err


def _data_copy(data, folder: Path, cut: int = 0) -> Path:
    """DATA_PATH moved to folder (the shards linked); with cut, its first train shard holds `cut` tokens fewer."""
    folder.mkdir()
    for src in sorted(Path(data["data_path"]).glob("fineweb_*.bin")):
        if cut and src.name.startswith("fineweb_train_") and not list(folder.glob("fineweb_train_*")):
            toks = T.load_data_shard(src)[:-cut]
            header = np.zeros(256, "<i4")
            header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, toks.size)
            (folder / src.name).write_bytes(header.tobytes() + toks.astype("<u2").tobytes())
        else:
            (folder / src.name).symlink_to(src)
    return folder


def test_resume_on_other_train_shards_is_refused_unless_overridden(data, tmp_path, capsys):
    """The checkpoint keeps its train shards' names and token counts: DATA_PATH may move, but shorter shards are
    refused before work (the stream would continue on other data); RESUME_OVERRIDE=1 trains on and logs it."""
    over = dict(ITERATIONS=6, CHECKPOINT_EVERY=3, VAL_MAX_TOKENS=1024)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="full", **over)) == 0
    ckpt = tmp_path / "full_ckpt.pgck"
    moved = _data_copy(data, tmp_path / "moved")
    assert T.main(tiny_env(data, tmp_path, RUN_ID="moved", DATA_PATH=moved, RESUME_FROM=ckpt, **over)) == 0
    assert _exact(_log(tmp_path, "moved")) == _exact(_log(tmp_path, "full"))
    other = _data_copy(data, tmp_path / "other", cut=1000)
    env = tiny_env(data, tmp_path, RUN_ID="other", DATA_PATH=other, RESUME_FROM=ckpt, **over)
    assert T.main(env) == 2
    log = _log(tmp_path, "other")
    assert re.search(rf"^error: RESUME_FROM={ckpt}: DATA_PATH={other} has .* tokens, but the checkpoint was trained "
                     r"on .*RESUME_OVERRIDE=1", log, re.M), log
    assert _no_step(log)
    assert T.main(dict(env, RUN_ID="forced", RESUME_OVERRIDE="1")) == 0
    assert re.search(r"^resume: DATA_PATH=.* \(RESUME_OVERRIDE=1: training goes on", _log(tmp_path, "forced"), re.M)


# ---------------------------------------------------------------------------- data and tokenizer
@pytest.fixture(scope="module")
def foreign_tokenizer(data, tmp_path_factory):
    """A tokenizer of the same vocab size that did not make the shards: trained on the train docs reversed."""
    import sentencepiece as spm
    bs = load_script("data/build_shards.py")
    sp = spm.SentencePieceProcessor(model_file=data["tokenizer"])
    toks = np.concatenate([T.load_data_shard(f) for f in T.shard_files(data["data_path"], "train")])
    docs = [sp.decode(d.tolist())[::-1] for d in np.split(toks, np.flatnonzero(toks == T.BOS_ID)) if d.size > 1]
    path = tmp_path_factory.mktemp("foreign") / "foreign.model"
    bs.train_tokenizer(docs, path, data["vocab_size"], log=lambda *_: None)
    return str(path)


def test_a_tokenizer_that_did_not_make_the_shards_is_refused_before_work(data, tmp_path, foreign_tokenizer, capsys):
    env = tiny_env(data, tmp_path, ITERATIONS=2, WARMUP_STEPS=0, TOKENIZER_PATH=foreign_tokenizer)
    assert T.main(env) == 1
    log = _log(tmp_path, "tiny")
    assert f"TOKENIZER_PATH={foreign_tokenizer} did not make the shards in DATA_PATH=" in log and _no_step(log)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="own", ITERATIONS=1, WARMUP_STEPS=0, VAL_MAX_TOKENS=256)) == 0
    assert re.search(r"^tokenizer_check: (\d+)/\1 validation documents re-encode", _log(tmp_path, "own"), re.M)


def _copy_shards(data, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in Path(data["data_path"]).glob("*.bin"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_data_path_is_a_folder_not_a_glob_pattern(data, tmp_path):
    brackets = _copy_shards(data, tmp_path / "data[1]")
    run = dict(ITERATIONS=1, WARMUP_STEPS=0, VAL_MAX_TOKENS=0)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="b", DATA_PATH=brackets, **run)) == 0  # found, literally
    _copy_shards(data, tmp_path / "data_a")
    _copy_shards(data, tmp_path / "data_b")
    assert T.main(tiny_env(data, tmp_path, RUN_ID="star", DATA_PATH=tmp_path / "data*", **run)) == 1
    log = _log(tmp_path, "star")
    assert f"DATA_PATH={tmp_path / 'data*'}: no val shards" in log and _no_step(log)


@pytest.mark.parametrize("bad", ["empty", "truncated"])
def test_every_train_shard_header_is_checked_before_work(data, tmp_path, bad):
    folder = _copy_shards(data, tmp_path / "ds")
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 1, 0 if bad == "empty" else 1000)
    (folder / "fineweb_train_000001.bin").write_bytes(header.tobytes() + b"\0" * (0 if bad == "empty" else 100))
    assert T.main(tiny_env(data, tmp_path, ITERATIONS=2, WARMUP_STEPS=0, DATA_PATH=folder)) == 1
    log = _log(tmp_path, "tiny")
    assert "fineweb_train_000001.bin" in log and _no_step(log)
    assert ("empty train shard" if bad == "empty" else "truncated or corrupted") in log


def test_build_shards_refuses_to_write_zero_train_shards(data, tmp_path):
    bs = load_script("data/build_shards.py")
    docs = tmp_path / "docs.txt"
    docs.write_text("one doc here\n\nand a second one\n")
    with pytest.raises(ValueError, match="zero train shards"):
        bs.build_shards(docs, data["tokenizer"], tmp_path / "out", val_docs=2, log=lambda *_: None)


# ---------------------------------------------------------------------------- runs and values
def test_a_second_run_with_the_same_run_id_is_refused(data, tmp_path, capsys):
    env = tiny_env(data, tmp_path, ITERATIONS=5000, CHECKPOINT_EVERY=0, VAL_MAX_TOKENS=256)
    first = subprocess.Popen([sys.executable, str(ROOT / "train_gpt_mlx.py")], env={**os.environ, **env}, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:
        if line.startswith("step:2/"):
            break
    try:
        assert T.main(dict(env, ITERATIONS="1", WARMUP_STEPS="0")) == 2
        assert "RUN_ID=tiny is in use by a run still going" in capsys.readouterr().err
    finally:
        first.send_signal(2)
        first.stdout.read()
        first.wait(timeout=120)
    assert _log(tmp_path, "tiny").count("world_size:") == 1  # the second run never wrote the first's log
    assert T.main(dict(env, ITERATIONS="1", WARMUP_STEPS="0")) == 0  # the lock went with the first run


@pytest.mark.parametrize("var,value", [("TRAIN_BATCH_TOKENS", "1280000000000"), ("ITERATIONS", str(10**23))])
def test_absurd_values_are_refused_with_the_range(var, value):
    with pytest.raises(T.ConfigError, match=rf"{var}='{value}': allowed range: \[\d+, \d+\]"):
        T.Hyperparameters.from_env({var: value})


def test_a_loss_far_above_chance_warns_and_names_the_learning_rates(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=4, WARMUP_STEPS=0, VAL_MAX_TOKENS=256, TIED_EMBED_LR=100,
                   SCALAR_LR=50, MATRIX_LR=20)
    assert T.main(env) == 0
    warning = [ln for ln in _log(tmp_path, "tiny").splitlines() if ln.startswith("WARNING: train loss")]
    assert len(warning) == 1 and "above ln(VOCAB_SIZE)" in warning[0] and "MATRIX_LR=20.0" in warning[0]
