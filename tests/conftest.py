import os
import tempfile

# 8 CPU devices for the mesh tests; XLA's CPU backend without LLVM's optimisation passes:
# the suite's programs are tiny and compiled once or twice each, so compiling dominates
# its time (about half of it goes away) and the numbers checked do not depend on how
# fast the machine code is
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# token stores built by the tests go to a folder of their own, not the user's cache
os.environ["BLOCKDISTILL_CACHE"] = tempfile.mkdtemp(prefix="blockdistill-test-cache-")
# XLA's compiled programs are kept on disk for this test run, shared by the workers and by
# the command-line runs they start: the suite compiles the same training steps again and
# again (each module starts from empty in-memory caches, each subprocess from nothing),
# and on CPU a compile costs seconds where the step costs milliseconds
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"blockdistill-xla-{_run}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def _monitoring_listeners() -> dict[str, list]:
    from jax._src import monitoring

    return {
        kind: list(getattr(monitoring, f"get_{kind}_listeners")())
        for kind in ("event", "event_duration", "event_time_span", "scalar")
    }


@pytest.fixture(autouse=True)
def no_leaked_monitoring_listeners():
    """A test that registers a global `jax.monitoring` listener must remove it: a leaked
    one keeps running (and growing its list) in every later test."""
    before = _monitoring_listeners()
    yield
    after = _monitoring_listeners()
    leaked = {kind: len(after[kind]) - len(before[kind]) for kind in after if after[kind] != before[kind]}
    assert not leaked, f"the test left jax.monitoring listeners registered: {leaked}"


@pytest.fixture(scope="module", autouse=True)
def fresh_compilation_caches():
    """Drop compiled programs after each test module. One process compiles several hundred
    programs over the suite; with all of them alive, XLA's CPU compiler crashed (a
    segfault in `backend_compile_and_load`, twice at the same late test, never when that
    module ran alone), so each module starts from empty caches."""
    yield
    from blockdistill.distill import step as _train

    _train._cached_step.cache_clear()
    jax.clear_caches()


@pytest.fixture
def compile_events():
    """Names of the backend compilations (or compilation-cache reads) that happen while the test runs (a list that
    grows); the listener is removed afterwards."""
    events: list[str] = []

    def listener(event, duration, **kwargs):
        # a program compiled, or read back from the test run's compilation cache on disk
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def getkey():
    """A fresh, deterministic key every call: `getkey()`."""
    counter = iter(range(1 << 30))
    return lambda: jax.random.key(next(counter))


STDLIB_FILES = ["json/encoder.py", "json/decoder.py", "textwrap.py", "string.py", "shlex.py", "bisect.py"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small corpus folder: six standard-library modules saved as .txt files."""
    from blockdistill import default_corpus_root

    root = tmp_path_factory.mktemp("corpus")
    for name in STDLIB_FILES:
        text = (default_corpus_root() / name).read_text()
        (root / (name.replace("/", "_") + ".txt")).write_text(text)
    return root
