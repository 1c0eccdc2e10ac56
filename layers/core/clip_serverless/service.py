"""Embedding with the CLIP core and the embedding cache: what every endpoint calls. No HTTP here.

Each tower is built on first use (or at init via :meth:`ClipService.preload`), so a text-only
function never opens the visual graph, and never imports Pillow.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .cache.embedder import embed_payloads
from .cache.stats import CacheStats
from .engine import EngineSettings as EngineSettings
from .engine import ImageDecodeError as ImageDecodeError  # embed_images raises it (the API answers 400)
from .engine.alternates import Alternates, RunCount
from .engine.encoder import ImageEncoder, TextEncoder
from .engine.model_dir import TOKENIZER_FILE
from .engine.model_dir import ModelDir as ModelDir
from .engine.model_dir import ModelDirError as ModelDirError  # ModelDir.open raises it
from .types import Float32Array, Int64Array, Tower

if TYPE_CHECKING:
    from .cache.tiered import EmbeddingCache
    from .engine.tokenizer import ClipTokenizer
    from .settings import Settings


class TextTower(Protocol):
    """What embeds token ids: the local ONNX text tower, or another function's (``tower_function``)."""

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None: ...

    def encode(self, ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None) -> Float32Array: ...


class TextTooLong(ValueError):
    """Raised when truncation is switched off and a text exceeds the context length."""

    def __init__(self, indices: list[int], context_length: int) -> None:
        super().__init__(
            f"Text at index {', '.join(map(str, indices))} is longer than the model's context of "
            f"{context_length} tokens.")
        self.indices = indices


class OutOfTime(RuntimeError):
    """The texts of a request would not all be embedded before its deadline (a Lambda function's timeout, less
    what the response needs): refused as soon as the rate measured on its first batches says so, rather than
    cut off by the timeout with nothing to show. ``fit``: about how many texts like these the time allows."""

    def __init__(self, total: int, fit: int, budget_s: float) -> None:
        super().__init__(
            f"{total} texts like these cannot be embedded within this function's time limit: at the rate measured "
            f"on this request, about {fit} fit in {budget_s:.0f} s. Send at most {fit} per request (or give the "
            f"function more memory, and with it more CPU).")
        self.total = total
        self.fit = fit


@dataclass
class Embeddings:
    vectors: Float32Array  # (N, D), raw projections, input order
    truncated: list[int] = field(default_factory=list)  # indices of texts cut to the context length
    tokens: int = 0  # texts: the positions the tower reads, SOT to first EOT, summed (OpenAI's usage)
    # What the cache did (hits and misses per tier), for the X-Clip-Cache header and the request's log line.
    cache: CacheStats = field(default_factory=lambda: CacheStats(modality="", enabled=False))


