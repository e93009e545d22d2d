"""attnmem inside Hugging Face ``transformers``: one name for the attention AND the mask.

transformers chooses both functions by ``config._attn_implementation``: the attention function
from ``AttentionInterface`` and the mask builder from ``AttentionMaskInterface``. A name missing
from the second gets ``attention_mask=None`` in every layer, so padding, sliding windows and
packed sequences would vanish without an error; ``register`` therefore fills both::

    import attnmem.integrations.hf as amhf
    amhf.use(model, method="chunked")           # register "attnmem" and switch the model
    model(input_ids, attention_mask=padding)    # exact attention, no N×N tensor anywhere

The mask builder never evaluates anything: it returns an ``HFMask``, a description of the
call (HF's mask function, the query/key offsets, the 2-D padding). The attention function turns
that description, with the real Nq and Nk of the call, into structured ``attnmem.masks``:

    HF mask function                         attnmem mask (query i, key j, relative to the
                                             aligned diagonal; ``W`` = HF's sliding_window)
    causal_mask_function                     causal()
    sliding_window_overlay(W) & causal       sliding_window(W - 1, 0)   (W keys, itself included)
    bidirectional_mask_function              none
    sliding_window_bidirectional_overlay(W)  sliding_window(W, W)
    chunked_overlay(C, left_padding)         document(chunk ids) & causal()
    packed_sequence_mask_function(ids)       document(ids)  (positions remapped: same mask)
    2-D padding mask                         key_padding(valid)
    anything else                            from_mod(fn), with a one-time warning (O(N²) map)

Static caches hand over ``max_cache_len`` keys whose tail is still empty; for causal masks the
keys after the last query's position are cut (as HF's sdpa path does), which also aligns
attnmem's bottom-right causal diagonal with HF's absolute positions. The output is returned
as a (B, N, H, D)-contiguous tensor, so the model's ``transpose(1, 2)`` is free.

Routed to ``attnmem.attention``: softcap (Gemma 2) as ``score_mod=scores.softcap(cap)``,
attention sinks ``s_aux`` (gpt-oss) as ``sinks``, attention dropout in training as
``dropout_p``. Raises (per call), naming the feature: T5's ``position_bias``,
``output_attentions=True``, a head mask, a float bias mask, and any keyword this module does
not know.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import math
import re
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    import transformers
    from transformers import AttentionInterface
    from transformers import masking_utils as hf_masking
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        "attnmem.integrations.hf needs Hugging Face transformers; install the extra: "
        "pip install 'attnmem[hf]' (transformers==5.24.0)"
    ) from e

from .. import masks, registry, scores
from ..api import attention
from ..masks import Mask
from ..memory.measure import MiB, Peak

#: The transformers release whose mask functions this module recognises (pinned by the extra).
TESTED_VERSION = "5.24.0"

# Substrings transformers routes to its own backends' capability checks or kernels.
_ROUTED = ("sdpa", "flash", "flex_attention", "paged", "eager")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# Keywords the models pass that change nothing here (bookkeeping, or flash-only hints).
_HARMLESS = frozenset({
    "position_ids", "use_cache", "cache_position", "deterministic", "output_hidden_states",
    "output_router_logits", "num_items_in_batch", "return_dict", "max_length_q", "max_length_k",
    "seq_idx", "layer_idx", "query_length", "key_length", "target_dtype",
})


@dataclass
class _Binding:
    method: str
    options: dict[str, Any]


_BINDINGS: dict[str, _Binding] = {}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


# --- registration ---------------------------------------------------------------------------


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not _NAME.match(name):
        raise ValueError(
            f"name must be letters, digits and underscores, starting with a letter (transformers reads "
            f"'org/repo' as a Hub kernel and 'paged|' as a prefix), got {name!r}"
        )
    routed = [word for word in _ROUTED if word in name.lower()]
    if routed:
        raise ValueError(
            f"name {name!r} contains {routed[0]!r}: transformers routes such names to its own backend's "
            f"checks instead of the registered function; choose another name, e.g. 'attnmem'"
        )
    ours = name in _BINDINGS
    for interface, kind in ((AttentionInterface, "AttentionInterface"),
                            (AttentionMaskInterface, "AttentionMaskInterface")):
        if name in interface._global_mapping and not ours:
            raise ValueError(f"name {name!r} is already registered in transformers' {kind} by someone else; "
                             f"choose another name")
    return name


def register(method: str = "chunked", name: str = "attnmem", **options: Any) -> str:
    """Register attnmem ``method`` under ``name`` as both the attention and the mask function.

    Args:
        method: a registered, stateless attnmem method (``attnmem.methods()``); ``"auto"``
            dispatches per call.
        name: the ``attn_implementation`` string; it must not contain ``sdpa``, ``flash``,
            ``flex_attention``, ``paged`` or ``eager`` (transformers routes those elsewhere).
            Registering the same name again replaces its method and options.
        **options: the method's own options (``q_tile=...``, ``kv_tile=...``), checked now.

    Returns:
        ``name``, to pass as ``attn_implementation=`` or to ``model.set_attn_implementation``.

    Raises:
        TypeError/ValueError: a bad name, a name taken by another library, an unknown method,
            a stateful method, or an option the method does not take.
    """
    _check_name(name)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if method != "auto":
        m = registry.get(method)
        if m.stateful:
            raise ValueError(f"method {method!r} has learned parameters or state; a Hugging Face model's "
                             f"attention layers cannot hold them: choose a stateless method")
        m.make_options(options)
    if transformers.__version__ != TESTED_VERSION:
        _warn_once("version", f"attnmem.integrations.hf recognises the mask functions of transformers "
                              f"{TESTED_VERSION}; found {transformers.__version__}: unrecognised ones fall back to "
                              f"from_mod (correct, O(N²) block maps)")
    _BINDINGS[name] = _Binding(method, dict(options))
    AttentionInterface.register(name, _make_attention_fn(name))
    AttentionMaskInterface.register(name, mask_interface)
    return name


def use(model: Any, method: str = "chunked", name: str = "attnmem", **options: Any) -> Any:
    """Register ``method`` (as ``register``) and switch ``model`` (and its sub-models) to it.

    Returns the model. Raises ``TypeError`` for an object that is not a transformers model.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register(method, name, **options)
    model.set_attn_implementation(name)
    return model


