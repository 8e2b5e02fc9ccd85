"""The reranker: a small MLP over per-candidate features, trained listwise, updated online.

Raw features of (user, candidate item), in order (FEATURES):
  tower    tau(n) * <u, v_i> + b_i, the two-tower score (similarity plus the item's learned prior)
  lexical  cosine between the item's TF-IDF vector and the mean of the user's clicked items' (lexical.py)
  cooc     log(1 + how often other users clicked the item near the user's recent clicks), coclick.py;
           each recent click weighs RECENCY_DECAY ** (clicks since it) (serving/features.py)
  itemcf   the same weighted counts normalised item-item-cosine style: sum_i w_i co(i, j) / sqrt(c_i c_j)
  clicks   log(1 + online click count of the item)
  ctr      posterior mean CTR, (clicks + 1) / (impressions + 2)
  recent   max cosine between the item and the user's last clicked items
  profile  cosine between the item's text vector and the user's profile text vector
  fresh    1 when the item has no click yet
Each request standardises every raw feature over its own candidates (`expand`): what matters is how
an item compares with the others on the list, whatever the catalog, the user's history length or
the count scales. The standardised features are placed in the block of the user's history-length
bucket (BUCKET_EDGES, by clicks; a user with a profile and no click has a bucket of their own,
PROFILE_BUCKET), with a one-hot of the bucket: a user with one click trusts co-clicks and
popularity differently from one with twenty, a profile is worth what the logs show it is worth,
and each bucket learns its own weights.
The network is `linear(x) + gate[bucket] * mlp(x)`: the linear part starts at the tower score, so
an untrained reranker ranks like the two-tower model and training only has to learn corrections;
the MLP over the standardised features is a residual that `fit` trains once the linear blend is
fit, and `gate` (one entry per bucket) is 1 only in the buckets where held-out lists it was not
trained or stopped on show it adding recall (training/reranker.py, `fit_residual`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np

FEATURES = ("tower", "lexical", "cooc", "itemcf", "clicks", "ctr", "recent", "profile", "fresh")
N_FEATURES = len(FEATURES)
#: History lengths (clicks) where the weights change: [edge_i, edge_i+1).
BUCKET_EDGES = np.array([0, 1, 2, 3, 5, 8])
#: The bucket of a user who has a profile and no click yet: what a profile text is worth is
#: learned apart from what a click is worth (a sign-up form's "24, technician" says far less).
PROFILE_BUCKET = len(BUCKET_EDGES)
N_BUCKETS = len(BUCKET_EDGES) + 1
#: Width of the network's input: every feature once per bucket, then the bucket's one-hot.
N_INPUTS = N_FEATURES * N_BUCKETS + N_BUCKETS
#: Features the MLP does not see while the linear blend trains: the first stage of `fit` is a
#: per-bucket linear blend (exact per-bucket early stopping needs that); the MLP is the second
#: stage, a residual over every feature, gated per bucket (see the module docstring).
LINEAR_ONLY: tuple[str, ...] = FEATURES
#: Input columns of the bucket one-hot (the last N_BUCKETS).
ONE_HOT = slice(N_FEATURES * N_BUCKETS, N_INPUTS)


def initial_linear_weights(bucket: int) -> dict[str, float]:
    """The linear part's starting weights in a bucket's block (all others start at 0): the tower
    score as it is, so an untrained reranker ranks like the two-tower model; popularity, all that
    is known of a user without history (training tunes it); and a cautious weight on the profile
    similarity, kept where no training user had a profile (no evidence either way): trusted
    blindly, a demographic profile ("24 year old man, technician") halved a held-back movie
    set's recall at reveal 0. A profile-only user starts nearer to popularity than to the tower."""
    if bucket == PROFILE_BUCKET:
        return {"tower": 0.25, "clicks": 1.0, "profile": 0.25}
    return {"tower": 1.0, "clicks": 1.0 if bucket == 0 else 0.5, "profile": 0.1}


