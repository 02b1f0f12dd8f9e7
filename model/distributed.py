"""Tensor-parallel ranks in lockstep: rank 0 sends every model call to the other ranks, all run it together.

Rank 0 (`Lockstep`) has the `NexusGen` API. Each call goes to every other rank (`follow`) over a control
connection: the method and its requests, input images and seeds included (rank 0 draws missing seeds),
so every rank runs the same batched call and meets the same all-reduces. Per-step decisions (drop a
canceled request) are rank 0's and broadcast over a CPU (gloo) group, so ranks cannot diverge. Results
stay on rank 0; the other ranks report only success or their error. A rank that dies, hangs or answers
differently ends in `RankFailure`, within the process group's timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch

log = logging.getLogger(__name__)

CALLS = ("generate", "edit", "understand")
_control_group: Any = None  # gloo group for rank 0's decisions (works beside an NCCL default group)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung or failed differently from rank 0: the ranks cannot go on."""

    def __init__(self, rank: int, cause: str) -> None:
        super().__init__(f"tensor-parallel rank {rank}: {cause}")
        self.rank, self.cause = rank, cause


def init_tensor_parallel(rank: int, world: int, port: int, device: str, timeout_s: float) -> None:
    """Join the process group of `world` ranks on 127.0.0.1:`port` (gloo on CPU, NCCL on CUDA).

    Every collective then fails after `timeout_s` instead of waiting forever for a lost rank.
    """
    import torch.distributed as tdist

    global _control_group
    dev = torch.device(device)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(dev.index if dev.index is not None else rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if dev.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op raises
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    tdist.init_process_group(
        backend=backend, init_method="env://", timeout=timeout, rank=rank, world_size=world
    )
    _control_group = (
        tdist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else tdist.group.WORLD
    )


def bound_collectives(timeout_s: float) -> None:
    """Give every process group the timeout, also those DeepSpeed created while sharding the model.

    `new_group` defaults to 30 minutes (gloo) whatever the world's timeout; a hung rank would hold
    the others that long. There is no public setter, hence torch's `_set_pg_timeout`.
    """
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def shared_decision(decide: Callable[[int], bool] | None, leader: bool) -> Callable[[int], bool]:
    """A `should_cancel` that every rank calls at the same points: rank 0's answer, broadcast."""
    import torch.distributed as tdist

    def shared(index: int) -> bool:
        flag = torch.tensor([int(bool(leader and decide is not None and decide(index)))], dtype=torch.int32)
        tdist.broadcast(flag, src=0, group=_control_group)
        return bool(flag.item())

    return shared


def device_memory(device: str | torch.device, rank: int = 0) -> dict[str, Any] | None:
    """Allocated, peak and total bytes of a CUDA device (None for the CPU: nothing to report)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return {
        "device": str(dev),
        "rank": rank,
        "allocated_bytes": torch.cuda.memory_allocated(dev),
        "peak_bytes": torch.cuda.max_memory_allocated(dev),
        "total_bytes": torch.cuda.get_device_properties(dev).total_memory,
    }


def _with_seeds(requests: Sequence[Any]) -> list[Any]:
    """Requests with their random seeds drawn here, once, so that every rank uses the same noise."""
    out = []
    for req in requests:
        if getattr(req, "seed", 0) is None:
            req = dataclasses.replace(req, seed=secrets.randbelow(2**32))
        out.append(req)
    return out


def _error_kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Lockstep:
    """Rank 0 of a tensor-parallel stack: `generate` / `edit` / `understand` run on every rank at once.

    `connections[r - 1]` reaches rank r. `diagnose()` names the ranks that died (from their processes);
    `timeout_s` bounds how long a rank may take to report after rank 0 finished its own part.
    """

    def __init__(
        self,
        model: Any,
        connections: Sequence[Connection],
        timeout_s: float,
        diagnose: Callable[[], RankFailure | None] = lambda: None,
    ) -> None:
        self.model, self.connections, self.timeout_s, self.diagnose = (
            model,
            list(connections),
            timeout_s,
            diagnose,
        )
        self.memory: dict[int, dict[str, Any]] = {}  # the other ranks' device memory, as of their last call

    def __getattr__(self, name: str) -> Any:  # device, loaded, checkpoint_hash, ... of rank 0's stack
        return getattr(self.model, name)

    def generate(self, requests: Sequence[Any], progress: Any = None, should_cancel: Any = None) -> list[Any]:
        return self.call("generate", requests, progress, should_cancel)

    def edit(self, requests: Sequence[Any], progress: Any = None, should_cancel: Any = None) -> list[Any]:
        return self.call("edit", requests, progress, should_cancel)

    def understand(
        self, requests: Sequence[Any], progress: Any = None, should_cancel: Any = None
    ) -> list[Any]:
        return self.call("understand", requests, progress, should_cancel)

    def call(self, method: str, requests: Sequence[Any], progress: Any, should_cancel: Any) -> list[Any]:
        """Send the call to every rank, run it here, then collect every rank's outcome."""
        requests = _with_seeds(requests)
        for rank, conn in enumerate(self.connections, start=1):
            try:
                conn.send(("call", method, requests))
            except OSError as exc:
                raise self.diagnose() or RankFailure(rank, f"control connection lost ({exc})") from exc
        local: BaseException | None = None
        try:
            results = getattr(self.model, method)(
                requests, progress=progress, should_cancel=shared_decision(should_cancel, leader=True)
            )
        except Exception as exc:  # noqa: BLE001 - judged below, against the other ranks' outcomes
            local = exc
        answers = self._outcomes(local)
        mismatched = [
            (r, a) for r, a in answers.items() if a != (None if local is None else _error_kind(local))
        ]
        if mismatched:
            rank, answer = mismatched[0]
            cause = f"raised {answer}" if answer else "succeeded where rank 0 failed"
            raise RankFailure(
                rank, f"{cause} (rank 0: {'ok' if local is None else _error_kind(local)})"
            ) from local
        if local is not None:
            raise local  # every rank failed alike: an error of this call, not of a rank
        return results

    def _outcomes(self, local: BaseException | None) -> dict[int, str | None]:
        """Each other rank's outcome of the call: None (success) or its error; a silent rank is a failure."""
        answers: dict[int, str | None] = {}
        # after an error here the others are either failing alike right now or stuck: do not wait long
        wait_s = self.timeout_s if local is None else min(self.timeout_s, 5.0)
        for rank, conn in enumerate(self.connections, start=1):
            try:
                ready = conn.poll(wait_s)
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
            if message is None:
                failure = self.diagnose()
                if failure is None:
                    hint = f"; rank 0 saw {_error_kind(local)}" if local is not None else ""
                    failure = RankFailure(rank, f"no answer within {self.timeout_s:g}s (hung){hint}")
                raise failure from local
            answers[rank] = message[1]
            if message[2] is not None:
                self.memory[rank] = message[2]
        return answers

    def close(self) -> None:
        """Tell the other ranks to exit."""
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.send(("stop",))


def follow(model: Any, conn: Connection, rank: int) -> None:
    """The loop of a rank other than 0: run each call rank 0 sends, report the outcome, until told to stop.

    Waiting for the next call has no timeout (the worker may be idle for hours); rank 0 going away closes
    the connection and ends the loop.
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            log.info("rank %d: rank 0 is gone; exiting", rank)
            return
        if message[0] == "stop":
            return
        _, method, requests = message
        outcome: str | None = None
        try:
            getattr(model, method)(requests, progress=None, should_cancel=shared_decision(None, leader=False))
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it for the batch
            outcome = _error_kind(exc)
            log.warning(
                "rank %d: %s failed: %s", rank, method, "".join(traceback.format_exception_only(exc)).strip()
            )
        try:
            conn.send(("done", outcome, device_memory(model.device, rank)))
        except OSError:
            return
