"""Audio-encoder index tensors (Whisper-style encoder with chunked attention).

Log-mel frames (100 per second) are cut into chunks of 2 * n_window frames (200), each chunk runs
through two convolutions (the second with stride 2) and attends only within itself; afterwards pairs
of frames are average-pooled (stride 2). 301 frames -> 151 after the convs -> 75 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_FRAMES = 4  # fewer frames than this leave no pooled token at all (docs/design.md "The graphs")


@dataclass(frozen=True)
class AudioIndex:
    """Graph inputs for one audio call (one or several clips)."""

    padded_feature: np.ndarray  # [chunks, mel_bins, max_chunk_len] float32, zero-padded
    chunk_lengths: np.ndarray  # [chunks] int64: valid frames per chunk
    pool_index: np.ndarray  # [tokens] int64: first of each pooled pair, in the packed valid frames
    tokens_per_clip: tuple[int, ...]  # output tokens of each clip, in order


def audio_output_length(frames: int) -> int:
    """Tokens the encoder emits for `frames` mel frames (`_get_feat_extract_output_lengths`)."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def chunk_lengths(frames: list[int], n_window: int) -> np.ndarray:
    """Valid frames of each chunk, clip after clip; replaces `chunk_and_pad_features`' lengths."""
    size = 2 * n_window
    out = []
    for n in frames:
        full, rest = divmod(n, size)
        out.extend([size] * full + ([rest] if rest else []))
    return np.asarray(out, dtype=np.int64)


def pool_index(frames: list[int]) -> np.ndarray:
    """Index of the first frame of each pooled pair in the packed post-conv frames (`get_pool_indices`)."""
    out, offset = [], 0
    for n in frames:
        after_conv = (n - 1) // 2 + 1
        out.append(offset + 2 * np.arange(audio_output_length(n)))
        offset += after_conv
    return np.concatenate(out).astype(np.int64)


def chunk_features(features: list[np.ndarray], n_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Split each [mel_bins, frames] clip into chunks and zero-pad them to the longest chunk.

    Returns (padded [chunks, mel_bins, max_len] float32, chunk_lengths [chunks] int64).
    """
    lengths = chunk_lengths([f.shape[1] for f in features], n_window)
    bins = features[0].shape[0]
    padded = np.zeros((len(lengths), bins, int(lengths.max())), dtype=np.float32)
    row = 0
    for feat in features:
        for start in range(0, feat.shape[1], 2 * n_window):
            piece = feat[:, start : start + 2 * n_window]
            padded[row, :, : piece.shape[1]] = piece
            row += 1
    return padded, lengths


def audio_index(features: list[np.ndarray], n_window: int = 100) -> AudioIndex:
    """All inputs of the audio graph for clips given as [mel_bins, frames] log-mel arrays."""
    if not features:
        raise ValueError("audio_index needs at least one clip")
    frames = [int(f.shape[1]) for f in features]
    short = [n for n in frames if n < MIN_FRAMES]
    if short:
        raise ValueError(f"audio of {short[0]} mel frames is too short: at least {MIN_FRAMES} frames (40 ms)")
    padded, lengths = chunk_features(features, n_window)
    return AudioIndex(
        padded_feature=padded,
        chunk_lengths=lengths,
        pool_index=pool_index(frames),
        tokens_per_clip=tuple(audio_output_length(n) for n in frames),
    )
