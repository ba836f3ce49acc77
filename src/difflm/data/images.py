"""Grayscale images in and out with the standard library: PNG (8-bit, non-interlaced; gray, gray+alpha, RGB or
RGBA, turned to gray) and NumPy ``.npy`` arrays. Enough for captioning's 64×64 scenes without an imaging package."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DiffLMError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _unfilter(raw: bytes, h: int, w: int, bpp: int) -> np.ndarray:
    """Undo PNG's per-scanline filters (PNG spec §9): (h, w·bpp) uint8."""
    stride = w * bpp
    if len(raw) != h * (1 + stride):
        raise ValueError("the pixel data has the wrong length")
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    pos = 0
    for y in range(h):
        ftype = raw[pos]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=pos + 1).astype(np.int32)
        pos += 1 + stride
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):  # Sub, Average, Paeth depend on the pixel to the left: byte by byte
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = int(prev[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (int(line[i]) + pred) & 0xFF
        else:
            raise ValueError(f"bad PNG filter type {ftype}")
        out[y] = cur
        prev = cur
    return out


def read_png(path: str | Path) -> np.ndarray:
    """A PNG file as a grayscale (H, W) uint8 array; a one-line error for anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DiffLMError(f"cannot read {p}: {e.strerror}") from None
    if not data.startswith(PNG_MAGIC):
        raise DiffLMError(f"{p} is not a PNG image (give a .png file or a .npy array)")
    pos, header, idat = 8, None, []
    try:
        while pos < len(data):
            n, kind = struct.unpack(">I4s", data[pos : pos + 8])
            body = data[pos + 8 : pos + 8 + n]
            pos += 12 + n
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
        if header is None:
            raise ValueError("no IHDR")
        w, h, depth, ctype, _, _, interlace = header
        if depth != 8 or ctype not in CHANNELS or interlace:
            raise DiffLMError(f"{p}: only 8-bit, non-interlaced gray/RGB(A) PNGs are read; convert it (e.g. "
                              "convert in.png -depth 8 -colorspace gray out.png)")
        bpp = CHANNELS[ctype]
        px = _unfilter(zlib.decompress(b"".join(idat)), h, w, bpp).reshape(h, w, bpp).astype(np.float32)
    except (struct.error, zlib.error, ValueError, IndexError):
        raise DiffLMError(f"{p} is a damaged PNG file") from None
    if bpp >= 3:  # ITU-R BT.601 luma
        gray = 0.299 * px[..., 0] + 0.587 * px[..., 1] + 0.114 * px[..., 2]
    else:
        gray = px[..., 0]
    return np.clip(gray.round(), 0, 255).astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a grayscale (H, W) uint8 array as a PNG file."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    Path(path).write_bytes(PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def load_image(path: str | Path) -> np.ndarray:
    """A .png or .npy file as a grayscale (H, W) uint8 array (a float .npy is read as [0, 1])."""
    p = Path(path)
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DiffLMError(f"{p} is not a NumPy array file ({e})") from None
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise DiffLMError(f"{p} holds an array of shape {arr.shape}; give one grayscale image (H, W)")
        return as_uint8(arr)
    return read_png(p)


def as_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixels as uint8: a float array is read as [0, 1], anything else as 0–255."""
    if arr.dtype.kind == "f":
        arr = np.clip(arr * 255.0, 0, 255).round()
    return arr.astype(np.uint8)
