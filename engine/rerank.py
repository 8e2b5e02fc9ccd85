"""The reranker: a small MLP over per-candidate features, trained listwise, updated online.

Features of (user, candidate item), in order (FEATURES):
  tower      tau * <u, v_i>, the two-tower similarity (0 for a user with no vector)
  bias       the item tower's popularity bias b_i (0 before training)
  clicks     log(1 + online click count of the item)
  ctr        posterior mean CTR, (clicks + 1) / (impressions + 2)
  user_n     log(1 + the user's click count)
  recent     max cosine between the item and the user's last clicked items
  profile    cosine between the item's text vector and the user's profile text vector
  fresh      1 when the item has no click yet
  has_user   1 when the user has a vector (a profile or a click)
The network is `linear(x) + mlp(x)`: the linear part starts at tower + bias, so an untrained
reranker ranks like the two-tower model and training only has to learn corrections.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import nn

FEATURES = ("tower", "bias", "clicks", "ctr", "user_n", "recent", "profile", "fresh", "has_user")
N_FEATURES = len(FEATURES)


class RerankNet(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(N_FEATURES, 1)
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            self.linear.weight[0, 0] = 1.0  # tower
            self.linear.weight[0, 1] = 1.0  # bias
            # raw text similarity to a profile; logs without profiles never move this weight
            self.linear.weight[0, 6] = 10.0
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.zero_()
        self.register_buffer("mean", torch.zeros(N_FEATURES))
        self.register_buffer("std", torch.ones(N_FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        return self.linear(x).squeeze(-1) + self.mlp(z).squeeze(-1)


def listwise_loss(net: RerankNet, batch: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Mean over examples of the softmax cross-entropy of each positive among its candidates.

    One forward pass over the padded batch (examples have different candidate counts).
    """
    sizes = [len(f) for f, _ in batch]
    width = max(sizes)
    feats = np.zeros((len(batch), width, N_FEATURES), np.float32)
    valid = np.zeros((len(batch), width), bool)
    target = np.zeros((len(batch), width), np.float32)
    for b, (f, labels) in enumerate(batch):
        feats[b, : len(f)] = f
        valid[b, : len(f)] = True
        target[b, labels] = 1.0 / len(labels)
    logits = net(torch.from_numpy(feats)).masked_fill(~torch.from_numpy(valid), -1e9)
    logp = torch.log_softmax(logits, dim=1)
    return -(logp * torch.from_numpy(target)).sum(1).mean()


class Reranker:
    """Holds the network, its optimiser for online steps and the replay buffer."""

    def __init__(self, hidden: int, lr: float, replay_size: int, replay_batch: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = RerankNet(hidden)
        self.lr, self.replay_batch = lr, replay_batch
        self.buffer: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max(replay_size, 1))
        self._rng = np.random.default_rng(seed)
        self._opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.trained = False
        self._sync()

    def _sync(self) -> None:
        """Copy the weights into numpy for allocation-light scoring on the hot path."""
        sd = {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}
        self._np = sd

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Scores of candidates, shape (n,), from features shape (n, N_FEATURES) float32."""
        p = self._np
        lin = feats @ p["linear.weight"][0] + p["linear.bias"][0]
        z = (feats - p["mean"]) / p["std"]
        h = np.maximum(z @ p["mlp.0.weight"].T + p["mlp.0.bias"], 0.0)
        h = np.maximum(h @ p["mlp.2.weight"].T + p["mlp.2.bias"], 0.0)
        return (lin + h @ p["mlp.4.weight"][0] + p["mlp.4.bias"][0]).astype(np.float32)

    def fit(self, examples: list[tuple[np.ndarray, np.ndarray]], epochs: int, batch: int = 64,
            progress: bool = False) -> list[float]:
        """Offline training on (features, positive indices) examples; returns the epoch losses."""
        from tqdm.auto import tqdm

        if not examples:
            return []
        allf = np.concatenate([f for f, _ in examples])
        with torch.no_grad():
            self.net.mean.copy_(torch.from_numpy(allf.mean(0)))
            std = allf.std(0)
            # a feature constant in the logs carries nothing the MLP could learn: silence it there
            self.net.std.copy_(torch.from_numpy(np.where(std < 1e-4, 1e6, std).astype(np.float32)))
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3)
        losses = []
        for _ in tqdm(range(epochs), desc="reranker", disable=not progress):
            order = self._rng.permutation(len(examples))
            total = 0.0
            for s in range(0, len(order), batch):
                loss = listwise_loss(self.net, [examples[i] for i in order[s:s + batch]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(order[s:s + batch])
            losses.append(total / len(examples))
        self.trained = True
        self._sync()
        self.buffer.extend(examples[-self.buffer.maxlen:])
        return losses

    def partial_fit(self, feats: np.ndarray, labels: np.ndarray) -> float:
        """One online step: remember the example, then SGD on a small batch from the buffer."""
        self.buffer.append((feats.astype(np.float32), labels.astype(np.int64)))
        n = min(self.replay_batch, len(self.buffer))
        picks = self._rng.choice(len(self.buffer), size=n - 1, replace=False) if n > 1 else []
        batch = [self.buffer[-1]] + [self.buffer[i] for i in picks if i != len(self.buffer) - 1]
        loss = listwise_loss(self.net, batch)
        self._opt.zero_grad()
        loss.backward()
        self._opt.step()
        self._sync()
        return float(loss.detach())

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
        sd = {k[len("rerank."):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
              if k.startswith("rerank.") and k != "rerank.trained"}
        if sd:
            self.net.load_state_dict(sd)
        self.trained = bool(tensors.get("rerank.trained", np.zeros(1))[0])
        if "replay.features" in tensors:
            f_ends = np.cumsum(tensors["replay.sizes"])
            l_ends = np.cumsum(tensors["replay.label_sizes"])
            feats = np.split(tensors["replay.features"], f_ends[:-1])
            labels = np.split(tensors["replay.labels"], l_ends[:-1])
            self.buffer.clear()
            self.buffer.extend(zip(feats, labels))
        self._sync()