def registered() -> dict[str, tuple[str, dict[str, Any]]]:
    """Names registered by this module: ``{name: (method, options)}``."""
    return {n: (b.method, dict(b.options)) for n, b in _BINDINGS.items()}


# --- the mask interface: a description, never a tensor ---------------------------------------


@dataclass(frozen=True)
class HFMask:
    """What transformers asked for, kept lazy until the attention call knows Nq and Nk.

    ``mask_function`` takes absolute positions (``q_idx + q_offset``, ``kv_idx + kv_offset``);
    ``padding`` is the 2-D mask (B, kv_offset + kv_length), True = a real token, or None.
    ``ndim``/``shape`` let transformers' own checks (``attention_mask.ndim == 2``) pass it by.
    """

    mask_function: Callable
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: Tensor | None

    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                   mask_function: Callable = hf_masking.causal_mask_function,
                   attention_mask: Any = None, **_unused: Any) -> HFMask:
    """The ``AttentionMaskInterface`` entry: O(B·N) work, no (Nq, Nk) tensor.

    A description handed back in (generate() with a static cache builds the masks first and the
    model's forward asks again with them) passes through unchanged.
    """
    if isinstance(attention_mask, HFMask):
        return attention_mask
    padding = hf_masking.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv_offset + kv_length)
    if padding is not None:
        padding = padding.to(torch.bool)
        if bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            padding = None  # no padding in reach: keep the unmasked fast paths
    # Static caches report the query offset as a tensor (to avoid graph breaks).
    q_off = int(q_offset.item()) if isinstance(q_offset, Tensor) else int(q_offset)
    return HFMask(mask_function, int(batch_size), int(q_length), int(kv_length), q_off, int(kv_offset), padding)


# --- HF mask function -> attnmem mask ----------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """One attention call after the cut: absolute position of query i is ``q_offset + i``."""

    batch: int
    nq: int
    nk: int
    q_offset: int
    kv_offset: int

    @property
    def aligned(self) -> bool:
        """attnmem's bottom-right diagonal is HF's absolute one."""
        return self.q_offset - self.kv_offset == self.nk - self.nq


def _kind(fn: Callable) -> str:
    """``"causal_mask_function"``, ``"sliding_window_overlay"``, ... for HF's own mask
    functions and their closures; ``""`` for anything else."""
    if getattr(fn, "__module__", None) != hf_masking.__name__:
        return ""
    qual = getattr(fn, "__qualname__", "")
    return qual.split(".<locals>.")[0]


def _closure(fn: Callable) -> dict[str, Any]:
    return inspect.getclosurevars(fn).nonlocals


def _children(fn: Callable) -> tuple[Callable, ...]:
    return tuple(_closure(fn)["mask_functions"])


def _bounded(fn: Callable) -> bool:
    """Whether ``fn`` never allows a key after the query's own position (so later keys can go)."""
    kind = _kind(fn)
    if kind == "causal_mask_function":
        return True
    if kind == "and_masks":
        return any(_bounded(c) for c in _children(fn))
    if kind == "or_masks":
        return all(_bounded(c) for c in _children(fn))
    if kind == "remap_positions_for_packed_sequence":
        return _bounded(_closure(fn)["mask_function"])
    return False


_RELATIVE = {"causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay",
             "sliding_window_bidirectional_overlay"}


def _relative(fn: Callable) -> bool:
    """Whether ``fn`` depends on ``kv_idx - q_idx`` only (then packed-position remapping, which
    keeps differences inside a sequence, changes nothing once the sequences are separated)."""
    kind = _kind(fn)
    if kind in ("and_masks", "or_masks"):
        return all(_relative(c) for c in _children(fn))
    return kind in _RELATIVE


def _from_hf_mod(fn: Callable, g: _Geometry) -> Mask:
    name = getattr(fn, "__qualname__", repr(fn))
    _warn_once(f"from_mod:{name}",
               f"attnmem.integrations.hf: mask function {name} is not one attnmem recognises; it runs "
               f"through masks.from_mod, whose block map evaluates it over all Nq×Nk pairs, one query tile "
               f"at a time (O(N²) time per call, O(tile·N) memory)")
    q_off, kv_off = g.q_offset, g.kv_offset

    def shifted(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + q_off, kv_idx + kv_off)

    return masks.from_mod(shifted, name=f"hf:{name}")


