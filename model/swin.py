"""Swin Transformer as RAM uses it: official parameter names, output ``[avgpool; tokens]``.

Numerics follow the reference implementation: LayerNorm eps 1e-5, exact GELU, attention
``softmax(q·scale·kᵀ + rel_bias [+ mask])`` with mask value -100, cyclic shift by ``roll(-s)`` before
windowing and ``roll(+s)`` after, PatchMerging order (0,0), (1,0), (0,1), (1,1) then norm, reduction.
``relative_position_index`` and ``attn_mask`` are persistent buffers, as in the official modules.

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on a GPU) with the relative
position bias and the shifted-window mask as one additive float mask; ``WindowAttention.fused =
False`` (or ``model.attention.set_fused_attention``) selects the explicit softmax, the reference
formula, kept for tests and for exporters that want plain matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img, ws).view(-1, ws * ws)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    fused = True  # scaled_dot_product_attention; False: the explicit softmax (same function)

    def position_bias(self, n: int) -> torch.Tensor:
        """``[1, heads, n, n]`` relative position bias of one window."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if not self.fused:
            return self.proj(self.explicit(qkv, mask).transpose(1, 2).reshape(b, n, c))
        bias = self.position_bias(n)
        if mask is not None:  # windows are (image, window) ordered: the mask repeats every nw windows
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, n, n)).expand(b // nw, -1, -1, -1, -1)
            bias = bias.reshape(b, self.heads, n, n)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.to(qkv.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def explicit(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The reference formula, ``softmax(q·scale·kᵀ + bias [+ mask]) v``: ``[b, heads, n, head_dim]``."""
        b, n = qkv.shape[1], qkv.shape[3]
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.position_bias(n)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        return attn.softmax(dim=-1) @ v


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, ws: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if resolution <= ws:  # the grid fits one window: no shift, window = grid
            ws, shift = resolution, 0
        self.resolution, self.ws, self.shift = resolution, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, ws, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = self.resolution
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(y, self.ws).view(-1, self.ws * self.ws, c)
        win = self.attn(win, self.attn_mask).view(-1, self.ws, self.ws, c)
        y = window_reverse(win, self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, ws: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, resolution, heads, ws, 0 if i % 2 == 0 else ws // 2)
                                     for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch, patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Returns ``[B, 1 + L, C]``: the mean-pooled token, then every final token (both after norm)."""

    def __init__(self, img_size: int, embed_dim: int, depths: list[int], num_heads: list[int], window_size: int):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        res = img_size // 4
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            self.layers.append(BasicLayer(embed_dim * 2 ** i, res // 2 ** i, depth, heads, window_size, not last))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
