"""Calibration: omni-modal calibration sets from real prompts and media, and quantization with them.

- `evalpacks`, `media`: the public evaluation packs of ../shared/data and the media made from them (speech,
  typographic images, clips); the benchmarks read them too.
- `calibset`: calibration sets (per modality, with a held-out split), cached by content hash.
- `capture`: each graph's real inputs, recorded while a bundle's Guard runs real requests.
- `recipes`: the named precision recipes; `graphs`: one graph through one recipe method;
  `quantize`: a recipe applied to an fp32 bundle, with its fidelity report and gate (`fidelity`).
"""
