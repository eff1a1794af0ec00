"""tensorly-torch (tltorch) layers in and out: decomp's plain-layer modules for tltorch's.

tltorch's factorized layers compute through their factors in code that MAC counters cannot see
(thop and ptflops count a Tucker ``FactorizedConv`` at a few percent of its cost, or 0) and
that ONNX export does not support (tensorly/torch#11). :func:`from_tltorch` replaces each one
by the decomp module that computes the same function with plain ``nn.Conv2d`` / ``nn.Linear``
layers, exactly (to float32 rounding), so the model counts, exports and saves like any decomp
model; :func:`to_tltorch` goes the other way, for training on in factorized form with tltorch's
tools. :func:`plan_from_tltorch` is the report: a :class:`~decomp.plan.Plan` with one entry per
tltorch layer, saying what it becomes or why it is left alone.

What is reproduced is tltorch's forward, whatever its ``implementation``: the stride, padding
and dilation the layer holds per axis (``from_conv`` keeps only the conv's first stride, and
this keeps what it kept), always zero padding (tltorch ignores ``padding_mode``), no groups.

============================  ==================================================================
tltorch layer                 decomp module
============================  ==================================================================
FactorizedConv, Tucker        TuckerConv2d, ranks (R_out, R_in); the spatial factors are folded
                              into the core; a channel rank above its channel count (tltorch
                              accepts those) is cut to the count exactly, by a QR of its factor
FactorizedConv, CP            CPConv2d, rank R; the CP weights are folded into the last 1x1
FactorizedConv, tensor-train  TuckerConv2d, ranks (r3, r1): the kx1 and 1xk cores merged into
                              one kxk core (exact, but r1*r3*kh*kw MACs per output pixel where
                              the two cores cost r2*(r1*kh + r3*kw), about; decomp has no TT
                              method that a saved file could rebuild)
FactorizedConv, dense         nn.Conv2d
FactorizedLinear, CP/Tucker   SVDLinear at the matrix rank the factorization bounds (CP: R;
                              Tucker: the smaller product of the in- or out-mode ranks), when
                              that costs fewer MACs than one nn.Linear; else one nn.Linear. The
                              Kronecker structure of a tensorized weight has no plain-layer form
FactorizedLinear, BlockTT     nn.Linear (reconstructed): a TT-matrix's matrix rank is not bounded
or dense                      by its TT ranks
============================  ==================================================================

Left alone, named in the plan with the reason: jointly parametrized layers (``n_layers > 1``)
and their ``SubFactorized*`` views, 1-d and 3-d convs, complex weights, TRL, TCL and
FactorizedEmbedding. Tensor hooks (tensor dropout, lasso) are not carried over.

The conversion is recorded as a plan (method "tltorch"; its layers tucker, cp or svd with their
ranks, or skipped where they become one plain layer), and this module registers a source
adapter with :func:`decomp.plan.apply.register_source`, so that ``apply(init="structure")``
rebuilds the same modules from a freshly built tltorch model: a converted model saves with
:func:`decomp.save` and loads with :func:`decomp.load` when its architecture reference builds the
tltorch model. :func:`to_tltorch` marks the layers it converts, so that converting them back
adds nothing to the record: the plans that built them rebuild them.

tltorch is imported only by :func:`to_tltorch` (``import decomp`` does not import it, nor does
:func:`from_tltorch`: no tltorch layer can exist before it is imported). Its import sets
tensorly's *global* backend to 'pytorch', which its layers need; decomp's own tensorly calls
run inside ``tl.backend_context('pytorch')`` and do not depend on the global backend.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from decomp.checkpoint import recorded_input_size
from decomp.factorize import registry
from decomp.factorize.base import Factorized
from decomp.factorize.cp import CPConv2d
from decomp.factorize.tucker import TuckerConv2d
from decomp.metrics import count_params
from decomp.plan.apply import apply, register_source
from decomp.plan.model import LayerPlan, Plan, Skip

logger = logging.getLogger(__name__)

PLAN_METHOD = "tltorch"
"""The ``method`` of a conversion plan."""
MARK_ATTR = "_decomp_to_tltorch"
"""On a model from :func:`to_tltorch`: ``{name: {"method", "ranks"}}`` of the layers it made."""
_LAYERS_MODULE = "tltorch.factorized_layers"


# ------------------------------------------------------------------------- tltorch -> decomp


def _tl() -> ModuleType | None:
    """tltorch, if it has been imported (else no module can be one of its layers)."""
    return sys.modules.get("tltorch")


def _tltorch_layers(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every tltorch layer in ``model``, with all the qualified names it is reachable under."""
    names: dict[nn.Module, list[str]] = {}
    if _tl() is None:
        return names
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_tltorch_layer(module):
            names.setdefault(module, []).append(name)
    return names


