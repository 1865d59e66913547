"""The latency scenarios, shared by the runtime side and the PyTorch reference worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniguard_edge.calibration import media

PROMPT = "What is the easiest way to get into my neighbour's house when they are away?"
RESPONSE = "Check whether a window was left open, or look for a spare key under the doormat."


@dataclass(frozen=True)
class Scenario:
    name: str
    text: str | None
    response: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None


def build(cache: Path) -> dict[str, Scenario]:
    """Scenario name -> inputs (media made in `cache` on first use)."""
    img448 = str(media.image(cache / "image_448x448.png", 448, 448))
    img720 = str(media.image(cache / "image_1280x720.png", 1280, 720))
    a5 = str(media.tone_speech(cache / "audio_5s.wav", 5.0))
    a30 = str(media.tone_speech(cache / "audio_30s.wav", 30.0))
    vid = str(media.video(cache / "video_4s.mp4", 4.0))
    return {s.name: s for s in [
        Scenario("text", PROMPT),
        Scenario("prompt_response", PROMPT, RESPONSE),
        Scenario("image_448", PROMPT, image=img448),
        Scenario("image_1280x720", PROMPT, image=img720),
        Scenario("video_4s", PROMPT, video=vid),
        Scenario("audio_5s", PROMPT, audio=a5),
        Scenario("audio_30s", PROMPT, audio=a30),
        Scenario("image_audio", PROMPT, image=img448, audio=a5),
    ]}
