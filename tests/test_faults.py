"""Smaller faults of issue #18 (item 5): the untied recurrence MLPs' bits and TTT targets, the rescue checkpoint's
raw weights, and a recurrence that was never trained staying out of the artifact."""
import errno
import re
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

import train_gpt_mlx as T
from conftest import tiny_env

UNTIED = dict(VOCAB_SIZE="64", NUM_LAYERS="3", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
              RECUR_LAYERS="1,2", RECUR_UNTIED_MLP="1")


def _log(tmp_path, rid):
    return (Path(tmp_path) / f"{rid}.txt").read_text()


def _exact(text, prefix="final_int6_zstd_roundtrip_exact"):
    return re.search(rf"^{prefix} (val_loss:\S+ val_bpb:\S+)$", text, re.M)[1]


def test_untied_recurrence_mlps_are_quantized_and_test_time_trained_as_mlps():
    hp = T.Hyperparameters.from_env(dict(UNTIED, QUANT_BITS="6", QUANT_BITS_MLP="8", TTT_TARGETS="up,down"))
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    names = [n for n, p in tree_flatten(model.parameters()) if T.is_quantized(n, p.shape)]
    recur = [n for n in names if n.startswith("recur_mlps.")]
    assert len(recur) == 4  # two layers' fc and proj
    assert {T.tensor_bits(n, T.quant_plan(hp)) for n in recur} == {8}
    ttt = T.TestTimeTrainer(model, hp, seq_len=16, stride=16)
    assert set(recur) <= set(ttt.names)
    assert all(".mlp." in n or n.startswith("recur_mlps.") for n in ttt.names)


def test_a_rescue_checkpoint_holds_the_raw_weights_not_the_ema(data, tmp_path, monkeypatch):
    over = dict(ITERATIONS=3, WARMDOWN_ITERS=0, VAL_MAX_TOKENS=256, EMA_DECAY=0.9)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="ref", ITERATIONS=5, CHECKPOINT_EVERY=3,
                           **{k: v for k, v in over.items() if k != "ITERATIONS"})) == 0
    assert "checkpoint: step:3 " in _log(tmp_path, "ref")

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "write_artifact", full)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="cut", **over)) == 1
    _, ref = T.read_container(str(tmp_path / "ref_ckpt.pgck"), T.CHECKPOINT_MAGIC, "checkpoint")
    _, cut = T.read_container(str(tmp_path / "cut_ckpt.pgck"), T.CHECKPOINT_MAGIC, "checkpoint")
    assert set(ref) == set(cut)
    for key in ref:  # the same run at step 3: weights and optimizer state, EMA included, bit for bit
        assert np.array_equal(ref[key], cut[key]), key


def test_a_recurrence_never_trained_stays_out_of_the_artifact(data, tmp_path):
    over = dict(NUM_LAYERS=3, ITERATIONS=4, VAL_MAX_TOKENS=1024, WARMUP_STEPS=1)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="plain", **over)) == 0
    # RECUR_START_FRAC=1: the run ends as recurrence would start; it trained the plain order only
    assert T.main(tiny_env(data, tmp_path, RUN_ID="late", RECUR_LAYERS="1,1", RECUR_START_FRAC=1, **over)) == 0
    late = _log(tmp_path, "late")
    assert "recurrence: never trained" in late and "recurrence:on" not in late
    assert _exact(late) == _exact(_log(tmp_path, "plain"))  # the plain model, bit for bit
    # untied: the second pass's MLPs are dropped, and the artifact scores alike when loaded on its own
    assert T.main(tiny_env(data, tmp_path, RUN_ID="untied", RECUR_LAYERS="1,2", RECUR_UNTIED_MLP=1,
                           RECUR_START_FRAC=1, **over)) == 0
    art = tmp_path / "untied_model.int6.ptz"
    cfg, flat, _ = T.read_artifact(str(art))
    assert cfg.recur_layers == "" and not any(n.startswith("recur_mlps.") for n in flat)
    assert T.main(tiny_env(data, tmp_path, RUN_ID="ev", EVAL_ONLY=1, LOAD_ARTIFACT=art, VAL_MAX_TOKENS=1024)) == 0
    assert _exact(_log(tmp_path, "ev"), "eval_only_exact") == _exact(_log(tmp_path, "untied"))
