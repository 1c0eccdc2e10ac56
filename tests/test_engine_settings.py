"""ONNX Runtime session settings: what each knob sets, the defaults per endpoint and for the local server, and
the environment variables that override them. Which values are fastest is measured, not tested
(bench/bench_engine_settings.py)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clip_serverless.api.endpoints import REGISTRY, endpoint
from clip_serverless.engine import EngineSettings, SessionTuning
from clip_serverless.engine.encoder import available_cpus, resolve, session_options
from clip_serverless.engine.model_dir import ModelDir, ModelDirError
from clip_serverless.service import ClipService
from clip_serverless.settings import Settings

from tests.handlers import load_function


def spinning(options: Any) -> str:
    return str(options.get_session_config_entry("session.intra_op.allow_spinning"))


def test_each_knob_reaches_the_session_options() -> None:
    options = session_options(SessionTuning(threads=1, spinning=True, cpu_mem_arena=False, mem_pattern=False))
    assert (options.intra_op_num_threads, spinning(options)) == (1, "1")
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
    options = session_options(SessionTuning(threads=3, spinning=False, cpu_mem_arena=True, mem_pattern=True))
    assert (options.intra_op_num_threads, spinning(options)) == (3, "0")
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern


def test_unset_knobs_get_the_engine_defaults() -> None:
    options = session_options(SessionTuning())
    assert (options.intra_op_num_threads, spinning(options)) == (available_cpus(), "0")
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern


def test_with_defaults_fills_only_what_is_unset() -> None:
    env = EngineSettings(threads=3, mem_pattern=False, max_image_pixels=100)
    merged = env.with_defaults(SessionTuning(threads=1, spinning=True, cpu_mem_arena=False, mem_pattern=True))
    assert merged == EngineSettings(threads=3, spinning=True, cpu_mem_arena=False, mem_pattern=False,
                                    max_image_pixels=100)
    assert merged.tuning == SessionTuning(threads=3, spinning=True, cpu_mem_arena=False, mem_pattern=False)


def test_the_environment_sets_every_knob() -> None:
    env = {"CLIP_MODEL_DIR": "m", "CLIP_NUM_THREADS": "1", "CLIP_ORT_SPINNING": "true",
           "CLIP_ORT_CPU_MEM_ARENA": "off", "CLIP_ORT_MEM_PATTERN": "0"}
    assert Settings.from_env(env).engine.tuning == SessionTuning(threads=1, spinning=True, cpu_mem_arena=False,
                                                                 mem_pattern=False)
    assert Settings.from_env({"CLIP_MODEL_DIR": "m"}).engine.tuning == SessionTuning()  # unset: not decided here


def test_a_service_s_sessions_run_with_its_tuning_and_warm_up_at_preload(tiny_model_path: Path) -> None:
    tuning = SessionTuning(threads=1, spinning=True, cpu_mem_arena=False, mem_pattern=False)
    service = ClipService(ModelDir.open(tiny_model_path), engine=EngineSettings(**vars(tuning)))
    assert service.image_encoder.tuning == tuning == service.text_encoder.tuning  # type: ignore[attr-defined]
    loading = service.start_preload(("visual", "textual"))
    loading.wait()
    assert service.loaded_towers() == ["visual", "textual"]
    assert set(loading.finished) == {"preload-visual", "preload-textual", "preload-tokenizer", "preload-pillow"}
    options = service.image_encoder.session.get_session_options()
    assert (options.intra_op_num_threads, spinning(options), options.enable_mem_pattern) == (1, "1", False)


def test_a_preload_failure_is_raised_by_wait(tiny_model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("manifest.json", "tokenizer.json", "textual.onnx"):
        (broken / name).write_bytes((tiny_model_path / name).read_bytes())
    (broken / "visual.onnx").write_bytes(b"\0" * (tiny_model_path / "visual.onnx").stat().st_size)  # not a graph
    loading = ClipService(ModelDir.open(broken)).start_preload(("visual", "textual"))
    with pytest.raises(ModelDirError, match="ONNX Runtime could not load this graph"):
        loading.wait()


@pytest.fixture
def function_env(monkeypatch: pytest.MonkeyPatch, tiny_model_path: Path) -> pytest.MonkeyPatch:
    for name in ("CLIP_NUM_THREADS", "CLIP_ORT_SPINNING", "CLIP_ORT_CPU_MEM_ARENA", "CLIP_ORT_MEM_PATTERN",
                 "CLIP_TEXT_FUNCTION", "CLIP_IMAGE_FUNCTION", "CLIP_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
    monkeypatch.setenv("CLIP_CACHE", "off")
    return monkeypatch


@pytest.mark.parametrize("name", [spec.name for spec in REGISTRY if spec.invokes is None])
def test_a_function_runs_its_registry_tuning_unless_the_environment_overrides_it(
        function_env: pytest.MonkeyPatch, name: str) -> None:
    defaults = endpoint(name).engine
    tower = "visual" if "visual" in endpoint(name).towers else "textual"

    def tuning() -> SessionTuning:
        service = load_function(name).handler.app.state.service
        encoder = service.image_encoder if tower == "visual" else service.text_encoder
        assert encoder.loaded
        return SessionTuning(**vars(encoder.tuning))

    assert tuning() == resolve(defaults)
    function_env.setenv("CLIP_NUM_THREADS", "1")
    function_env.setenv("CLIP_ORT_SPINNING", "false" if defaults.spinning else "true")
    function_env.setenv("CLIP_ORT_MEM_PATTERN", "false" if defaults.mem_pattern is not False else "true")
    assert tuning() == resolve(SessionTuning(threads=1, spinning=not defaults.spinning,
                                             cpu_mem_arena=defaults.cpu_mem_arena,
                                             mem_pattern=defaults.mem_pattern is False))


def test_the_local_server_s_default_holds_unless_the_environment_overrides_it(
        function_env: pytest.MonkeyPatch) -> None:
    from clip_serverless.api.local import LOCAL_ENGINE, local_service

    service = local_service(Settings.from_env())
    assert service.image_encoder.tuning == resolve(LOCAL_ENGINE) == service.text_encoder.tuning  # type: ignore[attr-defined]
    function_env.setenv("CLIP_NUM_THREADS", "3")
    assert local_service(Settings.from_env()).text_encoder.tuning.threads == 3  # type: ignore[attr-defined]


def test_below_one_vcpu_a_function_runs_one_thread_without_spinning(function_env: pytest.MonkeyPatch) -> None:
    def tuning() -> SessionTuning:
        return load_function("embed_text").handler.app.state.service.text_encoder.tuning  # type: ignore[no-any-return]

    function_env.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")  # 0.58 vCPU
    assert (tuning().threads, tuning().spinning) == (1, False)
    function_env.setenv("CLIP_ORT_SPINNING", "true")  # the environment still decides
    assert (tuning().threads, tuning().spinning) == (1, True)
    function_env.delenv("CLIP_ORT_SPINNING")
    function_env.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")  # one vCPU: the registry's choice
    assert tuning() == resolve(endpoint("embed_text").engine)


def test_engine_defaults_per_memory_size() -> None:
    from clip_serverless.aws_lambda.entry import ONE_VCPU_MB, engine_defaults

    for spec in REGISTRY:
        assert engine_defaults(spec, None) == engine_defaults(spec, 2048) == spec.engine
        assert engine_defaults(spec, ONE_VCPU_MB) == spec.engine
        for low in (engine_defaults(spec, 1024), engine_defaults(spec, ONE_VCPU_MB - 1)):
            assert (low.threads, low.spinning) == (1, False)
            assert (low.cpu_mem_arena, low.mem_pattern) == (spec.engine.cpu_mem_arena, spec.engine.mem_pattern)


def test_no_spinning_where_another_thread_works_beside_the_session() -> None:
    # compare runs its image while a thread calls embed_text.
    assert endpoint("compare").engine.spinning is False
    assert all(spec.engine.spinning for spec in REGISTRY if spec.name != "compare")  # their runs are alone


def test_the_local_server_s_runs_spin_alone_and_run_quiet_beside_another(function_env: pytest.MonkeyPatch,
                                                                      red_circle: bytes) -> None:
    from clip_serverless.api.local import LOCAL_ENGINE, local_service

    assert LOCAL_ENGINE.spinning is True
    service = local_service(Settings.from_env())
    assert service.image_runs is not None and service.text_runs is not None
    used: list[tuple[str, SessionTuning]] = []
    for name, runs in (("image", service.image_runs), ("text", service.text_runs)):
        pick = runs.pick

        def spy(_pick: Any = pick, _name: str = name) -> Any:
            @contextlib.contextmanager
            def picked() -> Any:
                with _pick() as tower:
                    used.append((_name, tower.tuning))
                    yield tower
            return picked()

        function_env.setattr(runs, "pick", spy)
    fast = service.image_encoder.tuning
    service.embed_images([red_circle], use_cache=False)
    service.embed_texts(["a red circle"], use_cache=False)
    assert used == [("image", fast), ("text", fast)] and fast.spinning  # alone: the spinning sessions
    assert service.image_runs.quiet is None and service.text_runs.quiet is None  # quiet ones not made yet
    quiet = replace(fast, threads=1, spinning=False)
    with service.image_runs.pick():  # another run in flight: each tower's quiet session, made now
        service.embed_texts(["a blue square"], use_cache=False)
        service.embed_images([red_circle], use_cache=False)
    assert used[2:] == [("image", fast), ("text", quiet), ("image", quiet)]  # the first: the run held open
    pixels = _pixels(service, red_circle)  # whichever session answers, the vector is the same
    quiet_image = service.image_runs.quiet
    assert quiet_image is not None
    np.testing.assert_array_equal(service.image_runs.fast.encode(pixels), quiet_image.encode(pixels))
    function_env.setenv("CLIP_ORT_SPINNING", "false")  # quiet sessions only, no second session
    assert local_service(Settings.from_env()).image_runs is None


def _pixels(service: ClipService, data: bytes) -> Any:
    from clip_serverless.engine.preprocessing import decode_and_preprocess

    m = service.manifest
    return decode_and_preprocess([data], m.image_size, m.mean, m.std)


def test_run_count_counts_runs_in_flight_and_survives_errors() -> None:
    from clip_serverless.engine.alternates import Alternates, RunCount

    runs = RunCount()
    made: list[str] = []

    def make_quiet() -> str:
        made.append("quiet")
        return "quiet"

    alternates = Alternates("fast", make_quiet, runs)
    with alternates.pick() as first, alternates.pick() as second, alternates.pick() as third:
        assert (first, second, third, runs.running) == ("fast", "quiet", "quiet", 3)
    assert made == ["quiet"] and runs.running == 0
    with pytest.raises(RuntimeError), alternates.pick():
        raise RuntimeError("a run that fails")
    assert runs.running == 0
    with alternates.pick() as again:
        assert again == "fast"