def _and(a: Mask | None, b: Mask | None) -> Mask | None:
    if isinstance(a, masks.SlidingWindow) and isinstance(b, masks.SlidingWindow):
        # One window, not an intersection of two: HF's "sliding overlay & causal" becomes the
        # single sliding_window(W - 1, 0) whose tiles the kernels know.
        return masks.SlidingWindow(_tighter(a.left, b.left), _tighter(a.right, b.right))
    return b if a is None else a if b is None else a & b


def _tighter(x: int | None, y: int | None) -> int | None:
    return y if x is None else x if y is None else min(x, y)


def _or(a: Mask | None, b: Mask | None) -> Mask | None:
    return None if a is None or b is None else a | b


def _positions_ids(ids: Tensor, offset: int, n: int, batch: int) -> Tensor | None:
    """Columns ``[offset, offset + n)`` of a (B, L) id table, or None when they are not there."""
    if ids.dim() != 2 or ids.shape[-1] < offset + n or ids.shape[0] not in (1, batch):
        return None
    return ids[:, offset:offset + n].long()


def _translate(fn: Callable, g: _Geometry, packed: bool = False) -> Mask | None:
    """The attnmem mask of HF mask function ``fn`` for this call (None = every pair)."""
    kind = _kind(fn)
    if kind == "and_masks":
        kids = _children(fn)
        has_packed = packed or any(_kind(c) == "packed_sequence_mask_function" for c in kids)
        out: Mask | None = None
        for c in kids:
            out = _and(out, _translate(c, g, has_packed))
        return out
    if kind == "or_masks":
        parts = [_translate(c, g, packed) for c in _children(fn)]
        out = parts[0]
        for p in parts[1:]:
            out = _or(out, p)
        return out
    if kind == "bidirectional_mask_function":
        return None
    if kind == "causal_mask_function" and g.aligned:
        return masks.causal()
    if kind == "sliding_window_overlay" and g.aligned:
        # HF: kv > q - W, i.e. the W keys ending at the query; with causal that is (W - 1, 0).
        return masks.SlidingWindow(int(_closure(fn)["sliding_window"]) - 1, None)
    if kind == "sliding_window_bidirectional_overlay" and g.aligned:
        w = int(_closure(fn)["sliding_window"])
        return masks.sliding_window(w, w)
    if kind == "chunked_overlay":
        cv = _closure(fn)
        size, left = int(cv["chunk_size"]), cv["left_padding"].long().reshape(-1, 1)  # (B, 1)
        q_pos = torch.arange(g.nq, device=left.device) + g.q_offset
        kv_pos = torch.arange(g.nk, device=left.device) + g.kv_offset
        q_chunk = torch.div(q_pos[None, :] - left, size, rounding_mode="floor")  # (B, Nq)
        kv_chunk = torch.div(kv_pos[None, :] - left, size, rounding_mode="floor")  # (B, Nk)
        return masks.document(q_chunk, kv_chunk)
    if kind == "padding_mask_function":
        valid = _positions_ids(_closure(fn)["padding_mask"], g.kv_offset, g.nk, g.batch)
        if valid is not None:
            return masks.key_padding(valid.bool())
    if kind == "packed_sequence_mask_function":
        ids = _closure(fn)["packed_sequence_mask"]
        q_ids = _positions_ids(ids, g.q_offset, g.nq, g.batch)
        kv_ids = _positions_ids(ids, g.kv_offset, g.nk, g.batch)
        if q_ids is not None and kv_ids is not None:
            return masks.document(q_ids, kv_ids)
    if kind == "remap_positions_for_packed_sequence" and packed:
        inner = _closure(fn)["mask_function"]
        if _relative(inner):
            return _translate(inner, g, packed)
    return _from_hf_mod(fn, g)


def _cu_documents(cu_q: Tensor | None, cu_k: Tensor | None, nq: int, nk: int, batch: int) -> Mask | None:
    """A document mask from flash-style ``cu_seq_lens_*`` (packed rows, batch 1)."""
    if cu_q is None and cu_k is None:
        return None
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    for arg, cu, n in (("cu_seq_lens_q", cu_q, nq), ("cu_seq_lens_k", cu_k, nk)):
        if batch != 1 or cu.dim() != 1 or int(cu[-1]) != n:
            raise ValueError(f"{arg} must be a 1-d cumulative length ending at the packed length {n} "
                             f"with batch 1, got shape {tuple(cu.shape)} ending at {int(cu[-1])} (batch {batch})")
    q_ids = torch.bucketize(torch.arange(nq, device=cu_q.device), cu_q[1:].long(), right=True)  # (Nq,)
    kv_ids = torch.bucketize(torch.arange(nk, device=cu_k.device), cu_k[1:].long(), right=True)  # (Nk,)
    return masks.document(q_ids, kv_ids)


