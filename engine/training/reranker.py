"""Training the reranker with torch: the network as a module, its listwise loss, and `fit`.

Serving never imports this module (it scores with numpy, models/rerank.py, which also draws the
first weights); it loads when a reranker is trained. It imports the model's layout from
models/rerank.py, never the other way.

(Over 450 lines, as one module: the blend's training, the per-bucket early stopping, the experts
and the MLP residual's gates are four stages of one `fit` that share the network, its validation
split and its recall measures.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..models.rerank import (
    FEATURES, LINEAR_ONLY, N_BUCKETS, ONE_HOT, N_FEATURES, N_INPUTS, SIGNALS, bucket_of, column, forward,
    MLP_OUT_SCALE, initial_linear_weights, signal_score,
)

if TYPE_CHECKING:
    from ..models.rerank import Reranker

#: Early stopping of `fit`: share of users held out, epochs without progress, and the fewest
#: examples worth holding any out.
VALID_SHARE = 0.2
PATIENCE = 3
#: Adam's step size in `fit` (0.02 fit the held-out users' noise on amazon-office validation).
FIT_LR = 3e-3
MIN_VALID = 200
#: Recall gain that counts as progress for early stopping (smaller is noise between epochs).
MIN_GAIN = 1e-4
#: Input std given to features the MLP must not see: it divides them to nothing (see LINEAR_ONLY).
SILENCED_STD = 1e6
#: Input std below which a feature counts as constant in the training logs.
CONSTANT_STD = 1e-4
#: Recall cut-off of the validation that early stopping and the per-bucket choices follow.
RECALL_K = 20
#: The trained network ranks a bucket only when its held-out recall there beats the best single
#: signal's by GATE_SE standard errors of the paired per-list difference, over GATE_MIN lists or
#: more; otherwise that signal ranks the bucket alone (Reranker.expert). Trusted on less, the
#: profile bucket's network beat popularity on 78 held-out users and lost to it by 13% on the
#: evaluation's (movielens, demographic profiles): its block was picked on those same lists.
GATE_SE = 2.0
GATE_MIN = 50
#: A bucket with fewer held-out lists than this (the profile bucket has one list a user) is judged
#: on all its lists instead: CV_FOLDS-fold cross-validation of its block (`cross_validated`).
GATE_CV_BELOW = 200
CV_FOLDS = 5
#: Weigh each training list's loss by its share of its user's recall (`list_weights`).
WEIGHT_LISTS = True


class RerankNet(nn.Module):
    """`linear(x) + gate[bucket] * mlp((x - mean) / std)`: the torch twin of `rerank.forward`."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(N_INPUTS, 1)
        self.mlp = nn.Sequential(nn.Linear(N_INPUTS, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            for b in range(N_BUCKETS):
                for name, weight in initial_linear_weights(b).items():
                    self.linear.weight[0, column(name, b)] = weight
            self.mlp[-1].weight.mul_(MLP_OUT_SCALE)
            self.mlp[-1].bias.zero_()
        self.register_buffer("mean", torch.zeros(N_INPUTS))
        self.register_buffer("std", torch.ones(N_INPUTS))
        self.register_buffer("mlp_gate", torch.ones(N_BUCKETS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        gate = x[..., ONE_HOT] @ self.mlp_gate
        return self.linear(x).squeeze(-1) + gate * self.mlp(z).squeeze(-1)


def to_numpy(net: RerankNet) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def to_net(weights: dict[str, np.ndarray], hidden: int) -> RerankNet:
    """A module holding `weights` (named as RerankNet's state_dict)."""
    with torch.random.fork_rng(devices=[]):
        net = RerankNet(hidden)  # its random start is overwritten at once
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})
    return net


def listwise_loss(net: RerankNet, batch: list[tuple[np.ndarray, np.ndarray]],
                  weights: np.ndarray | None = None) -> torch.Tensor:
    """Mean over examples of the softmax cross-entropy of each positive among its candidates,
    each example weighing `weights[j]` (default 1; see `list_weights`).

    One forward pass over the padded batch (examples have different candidate counts).
    """
    return padded_listwise(net, batch, N_INPUTS, weights)


def list_weights(examples: list[tuple[np.ndarray, np.ndarray]], totals: np.ndarray | None) -> np.ndarray | None:
    """What each list is worth in the metric served, relative to the others (mean 1): a list
    holds `len(labels)` of its user's `totals[j]` targets, so ranking them all first earns
    len(labels) / min(RECALL_K, totals[j]) of that user's recall. Without the weights a user whose
    one retrieved target stands for twenty weighs like one whose every target was retrieved, and
    the signal that retrieved the one (a profile, say) is overrated."""
    if totals is None or not WEIGHT_LISTS:
        return None
    w = np.array([len(labels) for _, labels in examples], np.float64) / np.minimum(RECALL_K, totals)
    return w / w.mean() if len(w) else w


def padded_listwise(score, batch: list[tuple[np.ndarray, np.ndarray]], width_in: int,
                    weights: np.ndarray | None = None) -> torch.Tensor:
    """`listwise_loss` for any `score` (a module or function of a (b, m, width_in) tensor that
    gives (b, m) logits), over the batch padded to its longest list."""
    width = max(len(f) for f, _ in batch)
    feats = np.zeros((len(batch), width, width_in), np.float32)
    valid = np.zeros((len(batch), width), bool)
    target = np.zeros((len(batch), width), np.float32)
    for b, (f, labels) in enumerate(batch):
        feats[b, : len(f)] = f
        valid[b, : len(f)] = True
        target[b, labels] = 1.0 / len(labels)
    logits = score(torch.from_numpy(feats)).masked_fill(~torch.from_numpy(valid), -1e9)
    logp = torch.log_softmax(logits, dim=1)
    per_list = -(logp * torch.from_numpy(target)).sum(1)
    if weights is None:
        return per_list.mean()
    return (per_list * torch.from_numpy(np.asarray(weights, np.float32))).mean()



def _split(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) example positions; whole groups go to one side."""
    if n < MIN_VALID:
        return np.arange(n), np.zeros(0, np.int64)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(groups)
    held = rng.permutation(uniq)[: max(1, int(round(VALID_SHARE * len(uniq))))]
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def recalls(scores: list[np.ndarray], examples: list[tuple[np.ndarray, np.ndarray]],
            k: int = RECALL_K, totals: np.ndarray | None = None) -> np.ndarray:
    """Per example, the recall@k of its positives under `scores`: hits over min(k, its user's
    number of targets, `totals[j]`), as the evaluation counts them, targets outside the
    candidates included; without `totals`, over the positives among the candidates."""
    out = np.zeros(len(examples))
    for j, (s, (_, labels)) in enumerate(zip(scores, examples)):
        kk = min(k, len(s))
        top = np.argpartition(-s, kk - 1)[:kk] if kk < len(s) else np.arange(len(s))
        out[j] = np.isin(top, labels).sum() / min(k, len(labels) if totals is None else int(totals[j]))
    return out


def model_recalls(weights: dict[str, np.ndarray], examples: list[tuple[np.ndarray, np.ndarray]],
                  totals: np.ndarray | None = None) -> np.ndarray:
    return recalls([forward(weights, f)[0] for f, _ in examples], examples, totals=totals)


def signal_recalls(examples: list[tuple[np.ndarray, np.ndarray]], buckets: np.ndarray,
                   totals: np.ndarray | None = None) -> np.ndarray:
    """Shape (len(SIGNALS), len(examples)): each signal's recall alone on each example."""
    return np.stack([recalls([signal_score(f, j, int(b)) for (f, _), b in zip(examples, buckets)], examples,
                             totals=totals)
                     for j in range(len(SIGNALS))])


def warm_start(net: RerankNet, examples: list[tuple[np.ndarray, np.ndarray]], buckets: np.ndarray,
               totals: np.ndarray | None = None) -> list[int]:
    """Start each bucket's linear block at the single signal that ranks the bucket's training
    examples best, when one beats the initial weights there: training then only has to improve
    on the best signal the blend holds. Returns the signal chosen per bucket (-1: initial)."""
    start = to_numpy(net)
    base = model_recalls(start, examples, totals)
    alone = signal_recalls(examples, buckets, totals)
    chosen = [-1] * N_BUCKETS
    with torch.no_grad():
        for b in range(N_BUCKETS):
            mine = buckets == b
            if not mine.any():
                continue
            best = int(alone[:, mine].mean(1).argmax())
            if alone[best, mine].mean() > base[mine].mean():
                name, tie = SIGNALS[best]
                block = net.linear.weight[0, b * N_FEATURES:(b + 1) * N_FEATURES]
                block.zero_()
                block[FEATURES.index(name)] = 1.0
                block[FEATURES.index(tie)] = 0.1
                chosen[b] = best
    return chosen


def block_of(examples: list[tuple[np.ndarray, np.ndarray]], bucket: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The lists with only `bucket`'s block of inputs (what a linear-only network ranks them by)."""
    return [(f[:, bucket * N_FEATURES:(bucket + 1) * N_FEATURES], labels) for f, labels in examples]


def train_block(start: np.ndarray, lists: list[tuple[np.ndarray, np.ndarray]], epochs: int, batch: int,
                rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """One bucket's linear block trained alone from `start` (shape (N_FEATURES,)) on `lists`
    (block inputs), listwise, as `fit` trains it among the other buckets' lists."""
    w = torch.tensor(np.asarray(start, np.float32), requires_grad=True)
    opt = torch.optim.Adam([w], lr=FIT_LR)
    for _ in range(epochs):
        order = rng.permutation(len(lists))
        for s in range(0, len(order), batch):
            part = order[s:s + batch]
            loss = padded_listwise(lambda x: x @ w, [lists[i] for i in part], N_FEATURES,
                                   None if weights is None else weights[part])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach().numpy()


def cross_validated(start: np.ndarray, lists: list[tuple[np.ndarray, np.ndarray]], epochs: int, batch: int,
                    rng: np.random.Generator, judge: np.ndarray | None = None,
                    totals: np.ndarray | None = None) -> np.ndarray:
    """Per list of `judge` (a mask; default: all), the recall of a block trained as `fit` trains
    it, on the other CV_FOLDS - 1 folds of `lists`: what the bucket's network is worth on lists it
    did not learn or get picked on."""
    judge = np.ones(len(lists), bool) if judge is None else judge
    fold = rng.permutation(len(lists)) % CV_FOLDS
    out = np.zeros(len(lists))
    for k in range(CV_FOLDS):
        test = np.flatnonzero((fold == k) & judge)
        if not len(test):
            continue
        learn = np.flatnonzero(fold != k)
        w = train_block(start, [lists[i] for i in learn], epochs, batch, rng,
                        list_weights([lists[i] for i in learn], None if totals is None else totals[learn]))
        out[test] = recalls([lists[i][0] @ w for i in test], [lists[i] for i in test],
                            totals=None if totals is None else totals[test])
    return out[judge]


def warm_lists(examples: list[tuple[np.ndarray, np.ndarray]], buckets: np.ndarray) -> np.ndarray:
    """Which lists show their candidates with feedback: not `as_cold` ones, where every click count
    is zero, so the popularity input is flat (0 after `expand`) and no signal of feedback ranks."""
    return np.array([b < 0 or bool(f[:, column("clicks", int(b))].any()) for (f, _), b in zip(examples, buckets)])


def choose_experts(weights: dict[str, np.ndarray], examples: list[tuple[np.ndarray, np.ndarray]],
                   buckets: np.ndarray, judged: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                   totals: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Per bucket, the signal that ranks alone (-1: the network), on held-out examples: the
    network only where it beats the best signal clearly (GATE_SE, GATE_MIN); a bucket without
    held-out lists keeps the network. With the report: per bucket, the network's and the best
    signal's recall and the count."""
    net = model_recalls(weights, examples, totals)
    alone = signal_recalls(examples, buckets, totals)
    expert = np.full(N_BUCKETS, -1, np.int64)
    report: dict[str, dict[str, float]] = {}
    for b in range(N_BUCKETS):
        mine = buckets == b
        if not mine.any():
            continue
        means = alone[:, mine].mean(1)
        best = int(means.argmax())
        report[str(b)] = {"examples": int(mine.sum()), "network": round(float(net[mine].mean()), 4),
                          "best_signal": SIGNALS[best][0], "signal": round(float(means[best]), 4)}
        diff = net[mine] - alone[best, mine]
        if judged and b in judged:  # a small bucket: judged by cross-validation on all its lists
            cv_net, cv_alone = judged[b]
            best = int(cv_alone.mean(1).argmax())
            diff = cv_net - cv_alone[best]
            report[str(b)].update({"cv_lists": len(cv_net), "cv_network": round(float(cv_net.mean()), 4),
                                   "cv_signal": round(float(cv_alone[best].mean()), 4),
                                   "best_signal": SIGNALS[best][0]})
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.inf
        if not (len(diff) >= GATE_MIN and diff.mean() > GATE_SE * se):
            expert[b] = best
    return expert, report


def small_buckets(examples: list[tuple[np.ndarray, np.ndarray]], buckets: np.ndarray, valid: np.ndarray,
                  keeper: "BucketKeeper", start: np.ndarray, batch: int,
                  rng: np.random.Generator, totals: np.ndarray | None = None
                  ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each bucket with fewer than GATE_CV_BELOW held-out lists (and a linear-only network):
    (cross-validated network recall, each signal's recall) over all of the bucket's lists that
    show feedback (`warm_lists`); the blocks are trained on all of them, as `fit` trains."""
    if not keeper.active:
        return {}
    out = {}
    held_counts = np.bincount(buckets[valid][buckets[valid] >= 0], minlength=N_BUCKETS)
    for b in range(N_BUCKETS):
        if not 0 < held_counts[b] < GATE_CV_BELOW:
            continue
        rows = np.flatnonzero(buckets == b)
        lists = block_of([examples[i] for i in rows], b)
        share = max(2, int(round(batch * len(rows) / len(examples))))  # its lists per step in `fit`
        warm = warm_lists([examples[i] for i in rows], buckets[rows])
        mine = [examples[i] for i in rows[warm]]
        mine_totals = None if totals is None else totals[rows]
        out[b] = (cross_validated(start[b * N_FEATURES:(b + 1) * N_FEATURES], lists, keeper.epoch.get(b, 0),
                                  share, rng, judge=warm, totals=mine_totals),
                  signal_recalls(mine, np.full(len(mine), b), None if totals is None else mine_totals[warm]))
    return out


def fit_residual(net: RerankNet, examples: list[tuple[np.ndarray, np.ndarray]], train: np.ndarray,
                 valid: np.ndarray, groups: np.ndarray | None, buckets: np.ndarray, weights_all: np.ndarray,
                 allf: np.ndarray, totals: np.ndarray | None, rng: np.random.Generator, epochs: int,
                 batch: int) -> dict[str, dict[str, float]]:
    """The second stage: the MLP over every feature as a residual on the fitted linear blend,
    and its gate per bucket.

    The linear part is frozen; the MLP starts afresh (seeded, its output near 0: it starts where
    the blend ends) and sees every feature that varies in the logs. The held-out users are split
    in two: one half stops the training (PATIENCE; the start counts), the other judges it: the
    gate of a bucket is 1 only where, on that half's lists of the bucket, the MLP adds recall by
    GATE_SE standard errors of the paired per-list difference over GATE_MIN lists that show
    feedback or more, without lowering the bucket's lists of brand-new candidates on average, and
    0 elsewhere (and everywhere without held-out lists): an MLP trusted on lists it was stopped on
    looked better there than it was. Returns, per bucket judged, the lists and both recalls.
    """
    with torch.no_grad():
        net.mlp_gate.zero_()
    if not len(valid) or not len(train):
        return {}
    vgroups = valid if groups is None else np.asarray(groups)[valid]
    uniq = np.unique(vgroups)
    stop_half = np.isin(vgroups, rng.permutation(uniq)[: len(uniq) // 2])
    stop, judge = valid[stop_half], valid[~stop_half]
    if not len(stop) or not len(judge):
        return {}
    std = allf.std(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        net.std.copy_(torch.from_numpy(np.where(std < CONSTANT_STD, SILENCED_STD, std).astype(np.float32)))
        torch.manual_seed(int(rng.integers(2**31)))
        for layer in net.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        net.mlp[-1].weight.mul_(MLP_OUT_SCALE)
        net.mlp[-1].bias.zero_()
        net.mlp_gate.fill_(1.0)
    held = [examples[i] for i in stop]
    part = None if totals is None else totals[stop]
    best = float(model_recalls(to_numpy(net), held, part).mean())
    best_state = {k: t.clone() for k, t in net.mlp.state_dict().items()}
    opt = torch.optim.Adam(net.mlp.parameters(), lr=FIT_LR)
    stale = 0
    for _ in range(epochs):
        order = train[rng.permutation(len(train))]
        for s in range(0, len(order), batch):
            rows = order[s:s + batch]
            loss = listwise_loss(net, [examples[i] for i in rows], weights_all[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()  # the MLP's weights only: the blend stays as the first stage left it
        now = float(model_recalls(to_numpy(net), held, part).mean())
        if now > best + MIN_GAIN:
            best, stale = now, 0
            best_state = {k: t.clone() for k, t in net.mlp.state_dict().items()}
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    net.mlp.load_state_dict(best_state)
    return _judge_gates(net, [examples[i] for i in judge], buckets[judge], None if totals is None else totals[judge])


def _judge_gates(net: RerankNet, lists: list[tuple[np.ndarray, np.ndarray]], buckets: np.ndarray,
                 totals: np.ndarray | None) -> dict[str, dict[str, float]]:
    """Set `net.mlp_gate` from what the MLP does on `lists` (see `fit_residual`): a bucket's gate
    is 1 when the MLP adds recall on its lists that show feedback (GATE_SE, GATE_MIN) and does
    not lower, on average, its lists of brand-new candidates (`warm_lists`: where the cold items
    of a catalog are ranked; one gate serves both)."""
    weights = to_numpy(net)
    with_mlp = model_recalls(weights, lists, totals)
    without = model_recalls({**weights, "mlp_gate": np.zeros(N_BUCKETS, np.float32)}, lists, totals)
    warm = warm_lists(lists, buckets)
    gate = np.zeros(N_BUCKETS, np.float32)
    report = {}
    for b in range(N_BUCKETS):
        mine = buckets == b
        if not mine.any():
            continue
        diff, cold = (with_mlp - without)[mine & warm], (with_mlp - without)[mine & ~warm]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.inf
        gain = len(diff) >= GATE_MIN and diff.mean() > GATE_SE * se
        gate[b] = float(gain and (not len(cold) or cold.mean() >= 0.0))
        report[str(b)] = {"lists": int(len(diff)), "with_mlp": round(float(with_mlp[mine & warm].mean()), 4)
                          if len(diff) else None, "without": round(float(without[mine & warm].mean()), 4)
                          if len(diff) else None, "cold_lists": int(len(cold)),
                          "cold_change": round(float(cold.mean()), 4) if len(cold) else None, "gate": int(gate[b])}
    with torch.no_grad():
        net.mlp_gate.copy_(torch.from_numpy(gate))
    return report


class BucketKeeper:
    """Early stopping per bucket: each bucket's linear block as it stood at the epoch (the start
    included) where that bucket's held-out lists ranked best. Exact while every feature enters
    linearly only (LINEAR_ONLY: the MLP then adds a constant per bucket, which ranks nothing), as
    each bucket's scores then depend on its own block alone; otherwise it keeps nothing and the
    network's global best epoch stands."""

    def __init__(self, buckets: np.ndarray) -> None:
        self.buckets = buckets
        self.active = set(LINEAR_ONLY) == set(FEATURES)
        self.best: dict[int, tuple[float, torch.Tensor]] = {}
        #: per bucket, the epoch its kept block is from (0: the start)
        self.epoch: dict[int, int] = {}
        self._offers = 0

    def offer(self, net: RerankNet, recall: np.ndarray) -> None:
        self._offers += 1
        if not self.active:
            return
        for b in np.unique(self.buckets):
            mine = float(recall[self.buckets == b].mean())
            if int(b) not in self.best or mine > self.best[int(b)][0] + MIN_GAIN:
                block = net.linear.weight[0, b * N_FEATURES:(b + 1) * N_FEATURES].detach().clone()
                self.best[int(b)] = (mine, block)
                self.epoch[int(b)] = self._offers - 1

    def restore(self, net: RerankNet) -> None:
        with torch.no_grad():
            for b, (_, block) in self.best.items():
                net.linear.weight[0, b * N_FEATURES:(b + 1) * N_FEATURES] = block


def fit(rr: "Reranker", examples: list[tuple[np.ndarray, np.ndarray]], epochs: int, batch: int = 64,
        progress: bool = False, groups: np.ndarray | None = None,
        totals: np.ndarray | None = None, residual: bool = True) -> list[float]:
    """Offline training of `rr` on (features, positive indices) examples; the epoch losses.

    Each bucket starts at the best single signal on its training examples when that beats the
    initial weights (`warm_start`). `epochs` is a ceiling: the examples of a seeded VALID_SHARE
    of the `groups` (users; each example its own group when None) are held out, and training
    stops once their recall@20 has not improved for PATIENCE epochs, keeping the best weights
    (the start counts: training never keeps weights worse than it began with; the listwise loss
    kept falling on held-out users while their recall fell), and each bucket keeps its block from
    its own best epoch (`BucketKeeper`). Then, per bucket, a signal that
    still ranks the held-out examples better than the network alone takes the bucket
    (`choose_experts`). Below MIN_VALID examples every epoch runs on everything.

    `totals` (per example, how many targets its user has, the ones outside its candidates
    included) makes every recall above the evaluation's and weighs each list's loss by what it
    is worth in it (`list_weights`); without it a list's targets are its positives.
    `residual`: train the MLP residual and its gates after the blend (`fit_residual`); else the
    blend alone ranks (every gate 0).
    """
    from tqdm.auto import tqdm

    net = to_net(rr.weights, rr.hidden)
    train, valid = _split(len(examples), groups, rr.rng)
    buckets = np.array([bucket_of(f) for f, _ in examples])
    totals = None if totals is None else np.asarray(totals, np.int64)

    def part(rows: np.ndarray) -> np.ndarray | None:
        return None if totals is None else totals[rows]

    rr.warm_start = warm_start(net, [examples[i] for i in train], buckets[train], part(train))
    weights_all = np.ones(len(examples))
    if totals is not None and len(train):
        weights_all[train] = list_weights([examples[i] for i in train], totals[train])
    start_weights = net.linear.weight[0].detach().numpy().copy()
    allf = np.concatenate([examples[i][0] for i in train])
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(allf.mean(0)))
        std = allf.std(0)
        # a feature constant in the logs carries nothing the MLP could learn: silence it there
        std = np.where(std < CONSTANT_STD, SILENCED_STD, std)
        # the content scores enter linearly only (see LINEAR_ONLY)
        std[[column(name, b) for name in LINEAR_ONLY for b in range(N_BUCKETS)]] = SILENCED_STD
        net.std.copy_(torch.from_numpy(std.astype(np.float32)))
    held = [examples[i] for i in valid]
    keeper = BucketKeeper(buckets[valid])
    opt = torch.optim.Adam(net.parameters(), lr=FIT_LR)
    losses: list[float] = []
    best, best_state, stale = np.inf, None, 0
    if held:
        recall = model_recalls(to_numpy(net), held, part(valid))
        keeper.offer(net, recall)
        best = -float(recall.mean())
        best_state = {k: t.clone() for k, t in net.state_dict().items()}
    for _ in tqdm(range(epochs), desc="reranker", disable=not progress):
        order = train[rr.rng.permutation(len(train))]
        total = 0.0
        for s in range(0, len(order), batch):
            rows = order[s:s + batch]
            loss = listwise_loss(net, [examples[i] for i in rows], None if totals is None else weights_all[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(order[s:s + batch])
        losses.append(total / len(train))
        if held:
            recall = model_recalls(to_numpy(net), held, part(valid))
            keeper.offer(net, recall)
            v = -float(recall.mean())
            if v < best - MIN_GAIN:
                best, stale = v, 0
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
        keeper.restore(net)
    if residual:
        rr.residual_report = fit_residual(net, examples, train, valid, groups, buckets, weights_all, allf,
                                          totals, rr.rng, epochs, batch)
    else:  # the ablation: the linear blend alone
        rr.residual_report = {}
        with torch.no_grad():
            net.mlp_gate.zero_()
    weights = to_numpy(net)
    judged = small_buckets(examples, buckets, valid, keeper, start_weights, batch, rr.rng, totals) if held else {}
    for b in judged:  # a bucket judged by cross-validating its linear block: the blend alone
        weights["mlp_gate"][b] = 0.0
        rr.residual_report.get(str(b), {})["gate"] = 0
    # the signals are judged where they can rank: on the held-out lists that show feedback
    warm = warm_lists(held, buckets[valid]) if held else np.zeros(0, bool)
    held_totals = part(valid)
    expert, rr.gate_report = (choose_experts(weights, [h for h, w in zip(held, warm) if w], buckets[valid][warm],
                                             judged, None if held_totals is None else held_totals[warm])
                              if warm.any()
                              else (np.full(N_BUCKETS, -1, np.int64), {}))
    rr.install(weights, valid_recall=None if best == np.inf else -best, expert=expert)
    rr.remember(examples[-rr.buffer.maxlen:])
    return losses
