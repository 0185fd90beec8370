"""The challenge's record folder (SUBMISSION_DIR): a packed train_gpt.py that runs inside the folder and is the
counted code, submission.json as the records write it, and the refusals that keep a folder honest."""
import ast
import base64
import inspect
import json
import lzma
import os
import platform
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import train_gpt_mlx as T
import sentencepiece as spm

from conftest import ROOT, ctrl_c_after, load_script, short_split, tiny_env

DATE_NAME = "2026-04-01_tiny"


@pytest.fixture
def repo(data, tmp_path):
    """A repository laid out as the challenge's: data/ at the default paths (a 3,000-token validation split, the
    sample's train shards), records/ for the folders."""
    root = tmp_path / "repo"
    short_split(data, root / "data" / "datasets" / "fineweb10B_sp1024")
    (root / "data" / "tokenizers").mkdir()
    (root / "data" / "tokenizers" / "fineweb_1024_bpe.model").symlink_to(data["tokenizer"])
    return root


def sub_env(data, repo, folder, **over) -> dict:
    out = repo.parent / "out"
    out.mkdir(exist_ok=True)
    env = tiny_env(data, out, DATA_PATH=repo / "data" / "datasets" / "fineweb10B_sp1024",
                   TOKENIZER_PATH=repo / "data" / "tokenizers" / "fineweb_1024_bpe.model", ITERATIONS=3,
                   VAL_MAX_TOKENS=0, SUBMISSION_DIR=folder, SUBMISSION_AUTHOR="Ada", SUBMISSION_GITHUB_ID="ada",
                   SUBMISSION_NAME="Tiny MLX", SUBMISSION_BLURB="two layers", SUBMISSION_UNOFFICIAL_DATA=1)
    env.update({k: str(v) for k, v in over.items()})
    return env


