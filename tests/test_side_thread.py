"""pretrain.side_thread: a function run beside the caller, with torch's CPU threads split between them."""

import threading
import time

import pytest
import torch

from pretrain.side_thread import SideThread


@pytest.fixture
def two_threads():
    """torch at 2 CPU threads for the test (1 caller + 1 side while a SideThread is open), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_function_runs_while_the_body_runs(two_threads):
    side_started, body_ran = threading.Event(), threading.Event()

    def fn(x):
        side_started.set()
        assert body_ran.wait(5), "the body never ran while fn was running"
        return x + 1

    with SideThread() as side:
        with side.alongside(fn, 41) as future:
            assert side_started.wait(5), "fn did not start while the body ran"
            body_ran.set()
        assert future.done() and future.result() == 42  # the block waited for fn


def test_the_threads_are_split_while_open_and_given_back_on_close(two_threads):
    side = SideThread()
    assert torch.get_num_threads() == 1  # the caller's half
    with side.alongside(torch.get_num_threads) as future:
        pass
    assert future.result() == 1  # the side thread's half
    side.close()
    assert torch.get_num_threads() == 2
    side.close()  # idempotent
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="closed"), side.alongside(print):
        pass


def test_an_odd_count_gives_the_caller_the_larger_half(two_threads):
    torch.set_num_threads(3)
    with SideThread() as side:
        assert torch.get_num_threads() == 2
        with side.alongside(torch.get_num_threads) as future:
            pass
        assert future.result() == 1  # set by the side thread itself, not inherited from the caller's 2
    assert torch.get_num_threads() == 3


def test_the_threads_come_back_when_the_block_raises(two_threads):
    with pytest.raises(KeyError), SideThread():
        raise KeyError("boom")
    assert torch.get_num_threads() == 2


def test_the_side_functions_error_is_raised_on_leaving_the_block(two_threads):
    def fail():
        raise ValueError("bad input on the side thread")

    with SideThread() as side, pytest.raises(ValueError, match="side thread"), side.alongside(fail):
        pass


def test_the_block_waits_for_the_function_even_when_the_body_raises(two_threads):
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)

    with SideThread() as side:
        with pytest.raises(KeyError), side.alongside(slow):
            raise KeyError("the body failed")
        assert finished == [True]  # slow() did not run on past the block


def test_grad_and_inference_modes_and_cpu_autocast_carry_to_the_side_thread(two_threads):
    x, w = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)

    def state():
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
                torch.is_autocast_cache_enabled(), (x @ w).dtype)

    with SideThread() as side:
        with (torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False),
              side.alongside(state) as future):
            pass
        assert future.result() == (False, False, True, False, torch.bfloat16)
        with torch.inference_mode(), side.alongside(state) as future:
            pass
        assert future.result() == (False, True, False, True, torch.float32)
        with side.alongside(state) as future:
            pass
        assert future.result() == (True, False, False, True, torch.float32)


def test_useful_only_on_a_cpu_with_two_threads(two_threads):
    assert SideThread.useful("cpu")
    assert not SideThread.useful("cuda")
    torch.set_num_threads(1)
    assert not SideThread.useful("cpu")
