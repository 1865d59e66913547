"""Fit the plain style's two verdict rows of a trained decoder's LM head, so that it discriminates as a guard.

A trained chat decoder is no guard zero-shot (Qwen2.5-Coder-0.5B answers `safe` to everything). The `small-real`
reference keeps every weight of its trained decoder and refits only the rows of `safe` and `unsafe` in the LM head.

The model's hidden state h at the plain verdict position (the first answer token, right after the guard template's
fixed tail and `<|im_start|>assistant\\n`) is read once per labelled text of the training split. Under constrained
decoding P(unsafe) = sigmoid((row_unsafe - row_safe) . h), so only the rows' difference w matters: a linear
classifier on h. Its direction is a shrinkage linear discriminant (shrinkage picked by 5-fold cross-validation on
the training split), its scale a logistic fit. Qwen2's head has no bias, so the fit has no intercept: every prompt
ends in the same fixed tail, so h carries a large common component u that serves as one (w = a d + b u; the AUROC
of a fit with a true intercept is reported beside it). Then row_safe = c - w/2 and row_unsafe = c + w/2 with a common
part c (a linear programme, `place_rows_lp`) such that the plain pair beats the labelled style's lead token on every
input scored, so the grammar takes the plain branch and P(unsafe) is the fitted probability, while at ordinary text
positions (the guard prompts' own, code, chat) both rows stay below the token the model would write there.

A stand-in: this says nothing about OmniGuard's accuracy; it makes the precision recipes' verdict agreement and
AUROC drop measure something on trained weights.
"""

from __future__ import annotations

import math
import random
import time
import numpy as np

from . import evalpacks
from .metrics import macro_auroc

TEXT_PACKS = ["xstest_prompts", "xstest_responses", "openai_moderation", "simple_safety_tests", "ailuminate"]
FIT_SEED = 0
# the plain pair must beat the labelled lead by this at every verdict state
LEAD_MARGIN = 2.0
ORDINARY_STRIDE = 16  # every 16th position of each guard prompt is an ordinary state the rows must not win at


def labelled_texts(data, side: str | None = None) -> list[evalpacks.Item]:
    """The five text packs' items (every kept row), optionally only one side of the split."""
    items = evalpacks.load(TEXT_PACKS, data, media_dir=data, limit=None, seed=0)  # text packs make no media
    return [it for it in items if side is None or evalpacks.side(it) == side]


