"""Shared pieces of the model zoo: the CTR model base class and the first-order (LR) term."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import functional as SF
from ..nn import FieldEmbedding, SFGEncoder, _as_field_dims, _check_encoder_options, _count, _flag, weights_copied_in


class FirstOrder(nn.Module):
    """lr(x) = bias + sum_f w[offsets[f] + ids[:, f]]: one scalar weight per id. ``-> [B]``."""

    def __init__(self, field_dims: Sequence[int], bounds_check: str = "fatal", backend: str = "auto"):
        super().__init__()
        self.table = FieldEmbedding(field_dims, 1, bounds_check=bounds_check, init_std=1e-4, backend=backend)
        self.bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The bias back to 0 (the table, a FieldEmbedding, resets its own rows)."""
        self.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids).sum(dim=(1, 2)) + self.bias


class CTRModel(nn.Module):
    """Base class: ``forward(ids [B, N]) -> logits [B]``; ``generative=False`` is the base model exactly.

    Subclasses implement ``score(ids, V) -> logits``. Keyword hyper-parameters shared by all models:
    embedding_dim, generative, gamma, activation, encoder_bias, residual, encoder_dropout,
    init_std, bounds_check, backend. ``self.config`` holds every hyper-parameter needed to rebuild
    the model with :func:`sfg_fast.models.build`.
    """

    name = "base"

    def __init__(self, field_dims: Sequence[int], embedding_dim: int = 16, generative: bool = True,
                 gamma: float = 1.0, activation: str = "relu", encoder_bias: bool = False,
                 residual: bool = False, encoder_dropout: float = 0.0, init_std: float = 1e-4,
                 bounds_check: str = "fatal", backend: str = "auto", embedding="native",
                 embedding_optimizer: Optional[str] = None, embedding_lr: Optional[float] = None,
                 embedding_eps: Optional[float] = None):
        super().__init__()
        sparse = {k: v for k, v in (("embedding_optimizer", embedding_optimizer), ("embedding_lr", embedding_lr),
                                    ("embedding_eps", embedding_eps)) if v is not None}
        if sparse and embedding != "fused":
            raise ValueError(f"{sorted(sparse)} configure the table that trains itself in backward: they need "
                             f"embedding='fused' (or a distributed run), got embedding={embedding!r}")
        if embedding == "fused":
            sparse = dict(dict(FUSED_DEFAULTS), **sparse)
        self.field_dims = _as_field_dims(field_dims)
        self.num_fields = len(self.field_dims)
        self.embedding_dim = _count("embedding_dim", embedding_dim)
        self.generative = _flag("generative", generative)
        # a base model has no encoder, but a wrong encoder option is an error either way (a config that
        # sets one for both variants must fail on the base run too, not only on the SFG one)
        _check_encoder_options(activation, gamma, encoder_bias, residual, encoder_dropout, prefix="encoder_")
        self.backend = backend
        self.encoder_kwargs = dict(activation=activation, gamma=gamma, bias=encoder_bias,
                                   residual=residual, dropout=encoder_dropout, backend=backend)
        self.embedding = make_field_embedding(embedding, self.field_dims, self.embedding_dim,
                                              bounds_check=bounds_check, init_std=init_std, backend=backend,
                                              **{k.replace("embedding_", ""): v for k, v in sparse.items()})
        self.config: Dict = dict(embedding_dim=self.embedding_dim, generative=self.generative, gamma=gamma,
                                 activation=activation, encoder_bias=encoder_bias, residual=residual,
                                 encoder_dropout=encoder_dropout, init_std=init_std,
                                 bounds_check=bounds_check, backend=backend)
        if isinstance(embedding, str) and embedding != "native":
            # Recorded only when not the default, so native configs and checkpoints stay as they were.
            self.config["embedding"] = embedding
            self.config.update(sparse)

    def _record(self, **hparams) -> None:
        self.config.update(hparams)

    def make_encoder(self) -> Optional[SFGEncoder]:
        if not self.generative:
            return None
        return SFGEncoder(self.num_fields, self.embedding_dim, **self.encoder_kwargs)

    def encoders(self) -> List[SFGEncoder]:
        """Every SFG encoder of the model (empty for a base model)."""
        return [m for m in self.modules() if isinstance(m, SFGEncoder)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.embedding(ids)
        return self.score(ids, V)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> List[str]:
        """What DistributedDataParallel leaves alone: the fused tables, which update themselves in backward
        and get no gradient (DDP would otherwise hand them zero gradients, and a dense optimizer's weight
        decay would then move every row). Names set with DDP's own helper are kept too."""
        from ..optim import FusedFieldEmbedding
        fused = [f"{name}.weight" for name, module in self.named_modules() if isinstance(module, FusedFieldEmbedding)]
        return fused + [n for n in self.__dict__.get("_ddp_extra_ignored", []) if n not in fused]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self.__dict__["_ddp_extra_ignored"] = list(names)

    def score(self, ids: torch.Tensor, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(self, V: torch.Tensor) -> torch.Tensor:
        """The generated embeddings Z the model's first interaction uses (V itself for a base model)."""
        encoder = getattr(self, "encoder", None)
        return encoder(V) if encoder is not None else V

    @torch.no_grad()
    def analysis_embeddings(self, ids: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """Embeddings the diagnostics study: ``raw`` e ``[B, N*D]`` and ``generated`` Z (None for base)."""
        V = self.embedding(ids)
        raw = V.flatten(1)
        if not self.generative or not self.encoders():
            # no generator at all (e.g. an SFG cross network with 0 cross layers): nothing is generated
            return {"raw": raw, "generated": None}
        return {"raw": raw, "generated": self.generate(V).flatten(1)}

    def extra_repr(self) -> str:
        return f"generative={self.generative}"


EMBEDDINGS = ("native", "fused", "torchrec")
# the table's own optimizer with embedding="fused" (the names and defaults of a distributed run's tables)
FUSED_DEFAULTS = (("embedding_optimizer", "rowwise_adagrad"), ("embedding_lr", 0.01), ("embedding_eps", 1e-8))
_FUSED_KINDS = {"rowwise_adagrad": "adagrad", "sgd": "sgd", "adam": "adam"}


def make_field_embedding(embedding, field_dims: Sequence[int], embedding_dim: int, **kwargs) -> nn.Module:
    """The ids -> V ``[B, N, D]`` module a model uses.

    ``embedding``: "native" (:class:`sfg_fast.nn.FieldEmbedding`, trained by the model's optimizer),
    "fused" (:class:`sfg_fast.optim.FusedFieldEmbedding`: the table updates its looked-up rows inside
    backward with its own row-sparse optimizer, never building a dense gradient; kwargs ``optimizer``
    "rowwise_adagrad" | "sgd" | "adam" (lazy), ``lr``, ``eps``), "torchrec"
    (:class:`sfg_fast.integrations.torchrec.TorchRecFieldEmbedding`, shardable by TorchRec's
    DistributedModelParallel) or a ready module with the same forward contract. ``kwargs``:
    bounds_check, init_std, backend.
    """
    if isinstance(embedding, nn.Module):
        return embedding
    if embedding == "native":
        return FieldEmbedding(field_dims, embedding_dim, **kwargs)
    if embedding == "fused":
        from ..optim import FusedFieldEmbedding

        kind = kwargs.pop("optimizer")
        if kind not in _FUSED_KINDS:
            raise ValueError(f"embedding_optimizer must be one of {sorted(_FUSED_KINDS)} with embedding='fused' "
                             f"(element-wise 'adagrad' is a distributed table's option only), got {kind!r}")
        backend = kwargs.pop("backend", "auto")
        # The model's backend names the kernels of its ops; a table that cannot run one (the extension's
        # update takes fp32/bf16, its CUDA one row-wise Adagrad only) picks its own, as the model's other
        # layers fall back where a kernel does not fit. "torch"/"reference" keep it on the torch path.
        return FusedFieldEmbedding(field_dims, embedding_dim, optimizer=_FUSED_KINDS[kind],
                                   backend="torch" if backend in ("torch", "reference") else "auto", **kwargs)
    if embedding == "torchrec":
        from ..integrations.torchrec import TorchRecFieldEmbedding

        return TorchRecFieldEmbedding(field_dims, embedding_dim, **kwargs)
    raise ValueError(f"embedding must be one of {EMBEDDINGS} or an nn.Module mapping ids [B, N] to "
                     f"[B, N, D], got {embedding!r}")


def use_embedding_for_first_order(model: nn.Module, embedding) -> None:
    """Rebuild every :class:`FirstOrder` table of ``model`` with ``embedding`` ("native"/"fused"/"torchrec").

    The first-order weights are one more id-indexed table (D = 1), as large as the vocabulary: with
    TorchRec they must be sharded like the main table, so they become a second EmbeddingBagCollection;
    with "fused" they train in backward with the main table's optimizer settings.
    """
    if not isinstance(embedding, str) or embedding == "native":
        return
    for module in model.modules():
        if isinstance(module, FirstOrder) and isinstance(module.table, FieldEmbedding):
            old = module.table
            options = dict(bounds_check=old.bounds_check, init_std=old.init_std, backend=old.backend)
            if embedding == "torchrec":
                from ..integrations.torchrec import TorchRecFieldEmbedding

                # own table names: sharding constraints are keyed by table name
                module.table = TorchRecFieldEmbedding(old.field_dims, 1, table_prefix="first_order_", **options)
            else:
                if embedding == "fused":
                    options.update({k.replace("embedding_", ""): model.config[k] for k, _ in FUSED_DEFAULTS})
                # the new table takes the old one's initial weights (no second draw from the RNG): a fused
                # model starts exactly where the native model of the same seed does
                with weights_copied_in():
                    table = make_field_embedding(embedding, old.field_dims, 1, **options)
                with torch.no_grad():
                    table.weight.copy_(old.weight)
                module.table = table
