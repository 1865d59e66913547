"""Per-modality preprocessing in numpy (+ soundfile, soxr, pillow, OpenCV for decoding and resizing),
reproducing the official path: qwen-omni-utils' fetch_image / fetch_video / librosa loading, then the
PIL Qwen2-VL image processor and the Whisper feature extractor (docs/design.md "The model facts the code relies on")."""
