#!/usr/bin/env python3
"""Build Parameter Golf token shards offline from raw documents.

Produces exactly the files the official download gives (``fineweb_val_000000.bin``,
``fineweb_train_000000.bin``, ...), so the training script cannot tell the
difference: useful to test on a laptop, or to try another tokenizer.

Shard format (challenge): 256 little-endian int32 header words
([0]=20240520 magic, [1]=1 version, [2]=token count, rest 0), then that many
little-endian uint16 token ids; the file size is exactly 1024 + 2*count.
Each document is written as BOS followed by its tokens (no EOS). The first
``--val-docs`` documents form the validation split, the rest the train split;
each split is one continuous token stream cut into shards of ``--shard-tokens``
(only the last shard of a split is shorter, so documents may span two shards).

Example:
    python data/build_shards.py --docs docs.jsonl \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
        --out data/datasets/fineweb10B_sp1024 --val-docs 50000
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

MAGIC, VERSION = 20240520, 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_VOCAB = 1 << 16  # ids are stored as uint16, so the largest id must be <= 65535
MAX_SHARD_TOKENS = 2**31 - 1  # the count lives in an int32 header word


# ----------------------------------------------------------------------------- shards
def write_shard(path, tokens) -> None:
    """Write one shard atomically (tmp file + os.replace), so a crash never leaves
    a half-written file under a name the training script would load."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header count")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise ValueError(f"{path}: token ids must lie in [0, {MAX_VOCAB - 1}] to fit uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path) -> int:
    """Validate a shard's header and exact size; return its token count.

    A truncated download or a file of another format must fail loudly here rather
    than silently train on garbage."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a challenge shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ValueError(f"{path}: size mismatch: header says {count} tokens "
                         f"({expected} bytes) but the file has {size} bytes (truncated or corrupt)")
    return count


def read_shard(path) -> np.ndarray:
    """Read a shard's tokens as a uint16 array (after validating it)."""
    count = read_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES).astype(np.uint16, copy=False)


class ShardWriter:
    """Accumulates one split's token stream and writes a shard whenever it is full."""

    def __init__(self, out: Path, split: str, shard_tokens: int, log=print):
        self.out, self.split, self.cap, self.log = out, split, shard_tokens, log
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # lazily backed by the OS
        self.fill = 0
        self.files: list[str] = []
        self.tokens = 0

    def add(self, toks: np.ndarray) -> None:
        while len(toks):
            n = min(len(toks), self.cap - self.fill)
            self.buf[self.fill:self.fill + n] = toks[:n]
            self.fill += n
            toks = toks[n:]
            if self.fill == self.cap:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        write_shard(path, self.buf[:self.fill])
        self.files.append(str(path))
        self.tokens += self.fill
        self.log(f"wrote {path} ({self.fill:,} tokens, {path.stat().st_size:,} bytes)")
        self.fill = 0


# ----------------------------------------------------------------------------- docs
def iter_docs(path, max_docs: int | None = None) -> Iterator[str]:
    """Yield document texts. ``*.txt``: documents are blocks separated by blank lines
    (so multi-line documents survive); anything else: JSONL with a "text" field."""
    path = Path(path)
    docs = _iter_txt(path) if path.suffix == ".txt" else _iter_jsonl(path)
    return itertools.islice(docs, max_docs)


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({e})") from e
            yield text


def _iter_txt(path: Path) -> Iterator[str]:
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], model_path, vocab_size: int, log=print) -> Path:
    """Train a SentencePiece BPE tokenizer with the settings of the sp8192 records' tokenizer
    (byte fallback, split digits, nmt_nfkc, no dummy prefix, ids pad/bos/eos/unk = 0/1/2/3,
    character coverage 0.999) and write ``model_path`` (plus the matching ``.vocab``).

    Documents are fed line by line: SentencePiece silently drops "sentences" longer
    than max_sentence_length, which would discard most long web documents, and no
    BPE piece can span a newline anyway (pieces never cross whitespace). With
    hard_vocab_limit off, text too small for ``vocab_size`` pieces gives fewer (said
    in the log) instead of failing; a model of VOCAB_SIZE=vocab_size still takes them."""
    import sentencepiece as spm

    if not 260 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"--train-tokenizer {vocab_size}: need 4 special + 256 byte pieces "
                         f"and ids that fit uint16, i.e. 260 < vocab <= {MAX_VOCAB}")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    stem = model_path.name[:-len(".model")] if model_path.name.endswith(".model") else model_path.name
    tmp_prefix = model_path.with_name(f".{stem}.tmp{os.getpid()}")
    lines = (ln for t in texts for ln in t.split("\n") if ln.strip())
    log(f"training SentencePiece BPE vocab={vocab_size} -> {model_path}")
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(tmp_prefix), model_type="bpe",
            vocab_size=vocab_size, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            byte_fallback=True, character_coverage=0.999, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
            max_sentence_length=16384, input_sentence_size=10_000_000,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
        os.replace(f"{tmp_prefix}.model", model_path)
        os.replace(f"{tmp_prefix}.vocab", model_path.with_name(stem + ".vocab"))
    finally:
        for ext in (".model", ".vocab"):
            Path(f"{tmp_prefix}{ext}").unlink(missing_ok=True)
    pieces = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    log(f"tokenizer trained in {time.time() - t0:.1f}s: {pieces} pieces")
    if pieces < vocab_size:
        log(f"warning: the documents gave only {pieces} of the {vocab_size} pieces asked for (too little text); "
            f"VOCAB_SIZE={vocab_size} still works, its unused embedding rows are wasted")
    return model_path