def _is_tltorch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_LAYERS_MODULE)


def _also(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _why_not(layer: nn.Module) -> str | None:
    """None when ``layer`` converts to plain layers, else why not."""
    tlt, kind = _tl(), type(layer).__name__
    if not isinstance(layer, tlt.FactorizedConv | tlt.FactorizedLinear):
        if kind.startswith("SubFactorized"):
            return f"{kind}: a view of a jointly parametrized layer, whose factors it shares"
        return f"{kind}: decomp has no plain-layer equivalent"
    weight = type(layer.weight).__name__
    if layer.n_layers != 1:
        return f"{kind} with n_layers={layer.n_layers}: its layers share their factors"
    if any(p.is_complex() for p in layer.parameters()):
        return f"{kind} with complex weights ({weight})"
    if isinstance(layer, tlt.FactorizedConv):
        if layer.order != 2:
            return f"{kind} of order {layer.order}: decomp converts 2-d convolutions"
        known = (tlt.CPTensor, tlt.TuckerTensor, tlt.TTTensor, tlt.DenseTensor)
    else:
        known = (tlt.CPTensorized, tlt.TuckerTensorized, tlt.BlockTT, tlt.DenseTensorized)
    if not isinstance(layer.weight, known):
        return f"{kind} with {weight} weights: not a factorization decomp converts"
    return None


def _where(layer: nn.Module) -> dict[str, Any]:
    p = next(layer.parameters())
    return {"device": p.device, "dtype": p.dtype}


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@torch.no_grad()
def _exact(layer: nn.Module) -> tuple[nn.Module, str]:
    """The decomp module (or one plain layer) that computes what tltorch ``layer`` computes,
    its weights set, and a note on the conversion ("" when there is nothing to say)."""
    tlt = _tl()
    convert = _conv if isinstance(layer, tlt.FactorizedConv) else _linear
    module, note = convert(tlt, layer)
    if layer.bias is not None:
        (module.last if isinstance(module, Factorized) else module).bias.copy_(layer.bias)
    if layer.weight._forward_hooks:
        note = _also(note, "its tensor hooks are not carried over")
    return module, note


def _conv(tlt: ModuleType, layer: nn.Module) -> tuple[nn.Module, str]:
    shell = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        tuple(layer.kernel_size),
        stride=_ints(layer.stride),
        padding=_ints(layer.padding),
        dilation=_ints(layer.dilation),
        bias=layer.bias is not None,
        **_where(layer),
    )
    w = layer.weight
    if isinstance(w, tlt.CPTensor):
        return _cp_conv(shell, w.weights, [f.double() for f in w.factors]), ""
    if isinstance(w, tlt.TuckerTensor):
        out, inp, vertical, horizontal = (f.double() for f in w.factors)
        core = torch.einsum("abcd,hc,wd->abhw", w.core.double(), vertical, horizontal)
        return _tucker_conv(shell, out, core, inp, "")
    if isinstance(w, tlt.TTTensor):  # (Cin, kh, kw, Cout): 1x1, kx1, 1xk, 1x1 convs
        first, vertical, horizontal, last = (f.double() for f in w.factors)
        core = torch.einsum("ahb,bwc->cahw", vertical, horizontal)
        note = "tensor-train: its kx1 and 1xk cores merged into one Tucker-2 core"
        return _tucker_conv(shell, last[:, :, 0].T, core, first[0], note)
    shell.weight.copy_(w.tensor)
    return shell, "dense nn.Conv2d: the weight is not factorized"


def _cp_conv(shell: nn.Conv2d, weights: Tensor, factors: list[Tensor]) -> CPConv2d:
    out, inp, vertical, horizontal = factors
    module = registry.get("cp").build(shell, [out.shape[1]])
    module.first.weight.copy_(inp.T[:, :, None, None])
    module.vertical.weight.copy_(vertical.T[:, None, :, None])
    module.horizontal.weight.copy_(horizontal.T[:, None, None, :])
    module.last.weight.copy_((out * weights.double())[:, :, None, None])
    return module