class ClipService:
    def __init__(self, model_dir: ModelDir, *, cache: EmbeddingCache | None = None, text_batch_size: int = 32,
                 truncate_text: bool = True, engine: EngineSettings | None = None,
                 text_tower: TextTower | None = None, quiet_when_busy: bool = False) -> None:
        """``engine``: the sessions' tuning and the image size limit (default: :class:`EngineSettings`').
        ``quiet_when_busy``: a run that starts while another is in flight in this process uses a second,
        quiet session of its tower (one thread, no spinning; ``engine.alternates``): the local server's, whose
        sessions spin."""
        engine = engine if engine is not None else EngineSettings()
        self.model_dir = model_dir
        self.manifest = model_dir.manifest
        self.cache = cache
        self.text_batch_size = text_batch_size
        self.truncate_text = truncate_text
        self.max_image_pixels = engine.max_image_pixels
        self.image_decode = engine.image_decode
        self.image_encoder = ImageEncoder(model_dir, tuning=engine.tuning)
        # The text tower runs here, or (compare on Lambda) in the embed_text function; the tokenizer, and
        # with it the cache keys, stays here either way.
        self.text_encoder: TextTower = (text_tower if text_tower is not None
                                        else TextEncoder(model_dir, tuning=engine.tuning))
        self.text_is_remote = text_tower is not None
        self.image_runs: Alternates[ImageEncoder] | None = None
        self.text_runs: Alternates[TextTower] | None = None
        if quiet_when_busy:
            runs = RunCount()
            quiet = replace(self.image_encoder.tuning, threads=1, spinning=False)
            self.image_runs = Alternates(self.image_encoder, lambda: ImageEncoder(model_dir, tuning=quiet), runs)
            if isinstance(self.text_encoder, TextEncoder):
                self.text_runs = Alternates(self.text_encoder, lambda: TextEncoder(model_dir, tuning=quiet), runs)
        self._tokenizer: ClipTokenizer | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, engine: EngineSettings | None = None,
                      quiet_when_busy: bool = False) -> ClipService:
        """The service ``settings`` describe: model directory opened and validated, cache, text tower (another
        function's when ``settings.text_function`` names one). ``engine`` replaces ``settings.engine``;
        ``quiet_when_busy``: as in ``__init__``."""
        from .cache import from_config as cache_from_config

        model_dir = ModelDir.open(settings.model_dir)
        engine = engine or settings.engine
        # None when the cache is off; a draft decode's vectors are kept apart from the exact ones
        cache = cache_from_config(model_dir.manifest, settings.cache, image_decode=engine.image_decode)
        text_tower = None
        if settings.text_function is not None:
            from .aws_lambda.tower_function import TextFunctionEncoder

            text_tower = TextFunctionEncoder(settings.text_function.name, model_dir.manifest,
                                             timeout_s=settings.text_function.timeout_s)
        return cls(model_dir, cache=cache, text_batch_size=settings.text_batch_size,
                   truncate_text=settings.truncate_text, engine=engine, text_tower=text_tower,
                   quiet_when_busy=quiet_when_busy)

    # -- loading -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> ClipTokenizer:
        return self._tokenizer if self._tokenizer is not None else self.load_tokenizer()

    def load_tokenizer(self) -> ClipTokenizer:
        """The tokenizer, loaded now if it was not (thread-safe)."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from .engine.tokenizer import ClipTokenizer

                    self._tokenizer = ClipTokenizer.from_file(
                        self.model_dir.file(TOKENIZER_FILE), context_length=self.manifest.context_length)
        return self._tokenizer

    def preload(self, towers: Sequence[Tower]) -> None:
        """Load towers now (Lambda init) instead of at the first request; see :meth:`start_preload`."""
        self.start_preload(towers).wait()

    def start_preload(self, towers: Sequence[Tower]) -> Preload:
        """Start loading ``towers`` and return at once; :meth:`Preload.wait` finishes the loading.

        Each ONNX Runtime session is created and run once (:meth:`~clip_serverless.engine.encoder.ImageEncoder.
        warm_up`) in a thread of its own: ONNX Runtime releases the GIL meanwhile, so the caller imports and
        builds the rest of the app on the other vCPU. What holds the GIL (the tokenizer) is left to
        :meth:`Preload.wait`, in the caller's thread: in a thread of its own it would only take turns with the
        caller, and each turn costs a hand-over of the GIL (compare's init measured ~2,000 of them, and 60 ms
        slower, with the tokenizer and the client in threads). Another function's text tower (compare's Lambda
        client) is not made here: the first request that needs it makes it in compare's text thread, while the
        request's own thread decodes and runs the image with the GIL released.
        """
        threads: list[tuple[str, Callable[[], object]]] = []
        if "visual" in towers or ("textual" in towers and isinstance(self.text_encoder, TextEncoder)):
            import onnxruntime  # noqa: F401  (here, not in two threads at once: imports racing in threads can deadlock)
        if "visual" in towers:
            threads.append(("preload-visual", self.image_encoder.warm_up))
        later: list[tuple[str, Callable[[], object]]] = []
        if "textual" in towers:
            text = self.text_encoder
            if isinstance(text, TextEncoder):
                threads.append(("preload-textual", text.warm_up))
            later.append(("preload-tokenizer", self.load_tokenizer))
        if "visual" in towers:
            later.append(("preload-pillow", _import_preprocessing))  # Pillow's import belongs to init too
        return Preload(threads, later)

    def loaded_towers(self) -> list[str]:
        """The towers loaded in this process (another function's text tower is not one of them)."""
        text_here = self.text_encoder.loaded and not self.text_is_remote
        return [name for name, loaded in (("visual", self.image_encoder.loaded), ("textual", text_here)) if loaded]

    # -- embedding ---------------------------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str], *, use_cache: bool = True, deadline: float | None = None
                    ) -> Embeddings:
        """``deadline``: a ``time.monotonic()`` instant by which the embedding must be done, else
        :class:`OutOfTime` (raised before a batch that the rate so far says would end after it)."""
        started = time.monotonic()
        batch = self.tokenizer.encode(texts)
        truncated = [i for i, cut in enumerate(batch.truncated) if cut]
        if truncated and not self.truncate_text:
            raise TextTooLong(truncated, self.manifest.context_length)
        # Only ids up to and including each row's first EOT matter to the model (it pools there).
        rows = [batch.ids[i, : int(batch.lengths[i])] for i in range(len(texts))]

        def compute(indices: Sequence[int]) -> Float32Array:
            parts = [np.zeros((0, self.manifest.embed_dim), dtype=np.float32)]
            chunks = [list(indices[i : i + self.text_batch_size]) for i in range(0, len(indices), self.text_batch_size)]
            # A text's cost grows with its tokens (ids are cut at each row's EOT): the projection counts tokens.
            tokens = [int(batch.lengths[chunk].sum()) for chunk in chunks]
            clock = _Projection(started, deadline, sum(tokens), computed=len(indices), total=len(texts))
            for chunk, cost in zip(chunks, tokens, strict=True):
                clock.check()
                with _run_on(self.text_runs, self.text_encoder) as tower:
                    parts.append(tower.encode(batch.ids[chunk], batch.lengths[chunk]))
                clock.done(cost)
            return np.concatenate(parts, axis=0)

        vectors, stats = self._cached("text", [row.astype("<i8").tobytes() for row in rows], compute, use_cache)
        return Embeddings(vectors=vectors, truncated=truncated, tokens=int(batch.lengths.sum()), cache=stats)

    def embed_images(self, blobs: Sequence[bytes], *, use_cache: bool = True) -> Embeddings:
        """Raw encoded image bytes in, embeddings out; raises ``ImageDecodeError`` for bad images."""

        def compute(indices: Sequence[int]) -> Float32Array:
            from .engine.preprocessing import decode_and_preprocess

            m = self.manifest
            # Several images decode and resize at once, one image in bands: as many as the image session's
            # threads (one below a vCPU's worth of Lambda memory, where a second only burns the quota).
            pixels = decode_and_preprocess([blobs[i] for i in indices], m.image_size, m.mean, m.std,
                                           max_pixels=self.max_image_pixels,
                                           workers=self.image_encoder.threads,
                                           draft=self.image_decode == "draft")
            with _run_on(self.image_runs, self.image_encoder) as tower:
                return tower.encode(pixels)

        vectors, stats = self._cached("image", list(blobs), compute, use_cache)
        return Embeddings(vectors=vectors, cache=stats)

    # -- cache ------------------------------------------------------------------------------------
    def _cached(self, modality: Literal["image", "text"], payloads: list[bytes],
                compute: Callable[[Sequence[int]], Float32Array],
                use_cache: bool) -> tuple[Float32Array, CacheStats]:
        # One path with or without a cache (none configured, or the request's Cache-Control: no-cache).
        return embed_payloads(self.cache, modality, payloads, compute, use_cache=use_cache)


