"""Tests for data/build_shards.py and data/cached_challenge_fineweb.py.

data/ is not a package, so the scripts are imported by path. The download script is
tested offline: its single network function `fetch` is replaced by a stand-in that
serves files from a temporary "remote" folder laid out like the Hugging Face repo.
No test touches the network: the connectivity probe is disabled by an autouse fixture
(tests of the probe itself only connect to sockets on 127.0.0.1 they open and close).
"""
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "fineweb_sample"
HAVE_SAMPLE = (SAMPLE / "docs_200.jsonl").is_file() and (SAMPLE / "fineweb_1024_bpe.model").is_file()


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = load_script("build_shards")
dl = load_script("cached_challenge_fineweb")
real_probe_hub, real_fetch = dl.probe_hub, dl.fetch


@pytest.fixture(autouse=True)
def no_network_probe(monkeypatch):
    """Any test that reaches the real connectivity probe by accident fails instead."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a test reached the network probe; patch dl.probe_hub")
    monkeypatch.setattr(dl, "probe_hub", forbidden)


def leftovers(folder: Path):
    """Temporary/partial files that an atomic writer must never leave behind."""
    return [p for p in folder.rglob("*") if ".part" in p.name or ".tmp" in p.name or p.name == dl.STAGING]


# ----------------------------------------------------------------------------- shard format
def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 7, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    bs.write_shard(path, tokens)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
    out = bs.read_shard(path)
    assert out.dtype == np.uint16 and np.array_equal(out, tokens)
    assert dl.shard_tokens(path) == len(tokens)  # the downloader's validator agrees
    bs.write_shard(tmp_path / "empty.bin", np.array([], dtype=np.uint16))
    assert len(bs.read_shard(tmp_path / "empty.bin")) == 0
    assert leftovers(tmp_path) == []


def test_corrupt_shards_raise_value_error(tmp_path):
    good = tmp_path / "good.bin"
    bs.write_shard(good, np.arange(100, dtype=np.uint16))
    raw = good.read_bytes()

    def variant(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    bad_magic = bytearray(raw)
    bad_magic[0] ^= 0xFF
    bad_version = bytearray(raw)
    bad_version[4] = 2
    cases = {
        variant("magic.bin", bytes(bad_magic)): "magic",
        variant("version.bin", bytes(bad_version)): "version",
        variant("truncated.bin", raw[:-1]): "size mismatch",
        variant("extra.bin", raw + b"\0\0"): "size mismatch",
        variant("short.bin", raw[:100]): "shorter than",
    }
    for path, problem in cases.items():
        with pytest.raises(ValueError, match=problem) as err:
            bs.read_shard(path)
        assert path.name in str(err.value)
        assert dl.shard_tokens(path) is None
    with pytest.raises(ValueError, match="uint16"):
        bs.write_shard(tmp_path / "big.bin", np.array([70000]))
    with pytest.raises(ValueError, match="uint16"):
        bs.write_shard(tmp_path / "neg.bin", np.array([-1]))


# ----------------------------------------------------------------------------- build_shards
def check_build(summary, texts, sp, val_docs, shard_tokens):
    """Per split: doc counts, token counts = encoded lengths + one BOS per doc, every
    document starts with BOS exactly where expected, full shards except the last."""
    bos = sp.bos_id()
    assert bos == 1
    for split, docs in (("val", texts[:val_docs]), ("train", texts[val_docs:])):
        lengths = [len(ids) for ids in sp.encode(docs, out_type=int)]
        assert summary["docs"][split] == len(docs)
        assert summary["tokens"][split] == sum(lengths) + len(docs)
        files = summary["files"][split]
        assert [Path(f).name for f in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        shards = [bs.read_shard(f) for f in files]
        assert all(len(s) == shard_tokens for s in shards[:-1]) and 0 < len(shards[-1]) <= shard_tokens
        stream = np.concatenate(shards)
        starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]])
        assert np.array_equal(np.flatnonzero(stream == bos), starts)  # BOS opens each doc, never inside
        assert np.array_equal(stream[1:lengths[0] + 1], sp.encode(docs[0], out_type=int))


@pytest.mark.skipif(not HAVE_SAMPLE, reason="fineweb sample not available")
def test_build_shards_on_sample(tmp_path):
    import sentencepiece as spm

    lines = (SAMPLE / "docs_200.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [json.loads(line)["text"] for line in lines]
    tok = SAMPLE / "fineweb_1024_bpe.model"
    out = tmp_path / "shards"
    summary = bs.build_shards(docs, tok, out, val_docs=5, shard_tokens=10_000, log=lambda m: None)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    check_build(summary, texts, sp, 5, 10_000)
    assert len(summary["files"]["train"]) > 1
    assert leftovers(tmp_path) == []

    with pytest.raises(FileExistsError):  # never mixes with shards of an earlier run
        bs.build_shards(docs, tok, out, val_docs=5, log=lambda m: None)
    summary = bs.main(["--docs", str(docs), "--tokenizer", str(tok), "--out", str(out),
                       "--val-docs", "3", "--max-docs", "8", "--overwrite"])
    check_build(summary, texts[:8], sp, 3, 100_000_000)
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def generated_docs(n, seed=0):
    """Multi-line pseudo-English documents with digits, accents and an emoji (byte fallback)."""
    rng = random.Random(seed)
    words = ["the", "model", "golf", "token", "shard", "learns", "bytes", "über", "naïve", "parameter",
             "tiny", "train", "val", "loss", "2026", "x7", "émoji🙂", "and", "of", "to"]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(2))
            for _ in range(n)]


def test_train_tokenizer_and_build_generated(tmp_path):
    import sentencepiece as spm

    texts = generated_docs(120)
    docs = tmp_path / "docs.txt"  # .txt: documents separated by blank lines
    docs.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    tok = tmp_path / "tok" / "gen_300_bpe.model"
    summary = bs.main(["--docs", str(docs), "--tokenizer", str(tok), "--out", str(tmp_path / "out"),
                       "--val-docs", "10", "--shard-tokens", "2000", "--train-tokenizer", "300"])
    assert tok.is_file() and tok.with_suffix(".vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 300 == summary["vocab_size"]
    assert sp.piece_to_id("<0xF0>") != sp.unk_id()  # byte fallback pieces exist
    assert sp.unk_id() not in sp.encode("émoji🙂 ☃", out_type=int)
    check_build(summary, texts, sp, 10, 2000)
    assert leftovers(tmp_path) == []


def test_too_little_text_gives_fewer_pieces_and_says_so(tmp_path):
    """hard_vocab_limit off, as the records train: 8192 pieces asked of a few documents is not an error."""
    import sentencepiece as spm

    logs = []
    tok = bs.train_tokenizer(generated_docs(5), tmp_path / "few_8192_bpe.model", 8192, log=logs.append)
    pieces = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    assert 260 < pieces < 8192
    assert any(f"only {pieces} of the 8192 pieces" in m for m in logs)


def syllable_docs(n, seed=0):
    """Text rich enough for an 8192-piece BPE vocabulary (6,000 made-up words, capitals, numbers), with rare
    characters that the trainer's 0.999 coverage leaves to byte fallback."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwzßç" for v in "aeiouyäöé"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    rare = ["🙂", "☃", "漢字", "Ω", "ﬁ", "€"]
    docs = []
    for _ in range(n):
        words = [rng.choice(lexicon) if rng.random() > 0.01 else rng.choice(rare) for _ in range(rng.randint(100, 400))]
        words = [w.capitalize() if rng.random() < 0.1 else w for w in words]
        docs.append(" ".join(words) + f"\n{rng.randint(0, 99999)}.")
    return docs


