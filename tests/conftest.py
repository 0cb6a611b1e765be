import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py, tests/tiny_tokenizer.py

from tiny import tiny_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402


def save_tiny(path, kind="llama", seed=0, **kw):
    model = tiny_model(kind, seed=seed, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (config.json + safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
