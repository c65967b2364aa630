"""SFG layers as nn.Modules (nouns); each calls the ops of ``sfg_fast.functional``.

Shape letters (B, N, D, V, P) are defined in ``sfg_fast.functional``.
"""
from __future__ import annotations

import contextlib
import operator
import threading
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as C
from . import functional as SF
from ._backend import BACKENDS, autocast_on, module_backend

__all__ = ["FieldEmbedding", "SFGEncoder", "PairwiseDecoder", "SFGInteraction", "MLP", "GenerativeCrossNet", "CIN",
           "score_pairs", "weights_copied_in"]


def _count(name: str, value, minimum: int = 1) -> int:
    """An integer hyper-parameter of at least ``minimum`` (ints, numpy ints, 0-d int tensors; never a
    truncated float or a bool)."""
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or count < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return count


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _dropout(p, name: str = "dropout") -> Optional[nn.Dropout]:
    """nn.Dropout(p) for 0 < p < 1, None for p == 0; anything else (negative, NaN, >= 1) is an error."""
    try:
        value = C.real_number(name, p)
    except TypeError:
        raise TypeError(f"{name} must be a probability, got {p!r}") from None
    if not (0.0 <= value < 1.0):   # NaN fails the comparison too
        raise ValueError(f"{name} must lie in [0, 1), got {p!r}")
    return nn.Dropout(value) if value > 0 else None


def check_embeddings_shape(name: str, t, num_fields: int, embedding_dim: int) -> None:
    """``t`` must be ``[B, num_fields, embedding_dim]`` (a layer built for that shape)."""
    C.check_embeddings(name, t)
    if t.shape[1] != num_fields or t.shape[2] != embedding_dim:
        raise ValueError(f"{name} must have shape [B, N, D]=[B, {num_fields}, {embedding_dim}] (the layer's "
                         f"num_fields and embedding_dim), got {list(t.shape)}")


def _as_field_dims(field_dims) -> list:
    if isinstance(field_dims, (str, bytes)) or not hasattr(field_dims, "__iter__"):
        raise TypeError(f"field_dims must be a sequence of vocabulary sizes, got {field_dims!r}")
    dims = []
    for f, x in enumerate(field_dims):
        try:
            size = operator.index(x)      # a float size (2.7) is an error, not a truncation
        except TypeError:
            raise TypeError(f"field_dims must be integer vocabulary sizes; field {f} has {x!r}") from None
        if isinstance(x, bool) or size < 1:
            raise ValueError(f"field_dims must be positive vocabulary sizes; field {f} has {x!r}")
        dims.append(size)
    if not dims:
        raise ValueError("field_dims must name at least one field")
    return dims


def init_table_fields(module: nn.Module, field_dims, embedding_dim, bounds_check: str) -> list:
    """Validate and set the attributes every per-field table module shares (field_dims, num_fields,
    embedding_dim, bounds_check). Returns the field sizes as ints."""
    dims = _as_field_dims(field_dims)
    C.check_choice("bounds_check", bounds_check, C.BOUNDS_CHECKS)
    module.field_dims = dims
    module.num_fields = len(dims)
    module.embedding_dim = _count("embedding_dim", embedding_dim)
    module.bounds_check = bounds_check
    offsets, sizes = _field_buffers(dims, None)
    module.register_buffer("offsets", offsets, persistent=False)
    module.register_buffer("field_sizes", sizes, persistent=False)
    return dims


def _field_buffers(dims, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offsets, field_sizes): int64 [N] first row of each field, and each field's size."""
    starts = [0]
    for x in dims[:-1]:
        starts.append(starts[-1] + x)
    return (torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor(dims, dtype=torch.int64, device=device))