@pytest.mark.parametrize("source", ["sample", "generated"])
def test_8192_tokenizer_has_the_records_settings_and_exact_bytes(tmp_path, source):
    """--train-tokenizer 8192 with the sp8192 records' trainer settings; on its shards the script's byte count
    (build_byte_tables + target_bytes) equals, per validation document, the UTF-8 bytes of the decoded document
    and of the normalized text, byte-fallback pieces included."""
    import sentencepiece as spm
    import train_gpt_mlx as T

    if source == "sample":
        if not HAVE_SAMPLE:
            pytest.skip("fineweb sample not available")
        lines = (SAMPLE / "docs_200.jsonl").read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines]
    else:
        texts = syllable_docs(200)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = tmp_path / "tok" / "mine_8192_bpe.model"
    summary = bs.main(["--docs", str(docs), "--tokenizer", str(tok), "--out", str(tmp_path / "out"),
                       "--val-docs", "50", "--train-tokenizer", "8192"])
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert sp.get_piece_size() == 8192 == summary["vocab_size"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(8192)) == 256  # byte fallback
    assert not sp.encode(texts[0].lstrip(), out_type=str)[0].startswith("\u2581")  # no dummy prefix
    words = [sp.id_to_piece(i) for i in range(8192) if not sp.is_byte(i)]
    assert all(sum(c.isdigit() for c in w) <= 1 for w in words)  # split digits: no piece holds two
    assert sp.decode(sp.encode("\ufb01 \uff21")) == "fi A"  # nmt_nfkc: ligature and full-width A

    tables = T.build_byte_tables(sp, 8192)
    stream = np.concatenate([bs.read_shard(f) for f in summary["files"]["val"]]).astype(np.int64)
    starts = np.flatnonzero(stream == sp.bos_id())
    spans = list(zip(starts, list(starts[1:]) + [len(stream)]))
    assert len(spans) == 50
    for text, (a, b) in zip(texts, spans):
        ids = stream[a + 1:b]
        counted = int(T.target_bytes(stream[a:b - 1], ids, tables).sum())  # the first target's prev is BOS
        decoded = len(sp.decode(ids.tolist()).encode("utf-8"))
        normalized = len(sp.normalize(text).replace("\u2581", " ").encode("utf-8"))
        assert counted == decoded == normalized
    whole = int(T.target_bytes(stream[:-1], stream[1:], tables).sum())  # BOS targets count 0 bytes
    assert whole == sum(len(sp.decode(stream[a + 1:b].tolist()).encode("utf-8")) for a, b in spans)
    assert sum(sp.is_byte(int(t)) for t in stream) > 0  # byte-fallback pieces were among them


