"""Audio: decode, mono, resample to 16 kHz, log-mel exactly as WhisperFeatureExtractor computes it for
Qwen2.5-Omni, but without padding every clip to 300 s (docs/design.md "A request, stage by stage").

The processor pads each clip with zeros to 300 s, computes a centred STFT and keeps the frames its
attention mask marks valid (ceil(samples / hop)). Zero-padding only the tail that those frames can see
gives the same valid frames, and the log-mel clamp uses the same maximum (every frame that touches the
signal is included in it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SAMPLE_RATE = 16000  # Hz, what the audio encoder was trained on
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms: 100 mel frames per second
RESAMPLER = "soxr_hq"  # librosa.load's default, which the official path uses


MIN_RATE, MAX_RATE = 4000, 384000  # accepted sample rates (arrays and files), Hz
ARRAY_FORMS = "a 1-D float array of samples with sample_rate"


@dataclass(frozen=True)
class AudioLimits:
    """What the runtime accepts (configurable; the model saw at most 300 s clips)."""

    max_seconds: float = 300.0  # longer clips are refused: the feature extractor truncates at 300 s
    min_seconds: float = 0.04  # 4 mel frames: anything shorter yields no audio token
    max_channels: int = 64  # more channels than this is not speech: refused from the header


def check_sample_rate(rate, name: str = "sample_rate") -> int:
    """An int (not bool, str or float) in [4000, 384000] -> int; anything else is an InputError."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Integral):
        raise InputError(f"{name} must be an int in [{MIN_RATE}, {MAX_RATE}] Hz (e.g. 16000), "
                         f"got {type(rate).__name__} {rate!r:.40}")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise InputError(f"{name} must be an int in [{MIN_RATE}, {MAX_RATE}] Hz, got {int(rate)}")
    return int(rate)


def _check_seconds(seconds: float, label: str, limits: AudioLimits, claimed: bool = False) -> None:
    what = "claims" if claimed else "is"
    if seconds > limits.max_seconds:
        raise InputError(f"{label} {what} {seconds:.1f} s: longer than the limit of {limits.max_seconds:g} s "
                         f"(AudioLimits.max_seconds)")
    if seconds < limits.min_seconds:
        raise InputError(f"{label} of {seconds * 1000:.0f} ms is too short: at least "
                         f"{limits.min_seconds * 1000:.0f} ms")


def _finite(wave: np.ndarray, label: str, stage: str) -> np.ndarray:
    if not np.isfinite(wave).all():
        raise InputError(f"{label}: NaN or infinite samples {stage}; samples must be finite floats in [-1, 1]")
    return wave


RANGE_SLACK = 1e-3  # float samples may overshoot [-1, 1] by this much (rounding), no more
CANCEL_RATIO = 0.1  # a mono mix whose RMS is under this share of the loudest channel's: the channels cancel


def _in_range(wave: np.ndarray, label: str) -> np.ndarray:
    """Float samples must lie in [-1, 1] (a little rounding allowed): amplitudes like 32767 are int PCM passed
    as floats, and are refused instead of being judged as something else."""
    if wave.size and float(np.abs(wave).max()) > 1.0 + RANGE_SLACK:
        raise InputError(f"{label}: samples reach {float(np.abs(wave).max()):.4g}; the float samples must be in "
                         f"[-1, 1] (scale int PCM by 1/32768, or pass the file)")
    return wave


def _to_mono(data: np.ndarray) -> np.ndarray:
    return data.mean(axis=1) if data.ndim == 2 else data  # librosa.to_mono: mean over channels