def _dense_from_hf(mask: Tensor) -> Tensor:
    """A user's own 4-d mask (transformers passes it through): bool as is; an additive float mask
    only when every entry is 0 (attend) or the dtype's minimum / -inf (blocked)."""
    if mask.dtype == torch.bool:
        return mask
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError("attention_mask: an additive float bias (values other than 0 and the dtype's minimum) is "
                         "not supported by attnmem; pass a bool mask, or use attn_implementation='eager'")
    return ~blocked


def structured_mask(desc: Any, key: Tensor, value: Tensor, *, batch: int, nq: int,
                    is_causal: bool) -> tuple[Mask | None, Tensor, Tensor]:
    """(mask, key, value) for one call: ``desc`` (an ``HFMask``, a 4-d tensor or None) made into
    an attnmem mask, with the keys a causal mask can never reach cut off."""
    nk = key.shape[2]
    if desc is None:
        return (masks.causal() if is_causal and nq > 1 else None), key, value
    if isinstance(desc, Tensor):
        if desc.dim() != 4:
            raise ValueError(f"attention_mask must be an HFMask or a 4-d mask, got shape {tuple(desc.shape)}")
        return masks.dense(_dense_from_hf(desc)), key, value
    if not isinstance(desc, HFMask):
        raise TypeError(f"attention_mask must be an attnmem HFMask, a 4-d tensor or None, got {type(desc).__name__}")
    used = nk
    if _bounded(desc.mask_function):
        used = max(0, min(nk, desc.q_offset + nq - desc.kv_offset))
    if used < nk:
        key, value = key[:, :, :used], value[:, :, :used]  # (B, Hkv, used, D): views, no copy
    g = _Geometry(batch, nq, used, desc.q_offset, desc.kv_offset)
    mask = _translate(desc.mask_function, g)
    if desc.padding is not None:
        valid = _positions_ids(desc.padding, desc.kv_offset, used, batch)
        if valid is None:
            raise ValueError(f"the 2-D attention mask of shape {tuple(desc.padding.shape)} does not cover keys "
                             f"[{desc.kv_offset}, {desc.kv_offset + used})")
        mask = _and(mask, masks.key_padding(valid.bool()))
    return mask, key, value


# --- the attention interface -----------------------------------------------------------------


def _refuse(feature: str, alternative: str) -> None:
    raise ValueError(f"attnmem ({feature}) is not supported by attnmem's Hugging Face integration yet; "
                     f"{alternative}")


def _features(module: Any, dropout: float, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``attnmem.attention`` keywords for what the layer asks (softcap, sinks, dropout);
    raises, naming it, for what attnmem cannot serve."""
    extra: dict[str, Any] = {}
    cap = kwargs.pop("softcap", None)
    if cap is not None:
        extra["score_mod"] = scores.softcap(cap)  # Gemma 2: cap · tanh(s / cap) on the scaled scores
    sinks = kwargs.pop("s_aux", None)
    if sinks is not None:
        extra["sinks"] = sinks  # gpt-oss: one logit per query head in each row's denominator
    if dropout:
        # HF passes the rate only in training; the pattern is drawn from torch's generator.
        extra["dropout_p"] = float(dropout)
    if kwargs.pop("position_bias", None) is not None:
        _refuse("position_bias: an additive relative position bias tensor, e.g. T5",
                "use a model without position bias, or attn_implementation='eager'")
    if kwargs.pop("output_attentions", False):
        _refuse("output_attentions=True: attnmem never forms the attention weights",
                "call the model with output_attentions=False, or use attn_implementation='eager'")
    for head_mask in ("head_mask", "layer_head_mask"):
        if kwargs.pop(head_mask, None) is not None:
            _refuse(f"{head_mask}: per-head masking of attention weights", "use attn_implementation='eager'")
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS and v is not None)
    if unknown:
        raise TypeError(f"attnmem's Hugging Face integration got keyword(s) {unknown} from "
                        f"{type(module).__name__}; it does not know what they ask for and will not ignore them")
    return extra


def _check_window(desc: Any, sliding_window: int | None) -> None:
    """A layer's ``sliding_window`` must be the one its mask carries (HF keeps both)."""
    if sliding_window is None or not isinstance(desc, HFMask):
        return
    found = _windows(desc.mask_function)
    if found and all(w not in found for w in (sliding_window, sliding_window - 1)):
        raise ValueError(f"sliding_window={sliding_window} of the layer disagrees with its mask's window(s) {found}")


def _windows(fn: Callable) -> set[int]:
    kind = _kind(fn)
    if kind in ("and_masks", "or_masks"):
        return set().union(*(_windows(c) for c in _children(fn)))
    if kind in ("sliding_window_overlay", "sliding_window_bidirectional_overlay"):
        return {int(_closure(fn)["sliding_window"])}
    if kind == "remap_positions_for_packed_sequence":
        return _windows(_closure(fn)["mask_function"])
    return set()


def _make_attention_fn(name: str) -> Callable:
    def attnmem_attention_forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                                  dropout: float = 0.0, scaling: float | None = None,
                                  is_causal: bool | None = None, sliding_window: int | None = None,
                                  cu_seq_lens_q: Tensor | None = None, cu_seq_lens_k: Tensor | None = None,
                                  **kwargs: Any) -> tuple[Tensor, None]:
        """query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) -> ((B, Nq, Hq, D) contiguous, None)."""
        binding = _BINDINGS[name]
        softcap = kwargs.get("softcap")
        extra = _features(module, dropout, kwargs)
        _check_window(attention_mask, sliding_window)
        B, _, nq, _ = query.shape
        causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))

        def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            mask, k, v = structured_mask(attention_mask, k, v, batch=B, nq=nq, is_causal=causal)
            mask = _and(mask, _cu_documents(cu_seq_lens_q, cu_seq_lens_k, nq, k.shape[2], B))
            out = attention(q, k, v, method=binding.method, mask=mask, scale=scaling, **extra, **binding.options)
            out = out.transpose(1, 2)  # (B, Nq, Hq, D): a view when attnmem laid the output out so
            return out if out.is_contiguous() else out.contiguous()

        replay = _REPLAY.get()
        # Sinks, dropout and packed cu_seq_lens carry per-call tensors or randomness: traced always.
        if (replay is not None and cu_seq_lens_q is None and cu_seq_lens_k is None and set(extra) <= {"score_mod"}
                and (attention_mask is None or isinstance(attention_mask, HFMask))):
            signature = (name, binding.method, repr(sorted(binding.options.items())), replay.mask_id(attention_mask),
                         causal, scaling, softcap)
            return replay(signature, call, (query, key, value)), None
        return call(query, key, value), None

    attnmem_attention_forward.__qualname__ = f"attnmem_attention_forward[{name}]"
    return attnmem_attention_forward