# ----------------------------------------------------------------------------- download
FOLDER = "fineweb10B_sp1024"
N_VAL, N_TRAIN = 2, 3


class CallLog(list):
    """Remote paths requested from the stand-in `fetch`, in order; .repos the repo of each request;
    .root is the first fake repo."""
    root: Path
    repos: list


def write_repo(root: Path, variants) -> None:
    """A fake dataset repo laid out like the Hub's: N_VAL val and N_TRAIN train shards and a
    tokenizer per variant, and a manifest listing them."""
    rng = np.random.default_rng(0)
    manifest = {"datasets": [], "tokenizers": []}
    for variant in variants:
        vocab = int(variant[2:])
        folder = f"fineweb10B_{variant}"
        ds = root / "datasets" / "datasets" / folder
        for split, n in (("val", N_VAL), ("train", N_TRAIN)):
            for i in range(n):
                toks = rng.integers(0, vocab, 50 + 10 * i, dtype=np.uint16)
                bs.write_shard(ds / f"fineweb_{split}_{i:06d}.bin", toks)
        (root / "datasets" / "tokenizers").mkdir(parents=True, exist_ok=True)
        for ext in ("model", "vocab"):
            (root / "datasets" / "tokenizers" / f"fineweb_{vocab}_bpe.{ext}").write_bytes(b"fake " + ext.encode())
        manifest["datasets"].append({"name": folder, "tokenizer_name": f"sp_bpe_{vocab}",
                                     "stats": {"files_train": N_TRAIN, "files_val": N_VAL}})
        manifest["tokenizers"].append({"name": f"sp_bpe_{vocab}",
                                       "model_path": f"tokenizers/fineweb_{vocab}_bpe.model"})
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))


def make_remote(tmp_path, monkeypatch, repos=None) -> CallLog:
    """Build fake repos ({repo: [variants]}; default: the default repo with sp1024, under tmp_path/remote)
    and replace `fetch` by a stand-in serving them: a file the asked repo lacks is not found."""
    repos = repos or {dl.DEFAULT_REPO: ["sp1024"]}
    roots = {repo: tmp_path / ("remote" if i == 0 else f"remote{i}") for i, repo in enumerate(repos)}
    for repo, variants in repos.items():
        write_repo(roots[repo], variants)
    calls = CallLog()
    calls.root = roots[next(iter(repos))]
    calls.repos = []

    def fake_fetch(remote_path, dest, repo_id):
        calls.append(remote_path)
        calls.repos.append(repo_id)
        src = roots.get(repo_id, tmp_path / "no-such-repo") / remote_path
        if not src.is_file():
            raise FileNotFoundError(f"{repo_id} has no file {remote_path}")
        Path(dest).write_bytes(src.read_bytes())

    monkeypatch.setattr(dl, "fetch", fake_fetch)
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)  # no retry backoff in tests
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    return calls


def run_download(local, *args):
    return dl.main(["--variant", "sp1024", "--data-dir", str(local), *args])


