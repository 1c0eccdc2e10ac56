"""Types shared across the package: array aliases and the small vocabularies of towers and modalities.

A leaf module (numpy only), so that any room can import it without pulling in another.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]  # embeddings (N, D), pixel batches (N, 3, S, S)
Int64Array = npt.NDArray[np.int64]  # token ids (N, L)

Tower = Literal["visual", "textual"]  # the two ONNX graphs of a CLIP model
Modality = Literal["image", "text"]  # what an input is (cache keys, endpoints)
Precision = Literal["fp32", "int8"]
