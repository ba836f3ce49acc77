"""Token datasets: a corpus tokenized once into a memory-mapped (N, L) int32 array.

packed: the lines, each followed by [EOS], concatenated and cut into blocks of L tokens (no padding);
lines:  one line per row, then [EOS], then [PAD] up to L; padding is excluded from every loss. The
        length (where [EOS] and the padding are) is given to diffusion models, which pay for it with a
        length prior −log p(n); so [EOS] and [PAD] are fixed (never noised) in this mode.
pairs:  seq2seq, one pair per row: source, [BOS], target, then [EOS] up to L. The source and the [BOS]
        separator are fixed (given, never noised, not modelled); the target and every [EOS] after it are
        modelled, so a sampler chooses the target's length by where it puts the first [EOS] (LLaDA's
        end-of-text filling). The AR baseline models the same positions, so the two bounds compare.
        With data.target_length predicted the [EOS] fill is given instead (fixed, not modelled): an
        encoder-decoder predicts the length from the source and pays −log p(length | source) in its bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..diffusion.base import Batch
from ..errors import DiffLMError
from . import tokenizers
from .corpora import load_lines, load_pairs
from .tokenizers import Tokenizer, pieces

if TYPE_CHECKING:
    from .scenes import SceneSource

MODES = ("packed", "lines", "pairs")


def cache_root(cfg) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DIFFLM_CACHE") or Path.home() / ".cache" / "difflm")


class TokenDataset:
    """Rows of token ids (N, L), int32, usually a read-only memory map."""

    def __init__(self, tokens: np.ndarray, pad_id: int, mode: str, eos_id: int, bos_id: int | None = None,
                 fill_given: bool = False) -> None:
        self.tokens, self.pad_id, self.mode, self.eos_id, self.bos_id = tokens, pad_id, mode, eos_id, bos_id
        self.fill_given = fill_given  # pairs: the [EOS] fill after the target is given (data.target_length)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def batch(self, idx) -> Batch:
        """Rows idx (a sequence of ints) as a Batch."""
        x = torch.from_numpy(np.asarray(self.tokens[np.asarray(idx)], dtype=np.int64))
        return make_batch(x, self.pad_id, self.eos_id, self.mode, self.bos_id, self.fill_given)

    def n_tokens(self) -> int:
        return int((np.asarray(self.tokens) != self.pad_id).sum())

    def length_counts(self) -> np.ndarray:
        """counts[n] = number of rows with n non-padding tokens, n = 0..L."""
        n = (np.asarray(self.tokens) != self.pad_id).sum(1)
        return np.bincount(n, minlength=self.seq_len + 1)


class SceneDataset(TokenDataset):
    """Caption rows ([BOS], caption, [EOS]…: the pairs layout with an empty source), one per reference caption of
    each scene, with the scene images (S, H, W) uint8 that ``image_of`` (N,) points each row at. With a ``stream``
    (``data.scene_stream``) training rows are drawn afresh instead (``drawn``)."""

    def __init__(self, tokens: np.ndarray, pad_id: int, eos_id: int, bos_id: int, images: np.ndarray,
                 image_of: np.ndarray, fill_given: bool = False, stream: SceneSource | None = None,
                 tokenizer: Tokenizer | None = None, stream_start: int = 0, labels: np.ndarray | None = None) -> None:
        super().__init__(tokens, pad_id, "pairs", eos_id, bos_id, fill_given)
        self.images, self.image_of, self.labels = images, image_of, labels  # labels (S, 4): Scene.cell_labels
        self.stream, self.tokenizer, self.stream_start = stream, tokenizer, stream_start

    def batch(self, idx) -> Batch:
        b = super().batch(idx)
        scenes = self.image_of[np.asarray(idx)]
        b.images = image_tensor(self.images[scenes])
        if self.labels is not None:
            b.image_labels = torch.from_numpy(self.labels[scenes])
        return b

    def drawn(self, rows: torch.Tensor) -> Batch:
        """Rows (B,) of a run on the scene stream: row r is scene stream_start + r with its first reference
        caption, drawn now (a pure function of r, so resuming, batch splits and ranks need no state)."""
        scenes = [self.stream.scene(self.stream_start + int(r)) for r in rows]
        x = [pair_row([], self.tokenizer.encode(sc.captions[0]), self.seq_len, self.bos_id, self.eos_id, 0)[0]
             for sc in scenes]
        b = make_batch(torch.tensor(x, dtype=torch.long), self.pad_id, self.eos_id, self.mode, self.bos_id,
                       self.fill_given)
        b.images = image_tensor(np.stack([sc.image for sc in scenes]))
        b.image_labels = torch.from_numpy(np.stack([sc.cell_labels() for sc in scenes]))
        return b


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float32 in [0, 1], what an image encoder reads."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]


def build_scene_dataset(cfg, tokenizer: Tokenizer, split: str) -> SceneDataset:
    from .scenes import scene_source, scenes_for

    scenes = scenes_for(cfg, split)
    rows, image_of, cut = [], [], 0
    for i, sc in enumerate(scenes):
        for cap in sc.captions:
            row, c = pair_row([], tokenizer.encode(cap), cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id, 0)
            rows.append(row)
            image_of.append(i)
            cut += c
    if cut:
        print(f"difflm: {cut} {split} captions longer than data.seq_len={cfg.seq_len} were truncated", file=sys.stderr)
    stream = scene_source(cfg, "train") if cfg.scene_stream and split == "train" else None
    return SceneDataset(np.asarray(rows, dtype=np.int32), tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id,
                        np.stack([sc.image for sc in scenes]), np.asarray(image_of), cfg.target_length == "predicted",
                        stream, tokenizer, cfg.stream_start, np.stack([sc.cell_labels() for sc in scenes]))


def make_batch(x: torch.Tensor, pad_id: int, eos_id: int, mode: str, bos_id: int | None = None,
               fill_given: bool = False) -> Batch:
    """Batch of rows x (B, L): padding is never modelled; in lines mode [EOS] and [PAD] are fixed; in
    pairs mode the source and its [BOS] separator are fixed and not modelled, and with ``fill_given`` so is
    the [EOS] fill from the target's end on."""
    pad = x == pad_id
    if mode == "pairs":
        source = source_mask(x, bos_id)
        given = source | pad
        if fill_given:
            given = given | target_fill(x, source, eos_id)
        return Batch(x, ~given, given)
    fixed = (pad | (x == eos_id)) if mode == "lines" else torch.zeros_like(pad)
    return Batch(x, ~pad, fixed)


