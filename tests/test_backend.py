"""The backend: scatter-add, generators, host/device moves, the missing-GPU error."""
import numpy as np
import pytest

from paeff_np import backend
from paeff_np.backend import GPUUnavailable, add_at, default_rng, get_array_module, to_device, to_host


def test_add_at_accumulates_repeated_indices(xp):
    target = xp.zeros(4)
    add_at(target, xp.asarray([0, 2, 2, 3, 2]), xp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]))
    np.testing.assert_array_equal(to_host(target), [1.0, 0.0, 10.0, 4.0])


def test_generator_from_a_list_seed_is_reproducible(xp):
    a = default_rng([7, 3, 1], xp).random(5)
    b = default_rng([7, 3, 1], xp).random(5)
    c = default_rng([7, 4, 1], xp).random(5)
    np.testing.assert_array_equal(to_host(a), to_host(b))
    assert not np.array_equal(to_host(a), to_host(c))


def test_array_module_and_moves(xp):
    x = xp.arange(3.0)
    assert get_array_module(np.ones(1), x) is xp
    assert isinstance(to_host(x), np.ndarray)
    assert isinstance(to_device(x, "cpu"), np.ndarray)
    with pytest.raises(ValueError, match="unknown device"):
        to_device(x, "tpu")


def test_cuda_without_cupy_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_cupy_or_none", lambda: None)
    with pytest.raises(GPUUnavailable, match="pip install cupy"):
        to_device(np.ones(2), "cuda")
