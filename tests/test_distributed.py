"""Data-parallel training and evaluation over mx.distributed (2 ranks started by mlx.launch with
the ring backend, on this machine), and the challenge's submission folder."""
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import ROOT, short_split, tiny_env

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


def test_two_ranks_make_a_new_out_dir(data, tmp_path):
    """OUT_DIR does not exist yet: the ranks make it before rank 0 opens its log there (it used to end rank 0 in a
    FileNotFoundError traceback, rank 1 killed, and mlx.launch exiting 0)."""
    out = tmp_path / "new" / "logs"
    _launch(tmp_path, tiny_env(data, out, ITERATIONS=2, VAL_MAX_TOKENS=1000), 2)
    log = (out / "tiny.txt").read_text()
    assert "world_size:2 backend:ring" in log and "final_int6_zstd_roundtrip_exact" in log
    assert (out / "tiny_model.int6.ptz").exists()


def test_eval_only_on_two_ranks_writes_the_same_nll_dump(data, tmp_path):
    """Ranks score disjoint batches (7 batches over 2 ranks: unequal shares); the gathered stream (NLL and
    entropy), mixed in order by the default (adaptive) mixer, is bit-identical to one process's, and so is
    val_bpb."""
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
        short_split(data, ds)
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


# ---------------------------------------------------------------------------- faults on one rank
# Each rank writes its pid (so a test can signal one rank); FAULT picks what goes wrong, and where.
FAULT_DRIVER = f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_gpt_mlx as T
rank, fault, env = int(os.environ["MLX_RANK"]), os.environ.get("FAULT", ""), dict(os.environ)
open(os.path.join(env["OUT_DIR"], f"pid{{rank}}"), "w").write(str(os.getpid()))
if fault == "out_dir" and rank == 1:  # this host's OUT_DIR is a file's subfolder
    env["OUT_DIR"] = os.path.join(env["OUT_DIR"], "pid0", "sub")
if fault == "memory" and rank == 1:  # this host has 64 MiB
    T.os.sysconf = lambda k: 4096 if k == "SC_PAGE_SIZE" else 64 * 2**20 // 4096
if fault == "diverge" and rank == 1:  # a bit flips in rank 1's weights after step 3
    one_step = T.one_step
    def flipped(r):
        loss = one_step(r)
        if r.step == 3:
            w = r.model.blocks[0].mlp.fc.weight
            r.model.blocks[0].mlp.fc.weight = w + 1e-3
        return loss
    T.one_step = flipped
sys.exit(T.main(env))
"""


def _start(tmp_path, env: dict, fault: str, blas_threads: str | None = "1") -> subprocess.Popen:
    """Two ranks under mlx.launch, in their own process group, as a shell would start them."""
    driver = tmp_path / "fault_driver.py"
    driver.write_text(FAULT_DRIVER)
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--", sys.executable, str(driver)]
    full = dict(os.environ, FAULT=fault, **env)
    full.pop("OPENBLAS_NUM_THREADS", None)
    if blas_threads:
        full["OPENBLAS_NUM_THREADS"] = blas_threads
    return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _ended_within(tmp_path, p: subprocess.Popen, seconds: float) -> str:
    """The launcher's console once every rank has ended; fails if any rank is still running after `seconds`."""
    try:
        out, _ = p.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        pytest.fail(f"the ranks were still running {seconds}s later: {p.communicate()[0][-3000:]}")
    pids = [int((tmp_path / f"pid{k}").read_text()) for k in (0, 1) if (tmp_path / f"pid{k}").exists()]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids), out[-3000:]
    return out


@pytest.mark.parametrize("fault, needle", [("out_dir", "OUT_DIR="), ("memory", "this run needs about")])
def test_a_setup_failure_on_one_rank_stops_every_rank_with_its_message(data, tmp_path, fault, needle):
    """Rank 1's check fails before warm-up: all ranks agree on it, rank 0's log names rank 1's reason, and
    nothing trains."""
    p = _start(tmp_path, tiny_env(data, tmp_path, ITERATIONS=5), fault)
    console = _ended_within(tmp_path, p, 60)
    log = (tmp_path / "tiny.txt").read_text()
    assert re.search(rf"^error: rank 1 failed, so every rank stops: \w+: .*{needle}", log, re.M), log
    assert "warmup_step" not in log and "Traceback" not in console