# --- estimate_step's shortcut: each distinct attention call traced once ----------------------
#
# The layers of a model call attention with the same shapes, strides and mask description, and
# on fake tensors the tiled kernel's Python loop is most of a step's trace (thousands of fake
# operators per call with a sliding window). So each distinct call is traced once, ALONE, on
# fresh fake inputs laid out as the model's (under a fork of the step's tracker, which counts
# the storages alive already), and every layer's call replays what that trace saw: the forward's
# transient above its inputs, its output, the storages it leaves alive (and which of them its
# backward frees), which inputs its graph saves, the backward's transient and its gradients.
# Replayed, a call changes the step's live bytes exactly as tracing it would; tests compare
# both to the byte.


@dataclass(frozen=True)
class _Layout:
    """Enough about a tensor to allocate one laid out like it: ``group`` numbers the distinct
    storages among the tensors described together (q, k, v may share one)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    group: int

    @property
    def plain(self) -> bool:
        """Whether the storage holds exactly this tensor (then ``empty_strided`` makes it)."""
        extent = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride)) if all(self.shape) else 0
        return self.offset == 0 and self.nbytes == extent * self.dtype.itemsize


def _layouts(tensors: tuple[Tensor | None, ...]) -> tuple[_Layout | None, ...]:
    groups: dict[int, int] = {}
    out: list[_Layout | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        st = t.untyped_storage()
        group = groups.setdefault(id(st), len(groups))
        out.append(_Layout(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.device, st.nbytes(),
                           group))
    return tuple(out)


def _alike(layouts: tuple[_Layout | None, ...]) -> list[Tensor | None]:
    """Fresh tensors (fake ones when large, in a trace) with these layouts and storage sharing."""
    shared = {g: sum(lay is not None and lay.group == g for lay in layouts) > 1 for g in range(len(layouts))}
    buffers: dict[int, Tensor] = {}
    out: list[Tensor | None] = []
    for lay in layouts:
        if lay is None:
            out.append(None)
        elif lay.plain and not shared[lay.group]:
            out.append(torch.empty_strided(lay.shape, lay.stride, dtype=lay.dtype, device=lay.device))
        else:
            if lay.group not in buffers:
                buffers[lay.group] = torch.empty(lay.nbytes, dtype=torch.uint8, device=lay.device)
            flat = buffers[lay.group].view(lay.dtype)  # (nbytes / itemsize,)
            out.append(flat.as_strided(lay.shape, lay.stride, lay.offset))
    return out


def _saved_storage_ids(out: Tensor) -> set[int]:
    """Storages the autograd graph behind ``out`` saves for its backward (before it runs)."""
    ids: set[int] = set()
    seen: set[int] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        values = list(getattr(node, "saved_tensors", ()) or ())  # a custom Function's context
        values += [getattr(node, attr) for attr in dir(node) if attr.startswith("_saved_")]
        for val in values:
            for t in val if isinstance(val, (tuple, list)) else (val,):
                if isinstance(t, Tensor):
                    ids.add(id(t.untyped_storage()))
        stack += [fn for fn, _ in node.next_functions]
    return ids


@dataclass(frozen=True)
class _BackwardTrace:
    excess: int  # peak above the live bytes at the backward's start
    grads: tuple[_Layout | None, ...]  # of q, k, v (None where no gradient is asked)
    freed: tuple[int, ...]  # indices into ``_CallTrace.kept`` of the storages the backward frees


class _CallTrace:
    """One attention call traced alone: its forward when first met, its backward when the
    step's backward first reaches a call of this kind (the gradient's layout is known then)."""

    def __init__(self, tracker: Any, call: Callable, layouts: tuple[_Layout | None, ...],
                 needs_grad: tuple[bool, ...]):
        self.tracker = tracker
        self.backwards: dict[_Layout | None, _BackwardTrace] = {}
        # ``call`` is not kept: its closure holds the step's mask description, whose padding
        # tensor the step frees after its forward.
        with tracker.paused():
            inputs = [x.requires_grad_(r) for x, r in zip(_alike(layouts), needs_grad)]
            sub = tracker.fork()
            sub.track_tree(inputs)
            before, start = sub.storages(), sub.live
            sub.peak = start
            with sub, torch.enable_grad():
                out = call(*inputs)
            saved = _saved_storage_ids(out)  # unpacking a saved output is an operator: untracked too
        out_storage = out.untyped_storage()
        new = [ref for key, ref in sub.storages().items() if before.get(key) is not ref]
        if not any(ref() is out_storage for ref in new):
            raise RuntimeError("estimate_step: an attention output that shares an input's storage cannot be "
                               "replayed; pass replay=False")
        self.excess = sub.peak - start
        (self.out,) = _layouts((out,))
        self.out_saved = id(out_storage) in saved
        self.saved_inputs = tuple(i for i, x in enumerate(inputs) if id(x.untyped_storage()) in saved)
        kept = [ref for ref in new if ref() is not out_storage]
        self.kept = tuple(ref().nbytes() for ref in kept)
        self._graph: tuple | None = (inputs, out, sub, kept)

    def backward(self, dout: Tensor) -> _BackwardTrace:
        (layout,) = _layouts((dout,))
        if layout not in self.backwards:
            if self._graph is None:
                raise RuntimeError("estimate_step: two calls of one kind met gradients laid out differently; "
                                   "the replay traced one; pass replay=False")
            inputs, out, sub, kept = self._graph
            self._graph = None
            with self.tracker.paused():
                (grad_out,) = _alike((layout,))
                sub.track(grad_out)
                before, start = sub.storages(), sub.live
                sub.peak = start
                wanted = [x for x in inputs if x.requires_grad]
                with sub:
                    grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
                full = tuple(next(grads) if x.requires_grad else None for x in inputs)
            for g in full:
                if g is not None and id(g.untyped_storage()) in before:
                    raise RuntimeError("estimate_step: an attention gradient that shares a storage alive before "
                                       "its backward cannot be replayed; pass replay=False")
            freed = tuple(i for i, ref in enumerate(kept) if ref() is None)
            self.backwards[layout] = _BackwardTrace(sub.peak - start, _layouts(full), freed)
        return self.backwards[layout]


class _Replayed(torch.autograd.Function):
    """A traced call's memory effect on the step's tracker, in both passes; no arithmetic."""

    @staticmethod
    def forward(ctx, trace: _CallTrace, *inputs: Tensor) -> Tensor:
        trace.tracker.reserve(trace.excess)
        (out,) = _alike((trace.out,))
        device = trace.out.device
        ctx.kept = [torch.empty(n, dtype=torch.uint8, device=device) for n in trace.kept]
        ctx.trace = trace
        # What the call's graph saves stays alive until its backward, as it would.
        ctx.save_for_backward(*(inputs[i] for i in trace.saved_inputs), *((out,) if trace.out_saved else ()))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        bwd = ctx.trace.backward(dout)
        ctx.trace.tracker.reserve(bwd.excess)
        for i in bwd.freed:
            ctx.kept[i] = None
        return (None, *_alike(bwd.grads))


class _Replay:
    """The ``estimate_step`` shortcut, active while one step is traced (``_REPLAY``)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.traces: dict[tuple, _CallTrace] = {}
        # A weak reference per mask description: holding it would keep its padding tensor alive
        # past the forward, which the step itself does not.
        self._masks: dict[int, tuple[weakref.ref, int]] = {}
        self._serial = 0

    def mask_id(self, mask: Any) -> int | None:
        """A number per mask description (a new object at a reused id gets a new one)."""
        if mask is None:
            return None
        known = self._masks.get(id(mask))
        if known is None or known[0]() is not mask:
            self._serial += 1
            known = self._masks[id(mask)] = (weakref.ref(mask), self._serial)
        return known[1]

    def __call__(self, signature: tuple, call: Callable, inputs: tuple[Tensor, ...]) -> Tensor:
        needs_grad = tuple(x.requires_grad for x in inputs)
        if not torch.is_grad_enabled() or not any(needs_grad):
            return call(*inputs)
        layouts = _layouts(inputs)
        key = (signature, layouts, needs_grad)
        if key not in self.traces:
            self.traces[key] = _CallTrace(self.tracker, call, layouts, needs_grad)
        return _Replayed.apply(self.traces[key], *inputs)


