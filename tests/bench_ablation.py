"""Ablation benchmark (prints numbers; not a test): trains one fixed tiny config on shards built
from ../shared/fineweb_sample (generated text when absent) for each training-side piece alone and
the full stack, over several seeds, and prints a markdown table of val_bpb after the int6 round
trip, its change vs the baseline, ms/step, parameters and artifact bytes.

    python tests/bench_ablation.py [--seeds 1337 1338] [--steps 100] [--only baseline full]
"""
import argparse
import contextlib
import io
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from conftest import SAMPLE, generated_docs, load_script  # noqa: E402

ENGRAM = dict(ENGRAM_LITE_ENABLED=1, ENGRAM_HASH_SIZE=2048, ENGRAM_DIM=32, ENGRAM_HEADS=2)
SKIPGRAM = dict(SKIPGRAM_HASH_SIZE=2048, SKIPGRAM_DIM=16)
FULL = dict(ENGRAM, **SKIPGRAM, EMA_DECAY=0.95, QAT_START_FRAC=0.7)
CONFIGS = {  # defaults: engram in logit form with a Muon projection, skipgram with an Adam projection
    "baseline": {},
    "engram (logit)": dict(ENGRAM),
    "engram (input)": dict(ENGRAM, ENGRAM_MODE="input"),
    "engram (logit, adam proj)": dict(ENGRAM, ENGRAM_PROJ_OPTIMIZER="adam"),
    "skipgram": dict(SKIPGRAM),
    "skipgram (muon proj)": dict(SKIPGRAM, SKIPGRAM_PROJ_OPTIMIZER="muon"),
    "complement a=0.5": dict(COMPLEMENT_ALPHA=0.5),
    "ema 0.95": dict(EMA_DECAY=0.95),
    "qat from 0.7": dict(QAT_START_FRAC=0.7),
    "full stack (all five)": dict(FULL, COMPLEMENT_ALPHA=0.5),
    "full stack without complement": FULL,
}


def make_data(tmp: Path) -> dict:
    bs = load_script("data/build_shards.py")
    if (SAMPLE / "docs_200.jsonl").exists():
        docs, tok, vocab = SAMPLE / "docs_200.jsonl", SAMPLE / "fineweb_1024_bpe.model", None
    else:
        docs = tmp / "docs.txt"
        docs.write_text("\n\n".join(generated_docs(200)))
        tok, vocab = tmp / "tok.model", 320
    s = bs.build_shards(docs, tok, tmp / "ds", val_docs=50, train_tokenizer_vocab=vocab, log=lambda *_: None)
    return dict(DATA_PATH=str(tmp / "ds"), TOKENIZER_PATH=str(tok), VOCAB_SIZE=str(s["vocab_size"]))


def run_one(base: dict, over: dict, seed: int, out: Path, rid: str) -> dict:
    env = dict(base, **{k: str(v) for k, v in over.items()}, SEED=str(seed), RUN_ID=rid, OUT_DIR=str(out))
    with contextlib.redirect_stdout(io.StringIO()):  # the run's log goes to its file only
        assert T.main(env) == 0, f"run {rid} failed"
    log = (out / f"{rid}.txt").read_text()
    steps = re.findall(r"^step:(\d+)/\d+ train_loss:[\d.]+ train_time:(\d+)ms", log, re.M)
    (s0, t0), (s1, t1) = steps[4], steps[-1]  # skip the first steps (QAT switch recompiles later)
    return dict(bpb=float(re.search(r"^final_int6_[a-z]+_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1]),
                ms=(int(t1) - int(t0)) / (int(s1) - int(s0)),
                params=int(re.search(r"params:(\d+)", log)[1]),
                bytes=int(re.search(r"model_bytes:(\d+)", log)[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", nargs="*", default=None, help="config names (substring match)")
    a = p.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not a.only or any(o in k for o in a.only)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = dict(make_data(tmp), ITERATIONS=str(a.steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="128",
                    GRAD_ACCUM_STEPS="1", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2",
                    WARMUP_STEPS="2", WARMDOWN_ITERS=str(a.steps // 3), MAX_WALLCLOCK_SECONDS="0",
                    VAL_MAX_TOKENS="32768", VAL_BATCH_SIZE="16384", TRAIN_LOG_EVERY="10", MATRIX_LR="0.04")
        res = {k: [] for k in configs}
        t_start = time.time()
        for seed in a.seeds:  # seeds outermost, so a drift in machine speed hits every config alike
            for i, (name, over) in enumerate(configs.items()):
                res[name].append(run_one(base, over, seed, tmp, f"r{seed}_{i}"))
                print(f"# {name} seed {seed}: {res[name][-1]} ({time.time() - t_start:.0f}s)", file=sys.stderr)
    import mlx.core as mx
    print(f"\n{a.steps} steps x 2048 tokens, 2 layers x 128 dim, seq 128, vocab {base['VOCAB_SIZE']}, "
          f"val = first 32768 tokens of the sample's val split; seeds {a.seeds}; {mx.default_device()}, mlx {mx.__version__}\n")
    print("| config | val_bpb (int6 roundtrip), mean ± half-range | Δ vs baseline | ms/step | params | artifact bytes |")
    print("|---|---|---|---|---|---|")
    b = statistics.mean(r["bpb"] for r in res.get("baseline", [])) if "baseline" in res else None
    bms = statistics.mean(r["ms"] for r in res["baseline"]) if b is not None else None
    for name, rs in res.items():
        bpbs = [r["bpb"] for r in rs]
        m, half = statistics.mean(bpbs), (max(bpbs) - min(bpbs)) / 2
        ms = statistics.mean(r["ms"] for r in rs)
        d = f"{m - b:+.4f}" if b is not None else "—"
        over = f" ({(ms / bms - 1) * 100:+.0f}%)" if bms else ""
        print(f"| {name} | {m:.4f} ± {half:.4f} | {d} | {ms:.0f}{over} | {rs[0]['params']:,} | {rs[0]['bytes']:,} |")


if __name__ == "__main__":
    main()
