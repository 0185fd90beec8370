"""Silently wrong results, each now caught before work (issue #18, item 6): resume settings, a foreign
tokenizer, DATA_PATH as a glob, a bad train shard, two runs with one RUN_ID, absurd values."""
import os
import re
import subprocess
import sys
import time
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