def weight_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of the network (rerank_train.RerankNet's state_dict)."""
    return {"linear.weight": (1, N_INPUTS), "linear.bias": (1,),
            "mlp.0.weight": (hidden, N_INPUTS), "mlp.0.bias": (hidden,),
            "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,),
            "mlp.4.weight": (1, hidden), "mlp.4.bias": (1,),
            "mean": (N_INPUTS,), "std": (N_INPUTS,), "mlp_gate": (N_BUCKETS,)}


#: The MLP's output layer starts this much smaller than a layer's default draw, so the network
#: starts (and a residual restarts) near the linear blend.
MLP_OUT_SCALE = 0.01


def torch_uniform_stream(seed: int) -> Callable[[int, float], np.ndarray]:
    """Draws that equal `torch.manual_seed(seed)` then `tensor.uniform_(-bound, bound)` on the CPU,
    in numpy: torch's CPU generator is MT19937 seeded as numpy's legacy `RandomState(seed)` is,
    and a float32 draw takes the low 24 bits of one 32-bit output, scaled in double precision
    (tests/test_rerank_init.py holds the two equal). The weights a store drew once stay the same
    without torch on the serving path."""
    legacy = np.random.RandomState(seed).get_state()
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": legacy[1], "pos": int(legacy[2])}}

    def draw(n: int, bound: float) -> np.ndarray:
        low, high = np.float64(np.float32(-bound)), np.float64(np.float32(bound))
        unit = (bits.random_raw(n) & ((1 << 24) - 1)).astype(np.float64) * 2.0 ** -24
        return (unit * (high - low) + low).astype(np.float32)

    return draw


def initial_weights(hidden: int, seed: int) -> dict[str, np.ndarray]:
    """The untrained network's weights, drawn from `seed`: torch's `nn.Linear` defaults in the order
    `training/reranker.RerankNet` builds its layers (a weight's bound sqrt(1 / fan_in), that is
    kaiming-uniform with a = sqrt(5); its bias's 1 / sqrt(fan_in)), then the linear part set to
    `initial_linear_weights` and the MLP's output layer scaled by MLP_OUT_SCALE, bias 0."""
    draw = torch_uniform_stream(seed)
    out: dict[str, np.ndarray] = {}
    for name, (n_out, n_in) in (("linear", (1, N_INPUTS)), ("mlp.0", (hidden, N_INPUTS)),
                                ("mlp.2", (hidden, hidden)), ("mlp.4", (1, hidden))):
        gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # torch's calculate_gain("leaky_relu", sqrt(5))
        out[name + ".weight"] = draw(n_out * n_in, math.sqrt(3.0) * gain / math.sqrt(n_in)).reshape(n_out, n_in)
        out[name + ".bias"] = draw(n_out, 1 / math.sqrt(n_in))
    out["linear.weight"][:] = 0
    out["linear.bias"][:] = 0
    for b in range(N_BUCKETS):
        for feature, weight in initial_linear_weights(b).items():
            out["linear.weight"][0, column(feature, b)] = weight
    out["mlp.4.weight"] *= np.float32(MLP_OUT_SCALE)
    out["mlp.4.bias"][:] = 0
    out.update(mean=np.zeros(N_INPUTS, np.float32), std=np.ones(N_INPUTS, np.float32),
               mlp_gate=np.ones(N_BUCKETS, np.float32))
    return {k: out[k] for k in weight_shapes(hidden)}


#: The weight that stores from before the gate lack, and its value there (the MLP added in full).
GATE = "mlp_gate"


def with_gate(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`weights` with the MLP's gate; ones (the MLP in every bucket, as before it) when absent."""
    return weights if GATE in weights else {**weights, GATE: np.ones(N_BUCKETS, np.float32)}


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
    """Scores of inputs `x`, shape (n, N_INPUTS) float32, under weights `p`: shape (n,), with the
    intermediates (on, g, z, a1, h1, a2, h2) that `listwise_grads` differentiates through: the
    rows whose MLP gate is not 0 and their gates, where alone the MLP is computed (None: none)."""
    s = x @ p["linear.weight"][0] + p["linear.bias"][0]
    on = np.flatnonzero(x[:, ONE_HOT] @ p[GATE]) if p[GATE].any() else ()
    if not len(on):
        return s, None
    g = x[on, ONE_HOT] @ p[GATE]
    z = (x[on] - p["mean"]) / p["std"]
    a1 = z @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    h1 = np.maximum(a1, 0.0)
    a2 = h1 @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    h2 = np.maximum(a2, 0.0)
    s[on] += g * (h2 @ p["mlp.4.weight"][0] + p["mlp.4.bias"][0])
    return s, (on, g, z, a1, h1, a2, h2)


def history_bucket(n: int, profile: bool = False) -> int:
    """The bucket of a user with `n` clicks (and, when `profile`, a profile: PROFILE_BUCKET
    while n is 0)."""
    if profile and n == 0:
        return PROFILE_BUCKET
    return int(np.searchsorted(BUCKET_EDGES, n, side="right") - 1)


def column(name: str, bucket: int) -> int:
    """Input column of feature `name` in the block of `bucket`."""
    return bucket * N_FEATURES + FEATURES.index(name)


#: A feature whose spread over one request's candidates is below this tells them nothing apart: 0.
FLAT_STD = 1e-6


def expand(raw: np.ndarray, n: int, profile: bool = False) -> np.ndarray:
    """Raw features, shape (m, N_FEATURES), of one request's m candidates -> network inputs, shape
    (m, N_INPUTS) float32: each feature standardised over the candidates (0 where it is constant)
    in the block of the user's bucket (`history_bucket(n, profile)`), then the bucket's one-hot."""
    raw = np.asarray(raw, np.float32)
    out = np.zeros((len(raw), N_INPUTS), np.float32)
    b = history_bucket(n, profile)
    if len(raw):
        std = raw.std(axis=0)
        z = (raw - raw.mean(axis=0)) / np.where(std > FLAT_STD, std, 1.0)
        out[:, b * N_FEATURES:(b + 1) * N_FEATURES] = np.where(std > FLAT_STD, z, 0.0)
        out[:, N_FEATURES * N_BUCKETS + b] = 1.0
    return out


#: Signals a bucket may rank by alone when validation shows the learned blend below it (see
#: Reranker.expert): each single feature the blend holds, ties broken by the second one.
SIGNALS: tuple[tuple[str, str], ...] = (("tower", "clicks"), ("lexical", "clicks"), ("cooc", "clicks"),
                                         ("itemcf", "clicks"), ("clicks", "tower"), ("recent", "clicks"),
                                         ("profile", "clicks"))
#: Weight of a signal's tie-breaking feature.
SIGNAL_TIEBREAK = 1e-3


def bucket_of(feats: np.ndarray) -> int:
    """The bucket whose one-hot inputs `feats` (m, N_INPUTS) carry (`expand`'s layout), or -1."""
    if not len(feats):
        return -1
    hot = feats[0, N_FEATURES * N_BUCKETS:]
    b = int(hot.argmax())
    return b if hot[b] == 1.0 else -1


def signal_score(feats: np.ndarray, signal: int, bucket: int) -> np.ndarray:
    """Scores of candidates by SIGNALS[signal] alone, from inputs in `bucket`'s block."""
    name, tie = SIGNALS[signal]
    return feats[:, column(name, bucket)] + SIGNAL_TIEBREAK * feats[:, column(tie, bucket)]


def pack(feats: np.ndarray) -> tuple[np.ndarray, int]:
    """Inputs (m, N_INPUTS) -> (the bucket's block (m, N_FEATURES), bucket) when they are in
    `expand`'s layout (one bucket's block, its one-hot, zeros elsewhere): 6x less memory for the
    replay buffer, and `unpack` gives them back exactly. Otherwise (inputs, -1), kept whole."""
    feats = np.asarray(feats, np.float32)
    hot = feats[:, N_FEATURES * N_BUCKETS:] if len(feats) else np.zeros((0, N_BUCKETS), np.float32)
    if len(feats) and (hot == hot[0]).all() and (hot[0] == np.eye(N_BUCKETS, dtype=np.float32)[hot[0].argmax()]).all():
        b = int(hot[0].argmax())
        block = feats[:, b * N_FEATURES:(b + 1) * N_FEATURES]
        rest = np.delete(feats[:, : N_FEATURES * N_BUCKETS], np.s_[b * N_FEATURES:(b + 1) * N_FEATURES], axis=1)
        if not rest.any():
            return block.copy(), b
    return feats.copy(), -1


def unpack(feats: np.ndarray, bucket: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A replay entry (see `pack`) -> (inputs (m, N_INPUTS), labels)."""
    if bucket < 0:
        return feats, labels
    out = np.zeros((len(feats), N_INPUTS), np.float32)
    out[:, bucket * N_FEATURES:(bucket + 1) * N_FEATURES] = feats
    out[:, N_FEATURES * N_BUCKETS + bucket] = 1.0
    return out, labels


_BLAS: object | None = None


def _one_blas_thread():
    """Limit numpy's BLAS to the calling thread for one small step: on a busy host, a BLAS call
    split over every core waits for all of them (a 12 ms step took 80 ms under load)."""
    global _BLAS
    if _BLAS is None:
        from ..threads import numpy_blas

        _BLAS = numpy_blas()
    return _BLAS.limit(limits=1)


#: The online step's gradient norm is clipped here: one odd click must not move the network far.
ONLINE_CLIP = 1.0
#: Tensor-name prefix of the fitted weights the online step is pulled back toward (`Reranker.anchor`).
ANCHOR = "rerank_anchor."
#: Tensor name of the count of online steps taken (`Reranker.steps`).
STEPS = "replay.steps"


def listwise_grads(p: dict[str, np.ndarray], batch: list[tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """`rerank_train.listwise_loss` and its gradients for the numpy weights `p` (RerankNet's state_dict names).

    The candidates of all examples are stacked (no padding); softmaxes run per example segment.
    """
    x = np.concatenate([f for f, _ in batch]).astype(np.float32)
    sizes = np.array([len(f) for f, _ in batch])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    target = np.zeros(len(x), np.float32)
    for s0, (_, labels) in zip(starts, batch):
        target[s0 + labels] = 1.0 / len(labels)
    seg = np.repeat(np.arange(len(batch)), sizes)
    s, inner = forward(p, x)
    shifted = s - np.maximum.reduceat(s, starts)[seg]
    e = np.exp(shifted)
    total = np.add.reduceat(e, starts)
    logp = shifted - np.log(total)[seg]
    loss = float(-(target * logp).sum() / len(batch))
    ds = (e / total[seg] - target) / len(batch)
    grads = {"linear.weight": (x.T @ ds)[None], "linear.bias": np.array([ds.sum()])}
    if inner is not None:  # the MLP's share, through each row's gate
        on, g, z, a1, h1, a2, h2 = inner
        dm = ds[on] * g
        da2 = dm[:, None] * p["mlp.4.weight"][0] * (a2 > 0)
        da1 = (da2 @ p["mlp.2.weight"]) * (a1 > 0)
        grads.update({"mlp.4.weight": (h2.T @ dm)[None], "mlp.4.bias": np.array([dm.sum()]),
                      "mlp.2.weight": da2.T @ h1, "mlp.2.bias": da2.sum(0),
                      "mlp.0.weight": da1.T @ z, "mlp.0.bias": da1.sum(0)})
    return loss, {k: g.astype(np.float32) for k, g in grads.items()}


class Reranker:
    """The network's weights (numpy), the replay buffer and the online step.

    The weights are drawn on first use (`weights`, numpy) unless a store's file
    supplies them; scoring and the online step run in numpy, so serving never imports torch.
    """

    def __init__(self, hidden: int, lr: float, replay_size: int, replay_batch: int, seed: int,
                 pull: float = 0.0) -> None:
        self.hidden, self.seed = hidden, seed
        self.lr, self.replay_batch, self.pull = lr, replay_batch, pull
        #: The weights `fit` installed; the online step pulls back toward them (`partial_fit`).
        self.anchor: dict[str, np.ndarray] | None = None
        #: examples for the online step's replay, packed (`pack`): (features, bucket, labels)
        self.buffer: deque[tuple[np.ndarray, int, np.ndarray]] = deque(maxlen=max(replay_size, 1))
        self.rng = np.random.default_rng(seed)  # fit's splits and shuffles
        #: Online steps taken (saved): the replay batch of step i is drawn from a generator seeded
        #: by (seed, i), so a store reopened from its snapshot and log takes the same steps.
        self.steps = 0
        self.trained = False
        self.valid_recall: float | None = None
        #: Per bucket, -1 (the network ranks) or the SIGNALS entry that ranks alone: chosen by
        #: `fit` where validation showed the trained network below that signal in the bucket, on
        #: the lists that show feedback; so it ranks those only, and a request whose candidates
        #: have no feedback at all (the popularity input flat: new items only) keeps the network.
        self.expert = np.full(N_BUCKETS, -1, np.int64)
        #: The item table's length and its newest add time (`ItemTable.added_at`) when the
        #: reranker was fit; -1 until then. An item on a later row, or added later (an upsert),
        #: and still without feedback is new to every learned part.
        self.catalog_rows = -1
        self.catalog_until = -1
        #: What the last fit found (not saved): the signal each bucket started at (-1: the
        #: initial weights) and, per bucket, the held-out recall of the network and best signal.
        self.warm_start: list[int] = []
        self.gate_report: dict[str, dict[str, float]] = {}
        #: Per bucket, what the MLP residual added on the held-out lists that judged its gate.
        self.residual_report: dict[str, dict[str, float]] = {}
        self.set_aside = False  # a stored reranker of another feature set was not loaded
        self._np: dict[str, np.ndarray] | None = None

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The weights by name (see weight_shapes); the seeded initial ones until trained."""
        if self._np is None:
            self._np = initial_weights(self.hidden, self.seed)
        return self._np

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Scores of candidates, shape (n,), from inputs shape (n, N_INPUTS) float32 (see `expand`)."""
        b = bucket_of(feats)
        if b >= 0 and self.expert[b] >= 0 and feats[:, column("clicks", b)].any():
            return signal_score(feats, int(self.expert[b]), b).astype(np.float32)
        return forward(self.weights, feats)[0].astype(np.float32)

    def install(self, weights: dict[str, np.ndarray], valid_recall: float | None,
                expert: np.ndarray | None = None) -> None:
        """Adopt trained weights (and the per-bucket choice of `expert`; default: none)."""
        self._np, self.trained, self.valid_recall = weights, True, valid_recall
        self.anchor = {k: np.array(v, np.float32) for k, v in weights.items()}
        self.expert = np.full(N_BUCKETS, -1, np.int64) if expert is None else np.asarray(expert, np.int64)

    def partial_fit(self, feats: np.ndarray, labels: np.ndarray) -> float:
        """One online step: remember the example, then SGD on a small batch from the buffer, then a
        pull back toward the fitted weights: w <- w - step * g, then w <- w - pull * (w - anchor).
        With the gradient's norm clipped at ONLINE_CLIP, the pull bounds the drift from what `fit`
        learned: ||w - anchor|| <= lr * ONLINE_CLIP / pull, however many clicks come.

        The step runs in numpy with hand-written gradients of `listwise_loss` (tests check them
        against autograd): for a network this small, torch's per-call overhead would cost more than
        the arithmetic. It runs off the `record()` path (the engine's step worker, under the read
        lock while requests score with these weights).
        """
        self.remember([(feats, labels)])
        n = min(self.replay_batch, len(self.buffer))
        rng = np.random.default_rng((self.seed, self.steps))
        self.steps += 1
        picks = rng.choice(len(self.buffer) - 1, size=n - 1, replace=False) if n > 1 else []
        batch = [unpack(*self.buffer[-1])] + [unpack(*self.buffer[int(i)]) for i in picks]
        weights = self.weights
        with _one_blas_thread():
            loss, grads = listwise_grads(weights, batch)
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        step = self.lr * min(1.0, ONLINE_CLIP / max(norm, 1e-12))
        anchor = self.anchor if self.pull > 0 else None
        moved = dict(weights)  # new arrays, swapped in whole: a request scoring now reads old or new
        for name, g in grads.items():
            w = weights[name] - step * g
            moved[name] = w if anchor is None else w - self.pull * (w - anchor[name])
        self._np = moved
        return loss

    def remember(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Keep (inputs, labels) examples for the replay (the oldest go beyond `replay_size`)."""
        for feats, labels in examples:
            self.buffer.append(pack(feats) + (np.asarray(labels, np.int64),))

    # ---- persistence --------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        """What a snapshot keeps: the weights once drawn or loaded, the replay buffer, the flag.
        The buffer is saved packed (`replay.blocks`, `replay.buckets`) when every example is in
        `expand`'s layout, as every example the engine makes is; else whole (`replay.features`)."""
        out = {} if self._np is None else {f"rerank.{k}": v.astype(np.float32) for k, v in self._np.items()}
        if self.anchor is not None:
            out.update({f"{ANCHOR}{k}": v.astype(np.float32) for k, v in self.anchor.items()})
        if self.buffer:
            packed = all(b >= 0 for _, b, _ in self.buffer)
            feats = [f if packed else unpack(f, b, lab)[0] for f, b, lab in self.buffer]
            out["replay.blocks" if packed else "replay.features"] = np.concatenate(feats).astype(np.float32)
            if packed:
                out["replay.buckets"] = np.array([b for _, b, _ in self.buffer], np.int64)
            out["replay.sizes"] = np.array([len(f) for f in feats], np.int64)
            out["replay.labels"] = np.concatenate([lab for _, _, lab in self.buffer]).astype(np.int64)
            out["replay.label_sizes"] = np.array([len(lab) for _, _, lab in self.buffer], np.int64)
        out["rerank.trained"] = np.array([1 if self.trained else 0], np.int64)
        out["rerank.expert"] = self.expert.copy()
        out["rerank.catalog"] = np.array([self.catalog_rows, self.catalog_until], np.int64)
        out[STEPS] = np.array([self.steps], np.int64)
        return out

    def _checked(self, named: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        """`named` as float32 copies, once every weight of `weight_shapes` is there, shaped alike."""
        shapes = weight_shapes(self.hidden)
        bad = sorted(k for k in set(shapes) | set(named) if k not in named or tuple(named[k].shape) != shapes.get(k))
        if bad:
            raise ValueError(f"{what} missing, unexpected or misshapen: {', '.join(bad[:5])}")
        return {k: np.array(v, np.float32) for k, v in named.items()}

    def load(self, tensors: dict[str, np.ndarray]) -> None:
        """Load saved weights. A reranker saved with another feature set (an older Kindling) is set
        aside with a warning: the engine ranks with the untrained reranker until the next fit.

        Raises:
            ValueError: some weights missing or misshapen.
        """
        saved = tensors.get("rerank.linear.weight")
        if saved is not None and saved.shape[-1] != N_INPUTS:
            import warnings

            warnings.warn(f"the stored reranker was trained on {saved.shape[-1]} inputs and this version "
                          f"uses {N_INPUTS} ({', '.join(FEATURES)} by {N_BUCKETS} history buckets); it is "
                          "set aside until the next fit",
                          stacklevel=2)
            self.set_aside = True
            return
        expert = tensors.get("rerank.expert")
        if expert is not None:
            expert = np.asarray(expert, np.int64)
            if expert.shape != (N_BUCKETS,) or (expert < -1).any() or (expert >= len(SIGNALS)).any():
                raise ValueError(f"rerank.expert must hold {N_BUCKETS} entries in [-1, {len(SIGNALS) - 1}]; "
                                 f"got {expert.tolist()}")
            self.expert = expert.copy()
        sd = {k[len("rerank."):]: v for k, v in tensors.items()
              if k.startswith("rerank.") and k not in ("rerank.trained", "rerank.expert", "rerank.catalog")}
        self.catalog_rows, self.catalog_until = (int(v) for v in tensors.get("rerank.catalog", np.array([-1, -1])))
        if sd:
            self._np = self._checked(with_gate(sd), "reranker weights")
        self.trained = bool(tensors.get("rerank.trained", np.zeros(1))[0])
        self.steps = int(tensors.get(STEPS, np.zeros(1, np.int64))[0])
        anchor = {k[len(ANCHOR):]: v for k, v in tensors.items() if k.startswith(ANCHOR)}
        if anchor:
            self.anchor = self._checked(with_gate(anchor), "reranker anchor weights")
        elif self.trained and self._np is not None:  # a store from before the anchor was saved
            self.anchor = {k: v.copy() for k, v in self._np.items()}
        packed = "replay.blocks" in tensors
        if packed or "replay.features" in tensors:
            f_ends = np.cumsum(tensors["replay.sizes"])
            l_ends = np.cumsum(tensors["replay.label_sizes"])
            feats = np.split(tensors["replay.blocks" if packed else "replay.features"], f_ends[:-1])
            labels = np.split(tensors["replay.labels"], l_ends[:-1])
            self.buffer.clear()
            if packed:
                self.buffer.extend(zip(feats, tensors["replay.buckets"].tolist(), labels))
            else:  # a whole-width buffer (files written before packing): packed as it loads
                self.remember(list(zip(feats, labels)))
