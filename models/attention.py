"""Self-attention for the ViT family: one class per attention kind, chosen by name.

``Attention`` is plain multi-head softmax attention through ``scaled_dot_product_attention``
with timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``), so timm weights load.

The contract of a kind (``@register_attention("name")``, selected by ``MODEL.VIT.ATTN``):

- ``__init__(self, dim, num_heads=8, *, <options>, **base)``. The keyword-only arguments
  after ``*`` are the kind's options, set with ``MODEL.VIT.ATTN_ARGS`` (``attn_args`` in
  Python) and forwarded unchanged; each default's type is the option's type, so names and
  types are checked when the config loads. A value that cannot work raises ValueError
  naming the option. ``base`` (qkv_bias, grid_size, num_prefix_tokens, ...) comes from the
  model and goes to ``Attention.__init__`` unchanged.
- ``attend(self, q, k, v)``: (B, heads, N, head_dim) each -> (B, heads, N, head_dim);
  ``self.sdpa(q, k, v)`` is softmax attention at the layer's scale and dropout. The model
  passes timm's ``attn_mask`` and ``is_causal`` only to an ``attend`` that declares both,
  ``attend(self, q, k, v, attn_mask=None, is_causal=False)``; one that declares neither
  refuses them (ValueError). A kind that needs the tokens themselves, not only q, k, v
  (deformable attention predicts its sampling points from them), overrides ``forward``
  instead.
- ``set_grid(grid_size)``: the patch grid changed (``set_input_size``, or a
  ``dynamic_img_size`` model seeing another input size). A kind whose state depends on the
  grid (masks, relative indices, reference points, tile layouts) rebuilds it here; its
  construction-time options (spans, table sizes) stay fixed. ``Attention.set_grid`` records
  ``grid_size``; overrides call it first.
- optional hooks the model forwards: ``set_progress(epoch, step)`` (schedules),
  ``set_layer_index(i)`` (per-layer state), ``init_weights()`` (after timm's init).

Derived state (masks, indices) lives in non-persistent buffers built by these hooks, never
inside ``forward``: buffers follow ``.to()``, stay out of checkpoints, and a forward without
side effects can be traced (torch.fx), scripted and exported. Keep their names and shapes
fixed while training (timm's ModelEmaV3 copies buffers by position, without hooks). Call
``sdpa`` rather than ``super().attend``: TorchScript has no ``super()``. A kind that refuses
or combines ``attn_mask`` / ``is_causal`` reads them through ``given_masks`` (torch.fx).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import contextlib
import inspect

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .registry import ModelArgumentError, check_arguments, keyword_parameters

ATTENTION_KINDS: dict[str, type[nn.Module]] = {}


def register_attention(name: str):
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ATTENTION_KINDS:
            raise ValueError(f"attention kind {name!r} registered twice")
        ATTENTION_KINDS[name] = cls
        return cls
    return wrap


def attention_kind(name: str) -> type[nn.Module]:
    """The class registered as ``name``; ModelArgumentError (naming ``attn``) otherwise."""
    if name not in ATTENTION_KINDS:
        raise ModelArgumentError(f"attn {name!r} is not an attention kind; known: "
                                 f"{', '.join(sorted(ATTENTION_KINDS))}", "attn")
    return ATTENTION_KINDS[name]


def check_attention_args(name: str, args: Optional[dict[str, Any]]) -> None:
    """Names and types of ``args`` against the options of attention kind ``name``."""
    kind = attention_kind(name)
    if args is not None and not isinstance(args, dict):
        raise ModelArgumentError(f"attn_args: expected a mapping of options, got {args!r}", "attn_args")
    check_arguments(keyword_parameters(kind, keyword_only=True), args or {},
                    f"attention {name!r}", prefix="attn_args.")


def given_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> tuple[Optional[torch.Tensor], bool]:
    """``attn_mask`` and ``is_causal`` as values a kind may branch on (refuse, combine).

    torch.fx traces the model's optional mask arguments as graph inputs even when none is
    given; a kind that branches on them reads those as not given, so its graph takes no mask.
    """
    if not torch.jit.is_scripting():
        if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
            return None, False
    return attn_mask, is_causal


def float32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: the numerically delicate math inside (the FAVOR+
    estimator, position scores, sampling positions) runs in the float32 its inputs are cast
    to, whatever the run's autocast (bf16 / fp16 round, overflow or quantise it). A device
    without autocast (meta) and a torch.fx Proxy (fx records no autocast state) get a no-op;
    TorchScript needs a constant device: scripted kinds skip the region there."""
    device = x.device.type if isinstance(x, torch.Tensor) else "meta"
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


