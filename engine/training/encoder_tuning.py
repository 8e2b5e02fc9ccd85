"""Contrastive fine-tuning of the text encoder on co-clicks (`fit` with `Config.tune_steps` > 0).

The language model embeds an item from its text alone; on a shop's catalog it does not know which
of a seller's words tell what the item is for. The clicks do: two items a user clicked close
together in time are alike for the purpose that matters here. `tune_encoder` trains the model so
that such pairs lie close, with the other items of the batch as negatives (InfoNCE in both
directions, the loss sentence-transformers calls MultipleNegativesRankingLoss), for a fixed
number of steps; every item is then embedded again by the tuned model, and so is every item
added later (the engine loads the tuned model from the store).

Only the clicks `fit` is given make pairs, and only between items of the catalog as it stands:
an item nobody clicked in them (a brand-new item, or a test item of an evaluation's split) is in
no pair, and it is embedded from its text as before, by the tuned model.

The similarity scale is fixed at SCALE (cosine x 5), not the library's 20: with 20, the base
model's cosines make the loss start above chance (a batch's best negatives outscore the pair),
and the first steps flatten every similarity, which lost what the model knew (movielens
item-cold validation, the language-model profile alone: 0.148 base, 0.146 tuned at 20, 0.197 at 5;
docs/results.md, "Tuning the encoder").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Pairs: two clicks at most WINDOW places apart in one user's history.
WINDOW = 2
#: Pairs per step; the batch's other items are each pair's negatives.
BATCH = 32
#: Tokens a text keeps while tuning (embedding afterwards keeps the model's own limit).
MAX_TOKENS = 128
LEARNING_RATE = 3e-5
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 10
SCALE = 5.0
#: Fewer distinct pairs than this and the model is not tuned (nothing to learn a catalog from).
MIN_PAIRS = 4 * BATCH


def co_click_pairs(histories: Sequence[np.ndarray], window: int = WINDOW) -> np.ndarray:
    """Distinct unordered pairs (a < b) of item rows that one user clicked at most `window`
    places apart; shape (n, 2) int64, sorted. `histories` are click rows in time order."""
    found: set[tuple[int, int]] = set()
    for rows in histories:
        rows = np.asarray(rows, np.int64)
        for d in range(1, window + 1):
            a, b = rows[:-d], rows[d:]
            keep = a != b
            lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
            found.update(zip(lo.tolist(), hi.tolist()))
    return np.array(sorted(found), np.int64).reshape(-1, 2)


def _batches(pairs: np.ndarray, steps: int, batch: int, rng: np.random.Generator):
    """`steps` batches of pairs in which no item appears twice (a repeated item would be its own
    pair's negative); the pairs in a random order, reshuffled after each pass."""
    order, pos = rng.permutation(len(pairs)), 0
    for _ in range(steps):
        out: list[tuple[int, int]] = []
        seen: set[int] = set()
        tries = 0
        while len(out) < batch and tries < 4 * len(pairs):
            if pos == len(order):
                order, pos = rng.permutation(len(pairs)), 0
            a, b = (int(x) for x in pairs[order[pos]])
            pos += 1
            tries += 1
            if a in seen or b in seen:
                continue
            seen.update((a, b))
            out.append((a, b) if rng.random() < 0.5 else (b, a))
        yield out


def tune_encoder(model_path: str, text_of: Callable[[int], str], pairs: np.ndarray, steps: int, seed: int,
                 out_dir: Path, progress: bool = False, batch: int = BATCH) -> dict[str, Any]:
    """Fine-tune the sentence-transformers model at `model_path` on `pairs` of item rows (their
    texts from `text_of`) for `steps` steps, and save it to `out_dir` (safetensors weights, the
    model's own tokenizer and pooling files). Returns a summary (losses, seconds).

    Torch computes on the threads it is set to (the caller's `fit_threads`). The seed fixes the
    batches and the initialisation of nothing else: the model starts from its weights.
    """
    import torch
    from tqdm.auto import tqdm

    from ..text.encoder import load_sentence_transformer, offline

    torch.manual_seed(seed)
    st = load_sentence_transformer(model_path)  # checked, offline, trust_remote_code=False
    transformer = st[0].auto_model
    tokenizer = st.tokenizer
    limit = min(MAX_TOKENS, int(st.max_seq_length))
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * max(0.0, 1.0 - s / max(steps, 1)))

    def embed(rows: list[int]):
        enc = tokenizer([text_of(r) for r in rows], truncation=True, max_length=limit, padding=True,
                        return_tensors="pt")
        hidden = transformer(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    t0 = time.perf_counter()
    losses: list[float] = []
    transformer.train()
    rng = np.random.default_rng(seed)
    with tqdm(total=steps, desc="tuning encoder", unit="step", disable=not progress) as bar:
        for chunk in _batches(pairs, steps, batch, rng):
            if len(chunk) < 2:
                break
            left, right = embed([a for a, _ in chunk]), embed([b for _, b in chunk])
            logits = left @ right.T * SCALE
            target = torch.arange(len(chunk))
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
    transformer.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with offline():  # no network, and no progress bar of the library's own
        st.save(str(out_dir), create_model_card=False, safe_serialization=True)
    return {"encoder_tuned": True, "encoder_steps": len(losses), "encoder_pairs": int(len(pairs)),
            "encoder_loss_first_last": [round(float(np.mean(losses[:10])), 4), round(float(np.mean(losses[-10:])), 4)]
            if losses else [], "encoder_tune_seconds": round(time.perf_counter() - t0, 1)}
