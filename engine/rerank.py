"""The reranker: a small MLP over per-candidate features, trained listwise, updated online.

Raw features of (user, candidate item), in order (FEATURES):
  tower    tau(n) * <u, v_i> + b_i, the two-tower score (similarity plus the item's learned prior)
  lexical  cosine between the item's TF-IDF vector and the mean of the user's clicked items' (lexical.py)
  cooc     log(1 + how often other users clicked the item near the user's recent clicks), coclick.py;
           each recent click weighs RECENCY_DECAY ** (clicks since it) (ranking.py)
  itemcf   the same weighted counts normalised item-item-cosine style: sum_i w_i co(i, j) / sqrt(c_i c_j)
  clicks   log(1 + online click count of the item)
  ctr      posterior mean CTR, (clicks + 1) / (impressions + 2)
  recent   max cosine between the item and the user's last clicked items
  profile  cosine between the item's text vector and the user's profile text vector
  fresh    1 when the item has no click yet
Each request standardises every raw feature over its own candidates (`expand`): what matters is how
an item compares with the others on the list, whatever the catalog, the user's history length or
the count scales. The standardised features are placed in the block of the user's history-length
bucket (BUCKET_EDGES), with a one-hot of the bucket: a user with one click trusts co-clicks and
popularity differently from one with twenty, and each bucket learns its own weights.
The network is `linear(x) + mlp(x)`: the linear part starts at the tower score, so an untrained
reranker ranks like the two-tower model and training only has to learn corrections.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import nn

FEATURES = ("tower", "lexical", "cooc", "itemcf", "clicks", "ctr", "recent", "profile", "fresh")
N_FEATURES = len(FEATURES)
#: History lengths (clicks, a profile counting as one) where the weights change: [edge_i, edge_i+1).
BUCKET_EDGES = np.array([0, 1, 2, 3, 5, 8])
N_BUCKETS = len(BUCKET_EDGES)
#: Width of the network's input: every feature once per bucket, then the bucket's one-hot.
N_INPUTS = N_FEATURES * N_BUCKETS + N_BUCKETS
#: Features the MLP does not see: they enter the score through the linear part alone, so the
#: network can re-weight the content and co-click scores but cannot bend the order they give to
#: items that share every other feature (brand-new items among themselves). Trained on the few
#: hundred users a fit holds out, an MLP over them overfit (validation recall fell on both
#: datasets); the MLP models how popularity, CTR and freshness combine.
LINEAR_ONLY: tuple[str, ...] = FEATURES


def history_bucket(n: int) -> int:
    """The bucket of a user whose history weighs `n` clicks."""
    return int(np.searchsorted(BUCKET_EDGES, n, side="right") - 1)


def column(name: str, bucket: int) -> int:
    """Input column of feature `name` in the block of `bucket`."""
    return bucket * N_FEATURES + FEATURES.index(name)


def expand(raw: np.ndarray, n: int) -> np.ndarray:
    """Raw features, shape (m, N_FEATURES), of one request's m candidates -> network inputs, shape
    (m, N_INPUTS) float32: each feature standardised over the candidates (0 where it is constant)
    in the block of the user's bucket, then the bucket's one-hot."""
    raw = np.asarray(raw, np.float32)
    out = np.zeros((len(raw), N_INPUTS), np.float32)
    b = history_bucket(n)
    if len(raw):
        std = raw.std(axis=0)
        z = (raw - raw.mean(axis=0)) / np.where(std > 1e-6, std, 1.0)
        out[:, b * N_FEATURES:(b + 1) * N_FEATURES] = np.where(std > 1e-6, z, 0.0)
        out[:, N_FEATURES * N_BUCKETS + b] = 1.0
    return out


_BLAS: object | None = None


def _one_blas_thread():
    """Limit numpy's BLAS to the calling thread for one small step: on a busy host, a BLAS call
    split over every core waits for all of them (a 12 ms step took 80 ms under load)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


