"""Multi-process training of sfg_fast models on TorchRec: sharded tables, data-parallel SFG layers.

Launch with torchrun (``torchrun --nproc_per_node=K -m sfg_fast train --distributed ...``): NCCL on
GPUs, gloo on CPU. The model is built with ``embedding="torchrec"`` so every id-indexed table sits in
an EmbeddingBagCollection; DistributedModelParallel shards those tables (table-wise, column-wise,
row-wise or data-parallel) and wraps the dense SFG encoder/decoder/heads in DDP.

Semantics of one step (what an unsharded reference must do to match it exactly):
- every rank takes its own ``batch_size`` rows of a global batch of ``batch_size * world_size``;
  the loss is the mean BCE over the rank's rows;
- dense parameters: DDP averages their gradients over ranks; sharded tables: TorchRec's backward
  all-to-all delivers the ranks' gradients to each shard divided by the world size (its default
  gradient division), and data-parallel tables are all-reduced like dense parameters. Every
  parameter therefore steps on the gradient of the mean loss over the global batch, as an
  unsharded model trained on that batch would (tests/test_distributed.py checks it to fp32
  tolerance for table-wise, column-wise and data-parallel plans);
- the fused table optimizer (FBGEMM) runs inside backward for sharded tables; data-parallel tables
  (dense kernel) get the same algorithm as a torch optimizer after backward; the dense
  optimizer (Adam, clipped dense gradients) after it.

Checkpoints are directories holding ``manifest.json`` (counters, config, plan) and the
torch.distributed.checkpoint folder it names (each rank writes its own shards, a ``.metadata`` file
indexes them; loading reshards). A save writes a new shards folder and commits by renaming the
manifest over the old one, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import time
import uuid
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import functional as SF
from ._backend import module_backend
from ._io import remove_if_present

__all__ = ["SHARDINGS", "EMBEDDING_OPTIMIZERS", "DIST_DEFAULTS", "init_distributed", "make_sharding_plan",
           "ShardedModel", "shard_model", "distributed_auc", "gather_to_all", "run_distributed_training"]

log = logging.getLogger("sfg_fast.distributed")

SHARDINGS = ("auto", "table_wise", "column_wise", "row_wise", "data_parallel")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")

# Keys of a distributed run on top of sfg_fast.train.TRAIN_DEFAULTS.
DIST_DEFAULTS: Dict[str, Any] = {
    "sharding": "auto",                    # auto: planner-chosen (GPU) / table_wise (CPU)
    "embedding_optimizer": "rowwise_adagrad",
    "embedding_lr": 0.01,
    "embedding_eps": 1e-8,
    "max_steps": None,                     # stop after this many steps (smoke tests, benchmarks)
    "resume": None,                        # a checkpoint directory written by a distributed run
}


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------

def init_distributed(backend: Optional[str] = None) -> Tuple[int, int, torch.device]:
    """Join (or create) the default process group from torchrun's environment.

    Returns ``(rank, world_size, device)``. ``backend=None``: NCCL when CUDA is available (one GPU
    per local rank), else gloo. A group that already exists is reused.
    """
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"environment lacks {missing}: launch with torchrun "
                               f"(torchrun --nproc_per_node=K -m sfg_fast train --distributed ...)")
        # NCCL moves CUDA tensors only: gloo beside it takes the CPU collectives (metadata, gathered logits)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------

def _optimizer_class(name: str):
    import torchrec.optim as trec_optim

    return {"rowwise_adagrad": trec_optim.RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
            "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


def _table_dims(model: nn.Module) -> Dict[str, int]:
    from .integrations.torchrec import torchrec_embeddings

    dims: Dict[str, int] = {}
    for module in torchrec_embeddings(model).values():
        for name in module.table_names:
            if name in dims:
                raise ValueError(f"table name {name!r} appears twice in the model; sharding constraints are "
                                 f"keyed by table name (give the modules distinct table_prefix)")
            dims[name] = module.embedding_dim
    return dims


def make_sharding_plan(model: nn.Module, world_size: int, sharding: str = "auto",
                       device: Optional[torch.device] = None, batch_size: int = 512, sharders=None):
    """A TorchRec ShardingPlan for every EmbeddingBagCollection of ``model``, identical on all ranks.

    ``sharding`` forces one sharding type on every table through ParameterConstraints; "auto"
    leaves the choice to the planner on GPU and means table-wise on CPU (row-wise does not run over
    gloo). Must be called by every rank (rank 0 plans and broadcasts).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu" and sharding == "row_wise":
        raise ValueError("sharding='row_wise' is not supported on CPU/gloo by TorchRec; use table_wise, "
                         "column_wise or data_parallel")
    if sharding == "auto" and device.type == "cpu":
        sharding = "table_wise"
    kinds = None
    if sharding != "auto":
        kinds = [{"table_wise": ShardingType.TABLE_WISE, "column_wise": ShardingType.COLUMN_WISE,
                  "row_wise": ShardingType.ROW_WISE, "data_parallel": ShardingType.DATA_PARALLEL}[sharding].value]
    constraints = None
    if kinds is not None:
        constraints = {name: ParameterConstraints(sharding_types=kinds) for name in _table_dims(model)}
    topology = Topology(world_size=int(world_size), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=int(batch_size), constraints=constraints)
    if dist.is_initialized():
        return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return planner.plan(model, sharders)