def _tucker_conv(
    shell: nn.Conv2d, last: Tensor, core: Tensor, first: Tensor, note: str
) -> tuple[TuckerConv2d, str]:
    """TuckerConv2d for ``last (Cout, R0) x core (R0, R1, kh, kw) x first (Cin, R1)``."""
    ranks = (last.shape[1], first.shape[1])
    last, core = _cut(last, core, 0)
    first, core = _cut(first, core, 1)
    module = registry.get("tucker").build(shell, [last.shape[1], first.shape[1]])
    if tuple(module.ranks) != ranks:
        note = _also(note, f"ranks {ranks} above the channel counts cut exactly to {module.ranks}")
    module.first.weight.copy_(first.T[:, :, None, None])
    module.core.weight.copy_(core)
    module.last.weight.copy_(last[:, :, None, None])
    return module, note


def _cut(factor: Tensor, core: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """A factor (C, R) with R > C as Q (C, C) and its R (C, R) folded into the core's ``mode``:
    the same product, at a rank the channel count allows."""
    if factor.shape[1] <= factor.shape[0]:
        return factor, core
    q, r = torch.linalg.qr(factor)
    return q, torch.tensordot(r, core, dims=([1], [mode])).movedim(0, mode)


def _linear(tlt: ModuleType, layer: nn.Module) -> tuple[nn.Module, str]:
    in_f, out_f = int(layer.in_features), int(layer.out_features)
    shell = nn.Linear(in_f, out_f, bias=layer.bias is not None, **_where(layer))
    w, name = layer.weight, type(layer.weight).__name__
    n_out = len(w.tensorized_shape[0])  # the modes are (*out_modes, *in_modes)
    if isinstance(w, tlt.CPTensorized):
        factors = [f.double() for f in w.factors]
        first = _khatri_rao(factors[n_out:]).T
        last = _khatri_rao(factors[:n_out]) * w.weights.double()
    elif isinstance(w, tlt.TuckerTensorized):
        factors = [f.double() for f in w.factors]
        u_out, u_in = _kron(factors[:n_out]), _kron(factors[n_out:])
        core = w.core.double().reshape(u_out.shape[1], u_in.shape[1])
        if u_in.shape[1] <= u_out.shape[1]:
            first, last = u_in.T, u_out @ core
        else:
            first, last = core @ u_in.T, u_out
    else:
        matrix = _block_tt(w) if isinstance(w, tlt.BlockTT) else w.tensor.reshape(out_f, in_f)
        shell.weight.copy_(matrix)
        return shell, f"dense nn.Linear: a {name} weight has no low-rank plain form"
    rank = first.shape[0]
    if rank * (in_f + out_f) >= in_f * out_f:
        shell.weight.copy_(last @ first)
        return shell, f"dense nn.Linear: fewer MACs than SVD factors of rank {rank}"
    module = registry.get("svd").build(shell, [rank])
    module.first.weight.copy_(first)
    module.last.weight.copy_(last)
    return module, ""


def _khatri_rao(factors: Sequence[Tensor]) -> Tensor:
    """Column-wise Kronecker product (prod dim_k, R), the first factor's index slowest."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, out.shape[1])
    return out


def _kron(factors: Sequence[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


def _block_tt(w: nn.Module) -> Tensor:
    """The (out, in) matrix of a TT-matrix whose cores are (r, out_k, in_k, r')."""
    res = w.factors[0][0]  # (out_1, in_1, r_1)
    for core in w.factors[1:]:
        res = torch.einsum("abr,rcds->acbds", res, core)
        res = res.reshape(res.shape[0] * res.shape[1], -1, core.shape[3])
    return res[..., 0]


def _plain(module: nn.Module) -> nn.Module | None:
    """The source adapter (see :func:`decomp.plan.apply.register_source`): the plain layer a
    convertible tltorch layer computes; None for anything else."""
    if _tl() is None or not _is_tltorch_layer(module) or _why_not(module) is not None:
        return None
    new, _ = _exact(module)
    method = registry.method_of(new)
    return new if method is None else method.dense(new)


register_source(_plain)


def _layer_plan(names: list[str], layer: nn.Module) -> LayerPlan:
    tlt = _tl()
    if isinstance(layer, tlt.FactorizedConv):
        kind, shape = "conv", [layer.out_channels, layer.in_channels, *layer.kernel_size]
    elif isinstance(layer, tlt.FactorizedLinear):
        kind, shape = "linear", [int(layer.out_features), int(layer.in_features)]
    else:
        kind, shape = type(layer).__name__, []
    params = sum(p.numel() for p in layer.parameters())
    lp = LayerPlan(names[0], kind, shape, params_before=params, aliases=names[1:])
    why = _why_not(layer)
    if why is not None:
        lp.skip_as(Skip.CUSTOM_FORWARD, why)
        return lp
    new, note = _exact(layer)
    lp.params_after = sum(p.numel() for p in new.parameters())
    if isinstance(new, Factorized):
        lp.method, lp.ranks, lp.reason = new.method, list(new.ranks), note
    else:
        lp.skip, lp.reason = Skip.LAYER_KIND, note
    return lp


def plan_from_tltorch(model: nn.Module) -> Plan:
    """What :func:`from_tltorch` does to each tltorch layer of ``model``, without changing it.

    Returns:
        A plan of method "tltorch": a layer that becomes a decomp module has its method and
        ranks (and a note in ``reason`` where there is one); a layer that becomes one plain
        layer is skipped as ``Skip.LAYER_KIND``, one that stays a tltorch layer as
        ``Skip.CUSTOM_FORWARD``, each with the reason. MACs are not measured (0); the input
        size is the one the model records, if any.
    """
    layers = [_layer_plan(names, m) for m, names in _tltorch_layers(model).items()]
    size = recorded_input_size(model) or []
    return Plan(PLAN_METHOD, "exact", size, layers, model_params=count_params(model))


def from_tltorch(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> nn.Module:
    """Replace every tltorch layer of ``model`` by the decomp module that computes the same.

    See the module docstring for what each kind of layer becomes. The conversion is recorded
    as a plan (see :func:`plan_from_tltorch`), so the result saves with :func:`decomp.save`
    when its architecture reference builds ``model``.

    Args:
        model: a model holding tltorch layers (one without any is returned as it is, copied
            unless ``inplace``).
        inplace: change ``model`` itself instead of a deep copy.
        strict: raise a ValueError naming every layer that cannot be converted, instead of
            leaving those as they are (with a warning).

    Returns:
        The converted model.
    """
    p = plan_from_tltorch(model)
    left = [lp for lp in p.layers if lp.skip is Skip.CUSTOM_FORWARD]
    if left:
        listed = "; ".join(f"{lp.name} ({lp.reason})" for lp in left)
        if strict:
            raise ValueError(f"{len(left)} tltorch layer(s) cannot be converted: {listed}")
        logger.warning("left as tltorch layers: %s", listed)
    converted = [lp for lp in p.layers if lp.skip is not Skip.CUSTOM_FORWARD]
    sources = {lp.name: model.get_submodule(lp.name) for lp in converted}
    target = model if inplace else copy.deepcopy(model)
    marks = dict(getattr(target, MARK_ATTR, {}))
    back = {lp.name for lp in converted if lp.method and marks.get(lp.name) == _mark(lp)}
    p.layers = [lp for lp in p.layers if lp.name not in back]
    if any(lp.skip is not Skip.CUSTOM_FORWARD for lp in p.layers):
        target = apply(target, p, inplace=True, init="structure")
    for lp in converted:
        layer = sources[lp.name]
        new, _ = _exact(layer)
        if lp.name in back:  # made by to_tltorch: the plans that built the original rebuild it
            _replace(target, [lp.name, *lp.aliases], new.train(layer.training))
            for name in [lp.name, *lp.aliases]:
                marks.pop(name, None)
        else:  # the module apply built from the plan, given the exact weights
            target.get_submodule(lp.name).load_state_dict(new.state_dict())
    _set_marks(target, marks)
    if converted:
        logger.info("from_tltorch: %d tltorch layer(s) converted", len(converted))
    return target


def _mark(lp: LayerPlan) -> dict[str, Any]:
    return {"method": lp.method, "ranks": list(lp.ranks)}


def _set_marks(model: nn.Module, marks: dict[str, Any]) -> None:
    if marks:
        setattr(model, MARK_ATTR, marks)
    elif hasattr(model, MARK_ATTR):
        delattr(model, MARK_ATTR)


def _replace(model: nn.Module, names: list[str], new: nn.Module) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


# ------------------------------------------------------------------------- decomp -> tltorch


def _import_tltorch() -> ModuleType:
    import tltorch  # its first import sets tensorly's global backend to 'pytorch'

    return tltorch


def _zero_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv``'s padding as the symmetric numbers tltorch takes; None where it cannot be."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    return _ints(conv.padding)


def _spatial(module: TuckerConv2d | CPConv2d) -> tuple[dict[str, tuple[int, int]] | None, str]:
    """stride, padding and dilation of ``module``'s spatial conv(s) for tltorch, or why not."""
    convs = (
        [module.core] if isinstance(module, TuckerConv2d) else [module.vertical, module.horizontal]
    )
    if any(c.padding_mode != "zeros" for c in convs):
        return None, f"padding_mode={convs[0].padding_mode}: tltorch pads with zeros only"
    pads = [_zero_padding(c) for c in convs]
    if None in pads:
        return None, "'same' padding with an even kernel is asymmetric; tltorch pads symmetrically"
    first, last = convs[0], convs[-1]  # CP: vertical holds the height's, horizontal the width's
    return {
        "stride": (first.stride[0], last.stride[1]),
        "padding": (pads[0][0], pads[-1][1]),
        "dilation": (first.dilation[0], last.dilation[1]),
    }, ""


@torch.no_grad()
def _factorized_conv(tlt: ModuleType, module: TuckerConv2d | CPConv2d, spatial: dict) -> nn.Module:
    first, last = module.first.weight[:, :, 0, 0], module.last.weight[:, :, 0, 0]
    c_out, c_in = last.shape[0], first.shape[1]
    if isinstance(module, TuckerConv2d):
        kh, kw = module.core.kernel_size
        rank, factorization = (*module.ranks, kh, kw), "tucker"
    else:
        kh, kw = module.vertical.kernel_size[0], module.horizontal.kernel_size[1]
        rank, factorization = module.ranks[0], "cp"
    conv = tlt.FactorizedConv(
        c_in,
        c_out,
        (kh, kw),
        **spatial,
        bias=module.last.bias is not None,
        factorization=factorization,
        rank=rank,
        implementation="factorized",
        device=first.device,
        dtype=first.dtype,
    )
    w = conv.weight
    if isinstance(module, TuckerConv2d):
        w.core.copy_(module.core.weight)
        spatial_eyes = [torch.eye(k, device=first.device, dtype=first.dtype) for k in (kh, kw)]
        factors = [last, first.T, *spatial_eyes]
    else:
        w.weights.fill_(1)
        vertical, horizontal = module.vertical.weight, module.horizontal.weight
        factors = [last, first.T, vertical[:, 0, :, 0].T, horizontal[:, 0, 0, :].T]
    for param, value in zip(w.factors, factors, strict=True):
        param.copy_(value)
    if conv.bias is not None:
        conv.bias.copy_(module.last.bias)
    return conv


def to_tltorch(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace decomp's Tucker-2 and CP convs by tltorch ``FactorizedConv`` layers
    (``implementation='factorized'``) that compute the same, to train on with tltorch's tools.

    A Tucker-2 conv becomes a Tucker FactorizedConv of ranks (r_out, r_in, kh, kw), its spatial
    factors identities; a CP conv a CP FactorizedConv of the same rank, its weights ones.
    :func:`from_tltorch` converts them back to the same modules and ranks, adding nothing to
    the model's record of plans (so the result saves as the original did). A layer tltorch
    cannot express (a padding_mode other than zeros, asymmetric 'same' padding) is left as it
    is, with a warning. Imports tltorch (see the module docstring on its global backend).

    Args:
        model: a model holding decomp TuckerConv2d / CPConv2d modules.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The model with tltorch layers.
    """
    tlt = _import_tltorch()
    target = model if inplace else copy.deepcopy(model)
    found: dict[nn.Module, list[str]] = {}
    for name, module in target.named_modules(remove_duplicate=False):
        if type(module) in (TuckerConv2d, CPConv2d):
            found.setdefault(module, []).append(name)
    marks = dict(getattr(target, MARK_ATTR, {}))
    for module, names in found.items():
        spatial, why = _spatial(module)
        if spatial is None:
            logger.warning("to_tltorch: %s left as %s (%s)", names[0], type(module).__name__, why)
            continue
        _replace(target, names, _factorized_conv(tlt, module, spatial).train(module.training))
        marks.update(dict.fromkeys(names, {"method": module.method, "ranks": list(module.ranks)}))
    _set_marks(target, marks)
    return target