@register_attention("softmax")
class Attention(nn.Module):
    """Softmax attention over tokens ``[prefix tokens (CLS...), patches in raster order]``.

    ``grid_size`` and ``num_prefix_tokens`` describe that layout for kinds that need
    positions (locality masks, relative positions, sampling on the patch grid).
    """

    # a TorchScript constant, so that scripting compiles only the call this kind's attend takes
    __constants__ = ["attend_takes_masks"]

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None,
                 grid_size: tuple[int, int] = (14, 14), num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the width {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5  # logits = q . k * scale (kinds may change it)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        declared = {"attn_mask", "is_causal"} & set(inspect.signature(type(self).attend).parameters)
        if len(declared) == 1:
            raise TypeError(f"{type(self).__name__}.attend declares {declared.pop()} alone: declare "
                            "attn_mask and is_causal, or neither")
        self.attend_takes_masks = bool(declared)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """The model's patch grid is now ``grid_size`` (H, W); kinds rebuild grid state."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, C) -> q, k, v (B, heads, N, head_dim), q and k normed."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Heads (B, heads, N, head_dim) -> output tokens (B, N, C)."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, -1))))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C). The masks reach ``attend`` if it declares them."""
        q, k, v = self.qkv_heads(x)
        if self.attend_takes_masks:
            return self.project(self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal))
        attn_mask, is_causal = given_masks(attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("this attention kind takes no attn_mask or is_causal: its "
                             "attend(q, k, v) declares neither")
        return self.project(self.attend(q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        return self.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """Softmax attention at this layer's scale and dropout: what kinds build on."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0)


# ------------------------------------------------------------------------ FlexAttention
# An optional backend of the kinds with a fixed sparsity pattern (LAI's window here, DAT's
# neighborhood attention in dat_attention.py): ``backend="auto"`` takes it where it is the
# faster one (``AUTO_FLEX_DEVICES``: CUDA; on the CPU it was 2-8x slower than the current
# paths and has no backward), ``"flex"`` asks for it (a ValueError naming the option where it
# cannot run: a torch without it, or a machine where torch.compile cannot build its kernels).
try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # a torch build without FlexAttention
    BlockMask = create_block_mask = _flex_attention = None  # type: ignore[assignment,misc]

AUTO_FLEX_DEVICES = ("cuda",)

# Whether torch.compile can build FlexAttention's kernels here is the program's question
# (main.py asks compiling.py, which calls set_flex_check); unasked, they are assumed buildable.
_flex_check: Optional[Callable[[], Optional[str]]] = None
_flex_refused: Optional[str] = None


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention)."""
    return _flex_attention is not None


def set_flex_check(check: Optional[Callable[[], Optional[str]]]) -> None:
    """``check()`` says why FlexAttention's kernels cannot be built on this machine, or None;
    it is asked once, when a layer first needs the answer ('flex' at construction, 'auto' on
    an ``AUTO_FLEX_DEVICES`` device). A refusal turns 'auto' to the current path and makes
    'flex' a ValueError naming the option."""
    global _flex_check, _flex_refused
    _flex_check, _flex_refused = check, None


def flex_refusal() -> Optional[str]:
    """Why FlexAttention cannot run here (a torch without it; the check's answer), or None."""
    global _flex_check, _flex_refused
    if _flex_attention is None:
        return f"this torch ({torch.__version__}) has no FlexAttention (torch.nn.attention.flex_attention)"
    if _flex_check is not None:
        _flex_refused, _flex_check = _flex_check(), None
    return _flex_refused


def auto_flex(device: str) -> bool:
    """Whether backend 'auto' runs FlexAttention on ``device`` (a device type)."""
    return device in AUTO_FLEX_DEVICES and flex_refusal() is None


def check_backend(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` of the backend option ``option`` (one of ``choices``: 'auto', the current
    path's name, 'flex'); 'flex' where it cannot run is a ValueError naming it."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    why = flex_refusal() if value == "flex" else None
    if why:
        raise ValueError(f"{option}='flex': {why}; use {option}='auto'")
    return value


def use_flex(option: str, backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` ('auto', 'flex' or the current path) runs FlexAttention for these
    inputs (``auto_flex`` for 'auto'). FlexAttention has no backward on the CPU, so an
    explicit 'flex' there while gradients are needed is a ValueError naming ``option``."""
    device = tensors[0].device.type
    if backend == "flex":
        if device in ("cpu", "mps") and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ValueError(f"{option}='flex': FlexAttention has no backward on the {device} in torch "
                             f"{torch.__version__}; train with {option}='auto' (inference may use 'flex')")
        return True
    return backend == "auto" and auto_flex(device)


# torch.compile's options for FlexAttention (a test may add a cheaper backend). fullgraph:
# past the recompile limit it raises instead of running the unfused path, which materialises
# the B * heads * N^2 scores in float32.
FLEX_COMPILE: dict[str, Any] = dict(dynamic=False, fullgraph=True)
# each compiled function its own recompile region (isolate_recompiles; an older torch's share one)
_FLEX_REGIONS = {"isolate_recompiles": True} \
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
_compiled_flex: dict[tuple, Callable] = {}


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod=None,
                   block_mask=None, scale: Optional[float] = None) -> torch.Tensor:
    """FlexAttention, through torch.compile (its efficient kernels are generated; eager
    FlexAttention is a dense reference), or directly while already compiling / exporting.

    One compiled function per signature (the shapes after the batch, dtype, device), each its
    own recompile region, with a dynamic batch: within one only the grad mode (training,
    evaluation) recompiles, so a run's stages, models (teacher, EMA), partial batches and LAI
    radii (a tensor the mask reads) stay within torch's recompile limit (8 per region)."""
    if torch.compiler.is_compiling():
        return _flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    key = (q.shape[1:], k.shape[1:], v.shape[1:], q.dtype, q.device)
    compiled = _compiled_flex.get(key)
    if compiled is None:
        compiled = _compiled_flex[key] = torch.compile(_flex_attention, **FLEX_COMPILE, **_FLEX_REGIONS)
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
