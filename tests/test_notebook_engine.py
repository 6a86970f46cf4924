"""The papermill engine's kernel channel finds a message whose wake-up was missed."""

import asyncio
import time
from queue import Empty

import pytest

zmq = pytest.importorskip("zmq")
pytest.importorskip("papermill")

import zmq.asyncio  # noqa: E402
from jupyter_client.channels import AsyncZMQSocketChannel  # noqa: E402
from jupyter_client.session import Session  # noqa: E402

from saelib.notebook_engine import SLICE_S, SlicedChannel  # noqa: E402


async def _reply_after_a_missed_wake_up(channel_class, wait_s: float):
    """A kernel's reply reaches the client's socket while its poll waits, and another reader of the
    socket's events takes the edge-triggered notification the poll waits for: the state papermill's
    client was found in when it hung (the reply in its socket, its poll asleep). Returns the message,
    or None when ``wait_s`` seconds pass without it."""
    ctx = zmq.asyncio.Context()
    client = ctx.socket(zmq.DEALER)
    kernel = zmq.Context.instance().socket(zmq.DEALER)
    try:
        kernel.connect(f"tcp://127.0.0.1:{client.bind_to_random_port('tcp://127.0.0.1')}")
        session = Session(key=b"")
        waiting = asyncio.ensure_future(channel_class(client, session).get_msg())
        await asyncio.sleep(0.2)  # the poll waits on the socket
        session.send(kernel, "execute_reply", {"status": "ok"})
        other = zmq.Socket.shadow(client.underlying)
        deadline = time.monotonic() + 10
        while not other.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the loop does not run meanwhile
            assert time.monotonic() < deadline, "the reply never reached the client's socket"
            time.sleep(0.01)
        try:
            return await asyncio.wait_for(waiting, wait_s)
        except asyncio.TimeoutError:
            return None
    finally:
        client.close(0)
        kernel.close(0)
        ctx.term()


def test_the_sliced_channel_finds_a_reply_whose_wake_up_was_missed():
    if asyncio.run(_reply_after_a_missed_wake_up(AsyncZMQSocketChannel, 2.0)) is not None:
        pytest.skip("jupyter_client's own channel now finds this reply: the engine's slices are not needed for it")
    start = time.monotonic()
    msg = asyncio.run(_reply_after_a_missed_wake_up(SlicedChannel, 3 * SLICE_S))
    assert msg is not None and msg["msg_type"] == "execute_reply"
    assert time.monotonic() - start < 0.2 + 3 * SLICE_S


def test_the_sliced_channel_keeps_the_timeout():
    """``get_msg(timeout)`` still ends in ``Empty`` after about ``timeout`` seconds, shorter or longer
    than a slice, when nothing comes."""
    async def empty_after(timeout):
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.bind_to_random_port("tcp://127.0.0.1")
        try:
            start = time.monotonic()
            with pytest.raises(Empty):
                await SlicedChannel(sock, Session(key=b"")).get_msg(timeout)
            return time.monotonic() - start
        finally:
            sock.close(0)
            ctx.term()

    assert asyncio.run(empty_after(0)) < 0.1
    assert 0.25 <= asyncio.run(empty_after(0.3)) < 0.3 + SLICE_S
    assert 1.45 <= asyncio.run(empty_after(1.5)) < 1.5 + SLICE_S


def test_the_engine_hands_papermill_a_kernel_manager_that_encrypts_and_whose_clients_use_the_sliced_channel():
    from papermill.engines import papermill_engines

    from saelib.notebook_engine import Engine, KernelClient, KernelManager

    assert papermill_engines.get_engine("saelib") is Engine  # the entry point `--engine saelib` finds
    manager = KernelManager()
    assert manager.transport_encryption == ("auto" if zmq.has("curve") else "disabled")
    client = manager.client()
    assert isinstance(client, KernelClient)
    assert all(getattr(client, f"{name}_channel_class") is SlicedChannel for name in ("shell", "iopub", "stdin", "control"))