def expected_files(n_train):
    names = [f"fineweb_val_{i:06d}.bin" for i in range(N_VAL)]
    names += [f"fineweb_train_{i:06d}.bin" for i in range(n_train)]
    return [f"datasets/{FOLDER}/{n}" for n in names] + [f"tokenizers/fineweb_1024_bpe.{e}" for e in ("model", "vocab")]


def test_download_layout_train_shards_and_skip(tmp_path, monkeypatch):
    calls = make_remote(tmp_path, monkeypatch)
    local = tmp_path / "data"
    summary = run_download(local, "--train-shards", "2")
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == sorted(expected_files(2) + ["manifest.json"])
    for rel in expected_files(2):
        assert (local / rel).read_bytes() == (calls.root / "datasets" / rel).read_bytes()
    assert (summary["val_shards"], summary["train_shards"]) == (N_VAL, 2)
    assert len(calls) == 1 + 2 + N_VAL + 2  # manifest, tokenizer, val, train

    calls.clear()  # second run: everything valid locally, only the manifest is refreshed
    summary = run_download(local, "--train-shards", "2")
    assert calls == ["datasets/manifest.json"] and summary["downloaded"] == []
    assert len(summary["skipped"]) == 2 + N_VAL + 2

    victim = local / "datasets" / FOLDER / "fineweb_train_000001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])  # truncated: must be fetched again
    calls.clear()
    summary = run_download(local, "--train-shards", "3")
    assert calls == ["datasets/manifest.json", f"datasets/datasets/{FOLDER}/fineweb_train_000001.bin",
                     f"datasets/datasets/{FOLDER}/fineweb_train_000002.bin"]
    assert bs.read_shard(victim).size and summary["train_shards"] == 3

    calls.clear()
    summary = run_download(local, "--train-shards", "0")  # val + tokenizer only
    assert calls == ["datasets/manifest.json"] and summary["train_shards"] == 0
    assert leftovers(local) == []


@pytest.mark.parametrize("manifest", ["names-only", "garbage", "missing"])
def test_download_without_usable_manifest(tmp_path, monkeypatch, manifest):
    """Unknown schemas fall back to file names in the JSON, or to probing val indices."""
    calls = make_remote(tmp_path, monkeypatch)
    path = calls.root / "datasets" / "manifest.json"
    if manifest == "names-only":
        path.write_text(json.dumps({"files": [f"datasets/{FOLDER}/fineweb_val_{i:06d}.bin" for i in range(N_VAL)]
                                    + [f"datasets/{FOLDER}/fineweb_train_{i:06d}.bin" for i in range(N_TRAIN)]}))
    elif manifest == "garbage":
        path.write_text("{not json")
    else:
        path.unlink()
    local = tmp_path / "data"
    summary = run_download(local, "--train-shards", "5")  # more than exist: capped with a warning
    assert (summary["val_shards"], summary["train_shards"]) == (N_VAL, N_TRAIN)
    assert sorted(str(p.relative_to(local)) for p in (local / "datasets").rglob("*.bin")) == \
        sorted(f for f in expected_files(N_TRAIN) if f.endswith(".bin"))
    calls.clear()
    summary = run_download(local, "--train-shards", "1")
    assert summary["downloaded"] == [] and summary["val_shards"] == N_VAL
    probe = [f"datasets/datasets/{FOLDER}/fineweb_val_{N_VAL:06d}.bin"]
    assert calls == ["datasets/manifest.json"] + ([] if manifest == "names-only" else probe)
    assert leftovers(local) == []


