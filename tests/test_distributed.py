"""Data-parallel training and evaluation over mx.distributed (2 ranks started by mlx.launch with
the ring backend, on this machine), and the challenge's submission folder."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import ROOT, tiny_env

LAUNCH = Path(sys.executable).with_name("mlx.launch")
# Runs the script with its exact per-step train loss added to the log (the log rounds to 4 digits).
DRIVER = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import train_gpt_mlx as T
one_step = T.one_step
def exact(r):
    loss = one_step(r)
    r.log(f"exact_train_loss:{{loss!r}}")
    return loss
T.one_step = exact
sys.exit(T.main())
"""


def _launch(tmp_path, env: dict, ranks: int) -> str:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver)]
    if ranks > 1:
        cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--"] + cmd
    # one BLAS thread per rank: two ranks share this machine's cores
    full = dict(os.environ, OPENBLAS_NUM_THREADS="1", **env)
    p = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _exact(log: str, key: str) -> float:
    return float(re.findall(rf"^{key} .*val_bpb:(\S+)", log, re.M)[-1])


pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this python")


def test_two_ranks_train_and_evaluate_like_one_process(data, tmp_path):
    """Same global batch: 2 ranks give one process's per-step losses and final val_bpb (rtol 1e-5),
    through the sliding window and the entropy-weighted n-gram mixer on the gathered stream; only
    rank 0 writes, the header names the world, and the ranks prove they hold the same weights."""
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        out.mkdir()
        env = tiny_env(data, out, ITERATIONS=6, VAL_MAX_TOKENS=3000, EVAL_STRIDE=32, EVAL_BATCH_SEQS=5,
                       NGRAM_MIXER_ENABLED=1, NGRAM_MAX_ORDER=3, NGRAM_ALPHA_MODE="entropy")
        console = _launch(out, env, ranks)
        log = (out / "tiny.txt").read_text()
        runs[ranks] = [float(v) for v in re.findall(r"^exact_train_loss:(\S+)", log, re.M)], log
        assert sorted(p.name for p in out.iterdir()) == ["driver.py", "tiny.txt", "tiny_model.int6.ptz"]
        assert f"world_size:{ranks} backend:{'ring' if ranks > 1 else 'none'}" in log
        assert "[rank 1]" not in console and console.count("final_int6_zstd_roundtrip_exact") == 1
    (l1, log1), (l2, log2) = runs[1], runs[2]
    assert len(l1) == len(l2) == 6
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert l1[0] != l1[-1]  # it trained
    np.testing.assert_allclose(_exact(log2, "final_int6_zstd_roundtrip_exact"),
                               _exact(log1, "final_int6_zstd_roundtrip_exact"), rtol=1e-5)
    assert re.search(r"^ranks_checksum after training: crc32:[0-9a-f]{8} world_size:2 agree:True$", log2, re.M)
    assert "ranks_checksum" not in log1  # one process: nothing added


def test_eval_only_on_two_ranks_writes_the_same_nll_dump(data, tmp_path):
    """Ranks score disjoint batches (7 batches over 2 ranks: unequal shares); the gathered stream,
    mixed in order, is bit-identical to one process's, and so is val_bpb."""
    env = tiny_env(data, tmp_path, ITERATIONS=3, VAL_MAX_TOKENS=2500)
    assert T.main(env) == 0
    art = str(tmp_path / "tiny_model.int6.ptz")
    dumps = {}
    for ranks in (1, 2):
        out = tmp_path / f"e{ranks}"
        out.mkdir()
        nll = out / "nll.f32"
        _launch(out, tiny_env(data, out, EVAL_ONLY=1, LOAD_ARTIFACT=art, VAL_MAX_TOKENS=2500, EVAL_STRIDE=16,
                              EVAL_BATCH_SEQS=23, NGRAM_MIXER_ENABLED=1,
                              EVAL_TOKEN_NLL_PATH=nll), ranks)
        dumps[ranks] = np.fromfile(nll, "<f4"), _exact((out / "tiny.txt").read_text(), "eval_only_exact")
        split = "counting split over 2 ranks by last token" if ranks == 2 else "in a worker thread"
        assert split in (out / "tiny.txt").read_text()  # the mixer's counting work is shared
    assert dumps[1][0].size == 2499 and np.array_equal(dumps[1][0], dumps[2][0])
    assert dumps[1][1] == dumps[2][1]


