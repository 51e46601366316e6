import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


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
