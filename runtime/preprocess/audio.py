"""Audio: decode, mono, resample to 16 kHz, log-mel exactly as WhisperFeatureExtractor computes it for
Qwen2.5-Omni, but without padding every clip to 300 s (DESIGN section 5).

The processor pads each clip with zeros to 300 s, computes a centred STFT and keeps the frames its
attention mask marks valid (ceil(samples / hop)). Zero-padding only the tail that those frames can see
gives the same valid frames, and the log-mel clamp uses the same maximum (every frame that touches the
signal is included in it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

SAMPLE_RATE = 16000  # Hz, what the audio encoder was trained on
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms: 100 mel frames per second
RESAMPLER = "soxr_hq"  # librosa.load's default, which the official path uses


@dataclass(frozen=True)
class AudioLimits:
    """What the runtime accepts (configurable; the model saw at most 300 s clips)."""

    max_seconds: float = 300.0  # longer clips are refused: the feature extractor truncates at 300 s
    min_seconds: float = 0.04  # 4 mel frames: anything shorter yields no audio token


def _to_mono(data: np.ndarray) -> np.ndarray:
    return data.mean(axis=1) if data.ndim == 2 else data  # librosa.to_mono: mean over channels


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at `rate` Hz -> 16 kHz with soxr's high-quality filter (librosa's default res_type)."""
    if rate == SAMPLE_RATE:
        return wave.astype(np.float32, copy=False)
    if rate <= 0:
        raise InputError(f"audio sample rate must be positive, got {rate}")
    import soxr

    return soxr.resample(wave.astype(np.float32, copy=False), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """A path, bytes, or a float32 mono array (with `sample_rate`) -> float32 mono 16 kHz samples [n]."""
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise InputError("an audio array needs its sample_rate")
        if source.ndim != 1:
            raise InputError(f"audio arrays must be mono [samples], got shape {source.shape}")
        if not np.issubdtype(source.dtype, np.floating):
            raise InputError(f"audio arrays must be float samples in [-1, 1], got dtype {source.dtype}")
        wave, rate = source, sample_rate
    else:
        import soundfile as sf

        try:
            handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(Path(source))
            wave, rate = sf.read(handle, dtype="float32", always_2d=False)
        except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as exc:
            name = "audio bytes" if isinstance(source, (bytes, bytearray)) else str(source)
            raise InputError(f"{name}: cannot decode audio ({exc}); wav, flac and ogg are supported") from exc
        wave = _to_mono(wave)
    if not np.all(np.isfinite(wave)):
        raise InputError("audio contains NaN or infinite samples")
    return resample(np.asarray(wave, dtype=np.float32), int(rate))


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (transformers' window_function(n, 'hann'), torch.hann_window)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float64)


def log_mel(wave: np.ndarray, mel_filters: np.ndarray) -> np.ndarray:
    """float32 16 kHz samples [n] -> log-mel features [bins, ceil(n / 160)] float32.

    mel_filters: [n_fft // 2 + 1, bins], as WhisperFeatureExtractor.mel_filters (shipped in the bundle).
    """
    n = len(wave)
    frames = -(-n // HOP)
    seen = -(-(n + N_FFT // 2) // HOP)  # frames whose window reaches the signal: they set the clamp maximum
    padded = np.concatenate([wave.astype(np.float64), np.zeros(seen * HOP + N_FFT, np.float64)])
    padded = np.pad(padded, (N_FFT // 2, 0), mode="reflect")  # centred frames: reflect the start only
    idx = np.arange(seen)[:, None] * HOP + np.arange(N_FFT)[None, :]
    spec = np.abs(np.fft.rfft(padded[idx] * hann(N_FFT), n=N_FFT, axis=-1)) ** 2  # [seen, n_fft/2+1]
    mel = np.maximum(spec @ mel_filters.astype(np.float64), 1e-10)
    logs = np.log10(mel).T  # [bins, seen]
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs[:, :frames] + 4.0) / 4.0).astype(np.float32)


def audio_features(source, mel_filters: np.ndarray, sample_rate: int | None = None,
                   limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode + checks + log-mel: the [bins, frames] input of the audio encoder's index helpers."""
    wave = load_audio(source, sample_rate)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < limits.min_seconds:
        raise InputError(f"audio of {seconds * 1000:.0f} ms is too short: at least {limits.min_seconds * 1000:.0f} ms")
    if seconds > limits.max_seconds:
        raise InputError(f"audio of {seconds:.1f} s is longer than the limit of {limits.max_seconds:.0f} s")
    return log_mel(wave, mel_filters)
