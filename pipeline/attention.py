"""Self-attention modules whose heads can be removed: the number of heads and the width of
each head are independent of the embedding width.

torchvision's ViT attention (`nn.MultiheadAttention`) ties the q/k/v width to the
embedding width, and Swin's `ShiftedWindowAttention` derives the head width from its
input width (C // num_heads), so neither can lose a head without the residual stream
losing channels too. The two modules here compute the same function with the inner
width `num_heads x head_dim` stored as data (the projections' shapes):

  SelfAttention     ViT's: packed q/k/v projection `in_proj_weight` (3 x heads x head_dim,
                    dim) and `in_proj_bias`, `out_proj` Linear(heads x head_dim, dim)
  WindowAttention   Swin's (v1): `qkv` Linear(dim, 3 x heads x head_dim), `proj`
                    Linear(heads x head_dim, dim), the relative position bias table with one
                    column per head, shifted windows

Their parameter names are torchvision's, so torchvision's state dicts (pretrained
weights) load into them unchanged. `convert(model)` swaps them in (done by
`models.build_model` for the vit_* and swin_t/s/b models: `models.vision_transformers`);
`remove_heads` removes whole heads; `head_vectors` gives one parameter vector per head for
the criteria.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention

Parts = list[tuple[torch.Tensor, int]]
Of = Callable[[torch.Tensor], "torch.Tensor | None"]


def _itself(p: torch.Tensor) -> torch.Tensor:
    return p.detach()


def _packed(t: torch.Tensor | None, heads: int, head_dim: int) -> Parts:
    """The q, k and v thirds of a packed projection tensor, each cut per head along 0."""
    if t is None:
        return []
    inner = heads * head_dim
    return [(t[i * inner:(i + 1) * inner], 0) for i in range(3)]


def _whole(t: torch.Tensor | None, dim: int) -> Parts:
    return [] if t is None else [(t, dim)]


class SelfAttention(nn.Module):
    """Multi-head self-attention as in ViT (batch first), `num_heads` heads of `head_dim`.

    Called as torchvision's EncoderBlock calls `nn.MultiheadAttention`: `(x, x, x,
    need_weights=False)` -> `(output, None)`; query, key and value must be one tensor.
    """

    returns_pair: ClassVar[bool] = True  # forward gives (output, None), as the module it replaces

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    @staticmethod
    def converts(mha: nn.MultiheadAttention) -> bool:
        """Whether `mha` has the form ViT uses: batch first, packed q/k/v, no extra
        key/value biases."""
        return bool(mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None
                    and not mha.add_zero_attn)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """The same function as `mha` (self-attention, batch first), sharing its tensors."""
        if not cls.converts(mha):
            raise ValueError("only batch-first self-attention with packed q/k/v converts")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.dropout,
                  bias=mha.in_proj_bias is not None)
        new.in_proj_weight, new.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        new.out_proj = mha.out_proj
        return new

    @property
    def embed_dim(self) -> int:
        return int(self.out_proj.weight.shape[0])

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, need_weights: bool = False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention attends a sequence to itself: pass one tensor")
        if need_weights:
            raise ValueError("SelfAttention does not return attention weights")
        b, n, _ = query.shape
        h, d = self.num_heads, self.head_dim
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.out_proj(out), None

    def macs(self, input_shape: torch.Size) -> dict[str, int]:
        """MACs of one sample not done by an nn.Linear: the packed q/k/v projection
        (linear) and the two attention products, q k^T and the weighted sum of v
        (attention)."""
        n = int(input_shape[-2])
        inner = self.num_heads * self.head_dim
        return {"linear": n * self.in_proj_weight.numel(), "attention": 2 * n * n * inner}

    def head_parts(self, of: Of = _itself, biases: bool = False) -> Parts:
        """(tensor, dim) pairs whose slices along `dim`, one equal slice per head, are each
        head's parameters: q, k, v weight rows and out-projection columns (`biases`: and
        the q, k, v biases). `of` maps each parameter to the tensor sliced (None: left
        out)."""
        h, d = self.num_heads, self.head_dim
        parts = _packed(of(self.in_proj_weight), h, d) + _whole(of(self.out_proj.weight), 1)
        if biases and self.in_proj_bias is not None:
            parts += _packed(of(self.in_proj_bias), h, d)
        return parts

    def extra_repr(self) -> str:
        return f"dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class WindowAttention(nn.Module):
    """Swin's (v1) shifted-window attention with relative position bias, `num_heads` heads
    of `head_dim` (torchvision's `shifted_window_attention`, with the inner width taken
    from the projections instead of the input width)."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 head_dim: int, attention_dropout: float = 0.0, dropout: float = 0.0,
                 qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(wh, ww))

    @classmethod
    def from_torch(cls, swa: ShiftedWindowAttention) -> WindowAttention:
        """The same function as `swa`, sharing its tensors."""
        dim = swa.qkv.weight.shape[1]
        new = cls(dim, swa.window_size, swa.shift_size, swa.num_heads, dim // swa.num_heads,
                  swa.attention_dropout, swa.dropout, swa.qkv.bias is not None,
                  swa.proj.bias is not None)
        new.qkv, new.proj = swa.qkv, swa.proj
        new.relative_position_bias_table = swa.relative_position_bias_table
        new.relative_position_index = swa.relative_position_index
        return new

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, window tokens, window tokens): each head's bias column, laid out."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def _geometry(self, h: int, w: int) -> tuple[int, int, list[int]]:
        wh, ww = self.window_size
        ph, pw = h + (wh - h % wh) % wh, w + (ww - w % ww) % ww
        # no shift where one window covers the (padded) map
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        return ph, pw, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        ph, pw, shift = self._geometry(h, w)
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nh, nw = ph // wh, pw // ww
        windows = nh * nw
        x = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(
            b * windows, wh * ww, c)
        heads, d = self.num_heads, self.head_dim
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * d ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.relative_position_bias()
        if sum(shift) > 0:
            mask = _shift_mask(x, ph, pw, self.window_size, shift)
            attn = attn.view(x.size(0) // windows, windows, heads, x.size(1), x.size(1))
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, x.size(1), x.size(1))
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout,
                         training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * d)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = F.dropout(x, p=self.dropout, training=self.training)
        c = x.shape[-1]
        x = x.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def macs(self, input_shape: torch.Size) -> dict[str, int]:
        """MACs of one sample: the q/k/v and output projections of every window's tokens
        (linear; the padded map's, as computed) and the two attention products of every
        window (attention). The projections run as F.linear on the windows, so no
        nn.Linear hook counts them twice."""
        ph, pw, _ = self._geometry(int(input_shape[-3]), int(input_shape[-2]))
        n = self.window_size[0] * self.window_size[1]
        windows = (ph // self.window_size[0]) * (pw // self.window_size[1])
        linear = windows * n * (self.qkv.weight.numel() + self.proj.weight.numel())
        return {"linear": linear,
                "attention": 2 * windows * n * n * self.num_heads * self.head_dim}

    def head_parts(self, of: Of = _itself, biases: bool = False) -> Parts:
        """As `SelfAttention.head_parts`; `biases` also takes each head's column of the
        relative position bias table."""
        h, d = self.num_heads, self.head_dim
        parts = _packed(of(self.qkv.weight), h, d) + _whole(of(self.proj.weight), 1)
        if biases:
            if self.qkv.bias is not None:
                parts += _packed(of(self.qkv.bias), h, d)
            parts += _whole(of(self.relative_position_bias_table), 1)
        return parts

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, shift_size={self.shift_size}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}")


ATTENTION_TYPES = (SelfAttention, WindowAttention)


def _relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Index into the bias table of every (token, token) pair of a window (torchvision's
    layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).flatten()


def _shift_mask(x: torch.Tensor, ph: int, pw: int, window: list[int],
                shift: list[int]) -> torch.Tensor:
    """(windows, n, n): -100 between tokens that the cyclic shift brought from different
    regions of the map, 0 elsewhere (torchvision's mask)."""
    region = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    region = region.view(ph // window[0], window[0], pw // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = region.unsqueeze(1) - region.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


# --------------------------------------------------------------------------- conversion


def convert(model: nn.Module) -> int:
    """Replace torchvision's ViT and Swin (v1) attention modules in `model` by the
    head-prunable ones above (same function, same tensors); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if type(child) is nn.MultiheadAttention and SelfAttention.converts(child):
                new = SelfAttention.from_torch(child)
            elif type(child) is ShiftedWindowAttention:
                new = WindowAttention.from_torch(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
    return count


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every head-prunable attention module, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)]


# --------------------------------------------------------------------------- heads


def _head_slices(t: torch.Tensor, dim: int, heads: int) -> list[torch.Tensor]:
    per = t.shape[dim] // heads
    return [t.narrow(dim, i * per, per) for i in range(heads)]


def head_rows(parts: Parts, heads: int) -> np.ndarray:
    """(heads, features): per head, its slices of every part flattened and joined."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(heads)]
    for t, dim in parts:
        for i, s in enumerate(_head_slices(t.detach(), dim, heads)):
            rows[i].append(s.double().cpu().reshape(-1))
    return torch.stack([torch.cat(r) for r in rows]).numpy()


def head_vectors(m: nn.Module) -> np.ndarray:
    """(heads, features): each head's q, k and v weight rows and out-projection columns,
    flattened into one row (float64)."""
    return head_rows(m.head_parts(), m.num_heads)


def head_all_parameters(m: nn.Module) -> np.ndarray:
    """(heads, features): every parameter removing a head deletes: the weights of
    `head_vectors`, the q/k/v biases and (Swin) the bias table's column."""
    return head_rows(m.head_parts(biases=True), m.num_heads)


def _grad_times_weight(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else (p.grad * p).detach()


def head_gradient_products(m: nn.Module) -> np.ndarray:
    """(heads,): per head, the sum of gradient x weight over every parameter removing it
    deletes (q/k/v weights and biases, out-projection columns, Swin's bias-table column);
    parameters without a gradient count 0."""
    parts = m.head_parts(of=_grad_times_weight, biases=True)
    if not parts:
        return np.zeros(m.num_heads)
    return head_rows(parts, m.num_heads).sum(1)


@torch.no_grad()
def remove_heads(m: nn.Module, idxs: list[int]) -> None:
    """Remove heads `idxs` of attention module `m` in place: their q, k, v rows (weights
    and biases), out-projection columns and (Swin) bias-table columns; `num_heads`
    falls accordingly."""
    heads, d = m.num_heads, m.head_dim
    gone = set(int(i) for i in idxs)
    keep_heads = [i for i in range(heads) if i not in gone]
    if not keep_heads:
        raise ValueError("at least one head must remain")
    inner = heads * d
    per_head = torch.tensor([i * d + j for i in keep_heads for j in range(d)])
    packed = torch.cat([per_head + k * inner for k in range(3)])
    if isinstance(m, SelfAttention):
        m.in_proj_weight = _param(m.in_proj_weight, packed, 0)
        if m.in_proj_bias is not None:
            m.in_proj_bias = _param(m.in_proj_bias, packed, 0)
        _narrow_linear_in(m.out_proj, per_head)
    else:
        _narrow_linear_out(m.qkv, packed)
        _narrow_linear_in(m.proj, per_head)
        m.relative_position_bias_table = _param(m.relative_position_bias_table,
                                                torch.tensor(keep_heads), 1)
    m.num_heads = len(keep_heads)


def _param(p: nn.Parameter, index: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(p.data.index_select(dim, index.to(p.device)).clone(),
                        requires_grad=p.requires_grad)


def _narrow_linear_in(lin: nn.Linear, index: torch.Tensor) -> None:
    lin.weight = _param(lin.weight, index, 1)
    lin.in_features = lin.weight.shape[1]


def _narrow_linear_out(lin: nn.Linear, index: torch.Tensor) -> None:
    lin.weight = _param(lin.weight, index, 0)
    if lin.bias is not None:
        lin.bias = _param(lin.bias, index, 0)
    lin.out_features = lin.weight.shape[0]


def fix_heads(m: nn.Module) -> None:
    """Set `num_heads` from the projection shapes (rows / (3 x head_dim)), after a state
    dict of another width was put in place."""
    rows = (m.in_proj_weight if isinstance(m, SelfAttention) else m.qkv.weight).shape[0]
    m.num_heads = int(rows) // (3 * m.head_dim)


def removed_count(heads: int, ratio: float) -> int:
    """Heads removed from a module of `heads` at `ratio`: floor(ratio x heads), at most
    heads - 1 (at least one head remains)."""
    return max(0, min(heads - 1, int(math.floor(ratio * heads + 1e-9))))


__all__ = ["ATTENTION_TYPES", "SelfAttention", "WindowAttention", "attention_modules", "convert",
           "fix_heads", "head_all_parameters", "head_gradient_products", "head_rows",
           "head_vectors", "remove_heads", "removed_count"]