_REPLAY: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar("attnmem_hf_replay", default=None)


# --- memory of one training step, predicted on fake tensors ----------------------------------


def _config_of(model_or_config: Any) -> Any:
    if isinstance(model_or_config, transformers.PreTrainedConfig):
        return model_or_config
    if isinstance(model_or_config, transformers.PreTrainedModel):
        return model_or_config.config
    raise TypeError(f"model_or_config must be a transformers PreTrainedModel or PreTrainedConfig, "
                    f"got {type(model_or_config).__name__}")


def build_model(config: Any, dtype: torch.dtype | None = None) -> Any:
    """A causal-LM (or masked-LM, or base) model of a copy of ``config`` with random weights.

    The copy matters: ``from_config`` keeps the object it is given as ``model.config``, and
    ``set_attn_implementation`` writes into it, so two models built from one config would share
    one attention implementation (and the caller's config would be changed)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    config = copy.deepcopy(config)
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel):
        try:
            model = auto.from_config(config)
            break
        except ValueError:
            continue
    else:  # pragma: no cover - AutoModel covers every registered config
        raise ValueError(f"no transformers model class for config {type(config).__name__}")
    return model.to(dtype) if dtype is not None else model


def make_optimizer(model: Any, optimizer: str) -> torch.optim.Optimizer | None:
    """AdamW or SGD (momentum 0.9) over the model's parameters, for one-step measurements."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=False)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=False)
    if optimizer == "none":
        return None
    raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'none', got {optimizer!r}")


