"""Open the model of a worker process: one rank, or N tensor-parallel ranks started and watched from here.

The Celery model process is rank 0: it alone claims batches and talks to Postgres, the broker and S3.
For NEXUSGEN_TP_SIZE > 1 it starts ranks 1..N-1 itself (`python -m worker.ranks`, after the prefork
fork, no launcher needed), each loading only its shard, and drives them through `model.distributed`.
A rank that dies, hangs or fails alone ends the whole worker with a log line naming it and a non-zero
exit; its jobs come back through their leases. Before loading, each rank logs its memory plan and, on
CUDA, refuses to start when the plan does not fit in the device's free memory.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from core.device_memory import publish_device_memory
from core.settings import Settings
from model.distributed import (
    Lockstep,
    RankFailure,
    bound_collectives,
    device_memory,
    follow,
    init_tensor_parallel,
)
from model.pipeline import NexusGen, parse_dtype

log = logging.getLogger(__name__)

PLAN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
EXIT_RANK_FAILED = 3
LOAD_TIMEOUT_S = 1800.0  # the real stack takes minutes to load; a rank silent longer than this is lost


class PlanDoesNotFit(RuntimeError):
    """The memory plan exceeds a device's free memory: the worker refuses to start."""


def rank_devices(settings: Settings) -> list[str]:
    """The device of each rank: the listed ones, or rank r on `cuda:r` / the CPU for a lone entry."""
    world, listed = settings.tp_world, list(settings.devices)
    if len(listed) == world:
        return listed
    (only,) = listed
    if only == "cuda":
        return [f"cuda:{r}" for r in range(world)]
    return [only] * world


def check_plan(settings: Settings, rank: int, device: str) -> None:
    """Log this rank's memory plan; on CUDA raise when it exceeds the device's free memory."""
    from model.plan import checkpoint_tensors, format_plan, make_plan

    assert settings.model_dir is not None
    plan = make_plan(
        checkpoint_tensors(settings.model_dir),
        settings.tasks,
        tp=settings.tp_world,
        dtype=PLAN_DTYPES[parse_dtype(settings.dtype, device)],
        fp8_dit=settings.dit_precision == "fp8",
        resident_text_encoders=settings.resident_text_encoders,
        devices=rank_devices(settings),
        edit_decoders=settings.edit_decoders,
        source=settings.model_dir,
    )
    if rank == 0:
        log.info("%s", format_plan(plan))
    if torch.device(device).type != "cuda" or settings.offload != "none":
        return  # (offloaded modules visit the device one at a time: the plan is an upper bound)
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    # text encoders kept in host memory visit the device for a call: leave room for the largest
    need = plan.devices[rank].total_bytes + max(plan.host_components.values(), default=0)
    if need > free:
        raise PlanDoesNotFit(
            f"the memory plan needs {need / 2**30:.1f} GiB on {device} but only {free / 2**30:.1f} GiB are "
            "free; serve fewer tasks (NEXUSGEN_TASKS), add devices (NEXUSGEN_TP_SIZE) or use fp8 DiTs"
        )