# ----------------------------------------------------------------------------- build
def build_shards(docs, tokenizer, out, val_docs: int, shard_tokens: int = 100_000_000,
                 max_docs: int | None = None, train_tokenizer_vocab: int | None = None,
                 tokenizer_docs: int | None = None, overwrite: bool = False,
                 batch_docs: int = 512, log=print) -> dict:
    """Tokenize ``docs`` and write val/train shards into ``out``.

    Returns {"tokenizer", "vocab_size", "bos_id", "docs": {split: n},
    "tokens": {split: n}, "files": {split: [paths]}}."""
    import sentencepiece as spm

    out = Path(out)
    if val_docs < 0 or not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError("need val_docs >= 0 and 0 < shard_tokens < 2**31")
    old = sorted(out.glob("fineweb_*_*.bin")) if out.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shard(s) (e.g. {old[0].name}); "
                              "pass overwrite=True / --overwrite to replace them")
    for p in old:  # stale shards with higher indices would otherwise be loaded too
        p.unlink()

    if train_tokenizer_vocab:
        # Only train-split documents: the tokenizer must not have seen validation text.
        train_texts = itertools.islice(iter_docs(docs, max_docs), val_docs, None)
        train_tokenizer(itertools.islice(train_texts, tokenizer_docs), tokenizer, train_tokenizer_vocab, log)

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    vocab, bos = sp.get_piece_size(), sp.bos_id()
    if vocab > MAX_VOCAB:
        raise ValueError(f"{tokenizer}: vocab {vocab} is too large; uint16 shards hold ids <= {MAX_VOCAB - 1}")
    if bos < 0:
        raise ValueError(f"{tokenizer}: tokenizer has no BOS id; every document must start with BOS")

    out.mkdir(parents=True, exist_ok=True)
    writers = {s: ShardWriter(out, s, shard_tokens, log) for s in ("val", "train")}
    ndocs = {"val": 0, "train": 0}
    t0 = last_log = time.time()
    seen = 0
    docs_iter = iter(iter_docs(docs, max_docs))
    while batch := list(itertools.islice(docs_iter, batch_docs)):
        encoded = sp.encode(batch, out_type=int, num_threads=os.cpu_count() or 1)
        n_val = min(len(batch), max(0, val_docs - seen))  # docs of this batch that go to val
        for split, group in (("val", encoded[:n_val]), ("train", encoded[n_val:])):
            if not group:
                continue
            count = sum(len(ids) + 1 for ids in group)
            toks = np.fromiter(itertools.chain.from_iterable([bos] + ids for ids in group),
                               dtype=np.uint16, count=count)
            writers[split].add(toks)
            ndocs[split] += len(group)
        seen += len(batch)
        if time.time() - last_log > 10:
            last_log = time.time()
            log(f"{seen:,} docs ({seen / (last_log - t0):,.0f} docs/s)")
    for w in writers.values():
        w.flush()
    if not ndocs["train"]:  # the training script would find no train shard: say so here, not there
        raise ValueError(f"{seen} documents, all in the val split (--val-docs {val_docs}): zero train shards "
                         f"were written; give more documents than --val-docs (the val shards are in {out})")
    summary = {"tokenizer": str(tokenizer), "vocab_size": vocab, "bos_id": bos, "docs": ndocs,
               "tokens": {s: w.tokens for s, w in writers.items()},
               "files": {s: w.files for s, w in writers.items()}}
    log(f"done in {time.time() - t0:.1f}s: " + ", ".join(
        f"{s}: {ndocs[s]:,} docs, {w.tokens:,} tokens, {len(w.files)} shard(s)" for s, w in writers.items()))
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", required=True,
                   help="documents: JSONL with a \"text\" field per line, or a .txt file in which "
                        "documents are separated by blank lines")
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model to encode with (written first with --train-tokenizer)")
    p.add_argument("--out", required=True, help="output folder for fineweb_{val,train}_NNNNNN.bin")
    p.add_argument("--val-docs", type=int, required=True,
                   help="the first N documents form the val split (the challenge uses 50000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard (default 1e8)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most M documents in total (val included)")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="first train a BPE tokenizer of this vocab size on the train-split docs "
                        "(the sp8192 records' settings: byte fallback, split digits, nmt_nfkc, no dummy "
                        "prefix) and save it to --tokenizer")
    p.add_argument("--tokenizer-docs", type=int, default=None,
                   help="with --train-tokenizer: use at most this many train documents")
    p.add_argument("--overwrite", action="store_true", help="delete existing fineweb_*.bin in --out first")
    a = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        return build_shards(a.docs, a.tokenizer, a.out, a.val_docs, a.shard_tokens, a.max_docs,
                            a.train_tokenizer, a.tokenizer_docs, a.overwrite, log=log)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