@torch.no_grad()
def _copy_into_sharded(target: Dict[str, Any], source: Dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors of ``source`` into the local shards of the state dict ``target``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in target.items():
        if key not in source:
            raise KeyError(f"state dict lacks {key!r}")
        full = source[key]
        if isinstance(value, ShardedTensor):
            if tuple(value.size()) != tuple(full.shape):
                raise ValueError(f"{key}: sharded shape {list(value.size())} != given {list(full.shape)}")
            for shard in value.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                               shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
        elif isinstance(value, torch.Tensor):
            value.copy_(full)


class ShardedModel:
    """A model sharded by DistributedModelParallel with its two optimizers; one object per rank.

    Build it with :func:`shard_model`. ``train_step(ids, labels)`` runs one step on the rank's rows,
    ``predict(ids)`` returns the rank's logits, ``full_state_dict()`` gathers the unsharded state,
    ``save(path)`` / ``load(path)`` checkpoint the sharded state, ``close()`` releases the modules
    and, with ``destroy=True``, the process group (in that order: gloo aborts at exit otherwise).
    """

    def __init__(self, dmp, optimizer, plan, sharding: str, clip_grad_norm: Optional[float] = None,
                 dense_params=None, table_layout: Optional[Dict[str, Dict[str, Any]]] = None):
        self.dmp = dmp
        self.optimizer = optimizer
        self.plan = plan
        self.sharding = sharding
        self.clip_grad_norm = clip_grad_norm
        # the DDP-replicated parameters (not the tables): what clip_grad_norm clips
        self.dense_params = list(dense_params) if dense_params is not None else []
        # per table: how its optimizer state is laid out (see _check_table_layout)
        self.table_layout = dict(table_layout or {})
        self.device = dmp.device
        self.step = 0
        # the global (all ranks) loss sum and row count of the last train_step
        self.last_loss_sum = 0.0
        self.last_rows = 0

    @property
    def module(self) -> nn.Module:
        """The sharded sfg_fast model (DMP and DDP wrappers removed)."""
        from torchrec.distributed.model_parallel import get_unwrapped_module

        return get_unwrapped_module(self.dmp)

    def train_step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step on this rank's rows; returns the rank's mean loss (collective).

        The ranks' losses are all-reduced before backward: ``last_loss_sum / last_rows`` is the mean
        loss over the global batch, and a non-finite loss on ANY rank raises FloatingPointError on
        every rank before any parameter moves (a rank-local raise would leave the others waiting in a
        collective). A non-finite dense gradient norm (``clip_grad_norm``; identical on every rank
        after DDP's all-reduce) raises FloatingPointError too.
        """
        self.dmp.train()
        # before the forward: TorchRec hands the param groups' rates to the fused table kernels only in
        # zero_grad() / step(), and the tables update inside this step's backward; after zero_grad here
        # they use the rate a plateau decay (or a resume's replay of the decays) has just set
        self.optimizer.zero_grad()
        logits = self.dmp(ids.to(self.device, non_blocking=True))
        loss = SF.bce_with_logits(logits, labels.to(self.device, dtype=logits.dtype), reduction="mean",
                                  backend=module_backend("auto", "bce_with_logits"))
        world, rank = dist.get_world_size(), dist.get_rank()
        local = float(loss.detach())
        rows = int(labels.shape[0])
        stats = torch.zeros(2 + world, dtype=torch.float64, device=self.device)
        finite = math.isfinite(local)
        stats[0] = local * rows if finite else 0.0
        stats[1] = rows
        stats[2 + rank] = 0.0 if finite else 1.0
        dist.all_reduce(stats)
        stats = stats.cpu()
        bad = [r for r in range(world) if stats[2 + r] > 0]
        if bad:
            raise FloatingPointError(f"training loss became non-finite at step {self.step + 1} on rank(s) {bad} "
                                     f"(this rank's loss: {local}); stopping every rank. The last checkpoint "
                                     f"is intact; try a lower lr")
        self.last_loss_sum, self.last_rows = float(stats[0]), int(stats[1])
        loss.backward()  # the fused embedding optimizer steps inside backward
        if self.clip_grad_norm is not None and self.dense_params:
            norm = float(torch.nn.utils.clip_grad_norm_(self.dense_params, float(self.clip_grad_norm)))
            if not math.isfinite(norm):  # the same on every rank: DDP averaged the gradients
                raise FloatingPointError(f"dense gradient norm became {norm} at step {self.step + 1}; stopping "
                                         f"every rank. The last checkpoint is intact; try a lower lr")
        self.optimizer.step()
        self.step += 1
        return local

    @torch.no_grad()
    def predict(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's rows (every rank must call it with the same number of rows)."""
        was_training = self.dmp.training
        self.dmp.eval()
        out = self.dmp(ids.to(self.device, non_blocking=True)).float()
        self.dmp.train(was_training)
        return out

    def _state(self) -> Dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optimizer": self.optimizer.state_dict()}

    def full_state_dict(self, dst: Optional[int] = 0) -> Optional[Dict[str, torch.Tensor]]:
        """The unsharded model state (TorchRec keys) on rank ``dst`` (every rank when None); collective."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        rank, device = dist.get_rank(), collective_device()
        out: Dict[str, torch.Tensor] = {}
        for key, value in self.dmp.state_dict().items():
            if isinstance(value, ShardedTensor):
                target = dst if dst is not None else 0
                full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == target else None
                value.gather(dst=target, out=full)
                if dst is None:
                    full = full if full is not None else torch.empty(value.size(), dtype=value.dtype, device=device)
                    dist.broadcast(full, src=0)
                if full is not None:
                    out[key] = full.cpu()
            else:
                out[key] = value.detach().cpu().clone()
        return out if dst is None or rank == dst else None

    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy an unsharded state (TorchRec keys, e.g. of the unsharded model) into the shards."""
        _copy_into_sharded(self.dmp.state_dict(), state)

    def save(self, path: str, manifest: Optional[Dict[str, Any]] = None) -> None:
        """Write the sharded model and optimizer state into the directory ``path`` (collective).

        The shards go to a fresh ``path/shards-<step>-<tag>/`` and only then does rank 0 rename a new
        ``manifest.json`` naming them into place: that rename is the commit. A run killed while
        writing leaves the previous checkpoint (manifest and shards) untouched, never a mix of two
        steps; superseded shard folders are removed after the commit.
        """
        import torch.distributed.checkpoint as dcp

        tag = [f"shards-{self.step:09d}-{uuid.uuid4().hex[:8]}" if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(tag, src=0)  # every rank must write into the same folder
        shards = tag[0]
        dcp.save(self._state(), checkpoint_id=os.path.join(path, shards))
        dist.barrier()  # every rank's shards are on disk before the manifest points at them
        info = {"format": "sfg_fast.distributed/1", "step": self.step, "world_size": dist.get_world_size(),
                "sharding": self.sharding, "plan": str(self.plan), "shards": shards,
                "table_layout": self.table_layout}
        info.update(manifest or {})
        _commit_checkpoint(path, info)
        dist.barrier()

    def load(self, path: str) -> Dict[str, Any]:
        """Restore what :meth:`save` wrote (any plan/world size: DCP reshards); returns the manifest."""
        import torch.distributed.checkpoint as dcp

        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{path!r} is not a distributed sfg_fast checkpoint (no manifest.json)")
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        _check_table_layout(manifest.get("table_layout"), self.table_layout, path)
        # Checkpoints from before the shards sub-folder keep their shards beside the manifest.
        shards = os.path.join(path, manifest["shards"]) if manifest.get("shards") else path
        # DCP loads in place, so the optimizer state must exist (same structure) before loading.
        self.optimizer.init_state()
        state = self._state()
        dcp.load(state, checkpoint_id=shards)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(manifest["step"])
        # FBGEMM's fused Adam corrects its bias by a step counter ("iter") that the optimizer state does not
        # export: without this a resumed table would restart the correction from step 0
        if hasattr(self.optimizer, "set_optimizer_step"):
            self.optimizer.set_optimizer_step(self.step)
        return manifest

    def close(self, destroy: bool = False, barrier: bool = True) -> None:
        """Drop the DMP module and optimizers and collect them, then (optionally) destroy the group.

        ``barrier=False`` destroys the group without first waiting for the other ranks: the path to
        take when leaving by an exception, since another rank may be stuck in a collective this rank
        will never join (a barrier would then hang both for good).
        """
        self.dmp = None
        self.optimizer = None
        self.dense_params = []
        gc.collect()
        if destroy and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def _commit_checkpoint(path: str, info: Dict[str, Any]) -> None:
    """Rank 0: atomically point ``path/manifest.json`` at ``info['shards']``, then drop older shard folders.

    Called on every rank (only rank 0 writes) so that a failure here is seen by all ranks alike.
    """
    if dist.get_rank() != 0:
        return
    from .train import _jsonable, atomic_write_text

    atomic_write_text(json.dumps(_jsonable(info), indent=2), os.path.join(path, "manifest.json"))
    for name in os.listdir(path):
        if name.startswith("shards-") and name != info["shards"]:
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _table_layout(plan, embedding_optimizer: str) -> Dict[str, Dict[str, Any]]:
    """Per table, what decides the layout of its optimizer state in a checkpoint.

    ``kind``: "fused" (FBGEMM's optimizer inside backward, state keyed ``<table>.momentum1`` ...) or
    "data_parallel" (a replicated table stepped by a torch optimizer after backward, state
    ``sum``/``step`` ...): the two cannot be loaded into each other. ``row_state_shards``: how
    many column shards keep their own row-wise Adagrad accumulator (1 unless a column-wise plan
    really splits a rowwise_adagrad table: then each shard holds its own per-row sum).
    """
    layout: Dict[str, Dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            kind = "data_parallel" if ps.sharding_type == "data_parallel" else "fused"
            shards = 1
            if embedding_optimizer == "rowwise_adagrad" and ps.sharding_type in ("column_wise", "table_column_wise") \
                    and ps.sharding_spec is not None:
                shards = len({tuple(m.shard_offsets[1:]) for m in ps.sharding_spec.shards})
            layout[table] = {"kind": kind, "optimizer": embedding_optimizer, "row_state_shards": shards}
    return layout


def _check_table_layout(saved: Optional[Dict[str, Dict[str, Any]]], current: Dict[str, Dict[str, Any]],
                        path: str = "the checkpoint") -> None:
    """Refuse a checkpoint whose tables' optimizer state cannot be loaded into the current plan."""
    if not saved:
        return  # written before the layout was recorded
    problems = []
    for table in sorted(set(saved) | set(current)):
        a, b = saved.get(table), current.get(table)
        if a is None or b is None:
            problems.append(f"table {table!r} is {'missing from the checkpoint' if a is None else 'not in this model'}")
            continue
        if a.get("optimizer") != b.get("optimizer"):
            problems.append(f"table {table!r}: embedding_optimizer {a.get('optimizer')!r} saved, "
                            f"{b.get('optimizer')!r} now")
        elif a.get("kind") != b.get("kind"):
            problems.append(f"table {table!r}: saved as a {a.get('kind')} table, now {b.get('kind')} "
                            f"(a fused table's optimizer state and a data-parallel table's differ in layout)")
        elif int(a.get("row_state_shards", 1)) != int(b.get("row_state_shards", 1)):
            problems.append(f"table {table!r}: row-wise Adagrad state kept per {a.get('row_state_shards')} column "
                            f"shard(s) when saved, {b.get('row_state_shards')} now")
    if problems:
        raise ValueError(f"cannot load {path} under this plan: its optimizer state does not fit: "
                         + "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
                         + ". Load it with the sharding it was saved with (see docs/distributed.md, "
                           "'Evaluation and checkpoints').")


def shard_model(model: nn.Module, device: Optional[torch.device] = None, sharding: str = "auto",
                embedding_optimizer: str = "rowwise_adagrad", embedding_lr: float = 0.01,
                embedding_eps: float = 1e-8, dense_optimizer=None, dense_lr: float = 1e-3,
                batch_size: int = 512, weight_decay: float = 0.0,
                clip_grad_norm: Optional[float] = None) -> ShardedModel:
    """Shard ``model`` (built with ``embedding="torchrec"``) over the default process group.

    The tables get ``embedding_optimizer`` at ``embedding_lr``: FBGEMM's fused one, applied in
    backward, for sharded tables; the same algorithm as a torch optimizer stepping after backward
    for data-parallel tables (TorchRec gives those a dense kernel, outside the fused optimizer).
    Every other parameter gets ``dense_optimizer(params)`` (default
    ``torch.optim.Adam(lr=dense_lr, weight_decay=weight_decay)``); ``clip_grad_norm`` clips the
    gradient norm of those dense parameters before their step. The shards start from ``model``'s
    own weights, so a model built identically on every rank (same seed) shards to the same function
    whatever the plan.
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from .integrations.torchrec import torchrec_embeddings

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (see init_distributed)")
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {embedding_optimizer!r}")
    if not float(embedding_lr) > 0:
        raise ValueError(f"embedding_lr must be positive, got {embedding_lr!r}")
    if not (math.isfinite(float(weight_decay)) and float(weight_decay) >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if clip_grad_norm is not None and not (math.isfinite(float(clip_grad_norm)) and float(clip_grad_norm) > 0):
        raise ValueError(f"clip_grad_norm must be a positive finite number or None, got {clip_grad_norm!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if embedding_optimizer == "adam" and device.type == "cpu":
        raise ValueError("embedding_optimizer='adam' is not available on device cpu: FBGEMM's fused Adam has no "
                         "CPU kernel (TorchRec fails inside DistributedModelParallel); use 'rowwise_adagrad', "
                         "'adagrad' or 'sgd' on CPU, or train on CUDA devices")
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ValueError(f"batch_norm is not supported in distributed training (modules {norms[:3]}): each rank "
                         f"would normalise with the statistics of its own rows only, not the global batch's; "
                         f"build the model with batch_norm=False")
    tables = torchrec_embeddings(model)
    if not tables:
        raise ValueError("model has no TorchRec tables to shard: build it with embedding='torchrec'")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kwargs: Dict[str, Any] = {"lr": float(embedding_lr)}
    if embedding_optimizer in ("rowwise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = float(embedding_eps)
    table_class = _optimizer_class(embedding_optimizer)
    for module in tables.values():  # (TorchRec adds its own keys to the dict it is given: pass copies)
        apply_optimizer_in_backward(table_class, module.ebc.parameters(), dict(kwargs))
    plan = make_sharding_plan(model, dist.get_world_size(), sharding, device, batch_size)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    _copy_into_sharded(dmp.state_dict(), initial)
    if dense_optimizer is None:
        def dense_optimizer(params):
            return torch.optim.Adam(params, lr=float(dense_lr), weight_decay=float(weight_decay))
    # Data-parallel tables get TorchRec's dense kernel: their (replicated, DDP-averaged) weights are
    # plain parameters outside dmp.fused_optimizer, and apply_optimizer_in_backward does not reach
    # them. They get the requested table optimizer here, stepping after backward.
    table_prefixes = tuple(f"{name}.ebc." for name in tables)
    remaining = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dp_tables = {k: v for k, v in remaining.items() if k.startswith(table_prefixes)}
    dense_params = {k: v for k, v in remaining.items() if k not in dp_tables}
    optimizers = [dmp.fused_optimizer]
    if dp_tables:
        optimizers.append(KeyedOptimizerWrapper(dp_tables, lambda params: table_class(params, **kwargs)))
    optimizers.append(KeyedOptimizerWrapper(dense_params, dense_optimizer))
    optimizer = CombinedOptimizer(optimizers)
    return ShardedModel(dmp, optimizer, plan, sharding, clip_grad_norm=clip_grad_norm,
                        dense_params=dense_params.values(), table_layout=_table_layout(plan, embedding_optimizer))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def collective_device() -> torch.device:
    """Where this process group's collectives take their tensors: the CPU where the group has a CPU
    backend (gloo, or init_distributed's "cpu:gloo,cuda:nccl"), else the current CUDA device (an NCCL-only
    group the caller created, which refuses CPU tensors)."""
    devices = dist.BackendConfig(dist.get_backend()).get_device_backend_map()
    if "cpu" in devices or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def gather_to_all(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D ``values`` (lengths may differ) in rank order, on every rank (on the
    CPU)."""
    world, device = dist.get_world_size(), collective_device()
    values = values.detach().reshape(-1).to(device)
    length = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(x) for x in lengths))
    padded = torch.zeros(longest, dtype=values.dtype, device=device)
    padded[:values.numel()] = values
    parts = [torch.empty(longest, dtype=values.dtype, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, lengths)]).cpu()


def distributed_auc(session: ShardedModel, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 16384,
                    name: str = "valid", group_column: Optional[int] = None,
                    group_exclude: Optional[int] = None) -> Dict[str, float]:
    """AUC and logloss over the WHOLE split: rows are dealt to ranks, logits gathered, scored once
    (:func:`sfg_fast.train.logit_metrics`, as a single-process run scores them). With ``group_column`` also
    gAUC grouped by ``ids[:, group_column]`` (``group_exclude``: the field's OOV id, left out).

    Every rank passes the same full ``ids``/``labels``; rank r scores the contiguous block of rows
    ``[r * ceil(n / world_size), (r + 1) * ceil(n / world_size))``. Ranks run the same number of equal-size
    batches (collectives inside the sharded forward must match), padding with row 0 whose logits are dropped.
    """
    from .train import logit_metrics

    rank, world = dist.get_rank(), dist.get_world_size()
    total = ids.shape[0]
    if total == 0:
        raise ValueError(f"the {name} split is empty")
    per_rank = math.ceil(total / world)
    start, stop = rank * per_rank, min(total, (rank + 1) * per_rank)
    local = ids[start:stop]
    chunks = []
    for offset in range(0, per_rank, batch_size):
        rows = local[offset:offset + batch_size]
        size = min(batch_size, per_rank - offset)
        if rows.shape[0] < size:  # pad so every rank runs the same batch shapes
            pad = ids[:1].expand(size - rows.shape[0], -1)
            rows = torch.cat([rows, pad]) if rows.shape[0] else pad.clone()
        chunks.append(session.predict(rows)[:max(0, min(size, stop - start - offset))])
    logits = gather_to_all(torch.cat(chunks) if chunks else torch.empty(0)).double()
    if logits.numel() != total:
        raise RuntimeError(f"gathered {logits.numel()} {name} logits for {total} rows")
    return logit_metrics(logits, labels, ids, name, group_column, group_exclude)


# ----------------------------------------------------------------------------------------------
# Training entry
# ----------------------------------------------------------------------------------------------

def _split_dist_config(config: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    config = dict(config)
    dist_cfg = {k: config.pop(k, v) for k, v in DIST_DEFAULTS.items()}
    if dist_cfg["sharding"] not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {dist_cfg['sharding']!r}")
    if dist_cfg["embedding_optimizer"] not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, "
                         f"got {dist_cfg['embedding_optimizer']!r}")
    if dist_cfg["max_steps"] is not None and int(dist_cfg["max_steps"]) < 1:
        raise ValueError(f"max_steps must be a positive integer or None, got {dist_cfg['max_steps']!r}")
    if config.get("embedding", "torchrec") != "torchrec":
        raise ValueError(f"a distributed run needs embedding='torchrec', got {config['embedding']!r}")
    if config.get("batch_norm"):
        raise ValueError("batch_norm=True is not supported in distributed training: each rank would normalise with "
                         "its own rows' statistics, not the global batch's (set batch_norm: false)")
    config["embedding"] = "torchrec"
    return config, dist_cfg


# Keys a distributed resume may change on top of sfg_fast.train.RESUME_OVERRIDABLE: where to stop
# (max_steps), where from (resume) and the plan (sharding; load() refuses plans whose optimizer
# state does not fit). Everything else (seed, lr, batch_size, model, data, world size ...) must match.
DIST_RESUME_OVERRIDABLE = ("max_steps", "resume", "sharding")


def _check_resume(manifest: Dict[str, Any], config: Dict[str, Any], world: int, fingerprint: str,
                  path: str) -> None:
    """Refuse resuming ``manifest`` with another experiment (config, world size or data)."""
    from .train import RESUME_OVERRIDABLE, _jsonable, absolute_data_paths, check_group_field_change, checkpoint_config

    check_group_field_change(checkpoint_config(manifest), {"group_field": config.get("group_field")})
    skip = set(RESUME_OVERRIDABLE) | set(DIST_RESUME_OVERRIDABLE)
    saved = {k: v for k, v in checkpoint_config(manifest).items() if k not in skip}   # (data paths absolute)
    ours = {k: v for k, v in absolute_data_paths(dict(_jsonable(config))).items() if k not in skip}
    differs = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    if differs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {ours.get(k)!r}" for k in differs[:6])
        raise ValueError(f"cannot resume {path} with a different config ({detail}); only "
                         f"{sorted(skip)} may change")
    if manifest.get("world_size") is not None and int(manifest["world_size"]) != world:
        raise ValueError(f"cannot resume {path} on {world} ranks: it was trained on {manifest['world_size']} "
                         f"(the global batch is batch_size x world size, so the run would not continue the same "
                         f"experiment)")
    saved_fp = manifest.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        raise ValueError(f"cannot resume {path}: the dataset differs from the one it was trained on (same "
                         f"field_dims, other rows or labels); use the same data")


def _read_manifest(path: str) -> Dict[str, Any]:
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{path!r} is not a distributed sfg_fast checkpoint (no manifest.json)")
    with open(manifest_path) as fh:
        return json.load(fh)


def _seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the global RNGs (dropout) from (seed, rank, step): each rank draws its own masks, and a
    resumed run draws exactly the masks the uninterrupted one would have."""
    value = int(np.random.SeedSequence([int(seed) % (2 ** 32), int(rank), int(step)]).generate_state(1)[0])
    torch.manual_seed(value)


def _check_trainer_keys(cfg: Dict[str, Any], device: torch.device) -> None:
    if cfg.get("compile") not in (False, None):
        raise ValueError("compile is not supported by distributed runs yet (the sharded model steps through "
                         "TorchRec's pipeline eagerly); leave it false")
    if cfg.get("amp") not in (False, None):
        raise ValueError("amp is not supported by distributed runs yet (their training step runs without "
                         "autocast); leave it false")
    requested = cfg.get("device", "auto")
    if requested not in (None, "auto"):
        try:
            wanted = torch.device(requested)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'auto' or a torch device, got {requested!r}") from exc
        if wanted.type != device.type:
            raise ValueError(f"device={requested!r} cannot be honoured by a distributed run: its device follows "
                             f"the backend (this run: {device.type}, one GPU per rank under NCCL); use "
                             f"device=auto")


def _check_out_is_free(out: str, resume: Optional[str], overwrite: bool) -> None:
    """Every rank checks the same (shared) directory, so all of them refuse together."""
    if overwrite:
        return
    own = os.path.abspath(os.path.join(out, "checkpoint"))
    if resume and os.path.abspath(resume) in (own, os.path.abspath(out)):
        return                                  # continuing this directory's own run
    held = [name for name in ("results.json", os.path.join("checkpoint", "manifest.json"))
            if os.path.exists(os.path.join(out, name))]
    if held:
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume "
                              f"{own}, replace it with --overwrite, or choose another --out")


def run_distributed_training(config: Dict[str, Any], overwrite: bool = False) -> Dict[str, Any]:
    """Train one model over the torchrun process group; returns the results (same on every rank).

    ``config``: a flat sfg_fast training config (see :func:`sfg_fast.train.resolve_config`) plus
    :data:`DIST_DEFAULTS`. ``batch_size`` is per rank (the global batch is ``batch_size *
    world_size``); ``lr`` is the dense Adam rate (with ``weight_decay``; ``clip_grad_norm`` clips
    the dense gradients), ``embedding_lr`` the table optimizer's. Every rank loads the dataset (rank
    0 first, filling the cache). A checkpoint directory ``<out>/checkpoint`` is written after every
    epoch and when ``max_steps`` stops inside one; ``resume=<dir>`` continues from one exactly (the
    same batches, and the position inside the epoch). Validation AUC is computed over the whole
    split after every epoch (``reduce_lr_on_plateau`` / ``patience`` act on it as in the
    single-process trainer), test AUC at the end, on the final model. A fresh run (or a resume from
    another directory's checkpoint) refuses an ``out`` that holds another run's results.json or
    checkpoint unless ``overwrite``: committing its first checkpoint would delete that run's shards.
    """
    from . import models as model_zoo
    from .train import (TRAIN_DEFAULTS, _check_train_config, _seed_everything, _split_tensors, check_monitor_has_groups,
                        data_fingerprint, default_out_dir, deterministic_algorithms, load_data, monitor_score,
                        resolve_group_field, split_config, versions, atomic_write_text, _jsonable)

    config, dist_cfg = _split_dist_config(config)
    cfg = dict(TRAIN_DEFAULTS, **config)
    cfg["model"] = str(cfg["model"]).lower()
    train_cfg, hparams, _ = split_config(cfg)
    _check_train_config(train_cfg)
    if cfg["threads"] is not None:
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["deterministic"] and torch.cuda.is_available():
        # as the single-process trainer: cuBLAS repeats bit for bit only with a workspace fixed before CUDA
        # starts (init_distributed starts it)
        from . import _cublas
        _cublas.fix_workspace()
    rank, world, device = init_distributed()
    session = None
    failed = True
    # our kernels read the flag (sorted, atomic-free reductions); warn_only: an op without a deterministic
    # kernel (FBGEMM's) warns instead of stopping the run
    modes = contextlib.ExitStack()
    modes.enter_context(deterministic_algorithms(bool(cfg["deterministic"])))
    try:
        _check_trainer_keys(cfg, device)
        if cfg["out"] is None:
            cfg["out"] = default_out_dir(cfg) + "-distributed"
        out = cfg["out"]
        _check_out_is_free(out, dist_cfg["resume"], overwrite)
        if rank == 0:
            data = load_data(cfg)
            dist.barrier()
        else:
            dist.barrier()
            data = load_data(cfg)
        fingerprint = data_fingerprint(data)
        full_config = dict(cfg, **dist_cfg)
        if dist_cfg["resume"]:  # before any model is built: every rank reads the same manifest
            _check_resume(_read_manifest(dist_cfg["resume"]), full_config, world, fingerprint, dist_cfg["resume"])
        train_ids, train_labels = _split_tensors(data.train, "train")
        valid_ids, valid_labels = _split_tensors(data.valid, "valid")
        test_ids, test_labels = _split_tensors(data.test, "test")
        field_dims = list(data.schema.field_dims)
        group_field, group_kw = resolve_group_field(data.schema, cfg["group_field"])
        check_monitor_has_groups(cfg["monitor"], group_field)
        seed = int(cfg["seed"])
        _seed_everything(seed)  # identical initial weights on every rank
        model = model_zoo.build(cfg["model"], field_dims, **hparams)
        batch = int(cfg["batch_size"])
        session = shard_model(model, device, dist_cfg["sharding"], dist_cfg["embedding_optimizer"],
                              dist_cfg["embedding_lr"], dist_cfg["embedding_eps"], dense_lr=float(cfg["lr"]),
                              batch_size=batch, weight_decay=float(cfg["weight_decay"]),
                              clip_grad_norm=cfg["clip_grad_norm"])
        del model
        # counters: completed epochs, steps done inside the epoch in progress and its partial loss sums,
        # early stopping / plateau state
        epoch, epoch_step, history = 0, 0, []
        partial = [0.0, 0]
        best_score, bad_epochs, stopped_early = -math.inf, 0, False   # best_score: the monitored one (train.monitor_score)
        lr_decays = 0               # plateau decays so far: every group's rate follows from its own start

        def decay(group) -> None:
            group["lr"] = max(group["lr"] * float(cfg["lr_decay_factor"]), min(float(cfg["min_lr"]), group["lr"]))

        if dist_cfg["resume"]:
            manifest = session.load(dist_cfg["resume"])
            epoch, history = int(manifest.get("epoch", 0)), list(manifest.get("history", []))
            # older manifests spelled the key "valid_AUC"; the single-process trainer's is "valid_auc"
            history = [{("valid_auc" if k == "valid_AUC" else k): v for k, v in h.items()} for h in history]
            epoch_step = int(manifest.get("epoch_step", 0))
            partial = list(manifest.get("partial_loss", [0.0, 0]))
            stop = manifest.get("early_stopping") or {}
            # manifests from before "monitor" followed the valid AUC
            best_score = float(stop.get("best_score", stop.get("best_auc", -math.inf)))
            bad_epochs = int(stop.get("bad_epochs", 0))
            stopped_early = bool(stop.get("stopped_early", False))
            lrs, groups = manifest.get("lrs"), session.optimizer.param_groups
            if manifest.get("lr_decays") is not None:
                # the decays replayed on each group's starting rate: right for any plan (another sharding
                # groups the tables' optimizers differently, so the saved per-group rates may not line up)
                lr_decays = int(manifest["lr_decays"])
                for group in groups:
                    for _ in range(lr_decays):
                        decay(group)
            elif lrs is not None and len(lrs) == len(groups):
                for group, lr in zip(groups, lrs):
                    group["lr"] = float(lr)
            elif lrs is not None:
                raise ValueError(f"the checkpoint {dist_cfg['resume']} holds learning rates for {len(lrs)} optimizer "
                                 f"groups but this plan has {len(groups)}; resume it with its own sharding "
                                 f"({manifest.get('sharding')!r})")
        global_batch = batch * world
        steps_per_epoch = train_ids.shape[0] // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"the train split ({train_ids.shape[0]} rows) is smaller than one global batch "
                             f"({batch} x {world} ranks)")
        if rank == 0:      # (after every refusal: a refused run changes nothing)
            # a results.json here describes a replaced run (--overwrite) or this run's end so far (a resume
            # trains on): stopped before the new end, the directory must not pair it with other weights
            remove_if_present(os.path.join(out, "results.json"))
        checkpoint_dir = os.path.join(out, "checkpoint")

        def save() -> None:
            session.save(checkpoint_dir, {
                "epoch": epoch, "epoch_step": epoch_step, "partial_loss": partial, "history": history,
                "early_stopping": {"best_score": best_score, "bad_epochs": bad_epochs,
                                   "stopped_early": stopped_early},
                "lrs": [float(g["lr"]) for g in session.optimizer.param_groups], "lr_decays": lr_decays,
                "config": full_config, "data_fingerprint": fingerprint})

        max_steps = dist_cfg["max_steps"]
        step_seconds, samples = 0.0, 0
        while epoch < int(cfg["epochs"]) and not stopped_early \
                and (max_steps is None or session.step < int(max_steps)):
            # one permutation per epoch, the same on every rank; each rank takes its block of each global batch
            order = torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
            while epoch_step < steps_per_epoch:
                if max_steps is not None and session.step >= int(max_steps):
                    break
                start = epoch_step * global_batch + rank * batch
                rows = order[start:start + batch]
                _seed_step(seed, rank, session.step)  # dropout: per rank, resumable
                started = time.perf_counter()
                session.train_step(train_ids[rows], train_labels[rows])  # raises on every rank together
                step_seconds += time.perf_counter() - started
                samples += global_batch
                partial = [partial[0] + session.last_loss_sum, partial[1] + session.last_rows]
                epoch_step += 1
            if epoch_step < steps_per_epoch:  # max_steps stopped inside the epoch: remember where
                save()
                break
            epoch += 1
            metrics = distributed_auc(session, valid_ids, valid_labels, int(cfg["eval_batch_size"]), **group_kw)
            lrs = [float(g["lr"]) for g in session.optimizer.param_groups]
            score = monitor_score(metrics, cfg["monitor"])
            improved = score > best_score
            if improved:
                best_score, bad_epochs = score, 0
            else:
                bad_epochs += 1
                if cfg["reduce_lr_on_plateau"]:  # every optimizer: fused tables, data-parallel tables, dense
                    lr_decays += 1
                    for group in session.optimizer.param_groups:
                        decay(group)
                if cfg["patience"] is not None and bad_epochs >= int(cfg["patience"]):
                    stopped_early = True
            # train_loss: the mean over every rank's rows of the epoch
            history.append({"epoch": epoch, "train_loss": partial[0] / partial[1] if partial[1] else None,
                            "valid_auc": metrics["AUC"], "valid_logloss": metrics["logloss"],
                            **({"valid_gauc": metrics["gAUC"]} if "gAUC" in metrics else {}),
                            "lr": lrs[-1], "embedding_lr": lrs[0], "improved": improved})
            epoch_step, partial = 0, [0.0, 0]
            if rank == 0:
                log.info("epoch %d: %s", epoch, history[-1])
            save()
        test = distributed_auc(session, test_ids, test_labels, int(cfg["eval_batch_size"]), name="test", **group_kw)
        results = {"model": cfg["model"], "generative": cfg.get("generative", True), "rank": rank, "world_size": world,
                   "sharding": dist_cfg["sharding"], "backend": dist.get_backend(), "steps": session.step,
                   "epochs_run": epoch, "epoch_step": epoch_step, "stopped_early": stopped_early,
                   "history": history, "test_auc": test["AUC"], "test_logloss": test["logloss"],
                   # the final model's validation (it is the model tested: no best-model reload), when the
                   # run ended at an epoch's end; max_steps inside an epoch leaves the final model unvalidated
                   **({k: history[-1][k] for k in ("valid_auc", "valid_logloss", "valid_gauc") if k in history[-1]}
                      if history and epoch_step == 0 else {}),
                   **({"test_gauc": test["gAUC"], "test_gauc_groups": test["gAUC_groups"],
                       "test_gauc_excluded_rows": test["gAUC_excluded_rows"], "group_field": group_field}
                      if "gAUC" in test else {}),
                   "samples_per_second": samples / step_seconds if step_seconds else None,
                   "config": full_config, "data_fingerprint": fingerprint, "versions": versions()}
        if rank == 0:
            atomic_write_text(json.dumps(_jsonable(results), indent=2), os.path.join(out, "results.json"))
        failed = False
        return results
    finally:
        modes.close()
        # Leaving by an exception: no barrier (another rank may sit in a collective this one never joins);
        # the group is destroyed so that the peers' collectives fail instead of waiting.
        if session is not None:
            session.close(destroy=True, barrier=not failed)
        elif dist.is_initialized():
            dist.destroy_process_group()
