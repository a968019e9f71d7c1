"""Several trainer workers, one cloud segment: ``torch.distributed`` underneath.

Why an existing engine: keeping replicas of a model in step, starting workers on one or
many machines, and restarting them when one dies is what ``torch.distributed`` (gloo on
CPU, NCCL on GPU) and its elastic launcher (``torchrun``) do. hiertrain adds only what
its stream needs:

* **Batches arrive unevenly.** The broker spreads activation messages over the workers
  (MQTT 5 shared subscription ``$share/<group>/hiertrain/<run>/+/act``), so at any moment
  some workers hold a batch and others do not. Workers therefore step in lock-step
  *ticks*: each tick all-reduces how many samples each worker has (a few bytes); when
  nobody has one the tick ends there, otherwise every worker all-reduces its gradient
  weighted by its sample count (zeros from a worker without a batch) and every worker
  applies the same averaged gradient. The replicas stay identical by construction (same
  start, same update), which DDP's Join would also give, but without a fixed end of
  input: the stream has none. BatchNorm running statistics are averaged the same way.
  One step then trains up to ``world`` batches: with N busy workers the effective batch
  is N times the edge's.
* **Exactly once across workers.** A resend can reach another worker than the original.
  Claims go to the group's store (the ``TCPStore`` that ``torch.distributed`` already
  runs): the first worker to ``add`` a ``(device, seq)`` key trains it, the others
  count a duplicate. What each worker trained is gathered every few ticks into every
  worker's ledger, so the leader's done rule, checkpoints and acks see the union.
* **A worker dies.** The collective fails on the others; the elastic launcher
  (``cloud-trainer --workers N``, or ``torchrun`` for several machines) restarts the
  group, which resumes from the leader's last checkpoint (the same for every worker).
  Batches trained after that checkpoint were never acked, so the edges resend them and
  they are trained again, once, into the restored model.

The leader (rank 0) alone evaluates, answers inference, checkpoints, publishes acks and
the cloud's status, and writes the run's files; every worker trains.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.core.errors import HiertrainError

log = logging.getLogger(__name__)

SHARE_GROUP_PREFIX = "hiertrain-"


@dataclass(frozen=True)
class GroupEnv:
    """The torchrun-style environment a worker was started with."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> GroupEnv | None:
        """The group this process belongs to (``RANK``/``WORLD_SIZE``), None when alone."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise HiertrainError("WORLD_SIZE/RANK/LOCAL_RANK must be integers") from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise HiertrainError(f"RANK {rank} is outside 0..{world - 1}")
        return cls(rank, world, local)


def _launcher_store(env: GroupEnv, timeout: datetime.timedelta) -> Any:
    """The key-value store of the group's launcher (``MASTER_ADDR:MASTER_PORT``): the agent
    hosts it under torchrun and ``--workers``; otherwise rank 0 does."""
    import torch.distributed as dist

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        port = int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise HiertrainError("a group of workers needs MASTER_ADDR and MASTER_PORT (torchrun "
                             "or cloud-trainer --workers set them)") from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(host, port, world_size=None, is_master=env.rank == 0 and not agent,
                         timeout=timeout, wait_for_workers=False)


def check_group_options(mode: str, amp: str, fleet_average: bool = False) -> None:
    """What a group of workers cannot do yet, refused before any worker starts."""
    if fleet_average:
        raise HiertrainError("--fleet-average runs on one trainer worker (the rounds are the "
                             "leader's and not shared yet); drop --workers or --fleet-average")
    if mode != "ht":
        raise HiertrainError(f"several trainer workers train --mode ht only, not --mode {mode}")
    if amp == "fp16":
        raise HiertrainError("several trainer workers: use --amp bf16 or off (fp16's loss "
                             "scaler is per worker)")


def share_filter(run_id: str, topic_filter: str) -> str:
    """``topic_filter`` as an MQTT 5 shared subscription of the run's trainer workers."""
    return f"$share/{SHARE_GROUP_PREFIX}{run_id}/{topic_filter}"


