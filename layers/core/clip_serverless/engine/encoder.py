"""ONNX Runtime sessions for CLIP's two towers, each loaded lazily and on its own.

A caller that only embeds text never opens ``visual.onnx`` (and never imports Pillow: preprocessing
lives in its own module), and the other way round.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..types import Float32Array, Int64Array
from . import SessionTuning
from .model_dir import TEXTUAL_FILE, VISUAL_FILE, Manifest, ModelDir, ModelDirError
from .tokenizer import EOT_ID, SOT_ID

if TYPE_CHECKING:
    import onnxruntime as ort


def available_cpus() -> int:
    """vCPUs this process may run on (Lambda: scales with memory size; 1 below 1,769 MB)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve(tuning: SessionTuning) -> SessionTuning:
    """``tuning`` with each knob left ``None`` at the engine's default: every vCPU this process may run on, no
    spinning, ONNX Runtime's memory arena and patterns on."""
    return SessionTuning(threads=tuning.threads or available_cpus(), spinning=bool(tuning.spinning),
                         cpu_mem_arena=tuning.cpu_mem_arena is not False, mem_pattern=tuning.mem_pattern is not False)


def session_options(tuning: SessionTuning) -> ort.SessionOptions:
    """ONNX Runtime's options for ``tuning``, its unset knobs at their defaults (:func:`resolve`)."""
    import onnxruntime as ort  # imported here so that importing this module stays cheap

    tuning = resolve(tuning)
    options = ort.SessionOptions()
    options.intra_op_num_threads = tuning.threads or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise in Lambda logs
    # Off unless asked for: alone spinning saves a few ms a run (ViT-B/32 int8 image 20.7 vs 24.2 ms), but
    # a second session (the local server's) or any other thread then fights the spinners, and on Lambda they
    # burn the function's CPU quota (bench/bench_engine_settings.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if tuning.spinning else "0")
    # Spinners stop as soon as the last run returns, not a while later: the local server's compare runs its
    # text session right after the image one, and the image session's idle spinners took 25 ms from it (ViT-B/32
    # int8, both spinning: 95 ms with, 65 ms without them).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = bool(tuning.cpu_mem_arena)
    options.enable_mem_pattern = bool(tuning.mem_pattern)
    return options