def folder_of(repo, track="track_non_record_16mb", name=DATE_NAME) -> Path:
    return repo / "records" / track / name


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def strict_json(path: Path) -> dict:
    def no_nan(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(path.read_text(), parse_constant=no_nan)


def run_log(repo, run_id: str) -> str:
    return (repo.parent / "out" / f"{run_id}.txt").read_text()


# ---------------------------------------------------------------------------- the folder
def test_two_seeds_make_a_folder_whose_train_gpt_rescores_from_inside_it(data, repo):
    folder = folder_of(repo)
    for seed in (1, 2):
        assert T.main(sub_env(data, repo, folder, SEED=seed, RUN_ID=f"s{seed}")) == 0
    assert sorted(snapshot(folder)) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                                        "train_gpt_mlx.py", "train_seed1.log", "train_seed2.log"]
    assert [p.name for p in folder.parent.iterdir()] == [DATE_NAME]  # no lock file, no temporary folder
    sub = strict_json(folder / "submission.json")
    code = (folder / "train_gpt.py").stat().st_size
    assert sub["bytes_code"] == code  # no byte target: the 16,000,000 cap counts code + model
    assert code < (folder / "train_gpt_mlx.py").stat().st_size / 3
    for key in ("author", "github_id", "name", "blurb", "date", "hardware", "mlx_version"):
        assert isinstance(sub[key], str) and sub[key], key
    assert sub["track"] == "non_record_16mb" and sub["seeds"] == [1, 2] and sub["mlx_version"] == T.mx.__version__
    ds = repo / "data" / "datasets" / "fineweb10B_sp1024"
    val = np.fromfile(ds / "fineweb_val_000000.bin", "<u2", offset=1024)
    bos = spm.SentencePieceProcessor(model_file=data["tokenizer"]).bos_id()
    assert sub["validation"] == {"tokens": 3000, "documents": int(np.count_nonzero(val == bos)), "official": False}
    trains = sorted(ds.glob("fineweb_train_*.bin"))
    assert sub["train_data"] == {"shards": len(trains), "tokens": sum((p.stat().st_size - 1024) // 2 for p in trains)}
    assert sub["python_version"] == platform.python_version()  # the packed bytes depend on it
    assert sub["config"] == {"ITERATIONS": 3, "TRAIN_BATCH_TOKENS": 1024, "TRAIN_SEQ_LEN": 64, "GRAD_ACCUM_STEPS": 1,
                             "WARMUP_STEPS": 1, "WARMDOWN_ITERS": 5, "MAX_WALLCLOCK_SECONDS": 0.0,
                             "VAL_BATCH_SIZE": 4096, "NUM_LAYERS": 2, "MODEL_DIM": 64, "NUM_HEADS": 4,
                             "NUM_KV_HEADS": 2, **({} if data["vocab_size"] == 1024 else
                                                   {"VOCAB_SIZE": data["vocab_size"]})}
    for seed in ("1", "2"):
        res, log = sub["seed_results"][seed], (folder / f"train_seed{seed}.log").read_text()
        assert run_log(repo, f"s{seed}").startswith(log)
        exact = re.findall(r"^final_int6_zstd_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", log, re.M)[-1]
        assert (f"{res['val_loss']:.8f}", f"{res['val_bpb']:.8f}") == exact
        line = re.search(r"^artifact: code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+) source_bytes:(\d+) ",
                         log, re.M)
        assert (int(line[1]), int(line[2]), int(line[3])) == (code, res["bytes_model"], res["artifact_bytes"])
        assert int(line[4]) == (ROOT / "train_gpt_mlx.py").stat().st_size
        assert res["steps"] == 3 and res["train_seconds"] > 0 and res["eval_seconds"] > 0
    bpbs = [sub["seed_results"][s]["val_bpb"] for s in ("1", "2")]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs)) and sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1))
    assert sub["bytes_total"] == max(sub["seed_results"][s]["artifact_bytes"] for s in ("1", "2"))
    reqs = (folder / "requirements.txt").read_text().split()
    assert reqs[0].startswith(("mlx==", "mlx[cpu]==", "mlx[cuda12]==", "mlx[cuda13]=="))
    assert [r.split("==")[0] for r in reqs[1:]] == ["numpy", "sentencepiece", "zstandard", "brotli"]
    readme = (folder / "README.md").read_text()
    assert "UNOFFICIAL DATA" in readme and sub["hardware"] in readme and "cached_challenge_fineweb.py" in readme
    assert "`train_gpt.py` (" in readme and "is the counted code" in readme and f"{bpbs[1]:.8f}" in readme
    assert f"{code} code (packed by Python {platform.python_version()})" in readme
    assert f"training data: {len(trains)} train shard(s) ({sub['train_data']['tokens']} tokens)" in readme
    downloader = inspect.signature(load_script("data/cached_challenge_fineweb.py").download)
    default_shards = downloader.parameters["train_shards"].default
    assert f"the validation split and {default_shards} train shards (" in readme  # what it fetches unasked
    commands = [line for line in readme.splitlines() if line.endswith("python train_gpt.py")]
    assert len(commands) == 2 and all(f"SEED={s} " in c for s, c in zip((1, 2), commands))
    words = dict(w.split("=", 1) for w in shlex.split(commands[0])[:-2])
    assert words["TOKENIZER_PATH"] == "../../../data/tokenizers/fineweb_1024_bpe.model"
    assert words["DATA_PATH"] == "../../../data/datasets/fineweb10B_sp1024" and words["NUM_LAYERS"] == "2"
    assert words["OUT_DIR"] == "../../../../out"  # where the seeds' logs went: outside the folder

    # the README's seed-1 variables, from inside the folder, with DATA_PATH and TOKENIZER_PATH left to find
    # the repository's data/: the packed train_gpt.py re-scores seed 1's artifact
    env = {k: v for k, v in os.environ.items() if k not in words}
    env.update({k: v for k, v in words.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "OUT_DIR")})
    env.update(EVAL_ONLY="1", LOAD_ARTIFACT=str(repo.parent / "out" / "s1_model.int6.ptz"), RUN_ID="rescore",
               OUT_DIR=str(repo.parent / "rescore"))
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (repo.parent / "rescore" / "rescore.txt").read_text()
    assert f"DATA_PATH={repo / 'data' / 'datasets' / 'fineweb10B_sp1024'} " in log
    rescored = re.search(r"^eval_only_exact val_loss:(\S+) val_bpb:(\S+)", log, re.M).groups()
    seed1 = sub["seed_results"]["1"]
    assert rescored == (f"{seed1['val_loss']:.8f}", f"{seed1['val_bpb']:.8f}")  # the same to all 8 logged digits
    assert sorted(snapshot(folder)) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                                        "train_gpt_mlx.py", "train_seed1.log", "train_seed2.log"]