#: The online step's gradient norm is clipped here: one odd click must not move the network far.
ONLINE_CLIP = 1.0


class RerankNet(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(N_INPUTS, 1)
        self.mlp = nn.Sequential(nn.Linear(N_INPUTS, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            for b in range(N_BUCKETS):
                self.linear.weight[0, column("tower", b)] = 1.0
                # popularity is what is known of a user without history; training tunes it
                self.linear.weight[0, column("clicks", b)] = 1.0 if b == 0 else 0.5
                # a profile is the only signal of a user without clicks; logs without profiles
                # never move this weight
                self.linear.weight[0, column("profile", b)] = 0.5
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.zero_()
        self.register_buffer("mean", torch.zeros(N_INPUTS))
        self.register_buffer("std", torch.ones(N_INPUTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        return self.linear(x).squeeze(-1) + self.mlp(z).squeeze(-1)


def listwise_loss(net: RerankNet, batch: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Mean over examples of the softmax cross-entropy of each positive among its candidates.

    One forward pass over the padded batch (examples have different candidate counts).
    """
    sizes = [len(f) for f, _ in batch]
    width = max(sizes)
    feats = np.zeros((len(batch), width, N_INPUTS), np.float32)
    valid = np.zeros((len(batch), width), bool)
    target = np.zeros((len(batch), width), np.float32)
    for b, (f, labels) in enumerate(batch):
        feats[b, : len(f)] = f
        valid[b, : len(f)] = True
        target[b, labels] = 1.0 / len(labels)
    logits = net(torch.from_numpy(feats)).masked_fill(~torch.from_numpy(valid), -1e9)
    logp = torch.log_softmax(logits, dim=1)
    return -(logp * torch.from_numpy(target)).sum(1).mean()


def listwise_grads(p: dict[str, np.ndarray], batch: list[tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """`listwise_loss` and its gradients for the numpy weights `p` (RerankNet's state_dict names).

    The candidates of all examples are stacked (no padding); softmaxes run per example segment.
    """
    x = np.concatenate([f for f, _ in batch]).astype(np.float32)
    sizes = np.array([len(f) for f, _ in batch])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    target = np.zeros(len(x), np.float32)
    for s0, (_, labels) in zip(starts, batch):
        target[s0 + labels] = 1.0 / len(labels)
    seg = np.repeat(np.arange(len(batch)), sizes)
    w0, b0 = p["mlp.0.weight"], p["mlp.0.bias"]
    w2, b2 = p["mlp.2.weight"], p["mlp.2.bias"]
    w4 = p["mlp.4.weight"][0]
    z = (x - p["mean"]) / p["std"]
    a1 = z @ w0.T + b0
    h1 = np.maximum(a1, 0.0)
    a2 = h1 @ w2.T + b2
    h2 = np.maximum(a2, 0.0)
    s = x @ p["linear.weight"][0] + p["linear.bias"][0] + h2 @ w4 + p["mlp.4.bias"][0]
    shifted = s - np.maximum.reduceat(s, starts)[seg]
    e = np.exp(shifted)
    total = np.add.reduceat(e, starts)
    logp = shifted - np.log(total)[seg]
    loss = float(-(target * logp).sum() / len(batch))
    ds = (e / total[seg] - target) / len(batch)
    da2 = ds[:, None] * w4 * (a2 > 0)
    da1 = (da2 @ w2) * (a1 > 0)
    grads = {"linear.weight": (x.T @ ds)[None], "linear.bias": np.array([ds.sum()]),
             "mlp.4.weight": (h2.T @ ds)[None], "mlp.4.bias": np.array([ds.sum()]),
             "mlp.2.weight": da2.T @ h1, "mlp.2.bias": da2.sum(0),
             "mlp.0.weight": da1.T @ z, "mlp.0.bias": da1.sum(0)}
    return loss, {k: g.astype(np.float32) for k, g in grads.items()}


#: Early stopping of `Reranker.fit`: share of users held out, epochs without progress, and the
#: fewest examples worth holding any out.
VALID_SHARE = 0.2
PATIENCE = 3
#: Adam's step size in `fit` (0.02 fit the held-out users' noise on amazon-office validation).
FIT_LR = 3e-3
MIN_VALID = 200


def _split(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) example positions; whole groups go to one side."""
    if n < MIN_VALID:
        return np.arange(n), np.zeros(0, np.int64)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(groups)
    held = rng.permutation(uniq)[: max(1, int(round(VALID_SHARE * len(uniq))))]
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class Reranker:
    """Holds the network, its optimiser for online steps and the replay buffer."""

    def __init__(self, hidden: int, lr: float, replay_size: int, replay_batch: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = RerankNet(hidden)
        self.lr, self.replay_batch = lr, replay_batch
        self.buffer: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max(replay_size, 1))
        self._rng = np.random.default_rng(seed)
        self.trained = False
        self.valid_recall: float | None = None
        self.set_aside = False  # a stored reranker of another feature set was not loaded
        self._torch_stale = False
        self._sync()

    def _sync(self) -> None:
        """Copy the weights into numpy for allocation-light scoring on the hot path."""
        sd = {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}
        self._np = sd

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Scores of candidates, shape (n,), from inputs shape (n, N_INPUTS) float32 (see `expand`)."""
        p = self._np
        lin = feats @ p["linear.weight"][0] + p["linear.bias"][0]
        z = (feats - p["mean"]) / p["std"]
        h = np.maximum(z @ p["mlp.0.weight"].T + p["mlp.0.bias"], 0.0)
        h = np.maximum(h @ p["mlp.2.weight"].T + p["mlp.2.bias"], 0.0)
        return (lin + h @ p["mlp.4.weight"][0] + p["mlp.4.bias"][0]).astype(np.float32)

    def fit(self, examples: list[tuple[np.ndarray, np.ndarray]], epochs: int, batch: int = 64,
            progress: bool = False, groups: np.ndarray | None = None) -> list[float]:
        """Offline training on (features, positive indices) examples; returns the epoch losses.

        `epochs` is a ceiling: the examples of a seeded VALID_SHARE of the `groups` (users; each
        example its own group when None) are held out, and training stops once their recall@20
        has not improved for PATIENCE epochs, keeping the best weights (the listwise loss kept
        falling on held-out users while their recall fell). Below MIN_VALID examples
        every epoch runs on everything.
        """
        from tqdm.auto import tqdm

        if not examples:
            return []
        self._load_np_into_net()
        train, valid = _split(len(examples), groups, self._rng)
        allf = np.concatenate([examples[i][0] for i in train])
        with torch.no_grad():
            self.net.mean.copy_(torch.from_numpy(allf.mean(0)))
            std = allf.std(0)
            # a feature constant in the logs carries nothing the MLP could learn: silence it there
            std = np.where(std < 1e-4, 1e6, std)
            # the content scores enter linearly only (see LINEAR_ONLY)
            std[[column(name, b) for name in LINEAR_ONLY for b in range(N_BUCKETS)]] = 1e6
            self.net.std.copy_(torch.from_numpy(std.astype(np.float32)))
        opt = torch.optim.Adam(self.net.parameters(), lr=FIT_LR)
        losses: list[float] = []
        best, best_state, stale = np.inf, None, 0
        for _ in tqdm(range(epochs), desc="reranker", disable=not progress):
            order = train[self._rng.permutation(len(train))]
            total = 0.0
            for s in range(0, len(order), batch):
                loss = listwise_loss(self.net, [examples[i] for i in order[s:s + batch]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(order[s:s + batch])
            losses.append(total / len(train))
            if len(valid):
                v = -self._valid_recall([examples[i] for i in valid])
                if v < best - 1e-4:
                    best, stale = v, 0
                    best_state = {k: t.clone() for k, t in self.net.state_dict().items()}
                else:
                    stale += 1
                    if stale >= PATIENCE:
                        break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.trained = True
        self.valid_recall = None if best == np.inf else -best
        self._sync()
        self.buffer.extend(examples[-self.buffer.maxlen:])
        return losses

    def _valid_recall(self, examples: list[tuple[np.ndarray, np.ndarray]], k: int = 20) -> float:
        """Mean recall@k of the positives among each example's candidates: the quantity that the
        evaluation reports, so early stopping follows it rather than the loss."""
        self._sync()
        out = []
        for feats, labels in examples:
            top = np.argsort(-self.score(feats), kind="stable")[:k]
            out.append(np.isin(top, labels).sum() / min(k, len(labels)))
        return float(np.mean(out))

    def partial_fit(self, feats: np.ndarray, labels: np.ndarray) -> float:
        """One online step: remember the example, then SGD on a small batch from the buffer.

        The step runs in numpy with hand-written gradients of `listwise_loss` (tests check them
        against autograd): for a network this small, torch's per-call overhead would cost more than
        the arithmetic, and this runs inside `record()`.
        """
        self.buffer.append((feats.astype(np.float32), labels.astype(np.int64)))
        n = min(self.replay_batch, len(self.buffer))
        picks = self._rng.choice(len(self.buffer) - 1, size=n - 1, replace=False) if n > 1 else []
        batch = [self.buffer[-1]] + [self.buffer[int(i)] for i in picks]
        with _one_blas_thread():
            loss, grads = listwise_grads(self._np, batch)
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        step = self.lr * min(1.0, ONLINE_CLIP / max(norm, 1e-12))
        for name, g in grads.items():
            self._np[name] -= step * g
        self._torch_stale = True
        return loss

    def _load_np_into_net(self) -> None:
        if self._torch_stale:
            self.net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self._np.items()})
            self._torch_stale = False

    # ---- persistence --------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        out = {f"rerank.{k}": v.astype(np.float32) for k, v in self._np.items()}
        if self.buffer:
            out["replay.features"] = np.concatenate([f for f, _ in self.buffer]).astype(np.float32)
            out["replay.sizes"] = np.array([len(f) for f, _ in self.buffer], np.int64)
            out["replay.labels"] = np.concatenate([lab for _, lab in self.buffer]).astype(np.int64)
            out["replay.label_sizes"] = np.array([len(lab) for _, lab in self.buffer], np.int64)
        out["rerank.trained"] = np.array([1 if self.trained else 0], np.int64)
        return out

    def load(self, tensors: dict[str, np.ndarray]) -> None:
        """Load saved weights. A reranker saved with another feature set (an older Kindling) is set
        aside with a warning: the engine ranks with the untrained reranker until the next fit."""
        saved = tensors.get("rerank.linear.weight")
        if saved is not None and saved.shape[-1] != N_INPUTS:
            import warnings

            warnings.warn(f"the stored reranker was trained on {saved.shape[-1]} inputs and this version "
                          f"uses {N_INPUTS} ({', '.join(FEATURES)} by {N_BUCKETS} history buckets); it is "
                          "set aside until the next fit",
                          stacklevel=2)
            self.set_aside = True
            return
        sd = {k[len("rerank."):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
              if k.startswith("rerank.") and k != "rerank.trained"}
        if sd:
            self.net.load_state_dict(sd)
        self._torch_stale = False
        self.trained = bool(tensors.get("rerank.trained", np.zeros(1))[0])
        if "replay.features" in tensors:
            f_ends = np.cumsum(tensors["replay.sizes"])
            l_ends = np.cumsum(tensors["replay.label_sizes"])
            feats = np.split(tensors["replay.features"], f_ends[:-1])
            labels = np.split(tensors["replay.labels"], l_ends[:-1])
            self.buffer.clear()
            self.buffer.extend(zip(feats, labels))
        self._sync()
