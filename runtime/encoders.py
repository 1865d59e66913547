"""Run the vision and audio graphs on preprocessed media; one call per modality for all its items."""

from __future__ import annotations

import numpy as np

from .positions import audio_index, vision_index


def encode_vision(session, rows: list[np.ndarray], grids: list[tuple[int, int, int]], vision: dict,
                  run_options=None) -> list[np.ndarray]:
    """Pixel rows of each image/video (in order) -> features [tokens_i, hidden] per item."""
    idx = vision_index(grids, vision["spatial_merge_size"], vision["window_size"], vision["patch_size"])
    # the index inputs the graph declares (bundles exported before the padded attention batch take win_seg/full_seg)
    feeds = {"pixel_values": np.concatenate(rows, axis=0).astype(np.float32), **idx.feeds(session.input_names)}
    features = session.run(feeds, ["features"], run_options)["features"]
    unit = vision["spatial_merge_size"] ** 2
    splits = np.cumsum([t * h * w // unit for t, h, w in grids])[:-1]
    return np.split(features, splits)


def encode_audio(session, mels: list[np.ndarray], audio: dict, run_options=None) -> list[np.ndarray]:
    """Log-mel [bins, frames] per clip -> features [tokens_i, hidden] per clip."""
    idx = audio_index(mels, audio["n_window"])
    features = session.run({"padded_feature": idx.padded_feature, "chunk_lengths": idx.chunk_lengths,
                            "pool_index": idx.pool_index}, ["features"], run_options)["features"]
    return np.split(features, np.cumsum(idx.tokens_per_clip)[:-1])