def test_packed_script_is_the_source_without_docstrings():
    """What train_gpt.py runs parses to the same program as train_gpt_mlx.py, docstrings, function annotations and
    the packer (which only the readable script can reach) aside, and none of those remain."""
    packed = T.counted_script().decode()
    blob = re.search(r'b85decode\("([^"]+)"\)', packed)[1]
    code = lzma.decompress(base64.b85decode(blob), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
    source = (ROOT / "train_gpt_mlx.py").read_text()
    whole = T.stripped_tree(source)
    assert ast.dump(ast.parse(code)) == ast.dump(T.packed_tree(source))
    left_out = [node.name for node in whole.body if ast.dump(node) not in {ast.dump(n) for n in ast.parse(code).body}]
    assert sorted(left_out) == sorted(T.PACKER_ONLY)  # the packer, and nothing else
    assert "Parameter Golf in MLX" in source and "Parameter Golf in MLX" not in code  # the module docstring
    assert "# ======== Hyperparameters" not in code and "def lr_multiplier(step,elapsed_ms,hp):" in code


def run_packed(cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """python train_gpt.py in cwd: the packed script, run as the challenge runs it."""
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=cwd, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)


def test_the_packed_script_trains_a_seed_and_needs_its_readable_source_beside_it(data, repo):
    """The folder's train_gpt.py trains a seed (not only EVAL_ONLY), and the folder's readable copy stays the source
    of the code that ran. Without that source beside it, or with another version there, a seed is refused before
    any work: the packed code is no readable copy (it lacks the packer), and a copy compared with itself proves
    nothing."""
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    before = snapshot(folder)
    done = run_packed(folder, sub_env(data, repo, folder, SEED=2, RUN_ID="p2"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    after = snapshot(folder)
    assert strict_json(folder / "submission.json")["seeds"] == [1, 2] and "train_seed2.log" in after
    assert after["train_gpt.py"] == before["train_gpt.py"]
    assert after["train_gpt_mlx.py"] == (ROOT / "train_gpt_mlx.py").read_bytes()
    assert f"source_bytes:{len(after['train_gpt_mlx.py'])} " in run_log(repo, "p2")
    assert "step:3/3 train_loss:" in run_log(repo, "p2")

    lone = repo.parent / "lone"  # the packed script alone
    lone.mkdir()
    (lone / "train_gpt.py").write_bytes(before["train_gpt.py"])
    elsewhere = folder_of(repo, name="2026-04-02_lone")
    (folder / "train_gpt_mlx.py").write_bytes(after["train_gpt_mlx.py"] + b"\n\ndef another_version():\n    return 1\n")
    for cwd, dest, run_id in ((lone, elsewhere, "lone"), (folder, folder, "p3")):
        done = run_packed(cwd, sub_env(data, repo, dest, SEED=3, RUN_ID=run_id))
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        log = run_log(repo, run_id)
        assert "no train_gpt_mlx.py beside it is the source of that code" in log
        _no_work(log)
    assert not elsewhere.exists() and strict_json(folder / "submission.json")["seeds"] == [1, 2]


def test_a_traceback_in_the_packed_code_shows_no_line_of_another_file(repo):
    """The packed code is compiled under a name that is no file: under train_gpt_mlx.py's, a traceback printed the
    readable copy's lines at the packed code's line numbers."""
    d = repo.parent / "packed"
    d.mkdir()
    (d / "train_gpt.py").write_bytes(T.counted_script())
    (d / "train_gpt_mlx.py").write_bytes((ROOT / "train_gpt_mlx.py").read_bytes())
    probe = textwrap.dedent("""
        import json, runpy, traceback
        g = runpy.run_path("train_gpt.py", run_name="packed")
        try:
            g["shard_header"]("missing.bin")
        except OSError as e:
            print(json.dumps([(f.filename, f.line) for f in traceback.extract_tb(e.__traceback__)]))
        """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=d, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    frames = json.loads(done.stdout.splitlines()[-1])
    assert frames[1][0] == T.PACKED_CODE_NAME and not frames[1][1]  # shard_header: named, and no line shown
    assert not (d / T.PACKED_CODE_NAME).exists()


# ---------------------------------------------------------------------------- refused before any work
def _no_work(log: str):
    assert "warmup" not in log and "step:1/" not in log


def test_unofficial_split_wrong_track_and_bad_names_are_refused_before_any_work(data, repo):
    folder = folder_of(repo)
    env = sub_env(data, repo, folder, RUN_ID="unofficial")
    del env["SUBMISSION_UNOFFICIAL_DATA"]
    assert T.main(env) == 1
    log = run_log(repo, "unofficial")
    assert "is not the challenge's (3000 tokens" in log and "SUBMISSION_UNOFFICIAL_DATA=1" in log
    _no_work(log)
    ten = folder_of(repo, "track_10min_16mb")
    assert T.main(sub_env(data, repo, ten, RUN_ID="untimed", MAX_WALLCLOCK_SECONDS=0)) == 1
    assert "track_10min_16mb needs MAX_WALLCLOCK_SECONDS in (0, 600]" in run_log(repo, "untimed")
    _no_work(run_log(repo, "untimed"))
    assert not folder.exists() and not ten.exists()
    with pytest.raises(T.ConfigError, match="must be records/<track>/<date>_<name>"):
        T.Hyperparameters.from_env(sub_env(data, repo, repo / "records" / "track_10min" / DATE_NAME))
    with pytest.raises(T.ConfigError, match="SUBMISSION_BLURB"):
        T.Hyperparameters.from_env(sub_env(data, repo, folder, SUBMISSION_BLURB=""))
    with pytest.raises(T.ConfigError, match="whole validation split"):
        T.Hyperparameters.from_env(sub_env(data, repo, folder, VAL_MAX_TOKENS=1000))


def test_another_configuration_is_named_before_any_work_and_bookkeeping_is_not_configuration(data, repo):
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    assert T.main(sub_env(data, repo, folder, SEED=2, RUN_ID="other", MATRIX_LR=0.02, NUM_LAYERS=3)) == 1
    log = run_log(repo, "other")
    assert ("it holds seeds of another configuration; these variables differ: MATRIX_LR (folder: 0.04, this run: "
            "0.02), NUM_LAYERS (folder: 2, this run: 3)") in log
    _no_work(log)
    assert T.main(sub_env(data, repo, folder, SEED=2, RUN_ID="s2", TRAIN_LOG_EVERY=5, VAL_LOSS_EVERY=2,
                          CHECKPOINT_EVERY=2, STRICT_ENV=1)) == 0
    assert strict_json(folder / "submission.json")["seeds"] == [1, 2]


def test_seeds_trained_on_other_amounts_of_data_are_another_configuration(data, repo):
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    ds = repo / "data" / "datasets" / "fineweb10B_sp1024"
    more = repo.parent / "more"  # the same shards and one more
    more.mkdir()
    for p in ds.iterdir():
        (more / p.name).symlink_to(p.resolve())
    trains = sorted(ds.glob("fineweb_train_*.bin"))
    (more / "fineweb_train_999999.bin").symlink_to(trains[0].resolve())
    tokens = [sum((p.stat().st_size - 1024) // 2 for p in ps) for ps in (trains, trains + trains[:1])]
    assert T.main(sub_env(data, repo, folder, SEED=2, RUN_ID="more", DATA_PATH=more)) == 1
    log = run_log(repo, "more")
    assert (f"its seeds trained with {len(trains)} train shard(s) ({tokens[0]} tokens) in DATA_PATH and this run has "
            f"{len(trains) + 1} train shard(s) ({tokens[1]} tokens)") in log
    _no_work(log)
    assert strict_json(folder / "submission.json")["seeds"] == [1]


def test_a_submission_json_this_script_did_not_write_is_refused_before_any_work(data, repo):
    """One whose configuration and split agree with the run's passed the preflight: the seed trained, then merging
    it failed (a KeyError traceback, nothing written)."""
    folder = folder_of(repo)
    folder.mkdir(parents=True)
    env = sub_env(data, repo, folder)
    agrees = dict(config=T.result_config(T.Hyperparameters.from_env(env)), validation={"official": False})
    for i, (foreign, why) in enumerate(((dict(agrees, author="Ada", val_bpb=1.2, seeds=[1]), "no seed_results"),
                                        ([1.2], "it is not a JSON object"),
                                        (dict(agrees, seed_results={"1": {"val_bpb": 1.2}}, train_data={}),
                                         "seed '1' lacks val_loss, pre_quant_val_loss"))):
        (folder / "submission.json").write_text(json.dumps(foreign))
        assert T.main(dict(env, RUN_ID=f"foreign{i}")) == 1
        log = run_log(repo, f"foreign{i}")
        assert "its submission.json was not written by this version of train_gpt_mlx.py (" + why in log
        _no_work(log)
    assert sorted(snapshot(folder)) == ["submission.json"]


def test_resume_override_cannot_write_a_seed(data, repo, capsys):
    """Its command would not reproduce it: the folder shows only the final values of what changed part way."""
    folder = folder_of(repo)
    env = sub_env(data, repo, folder, RUN_ID="half", ITERATIONS=4, CHECKPOINT_EVERY=2)
    assert T.main({k: v for k, v in env.items() if not k.startswith("SUBMISSION_")}) == 0  # a checkpoint at step 2
    ckpt = repo.parent / "out" / "half_ckpt.pgck"
    assert ckpt.exists()
    assert T.main(dict(env, RUN_ID="rest", RESUME_FROM=str(ckpt), MATRIX_LR="0.02", RESUME_OVERRIDE="1")) == 2
    assert "RESUME_OVERRIDE=1 cannot write a seed (SUBMISSION_DIR)" in capsys.readouterr().err
    assert not folder.exists()


# ---------------------------------------------------------------------------- refused at the end
def test_the_cap_counts_the_packed_code_not_the_source(data, repo, monkeypatch):
    """A model that fits beside the packed train_gpt.py is taken, though it would not fit beside the source."""
    assert T.main(sub_env(data, repo, folder_of(repo, name="2026-04-01_probe"), RUN_ID="probe")) == 0
    model = int(re.search(r"model_bytes:(\d+)", run_log(repo, "probe"))[1])
    code = len(T.counted_script())
    source = (ROOT / "train_gpt_mlx.py").stat().st_size
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", model + code + 1000)
    assert model + code + 1000 < model + source
    assert T.main(sub_env(data, repo, folder_of(repo), RUN_ID="fits")) == 0
    assert " OK codec:" in run_log(repo, "fits") and (folder_of(repo) / "submission.json").exists()


def test_an_interrupted_run_writes_no_seed_and_its_resumed_run_is_one_seed_with_the_whole_log(data, repo,
                                                                                               monkeypatch):
    folder = folder_of(repo)
    ctrl_c_after(monkeypatch, T, 3)
    env = sub_env(data, repo, folder, SEED=1, RUN_ID="cut", ITERATIONS=20, WARMUP_STEPS=0, CHECKPOINT_EVERY=100)
    assert T.main(env) == 130
    log = run_log(repo, "cut")
    assert re.search(r"refused: the run was interrupted \(Ctrl-C\) at step \d+ of ITERATIONS=20; the seed was not "
                     "written", log)
    assert not folder.exists()
    monkeypatch.undo()
    ckpt = repo.parent / "out" / "cut_ckpt.pgck"
    assert T.main({**env, "RUN_ID": "rest", "RESUME_FROM": str(ckpt)}) == 0
    res = strict_json(folder / "submission.json")["seed_results"]["1"]
    assert res["steps"] == 20 and res["resumed_from"] == "cut" and res["run_id"] == "rest"
    seed_log = (folder / "train_seed1.log").read_text()
    assert seed_log.startswith(log) and "# resumed by RUN_ID=rest\n" in seed_log
    assert "step:20/20 val_loss:" in seed_log and "step:1/20 train_loss:" in seed_log


def test_a_ctrl_c_in_the_final_evaluation_still_writes_the_seed_and_exits_130(data, repo, monkeypatch):
    """Training was complete: the evaluation in flight finishes, the seed is written, the exit says Ctrl-C."""
    folder = folder_of(repo)
    ctrl_c_after(monkeypatch, T, 0, "periodic_eval")  # VAL_LOSS_EVERY=0: the only call is the final one
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="late_c")) == 130
    log = run_log(repo, "late_c")
    assert "exit 130: interrupted (Ctrl-C) at step 3/3" in log and "training had already finished" in log
    assert strict_json(folder / "submission.json")["seed_results"]["1"]["steps"] == 3


def test_training_stopped_short_writes_no_seed(data, repo, monkeypatch):
    folder = folder_of(repo)
    real = T.train

    def short(r):  # training that ends before ITERATIONS without a wall-clock cap (not a Ctrl-C)
        real(r)
        r.step -= 1
    monkeypatch.setattr(T, "train", short)
    assert T.main(sub_env(data, repo, folder, RUN_ID="short")) == 1
    assert "refused: training stopped at step 2 of ITERATIONS=3" in run_log(repo, "short")
    assert not folder.exists()


def test_track_10min_takes_a_timed_run_and_refuses_one_over_the_limit(data, repo, monkeypatch):
    ten = folder_of(repo, "track_10min_16mb")
    assert T.main(sub_env(data, repo, ten, RUN_ID="timed", MAX_WALLCLOCK_SECONDS=600)) == 0
    assert strict_json(ten / "submission.json")["track"] == "10min_16mb"
    monkeypatch.setattr(T, "TRACK_LIMIT_S", 0.001)  # a 1 ms track: the cap stops training, evaluation is over
    late = folder_of(repo, "track_10min_16mb", "2026-04-01_late")
    assert T.main(sub_env(data, repo, late, RUN_ID="late", ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=0.001)) == 1
    assert re.search(r"refused: evaluation took [\d.]+s, over track_10min_16mb's 0s", run_log(repo, "late"))
    assert not late.exists()
    real = T.preflight_submission

    def then_a_shorter_track(r):  # training past the track's limit: the cap that held it was longer than the track
        real(r)
        monkeypatch.setattr(T, "TRACK_LIMIT_S", 0.001)
    monkeypatch.setattr(T, "TRACK_LIMIT_S", 600.0)
    monkeypatch.setattr(T, "preflight_submission", then_a_shorter_track)
    over = folder_of(repo, "track_10min_16mb", "2026-04-01_over")
    assert T.main(sub_env(data, repo, over, RUN_ID="over", MAX_WALLCLOCK_SECONDS=600)) == 1
    assert re.search(r"refused: training took [\d.]+s and its last step began at [\d.]+s, past track_10min_16mb's 0s",
                     run_log(repo, "over"))
    assert not over.exists()


def test_track_10min_takes_a_run_whose_last_step_began_within_the_limit(data, repo, monkeypatch):
    """The cap is checked after each step, so the last step may end past the limit: a slow last step (here 9 s, the
    limit 4 s) is taken, as the 10-minute rule is checked. The average step is no measure of when it began."""
    monkeypatch.setattr(T, "TRACK_LIMIT_S", 4.0)
    real, calls = T.train_step, []

    def slow_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(9.0)
        return real(*args, **kw)
    monkeypatch.setattr(T, "train_step", slow_third)
    ten = folder_of(repo, "track_10min_16mb")
    env = sub_env(data, repo, ten, RUN_ID="slow", MAX_WALLCLOCK_SECONDS=4, WARMUP_STEPS=0)  # call 3 is step 3
    assert T.main(env) == 0, run_log(repo, "slow")[-600:]
    res = strict_json(ten / "submission.json")["seed_results"]["1337"]
    assert res["steps"] == 3 and res["train_seconds"] > 9


# ---------------------------------------------------------------------------- writing the folder
def test_a_failure_while_writing_leaves_the_folder_as_it_was(data, repo, monkeypatch):
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    before = snapshot(folder)
    real, calls = Path.write_bytes, []

    def disk_full_at_the_json(self, data):  # the last file: the new log and README are written by then
        calls.append(self.name)
        if self.name == "submission.json":
            raise OSError(28, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_json)
    assert T.main(sub_env(data, repo, folder, SEED=2, RUN_ID="s2")) == 1
    monkeypatch.undo()
    assert {"train_seed2.log", "README.md"} < set(calls) and "No space left on device" in run_log(repo, "s2")
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [DATE_NAME]


KILL_DRIVER = """import os, signal, sys
sys.path.insert(0, {root!r})
import train_gpt_mlx as T
write_folder = T.write_folder
def killed_after(real):  # the first change of folders is made, then this process is killed (SIGKILL)
    def call(*args):
        out = real(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return out
    return call
def write(d, files):
    if {two_renames}:  # a system that cannot swap two folders in one step
        T.exchange_folders = lambda a, b: False
    elif hasattr(T, "exchange_folders"):
        T.exchange_folders = killed_after(T.exchange_folders)
    os.rename = killed_after(os.rename)
    write_folder(d, files)
T.write_folder = write
sys.exit(T.main())
"""


@pytest.mark.parametrize("two_renames", [False, True], ids=["exchange", "two_renames"])
def test_a_kill_while_the_folder_is_swapped_leaves_it_whole_or_put_back(data, repo, two_renames):
    """A real SIGKILL right after the swap's first change of folders. Where two folders swap in one step the
    folder is whole at that instant; with two renames it is missing, and the next seed puts the old one back."""
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    a, b = repo.parent / "probe_a", repo.parent / "probe_b"
    a.mkdir()
    b.mkdir()
    if not two_renames and not T.exchange_folders(a, b):
        pytest.skip("this file system cannot swap two folders in one step")
    driver = repo.parent / "kill_driver.py"
    driver.write_text(KILL_DRIVER.format(root=str(ROOT), two_renames=two_renames))
    env = dict(os.environ, **sub_env(data, repo, folder, SEED=2, RUN_ID="s2"))
    done = subprocess.run([sys.executable, str(driver)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stdout[-2000:] + done.stderr[-2000:]
    if two_renames:
        assert not folder.exists()  # what README "Submitting" says: the instant between the renames
    else:
        assert strict_json(folder / "submission.json")["seeds"] == [1, 2] and "train_seed2.log" in snapshot(folder)
    assert T.main(sub_env(data, repo, folder, SEED=3, RUN_ID="s3")) == 0
    assert strict_json(folder / "submission.json")["seeds"] == ([1, 3] if two_renames else [1, 2, 3])
    assert [p.name for p in folder.parent.iterdir()] == [DATE_NAME]


DRIVER = """import sys, time
sys.path.insert(0, {root!r})
import train_gpt_mlx as T
write_folder = T.write_folder
def slow(d, files):  # the json is read; the folder is written 3 s later: long enough for the other seed to arrive
    time.sleep(3)
    write_folder(d, files)
T.write_folder = slow
sys.exit(T.main())
"""


def test_two_seeds_writing_at_once_both_land(data, repo):
    """Two real processes add their seeds at the same time: each reads the json, then writes slowly. Without the
    lock the later writer would drop the earlier one's seed."""
    folder = folder_of(repo)
    driver = repo.parent / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    procs = []
    for seed in (1, 2):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **sub_env(data, repo, folder, SEED=seed, RUN_ID=f"s{seed}"))
        procs.append(subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], textwrap.shorten(" | ".join(outs), 3000)
    sub = strict_json(folder / "submission.json")
    assert sub["seeds"] == [1, 2]
    assert {"train_seed1.log", "train_seed2.log"} <= set(snapshot(folder))


def test_a_seed_that_cannot_get_the_lock_is_refused_clearly(data, repo, monkeypatch):
    folder = folder_of(repo)
    assert T.main(sub_env(data, repo, folder, SEED=1, RUN_ID="s1")) == 0
    before = snapshot(folder)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = os.open({str(folder.parent)!r}, os.O_RDONLY)  # the track folder: seeds lock it, no lock file
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(T, "SUBMISSION_LOCK_WAIT_S", 1.0)
        assert T.main(sub_env(data, repo, folder, SEED=2, RUN_ID="s2")) == 1
    finally:
        holder.kill()
        holder.wait()
    assert "another run has been writing its seed into" in run_log(repo, "s2") and "for 1s" in run_log(repo, "s2")
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == [DATE_NAME]


# ---------------------------------------------------------------------------- small parts
def test_the_official_split_is_known_by_its_token_count_else_by_its_documents(data, repo, monkeypatch):
    hp = T.Hyperparameters.from_env(sub_env(data, repo, folder_of(repo)))
    facts = T.val_split_facts(hp)
    assert facts["tokens"] == 3000 and not facts["official"]
    monkeypatch.setattr(T, "OFFICIAL_VAL_TOKENS", {hp.vocab_size: 3000})
    assert T.val_split_facts(hp)["official"]
    monkeypatch.setattr(T, "OFFICIAL_VAL_TOKENS", {hp.vocab_size: 3001})
    assert not T.val_split_facts(hp)["official"]
    monkeypatch.setattr(T, "OFFICIAL_VAL_TOKENS", {})  # another tokenizer: 50,000 documents (BOS tokens)
    assert not T.val_split_facts(hp)["official"]
    monkeypatch.setattr(T, "OFFICIAL_VAL_DOCS", facts["documents"])
    assert T.val_split_facts(hp)["official"]


def test_the_official_sp8192_split_is_known_by_its_documents_and_whole_windows(data, repo, monkeypatch):
    """sp8192's split (kevclark/parameter-golf) is known by 50,000 documents and the count the records log,
    40,540,160 tokens in whole 2,048-token windows (plus one target): n in 40,540,161..40,542,208."""
    import dataclasses
    hp = T.Hyperparameters.from_env(sub_env(data, repo, folder_of(repo)))
    split = {}

    def fake_split(n_tokens, n_docs):
        toks = np.full(n_tokens, 7, np.uint16)
        toks[np.arange(n_docs) * (n_tokens // n_docs)] = T.BOS_ID  # each document opened by BOS
        split["tokens"] = toks

    monkeypatch.setattr(T, "load_validation_tokens", lambda path, max_tokens, vocab: split["tokens"])
    cases = [(8192, 40_540_161, 50_000, True), (8192, 40_542_208, 50_000, True),
             (8192, 40_540_160, 50_000, False), (8192, 40_542_209, 50_000, False),
             (8192, 40_540_161, 49_999, False), (1024, 40_540_161, 50_000, False),
             (1024, 62_021_846, 50_000, True)]
    for vocab, n_tokens, n_docs, official in cases:
        fake_split(n_tokens, n_docs)
        facts = T.val_split_facts(dataclasses.replace(hp, vocab_size=vocab))
        assert facts == dict(tokens=n_tokens, documents=n_docs, official=official), (vocab, n_tokens, n_docs)
    known = T.official_split_text()
    assert "50,000 documents" in known and "62,021,846 tokens for sp1024" in known
    assert "40,540,160 in whole 2,048-token windows for sp8192" in known


def test_requirements_name_the_mlx_build_that_ran(monkeypatch):
    from importlib import metadata
    real = metadata.version

    def only(dist):
        def version(name):
            if name.startswith("mlx-") and name != dist:
                raise metadata.PackageNotFoundError(name)
            return real("mlx") if name == dist else real(name)
        return version
    for dist, want in (("mlx-cuda-13", "mlx[cuda13]=="), ("mlx-cuda-12", "mlx[cuda12]=="), ("mlx-cpu", "mlx[cpu]=="),
                       ("none", "mlx==")):
        monkeypatch.setattr(metadata, "version", only(dist))
        assert T.requirements_text().startswith(want + T.mx.__version__ + "\n")


@pytest.mark.skipif(not Path(sys.executable).with_name("mlx.launch").exists(), reason="needs mlx.launch")
def test_two_ranks_write_one_seed_and_say_how_they_ran(data, repo):
    """Every rank checks the folder before any work; rank 0 alone writes it; the README's command launches the ranks."""
    folder = folder_of(repo)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **sub_env(data, repo, folder, SEED=1, RUN_ID="two"))
    cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", "2", "--backend", "ring", "--", sys.executable,
           "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train_gpt_mlx as T; sys.exit(T.main())"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sub = strict_json(folder / "submission.json")
    assert sub["seeds"] == [1] and "2 ranks over MLX's ring backend" in sub["hardware"]
    assert "world_size:2 " in (folder / "train_seed1.log").read_text()
    assert "mlx.launch -n 2 --backend ring -- python train_gpt.py" in (folder / "README.md").read_text()
