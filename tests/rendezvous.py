"""The store and environment of a test's distributed launch, as torchrun gives them to its ranks."""

import torch.distributed as dist


def rank_env(store, rank: int, world: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world`` whose agent hosts ``store``.

    The ranks join ``store`` as clients (``TORCHELASTIC_USE_AGENT_STORE``), as under torchrun: its
    port was bound once, here, and is never released and picked again, so the world of another
    test process cannot take it in between.
    """
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}


def agent_store():
    """A TCPStore server on a port the kernel picks, held by this process as torchrun's agent holds it."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