class Group:
    """One worker's membership: claims, lock-step ticks and averaged steps."""

    def __init__(self, env: GroupEnv, *, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        self.env = env
        self.rank, self.world = env.rank, env.world
        self.is_leader = env.rank == 0
        self.generation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            # Everything of this incarnation of the group under its own prefix: the
            # launcher's store outlives a restart, and gloo's keys of the dead group
            # (its peers' addresses) would otherwise make the new one wait for them.
            self.store = dist.PrefixStore(f"hiertrain/{self.generation}/", _launcher_store(
                env, timeout))
            dist.init_process_group("gloo", store=self.store, rank=env.rank,
                                    world_size=env.world, timeout=timeout)
        else:
            self.store = dist.distributed_c10d._get_default_store()
        self._dist = dist
        self.claims = 0
        self.lost_claims = 0

    # ------------------------------------------------------------------ claims
    def _key(self, device: str, seq: int) -> str:
        # Claims belong to one incarnation of the group: after a restart the resumed ledger
        # decides, and the claims of the dead group (batches never checkpointed) must not
        # turn away their resends (the launcher's store outlives its workers).
        return f"claim/{device}/{seq}"

    def claim(self, device: str, seq: int) -> bool:
        """True for the first worker of the group to claim ``(device, seq)``."""
        first = self.store.add(self._key(device, seq), 1) == 1
        if first:
            self.claims += 1
        else:
            self.lost_claims += 1
        return first

    def release(self, device: str, seq: int) -> None:
        """Undo a claim whose batch was not trained (shutdown), so a resend is accepted."""
        self.store.delete_key(self._key(device, seq))

    # ------------------------------------------------------------------ ticks
    def agree(self, samples: int, flag: int, last_message: float) -> tuple[int, int, float]:
        """(samples over the group, the largest flag, the latest message time)."""
        dist = self._dist
        counts = torch.tensor([float(samples), float(flag)], dtype=torch.float64)
        dist.all_reduce(counts[:1], op=dist.ReduceOp.SUM)
        rest = torch.tensor([float(flag), last_message], dtype=torch.float64)
        dist.all_reduce(rest, op=dist.ReduceOp.MAX)
        return int(counts[0]), int(rest[0]), float(rest[1])

    def averaged_step(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                      samples: int, total: int,
                      set_lr: Callable[[float], None] | None = None,
                      lr_factor: float = 1.0) -> None:
        """Average gradients and running statistics by sample count, then step everywhere.

        A worker without a batch (``samples`` 0) contributes zeros; every worker then
        holds the same gradient and applies the same update, at the same learning rate:
        the sample-weighted mean of the workers' ``lr_factor`` (each batch's point of its
        edge's schedule, ``toolkit.core.lr_schedule``), handed to ``set_lr``.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        floats = [b for b in module.buffers() if b.is_floating_point()]
        counters = [b for b in module.buffers() if not b.is_floating_point()]
        w = float(samples)
        pieces = []
        for p in params:
            g = p.grad if p.grad is not None and samples else torch.zeros_like(p)
            pieces.append((g.detach() * w).flatten())
        for b in floats:
            pieces.append((b.detach() * w).flatten())
        ref = pieces[0] if pieces else torch.zeros(0)
        # last: the group's learning-rate factor, summed with the same weights
        pieces.append(torch.full((1,), lr_factor * w, dtype=ref.dtype, device=ref.device))
        flat = torch.cat(pieces)
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        flat /= float(total)
        if set_lr is not None:
            set_lr(float(flat[-1]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        with torch.no_grad():
            for b in floats:
                n = b.numel()
                b.copy_(flat[offset:offset + n].view_as(b))
                offset += n
        if counters:  # num_batches_tracked: the furthest any worker got
            ints = torch.cat([c.detach().flatten().to(torch.int64) for c in counters])
            self._dist.all_reduce(ints, op=self._dist.ReduceOp.MAX)
            offset = 0
            with torch.no_grad():
                for c in counters:
                    n = c.numel()
                    c.copy_(ints[offset:offset + n].view_as(c))
                    offset += n
        optimizer.step()

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's ``obj`` (picklable, small), on every worker."""
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def checksum(self, module: nn.Module) -> float:
        """A number that differs when the replicas do (tests, and a log line per checkpoint)."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in module.state_dict().values()
                             if p.is_floating_point()))

    def close(self) -> None:
        if self._dist.is_initialized():
            try:
                self._dist.barrier()
            except RuntimeError as exc:  # a peer is gone already: nothing to wait for
                log.debug("no final barrier: %s", exc)
            self._dist.destroy_process_group()