def source_mask(x: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(B, L) True up to and including each row's first [BOS] (the source and its separator)."""
    if bos_id is None:
        raise DiffLMError("pairs data needs a tokenizer with a [BOS] token")
    sep = (x == bos_id).long()
    if not bool((sep.sum(-1) > 0).all()):
        raise DiffLMError("a pairs row has no [BOS] separator between source and target")
    return (sep.cumsum(-1) - sep) == 0


def target_fill(x: torch.Tensor, source: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) True from each pairs row's first [EOS] after its source on (the fill that ends the target)."""
    return ((x == eos_id) & ~source).long().cumsum(-1) > 0


def target_lengths(x: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """(B,) the target's length in each pairs row: its tokens between the [BOS] and the first [EOS] after it."""
    source = source_mask(x, bos_id)
    return (~source & ~target_fill(x, source, eos_id)).sum(-1)


def condition_positions(tokens: torch.Tensor, fixed: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, L) True at the given positions that carry the condition (the seq2seq source): what classifier-free
    guidance drops, in training and at sampling alike; the [BOS] separator is layout, not condition."""
    return fixed & (tokens != bos_id)


def drop_condition(batch: Batch, drop: torch.Tensor, null_id: int, bos_id: int) -> Batch:
    """Classifier-free guidance training: in rows where ``drop`` (B,) is True the source tokens become
    ``null_id`` ([PAD]); they stay fixed and unmodelled, the [BOS] separator and the target are untouched."""
    source = condition_positions(batch.tokens, batch.fixed, bos_id) & drop[:, None].to(batch.tokens.device)
    images, labels = batch.images, batch.image_labels
    if images is not None:  # captioning: the dropped rows see a blank image, whose every cell holds nothing
        images = torch.where(drop.to(images.device)[:, None, None, None], torch.zeros_like(images), images)
    if labels is not None:
        labels = torch.where(drop.to(labels.device)[:, None], torch.zeros_like(labels), labels)
    return Batch(torch.where(source, torch.full_like(batch.tokens, null_id), batch.tokens), batch.loss_mask,
                 batch.fixed, batch.u, batch.rows, batch.seed, batch.step, images, labels)


def pair_row(src: list[int], tgt: list[int], L: int, bos: int, eos: int, max_source: int) -> tuple[list[int], bool]:
    """source, [BOS], target, [EOS]… as one row of L ids; the source is cut to ``max_source`` ids and the
    target to the room left (keeping at least one [EOS]). Returns (row, truncated)."""
    cut = len(src) > max_source
    src = src[:max_source]
    room = L - len(src) - 1
    cut |= len(tgt) + 1 > room
    tgt = tgt[: room - 1]
    return [*src, bos, *tgt] + [eos] * (room - len(tgt)), cut


def encode_pieces(tokenizer: Tokenizer, lines: Iterable[str]) -> Iterator[tuple[np.ndarray, bool]]:
    """(ids, last) for each piece of each line in order — ``last`` when the piece ends its line — encoding about
    ``tokenizers.CHUNK_CHARS`` characters per call (long lines in pieces: ``tokenizers.pieces``)."""
    batch: list[str] = []
    ends: list[bool] = []
    size = 0

    def flush():
        for end, ids in zip(ends, tokenizer.encode_lines(batch)):
            yield np.asarray(ids, dtype=np.int32), end
        batch.clear()
        ends.clear()

    for line in lines:
        parts = list(pieces(line, tokenizer.kind == "char")) if len(line) > tokenizers.CHUNK_CHARS else [line]
        for k, piece in enumerate(parts):
            batch.append(piece)
            ends.append(k == len(parts) - 1)
            size += len(piece)
            if size >= tokenizers.CHUNK_CHARS:
                yield from flush()
                size = 0
    yield from flush()


def encode_stream(tokenizer: Tokenizer, lines: Iterable[str], cap: int) -> Iterator[tuple[np.ndarray, bool]]:
    """(the first ``cap`` ids of each line, whether it had more), line by line: memory bounded by ``cap`` and
    a piece, however long a line is."""
    head: list[np.ndarray] = []
    have, more = 0, False
    for ids, last in encode_pieces(tokenizer, lines):
        if have < cap:
            head.append(ids[: cap - have])
        more |= have + len(ids) > cap
        have += len(ids)
        if last:
            yield (head[0] if len(head) == 1 else np.concatenate(head or [np.zeros(0, np.int32)])), more
            head, have, more = [], 0, False


def _write_rows(tokenizer: Tokenizer, lines: list, mode: str, L: int, path: Path) -> int:
    """Tokenize ``lines`` into the (N, L) int32 array at ``path`` (.npy), streaming; returns how many rows
    were truncated."""
    eos = tokenizer.eos_id
    if mode == "pairs":
        if L < 4:
            raise DiffLMError(f"data.seq_len={L} leaves no room for a source and a target")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(len(lines), L))
        cut = 0
        # each side capped at L ids: pair_row cuts the source to L // 2 and the target to the room left anyway
        sources = encode_stream(tokenizer, (s for s, _ in lines), L)
        pairs = zip(sources, encode_stream(tokenizer, (t for _, t in lines), L))
        for i, ((s, _), (t, _)) in enumerate(pairs):
            row, c = pair_row(s.tolist(), t.tolist(), L, tokenizer.bos_id, eos, L // 2)
            out[i] = row
            cut += c
        out.flush()
        return cut
    if mode == "packed":  # the stream of ids with [EOS] after each line, in a raw file, then cut into rows
        raw = path.with_suffix(".raw")
        total = 0
        with open(raw, "wb") as f:
            for ids, last in encode_pieces(tokenizer, lines):
                f.write(ids.tobytes())
                total += len(ids)
                if last:
                    f.write(np.int32(eos).tobytes())
                    total += 1
        try:
            n = total // L
            if n == 0:
                raise DiffLMError(
                    f"the corpus has {total} tokens, fewer than one block of data.seq_len={L}; "
                    "use more text or a smaller seq_len"
                )
            src = np.memmap(raw, dtype=np.int32, mode="r", shape=(n * L,))
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n, L))
            step = max(1, tokenizers.CHUNK_CHARS // L)
            for a in range(0, n, step):
                b = min(n, a + step)
                out[a:b] = src[a * L : b * L].reshape(b - a, L)
            out.flush()
            del src, out
        finally:
            raw.unlink(missing_ok=True)
        return 0
    if mode == "lines":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(len(lines), L))
        truncated = 0
        for i, (ids, _) in enumerate(encode_stream(tokenizer, lines, L)):
            seq = np.append(ids, np.int32(eos))
            if len(seq) > L:
                truncated += 1
                seq = seq[:L]
            out[i, : len(seq)] = seq
            out[i, len(seq) :] = tokenizer.pad_id
        out.flush()
        return truncated
    raise DiffLMError(f"unknown data.mode {mode!r}; choose one of {', '.join(MODES)}")


def fallback_cache_root() -> Path:
    """The private cache used when the configured one cannot be written."""
    return Path(tempfile.gettempdir()) / f"difflm-cache-{os.getuid()}"


def _writable_cache(root: Path) -> Path:
    """``root`` when a cache file can be written there, else a private temporary folder (with a note)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return root
    except OSError as e:
        alt = fallback_cache_root()
        alt.mkdir(parents=True, exist_ok=True)
        print(f"difflm: note: cannot write the token cache in {root} ({e.strerror}); using {alt} "
              "(set data.cache_dir or DIFFLM_CACHE to choose)", file=sys.stderr)
        return alt


def build_dataset(cfg, tokenizer: Tokenizer, split: str) -> TokenDataset:
    """cfg: DataConfig. Tokenizes the split once (streaming into a memory-mapped .npy file in the cache) and
    memory-maps the result. Scenes: caption rows with their images (``SceneDataset``)."""
    if cfg.corpus == "scenes":
        return build_scene_dataset(cfg, tokenizer, split)
    lines = load_pairs(cfg, split) if cfg.mode == "pairs" else load_lines(cfg, split)
    h = hashlib.sha256()
    # the special ids too: two eos_token choices can leave the same vocabulary with a different [EOS]
    # (and the corpus's spelling of an unknown word, when it is read as one: the key of a run without it is unchanged)
    key = [cfg.mode, cfg.seq_len, tokenizer.hf.to_str(), tokenizer.special]
    if tokenizer.unk_text:
        key.append(tokenizer.unk_text)
    h.update(json.dumps(key).encode())
    for line in lines:
        h.update(json.dumps(line).encode("utf-8") if cfg.mode == "pairs" else line.encode("utf-8"))
        h.update(b"\n")
    name = f"{split}-{h.hexdigest()[:24]}.npy"
    for root in (cache_root(cfg), fallback_cache_root()):
        path = root / name
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.ndim == 2 and arr.shape[1] == cfg.seq_len:
                    return TokenDataset(arr, tokenizer.pad_id, cfg.mode, tokenizer.eos_id, tokenizer.bos_id,
                                        cfg.target_length == "predicted")
            except (ValueError, OSError):
                pass  # a damaged cache file is rebuilt below
    path = _writable_cache(cache_root(cfg)) / name
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    try:
        truncated = _write_rows(tokenizer, lines, cfg.mode, cfg.seq_len, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if truncated:
        what = "pairs" if cfg.mode == "pairs" else "lines"
        print(f"difflm: {truncated} {split} {what} longer than data.seq_len={cfg.seq_len} were truncated")
    return TokenDataset(np.load(path, mmap_mode="r"), tokenizer.pad_id, cfg.mode, tokenizer.eos_id, tokenizer.bos_id,
                        cfg.target_length == "predicted")