def _logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-6) -> np.ndarray:
    """Weights of an L2-regularised logistic regression without intercept (Newton's method on columns scaled to
    unit root mean square, mapped back)."""
    sd = np.sqrt((X ** 2).mean(0)) + 1e-12
    Z = X / sd
    w = np.zeros(Z.shape[1])
    reg = l2 * len(Z)
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(Z @ w, -40, 40)))
        grad = Z.T @ (p - y) + reg * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + reg * np.eye(Z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w / sd


def lda_direction(H: np.ndarray, y: np.ndarray, shrinkage: float) -> np.ndarray:
    """The unit discriminant direction Sigma^-1 (mu_unsafe - mu_safe), Sigma the pooled within-class covariance
    shrunk towards its mean variance by `shrinkage` (0: none, 1: the class-mean difference itself)."""
    H, y = np.asarray(H, np.float64), np.asarray(y, bool)
    mu1, mu0 = H[y].mean(0), H[~y].mean(0)
    centred = np.concatenate([H[y] - mu1, H[~y] - mu0])
    cov = centred.T @ centred / max(1, len(H) - 2)
    target = np.trace(cov) / len(cov)
    d = np.linalg.solve((1 - shrinkage) * cov + shrinkage * target * np.eye(len(cov)), mu1 - mu0)
    return d / np.linalg.norm(d)


def _direction_and_scale(H: np.ndarray, y: np.ndarray, shrinkage: float) -> np.ndarray:
    """w = a * d + b * u, d the discriminant direction, u the unit mean hidden state (the common component that
    stands in for an intercept), a and b from a logistic fit without intercept on the two projections."""
    u = H.mean(0) / np.linalg.norm(H.mean(0))
    P = np.stack([lda_direction(H, y, shrinkage), u])
    return P.T @ _logistic(H @ P.T, y.astype(np.float64))


def fit_direction(H: np.ndarray, y: np.ndarray, packs: np.ndarray, seed: int = FIT_SEED,
                  grid=(0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)) -> tuple[np.ndarray, float]:
    """(w, shrinkage): the direction w (no intercept) with the covariance shrinkage picked by 5-fold macro AUROC on
    the training items (folds seeded). A plain L2 logistic regression on all 896 dimensions overfits a few thousand
    texts (held-out macro AUROC 0.66-0.72 against 0.72-0.77 here, measured on small-real; docs/cli.md "small-real")."""
    H, y = np.asarray(H, np.float64), np.asarray(y, bool)
    order = list(range(len(H)))
    random.Random(seed).shuffle(order)
    folds = np.empty(len(H), int)
    folds[order] = np.arange(len(H)) % 5
    best = None
    for shrinkage in grid:
        scores = np.empty(len(H))
        for k in range(5):
            w = _direction_and_scale(H[folds != k], y[folds != k], shrinkage)
            scores[folds == k] = H[folds == k] @ w
        value = macro_auroc(scores, y, packs)[0]
        if best is None or value > best[0] + 1e-9:
            best = (value, shrinkage)
    return _direction_and_scale(H, y, best[1]).astype(np.float32), best[1]


def place_rows_lp(w: np.ndarray, base: np.ndarray, lead_row: np.ndarray, H: np.ndarray, G: np.ndarray,
                  ceiling: np.ndarray, margin: float = LEAD_MARGIN, basis: int = 32,
                  slack_cap: float = 4.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(row_safe, row_unsafe, report): the common part c = base + P^T theta, P the unit mean verdict state and the
    `basis` leading principal directions of the verdict and ordinary states, chosen by a linear programme so that
    - at every verdict state h the plain pair beats the labelled lead by `margin` (hard), and
    - at every ordinary state g both rows stay below `ceiling` (the top other token, or the original rows' own
      logit where they already won) by the largest common slack s <= `slack_cap`.
    Without the second condition the rows, large enough to carry the fit, win at ordinary positions and a greedy
    continuation of plain text turns to `safe` (measured on small-real; docs/cli.md "small-real")."""
    from scipy.optimize import linprog

    H, G, w = np.asarray(H, np.float64), np.asarray(G, np.float64), np.asarray(w, np.float64)
    u = H.mean(0) / np.linalg.norm(H.mean(0))
    stacked = np.vstack([G[::max(1, len(G) // len(H))], H])
    _, _, vt = np.linalg.svd(stacked - stacked.mean(0), full_matrices=False)
    P = np.vstack([u, vt[:basis]])
    m = len(P)
    A = np.vstack([np.hstack([-(H @ P.T), np.zeros((len(H), 1))]), np.hstack([G @ P.T, np.ones((len(G), 1))])])
    b = np.concatenate([H @ (base - lead_row) - np.abs(H @ w) / 2 - margin,
                        ceiling - G @ base - np.abs(G @ w) / 2])
    res = linprog(np.r_[np.zeros(m), -1.0], A_ub=A, b_ub=b, bounds=[(-50, 50)] * m + [(None, slack_cap)],
                  method="highs")
    if not res.success:
        raise ValueError(f"the verdict rows cannot be placed: {res.message}")
    # second stage: the smallest change (L1 over theta = t+ - t-) that keeps 90 % of that slack. Large rows cost
    # fp32 precision in the logits the runtime computes (P(unsafe) drifts from the fitted value)
    slack = 0.9 * res.x[-1] if res.x[-1] > 0 else res.x[-1] - 0.1 * abs(res.x[-1])
    A2 = np.hstack([A[:, :m], -A[:, :m]])
    b2 = b - A[:, m] * slack
    res2 = linprog(np.ones(2 * m), A_ub=A2, b_ub=b2, bounds=[(0, 50)] * (2 * m), method="highs")
    theta = res2.x[:m] - res2.x[m:] if res2.success else res.x[:m]
    c = base + P.T @ theta
    verdict = (c - lead_row) @ H.T - np.abs(H @ w) / 2
    ordinary = G @ c + np.abs(G @ w) / 2 - ceiling
    report = {"basis": basis, "ordinary_states": len(G), "slack": round(float(slack), 4),
              "common_part_change_norm": round(float(np.linalg.norm(c - base)), 4),
              "plain_over_lead_min_margin": round(float(verdict.min()), 4),
              "ordinary_states_where_a_row_wins": int((ordinary > 0).sum())}
    c32, w32 = c.astype(np.float32), w.astype(np.float32)
    return c32 - w32 / 2, c32 + w32 / 2, report


# Free text the rows must not take over (with the guard prompts' own positions): code and chat, as a decoder of
# this family writes them.
ORDINARY_TEXTS = [
    "def fibonacci(n):\n    if n <= 0:\n        return \"Invalid input\"\n    elif n == 1:\n        return 0\n"
    "    elif n == 2:\n        return 1\n    else:\n        return fibonacci(n-1) + fibonacci(n-2)\n",
    "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return [line.strip() for line in f]\n",
    "<|im_start|>user\nHow do I sort a list in Python?<|im_end|>\n<|im_start|>assistant\nUse sorted() for a new list "
    "or list.sort() in place: numbers = [3, 1, 2]; numbers.sort() leaves [1, 2, 3].",
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes.",
]


class HiddenStates:
    """The decoder's final-norm hidden state at the verdict position of guard prompts, with the policy prefix's KV
    computed once. `tensors`: the decoder's tensors under thinker names (`model.*`, `lm_head.weight`); text
    positions are equal on TMRoPE's three axes, so a plain Qwen2 model with these weights is the thinker's decoder."""

    def __init__(self, tensors: dict, dims: dict, rope_theta: float, rms_eps: float, prefix_ids: list[int]):
        import torch
        from transformers import Qwen2Config, Qwen2Model
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        cfg = Qwen2Config(hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_hidden_layers"],
                          num_attention_heads=dims["num_attention_heads"],
                          num_key_value_heads=dims["num_key_value_heads"], intermediate_size=dims["intermediate_size"],
                          vocab_size=dims["vocab_size"], rope_theta=rope_theta, rms_norm_eps=rms_eps,
                          max_position_embeddings=32768, use_sliding_window=False, tie_word_embeddings=False)
        with torch.device("meta"):
            model = Qwen2Model(cfg)
        state = {k[len("model."):]: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary_emb = Qwen2RotaryEmbedding(config=cfg)  # a buffer, not a weight: built off the meta device
        self.model = model.eval().float()
        self.torch = torch
        self.prefix = list(prefix_ids)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([self.prefix]), use_cache=True)
        self.cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache

    def __call__(self, ids: list[int], stride: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """h at the last position of `ids` (which must start with the prefix); with `stride`, also the states of
        every stride-th earlier position of the suffix (ordinary text positions: where the rows must not win)."""
        n = len(self.prefix)
        if ids[:n] != self.prefix or len(ids) == n:
            raise ValueError("the prompt does not extend the policy prefix")
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids[n:]]), cache=self.cache, use_cache=True,
                             position_ids=torch.arange(n, len(ids))[None])
            states = out.last_hidden_state[0].numpy().astype(np.float32)
        self.cache.crop(n - len(ids))  # transformers 5.x: a negative count removes that many tokens
        return (states[-1], states[:-1:stride].copy()) if stride else states[-1]

    def full(self, ids: list[int]) -> np.ndarray:
        """The states of every position of `ids`, without the prefix cache (free text)."""
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids])).last_hidden_state[0].numpy().astype(np.float32)


def _sample(items: list, limit: int | None, seed: int) -> list:
    """At most `limit` items, the same share of each pack (seeded), in a seeded order."""
    if limit is None or len(items) <= limit:
        out = list(items)
    else:
        packs = sorted({it.pack for it in items})
        by_pack = {p: [it for it in items if it.pack == p] for p in packs}
        rng = random.Random(seed)
        for p in packs:
            rng.shuffle(by_pack[p])
        out, i = [], 0
        while len(out) < limit:  # round-robin over the packs
            for p in packs:
                if i < len(by_pack[p]) and len(out) < limit:
                    out.append(by_pack[p][i])
            i += 1
    random.Random(seed + 1).shuffle(out)
    return out


def guard_prompt_ids(prompt_tokenizer, item) -> list[int]:
    """The runtime's own prompt ids for a text item (the text template, no media)."""
    from ..runtime.prompt.policy import Policy
    from ..runtime.prompt.render import Conversation, compose_guard_text
    from ..runtime.prompt.tokenize import Item

    text = compose_guard_text(Conversation.of(item.text, item.response), [], Policy())
    return prompt_tokenizer.encode([Item("text", text)])


def fit_head(tensors: dict, tok, info, data, train_limit: int | None = 1200, heldout_limit: int | None = 400,
             seed: int = FIT_SEED, progress: bool = True) -> dict:
    """Fit the plain verdict rows of `tensors["lm_head.weight"]` in place and return the report the checkpoint
    records. `tok`: the checkpoint's tokenizer; `info`: the decoder's geometry (export.gguf_decoder.GGUFDecoder);
    `data`: the labelled seed data. Training texts come only from the split's training side, scores from its
    held-out side."""
    from tqdm import tqdm

    from ..export.chat_template import CHAT_TEMPLATE
    from ..runtime.verdict.grammar import LABELLED_LEAD
    from ..runtime.prefix import common_prefix
    from ..runtime.prompt.tokenize import PromptTokenizer

    prompts = PromptTokenizer(tok, CHAT_TEMPLATE)
    ids = {w: tok.encode(w, add_special_tokens=False).ids for w in ("safe", "unsafe")}
    if any(len(v) != 1 for v in ids.values()):
        raise ValueError(f"`safe` and `unsafe` must be single tokens to fit their rows, got {ids}")
    safe, unsafe = ids["safe"][0], ids["unsafe"][0]
    lead = tok.encode(LABELLED_LEAD, add_special_tokens=False).ids[0]
    train = _sample(labelled_texts(data, "train"), train_limit, seed)
    held = _sample(labelled_texts(data, "heldout"), heldout_limit, seed)
    if not train or not held:
        raise ValueError(f"{data}: no labelled texts on one side of the split")
    encoded = [guard_prompt_ids(prompts, it) for it in train + held]
    prefix = encoded[0]
    for e in encoded[1:]:  # the policy prefix: what every guard prompt starts with
        prefix = prefix[:common_prefix(prefix, e)]
    t0 = time.perf_counter()
    states = HiddenStates(tensors, info.text_dims(), info.rope_theta, info.rms_eps, prefix)
    verdict_states, ordinary = [], [states.full(prefix)] + [states.full(tok.encode(t).ids) for t in ORDINARY_TEXTS]
    for e in tqdm(encoded, desc="verdict fit: hidden states", unit="text", disable=not progress):
        h, interior = states(e, stride=ORDINARY_STRIDE)
        verdict_states.append(h)
        ordinary.append(interior)
    H, G = np.stack(verdict_states), np.concatenate(ordinary)
    t_states = time.perf_counter() - t0
    n = len(train)
    y = np.array([it.label == "unsafe" for it in train + held])
    packs = np.array([it.pack for it in train + held])
    w, shrinkage = fit_direction(H[:n], y[:n], packs[:n], seed)
    head = tensors["lm_head.weight"]
    base = (head[safe] + head[unsafe]) / 2
    ceiling = np.empty(len(G))  # the ordinary states' top logit before the fit, in blocks (151,936 columns)
    for i in range(0, len(G), 512):
        block = G[i:i + 512] @ head.T
        own = block[:, [safe, unsafe]].max(1)
        block[:, [safe, unsafe]] = -np.inf
        ceiling[i:i + 512] = np.maximum(block.max(1), own)
    row_safe, row_unsafe, placed = place_rows_lp(w, base.astype(np.float64), head[lead].astype(np.float64), H, G,
                                                 ceiling)
    head[safe], head[unsafe] = row_safe, row_unsafe
    # what the grammar will compute from the written rows, against the fit's probability
    logits = H.astype(np.float32) @ head[[safe, unsafe, lead]].T
    p_rows = 1 / (1 + np.exp(-(logits[:, 1].astype(np.float64) - logits[:, 0])))
    p_fit = 1 / (1 + np.exp(-(H.astype(np.float64) @ w.astype(np.float64))))
    if not (logits[:, :2].min(1) > logits[:, 2]).all():
        raise ValueError("the placed verdict rows do not beat the labelled lead on every input")
    # with a true intercept the score would be a * d.h + c: its AUROC is that of d.h alone
    s_int = H[n:].astype(np.float64) @ lda_direction(H[:n], y[:n], shrinkage)
    macro, per_pack = macro_auroc(p_rows[n:], y[n:], packs[n:])
    from . import split as split_mod

    return {
        "method": "w = a d + b u on the final-norm hidden state at the plain verdict position: d a shrinkage linear "
                  "discriminant (shrinkage by 5-fold CV), u the unit mean state, a and b a logistic fit with no "
                  "intercept; rows safe = c - w/2, unsafe = c + w/2",
        "seed": seed, "split": split_mod.describe(), "sources": TEXT_PACKS,
        "token_ids": {"safe": safe, "unsafe": unsafe, "labelled_lead": lead},
        "train_items": n, "heldout_items": len(held), "prefix_tokens": len(prefix),
        "shrinkage": shrinkage,
        "heldout_macro_auroc": round(macro, 4), "heldout_auroc_per_pack": {k: None if math.isnan(v) else round(v, 4) for k, v in per_pack.items()},
        "heldout_macro_auroc_with_intercept": round(macro_auroc(s_int, y[n:], packs[n:])[0], 4),
        "train_macro_auroc": round(macro_auroc(p_rows[:n], y[:n], packs[:n])[0], 4),
        "heldout_p_unsafe_deciles": [round(float(q), 4) for q in np.quantile(p_rows[n:], np.linspace(0, 1, 11))],
        "rows_vs_fit_max_abs_dp": float(np.abs(p_rows - p_fit).max()),
        "row_placement": placed, "plain_over_lead_min_margin": placed["plain_over_lead_min_margin"],
        "seconds_hidden_states": round(t_states, 1),
    }
