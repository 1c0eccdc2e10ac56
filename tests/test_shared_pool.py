"""One spinning intra-op pool for every session of a process (the local server's two towers): the same
vectors as sessions with their own pools. The pool is process-wide and permanent, so this runs in a child."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import TINY_MODEL

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clip_serverless.engine import SessionTuning
    from clip_serverless.engine.encoder import ImageEncoder, TextEncoder, session_options, share_one_thread_pool
    from clip_serverless.engine.model_dir import ModelDir
    shared = sys.argv[2] == "shared"
    if shared:
        assert share_one_thread_pool(2) == 2 and share_one_thread_pool(5) == 2  # made once, then kept
    assert session_options(SessionTuning(threads=2)).use_per_session_threads is not shared
    model = ModelDir.open(sys.argv[1])
    pixels = np.random.default_rng(0).standard_normal((3, 3, model.manifest.image_size,
                                                      model.manifest.image_size)).astype(np.float32)
    ids = np.array([[49406, 320, 1929, 49407, 0], [49406, 320, 49407, 0, 0]], dtype=np.int64)
    images, texts = ImageEncoder(model, threads=2), TextEncoder(model, threads=2)
    out = {"image": images.encode(pixels).tolist(), "text": texts.encode(ids).tolist()}
    out["image_again"] = images.encode(pixels).tolist()  # after the text session ran on the same pool
    print(json.dumps(out))
""")


def run(mode: str) -> dict[str, list[list[float]]]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(TINY_MODEL), mode], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, list[list[float]]] = json.loads(done.stdout)
    return result


def test_sessions_on_the_shared_pool_give_the_same_vectors() -> None:
    own, shared = run("own"), run("shared")
    for key in ("image", "text", "image_again"):
        np.testing.assert_array_equal(np.asarray(shared[key]), np.asarray(own[key]), err_msg=key)
    np.testing.assert_array_equal(np.asarray(shared["image_again"]), np.asarray(shared["image"]))
