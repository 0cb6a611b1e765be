import os
import random
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

    # logical CPUs: room for a chain of 3 one-CPU actors (tests/test_transport.py) on the 2-core CI machine
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


WORDS = ("the union state of our nation people congress year government law war peace trade money work "
         "freedom justice america world country time great new must will shall united president").split()


def write_text(path, n_lines=120, words=60, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n_lines)))
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return write_text(d / "calib.txt", seed=1), write_text(d / "eval.txt", seed=2)