def step_inputs(config: Any, seq_len: int, batch: int, pad: int = 0, device: Any = "cpu") -> dict[str, Tensor]:
    """``input_ids``, ``labels`` and (with ``pad`` > 0 left-pad tokens per row) ``attention_mask``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g).to(device)  # (B, N)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    if pad:
        valid = torch.ones(batch, seq_len, dtype=torch.long, device=device)
        valid[:, :pad] = 0
        inputs["attention_mask"] = valid
        inputs["labels"] = ids.masked_fill(valid == 0, -100)
    return inputs


def train_step(model: Any, opt: torch.optim.Optimizer | None, inputs: dict[str, Tensor], training: bool = True) -> None:
    """One step: forward with the model's own loss, backward, optimizer step, gradients freed."""
    if not training:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        return
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    del loss
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def state_tensors(model: Any, opt: torch.optim.Optimizer | None) -> list[Tensor]:
    """Every tensor a step starts with: parameters, buffers and optimizer state."""
    out = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        for st in opt.state.values():
            out += [t for t in st.values() if isinstance(t, Tensor)]
    return out


def init_optimizer_state(model: Any, opt: torch.optim.Optimizer | None) -> None:
    """Create the optimizer's state (a steady-state step starts with it) without a real step."""
    if opt is None:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def prepare_step(config: Any, impl: str, seq_len: int, batch: int = 1, *, training: bool = True,
                 optimizer: str = "adamw", checkpointing: bool = False, dtype: torch.dtype | None = None,
                 pad: int = 0) -> tuple[Any, torch.optim.Optimizer | None, dict[str, Tensor]]:
    """The model, optimizer (with its state) and inputs of one steady-state ``train_step``:
    what ``estimate_step`` traces on fake tensors, and what a measurement runs for real."""
    model = build_model(config, dtype)
    model.set_attn_implementation(impl)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(training)
    opt = make_optimizer(model, optimizer) if training else None
    init_optimizer_state(model, opt)
    return model, opt, step_inputs(config, seq_len, batch, pad)


@dataclass(frozen=True)
class StepEstimate(Peak):
    """Predicted peak of one steady-state step, by tracing it on fake tensors."""

    peak_bytes: int
    state_bytes: int
    seq_len: int
    batch: int
    attn_implementation: str
    seconds: float

    def __str__(self) -> str:
        return (f"{self.attn_implementation}: peak {self.peak_mib:.1f} MiB (state {self.state_bytes / MiB:.1f} MiB), "
                f"B={self.batch} N={self.seq_len}, traced in {self.seconds:.1f} s")


