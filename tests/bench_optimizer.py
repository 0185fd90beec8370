"""The sp8192 optimizer pieces one at a time (issue 23, item 3): prints the README table "The sp8192 optimizer
pieces, one at a time". 3 layers x 96 on the FineWeb sample (bench_ablation's cell), 120 steps, seeds 1337/1338;
each row's round-trip val_bpb and its per-seed difference to the baseline. Not a test.

    python tests/bench_optimizer.py [--steps 120] [--seeds 1337 1338]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ablation as B  # noqa: E402

CONFIGS = {
    "baseline": {},
    "MUON_ROW_NORMALIZE=1": dict(MUON_ROW_NORMALIZE=1),
    "MUON_NS_COEFFS=polar_express": dict(MUON_NS_COEFFS="polar_express"),
    "WARMDOWN_FRAC=0.85": dict(WARMDOWN_FRAC=0.85),
    "WARMDOWN_FRAC=0.85 MIN_LR=0.1": dict(WARMDOWN_FRAC=0.85, MIN_LR=0.1),
    "EMBED_WD=0.085 ADAM_WD=0.02": dict(EMBED_WD=0.085, ADAM_WD=0.02),
    "all of the above": dict(MUON_ROW_NORMALIZE=1, MUON_NS_COEFFS="polar_express", WARMDOWN_FRAC=0.85,
                             MIN_LR=0.1, EMBED_WD=0.085, ADAM_WD=0.02),
}


def half_range(values: list) -> float:
    return (max(values) - min(values)) / 2


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base = dict(B.cell_env(B.make_data(tmp), 96, a.steps), NUM_LAYERS="3")
    res = {}
    for seed in a.seeds:
        for i, (name, over) in enumerate(CONFIGS.items()):
            res[name, seed] = B.run_one(base, over, seed, tmp, f"r{seed}_{i}")["bpb"]
            print(f"# {name} seed {seed}: {res[name, seed]:.4f}", flush=True)
    print("| config | val_bpb | Δ vs baseline | Δ per seed |\n|---|---|---|---|")
    for name in CONFIGS:
        got = [res[name, s] for s in a.seeds]
        d = [res[name, s] - res["baseline", s] for s in a.seeds]
        print(f"| {name} | {sum(got) / len(got):.4f} | {sum(d) / len(d):+.4f} ± {half_range(d):.4f} | "
              f"{', '.join(f'{x:+.4f}' for x in d)} |")


if __name__ == "__main__":
    main()