def test_rank_0_failing_to_write_the_artifact_stops_every_rank(data, tmp_path):
    """The artifact's path is a folder (a real OSError on rank 0 only: other ranks write a private copy): rank 0
    saves a checkpoint and says so; rank 1 does not wait in the round-trip evaluation."""
    (tmp_path / "tiny_model.int6.ptz").mkdir()
    (tmp_path / "tiny_model.int6.ptz" / "x").write_text("x")
    p = _start(tmp_path, tiny_env(data, tmp_path, ITERATIONS=3, VAL_MAX_TOKENS=1000), "")
    console = _ended_within(tmp_path, p, 120)
    log = (tmp_path / "tiny.txt").read_text()
    assert re.search(r"^error: cannot write the artifact .*saved in the checkpoint .*tiny_ckpt.pgck", log, re.M), log
    assert (tmp_path / "tiny_ckpt.pgck").exists()
    assert "[rank 1] error: rank 0 failed, so every rank stops: OSError: cannot write" in console
    assert "roundtrip" not in log


class _Rank1:
    def rank(self):
        return 1

    def size(self):
        return 2


def test_rescue_on_a_rank_above_0_claims_no_file(tmp_path):
    """Only rank 0 writes checkpoints: rank 1 must not say that weights were saved (it used to)."""
    hp = T.Hyperparameters.from_env({"OUT_DIR": str(tmp_path)})
    r = T.Run(hp, print, "x", 0, group=_Rank1())
    said = T.rescue_weights(r)
    assert "saved" not in said and "rank 0" in said and list(tmp_path.iterdir()) == []


def test_ranks_that_diverge_stop_at_the_next_checkpoint_with_rank_0_saved(data, tmp_path):
    """Rank 1's weights change at step 3: the checkpoint at step 4 compares them, keeps rank 0's state, stops."""
    p = _start(tmp_path, tiny_env(data, tmp_path, ITERATIONS=40, CHECKPOINT_EVERY=4, VAL_MAX_TOKENS=1000), "diverge")
    _ended_within(tmp_path, p, 120)
    log = (tmp_path / "tiny.txt").read_text()
    assert re.search(r"^ranks_checksum at step 4: .* agree:False \(ranks: \w{8} \w{8}\)$", log, re.M), log
    assert re.search(r"^error: ranks hold different weights at step 4; rank 0's state is saved in .*tiny_ckpt", log,
                     re.M)
    header, _ = T.read_container(str(tmp_path / "tiny_ckpt.pgck"), T.CHECKPOINT_MAGIC, "checkpoint")
    assert header["meta"]["step"] == 4 and "step:5/" not in log


@pytest.mark.parametrize("who", ["terminal", "rank 1"])
def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(data, tmp_path, who):
    """Ctrl-C at the terminal (SIGINT to the launcher's process group: every rank) or to one rank only: the ranks
    agree on it in the next step's all-max, stop after the same step, checkpoint, then evaluate and write."""
    p = _start(tmp_path, tiny_env(data, tmp_path, ITERATIONS=100000, VAL_MAX_TOKENS=1000, WARMDOWN_ITERS=0), "")
    log_path = tmp_path / "tiny.txt"
    deadline = time.time() + 120
    while not (log_path.exists() and "step:3/" in log_path.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    if who == "terminal":
        os.killpg(p.pid, signal.SIGINT)
    else:
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGINT)
    _ended_within(tmp_path, p, 90)
    log = log_path.read_text()
    step = int(re.search(r"^interrupted \(Ctrl-C\) at step (\d+): saving a checkpoint", log, re.M).group(1))
    assert re.search(rf"^ranks_checksum at step {step}: .* agree:True$", log, re.M), log
    assert f"checkpoint: step:{step} " in log and "final_int6_zstd_roundtrip_exact" in log
    assert (tmp_path / "tiny_model.int6.ptz").exists() and "Traceback" not in log


def test_a_rank_killed_mid_run_ends_the_others_with_a_message(data, tmp_path):
    """Rank 1 is killed (SIGKILL, as the kernel's out-of-memory killer does): rank 0's next collective loses its
    peer, and it stops with that message instead of a traceback, unless mlx.launch's SIGTERM ends it first.
    Started as documented, without OPENBLAS_NUM_THREADS: each rank takes its share of the cores."""
    p = _start(tmp_path, tiny_env(data, tmp_path, ITERATIONS=100000, VAL_MAX_TOKENS=1000), "", blas_threads=None)
    log_path = tmp_path / "tiny.txt"
    deadline = time.time() + 120
    while not (log_path.exists() and "step:3/" in log_path.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
    t0 = time.time()
    console = _ended_within(tmp_path, p, 30)
    assert time.time() - t0 < 30 and "Traceback" not in console
    said = re.search(r"^error: .* during training: another rank stopped", log_path.read_text(), re.M)
    assert said or "Node with rank 0 exited with code -15" in console, console[-2000:]
    if hasattr(ctypes.CDLL(None), "openblas_set_num_threads"):  # OpenBLAS preloaded, as the README's tests run
        share = max(1, (os.cpu_count() or 1) // 2)
        assert f"blas_threads:{share} per rank (2 ranks on this host" in log_path.read_text()