@pytest.mark.parametrize("ttt", [dict(TTT_MODE="lora", TTT_BATCH_SEQS=3),  # 3 rows over 2 ranks: one padded
                                 dict(TTT_MODE="full", TTT_BATCH_SEQS=1, NGRAM_MIXER_ENABLED=1)])  # rank 1: all pad
def test_ttt_on_two_ranks_scores_like_one_process(data, tmp_path, ttt):
    """TTT with 2 ranks (each chunk's batches split and gathered, the TTT step's rows split, gradients
    all-reduced) gives one process's NLL dump and val_bpb; the first chunk, scored unadapted, bit-exactly."""
    assert T.main(tiny_env(data, tmp_path, ITERATIONS=3, VAL_MAX_TOKENS=600)) == 0
    dumps = {}
    for ranks, lr in ((0, 0), (1, 0.03), (2, 0.03)):  # 0: one process, TTT_LR=0 (the plain evaluation)
        out = tmp_path / f"e{ranks}"
        out.mkdir()
        env = tiny_env(data, out, EVAL_ONLY=1, LOAD_ARTIFACT=tmp_path / "tiny_model.int6.ptz", VAL_MAX_TOKENS=600,
                       EVAL_STRIDE=16, EVAL_BATCH_SEQS=2, TTT_ENABLED=1, TTT_CHUNK=96, TTT_LR=lr, TTT_EPOCHS=2,
                       EVAL_TOKEN_NLL_PATH=out / "nll.f32", **ttt)
        _launch(out, env, max(ranks, 1))  # a subprocess, like the others: one BLAS thread
        log = (out / "tiny.txt").read_text()
        assert f"world_size:{max(ranks, 1)} " in log
        dumps[ranks] = np.fromfile(out / "nll.f32", "<f4"), _exact(log, "eval_only_exact")
    (plain, _), (a, bpb1), (b, bpb2) = dumps[0], dumps[1], dumps[2]
    assert a.size == 599 and np.array_equal(a[:144], plain[:144]) and np.array_equal(a[:144], b[:144])
    assert np.abs(a[144:] - plain[144:]).max() > 1e-3  # it adapted
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bpb2, bpb1, rtol=1e-5)


def test_dist_backend_without_launcher_is_named(data, tmp_path, capsys):
    assert T.main(tiny_env(data, tmp_path, DIST_BACKEND="ring")) == 2
    assert "DIST_BACKEND=ring" in capsys.readouterr().err
    with pytest.raises(T.ConfigError, match="DIST_BACKEND"):
        T.Hyperparameters.from_env({"DIST_BACKEND": "tcp"})


# ---------------------------------------------------------------------------- submission folder
def _sub_env(data, tmp_path, folder, **over):
    """A run scored on a whole (small: 3,000-token) validation split."""
    ds = tmp_path / "ds"
    if not ds.exists():
        ds.mkdir()
        for src in Path(data["data_path"]).glob("fineweb_train_*.bin"):
            (ds / src.name).symlink_to(src)
        val = T.load_data_shard(next(Path(data["data_path"]).glob("fineweb_val_*.bin")))[:3000]
        header = np.zeros(256, "<i4")
        header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, val.size)
        (ds / "fineweb_val_000000.bin").write_bytes(header.tobytes() + val.astype("<u2").tobytes())
    return tiny_env(data, tmp_path, **{**dict(DATA_PATH=ds, ITERATIONS=3, VAL_MAX_TOKENS=0, SUBMISSION_DIR=folder, SUBMISSION_AUTHOR="Ada",
                    SUBMISSION_GITHUB_ID="ada", SUBMISSION_NAME="Tiny MLX", SUBMISSION_BLURB="two layers",
                    SUBMISSION_UNOFFICIAL_DATA=1), **over})