def _resampler(rate: int):
    """A soxr HQ stream rate -> 16 kHz (the same samples as soxr.resample on the whole clip), or None."""
    if rate == SAMPLE_RATE:
        return None
    import soxr

    return soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at `rate` Hz -> 16 kHz with soxr's high-quality filter (librosa's default res_type)."""
    rate = check_sample_rate(rate)
    if rate == SAMPLE_RATE:
        return wave.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(wave.astype(np.float32, copy=False), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def _load_array(source: np.ndarray, sample_rate, limits: AudioLimits) -> np.ndarray:
    if sample_rate is None:
        raise InputError(f"sample_rate: an audio array needs its sample_rate (an int in [{MIN_RATE}, {MAX_RATE}] Hz)")
    rate = check_sample_rate(sample_rate)
    if source.ndim != 1:
        raise InputError(f"audio arrays must be mono [samples] (1-D float), got shape {source.shape}")
    if source.dtype.kind != "f":
        raise InputError(f"audio arrays must be float samples in [-1, 1] (float16/32/64), got dtype {source.dtype}")
    _check_seconds(len(source) / rate, "audio", limits)  # before any conversion or resampling
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is what the check below reports
        wave = _finite(source.astype(np.float32, copy=False), "audio", "(after conversion to float32)")
    _in_range(wave, "audio")
    return _finite(resample(wave, rate), "audio", f"after resampling from {rate} Hz")


def _load_file(source, limits: AudioLimits, block_seconds: float = 1.0) -> np.ndarray:
    """Header checks (rate, channels, claimed length), then a block-wise read that stops at the limit."""
    import soundfile as sf

    from .source import media_source

    src = media_source(source, "audio", ARRAY_FORMS)
    label = src.label
    stream = src.open()
    try:
        try:
            snd = sf.SoundFile(stream)
        except (RuntimeError, sf.LibsndfileError, TypeError, ValueError, OSError, EOFError) as exc:
            raise InputError(f"{label}: cannot decode audio ({exc}); wav, flac and ogg are supported") from exc
        with snd:
            rate, channels, frames = snd.samplerate, snd.channels, snd.frames
            if not MIN_RATE <= rate <= MAX_RATE:
                raise InputError(f"{label}: the file's sample rate {rate} Hz is outside [{MIN_RATE}, {MAX_RATE}] Hz")
            if not 1 <= channels <= limits.max_channels:
                raise InputError(f"{label}: {channels} channels; 1..{limits.max_channels} are accepted")
            known = 0 <= frames < 2**62  # libsndfile reports SF_COUNT_MAX when the length is unknown
            if known and frames / rate > limits.max_seconds:
                _check_seconds(frames / rate, label, limits, claimed=True)  # refused from the header
            max_frames = int(limits.max_seconds * rate)
            block = max(1, min(int(rate * block_seconds), (1 << 22) // channels))
            resampler = _resampler(rate)
            float_file = snd.subtype in ("FLOAT", "DOUBLE")  # int PCM decodes within [-1, 1) by construction
            out, total = [], 0
            mono_energy, channel_energy = 0.0, np.zeros(channels)
            while True:
                try:
                    data = snd.read(block, dtype="float32", always_2d=True)
                except (RuntimeError, sf.LibsndfileError, ValueError, OSError, EOFError) as exc:
                    raise InputError(f"{label}: cannot decode audio ({exc}); wav, flac and ogg are supported") from exc
                n = len(data)
                total += n
                if total > max_frames:  # the header lied or gave no length: stop at the limit
                    raise InputError(f"{label} is longer than the limit of {limits.max_seconds:g} s "
                                     f"(AudioLimits.max_seconds); decoding stopped there")
                last = n < block
                if float_file:
                    _in_range(_finite(data, label, "in the file"), label)
                mono = _finite(data.mean(axis=1) if channels > 1 else data[:, 0], label, "in the file")
                if channels > 1:
                    mono_energy += float(np.einsum("i,i->", mono, mono, dtype=np.float64))  # no BLAS: see log_mel
                    channel_energy += np.einsum("ij,ij->j", data, data, dtype=np.float64)
                if resampler is not None:
                    mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
                out.append(np.asarray(mono, np.float32))
                if last:
                    break
    finally:
        if src.file is None:
            stream.close()
    _check_seconds(total / rate, label, limits)
    if channels > 1 and mono_energy < CANCEL_RATIO ** 2 * channel_energy.max():  # RMS ratio < CANCEL_RATIO
        raise InputError(f"{label}: the {channels} channels cancel each other in the mono mix (its RMS is "
                         f"{math.sqrt(mono_energy / max(channel_energy.max(), 1e-300)):.3f} of the loudest "
                         f"channel's): the guard would hear near-silence; pass one channel (a mono file or a 1-D "
                         f"array)")
    wave = np.concatenate(out) if out else np.zeros(0, np.float32)
    return _finite(wave, label, f"after resampling from {rate} Hz")


def load_audio(source, sample_rate: int | None = None, limits: AudioLimits | None = None) -> np.ndarray:
    """A path, bytes, a binary file object, or a 1-D float array (with `sample_rate`) -> float32 mono 16 kHz.

    Length is checked before work: an array's len / sample_rate before conversion and resampling, a file's
    header frames / rate before reading, and the read itself stops at the limit (headers can lie).
    Every float array is checked finite after each conversion and after resampling.
    """
    limits = limits or AudioLimits()
    if sample_rate is not None:
        check_sample_rate(sample_rate)  # a file ignores it, but a bad value is still the caller's error
    if isinstance(source, np.ndarray):
        return _load_array(source, sample_rate, limits)
    return _load_file(source, limits)


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
    # Not `spec @ filters`: that is a BLAS GEMM, and numpy's OpenBLAS workers busy-wait after it (well over
    # 50 ms of a core) while the audio encoder and the decoder need every core. Measured on `tiny`, 2 cores,
    # audio_5s: time to first token p50 65-88 ms after the GEMM, 25-29 ms after this einsum, which runs on the
    # calling thread (2.8 ms for 5 s of audio, 16 ms for 30 s; the GEMM took 0.6 and 2.7 ms). docs/performance.md "Threads".
    mel = np.maximum(np.einsum("fk,km->fm", spec, mel_filters.astype(np.float64), optimize=False), 1e-10)
    logs = np.log10(mel).T  # [bins, seen]
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs[:, :frames] + 4.0) / 4.0).astype(np.float32)


def audio_features(source, mel_filters: np.ndarray, sample_rate: int | None = None,
                   limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode + checks + log-mel: the [bins, frames] input of the audio encoder's index helpers."""
    wave = load_audio(source, sample_rate, limits)
    _check_seconds(len(wave) / SAMPLE_RATE, "audio", limits)
    features = log_mel(wave, mel_filters)
    return _finite(features, "audio", "in the log-mel features")