def estimate_step(model_or_config: Any, seq_len: int, batch: int = 1, training: bool = True,
                  optimizer: str = "adamw", checkpointing: bool = False, dtype: torch.dtype | None = None,
                  pad: int = 0, attn_implementation: str | None = None, replay: bool = True) -> StepEstimate:
    """Peak bytes of one training (or inference) step of a transformers model, nothing allocated.

    The model is rebuilt from its config on fake tensors (``FakeTensorMode``) and one step —
    forward with the model's own loss, backward, optimizer step — runs under the same
    ``LiveTensorTracker`` that ``attnmem.measure`` uses for a real run, starting from the
    parameters, buffers and optimizer state (a steady-state step). ``train_step`` is that step.

    Args:
        model_or_config: a ``PreTrainedModel`` (only its config is used) or ``PreTrainedConfig``.
        seq_len, batch: the step's input shape (B, N).
        training: False traces a forward under ``no_grad``.
        optimizer: "adamw", "sgd" or "none".
        checkpointing: gradient checkpointing of every layer.
        dtype: parameter dtype (default: the config's / float32).
        pad: left-padding tokens per row (an attention mask is passed when > 0).
        attn_implementation: the name to run (default: the config's).
        replay: trace each distinct attnmem attention call once, alone, and replay its memory
            effect in every layer that makes it (the same bytes as tracing every layer, which
            ``replay=False`` does; the tests compare both). Not with ``checkpointing``, whose
            backward re-runs the forward.

    Raises:
        TypeError/ValueError: wrong argument types or values.
    """
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..memory.estimate import small_real_mode
    from ..memory.measure import LiveTensorTracker

    for arg, val in (("seq_len", seq_len), ("batch", batch)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {val!r}")
    config = _config_of(model_or_config)
    impl = attn_implementation or config._attn_implementation or "sdpa"
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with small_real_mode(fake_mode):
        model, opt, inputs = prepare_step(config, impl, seq_len, batch, training=training, optimizer=optimizer,
                                          checkpointing=checkpointing, dtype=dtype, pad=pad)
    tracker = LiveTensorTracker()
    state = state_tensors(model, opt)
    tracker.track_tree((state, inputs))
    start = tracker.live
    token = _REPLAY.set(_Replay(tracker) if replay and training and not checkpointing else None)
    try:
        with small_real_mode(fake_mode), tracker:
            train_step(model, opt, inputs, training)
    finally:
        _REPLAY.reset(token)
    return StepEstimate(tracker.peak, start, seq_len, batch, impl, time.perf_counter() - t0)


__all__ = [
    "register", "use", "registered", "mask_interface", "HFMask", "structured_mask", "estimate_step",
    "StepEstimate", "prepare_step", "train_step", "step_inputs", "build_model", "make_optimizer", "state_tensors",
    "init_optimizer_state", "plan_step", "load_hf_config",
    "TESTED_VERSION",
]


# --- what fits: the planner for a config.json ------------------------------------------------


def load_hf_config(path: str) -> Any:
    """A transformers config from a local ``config.json`` (or the directory holding it)."""
    import json
    import os

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--hf-config: no config.json at {path!r}")
    with open(path) as f:
        raw = json.load(f)
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise ValueError(f"--hf-config: {path!r} has no 'model_type'; is it a transformers config.json?")
    try:
        return transformers.AutoConfig.for_model(model_type, **raw)
    except ValueError as e:
        raise ValueError(f"--hf-config: transformers {transformers.__version__} does not know model_type "
                         f"{model_type!r}") from e


def _fit_quadratic(xs: list[int], ys: list[int]) -> tuple[float, float, float]:
    """(a, b, c) of y = a·x² + b·x + c through three points."""
    import numpy as np

    a, b, c = np.polyfit(np.array(xs, dtype=float), np.array(ys, dtype=float), 2)
    return float(a), float(b), float(c)


def _largest_under(peak: Callable[[int], int], budget: int, start: int, quantum: int,
                   cap: int | None = None) -> int | None:
    """Largest multiple of ``quantum`` whose ``peak`` fits ``budget``: a quadratic fitted to
    three traced points proposes it, traces confirm it (stepping down 5 % while it does not fit).
    Peaks of these models are polynomials of degree ≤ 2 in N and of degree 1 in B."""
    xs = [start, 2 * start, 4 * start]
    ys = [peak(x) for x in xs]
    if ys[0] > budget:
        return None
    a, b, c = _fit_quadratic(xs, ys)
    if a > 0:
        guess = (-b + math.sqrt(max(b * b - 4 * a * (c - budget), 0.0))) / (2 * a)
    else:
        guess = (budget - c) / b if b > 0 else float(xs[-1])
    n = max(int(guess) // quantum * quantum, quantum)
    if cap is not None:
        n = min(n, cap)  # e.g. max_position_embeddings: the model cannot go further
    for _ in range(6):
        if peak(n) <= budget:
            return n
        n = max((int(n * 0.95)) // quantum * quantum, quantum)
    return n if peak(n) <= budget else None


def plan_step(config: Any, budget: int, *, seq_len: int = 4096, batch: int = 1,
              methods: list[tuple[str, dict[str, Any]]] | None = None,
              training: bool = True, optimizer: str = "adamw", checkpointing: bool = False,
              dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Per attention implementation (HF ``eager``, ``sdpa``, and each attnmem method): the
    predicted step peak at (batch, seq_len), whether it fits ``budget``, the longest N at
    ``batch`` and the largest batch at ``seq_len`` (all from ``estimate_step`` traces)."""
    rows = []
    impls = [("eager", "eager"), ("sdpa", "sdpa")]
    for i, (method, options) in enumerate(methods or [("chunked", {})]):
        impls.append((f"attnmem:{method}", register(method, name=f"attnmem_plan{i}", **options)))
    for label, impl in impls:
        def peak_at(n: int, b: int, impl: str = impl) -> int:
            return estimate_step(config, n, batch=b, training=training, optimizer=optimizer,
                                 checkpointing=checkpointing, dtype=dtype, attn_implementation=impl).peak_bytes

        try:
            peak = peak_at(seq_len, batch)
            longest = _largest_under(lambda n, f=peak_at: f(n, batch), budget, max(seq_len // 8, 64), 64,
                                     cap=getattr(config, "max_position_embeddings", None))
            widest = _largest_under(lambda b, f=peak_at: f(seq_len, b), budget, 1, 1)
        except (ValueError, TypeError, RuntimeError) as e:
            rows.append({"method": label, "status": "error", "reason": str(e).splitlines()[0]})
            continue
        rows.append({"method": label, "status": "ok", "peak_bytes": peak, "fits": peak <= budget,
                     "max_seq_len": longest, "max_batch": widest})
    return rows