def test_submission_folder_is_complete_and_matches_the_logs(data, tmp_path):
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_tiny"
    for seed in (1, 2):
        assert T.main(_sub_env(data, tmp_path, folder, SEED=seed, RUN_ID=f"s{seed}")) == 0
    sub = json.loads((folder / "submission.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                                                        "train_gpt_mlx.py", "train_seed1.log", "train_seed2.log"]
    assert (folder / "train_gpt_mlx.py").read_bytes() == (ROOT / "train_gpt_mlx.py").read_bytes()
    for k in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "pre_quant_val_loss",
              "pre_quant_val_bpb", "step_stop", "wallclock_seconds", "eval_time_seconds", "bytes_total",
              "bytes_model", "bytes_code", "track", "hardware", "seeds", "seed_results", "val_bpb_std"):
        assert k in sub, k
    assert sub["seeds"] == [1, 2] and sub["track"] == "non_record_16mb" and sub["author"] == "Ada"
    for seed in (1, 2):
        log, res = (folder / f"train_seed{seed}.log").read_text(), sub["seed_results"][str(seed)]
        assert (tmp_path / f"s{seed}.txt").read_text().startswith(log) and "val_tokens:3000 " in log
        loss, bpb = map(float, re.findall(r"^final_int6_zstd_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", log, re.M)[-1])
        assert f"{res['val_loss']:.8f}" == f"{loss:.8f}" and f"{res['val_bpb']:.8f}" == f"{bpb:.8f}"
        code, model, total = map(int, re.search(r"^artifact: code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)",
                                                log, re.M).groups())
        assert (sub["bytes_code"], res["bytes_model"], res["artifact_bytes"]) == (code, model, total)
        pre = re.findall(r"^step:3/3 val_loss:(\S+) val_bpb:(\S+)", log, re.M)[-1]
        assert f"{res['pre_quant_val_bpb']:.4f}" == pre[1] and res["steps"] == 3
    bpbs = [sub["seed_results"][s]["val_bpb"] for s in ("1", "2")]
    assert bpbs[0] != bpbs[1]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs)) and sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1))
    assert sub["bytes_total"] == max(sub["seed_results"][s]["artifact_bytes"] for s in ("1", "2"))
    readme = (folder / "README.md").read_text()
    assert "python train_gpt.py" in readme and f"{bpbs[1]:.8f}" in readme and " NUM_LAYERS=2 " in readme


def test_submission_refusals(data, tmp_path, monkeypatch):
    folder = tmp_path / "records" / "track_non_record_16mb" / "x"
    with pytest.raises(T.ConfigError, match="SUBMISSION_DIR.*whole validation split"):
        T.Hyperparameters.from_env(_sub_env(data, tmp_path, folder, VAL_MAX_TOKENS=4096))
    with pytest.raises(T.ConfigError, match="SUBMISSION_AUTHOR"):
        T.Hyperparameters.from_env(_sub_env(data, tmp_path, folder, SUBMISSION_AUTHOR=""))
    assert T.main(_sub_env(data, tmp_path, folder, SEED=1)) == 0
    assert T.main(_sub_env(data, tmp_path, folder, SEED=2, MATRIX_LR=0.02)) == 1  # another configuration
    assert ("it holds seeds of another configuration; these variables differ: MATRIX_LR (folder: 0.04, this run: "
            "0.02)") in (tmp_path / "tiny.txt").read_text()
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", 1000)
    assert T.main(_sub_env(data, tmp_path, folder, SEED=3)) == 1
    assert "bytes are over the cap" in (tmp_path / "tiny.txt").read_text()
    assert json.loads((folder / "submission.json").read_text())["seeds"] == [1]