def build_model(settings: Settings, device: str, rank: int = 0) -> NexusGen:
    """Check the plan, then load what this worker's tasks need on `device` (this rank's shard only)."""
    if not settings.model_dir:
        raise RuntimeError("not configured: NEXUSGEN_MODEL_DIR")
    check_plan(settings, rank, device)
    model = NexusGen.from_pretrained(
        settings.model_dir,
        device=device,
        dtype=settings.dtype,
        engine=settings.engine,
        prefix_mode=settings.prefix_mode,
        tasks=settings.tasks,
        edit_decoders=settings.edit_decoders,
        resident_text_encoders=settings.resident_text_encoders,
        compile=settings.compile,
        dit_precision=settings.dit_precision,
        offload=settings.offload,
    )
    if settings.tp_world > 1:
        bound_collectives(settings.tp_timeout_s)
    return model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def exit_worker(message: str) -> None:
    """End the whole Celery worker, non-zero: log why, stop the parent (cold shutdown), leave now."""
    log.critical("%s; the worker exits (its jobs come back when their leases expire)", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    from billiard.process import current_process

    if getattr(current_process(), "index", None) is not None:  # a prefork child: stop the main process
        os.kill(os.getppid(), signal.SIGQUIT)  # celery's cold shutdown, exit status EX_FAILURE
    os._exit(EXIT_RANK_FAILED)


class Ranks:
    """Ranks 1..N-1 of this worker: their processes and control connections, watched by a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.world = settings, settings.tp_world
        self.devices = rank_devices(settings)
        self.port = _free_port()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.connections: list[Connection] = []
        self._closing = False
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        for rank in range(1, self.world):
            ours, theirs = multiprocessing.Pipe(duplex=True)
            argv = [sys.executable, "-m", "worker.ranks", str(rank), str(self.port), str(theirs.fileno())]
            self.procs[rank] = subprocess.Popen(argv, env=env, pass_fds=[theirs.fileno()])
            theirs.close()
            self.connections.append(ours)
        log.info(
            "started tensor-parallel ranks %s (pids %s)",
            list(self.procs),
            [p.pid for p in self.procs.values()],
        )

    def diagnose(self) -> RankFailure | None:
        """The first rank whose process ended, with how it ended."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                return RankFailure(rank, f"process {proc.pid} {how}")
        return None

    def _receive(self, expected: str, doing: str) -> list[Any]:
        """One message from every rank, `expected` first; a rank that dies or is silent fails."""
        deadline = time.monotonic() + max(LOAD_TIMEOUT_S, self.settings.tp_timeout_s)
        messages = []
        for rank, conn in enumerate(self.connections, start=1):
            while not conn.poll(1.0):
                if (failure := self.diagnose()) is not None:
                    raise failure
                if time.monotonic() > deadline:
                    raise RankFailure(rank, f"did not finish {doing}")
            message = conn.recv()
            if message[0] != expected:
                raise RankFailure(rank, f"failed {doing}: {message[1]}")
            messages.append(message)
        return messages

    def wait_joining(self) -> None:
        """Wait until every rank has started (imports take a while) and is about to join the group.

        The group's rendezvous has NEXUSGEN_TP_TIMEOUT_S like every collective; starting it only when
        all ranks are there keeps a slow interpreter start from counting as a lost rank.
        """
        self._receive("joining", "starting")

    def wait_ready(self) -> None:
        """Wait until every rank loaded its shard (each reports ("ready", resident bytes))."""
        for rank, message in enumerate(self._receive("ready", "loading"), start=1):
            log.info(
                "rank %d loaded its shard on %s: %s bytes by component", rank, self.devices[rank], message[1]
            )

    def watch(self) -> None:
        """A thread that ends the worker as soon as a rank process dies, busy or idle."""

        def loop() -> None:
            while not self._closing:
                failure = self.diagnose()
                if failure is not None and not self._closing:
                    self.fail(failure)
                time.sleep(0.5)

        threading.Thread(target=loop, name="nexusgen-ranks", daemon=True).start()

    def fail(self, failure: BaseException) -> None:
        self._closing = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        exit_worker(f"tensor parallelism failed: {failure}")


def report_memory(settings: Settings, model: Any, interval_s: float = 15.0) -> None:
    """Publish every device's memory (this rank's and, under TP, the others') for /metrics, periodically."""
    if model.device.type != "cuda":
        return  # a CPU worker has no accelerator memory to report
    worker = f"{socket.gethostname()}/{os.getpid()}"  # the lease holder's id (NexusGenCelery.worker_id)

    def loop() -> None:
        while True:
            devices = [device_memory(model.device, 0)]
            devices += [m for _, m in sorted(getattr(model, "memory", {}).items())]
            publish_device_memory(settings, worker, [d for d in devices if d is not None])
            time.sleep(interval_s)

    threading.Thread(target=loop, name="nexusgen-device-memory", daemon=True).start()


def open_model(settings: Settings, device: str) -> Any:
    """This process's model: a NexusGen, or rank 0's Lockstep over all ranks when NEXUSGEN_TP_SIZE > 1."""
    model = _open_model(settings, device)
    report_memory(settings, model)
    return model


def _open_model(settings: Settings, device: str) -> Any:
    from model.plan import resident_bytes

    if settings.tp_world == 1:
        try:
            return build_model(settings, device)
        except PlanDoesNotFit as exc:
            exit_worker(str(exc))
            raise
    ranks = Ranks(settings)
    try:
        ranks.wait_joining()
        init_tensor_parallel(0, ranks.world, ranks.port, ranks.devices[0], settings.tp_timeout_s)
        model = build_model(settings, ranks.devices[0], rank=0)
        ranks.wait_ready()
    except Exception as exc:  # noqa: BLE001 - ranks.fail ends the worker, with the other ranks' diagnosis if any
        ranks.fail(ranks.diagnose() or exc)
    log.info(
        "rank 0 loaded its shard on %s: %s bytes by component",
        ranks.devices[0],
        resident_bytes(model.components),
    )
    ranks.watch()
    lockstep = Lockstep(model, ranks.connections, settings.tp_timeout_s, ranks.diagnose)
    return GuardedLockstep(lockstep, ranks)


class GuardedLockstep:
    """Rank 0's model: a RankFailure during a call ends the worker instead of failing the jobs."""

    def __init__(self, lockstep: Lockstep, ranks: Ranks) -> None:
        self.lockstep, self.ranks = lockstep, ranks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lockstep, name)

    def _guarded(self, method: str, requests: Any, progress: Any, should_cancel: Any) -> list[Any]:
        try:
            return self.lockstep.call(method, requests, progress, should_cancel)
        except RankFailure as failure:
            self.ranks.fail(failure)
            raise  # not reached: fail() ends the process

    def generate(self, requests: Any, progress: Any = None, should_cancel: Any = None) -> list[Any]:
        return self._guarded("generate", requests, progress, should_cancel)

    def edit(self, requests: Any, progress: Any = None, should_cancel: Any = None) -> list[Any]:
        return self._guarded("edit", requests, progress, should_cancel)

    def understand(self, requests: Any, progress: Any = None, should_cancel: Any = None) -> list[Any]:
        return self._guarded("understand", requests, progress, should_cancel)


def rank_main(rank: int, port: int, fd: int) -> int:
    """A rank other than 0: join the group, load this rank's shard, then follow rank 0's calls."""
    from model.plan import resident_bytes

    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
    )
    conn = Connection(fd)
    device = rank_devices(settings)[rank]
    conn.send(("joining",))
    try:
        init_tensor_parallel(rank, settings.tp_world, port, device, settings.tp_timeout_s)
        model = build_model(settings, device, rank=rank)
    except Exception as exc:
        log.exception("rank %d failed to load", rank)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(("ready", resident_bytes(model.components)))
    follow(model, conn, rank)
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker.ranks", description=rank_main.__doc__)
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("fd", type=int, help="this rank's end of the control connection (inherited)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    sys.exit(rank_main(args.rank, args.port, args.fd))
