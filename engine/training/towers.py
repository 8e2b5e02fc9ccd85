"""Training the item tower from logged clicks (a two-tower model with a mean-of-history user tower).

The model scores a user u and an item i as `tau * <u, v_i> + b_i` where
- `v_i = normalise(e_i W + r_i)`: the text vector e_i through a learned map W, plus a residual r_i
  that only warm items have (their audience beyond their text). r_i is dropped at random during
  training so that W alone must place items well: that is what a cold item gets.
- `b_i = e_i . w + c_i`: a popularity bias predicted from text, plus a warm-only residual c_i.
- `u = normalise(mean of v_j over the user's clicked items)`, the same rule the online updater
  follows for new users, so a user built click by click lives in the trained space. With no
  clicks u = 0 and the score is the bias alone: the learned popularity prior.
Training is softmax cross-entropy over the catalog (or a uniform sample of it for large catalogs)
on (random subset of a user's other clicks -> one held-out click) examples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.projection import TAU_EDGES

log = logging.getLogger(__name__)


#: Every temperature starts here: unit vectors' cosines span [-1, 1], and a softmax over a
#: catalog needs logits a few units apart to prefer anything.
TAU_START = 10.0
#: Items whose text vectors start W at their principal directions (an SVD of more costs time and
#: moves the directions little).
PCA_SAMPLE = 20_000
#: Scale of the random directions that pad W when the catalog has fewer items than dimensions.
PAD_SCALE = 0.01
#: AdamW's step size for the tower (two epochs must get there).
TOWER_LR = 0.01
#: L2 weight on the warm items' residuals: small, so that they explain what text cannot without
#: W leaning on them.
RESIDUAL_L2 = 1e-4


def tau_bucket(n: torch.Tensor) -> torch.Tensor:
    """projection.tau_bucket for a tensor of history lengths."""
    return torch.searchsorted(torch.from_numpy(TAU_EDGES), n, right=True) - 1


@dataclass
class TowerWeights:
    """A trained item tower; arrays are float32 numpy."""

    weight: np.ndarray        # (d_in, d_out)
    bias_weight: np.ndarray   # (d_in,)
    bias_const: float
    residual: np.ndarray      # (n_items, d_out), zero for items without clicks
    item_bias: np.ndarray     # (n_items,), zero for items without clicks
    tau: np.ndarray           # (N_BUCKETS,), the temperature by history length


class ItemTower(nn.Module):
    def __init__(self, text: torch.Tensor, d_out: int, init: torch.Tensor) -> None:
        super().__init__()
        n, d_in = text.shape
        self.register_buffer("text", text)
        self.weight = nn.Parameter(init.clone())
        self.bias_weight = nn.Parameter(torch.zeros(d_in))
        self.bias_const = nn.Parameter(torch.zeros(()))
        self.residual = nn.Parameter(torch.zeros(n, d_out))
        self.item_bias = nn.Parameter(torch.zeros(n))
        self.log_tau = nn.Parameter(torch.full((len(TAU_EDGES),), math.log(TAU_START)))

    def forward(self, rows: torch.Tensor, keep: torch.Tensor | None, dropout: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors (len(rows), d_out) and biases (len(rows),); `keep` masks the residuals.

        `rows` sorted and unique (`torch.unique`): when they are every row, the tables are used
        as they are (a gather by the identity copies 10^6-10^7 floats a step for nothing)."""
        every = len(rows) == len(self.text)
        e = self.text if every else self.text[rows]
        if dropout > 0.0:
            e = nn.functional.dropout(e, dropout)
        r, c = (self.residual, self.item_bias) if every else (self.residual[rows], self.item_bias[rows])
        if keep is not None:
            r, c = r * keep[:, None], c * keep
        v = nn.functional.normalize(e @ self.weight + r, dim=1)
        b = e @ self.bias_weight + self.bias_const + c
        return v, b


def pca_init(text: np.ndarray, d_out: int, seed: int) -> torch.Tensor:
    """Start W at the top principal directions of the catalog's text vectors."""
    x = torch.from_numpy(text - text.mean(0))
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:PCA_SAMPLE]]
    _, _, vt = torch.linalg.svd(sample, full_matrices=False)
    w = vt[:d_out].T.contiguous()
    if w.shape[1] < d_out:  # fewer items than dimensions: pad with small random directions
        extra = torch.randn(w.shape[0], d_out - w.shape[1], generator=torch.Generator().manual_seed(seed))
        w = torch.cat([w, PAD_SCALE * extra], dim=1)
    return w