class FieldDimsState:
    """Mixin for per-field table modules: ``state_dict()`` records ``field_dims`` in the state dict's
    metadata (``state_dict._metadata[prefix]``; no new key, so older files and every key-based
    conversion stay valid), and ``load_state_dict`` refuses a file saved with other field sizes. The
    concatenated table alone cannot tell ``[3, 5]`` from ``[5, 3]``: same shape, rows of other fields.
    The ``offsets`` / ``field_sizes`` buffers are functions of ``field_dims``, not state: they are rebuilt
    wherever the module lands (``to_empty()`` from the meta device would leave them uninitialised)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.offsets.is_meta:
            self.offsets, self.field_sizes = _field_buffers(self.field_dims, self.offsets.device)
        return self

    def to_empty(self, *, device, recurse=True):
        # uninitialised storage for everything, by definition; the remap counter starts again at 0
        super().to_empty(device=device, recurse=recurse)
        if hasattr(self, "clamped_count") and not self.clamped_count.is_meta:
            self.clamped_count.zero_()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["field_dims"] = list(self.field_dims)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get("field_dims") if isinstance(local_metadata, dict) else None
        if saved is not None and list(saved) != list(self.field_dims):
            error_msgs.append(f"{prefix or type(self).__name__ + '.'}field_dims: the state dict was saved with "
                              f"field_dims={list(saved)}, this module has field_dims={list(self.field_dims)} "
                              f"(same rows would read other fields' embeddings)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def check_ids_width(module: nn.Module, ids) -> None:
    """A [B, N] ids tensor must have one column per field of ``module`` (other checks come later). The
    tables' entry check, so it also refuses torch.jit.trace, which would record neither the id checks
    (they read the ids; a trace keeps only the branch its example took) nor the compiled kernels."""
    if torch.jit.is_tracing():
        raise RuntimeError(f"{type(module).__name__} cannot be recorded by torch.jit.trace: a trace keeps neither "
                           "its id checks nor its compiled kernels; export with torch.export.export(model, (ids,)) "
                           "(a dynamic batch works, the checks stay in the program) or use torch.compile")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] != module.num_fields:
        raise ValueError(f"ids must have shape [B, N]=[B, {module.num_fields}] for field_dims of "
                         f"{module.num_fields} fields, got {list(ids.shape)}")


def clamp_ids_to_oov(module: nn.Module, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``bounds_check="clamp_to_oov"`` for a table module (``field_sizes`` buffer): out-of-range ids
    become their field's last (OOV) id. Returns ``(ids, count)``, count a 0-d int64 tensor that the caller
    adds to its ``clamped_count`` buffer once the lookup has succeeded (a failed call counts nothing).
    Ids already checked for dtype and shape."""
    sizes = module.field_sizes                      # int64: compared without narrowing to ids' dtype
    bad = (ids < 0) | (ids >= sizes)
    ids = C.widen_for_oov(ids, max(module.field_dims, default=0))
    oov = (sizes - 1).clamp(min=0).to(ids.dtype)
    # counted as a tensor: no host sync, and torch.compile traces it without a graph break
    return torch.where(bad, oov.expand_as(ids), ids), bad.sum()


_BUILDING = threading.local()


@contextlib.contextmanager
def weights_copied_in():
    """Tables built inside skip their random first draw, for a caller that copies weights in right after: so
    building one reads nothing from the global RNG. (``torch.random.fork_rng``, the other way to leave it as it
    was, rewinds it for every thread: numbers other threads drew meanwhile came again.)"""
    _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
    try:
        yield
    finally:
        _BUILDING.depth -= 1


def draw_initial_rows(weight: torch.Tensor, init_std: float) -> None:
    """Rows drawn from N(0, init_std^2), unless inside :func:`weights_copied_in`."""
    if not getattr(_BUILDING, "depth", 0):
        nn.init.normal_(weight, std=init_std)