def create_session(path: str, threads: int | None = None, tuning: SessionTuning | None = None) -> ort.InferenceSession:
    """A CPU session for the graph at ``path``; ``threads`` (if given) overrides ``tuning.threads``."""
    import onnxruntime as ort

    tuning = tuning if tuning is not None else SessionTuning()
    if threads is not None:
        tuning = replace(tuning, threads=threads)
    try:
        return ort.InferenceSession(path, sess_options=session_options(tuning), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
        raise ModelDirError(f"{path}: ONNX Runtime could not load this graph: {exc}") from None


# The manifest's quantization.activation_scale of int8 graphs with one activation scale per token.
BATCH_INVARIANT_SCALE = "per-token"


def batch_invariant(manifest: Manifest) -> bool:
    """Whether each row of a batch comes out of one run bit for bit as it does alone.

    fp32 graphs are. int8 graphs made by ``quantize_dynamic`` alone pick one activation scale per input
    tensor, so a row's result depends on its neighbours: they run one row at a time. Graphs rewritten to
    one scale per token (``quantization.activation_scale`` = ``"per-token"`` in the manifest, since
    clip_export's per_token rewrite) are batch-invariant again.
    """
    if manifest.precision != "int8":
        return True
    quantization = manifest.extra.get("quantization")
    return isinstance(quantization, dict) and quantization.get("activation_scale") == BATCH_INVARIANT_SCALE


class _Tower:
    """One lazily created session; thread-safe creation, then lock-free runs (ORT sessions are)."""

    file_name: str

    def __init__(self, model_dir: ModelDir, threads: int | None = None, *, tuning: SessionTuning | None = None) -> None:
        """``threads``: ONNX Runtime intra-op threads (wins over ``tuning.threads``); None in both: every vCPU
        this process may run on. ``tuning``: the session's other knobs (:class:`SessionTuning`)."""
        self.model_dir = model_dir
        tuning = tuning if tuning is not None else SessionTuning()
        self.tuning = resolve(replace(tuning, threads=threads) if threads is not None else tuning)
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()
        self.per_row = not batch_invariant(model_dir.manifest)

    @property
    def threads(self) -> int:
        return self.tuning.threads or 1  # resolved in __init__: never None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = create_session(str(self.model_dir.file(self.file_name)), tuning=self.tuning)
        return self._session

    def load(self) -> None:
        """Create the session now (at init) rather than at the first request."""
        _ = self.session

    def warm_up(self) -> None:
        """Load, then run the smallest input once: a session's first run allocates and initialises what
        later runs reuse (ViT-B/32 int8: ~10 ms more than the next), so it belongs to init, not to a request.
        ONNX Runtime releases the GIL meanwhile."""
        feed_name, batch = self._smallest_input()
        self.session.run(None, {feed_name: batch})

    def _smallest_input(self) -> tuple[str, npt.NDArray[np.generic]]:
        raise NotImplementedError

    def _run(self, feed_name: str, batch: npt.NDArray[np.generic]) -> Float32Array:
        session = self.session
        if self.per_row and batch.shape[0] > 1:
            rows = [session.run(None, {feed_name: batch[i : i + 1]})[0] for i in range(batch.shape[0])]
            out = np.concatenate(rows, axis=0)
        else:
            out = session.run(None, {feed_name: batch})[0]
        return np.asarray(out, dtype=np.float32)


def l2_normalize(embeddings: Float32Array) -> Float32Array:
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    out: Float32Array = (embeddings / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
    return out


class ImageEncoder(_Tower):
    """``visual.onnx``: preprocessed pixels (N, 3, S, S) float32 -> raw embeddings (N, D) float32."""

    file_name = VISUAL_FILE

    def _smallest_input(self) -> tuple[str, npt.NDArray[np.generic]]:
        size = self.model_dir.manifest.image_size
        return "pixel_values", np.zeros((1, 3, size, size), dtype=np.float32)

    def encode(self, pixel_values: Float32Array, *, normalize: bool = False) -> Float32Array:
        size = self.model_dir.manifest.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"expected pixel values of shape (N, 3, {size}, {size}), got {pixel_values.shape}")
        if pixel_values.shape[0] == 0:
            return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)
        out = self._run("pixel_values", np.ascontiguousarray(pixel_values, dtype=np.float32))
        return l2_normalize(out) if normalize else out


class TextEncoder(_Tower):
    """``textual.onnx``: token ids (N, L) -> raw embeddings (N, D) float32.

    The text tower is causal and pools at the first end-of-text token, so every position after it is
    dead weight: ids are cut to the longest row's EOT (fp32) or to each row's own EOT, which gives the same
    result as the full context at a fraction of the cost. int8 graphs cut each row to its own EOT: rows of
    equal length run together when the graph is batch-invariant (one run per distinct length: nothing
    guarantees that padding leaves a row's bits alone), else one row at a time.
    """

    file_name = TEXTUAL_FILE

    def _smallest_input(self) -> tuple[str, npt.NDArray[np.generic]]:
        return "input_ids", np.array([[SOT_ID, EOT_ID]], dtype=np.int64)  # an empty caption

    def encode(self, ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None, *,
               normalize: bool = False) -> Float32Array:
        """``lengths[i]`` is the index of row i's EOT plus one; when omitted it is found from the ids."""
        context = self.model_dir.manifest.context_length
        if ids.ndim != 2 or not 0 < ids.shape[1] <= context:
            raise ValueError(f"expected token ids of shape (N, L) with 0 < L <= {context}, got {ids.shape}")
        n = ids.shape[0]
        if n == 0:
            return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if lengths is None:
            lengths = ids.argmax(axis=1) + 1  # EOT has the largest id in CLIP's vocabulary
        if self.per_row:
            session = self.session
            rows = [session.run(None, {"input_ids": ids[i : i + 1, : int(lengths[i])]})[0] for i in range(n)]
            out = np.asarray(np.concatenate(rows, axis=0), dtype=np.float32)
        elif self.model_dir.manifest.precision == "int8":
            lengths = np.asarray(lengths)
            out = np.empty((n, self.model_dir.manifest.embed_dim), dtype=np.float32)
            for length in np.unique(lengths):
                same = np.flatnonzero(lengths == length)
                out[same] = self._run("input_ids", np.ascontiguousarray(ids[same, : int(length)]))
        else:
            out = self._run("input_ids", ids[:, : int(np.max(lengths))])
        return l2_normalize(out) if normalize else out