def _examples(histories: list[np.ndarray], rng: np.random.Generator, max_hist: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example per click: (target, padded history rows, history lengths).

    For click j of a history h: m uniform in [0, min(len(h) - 1, max_hist)], then m of the other
    clicks drawn without replacement (padded with -1). The draws are the ones
    `rng.choice(np.delete(h, j), m, replace=False)` makes (choice draws positions from the
    population's size alone), written straight into the output arrays.
    """
    n_all = sum(len(h) for h in histories)
    targets = np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, np.int64)
    hists = np.full((n_all, max_hist), -1, np.int64)
    lens = np.zeros(n_all, np.int64)
    k = 0
    for h in histories:
        n = len(h)
        top = min(n - 1, max_hist) + 1
        for j in range(n):
            m = int(rng.integers(0, top))
            if m:
                pos = rng.choice(n - 1, size=m, replace=False)
                hists[k, :m] = h[pos + (pos >= j)]  # position in h without j -> position in h
                lens[k] = m
            k += 1
    order = rng.permutation(n_all)
    return targets[order], hists[order], lens[order]


def train_towers(text: np.ndarray, histories: list[np.ndarray], live: np.ndarray, d_out: int,
                 epochs: int, seed: int, batch: int = 512, max_hist: int = 30, max_softmax: int = 16384,
                 residual_keep: float = 0.5, weight_decay: float = 0.0, input_dropout: float = 0.0,
                 progress: bool = False) -> tuple[TowerWeights, list[float]]:
    """Fit the item tower.

    Args:
        text: item text vectors, shape (n_items, d_in), float32.
        histories: per user, the item rows they clicked (each array non-empty).
        live: rows that may be ranked (the softmax runs over them).
    Returns:
        The weights and the mean loss of each epoch.
    The draws (residual dropout, softmax samples) come from torch's generator seeded with `seed`
    inside a fork of it: the caller's torch random state is the same afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(text, histories, live, d_out, epochs, seed, batch, max_hist, max_softmax,
                      residual_keep, weight_decay, input_dropout, progress)


def _train(text: np.ndarray, histories: list[np.ndarray], live: np.ndarray, d_out: int, epochs: int,
           seed: int, batch: int, max_hist: int, max_softmax: int, residual_keep: float,
           weight_decay: float, input_dropout: float, progress: bool) -> tuple[TowerWeights, list[float]]:
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    d_out = min(d_out, text.shape[1])
    model = ItemTower(torch.from_numpy(np.ascontiguousarray(text, np.float32)), d_out,
                      pca_init(text, d_out, seed))
    warm = np.zeros(len(text), bool)
    for h in histories:
        warm[h] = True
    warm_t = torch.from_numpy(warm.astype(np.float32))
    opt = torch.optim.AdamW([
        {"params": [model.weight, model.bias_weight], "weight_decay": weight_decay},
        {"params": [model.bias_const, model.log_tau, model.residual, model.item_bias], "weight_decay": 0.0},
    ], lr=TOWER_LR)
    live_t = torch.from_numpy(np.asarray(live, np.int64))
    losses = []
    hist_users = [np.asarray(h, np.int64) for h in histories if len(h) >= 2]
    for epoch in tqdm(range(epochs), desc="item tower", disable=not progress):
        targets, hists, lens = _examples(hist_users, rng, max_hist)
        total, steps = 0.0, 0
        for s in range(0, len(targets), batch):
            loss = _step(model, opt, torch.from_numpy(targets[s:s + batch]), torch.from_numpy(hists[s:s + batch]),
                         torch.from_numpy(lens[s:s + batch]), live_t, warm_t, residual_keep, max_softmax,
                         input_dropout)
            total, steps = total + loss, steps + 1
        losses.append(total / max(steps, 1))
        log.info("item tower epoch %d: loss %.4f", epoch + 1, losses[-1])
    return _export(model, warm), losses


def _step(model: ItemTower, opt, target, hist, lens, live, warm, keep_p: float, max_softmax: int,
          input_dropout: float = 0.0) -> float:
    mask = hist >= 0
    flat = hist.clamp(min=0).reshape(-1)
    if len(live) > max_softmax:
        neg = live[torch.randint(len(live), (max_softmax,))]
        pool = torch.unique(torch.cat([neg, target]))
    else:
        pool = live
    # one forward pass over every row the step touches: the softmax pool and the histories
    rows = torch.unique(torch.cat([pool, flat]))
    keep = (torch.rand(len(rows)) < keep_p).float() * warm[rows]
    v_rows, b_rows = model(rows, keep, input_dropout)
    if len(pool) == len(rows):  # both sorted and unique, pool within rows: the same rows
        v_pool, b_pool = v_rows, b_rows
    else:
        at_pool = _positions(rows, pool)
        v_pool, b_pool = v_rows[at_pool], b_rows[at_pool]
    hv = v_rows[_positions(rows, flat)].reshape(*hist.shape, -1) * mask[..., None]
    u = nn.functional.normalize(hv.sum(1), dim=1)  # zero history -> zero vector
    tau = model.log_tau.exp()[tau_bucket(lens)]
    logits = tau[:, None] * (u @ v_pool.T) + b_pool
    pos = _positions(pool, target)
    # the user's history is excluded at serving time, so it is left out of the softmax too
    hpos = _positions(pool, flat).reshape(hist.shape)
    mask = mask & (pool[hpos] == hist)
    # written at the (example, pool position) pairs themselves: a dense mask of the logits'
    # shape would be filled, scattered and scanned, forward and backward
    ex = torch.arange(len(pos))[:, None].expand_as(hpos)[mask]
    col = hpos[mask]
    not_target = col != pos[ex]
    logits = logits.index_put((ex[not_target], col[not_target]), torch.tensor(-1e9, dtype=logits.dtype))
    loss = nn.functional.cross_entropy(logits, pos)
    reg = RESIDUAL_L2 * (model.residual.pow(2).sum(1).mean() + model.item_bias.pow(2).mean())
    opt.zero_grad()
    (loss + reg).backward()
    opt.step()
    return float(loss.detach())


def _positions(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Index of each row inside the sorted `pool` (rows absent from pool map to a valid index)."""
    idx = torch.searchsorted(pool, rows).clamp(max=len(pool) - 1)
    return idx


def _export(model: ItemTower, warm: np.ndarray) -> TowerWeights:
    with torch.no_grad():
        residual = model.residual.numpy().copy()
        item_bias = model.item_bias.numpy().copy()
        residual[~warm] = 0.0
        item_bias[~warm] = 0.0
        return TowerWeights(weight=model.weight.numpy().astype(np.float32).copy(),
                            bias_weight=model.bias_weight.numpy().astype(np.float32).copy(),
                            bias_const=float(model.bias_const), residual=residual.astype(np.float32),
                            item_bias=item_bias.astype(np.float32),
                            tau=model.log_tau.exp().numpy().astype(np.float32).copy())