FIT_MARGIN = 0.85  # of the texts the measured rate says would fit, those OutOfTime advises sending


class _Projection:
    """Whether the rest of a request's batches can end by its deadline, at the rate of those done so far."""

    def __init__(self, started: float, deadline: float | None, tokens: int, *, computed: int, total: int) -> None:
        self.started = started  # the request's work began (tokenizing, cache lookups): their time counts too
        self.deadline = deadline
        self.left = tokens
        self.computed = computed  # the texts the batches embed (cache hits are not among them)
        self.total = total
        self.computing = time.monotonic()
        self.tokens_done = 0

    def check(self) -> None:
        """Raise :class:`OutOfTime` if the remaining batches (the next one among them) would end after the
        deadline. The first batch always runs: there is no rate before it."""
        if self.deadline is None or not self.tokens_done:
            return
        now = time.monotonic()
        rate = (now - self.computing) / self.tokens_done  # seconds per token
        if now + rate * self.left > self.deadline:
            budget = self.deadline - self.started
            need = (now - self.started) + rate * self.left  # this request's whole time at this rate
            # Scaled from the texts computed (cache hits cost next to nothing), less a margin: the first batches
            # ran 8-15 % faster than a whole list's average (bench/bench_time_limit.py).
            fit = max(1, int(FIT_MARGIN * self.computed * budget / need)) if need > 0 else self.computed
            raise OutOfTime(self.total, min(fit, self.total - 1), budget)

    def done(self, tokens: int) -> None:
        self.tokens_done += tokens
        self.left -= tokens


T = TypeVar("T")


def _run_on(runs: Alternates[T] | None, tower: T) -> contextlib.AbstractContextManager[T]:
    """The encoder a run takes: ``runs``' pick when the service alternates sessions, else ``tower`` itself."""
    return runs.pick() if runs is not None else contextlib.nullcontext(tower)


def _import_preprocessing() -> None:
    from .engine import preprocessing  # noqa: F401


class Preload:
    """Loading under way (:meth:`ClipService.start_preload`): jobs in daemon threads now, others at :meth:`wait`."""

    def __init__(self, threads: Sequence[tuple[str, Callable[[], object]]],
                 later: Sequence[tuple[str, Callable[[], object]]] = ()) -> None:
        self._failures: list[BaseException] = []
        self.started = time.perf_counter()
        self.finished: dict[str, float] = {}  # job name -> seconds from the start to its end
        self._later = list(later)
        self._threads = [threading.Thread(target=self._run, args=(name, job), name=name, daemon=True)
                         for name, job in threads]
        for thread in self._threads:
            thread.start()

    def _run(self, name: str, job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as exc:  # re-raised by wait(), in the caller's thread
            self._failures.append(exc)
        finally:
            self.finished[name] = time.perf_counter() - self.started

    def wait(self) -> None:
        """Run the remaining jobs here, join the threads; raise the first failure."""
        while self._later:
            self._run(*self._later.pop(0))
        for thread in self._threads:
            thread.join()
        if self._failures:
            raise self._failures[0]
