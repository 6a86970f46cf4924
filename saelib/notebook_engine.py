"""The papermill engine the notebooks run with: ``papermill --engine saelib NB OUT -p preset demo``.

It is papermill's own engine (nbclient) with two changes:

- its kernel client never waits more than a second on a socket before looking at it again.
  papermill's client waits for a cell's reply through pyzmq's asyncio poll, with no time limit unless
  ``--execution-timeout`` sets one, and that poll can miss its wake-up (the socket's edge-triggered
  notification goes unseen). The kernel has sent the reply and gone idle; the client waits until its
  poll times out, for ever without a limit.
- the kernel's messages are encrypted (CurveZMQ keys provisioned by the kernel manager) where pyzmq
  supports it, as its wheels do; ipykernel warns at every start of a kernel reached over plain TCP.

``make demo``, ``make figures`` and ``make lesson`` use this engine, and the package registers it
under papermill's ``papermill.engine`` entry point as ``saelib``.
"""

from __future__ import annotations

import time
from queue import Empty

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from papermill.engines import NBClientEngine
from traitlets import Type, default

SLICE_S = 1.0  # the longest one poll of a socket waits; a missed wake-up costs at most this


class SlicedChannel(AsyncZMQSocketChannel):
    """A kernel channel whose ``get_msg`` polls its socket in slices of at most ``SLICE_S`` seconds.
    A poll that ends reads the socket's state afresh, so a message whose wake-up was missed is found
    at the end of the slice instead of at the end of the whole wait."""

    async def get_msg(self, timeout: float | None = None) -> dict:
        """The next message; ``Empty`` when none came within ``timeout`` seconds (None: wait for one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = SLICE_S if deadline is None else min(SLICE_S, max(0.0, deadline - time.monotonic()))
            if await self.socket.poll(round(wait * 1000)):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class KernelClient(AsyncKernelClient):
    """jupyter_client's asynchronous kernel client, with ``SlicedChannel`` for its message channels."""

    shell_channel_class = Type(SlicedChannel)
    iopub_channel_class = Type(SlicedChannel)
    stdin_channel_class = Type(SlicedChannel)
    control_channel_class = Type(SlicedChannel)


class KernelManager(AsyncKernelManager):
    """jupyter_client's asynchronous kernel manager, handing out ``KernelClient``s and encrypting the
    kernel's messages where it can."""

    client_factory = Type(KernelClient, klass=AsyncKernelClient)  # what `client()` builds

    @default("transport_encryption")
    def _encrypt_where_possible(self) -> str:
        """CurveZMQ for the kernel's sockets where pyzmq has it (when the kernel declares support)."""
        return "auto" if zmq.has("curve") else "disabled"


class Engine(NBClientEngine):
    """papermill's nbclient engine with ``KernelManager``: ``papermill --engine saelib``."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        return super().execute_managed_notebook(nb_man, kernel_name, kernel_manager_class=KernelManager, **kwargs)
