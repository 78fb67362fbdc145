"""Cheap per-image signals on the stored (resized) image's luma, in numpy: perceptual hash, blur, text share.

They are computed from the stored JPEG, not the original download, so any of them can be recomputed later from
the store alone and gives the same value.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_SIDE = (
    64  # pHash: DCT of the 64×64 luma, its 8×8 lowest frequencies (64: more copies hash alike than 32)
)
HASH_BITS = 8
# Text share: (side the luma is reduced to, tile side) per scale: body text and fine print, headlines and QR modules.
TEXT_SCALES = ((160, 16), (80, 8))
TEXT_MIN_CONTRAST = 60.0  # 90th - 10th percentile of a tile's luma, on 0..255
TEXT_MAX_MIDTONES = 0.3  # share of a tile's pixels between the two tones (photos are mostly mid-tones)
TEXT_MIN_TRANSITIONS = 1.5  # ink/background changes per row and column (strokes; one edge is ~1)


def luma(jpeg: bytes) -> np.ndarray:
    """The luma plane of a stored JPEG as float32 (the decoder skips chroma)."""
    img = Image.open(io.BytesIO(jpeg))
    img.draft("L", img.size)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _reduce(gray: np.ndarray, side: int) -> np.ndarray:
    if gray.shape == (side, side):
        return gray
    img = Image.fromarray(gray.astype(np.uint8), "L").resize((side, side), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


def perceptual_hash(gray: np.ndarray) -> int:
    """64-bit pHash as a signed int64: bit i set when DCT coefficient i of the 8×8 lowest frequencies of the
    64×64 luma exceeds their median (the DC term, the mean brightness, is left out of the median)."""
    low = dctn(_reduce(gray, HASH_SIDE), type=2, norm="ortho")[:HASH_BITS, :HASH_BITS].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">i8")[0])


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> int | np.ndarray:
    """Differing bits between int64 pHashes (elementwise for arrays)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)).view(np.uint64)
    counts = np.unpackbits(np.atleast_1d(x).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    return int(counts[0]) if np.ndim(a) == 0 and np.ndim(b) == 0 else counts


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: the classic blur measure (sharp edges → large values)."""
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4 * gray[1:-1, 1:-1]
    return float(lap.var())


def _text_tiles(gray: np.ndarray, tile: int) -> float:
    h, w = (gray.shape[0] // tile) * tile, (gray.shape[1] // tile) * tile
    if not h or not w:
        return 0.0
    tiles = (
        gray[:h, :w].reshape(h // tile, tile, w // tile, tile).transpose(0, 2, 1, 3).reshape(-1, tile * tile)
    )
    ranked = np.sort(tiles, axis=1)
    n = tiles.shape[1]
    low, high = ranked[:, n // 10, None], ranked[:, n * 9 // 10, None]  # the two tones, robust to specks
    spread = high - low
    midtones = ((tiles > low + 0.25 * spread) & (tiles < high - 0.25 * spread)).mean(axis=1)
    ink = (tiles > (low + high) / 2).reshape(-1, tile, tile)
    changes = (ink[:, :, 1:] != ink[:, :, :-1]).sum(axis=(1, 2)) + (ink[:, 1:, :] != ink[:, :-1, :]).sum(
        axis=(1, 2)
    )
    texty = (spread[:, 0] >= TEXT_MIN_CONTRAST) & (midtones <= TEXT_MAX_MIDTONES)
    texty &= changes / (2 * tile) >= TEXT_MIN_TRANSITIONS
    return float(texty.mean())


def text_share(gray: np.ndarray) -> float:
    """Share of the image's tiles that look like text or a QR code (two tones, high contrast, several strokes
    per row), at the scale where that share is largest (body text at half size, headlines and QR modules at a
    quarter)."""
    side = min(gray.shape)
    square = gray[:side, :side] if gray.shape[0] != gray.shape[1] else gray
    return max(_text_tiles(_reduce(square, min(s, side)), tile) for s, tile in TEXT_SCALES)