class FieldEmbedding(FieldDimsState, nn.Module):
    """N per-field tables stored as one concatenated ``[sum(field_dims), D]`` table.

    ``forward(ids [B, N]) -> V [B, N, D]``. ``offsets`` (int64 [N]) is the first row of each field.
    Rows start as N(0, init_std^2) (FuxiCTR's default std 1e-4).
    ``bounds_check="clamp_to_oov"`` remaps bad ids to the field's last id and counts them in
    ``num_clamped``.
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, bounds_check: str = "fatal",
                 init_std: float = 1e-4, backend: str = "auto"):
        super().__init__()
        dims = init_table_fields(self, field_dims, embedding_dim, bounds_check)
        C.check_choice("backend", backend, BACKENDS)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(sum(dims), self.embedding_dim))
        self.register_buffer("clamped_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self.init_std = C.check_init_std(init_std)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rows drawn from N(0, init_std^2)."""
        draw_initial_rows(self.weight, self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids_width(self, ids)
        if self.bounds_check == "clamp_to_oov":
            C.check_lookup(ids, self.weight, self.offsets, "clamp_to_oov")
            ids, clamped = clamp_ids_to_oov(self, ids)
            V = SF.embedding_lookup(ids, self.weight, self.offsets, "off",
                                    backend=module_backend(self.backend, "embedding_lookup"))
            self.clamped_count += clamped
            return V
        return SF.embedding_lookup(ids, self.weight, self.offsets, self.bounds_check,
                                   backend=module_backend(self.backend, "embedding_lookup"))

    @property
    def num_clamped(self) -> int:
        """How many out-of-range ids ``clamp_to_oov`` has remapped so far (reads the device counter)."""
        return int(self.clamped_count)

    def extra_repr(self) -> str:
        return f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, bounds_check={self.bounds_check!r}"


def _check_encoder_options(activation, gamma, bias, residual, dropout, prefix: str = "") -> None:
    """The encoder's options, checked where a layer built without one (generative=False) still takes them:
    a wrong value is an error either way, never silently ignored. ``prefix`` ("encoder_" for the models)
    names the bias and dropout arguments as the caller spells them."""
    C.check_encoder_options(activation, gamma, residual)
    _flag(prefix + "bias", bias)
    _dropout(dropout, prefix + "dropout")


class SFGEncoder(nn.Module):
    """The SFG generator: ``Z = gamma * act(e @ W.T (+ b)).reshape(B, N, D) (+ V)``, W ``[N*D, N*D]``.

    Every generated field embedding sees all fields. ``reset_to_identity()`` sets W = I (with
    activation="identity", gamma=1 the encoder then returns V exactly: the base model, except in
    a cross network fed x_l, see :class:`GenerativeCrossNet`).
    """

    def __init__(self, num_fields: int, embedding_dim: int, activation: str = "relu", gamma: float = 1.0,
                 bias: bool = False, residual: bool = False, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        C.check_choice("activation", activation, tuple(C.ACTIVATIONS))
        C.check_choice("backend", backend, BACKENDS)
        self.num_fields = _count("num_fields", num_fields)
        self.embedding_dim = _count("embedding_dim", embedding_dim)
        self.activation = activation
        self.gamma = C.check_gamma(gamma)
        self.residual = _flag("residual", residual)
        self.backend = backend
        width = self.num_fields * self.embedding_dim
        linear = nn.Linear(width, width, bias=_flag("bias", bias))   # nn.Linear's default init
        self.weight = linear.weight
        self.bias = linear.bias
        self.dropout = _dropout(dropout)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (what the encoder starts from): W and b uniform in +-1/sqrt(N*D)."""
        nn.Linear.reset_parameters(self)     # reads self.weight and self.bias, the encoder's own

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """W_enc = I and bias = 0: with activation identity and gamma 1, Z = V (the base model exactly)."""
        self.weight.copy_(torch.eye(self.weight.shape[0], dtype=self.weight.dtype))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        check_embeddings_shape("V", V, self.num_fields, self.embedding_dim)
        z = SF.sfg_encode(V, self.weight, self.bias, self.activation, self.gamma, self.residual,
                          backend=module_backend(self.backend, "sfg_encode"))
        return self.dropout(z) if self.dropout is not None else z

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, embedding_dim={self.embedding_dim}, "
                f"activation={self.activation!r}, gamma={self.gamma}, bias={self.bias is not None}, "
                f"residual={self.residual}")


class PairwiseDecoder(nn.Module):
    """All-Predict-All decoder + score: ``forward(Z, V) -> [B]`` (see functional.pairwise_decode).

    The decoder weights are the base model's interaction weights. They start so that the layer
    begins as FM: scalar weights 1, vector weights 1, matrix weights I.
    """

    def __init__(self, num_fields: int, embedding_dim: int, kind: str = "identity", pairs: str = "upper",
                 generated_side: str = "left", symmetric: bool = False, backend: str = "auto"):
        super().__init__()
        C.check_choice("kind", kind, C.KINDS)
        C.check_choice("pairs", pairs, C.PAIRS)
        C.check_choice("generated_side", generated_side, C.SIDES)
        C.check_choice("backend", backend, BACKENDS)
        n, d = _count("num_fields", num_fields), _count("embedding_dim", embedding_dim)
        self.num_fields, self.embedding_dim = n, d
        self.kind, self.pairs, self.generated_side = kind, pairs, generated_side
        self.symmetric = _flag("symmetric", symmetric)
        self.backend = backend
        shape = {"identity": None, "scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
        if shape is None:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(shape))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The FM start: scalar and vector weights 1, matrix blocks I."""
        if self.weight is None:
            return
        if self.kind == "matrix":
            self.weight.copy_(torch.eye(self.embedding_dim, dtype=self.weight.dtype, device=self.weight.device)
                              .expand_as(self.weight))
        else:
            self.weight.fill_(1.0)

    def forward(self, Z: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        check_embeddings_shape("Z", Z, self.num_fields, self.embedding_dim)
        check_embeddings_shape("V", V, self.num_fields, self.embedding_dim)
        return SF.pairwise_decode(Z, V, self.weight, self.kind, self.pairs, self.generated_side,
                                  self.symmetric, backend=module_backend(self.backend, "pairwise_decode"))

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, embedding_dim={self.embedding_dim}, kind={self.kind!r}, "
                f"pairs={self.pairs!r}, generated_side={self.generated_side!r}, symmetric={self.symmetric}")


def _hooked(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` has hooks of its own (forward, pre-forward, backward; weight_norm, spectral_norm
    and pruning attach pre-forward hooks that recompute its weight): a layer that would read its
    parameters directly must call it instead, or the hooks would silently never run."""
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                       or module._backward_pre_hooks)


def _weights_readable(module: nn.Module, cls: type) -> bool:
    """Whether a layer's weights may be read into a fused op: exactly ``cls`` (not a swapped-in layer, such
    as torch.ao's dynamically quantised Linear) and without hooks of its own."""
    return type(module) is cls and not _hooked(module)


def _to_parameters_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the floating dtype of ``module``'s parameters (unchanged when it has none, or autocast runs)."""
    param = next(module.parameters(), None)
    if param is None or not param.is_floating_point() or x.dtype == param.dtype or autocast_on(x.device.type):
        return x
    return x.to(param.dtype)


def score_pairs(encoder: Optional[SFGEncoder], decoder: PairwiseDecoder, V: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """``decoder(encoder(V), V)`` (``decoder(V, V)`` without an encoder) as ONE ``sfg_interaction`` call,
    so fused backends run encoder and decoder as one pipeline; with the encoder's dropout active
    (training) Z must exist between them, and the two ops run instead. ``-> [B]``."""
    check_embeddings_shape("V", V, decoder.num_fields, decoder.embedding_dim)
    if encoder is not None and (encoder.dropout is not None and encoder.training or _hooked(encoder)) \
            or _hooked(decoder):
        # dropout between the two, or hooks on either (they must run): the two modules, called
        return decoder(V if encoder is None else encoder(V), V)
    backend = module_backend(backend, "sfg_interaction")
    if encoder is None:
        return SF.sfg_interaction(V, None, None, decoder.weight, decoder.kind, "identity", 1.0, False, decoder.pairs,
                                  decoder.generated_side, decoder.symmetric, backend=backend)
    return SF.sfg_interaction(V, encoder.weight, encoder.bias, decoder.weight, decoder.kind, encoder.activation,
                              encoder.gamma, encoder.residual, decoder.pairs, decoder.generated_side,
                              decoder.symmetric, backend=backend)


class SFGInteraction(nn.Module):
    """The drop-in SFG layer: generator + All-Predict-All decoder on ready embeddings, ``forward(V) -> [B]``.

    ``V [B, N, D]`` from any lookup (``FieldEmbedding``, ``optim.FusedFieldEmbedding``, a TorchRec
    EmbeddingBagCollection's pooled ``[B, F, D]``). ``generative=False`` drops the encoder: the base
    model's interaction exactly (FM for kind "identity", FwFM "scalar", FvFM "vector", FmFM "matrix").
    Runs as one ``sfg_interaction`` op (fused on the cpu and triton backends). Keyword arguments as
    :class:`SFGEncoder` (activation, gamma, bias, residual, dropout) and :class:`PairwiseDecoder` (kind,
    pairs, generated_side, symmetric).
    """

    def __init__(self, num_fields: int, embedding_dim: int, kind: str = "identity", pairs: str = "upper",
                 generated_side: str = "left", symmetric: bool = False, generative: bool = True,
                 activation: str = "relu", gamma: float = 1.0, bias: bool = False, residual: bool = False,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.generative = _flag("generative", generative)
        if not self.generative:
            _check_encoder_options(activation, gamma, bias, residual, dropout)   # unused, but never wrong
        self.encoder = (SFGEncoder(num_fields, embedding_dim, activation, gamma, bias, residual, dropout, backend)
                        if self.generative else None)
        self.decoder = PairwiseDecoder(num_fields, embedding_dim, kind, pairs, generated_side, symmetric, backend)

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        return score_pairs(self.encoder, self.decoder, V, self.backend)

    def extra_repr(self) -> str:
        return f"generative={self.generative}, backend={self.backend!r}"


_MLP_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
                    "gelu": nn.GELU, "identity": nn.Identity}


class MLP(nn.Module):
    """Feed-forward block: [Linear -> (BatchNorm) -> act -> (Dropout)] per hidden layer, then an
    optional output Linear. ``forward(x [B, input_dim]) -> [B, output_dim or last hidden]``."""

    def __init__(self, input_dim: int, hidden_units: Sequence[int] = (400, 400, 400),
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False,
                 output_dim: Optional[int] = None):
        super().__init__()
        C.check_choice("activation", activation, tuple(_MLP_ACTIVATIONS))
        if isinstance(hidden_units, (str, bytes)) or not hasattr(hidden_units, "__iter__"):
            raise TypeError(f"hidden_units must be a list of positive layer widths, got {hidden_units!r}")
        hidden_units = [_count("hidden_units", u) for u in hidden_units]
        batch_norm = _flag("batch_norm", batch_norm)
        drop = _dropout(dropout)
        layers = []
        width = _count("input_dim", input_dim)
        for units in hidden_units:
            layers.append(nn.Linear(width, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(_MLP_ACTIVATIONS[activation]())
            if drop is not None:
                layers.append(nn.Dropout(drop.p))
            width = units
        if output_dim is not None:
            out = _count("output_dim", output_dim)
            layers.append(nn.Linear(width, out))
            width = out
        self.output_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on the layers' dtype, as the interaction ops promote: a bf16 or fp64 table under fp32 layers
        return self.layers(_to_parameters_dtype(self, x))


class GenerativeCrossNet(nn.Module):
    """DCNv2 cross network with an optional generator per layer.

    Base (``generative=False``): ``x_{l+1} = x_l + x_0 * (W_l x_l (+ b_l))``.
    SFG: ``x_{l+1} = x_l + G_l(src) * (W_l x_l (+ b_l))`` with ``src = x_l`` (``regenerate_from="x_l"``,
    the authors' form) or ``x_0``; ``G_l`` is an :class:`SFGEncoder` (optional residual, dropout).
    ``forward(x0 [B, N*D]) -> x_L [B, N*D]``. An identity encoder (activation identity, gamma 1, W = I)
    gives the base cross network exactly only with ``regenerate_from="x_0"``: fed x_l, it returns x_l,
    not the x_0 the base layer multiplies by (the first layer agrees either way).
    """

    def __init__(self, num_fields: int, embedding_dim: int, num_layers: int = 3, generative: bool = True,
                 regenerate_from: str = "x_l", residual: bool = False, dropout: float = 0.0,
                 activation: str = "relu", gamma: float = 1.0, encoder_bias: bool = False,
                 cross_bias: bool = False, backend: str = "auto"):
        super().__init__()
        C.check_choice("regenerate_from", regenerate_from, ("x_l", "x_0"))
        C.check_choice("backend", backend, BACKENDS)
        self.num_fields, self.embedding_dim = _count("num_fields", num_fields), _count("embedding_dim", embedding_dim)
        self.num_layers = _count("num_layers", num_layers, minimum=0)     # 0 layers: x_L = x_0
        self.generative = _flag("generative", generative)
        self.regenerate_from = regenerate_from
        self.backend = backend
        if not self.generative:
            _check_encoder_options(activation, gamma, encoder_bias, residual, dropout)
        width = self.num_fields * self.embedding_dim
        self.cross = nn.ModuleList(nn.Linear(width, width, bias=_flag("cross_bias", cross_bias))
                                   for _ in range(self.num_layers))
        if self.generative:
            self.generators = nn.ModuleList(
                SFGEncoder(num_fields, embedding_dim, activation, gamma, encoder_bias, residual, dropout, backend)
                for _ in range(self.num_layers))
        else:
            self.generators = None

    def gate(self, layer: int, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The multiplicative operand of cross layer ``layer``: x_0 (base) or G_l(x_l or x_0)."""
        if not self.generative:
            return x0
        src = x if self.regenerate_from == "x_l" else x0
        batch, width = src.shape[0], self.num_fields * self.embedding_dim   # width, not -1: B may be 0
        return self.generators[layer](src.view(batch, self.num_fields, self.embedding_dim)).reshape(batch, width)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        C.check_tensor("x0", x0, ndim=2)
        width = self.num_fields * self.embedding_dim
        if x0.shape[1] != width:
            raise ValueError(f"x0 must have shape [B, N*D]=[B, {width}] (N={self.num_fields}, "
                             f"D={self.embedding_dim}), got {list(x0.shape)}")
        x = x0
        for layer, linear in enumerate(self.cross):
            if _weights_readable(linear, nn.Linear):
                x = SF.generative_cross(x, self.gate(layer, x0, x), linear.weight, linear.bias,
                                        backend=module_backend(self.backend, "generative_cross"))
            else:
                # a hooked, parametrised-by-hook or swapped layer (torch.ao's dynamic quantisation): called,
                # on its parameters' dtype, the result in x's (as the fused op promotes)
                x = x + self.gate(layer, x0, x) * linear(_to_parameters_dtype(linear, x)).to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, embedding_dim={self.embedding_dim}, num_layers={self.num_layers}, "
                f"generative={self.generative}, regenerate_from={self.regenerate_from!r}, backend={self.backend!r}")


class CIN(nn.Module):
    """xDeepFM's Compressed Interaction Network, with an optional generator per layer.

    Layer k: ``Z^k[b, h, m, :] = x^{k-1}[b, h] * g^k[b, m]`` and ``x^k = conv1x1(Z^k)``, where the base
    model uses ``g^k = x^0 = V`` and SFG uses ``g^k = G_k(V)`` (a separate encoder per layer, fed the raw
    V). ``forward(V [B, N, D]) -> [B, sum(layer_sizes)]`` (each layer's output sum-pooled over D).
    ``dropout`` applies to the generators' outputs (the models' ``encoder_dropout``).
    """

    def __init__(self, num_fields: int, embedding_dim: int, layer_sizes: Sequence[int] = (16, 16, 16),
                 generative: bool = False, activation: str = "relu", gamma: float = 1.0,
                 encoder_bias: bool = False, residual: bool = False, backend: str = "auto",
                 dropout: float = 0.0):
        super().__init__()
        self.num_fields, self.embedding_dim = _count("num_fields", num_fields), _count("embedding_dim", embedding_dim)
        if isinstance(layer_sizes, (str, bytes)) or not hasattr(layer_sizes, "__iter__"):
            raise TypeError(f"layer_sizes must be a list of positive layer widths, got {layer_sizes!r}")
        self.layer_sizes = [_count("layer_sizes", h) for h in layer_sizes]
        if not self.layer_sizes:
            raise ValueError("layer_sizes must name at least one CIN layer, got an empty list")
        self.generative = _flag("generative", generative)
        C.check_choice("backend", backend, BACKENDS)
        self.backend = backend
        if not self.generative:
            _check_encoder_options(activation, gamma, encoder_bias, residual, dropout)
        convs = []
        prev = self.num_fields
        for h in self.layer_sizes:
            convs.append(nn.Conv1d(prev * self.num_fields, h, kernel_size=1))
            prev = h
        self.convs = nn.ModuleList(convs)
        if self.generative:
            self.generators = nn.ModuleList(
                SFGEncoder(num_fields, embedding_dim, activation, gamma, encoder_bias, residual, dropout, backend)
                for _ in self.layer_sizes)
        else:
            self.generators = None
        self.output_dim = sum(self.layer_sizes)

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        C.check_embeddings("V", V)
        if tuple(V.shape[1:]) != (self.num_fields, self.embedding_dim):
            raise ValueError(f"V must have shape [B, N, D]=[B, {self.num_fields}, {self.embedding_dim}], "
                             f"got {list(V.shape)}")
        batch, _, d = V.shape
        # floating operands of mixed dtypes run in their promoted dtype, as in the other layers
        dtype = torch.promote_types(V.dtype, self.convs[0].weight.dtype)
        V = V.to(dtype)
        x = V
        pooled = []
        for k, conv in enumerate(self.convs):
            g = self.generators[k](V) if self.generative else V
            z = torch.einsum("bhd,bmd->bhmd", x, g.to(dtype)).reshape(batch, x.shape[1] * g.shape[1], d)
            if _weights_readable(conv, nn.Conv1d):
                x = F.conv1d(z, conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype))
            else:
                x = conv(_to_parameters_dtype(conv, z)).to(dtype)    # a hooked or swapped layer: called
            pooled.append(x.sum(dim=2))
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, embedding_dim={self.embedding_dim}, layer_sizes={self.layer_sizes}, "
                f"generative={self.generative}, backend={self.backend!r}")