def test_download_never_leaves_partial_files(tmp_path, monkeypatch):
    calls = make_remote(tmp_path, monkeypatch)
    serve = dl.fetch
    broken = f"datasets/datasets/{FOLDER}/fineweb_train_000001.bin"

    def flaky_fetch(remote_path, dest, repo_id):
        if remote_path == broken:  # connection drops half-way through, every time
            calls.append(remote_path)
            data = (calls.root / remote_path).read_bytes()
            Path(dest).write_bytes(data[:len(data) // 2])
            raise ConnectionError("connection reset")
        serve(remote_path, dest, repo_id)

    monkeypatch.setattr(dl, "fetch", flaky_fetch)
    local = tmp_path / "data"
    with pytest.raises(SystemExit, match="after 2 tries"):
        run_download(local, "--train-shards", "3", "--retries", "2")
    assert calls.count(broken) == 2
    shard_dir = local / "datasets" / FOLDER
    assert (shard_dir / "fineweb_train_000000.bin").is_file()
    assert not (shard_dir / "fineweb_train_000001.bin").exists()
    assert leftovers(local) == []

    def corrupt_fetch(remote_path, dest, repo_id):  # the server hands back a truncated shard
        serve(remote_path, dest, repo_id)
        if remote_path == broken:
            Path(dest).write_bytes(Path(dest).read_bytes()[:-2])

    monkeypatch.setattr(dl, "fetch", corrupt_fetch)
    with pytest.raises(SystemExit, match="invalid"):
        run_download(local, "--train-shards", "3")
    assert not (shard_dir / "fineweb_train_000001.bin").exists()
    assert leftovers(local) == []

    monkeypatch.setattr(dl, "fetch", serve)  # the next run completes the set
    assert run_download(local, "--train-shards", "3")["train_shards"] == 3


def test_sp8192_comes_from_its_repo_and_a_stale_manifest_does_not_hide_it(tmp_path, monkeypatch):
    """--variant sp8192 fetches the records' export from kevclark/parameter-golf without any setting; the
    default repo's manifest, which lacks sp8192, blocks neither that download nor an offline rerun later."""
    sp8192 = "kevclark/parameter-golf"
    calls = make_remote(tmp_path, monkeypatch, {dl.DEFAULT_REPO: ["sp1024"], sp8192: ["sp8192"]})
    local = tmp_path / "data"
    run_download(local, "--train-shards", "1")  # sp1024 first: the local manifest is the default repo's
    assert "fineweb10B_sp8192" not in (local / "manifest.json").read_text()
    calls.clear()
    calls.repos.clear()
    summary = dl.main(["--variant", "sp8192", "--data-dir", str(local), "--train-shards", "2"])
    assert (summary["val_shards"], summary["train_shards"]) == (N_VAL, 2)
    assert set(calls.repos) == {sp8192} and len(calls) == 1 + 2 + N_VAL + 2  # manifest, tokenizer, val, train
    remote = tmp_path / "remote1" / "datasets"
    for rel in ["tokenizers/fineweb_8192_bpe.model", "datasets/fineweb10B_sp8192/fineweb_train_000001.bin"]:
        assert (local / rel).read_bytes() == (remote / rel).read_bytes()

    run_download(local, "--train-shards", "1")  # the default repo's manifest again: sp8192's entry is kept
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    offline_hub(monkeypatch, "probe")
    monkeypatch.setattr(dl, "fetch", real_fetch)
    for variant in ("sp8192", "sp1024"):  # everything present: no network needed for either
        summary = dl.main(["--variant", variant, "--data-dir", str(local), "--train-shards", "1"])
        assert summary["downloaded"] == [] and summary["val_shards"] == N_VAL
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before


def test_a_repo_without_the_variant_names_the_setting(tmp_path, monkeypatch):
    make_remote(tmp_path, monkeypatch)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", dl.DEFAULT_REPO)  # overrides the repo sp8192 would use
    with pytest.raises(SystemExit) as err:
        dl.main(["--variant", "sp8192", "--data-dir", str(tmp_path / "data"), "--train-shards", "1"])
    msg = str(err.value.code)
    assert f"{dl.DEFAULT_REPO} has no file datasets/tokenizers/fineweb_8192_bpe.model" in msg
    assert "MATCHED_FINEWEB_REPO_ID" in msg
    assert not (tmp_path / "data" / "datasets").exists()


def test_merge_manifests_keeps_other_variants():
    old = {"datasets": [{"name": "a", "stats": 1}, {"name": "b", "stats": 2}], "tokenizers": [{"name": "t"}]}
    new = {"datasets": [{"name": "b", "stats": 3}], "version": 2}
    merged = dl.merge_manifests(new, old)
    assert merged == {"datasets": [{"name": "b", "stats": 3}, {"name": "a", "stats": 1}], "version": 2}
    assert dl.merge_manifests(None, old) is None and dl.merge_manifests(new, "x") == new


def test_shard_counts_reads_known_schema():
    manifest = {"datasets": [{"name": "other", "stats": {"files_train": 9, "files_val": 9}},
                             {"name": FOLDER, "stats": {"files_train": 80, "files_val": 1}}]}
    assert dl.shard_counts(manifest, FOLDER) == (80, 1)
    assert dl.shard_counts(None, FOLDER) == (None, None)
    assert dl.shard_counts({"x": [1, "a"]}, FOLDER) == (None, None)
    with pytest.raises(SystemExit):
        dl.main(["--variant", "byte999"])


def test_fetch_wraps_hf_hub_download(tmp_path, monkeypatch):
    """The real `fetch`, with hf_hub_download faked: file moved to dest, errors mapped."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    seen = {}

    def fake_download(repo_id, filename, repo_type=None, local_dir=None):
        seen.update(repo_id=repo_id, repo_type=repo_type)
        if filename.endswith("missing.bin"):
            raise EntryNotFoundError("404")
        if filename.endswith("offline.bin"):
            raise LocalEntryNotFoundError("no connection")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"payload")
        return str(target)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    probes = []
    monkeypatch.setattr(dl, "probe_hub", lambda endpoint: probes.append(endpoint))  # reachable
    dl._probed.clear()
    dest = tmp_path / "x.part"
    dl.fetch("datasets/tokenizers/fineweb_1024_bpe.vocab", dest)
    assert dest.read_bytes() == b"payload"
    assert seen == {"repo_id": dl.DEFAULT_REPO, "repo_type": "dataset"}
    dl.fetch("datasets/tokenizers/fineweb_1024_bpe.vocab", dest)
    assert len(probes) == 1  # probed once, not per file
    with pytest.raises(FileNotFoundError):
        dl.fetch("datasets/missing.bin", tmp_path / "y.part")
    with pytest.raises(ConnectionError) as err:  # offline must not look like "no more shards"
        dl.fetch("datasets/offline.bin", tmp_path / "z.part")
    assert not isinstance(err.value, dl.HubUnreachable)  # the probe still passes: worth a retry
    assert len(probes) == 2  # a failed download probes again
    monkeypatch.setattr(dl, "probe_hub", lambda endpoint: "cannot resolve host")  # the network went away
    with pytest.raises(dl.HubUnreachable, match="cannot resolve host"):
        dl.fetch("datasets/offline.bin", tmp_path / "z.part")
    with pytest.raises(dl.HubUnreachable):  # and the next file is not even attempted
        dl.fetch("datasets/tokenizers/fineweb_1024_bpe.vocab", tmp_path / "w.part")
    assert not (tmp_path / "w.part").exists()


# ----------------------------------------------------------------------------- offline / Ctrl-C
def closed_port() -> int:
    """A local TCP port with nothing listening (opened, then closed): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def offline_hub(monkeypatch, mode):
    """Simulate no network for the real `fetch`. "probe": the connectivity probe fails
    first (hf_hub_download is never reached); "hub": the probe passes once, then
    hf_hub_download raises what huggingface_hub raises offline (LocalEntryNotFoundError,
    after its own retries) and the probe that follows fails. Returns the hub call log."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline_download(repo_id, filename, **kwargs):
        calls.append(filename)
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                      "cannot find the requested files in the local cache.")

    answers = iter([None] if mode == "hub" else [])
    monkeypatch.setattr(dl, "probe_hub",
                        lambda endpoint: next(answers, "cannot resolve huggingface.co: Name or service not known"))
    monkeypatch.setattr(hub, "hf_hub_download", offline_download)
    monkeypatch.setattr(dl.time, "sleep", lambda s: pytest.fail("offline must not wait for retries"))
    return calls


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["probe", "hub"])
def test_offline_one_message_exit_code_no_empty_folders(tmp_path, monkeypatch, capsys, mode, shared):
    calls = offline_hub(monkeypatch, mode)
    sample = tmp_path / "shared" / "fineweb_sample"
    if shared:
        sample.mkdir(parents=True)
    monkeypatch.setattr(dl, "SHARED_SAMPLE", sample)
    local = tmp_path / "fresh" / "data"  # neither folder exists yet
    with pytest.raises(SystemExit) as err:
        run_download(local, "--train-shards", "1")
    msg = err.value.code
    assert isinstance(msg, str)  # sys.exit(message): printed to stderr, exit status 1
    assert msg.startswith("error: cannot reach the Hugging Face Hub at ")
    assert "Name or service not known" in msg
    assert "data/build_shards.py --docs docs.jsonl --tokenizer TOKENIZER.model --out " in msg.replace(os.sep, "/")
    # paths as the message shows them: relative where they lie near the working directory (a clone under /tmp
    # sees pytest's /tmp folders as ../pytest-of-...), else absolute
    assert f"--out {dl.shown(local / 'datasets' / FOLDER)} --val-docs 50" in msg
    assert (dl.shown(sample / "fineweb_1024_bpe.model") in msg) == shared
    assert calls == ([] if mode == "probe" else ["datasets/manifest.json"])  # one try, no retries
    assert capsys.readouterr().out == ""  # the error is the only output
    assert not (tmp_path / "fresh").exists()  # every folder it created is gone again
    assert tree(tmp_path) == (["shared", "shared/fineweb_sample"] if shared else [])


def test_offline_sp8192_says_to_train_the_tokenizer(tmp_path, monkeypatch):
    offline_hub(monkeypatch, "probe")
    monkeypatch.setattr(dl, "SHARED_SAMPLE", tmp_path / "shared" / "fineweb_sample")  # absent
    local = tmp_path / "data"
    with pytest.raises(SystemExit) as err:
        dl.main(["--variant", "sp8192", "--data-dir", str(local), "--train-shards", "1"])
    msg = str(err.value.code).replace(os.sep, "/")
    assert ("data/build_shards.py --docs docs.jsonl --train-tokenizer 8192 --tokenizer TOKENIZER.model "
            f"--out {dl.shown(local / 'datasets' / 'fineweb10B_sp8192')} --val-docs 50") in msg
    assert "TOKENIZER_PATH, with VOCAB_SIZE=8192" in msg and "fineweb_1024_bpe" not in msg


def test_offline_keeps_folders_that_existed(tmp_path, monkeypatch):
    offline_hub(monkeypatch, "probe")
    local = tmp_path / "data"
    (local / "tokenizers").mkdir(parents=True)  # pre-existing, empty: kept
    (local / "datasets" / FOLDER).mkdir(parents=True)
    (local / "notes.txt").write_text("mine")
    before = tree(local)
    with pytest.raises(SystemExit) as err:
        run_download(local, "--train-shards", "1")
    assert "data/build_shards.py" in str(err.value.code).replace(os.sep, "/")
    assert tree(local) == before and (local / "notes.txt").read_text() == "mine"

    (local / "datasets" / FOLDER).rmdir()  # a local manifest: the tokenizer is the first fetch
    (local / "manifest.json").write_text("{}")
    shutil.rmtree(local / "tokenizers")
    before = tree(local)
    with pytest.raises(SystemExit, match="build_shards"):
        run_download(local, "--train-shards", "1")
    assert tree(local) == before  # tokenizers/ was created for the download and removed again


def test_connection_lost_mid_run_removes_only_empty_new_folders(tmp_path, monkeypatch, capsys):
    calls = make_remote(tmp_path, monkeypatch)
    serve = dl.fetch

    def dies_after_tokenizer(remote_path, dest, repo_id):
        if "/datasets/" in remote_path:  # the first shard: the network is gone
            raise dl.HubUnreachable("https://huggingface.co", "cannot connect: Network is unreachable")
        serve(remote_path, dest, repo_id)

    monkeypatch.setattr(dl, "fetch", dies_after_tokenizer)
    local = tmp_path / "data"
    with pytest.raises(SystemExit) as err:
        run_download(local, "--train-shards", "1")
    assert "Network is unreachable" in err.value.code and "build_shards.py" in err.value.code
    assert tree(local) == ["manifest.json", "tokenizers", "tokenizers/fineweb_1024_bpe.model",
                           "tokenizers/fineweb_1024_bpe.vocab"]  # no empty datasets/ folder, no staging
    assert calls.count(f"datasets/datasets/{FOLDER}/fineweb_val_000000.bin") == 0  # not retried
    capsys.readouterr()


def test_offline_with_everything_present_succeeds(tmp_path, monkeypatch):
    make_remote(tmp_path, monkeypatch)
    local = tmp_path / "data"
    run_download(local, "--train-shards", "1")
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    offline_hub(monkeypatch, "probe")
    monkeypatch.setattr(dl, "fetch", real_fetch)
    summary = run_download(local, "--train-shards", "1")  # local manifest + valid files: no network needed
    assert summary["downloaded"] == [] and summary["train_shards"] == 1
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit, match="build_shards"):  # one more shard does need the network
        run_download(local, "--train-shards", "2")
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before


def test_ctrl_c_during_download_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    calls = make_remote(tmp_path, monkeypatch)
    serve = dl.fetch

    def interrupted(remote_path, dest, repo_id):
        if "fineweb_val_000000" in remote_path:  # Ctrl-C half-way through the first shard
            staging = Path(dest).parent / dl.STAGING / "x.incomplete"
            staging.parent.mkdir()
            staging.write_bytes(b"half")
            Path(dest).write_bytes(b"half")
            raise KeyboardInterrupt
        serve(remote_path, dest, repo_id)

    monkeypatch.setattr(dl, "fetch", interrupted)
    local = tmp_path / "data"
    with pytest.raises(SystemExit) as err:
        try:
            run_download(local, "--train-shards", "1")
        except KeyboardInterrupt:  # would otherwise stop the whole pytest session
            pytest.fail("KeyboardInterrupt escaped main(): the user sees a traceback")
    assert err.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(local) == []
    assert tree(local) == ["manifest.json", "tokenizers", "tokenizers/fineweb_1024_bpe.model",
                           "tokenizers/fineweb_1024_bpe.vocab"]
    monkeypatch.setattr(dl, "fetch", serve)  # rerun resumes
    summary = run_download(local, "--train-shards", "1")
    assert summary["val_shards"] == N_VAL and len(summary["skipped"]) == 2
    assert calls.count("datasets/tokenizers/fineweb_1024_bpe.model") == 1


def test_probe_hub_local_sockets(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    port = closed_port()
    t0 = time.monotonic()
    reason = real_probe_hub(f"http://127.0.0.1:{port}")
    assert reason and f"127.0.0.1:{port}" in reason and time.monotonic() - t0 < 2
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        up = server.getsockname()[1]
        assert real_probe_hub(f"http://127.0.0.1:{up}") is None
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{up}")  # reached through the proxy only
        assert real_probe_hub("https://hub.invalid") is None
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert "via proxy" in real_probe_hub("https://hub.invalid")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in real_probe_hub(f"http://127.0.0.1:{up}")


def test_probe_hub_bounded_when_dns_hangs(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(dl.urllib.request, "getproxies", lambda: {})
    def hanging_resolver(*a, **k):  # answers long after the probe gave up, as a real one that times out
        time.sleep(5)
        raise dl.socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(dl.socket, "getaddrinfo", hanging_resolver)
    t0 = time.monotonic()
    reason = real_probe_hub("https://huggingface.co", timeout=0.3)
    assert "no answer" in reason and time.monotonic() - t0 < 2


def script_env(**extra):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def test_offline_real_script_fails_fast(tmp_path):
    """The real script, run like the README says, against a local port nobody listens on."""
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(REPO / "data" / "cached_challenge_fineweb.py", repo / "data")
    (tmp_path / "shared" / "fineweb_sample").mkdir(parents=True)
    (tmp_path / "shared" / "fineweb_sample" / "fineweb_1024_bpe.model").write_bytes(b"x")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "data/cached_challenge_fineweb.py", "--variant", "sp1024",
                        "--train-shards", "1"], cwd=repo, capture_output=True, text=True, timeout=60,
                       env=script_env(HF_ENDPOINT=endpoint))
    elapsed = time.monotonic() - t0
    assert r.returncode == 1 and elapsed < 10, (r.returncode, elapsed, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    first, *rest = r.stderr.strip().splitlines()
    assert first.startswith(f"error: cannot reach the Hugging Face Hub at {endpoint} (cannot connect to ")
    assert rest[:3] == [
        "Offline, build the shards from your own documents (JSONL or .txt) instead:",
        "    python data/build_shards.py --docs docs.jsonl --tokenizer TOKENIZER.model "
        "--out data/datasets/fineweb10B_sp1024 --val-docs 50",
        "The challenge tokenizer ships in ../shared/fineweb_sample/fineweb_1024_bpe.model (use it as "
        "TOKENIZER.model, and as TOKENIZER_PATH for train_gpt_mlx.py).",
    ]
    assert tree(repo) == ["data", "data/cached_challenge_fineweb.py"]  # no datasets/, tokenizers/, staging


def test_ctrl_c_real_process_no_traceback(tmp_path):
    """SIGINT to the running script while a file is half-written: exit 130, one line, no
    traceback, no partial file or staging folder left."""
    local = tmp_path / "data"
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("dl", {str(REPO / "data" / "cached_challenge_fineweb.py")!r})
dl = importlib.util.module_from_spec(spec); spec.loader.exec_module(dl)
def slow_fetch(remote_path, dest, repo_id):
    staging = Path(dest).parent / dl.STAGING
    staging.mkdir(exist_ok=True)
    (staging / "blob.incomplete").write_bytes(b"x" * 1000)
    Path(dest).write_bytes(b"x" * 1000)
    time.sleep(60)
dl.fetch = slow_fetch
dl.main(sys.argv[1:])
""")
    proc = subprocess.Popen([sys.executable, str(driver), "--data-dir", str(local), "--train-shards", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())
    try:
        deadline = time.monotonic() + 30
        while not list(local.glob("*.part*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(local.glob("*.part*")), "the download never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err
    assert not local.exists()  # the manifest was half-written: nothing of this run is left
