import itertools

import pytest

from llmc_ray.config import ConfigError
from llmc_ray.dist.planner import partition


def brute_force(sizes, n, first, last):
    best = None
    L = len(sizes)
    for cuts in itertools.combinations(range(1, L), n - 1):
        bounds = (0,) + cuts + (L,)
        loads = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += first
        loads[-1] += last
        if best is None or max(loads) < best:
            best = max(loads)
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_partition_is_optimal_and_contiguous(n):
    sizes = [5, 3, 8, 1, 1, 9, 2, 4, 7]
    ranges = partition(sizes, n, first_extra=6, last_extra=10)
    assert [i for r in ranges for i in r] == list(range(len(sizes)))  # contiguous, in order, complete
    assert all(ranges)
    loads = [sum(sizes[i] for i in r) for r in ranges]
    loads[0] += 6
    loads[-1] += 10
    assert max(loads) == brute_force(sizes, n, 6, 10)


def test_too_many_actors_is_a_config_error():
    with pytest.raises(ConfigError, match="at most 3"):
        partition([1, 1, 1], 4)
