"""
CAT: Cross-scale Aligned Transformer GAN (arXiv 2605.26449), in one file. A one-step, class-conditional transformer
GAN on SD-VAE latents: GAT's generator emits accumulated outputs h_0..h_K; one scale-wise discriminator judges
x_k = r_k(h_k) through block-diagonal attention, so that d_k sees x_k alone; a consistency loss (Eq. 2) keeps
h_0..h_{K-1} on the path of h_K.

    python cat.py --data toy                           # the embedded toy set (16 px): minutes on a CPU
    torchrun --nproc_per_node=8 cat.py --model H       # CAT-H/2 on ImageNet latents (prepare_latents.py first)
    torchrun --nproc_per_node=8 cat.py --model H --resume runs/000-H                           # continue a run
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 cat.py --model H   # two nodes

Sections: configs (Table 6), blocks, G (Sec. 3.1), scale-wise D (Fig. 3), augmentation, objectives with L_D and L_G
(Sec. 3.2), data, one iteration (App. A.2), train() and its helpers (Eq. 1, grids, checkpoints); then what a reader of
the method may skip: the toy set, data checks, the command line. Measures of samples are fid.py's, cost bench.py's.
"""
import argparse
import collections
import contextlib
import copy
import glob
import io
import json
import math
import os
import pickle
import re
import signal
import time
import typing

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# --- Notation and configs (Table 6) -------------------------------------------------------------------------

# Stages k = 0..K, coarse to fine: K + 1 = len(scales), the resolutions of x_0..x_K. Table 6 has K = 3.


def table6_scales(res):
    """Resolutions of x_0..x_3 in Table 6: R/8, R/4, R/2, R (4, 8, 16, 32 for ImageNet latents)."""
    return [res // 8, res // 4, res // 2, res]


def w_cons(K):
    """w_k of Eq. 2: (1/3, 1/2, 1) for K = 3; for other K, 1/(K-k) continues the pattern (our extrapolation)."""
    return [1 / (K - k) for k in range(K)]


class NetConfig(typing.NamedTuple):
    """The size of one transformer, G or D."""
    depth: int              # blocks
    width: int              # token width
    heads: int              # attention heads
    cmap: int = 2048        # D only: width of the class projection in its head (GAT's)


# G's output layers: depth/4 x (1, 2, 3, 4), i.e. 3,6,9,12 / 6,12,18,24 / 8,16,24,32 (Table 6).
G_CONFIGS = {
    'T': NetConfig(4, 32, 2),           # tests only
    'S': NetConfig(4, 64, 2),           # small data: the toy run and CPU experiments
    'B': NetConfig(12, 768, 12),
    'M': NetConfig(24, 768, 12),
    'H': NetConfig(32, 1280, 16),
}
D_CONFIGS = {
    'T': NetConfig(2, 32, 2, 64),
    'S': NetConfig(4, 64, 2, 128),
    'B': NetConfig(12, 768, 12),
    'M': NetConfig(24, 768, 12),        # D-M/2 of Table 5
}
D_FOR_G = {'T': 'T', 'S': 'S', 'B': 'B', 'M': 'B', 'H': 'B'}     # the paper: one Base D for every G size

# Training defaults, (paper, small data): Table 6's, B/2's 20 epochs (Sec. 4), GAT's DiffAugment. Small
# data (the toy set, pixels up to 64 px) trains in minutes on a CPU (docs/small-data.md). Options win.
DEFAULTS = {
    'steps': (50_000, 4000),            # CAT-B/2's 20 epochs | ~17 min at 16 px (the toy set: TOY_STEPS)
    'batch_size': (512, 16),            # global batch | 16 learned fastest per minute of 64, 32, 16, 8, 4
    'lr': (2e-4, 2e-3),                 # G and D | GAT's rule lr x 768 / width: 2.4e-3 at 64 (rounded)
    'ema_decay': (0.999, 0.99),         # EMA of G | 0.995 and 0.998 lag behind at these lengths
    'aug': (True, False),               # DiffAugment | with it a 64-wide D can't tell real from fake at 16 px
    'gamma': (1.0, 0.1),                # R1 and R2 weight | likewise: a small D needs less regularization
    'lambda_repa': (1.0, 0.0),          # D-side REPA | no DINOv2 targets for small images
}
TOY_STEPS = 2000                # the toy set: about 8 minutes on 2 CPU cores
Z_DIM = 64                      # z ~ N(0, I) and G's class embedding: GAT's code (the paper gives no size)
DEFAULT_DATA = 'data/imagenet256'                   # prepare_latents.py's default output
DEFAULT_VAE = 'stabilityai/sd-vae-ft-ema'
DINO_NAME = 'vit_base_patch14_dinov2.lvd142m'       # REPA's target network
VA_NAME = 'convnextv2_base.fcmae_ft_in22k_in1k'     # App. A.3's vision-aided loss: pMF's ConvNeXt-V2-B

# --- Building blocks (App. A.1), and autocast and TF32 for the precision of each region ---------------------


def sincos_2d(dim, n):
    """Fixed 2D sin-cos embedding [n*n, dim] of an n x n grid: the row's half first (MAE, DiT, GAT: the column's)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
    return torch.cat([one_d(dim // 2, ys), one_d(dim // 2, xs)], dim=1).float()


def rope_2d(head_dim, n, n_cls=0, theta=10000.0):
    """Axial 2D RoPE (cos, sin), each [n_cls + n*n, head_dim]; angle 0 for [cls]. Pairs (i, i + d/2): rows, columns."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)      # [n*n, head_dim/2]
    angles = torch.cat([torch.zeros(n_cls, head_dim // 2, dtype=angles.dtype), angles]).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def rms_norm(x, norm):
    """nn.RMSNorm with its weight in x's dtype, so that the fused kernel also runs on bf16 activations."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def autocast(precision, device):
    """The run's --precision: bf16 autocast for 'bf16', none for 'fp32'; nothing on 'meta'."""
    if device.type == 'meta':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def no_autocast(device):
    """An fp32 region inside a bf16 one (D's logit; sample.py's penalty check)."""
    return autocast('fp32', device)


@contextlib.contextmanager
def full_fp32(enabled=True):
    """Inside: fp32 matmuls and convolutions in full precision (TF32 off on CUDA); the previous flags come back."""
    old = [(flags, flags.allow_tf32) for flags in (torch.backends.cuda.matmul, torch.backends.cudnn)]
    if enabled:
        for flags, _ in old:
            flags.allow_tf32 = False
    try:
        yield
    finally:
        for flags, value in old:
            flags.allow_tf32 = value


class EqualLinear(nn.Module):
    """Equalized lr in GAT's form: weight stored / lr_mul, used x lr_mul, so Adam steps ~lr * lr_mul at any fan-in."""

    def __init__(self, n_in, n_out, lr_mul=0.01):
        super().__init__()
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_out, n_in), gain=1 / lr_mul))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.lr_mul = lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.lr_mul, self.bias * self.lr_mul)


def init_linears(module):
    """Xavier-uniform weights and zero biases for every nn.Linear (as DiT and GAT)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def normalize_2nd_moment(x, eps=1e-8):
    return x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()


class Attention(nn.Module):
    """Self-attention with qkv bias, qk-norm, 2D RoPE; segments: None, (start, end) pairs (a call each), a bool mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)    # qk-norm
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x, rope, segments=None):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(rms_norm(q, self.q_norm), *rope)
        k = apply_rope(rms_norm(k, self.k_norm), *rope)
        if segments is None or torch.is_tensor(segments):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=segments)
        else:
            o = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                           for s, e in segments], dim=2)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)       # MLP ratio 4 at SwiGLU's parameter parity
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C] tokens, rows first."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, C):
    """[B, n*n, p*p*C] -> [B, C, n*p, n*p], the inverse of patchify."""
    B, n = tokens.shape[0], math.isqrt(tokens.shape[1])
    return tokens.reshape(B, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, n * p, n * p)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift

# --- Generator (GAT's; Sec. 3.1, App. A.1): sin-cos tokens, AdaLN on w = mapping(z, c), output skips --------


class GBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(width)
        self.ada = nn.Linear(width, 6 * width)      # w -> shift, scale, gate of the attention and of the MLP

    def forward(self, x, w, rope):
        modulation = self.ada(F.silu(w)).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class OutputHead(nn.Module):
    """o_k: RMSNorm, shift and scale from w, a linear map to patch x patch x channels, unpatchify."""

    def __init__(self, width, patch, channels):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch * patch * channels)
        self.patch, self.channels = patch, channels

    def forward(self, x, w):
        shift, scale = self.ada(F.silu(w)).unsqueeze(1).chunk(2, dim=-1)
        return unpatchify(self.linear(modulate(self.norm(x), shift, scale)), self.patch, self.channels)


def rename_output_heads(state_dict, prefix, *args):
    """A checkpoint written before the rename loads: its G's heads.* are out_heads.*."""
    for key in [k for k in state_dict if k.startswith(prefix + 'heads.')]:
        state_dict[prefix + 'out_' + key[len(prefix):]] = state_dict.pop(key)


class Generator(nn.Module):
    def __init__(self, depth, width, heads, channels=4, res=32, patch=2, num_classes=1000, z_dim=Z_DIM,
                 w_avg_beta=0.995, stages=4):
        super().__init__()
        self.channels, self.res = channels, res
        self.num_classes, self.z_dim = num_classes, z_dim
        self.w_avg_beta = w_avg_beta
        self.stages = stages
        self.grad_ckpt = False      # --grad-ckpt: recompute each block's activations in the backward pass
        self.out_layers = [depth * (k + 1) // stages for k in range(stages)]      # uniformly spaced, 1-based
        n = res // patch
        cos, sin = rope_2d(width // heads, n)
        self.register_buffer('pos', sincos_2d(width, n)[None], persistent=False)    # the fixed input tokens
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        # mapping network: [normalized z, normalized class embedding] -> equalized-lr MLP -> style w
        self.class_embed = nn.Embedding(num_classes, z_dim)
        self.mapping = nn.Sequential(EqualLinear(2 * z_dim, width), nn.SiLU(), EqualLinear(width, width))
        self.register_buffer('w_avg', torch.zeros(num_classes, width))     # per-class running mean of w
        self.blocks = nn.ModuleList([GBlock(width, heads) for _ in range(depth)])
        # the output heads of o_k (`heads` counts attention heads); older checkpoints call them heads.*
        self.out_heads = nn.ModuleList([OutputHead(width, patch, channels) for _ in range(stages)])
        self._register_load_state_dict_pre_hook(rename_output_heads)
        self.initialize_weights()

    def initialize_weights(self):
        init_linears(self)
        # small modulation at initialization, as GAT
        for m in list(self.blocks) + list(self.out_heads):
            nn.init.xavier_uniform_(m.ada.weight, gain=0.1)
        # as GAT: a small class embedding, whose direction Adam turns quickly
        nn.init.normal_(self.class_embed.weight, std=0.02)

    def style(self, z, c):
        z_and_class = [normalize_2nd_moment(z), normalize_2nd_moment(self.class_embed(c))]
        return self.mapping(torch.cat(z_and_class, dim=1))

    def truncate(self, w, c, psi):
        """StyleGAN's convention: psi = 1 is no truncation, psi = 0 gives w_avg[c]."""
        return self.w_avg[c].lerp(w, psi) if psi != 1 else w

    def synthesis(self, w):
        """[h_0, ..., h_K]: the accumulated outputs h_k = o_0 + ... + o_k, each [B, C, res, res]."""
        x = self.pos.expand(w.shape[0], -1, -1)        # fp32: the residual stream stays fp32 under autocast
        rope = (self.rope_cos, self.rope_sin)
        hs = []
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, w, rope, use_reentrant=False)
            else:
                x = block(x, w, rope)
            # output skip accumulation: h_k = h_{k-1} + o_k
            if i + 1 == self.out_layers[len(hs)]:
                o_k = self.out_heads[len(hs)](x, w)
                hs.append(hs[-1] + o_k if hs else o_k)
        return hs

    def forward(self, z, c, psi=1.0):
        return self.synthesis(self.truncate(self.style(z, c), c, psi))

    @torch.no_grad()
    def update_w_avg(self, w, c):
        """w_avg[c] <- lerp(w_avg[c], this step's mean w of class c, 1 - beta), over the classes of the global batch."""
        sums = torch.zeros_like(self.w_avg).index_add_(0, c, w.float())
        # counts by index_add_, not bincount, which syncs on CUDA
        ones = torch.ones_like(c, dtype=torch.float)
        counts = torch.zeros(self.num_classes, device=c.device).index_add_(0, c, ones)
        if dist.is_initialized():
            packed = torch.cat([sums, counts[:, None]], dim=1)
            dist.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        mean = sums / counts.clamp(min=1)[:, None]
        updated = self.w_avg.lerp(mean, 1 - self.w_avg_beta)
        self.w_avg.copy_(torch.where(counts[:, None] > 0, updated, self.w_avg))

# --- Scale-wise discriminator (Sec. 3.1, Fig. 3): block-diagonal attention, so that d_k sees x_k alone ------


def r_k(h, size):
    """Resize to scale k's resolution `size` (a divisor of h's) by area (average-pool) downsampling."""
    return F.avg_pool2d(h, h.shape[-1] // size) if size < h.shape[-1] else h


def multiscale(hs, scales):
    """[h_0..h_K] -> [x_0..x_K] at the resolutions `scales`; a single tensor (a real image) serves every scale."""
    return [r_k(hs if torch.is_tensor(hs) else hs[k], s) for k, s in enumerate(scales)]


def group_std(x, size, parts=None):
    """StyleGAN2's minibatch standard deviation per feature, over groups of `size` samples i, i + n/size, ... within
    each part of the batch (sizes `parts`; default one part). With that grouping the approximated R1/R2's quarter
    x[::4] + sigma eps is a group of its clean part's, so d(x) - d(x + sigma eps) stays a finite difference."""
    out = []
    for x_p in x.split(parts or [len(x)]):
        g = min(size, len(x_p))
        if len(x_p) % g:
            raise ValueError(f'minibatch std: a part of {len(x_p)} samples does not split into groups of {g}')
        std = (x_p.reshape(g, -1, *x_p.shape[1:]).var(0, unbiased=False) + 1e-8).sqrt()
        out.append(std.repeat(g, *[1] * (x.dim() - 1)))
    return torch.cat(out)


class DBlock(nn.Module):
    def __init__(self, width, heads, layerscale=0.1):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width)
        self.ls1 = nn.Parameter(torch.full((width,), layerscale))
        self.ls2 = nn.Parameter(torch.full((width,), layerscale))

    def forward(self, x, rope, segments):
        x = x + self.ls1 * self.attn(self.norm1(x), rope, segments)
        return x + self.ls2 * self.mlp(self.norm2(x))


class Discriminator(nn.Module):
    """A segment [cls_k, tokens of x_k] per scale, block-diagonal attention ('split': a call per scale, or 'mask');
    mask=False attends across scales (Fig. 9); patch: one size, or one per scale (A.3)."""

    def __init__(self, depth, width, heads, channels=4, res=32, patch=2, num_classes=1000, cmap_dim=2048,
                 repa_dim=768, mask=True, attn_impl='split', scales=None, va_dim=0, mbstd=0):
        super().__init__()
        self.scales = scales or table6_scales(res)
        self.patches = patch if isinstance(patch, list) else [patch] * len(self.scales)
        self.channels, self.res = channels, res
        self.mask, self.attn_impl = mask, attn_impl
        self.grad_ckpt = False
        self.grids = [s // p for s, p in zip(self.scales, self.patches)]        # 2, 4, 8, 16 tokens per side
        bounds = np.cumsum([0] + [1 + n * n for n in self.grids]).tolist()
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        # one patch embedding per distinct patch size, shared by the scales of that size
        self.sizes = list(dict.fromkeys(self.patches))
        self.patch_embed = nn.Linear(self.sizes[0] ** 2 * channels, width)
        for p in self.sizes[1:]:
            self.add_module(f'patch_embed_{p}', nn.Linear(p * p * channels, width))
        self.register_buffer('pos', torch.cat([sincos_2d(width, n) for n in self.grids]), persistent=False)
        self.scale_embed = nn.Parameter(torch.zeros(len(self.scales), width))
        self.cls = nn.Parameter(torch.zeros(len(self.scales), width))
        # RoPE on each scale's own grid
        ropes = [rope_2d(width // heads, n, n_cls=1) for n in self.grids]
        self.register_buffer('rope_cos', torch.cat([cos for cos, _ in ropes]), persistent=False)
        self.register_buffer('rope_sin', torch.cat([sin for _, sin in ropes]), persistent=False)
        self.blocks = nn.ModuleList([DBlock(width, heads) for _ in range(depth)])
        # projection head (GAT's): d_k = <Linear(norm(cls_k)), class_map(e(c))>
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, cmap_dim)
        self.class_embed = nn.Embedding(num_classes, cmap_dim)
        self.class_map = nn.Sequential(EqualLinear(cmap_dim, cmap_dim), nn.SiLU(),
                                       EqualLinear(cmap_dim, cmap_dim))
        # optional (--mbstd; not GAT's): group_std of the normalized cls_k as a feature of the head, 0 at init
        self.mbstd = mbstd
        if mbstd:
            self.mbstd_head = nn.Parameter(torch.zeros(cmap_dim, width))
        # REPA (training only): the finest scale's tokens -> DINOv2's features
        self.proj = None
        if repa_dim:
            self.proj = nn.Sequential(nn.Linear(width, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                                      nn.Linear(2048, repa_dim))
        # App. A.3's vision-aided head (--lambda-va)
        self.va = VisionAidedHead(va_dim, num_classes) if va_dim else None
        self.initialize_weights()

    def initialize_weights(self):
        init_linears(self)
        for p in (self.scale_embed, self.cls, self.class_embed.weight):
            nn.init.normal_(p, std=0.02)
        if self.va:
            nn.init.normal_(self.va.embed.weight, std=0.02)

    def block_mask(self):
        return torch.block_diag(*[torch.ones(e - s, e - s, dtype=torch.bool, device=self.cls.device)
                                  for s, e in self.segments])

    def embed(self, xs):
        """Patch tokens of all scales, [B, sum of n_k^2, width]: one embedding call per patch size."""
        tokens = {}
        for i, p in enumerate(self.sizes):
            embed = getattr(self, f'patch_embed_{p}' if i else 'patch_embed')
            ks = [k for k, q in enumerate(self.patches) if q == p]
            t = embed(torch.cat([patchify(xs[k], p) for k in ks], 1))
            tokens.update(zip(ks, t.split([self.grids[k] ** 2 for k in ks], dim=1)))
        return torch.cat([tokens[k] for k in range(len(xs))], dim=1)

    def forward(self, xs, c, return_tokens=False, parts=None):
        """xs = [x_0..x_K] -> d [B, K+1]; return_tokens: also the finest scale's tokens (cls_K first), for REPA;
        parts: the sizes of the batch's parts (real, fake, ...) that --mbstd's groups keep apart."""
        B = xs[0].shape[0]
        t = self.embed(xs) + self.pos.to(xs[0].dtype)
        sequence = []
        for k, t_k in enumerate(t.split([n * n for n in self.grids], dim=1)):
            sequence += [self.cls[k].expand(B, 1, -1), t_k]
        x = torch.cat(sequence, dim=1)
        x = x + torch.cat([self.scale_embed[k].expand(1 + n * n, -1) for k, n in enumerate(self.grids)])
        # block-diagonal: one fused attention call per scale ('split'), or the explicit mask; mask=False: none
        attn_segments = self.segments if self.attn_impl == 'split' else self.block_mask()
        attn_segments = attn_segments if self.mask else None
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, attn_segments, use_reentrant=False)
            else:
                x = block(x, rope, attn_segments)
        # the logit in fp32: R1 and R2 take differences of it at sigma = 0.01
        with no_autocast(x.device):
            cls = self.norm(x[:, [s for s, _ in self.segments]].to(self.head.weight.dtype))     # [B, K+1, C]
            e = self.class_map(self.class_embed(c))        # [B, cmap_dim]; not normalized first, as GAT
            h = self.head(cls)
            if self.mbstd:
                h = h + F.linear(group_std(cls, self.mbstd, parts), self.mbstd_head)
            d = (h * e[:, None]).sum(-1)
        return (d, x[:, self.segments[-1][0]:]) if return_tokens else d


class VisionAidedHead(nn.Module):
    """App. A.3, part of D: d_va = <MLP(f), e(c)> on a frozen backbone's features, in RpGAN's (real, fake) pairs."""

    def __init__(self, feat_dim, num_classes, dim=512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feat_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.embed = nn.Embedding(num_classes, dim)

    def forward(self, f, c):
        return (self.mlp(f.float()) * self.embed(c)).sum(-1, keepdim=True)

# --- Augmentation: GAT's DiffAugment (losses/diffaug.py) on every D input, at full resolution, then r_k -----


def draw_aug(n, res, g, device):
    """Per-sample parameters at GAT's rates: translation and cutout always, colour on half, flip on 0.4 (rand_flip's;
    at 0.5 a flip leaks: D sees mirror images as often as images, so it cannot object to G drawing them)."""
    u = torch.rand(n, 5, generator=g, device=device)
    t = int(res * 0.125 + 0.5)          # the largest translation, in pixels
    s = int(res * 0.5 + 0.5)            # the cutout's side
    shift = torch.randint(-t, t + 1, (n, 2), generator=g, device=device)
    # the cutout's top-left corner, its centre uniform over the image (DiffAugment's offsets)
    cut = torch.randint(0, res + 1 - s % 2, (n, 2), generator=g, device=device) - s // 2
    return dict(color=u[:, 0] < 0.5, bright=u[:, 1] - 0.5, sat=u[:, 2] * 2, contrast=u[:, 3] + 0.5,
                flip=u[:, 4] < 0.4, shift=shift, cut=cut)


def augment(x, aug, color=True, cutout=True, scale=1):
    """x [B or n*B, C, H, W] with aug's parameters for B samples, shared by n stages; colour with each image's means
    (GAT: h_K's; d_k must see h_k alone); scale: pixels of x per data pixel (7 for DINOv2's 224 px on 32 px)."""
    rep = x.shape[0] // aug['flip'].shape[0]
    aug = {k: v.repeat(rep, *[1] * (v.dim() - 1)) for k, v in aug.items()}
    B, C, H, W = x.shape

    def per_sample(t):
        return t.to(x.dtype).view(B, 1, 1, 1)

    if color:
        mean_pixel = x.mean(dim=1, keepdim=True)
        mean_image = x.mean(dim=(1, 2, 3), keepdim=True)
        y = x + per_sample(aug['bright'])
        y = (y - mean_pixel) * per_sample(aug['sat']) + mean_pixel
        y = (y - mean_image) * per_sample(aug['contrast']) + mean_image
        x = torch.where(aug['color'].view(B, 1, 1, 1), y, x)
    # integer translation per sample, zero fill: gather the source rows and columns
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    shift = (aug['shift'] * scale).round().long()
    src_y = rows[None] - shift[:, :1]               # [B, H]
    src_x = cols[None] - shift[:, 1:]               # [B, W]
    inside = ((src_y >= 0) & (src_y < H))[:, None, :, None] & ((src_x >= 0) & (src_x < W))[:, None, None, :]
    x = x.gather(2, src_y.clamp(0, H - 1)[:, None, :, None].expand(B, C, H, W))
    x = x.gather(3, src_x.clamp(0, W - 1)[:, None, None, :].expand(B, C, H, W))
    x = x * inside.to(x.dtype)
    if cutout:
        side = int(H * 0.5 + 0.5)
        dy = rows.view(1, H, 1) - aug['cut'][:, 0].view(B, 1, 1)
        dx = cols.view(1, 1, W) - aug['cut'][:, 1].view(B, 1, 1)
        hole = (dy >= 0) & (dy < side) & (dx >= 0) & (dx < side)
        x = x * (~hole)[:, None].to(x.dtype)
    return torch.where(aug['flip'].view(B, 1, 1, 1), x.flip(-1), x)

# --- Objectives (Sec. 3.2): RpGAN, approximated R1/R2, L_cons (Eq. 2), REPA; L_D (DStep) and L_G (GStep) ----


def rpgan_d_loss(d_real, d_fake):
    """L_D = mean_k softplus(-(d_k(real) - d_k(fake))), over the pairs (real i, fake i)."""
    return F.softplus(d_fake - d_real).mean()


def rpgan_g_loss(d_fake, d_real):
    """L_adv(G) = mean_k softplus(-(d_k(fake) - d_k(real))); d_real carries no gradient."""
    return F.softplus(d_real.detach() - d_fake).mean()


def approx_gp(d, d_perturbed, sigma):
    """Approximated R1/R2 (Seaweed-APT; GAT's Rp_loss.py): mean((d(x) - d(x + sigma eps)) / sigma)^2 ~ |grad d|^2."""
    return ((d - d_perturbed) / sigma).square().mean()


def approx_gp_pass(D, xs, eps, c, sigma, precision, parts=None):
    """approx_gp per sample over the scales, one D pass on [x; x + sigma eps] (fp32: a ~1e-3 gap drowns in bf16)."""
    n = xs[0].shape[0]
    with autocast(precision, xs[0].device), full_fp32(precision == 'fp32'):
        xs_both = [torch.cat([x, x + sigma * e]).float() for x, e in zip(xs, eps)]
        d = D(xs_both, torch.cat([c, c]), parts=parts)
    return ((d[:n] - d[n:]) / sigma).square().mean(1)


def consistency_loss(hs, detach_anchor=False):
    """Eq. 2: L_cons = 1/K sum_{k<K} w_k mean((h_k - h_K)^2), no stop-gradient on h_K by default (as Eq. 2). A mean
    over the elements where Eq. 2 writes ||h_k - h_K||^2: the same gradient direction at any resolution, and with
    lambda_cons = 0.1 a term of the adversarial loss's order (a sum over 32 x 32 x 4 would be 4096x larger)."""
    anchor = hs[-1].detach() if detach_anchor else hs[-1]
    K = len(hs) - 1
    return sum(w_k * (h_k - anchor).float().square().mean() for w_k, h_k in zip(w_cons(K), hs[:-1])) / K


def repa_loss(pred_tokens, dino_cls, dino_patch):
    """(1 - cos) between projected D tokens and frozen DINOv2 features: the cls term plus the mean patch term."""
    cls = 1 - F.cosine_similarity(pred_tokens[:, 0].float(), dino_cls.float(), dim=-1)
    patch = 1 - F.cosine_similarity(pred_tokens[:, 1:].float(), dino_patch.float(), dim=-1).mean(1)
    return (cls + patch).mean()


def load_frozen(name, device, pretrained=True, what='DINOv2', off='--lambda-repa 0', **kw):
    """A frozen timm backbone in eval mode with ImageNet's normalization: DINOv2-B/14 (REPA) or ConvNeXt-V2 (A.3)."""
    import timm
    try:
        m = timm.create_model(name, pretrained=pretrained, num_classes=0, **kw)
    except Exception as e:
        raise SystemExit(f"error: cannot load {what} '{name}' ({type(e).__name__}): fetch it once online or use {off}.")
    m.register_buffer('pixel_mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    m.register_buffer('pixel_std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    return m.to(device).eval().requires_grad_(False)


def dino_features(dino, img, aug=None, res=32, grid=16):
    """DINOv2 tokens [B, 1 + grid^2, 768] at 224 px with the real's flip and shift x 224/res (GAT: x res/224, a bug)."""
    x = F.interpolate(img.float() / 255, size=(224, 224), mode='bicubic', align_corners=False)
    x = (x - dino.pixel_mean) / dino.pixel_std
    if aug is not None:
        x = augment(x, aug, color=False, cutout=False, scale=224 / res)
    f = dino.forward_features(x)
    if grid != 16:
        patches = f[:, 1:].transpose(1, 2).unflatten(2, (16, 16))
        patches = F.interpolate(patches, size=(grid, grid), mode='area' if grid < 16 else 'bilinear')
        f = torch.cat([f[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
    return f


def va_features(net, x):
    """App. A.3: images in [-1, 1] -> the frozen ConvNeXt-V2's pooled, normalized features [B, F] at 224 px (pMF's)."""
    x = (x.float().expand(-1, 3, -1, -1) + 1) / 2
    x = F.interpolate(x, size=(224, 224), mode='bicubic', antialias=True)
    return net.forward_head(net.forward_features((x - net.pixel_mean) / net.pixel_std), pre_logits=True)

def d_logits_and_penalties(D, xr, xf, c, r1_eps, r2_eps, args):
    """-> d_real, d_fake [B, K+1], the finest scale's tokens (REPA), R1 and R2 on every 4th sample: one D pass over
    [real; fake; real_q + sigma eps; fake_q + sigma eps] (App. A.2), or with --gp-precision fp32 the quarter apart."""
    B = xr[0].shape[0]
    q = slice(None, None, 4)
    n_q = len(range(B)[q])
    sigma = args.gp_sigma
    device = xr[0].device
    if args.gp_precision == 'fp32' and args.precision != 'fp32':
        with autocast(args.precision, device):
            d, tokens = D([torch.cat(t) for t in zip(xr, xf)], torch.cat([c, c]), return_tokens=True,
                          parts=[B, B])
        d_real, d_fake = d.split([B, B])
        xs_q = [torch.cat([r[q], f[q]]) for r, f in zip(xr, xf)]
        eps_q = [torch.cat([e_r[q], e_f[q]]) for e_r, e_f in zip(r1_eps, r2_eps)]
        penalty = approx_gp_pass(D, xs_q, eps_q, torch.cat([c[q], c[q]]), sigma, 'fp32', parts=[n_q] * 4)
        return d_real, d_fake, tokens, penalty[:n_q].mean(), penalty[n_q:].mean()
    xr_q = [x[q] + sigma * e[q] for x, e in zip(xr, r1_eps)]
    xf_q = [x[q] + sigma * e[q] for x, e in zip(xf, r2_eps)]
    with autocast(args.precision, device):
        d, tokens = D([torch.cat(t) for t in zip(xr, xf, xr_q, xf_q)], torch.cat([c, c, c[q], c[q]]),
                      return_tokens=True, parts=[B, B, n_q, n_q])
    d_real, d_fake, d_real_q, d_fake_q = d.split([B, B, n_q, n_q])
    r1 = approx_gp(d_real[q], d_real_q, sigma)
    r2 = approx_gp(d_fake[q], d_fake_q, sigma)
    return d_real, d_fake, tokens, r1, r2


class DStep(nn.Module):
    """L_D = RpGAN + gamma/2 (R1 + R2), optionally + lambda_REPA REPA + lambda_va RpGAN of d_va (pixels,
    App. A.3). G and the frozen backbones are kept outside the module tree (in lists): DDP sees D's parameters only."""

    def __init__(self, D, G, args, dino=None, va=None):
        super().__init__()
        self.D, self.args = D, args
        self._G = [G]
        self._dino, self._va = [dino], [va]

    def forward(self, x_real, c, dino_img, noise, aug):
        args, D = self.args, self.D
        B = x_real.shape[0]
        device = x_real.device
        # the fakes of every stage, [h_0; ...; h_K] along the batch
        with torch.no_grad(), autocast(args.precision, device):
            fake = torch.cat(self._G[0](noise['z'], c))
        real_aug, fake_aug = x_real, fake
        if args.aug:
            real_aug, fake_aug = augment(x_real, aug['d_real']), augment(fake, aug['d_fake'])
        xr = multiscale(real_aug, D.scales)
        xf = multiscale(fake_aug.chunk(len(D.scales)), D.scales)
        r1_eps, r2_eps = noise['r1_eps'], noise['r2_eps']
        d_real, d_fake, tokens, r1, r2 = d_logits_and_penalties(D, xr, xf, c, r1_eps, r2_eps, args)

        # L_D; gamma / 2 per penalty, as GAT's r1_gamma / 2 (Table 6's "R1 weight 1.0" is gamma)
        adv = rpgan_d_loss(d_real, d_fake)
        loss = adv + args.gamma / 2 * (r1 + r2)
        stats = dict(loss_d=adv.detach(), r1=r1.detach(), r2=r2.detach(), d_real=d_real.detach().mean(),
                     d_fake=d_fake.detach().mean())

        # optional: D-side REPA, the finest scale's tokens against DINOv2's features of the real images
        if args.lambda_repa > 0:
            with torch.no_grad(), autocast(args.precision, device):
                dino_aug = aug['d_real'] if args.aug else None
                f = dino_features(self._dino[0], dino_img, dino_aug, x_real.shape[-1], D.grids[-1])
            with autocast(args.precision, device):
                repa = repa_loss(D.proj(tokens[:B]), f[:, 0], f[:, 1:])
            loss = loss + args.lambda_repa * repa
            stats['repa'] = repa.detach()

        # optional (App. A.3, pixels): the vision-aided term on the reals and h_K as D saw them
        if self._va[0] is not None:
            with torch.no_grad(), autocast(args.precision, device):
                f = va_features(self._va[0], torch.cat([real_aug, fake_aug.chunk(len(D.scales))[-1]]))
            va = rpgan_d_loss(*D.va(f, torch.cat([c, c])).chunk(2))
            loss = loss + args.lambda_va * va
            stats['va_d'] = va.detach()
        return loss, stats


class GStep(nn.Module):
    """L_G = L_adv + lambda_cons L_cons (Eq. 3), optionally + lambda_va of the vision-aided term (App. A.3); D is
    frozen and outside the module tree. The z of the D step (as GAT), augmentation drawn anew."""

    def __init__(self, G, D, args, va=None):
        super().__init__()
        self.G, self.args = G, args
        self._D, self._va = [D], [va]

    def forward(self, x_real, c, noise, aug):
        args, G = self.args, self.G
        D, va = self._D[0], self._va[0]
        with autocast(args.precision, x_real.device):
            w = G.style(noise['z'], c)
            hs = G.synthesis(w)
            real, fake = x_real, torch.cat(hs)
            if args.aug:
                real, fake = augment(real, aug['g_real']), augment(fake, aug['g_fake'])
            d_fake = D(multiscale(fake.chunk(len(hs)), D.scales), c)
            with torch.no_grad():
                d_real = D(multiscale(real, D.scales), c)
                f_real = va_features(va, real) if va is not None else None
            # G's gradient flows through the frozen backbone
            f_fake = va_features(va, fake.chunk(len(hs))[-1]) if va is not None else None

        # Eq. 3: L_G = L_adv + lambda_cons L_cons (Eq. 2)
        adv = rpgan_g_loss(d_fake, d_real)
        cons = consistency_loss(hs, detach_anchor=args.cons_detach)
        loss = adv + args.lambda_cons * cons
        stats = dict(loss_g=adv.detach(), cons=cons.detach())
        if va is not None:
            va_g = rpgan_g_loss(D.va(f_fake, c), D.va(f_real, c))
            loss = loss + args.lambda_va * va_g
            stats['va_g'] = va_g.detach()
        return loss, w.detach(), stats


# --- Data (Sec. 4): prepare_latents.py's directories, SD-VAE posteriors drawn anew at each use, or pixels ---

DATA_FORMAT_VERSION = 2     # 2: pixels as uint8 or JPEG ('store'); version 1's latent directories still read
META_KEYS = ('format_version', 'N', 'num_classes', 'scaling_factor', 'vae', 'images')
STORES = {'latents': 'latents.npy', 'uint8': 'pixels.npy', 'jpeg': 'images.bin'}     # where the training data lies


def load_vae(name_or_path=DEFAULT_VAE, device='cpu', required=True):
    """The frozen SD-VAE (hub name or save_pretrained directory); missing: SystemExit, or None if not required."""
    from diffusers.models import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:
        if not required:
            return None
        raise SystemExit(f"error: cannot load the VAE '{name_or_path}' ({type(e).__name__}): download it once online "
                         f"(huggingface_hub caches it) or pass a local save_pretrained directory with --vae.")
    return vae.to(device).eval().requires_grad_(False)


class LatentDataset(torch.utils.data.Dataset):
    """Item i -> (latent moments [2C, r, r] (mean | std) or uint8 pixels [C, r, r], label, REPA's crop or empty)."""

    def __init__(self, path, meta, images):
        self.path, self.meta = path, meta
        self.store = meta['store']
        self.images = images and self.store == 'latents'
        self.data = self.labels = self.blob = None      # opened lazily, once per DataLoader worker

    def __len__(self):
        return self.meta['N']

    def open(self):
        if self.labels is None:
            self.labels = np.load(os.path.join(self.path, 'labels.npy'), mmap_mode='r')
            if self.store != 'jpeg':
                self.data = np.load(os.path.join(self.path, STORES[self.store]), mmap_mode='r')
            if self.images or self.store == 'jpeg':
                self.index = np.load(os.path.join(self.path, 'images_index.npy'))
                self.blob = np.memmap(os.path.join(self.path, 'images.bin'), dtype=np.uint8, mode='r')
        return self

    def jpeg(self, i, mode):
        from PIL import Image
        encoded = self.blob[self.index[i]:self.index[i + 1]].tobytes()
        a = np.asarray(Image.open(io.BytesIO(encoded)).convert(mode))
        return torch.from_numpy(a.reshape(*a.shape[:2], -1).copy()).permute(2, 0, 1)

    def __getitem__(self, i):
        self.open()
        if self.store == 'jpeg':
            x = self.jpeg(i, 'L' if self.meta['shape'][0] == 1 else 'RGB')
        else:
            x = torch.from_numpy(np.array(self.data[i]))
        img = self.jpeg(i, 'RGB') if self.images else torch.empty(0, dtype=torch.uint8)
        return x, int(self.labels[i]), img


def open_data(args):
    """-> (info: kind toy | pixel | latent, N, channels, res, ...; the data set)."""
    if args.data == 'toy':
        x, y = make_toy(args.toy_n, seed=args.seed, res=args.toy_res)
        info = dict(kind='toy', N=len(y), channels=3, res=args.toy_res, num_classes=int(y.max()) + 1,
                    scale=1.0, vae=None, meta=None)
        return info, (x, y)
    meta = check_data_dir(args.data)
    if args.lambda_repa > 0 and not meta['images'] and meta['store'] == 'latents':
        raise SystemExit(f"error: '{args.data}' has no images for REPA's DINOv2 (prepared with --no-images): re-run "
                         f"prepare_latents.py without --no-images, or train with --lambda-repa 0.")
    info = dict(kind='pixel' if meta['vae'] is None else 'latent', N=meta['N'], channels=meta['shape'][0],
                res=meta['shape'][1], num_classes=meta['num_classes'], scale=meta['scaling_factor'],
                vae=meta['vae'], meta=meta)
    return info, LatentDataset(args.data, meta, images=args.lambda_repa > 0)


def data_x(batch, posterior_eps, info):
    """A batch of the data set in G's output space: pixels in [-1, 1], or latents drawn anew from their posterior,
    x = (mean + std * eps) * scaling_factor."""
    if info['kind'] == 'latent':
        C = batch.shape[1] // 2
        return (batch[:, :C].float() + batch[:, C:].float() * posterior_eps) * info['scale']
    return batch if batch.is_floating_point() else batch.float() / 127.5 - 1


def step_indices(n, global_batch, rank, world, seed, start, steps):
    """This rank's data indices per step, from (seed, step) alone: a resume replays the same data at any world size."""
    b, epoch = global_batch // world, None
    for step in range(start, steps):
        idx, pos = [], step * global_batch
        while len(idx) < global_batch:
            e, offset = divmod(pos + len(idx), n)
            # the permutation of an epoch, kept while its batches are drawn
            if e != epoch:
                epoch = e
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
            idx += perm[offset:offset + global_batch - len(idx)].tolist()
        yield idx[rank * b:(rank + 1) * b]


def real_batches(ds, info, sampler, device, workers):
    """Yields this rank's (x, c, img) per step: LatentDataset's items batched, or the toy set's (img None)."""
    if info['kind'] == 'toy':
        x, y = ds[0].to(device), ds[1].to(device)
        for idx in sampler:
            yield x[idx], y[idx], None
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == 'cuda',
                                         prefetch_factor=4 if workers else None)
    for batch in loader:
        yield [t.to(device, non_blocking=True) for t in batch]

# --- One training iteration (App. A.2): a step's noise, the networks, a D step then a G step ----------------


def step_noise(seed, step, n, G, scales, device):
    """(noise, aug) of a step's global batch of n from (seed, step) alone: exact resume at any world size. noise: z
    (both steps', as GAT), the posterior draw, R1's and R2's perturbations; aug: DiffAugment's, per step and side."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step + 1)
    C, R = G.channels, G.res
    z = torch.randn(n, G.z_dim, generator=g, device=device)
    posterior_eps = torch.randn(n, C, R, R, generator=g, device=device)
    aug = {name: draw_aug(n, R, g, device) for name in ('d_real', 'd_fake', 'g_real', 'g_fake')}
    r1_eps = [torch.randn(n, C, s, s, generator=g, device=device) for s in scales]
    r2_eps = [torch.randn(n, C, s, s, generator=g, device=device) for s in scales]
    return dict(z=z, posterior_eps=posterior_eps, r1_eps=r1_eps, r2_eps=r2_eps), aug


def take(draws, lo, hi):
    """Samples lo..hi of every tensor in a (nested) dict of per-sample draws."""
    if torch.is_tensor(draws):
        return draws[lo:hi]
    if isinstance(draws, list):
        return [take(v, lo, hi) for v in draws]
    return {k: take(v, lo, hi) for k, v in draws.items()}


def n_params(net):
    return sum(p.numel() for p in net.parameters()) if net else 0


@torch.no_grad()
def ema_update(ema, G, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()), 1 - decay)
    for b_ema, b in zip(ema.buffers(), G.buffers()):
        b_ema.copy_(b)


# build()'s result: the networks, their optimizers, the (DDP-wrapped) step modules, the process's micro-batch.
Models = collections.namedtuple('Models', ['G', 'D', 'ema', 'opt_g', 'opt_d', 'd_step', 'g_step', 'world', 'micro'])


def adamw(net, args, fused):
    return torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.0,
                             fused=fused)


def build(args, g_cfg, d_cfg, device, world, ck=None, pretrained=True):
    """G, D, the EMA of G, AdamW (0, 0.99) optimizers and the step modules; the state of checkpoint ck if given."""
    torch.manual_seed(args.seed)
    G = Generator(**g_cfg).to(device)
    D = Discriminator(**d_cfg).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = adamw(G, args, fused=device.type == 'cuda')
    opt_d = adamw(D, args, fused=device.type == 'cuda')
    if ck is not None:
        for name, obj in dict(G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d).items():
            obj.load_state_dict(ck[name])
    G.grad_ckpt = D.grad_ckpt = args.grad_ckpt
    if args.compile:
        # per block and in place, so that the state_dict keys stay the same
        for block in [*G.blocks, *D.blocks]:
            block.compile()
    dino = load_frozen(DINO_NAME, device, pretrained, img_size=224) if args.lambda_repa > 0 else None
    va = None
    if args.lambda_va > 0:
        va = load_frozen(args.va_model, device, pretrained, 'vision-aided (ConvNeXt-V2)', '--lambda-va 0')
    d_step = DStep(D, G, args, dino, va)
    g_step = GStep(G, D, args, va)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == 'cuda' else None
        d_step = DDP(d_step, device_ids=ids, broadcast_buffers=False)
        g_step = DDP(g_step, device_ids=ids, broadcast_buffers=False)
    micro = args.micro_batch or args.batch_size // world
    return Models(G, D, ema, opt_g, opt_d, d_step, g_step, world, micro)


def set_lr(m, args, step):
    """--lr-final < 1: a cosine from lr to lr x lr_final over the run, for G and D."""
    lr = args.lr * (args.lr_final + (1 - args.lr_final) * (1 + math.cos(math.pi * step / args.steps)) / 2)
    for opt in (m.opt_g, m.opt_d):
        for group in opt.param_groups:
            group['lr'] = lr


def train_step(m, x, c, dino_img, noise, aug, args):
    """One iteration (App. A.2): D step, G step (D frozen), w_avg, EMA; micro-batches accumulate. -> names and a tensor
    of the last micro-batch's statistics (loss_d, loss_g: the adversarial terms), without a host sync."""
    n_acc = x.shape[0] // m.micro
    chunks = [(i * m.micro, (i + 1) * m.micro) for i in range(n_acc)]

    def sync_unless_last(step_module, i):
        if m.world == 1 or i == n_acc - 1:
            return contextlib.nullcontext()
        return step_module.no_sync()

    # D step; with fp32 R1/R2, TF32 is off for its backward too (the bf16 parts are unaffected)
    m.D.requires_grad_(True)
    for i, (lo, hi) in enumerate(chunks):
        with sync_unless_last(m.d_step, i), full_fp32(args.gp_precision == 'fp32'):
            dino_img_i = None if dino_img is None else dino_img[lo:hi]
            loss_d, stats_d = m.d_step(x[lo:hi], c[lo:hi], dino_img_i, take(noise, lo, hi), take(aug, lo, hi))
            (loss_d / n_acc).backward()
    gnorm_d = torch.nn.utils.clip_grad_norm_(m.D.parameters(), args.clip)
    m.opt_d.step()
    m.opt_d.zero_grad(set_to_none=True)
    m.D.requires_grad_(False)

    # G step
    ws = []
    for i, (lo, hi) in enumerate(chunks):
        with sync_unless_last(m.g_step, i):
            loss_g, w, stats_g = m.g_step(x[lo:hi], c[lo:hi], take(noise, lo, hi), take(aug, lo, hi))
            (loss_g / n_acc).backward()
        ws.append(w)
    gnorm_g = torch.nn.utils.clip_grad_norm_(m.G.parameters(), args.clip)
    m.opt_g.step()
    m.opt_g.zero_grad(set_to_none=True)

    m.G.update_w_avg(torch.cat(ws), c)
    ema_update(m.ema, m.G, args.ema_decay)
    names = [*stats_d, *stats_g, 'gnorm_d', 'gnorm_g']
    return names, torch.stack([*stats_d.values(), *stats_g.values(), gnorm_d, gnorm_g]).float()

# --- The training loop: DDP through torchrun, bf16, EMA, logging, checkpoints, then the step's evaluation ---


def train(args, measures=(), hooks=()):
    """The run. measures: factories of measures of the evaluation's samples (fid.py's judges; see Evaluation); hooks:
    callables hook(step, ema, info, log), called on rank 0 after every step (fid.py train --fid-every: FID)."""
    rank, world, device = setup_ddp()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    b = args.batch_size // world                    # this process's share of the global batch
    micro = args.micro_batch or b
    if args.batch_size % world or b % micro:
        raise SystemExit(f"error: --batch-size {args.batch_size} must split evenly over {world} processes and into "
                         f"micro-batches of {args.micro_batch}: pick sizes that divide.")
    if micro % 4:
        raise SystemExit(f"error: the per-process micro-batch ({micro}) must be a multiple of 4 (R1/R2: every 4th).")
    if args.mbstd and micro // 4 % args.mbstd:
        raise SystemExit(f"error: --mbstd {args.mbstd} must divide a quarter of the micro-batch ({micro}): R1/R2's "
                         f"quarter is one or more groups; pick a group size that divides {micro // 4}.")
    info, ds = open_data(args)
    g_cfg, d_cfg = model_configs(args, info)
    run_dir, ck = resolve_run(args, info, g_cfg, d_cfg, rank, world)
    log = make_logger(run_dir, rank)
    if device.type == 'cpu' and args.model not in ('S', 'T'):
        log(f"note: G-{args.model}/2 is sized for GPUs; for a small data set on the CPU see the README's 'Train on "
            f"your own data' (--model S: small-data defaults)")

    # Networks, data, evaluation
    m = build(args, g_cfg, d_cfg, device, world, ck)
    start = 0 if ck is None else ck['step']
    if ck is not None:
        log(f"resumed from {ck['path']} at step {start}")
    indices = step_indices(info['N'], args.batch_size, rank, world, args.seed, start, args.steps)
    batches = real_batches(ds, info, indices, device, args.workers)
    evaluation = None
    if rank == 0 and args.eval_every:
        # no evaluation can end a run
        try:
            evaluation = Evaluation(args, info, ds, device, run_dir, log, measures)
        except Exception as e:
            log(f"evaluation off: its set-up failed ({type(e).__name__}: {e}); training goes on")
        if info['kind'] != 'latent' and not measures:
            log(f"note: the judges' metrics (class and shape accuracy, FD, precision/recall, the copy check) are "
                f"fid.py's: `python fid.py {run_dir}` measures this run, `python fid.py train ...` as it trains")
    config = dict(G=g_cfg, D=d_cfg, args=vars(args), data={k: v for k, v in info.items() if k != 'meta'},
                  meta=info['meta'])
    log(f"run {run_dir}: G {n_params(m.G) / 1e6:.2f}M, D {n_params(m.D) / 1e6:.2f}M params, {world} process(es) x "
        f"batch {b} (micro {micro}), {args.precision}, device {device}, {args.workers} data workers")

    stop = Preemption(world)
    pending = []                # the statistics of the steps since the last log line
    t0 = time.time()
    last_eval = None
    done = start
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0,
                     dynamic_ncols=True):
        # One iteration on this process's share of the global batch
        # x_data: a latent's posterior moments (mean | std) or pixels, sampled into x below
        x_data, c, dino_img = next(batches)
        noise, aug = step_noise(args.seed, step, args.batch_size, m.G, m.D.scales, device)
        noise, aug = take(noise, rank * b, (rank + 1) * b), take(aug, rank * b, (rank + 1) * b)
        x = data_x(x_data, noise['posterior_eps'], info)
        if info['kind'] == 'pixel' and args.lambda_repa > 0:
            dino_img = x_data.expand(-1, 3, -1, -1)     # REPA of pixel data: DINOv2 sees x's own pixels
        if args.lr_final != 1:
            set_lr(m, args, step)
        names, stats = train_step(m, x, c, dino_img, noise, aug, args)
        pending.append(stats)
        done = step + 1
        stopping = stop.requested()

        # Log: one host sync per interval, with the guard against non-finite losses
        save = done % args.latest_every == 0 or done % args.ckpt_every == 0 or done == args.steps or stopping
        if done % args.log_every == 0 or save:
            seconds = time.time() - t0
            t0 = time.time()
            log_losses(log, names, pending, done, seconds, run_dir)
            pending = []

        # Checkpoint, then evaluate: an evaluation that fails costs nothing already written
        if rank == 0 and save:
            state = dict(format='cat', version=CKPT_VERSION, step=done, config=config, G=m.G.state_dict(),
                         D=m.D.state_dict(), ema=m.ema.state_dict(), opt_g=m.opt_g.state_dict(),
                         opt_d=m.opt_d.state_dict())
            write_checkpoint(run_dir, state, args)
        if evaluation and (done % args.eval_every == 0 or done == args.steps) and not stopping:
            last_eval = evaluate(evaluation, m.ema, done, log)
        if rank == 0 and not stopping:
            run_hooks(hooks, done, m.ema, info, log)
        if stopping:
            log(f"stopped by signal after step {done}; checkpoint {run_dir}/latest.pt. Resume with the same command "
                f"plus --resume {run_dir}")
            break

    stop.restore()
    if info['kind'] == 'toy' and last_eval is not None:
        log(toy_line(last_eval, evaluation.measures))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return dict(run_dir=run_dir, G=m.G, D=m.D, ema=m.ema, eval=last_eval, step=done)


def log_losses(log, names, pending, done, seconds, run_dir):
    """The mean of each statistic over the steps since the last line; a non-finite one stops the run."""
    values = torch.stack(pending).mean(0).tolist()
    bad = [name for name, v in zip(names, values) if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"error: non-finite {', '.join(bad)} within steps {done - len(pending) + 1}-{done}: "
                         f"stopped; the last checkpoint ({run_dir}/latest.pt) is from before them, untouched.")
    metrics = dict(step=done, **dict(zip(names, values)), sec_per_it=seconds / len(pending))
    log(f"step {done}: " + ' '.join(f"{k}={v:.4g}" for k, v in metrics.items() if k != 'step'), metrics)


def evaluate(evaluation, ema, done, log):
    """Runs the evaluation; a failure is a log line. The line shows summaries, metrics.jsonl has everything."""
    try:
        metrics, failed = evaluation(ema, done)
    except Exception as e:
        metrics, failed = None, {'evaluation': f'{type(e).__name__}: {e}'}
    for name, why in failed.items():
        log(f"eval {done}: {name} failed ({why}); training goes on")
    shown = {k: v for k, v in (metrics or {}).items() if k != 'features' and not re.search(r'_\d+$', k)}
    log(f"eval {done}: " + ' '.join(f"{k}={v:.4f}" for k, v in shown.items()),
        dict(step=done, **(metrics or {})))
    return metrics


def run_hooks(hooks, done, ema, info, log):
    for hook in hooks:
        try:
            hook(done, ema, info, log)
        except Exception as e:
            name = getattr(hook, '__name__', type(hook).__name__)
            log(f"step {done}: {name} failed ({type(e).__name__}: {e}); training goes on")


def setup_ddp():
    """(rank, world size, device) from torchrun's environment; a plain `python` run is rank 0 of 1."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cuda, local = torch.cuda.is_available(), int(os.environ['LOCAL_RANK'])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group('nccl' if cuda else 'gloo')
    device = torch.device('cuda', local) if cuda else torch.device('cpu')
    return dist.get_rank(), dist.get_world_size(), device


def model_configs(args, info):
    """G's and D's constructor arguments; Table 6's hierarchy and patch 2 left out (older configs compare equal)."""
    g, d = G_CONFIGS[args.model], D_CONFIGS[args.model_d or D_FOR_G[args.model]]
    common = dict(channels=info['channels'], res=info['res'], num_classes=info['num_classes'])
    g_cfg = dict(depth=g.depth, width=g.width, heads=g.heads, **common)
    d_cfg = dict(depth=d.depth, width=d.width, heads=d.heads, cmap_dim=d.cmap,
                 repa_dim=768 if args.lambda_repa > 0 else 0, mask=not args.no_mask, **common)
    if args.mbstd:
        d_cfg['mbstd'] = args.mbstd
    scales, patch, d_patch = hierarchy(args, info)
    if scales != table6_scales(info['res']):
        g_cfg['stages'], d_cfg['scales'] = len(scales), scales
    if patch != 2:
        g_cfg['patch'] = patch
    if d_patch != [2] * len(scales):
        d_cfg['patch'] = d_patch if len(set(d_patch)) > 1 else d_patch[0]
    if args.lambda_va > 0:
        if info['kind'] == 'latent':
            raise SystemExit("error: --lambda-va needs pixel data (App. A.3), not latents: train with --lambda-va 0.")
        import timm
        # the backbone's feature width, without its weights
        with torch.device('meta'):
            d_cfg['va_dim'] = timm.create_model(args.va_model, pretrained=False, num_classes=0).num_features
    return g_cfg, d_cfg


def hierarchy(args, info):
    """(scales, G's patch, D's patch per scale) of --scales, --patch, --d-patch (Table 6's, 2), or an error line."""
    r, kind = info['res'], 'images' if info['kind'] != 'latent' else 'latents'
    scales, patch = args.scales or table6_scales(r), args.patch or 2
    d_patch = args.d_patch or [patch]
    d_patch = d_patch * len(scales) if len(d_patch) == 1 else d_patch
    unit = 8 * max(d_patch + [patch])
    if not args.scales and r % unit:
        # the data's size does not fit the default hierarchy
        if info['kind'] == 'toy':
            fix = f"use --toy-res {unit}"
        else:
            resolution = unit if kind == 'images' else 8 * unit
            fix = f"re-run prepare_latents.py for '{args.data}' with --resolution {resolution}"
        raise SystemExit(f"error: '{args.data}' holds {r} x {r} {kind}, but CAT's four scales (r/8, r/4, r/2, r) with "
                         f"patches up to {unit // 8} need r to be a multiple of {unit}: {fix} (or a multiple of it).")
    d_patches = ','.join(map(str, d_patch))
    problems = [
        (len(scales) < 2, 'CAT needs at least two scales'),
        (any(b <= a for a, b in zip(scales, scales[1:])), 'the resolutions must increase'),
        (any(s < 1 or r % s for s in scales), f'each must divide the data resolution {r}'),
        (len(d_patch) != len(scales), f'--d-patch {d_patches} needs one patch size per scale'),
        (any(q < 1 or s % q for s, q in zip(scales, d_patch)),
         f'each must be a whole number of D patches ({d_patches})'),
        (r % patch, f"G's patch {patch} must divide {r}"),
        (G_CONFIGS[args.model].depth < len(scales), f'G-{args.model} has fewer blocks than stages'),
    ]
    for wrong, why in problems:
        if wrong:
            raise SystemExit(f"error: --scales {','.join(map(str, scales))} for {r} x {r} {kind}: {why}.")
    return scales, patch, d_patch

# --- Evaluation (rank 0): Eq. 1's cross-scale metrics and the sample grids; measures of quality: fid.py -----


def cross_scale_metrics(hs, scales):
    """Eq. 1's delta_k, R_k, A_k (k < K, batch means); ours: delta_h_k of raw h_k, *_floor: Eq. 1 of h_k = h_K."""
    full, K = scales[-1], len(hs) - 1

    def eq1(hs):
        xs = [r_k(h.float(), s) for h, s in zip(hs, scales)]
        # r_K: bilinear upsampling to the finest scale (the identity there)
        xs = [F.interpolate(x, (full, full), mode='bilinear', align_corners=False).flatten(1) for x in xs]
        x_K, norm_K = xs[-1], xs[-1].norm(dim=1)
        delta = [((x_K - xs[k]).norm(dim=1) / norm_K).mean().item() for k in range(K)]
        R = [((xs[k + 1] - xs[k]).norm(dim=1) / norm_K).mean().item() for k in range(K)]
        A = [F.cosine_similarity(xs[k + 1] - xs[k], x_K - xs[k], dim=1).mean().item() for k in range(K)]
        return delta, R, A

    delta, R, A = eq1(hs)
    delta_floor, R_floor, A_floor = eq1([hs[-1]] * len(hs))
    h_K = hs[-1].float().flatten(1)
    delta_h = [((h_K - h.float().flatten(1)).norm(dim=1) / h_K.norm(dim=1)).mean().item() for h in hs[:-1]]
    return dict(delta=delta, R=R, A=A, delta_h=delta_h,
                delta_floor=delta_floor, R_floor=R_floor, A_floor=A_floor)


EQ1_SUMMARY = ['delta', 'R', 'A', 'delta_h']        # the means in the log: Eq. 1's, and delta_h (ours)


def to_uint8(x):
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, 3] on the CPU (greyscale repeated)."""
    x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu()


def decode(x, info, vae=None):
    """-> uint8 [N, H, W, 3]: pixels as they are, latents through the VAE, or without one channels 0..2 as colour."""
    if info['kind'] != 'latent':
        return to_uint8(x)
    if vae is None:
        x = x[:, :3] / x[:, :3].flatten(1).abs().amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
        return to_uint8(F.interpolate(x, scale_factor=8, mode='nearest'))
    return to_uint8(torch.cat([vae.decode(b.float() / info['scale']).sample for b in x.split(32)]))


def save_grid(images, nrow, path, size=64):
    """uint8 [N, H, W, 3] -> PNG, nrow per row, white 1-px gaps, enlarged (nearest) to >= size px to judge samples."""
    from PIL import Image
    f = max(1, size // images.shape[1])
    images = images.repeat_interleave(f, 1).repeat_interleave(f, 2)
    N, H, W, _ = images.shape
    grid = torch.full((-(-N // nrow) * (H + 1) + 1, nrow * (W + 1) + 1, 3), 255, dtype=torch.uint8)
    for i in range(N):
        y, x = i // nrow * (H + 1) + 1, i % nrow * (W + 1) + 1
        grid[y:y + H, x:x + W] = images[i]
    Image.fromarray(grid.numpy()).save(path)


@torch.no_grad()
def generate(G, z, c, psi=1.0, batch=256, all_stages=False):
    """Samples in batches: the final h_K [N, C, R, R], or every stage [h_0..h_K] stacked, [K+1, N, C, R, R]."""
    outs = (G(zb, cb, psi) for zb, cb in zip(z.split(batch), c.split(batch)))
    if all_stages:
        return torch.cat([torch.stack(hs) for hs in outs], dim=1)
    return torch.cat([hs[-1] for hs in outs])


def eq1_summary(eq1):
    """The log's means over the stages: delta and delta_h over k < K; R and A over k < K - 1, since at k = K - 1,
    x_{k+1} = x_K makes A = 1 and R = delta by construction (the per-stage values keep every k)."""
    out = {}
    for name in EQ1_SUMMARY:
        values = eq1[name][:-1] if name in ('R', 'A') else eq1[name]
        out[name] = sum(values) / len(values) if values else float('nan')
    return out


class Evaluation:
    """Rank 0, every --eval-every, on fixed z: the grid samples-STEP.png, Eq. 1, each measure (made once by make(self),
    None: not for this data; measure(samples, classes, failed) -> metrics; its `classes` pick the samples' classes)."""

    def __init__(self, args, info, ds, device, run_dir, log, measures=()):
        self.args, self.info = args, info
        self.ds, self.device = ds, device
        self.run_dir, self.log = run_dir, log
        self.scales = hierarchy(args, info)[0]
        self.vae = None
        nc = info['num_classes']
        self.z = torch.randn(args.eval_n, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 12345))
        self.c = torch.arange(args.eval_n) % nc
        if info['kind'] == 'latent':
            self.grid_c = self.c[:32]
            self.vae = load_vae(args.vae or info['vae'], device, required=False)
            if self.vae is None:
                log(f"warning: VAE '{args.vae or info['vae']}' unavailable: sample grids show latent channels 0-2.")
        else:
            # 10 samples per class, a row each
            self.grid_c = torch.arange(min(nc, 16) if nc > 1 else 10).repeat_interleave(10) % nc
        g = torch.Generator().manual_seed(args.seed + 54321)
        self.z_grid = torch.randn(len(self.grid_c), Z_DIM, generator=g)
        self.grid_name = 'samples'
        self.measures = [m for m in (make(self) for make in measures) if m is not None]
        for measure in self.measures:
            if getattr(measure, 'classes', None) is not None:
                self.z, self.c = self.z[:len(measure.classes)], measure.classes

    @torch.no_grad()
    def __call__(self, ema, step):
        """-> (metrics, {name of a failed metric: why}): a failure costs that metric, not the run."""
        args, device = self.args, self.device
        out, failed = {}, {}
        with autocast(args.precision, device):
            hs = list(generate(ema, self.z.to(device), self.c.to(device), all_stages=True).float().cpu())
            grid = generate(ema, self.z_grid.to(device), self.grid_c.to(device)).float().cpu()
        try:
            eq1 = cross_scale_metrics(hs, self.scales)
            out = {f'{name}_{k}': v for name, values in eq1.items() for k, v in enumerate(values)}
            out.update(eq1_summary(eq1))
        except Exception as e:
            failed['Eq. 1 (delta, R, A)'] = f'{type(e).__name__}: {e}'
        for measure in self.measures:
            try:
                out.update(measure(hs[-1], self.c, failed))
            except Exception as e:
                failed[type(measure).__name__] = f'{type(e).__name__}: {e}'
        nrow = 8 if self.info['kind'] == 'latent' else 10
        path = os.path.join(self.run_dir, f'{self.grid_name}-{step:07d}.png')
        save_grid(decode(grid, self.info, self.vae), nrow, path)
        return out, failed

# --- Run directory, checkpoints, logging, preemption --------------------------------------------------------

CKPT_VERSION = 2            # 2: GAT's equalized-lr form (version-1 weights would load, but mean other things)


def resolve_run(args, info, g_cfg, d_cfg, rank, world):
    """-> (run directory, checkpoint or None) of --resume FILE | DIR (none there yet: a new run), --out or runs/."""
    ck = None
    if args.resume:
        src = args.resume if args.resume != 'auto' else (args.out or '')
        if not src:
            raise SystemExit("error: --resume without a path needs --out RUN_DIR.")
        if src.endswith('.pt') and not os.path.isfile(src):
            raise SystemExit(f"error: --resume {src}: no such checkpoint file.")
        if not os.path.isfile(src) and not checkpoints_in(src):
            # a requeued job's first start: a new run there
            print(f"--resume: no checkpoint in {src} {'yet' if os.path.isdir(src) else '(a new directory)'}, "
                  f"starting a new run there")
            run_dir = args.out or src
        else:
            path = find_resume(src)
            ck = dict(load_checkpoint(path), path=path)
            run_dir = args.out or (src if os.path.isdir(src) else os.path.dirname(path))
            if ck['config']['G'] != g_cfg or ck['config']['D'] != d_cfg:
                old = ck['config']['args']
                raise SystemExit(f"error: {path} holds a different model (--model {old['model']}, --model-d "
                                 f"{old['model_d']}, data {old['data']}): resume with the same model options and "
                                 f"--data.")
    else:
        run_dir = args.out or new_run_dir('runs', 'toy' if info['kind'] == 'toy' else args.model)
        if rank == 0 and checkpoints_in(run_dir):
            raise SystemExit(f"error: {run_dir} already holds a run: add --resume to continue it, or pick a new --out.")
    if world > 1:
        # every rank writes logs to and reads checkpoints from rank 0's choice
        obj = [run_dir]
        dist.broadcast_object_list(obj, src=0)
        run_dir = obj[0]
    return run_dir, ck


def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous file intact."""
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_checkpoint(path, map_location='cpu'):
    """A CAT checkpoint dict (weights-only, so it runs no code), else one line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint file '{path}'.")
    if path.endswith('.safetensors'):
        raise SystemExit(f"error: '{path}' holds only the EMA generator (sample.py --export): train from latest.pt "
                         f"or ckpt-*.pt; sample.py samples from it.")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r'GLOBAL (\S+)', str(e))        # the first object the safe unpickler refused
        raise SystemExit(f"error: '{path}' is not a safe CAT checkpoint: it holds {what[1] if what else 'an object'}, "
                         f"not only tensors and plain data, and is not loaded (no code in it ran).")
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint '{path}' ({type(e).__name__}): truncated or not a torch file.")
    if not isinstance(ck, dict) or ck.get('format') != 'cat' or 'config' not in ck:
        raise SystemExit(f"error: '{path}' is not a CAT checkpoint (written by cat.py).")
    if ck.get('version', 1) < CKPT_VERSION:
        raise SystemExit(f"error: '{path}' is from an older cat.py (another equalized-lr form): retrain with this one.")
    return ck


def checkpoints_in(run_dir):
    """latest.pt, then ckpt-*.pt newest first."""
    steps = sorted(glob.glob(os.path.join(run_dir, 'ckpt-*.pt')), reverse=True)
    latest = os.path.join(run_dir, 'latest.pt')
    return ([latest] if os.path.exists(latest) else []) + steps


def find_resume(path):
    """--resume FILE, or a run directory's newest checkpoint that loads (a damaged latest.pt falls back)."""
    if os.path.isfile(path):
        return path
    for p in checkpoints_in(path):
        try:
            load_checkpoint(p)
            return p
        except SystemExit as e:
            print(f"warning: skipping {p}: {e}")
    raise SystemExit(f"error: --resume {path}: no readable checkpoint there.")


def write_checkpoint(run_dir, state, args):
    """latest.pt; at --ckpt-every and the end ckpt-STEP.pt linked as latest.pt, the old ones pruned (--keep)."""
    step = state['step']
    latest = os.path.join(run_dir, 'latest.pt')
    if step % args.ckpt_every and step != args.steps:
        save_checkpoint(latest, state)
        return
    path = os.path.join(run_dir, f'ckpt-{step:07d}.pt')
    save_checkpoint(path, state)
    try:
        os.link(path, latest + '.tmp')
        os.replace(latest + '.tmp', latest)
    except OSError:
        save_checkpoint(latest, state)
    periodic = [p for p in sorted(glob.glob(os.path.join(run_dir, 'ckpt-*.pt')))
                if not (args.milestone_every and checkpoint_step(p) % args.milestone_every == 0)]
    for old in periodic[:-args.keep]:
        os.remove(old)


def checkpoint_step(path):
    """The step in a checkpoint's name: ckpt-0012000.pt -> 12000."""
    return int(os.path.basename(path)[len('ckpt-'):-len('.pt')])


def new_run_dir(root, name):
    os.makedirs(root, exist_ok=True)
    ids = [int(m.group(1)) for d in os.listdir(root) if (m := re.match(r'(\d+)-', d))]
    return os.path.join(root, f'{max(ids, default=-1) + 1:03d}-{name}')


def make_logger(run_dir, rank):
    """log(msg, metrics=None): on rank 0, to stdout (through tqdm), log.txt and metrics.jsonl in the run directory."""
    if rank != 0:
        return lambda msg, metrics=None: None
    os.makedirs(run_dir, exist_ok=True)
    txt = open(os.path.join(run_dir, 'log.txt'), 'a')
    jsonl = open(os.path.join(run_dir, 'metrics.jsonl'), 'a')

    def log(msg, metrics=None):
        tqdm.write(msg)
        print(msg, file=txt, flush=True)
        if metrics is not None:
            print(json.dumps(metrics), file=jsonl, flush=True)
    return log


class Preemption:
    """SIGTERM, SIGINT, SIGUSR1 (SLURM) set a flag, summed asynchronously over gloo: all ranks stop after step s + 1."""

    def __init__(self, world):
        self.flag = torch.zeros(1)
        self.world = world
        self.work = None
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        self.old = {sig: signal.signal(sig, self.handler) for sig in signals}
        self.group = dist.new_group(backend='gloo') if world > 1 else None

    def handler(self, signum, frame):
        if self.flag.item():                    # a second signal: stop now
            raise KeyboardInterrupt
        self.flag.fill_(1)

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def requested(self):
        if self.world == 1:
            return bool(self.flag.item())
        if self.work is not None:
            self.work.wait()
            if self.reduced.item() > 0:
                return True
        self.reduced = self.flag.clone()
        self.work = dist.all_reduce(self.reduced, group=self.group, async_op=True)
        return False


# === What follows supports the method and is not part of it: the toy set, data checks, the command line =====

# --- The toy set (--data toy): 10 classes = (shape, base hue), visible after 4x pooling; minutes on a CPU ---

TOY_HUES = (0, 216, 72, 288, 36, 252, 324, 144, 108, 180)      # degrees, per class


def toy_line(metrics, measures):
    """The toy run's last line: the measures' summaries (their `summary`: fid.py's judges), then Eq. 1's means."""
    keys = [k for m in measures for k in getattr(m, 'summary', [])] + EQ1_SUMMARY
    return "toy: " + ' '.join(f"{k}={metrics.get(k, float('nan')):.4f}" for k in keys)


def _plus(ax, ay, s):
    return torch.minimum(torch.maximum(ax - s, ay - 0.3 * s), torch.maximum(ay - s, ax - 0.3 * s))


# Signed distance (pixels, < 0 inside) of each class's shape at offsets x, y (y points down), half-size s.
TOY_SHAPES = [
    lambda x, y, s: (x * x + y * y).sqrt() - s,                                         # disk
    lambda x, y, s: torch.maximum(x.abs(), y.abs()) - 0.8 * s,                          # square
    lambda x, y, s: ((x * x + y * y).sqrt() - 0.72 * s).abs() - 0.28 * s,               # ring
    lambda x, y, s: _plus(x.abs(), y.abs(), s),                                         # plus
    lambda x, y, s: torch.maximum(x.abs() - 1.1 * s, y.abs() - 0.38 * s),               # horizontal bar
    lambda x, y, s: torch.maximum(y.abs() - 1.1 * s, x.abs() - 0.38 * s),               # vertical bar
    lambda x, y, s: torch.maximum(y - 0.7 * s, (2 * x.abs() - y - 1.05 * s) / 5 ** 0.5),  # triangle, apex up
    lambda x, y, s: (x.abs() + y.abs() - 1.15 * s) / 2 ** 0.5,                          # diamond
    lambda x, y, s: _plus((x + y).abs() / 2 ** 0.5, (x - y).abs() / 2 ** 0.5, s),       # X-cross
    lambda x, y, s: (torch.maximum(x.abs(), y.abs()) - 0.68 * s).abs() - 0.25 * s,      # frame
]


def make_toy(n, seed=0, res=16, random_hue=False):
    """x [n, 3, res, res] in [-1, 1], y [n], every class once per block of 10; random_hue: only shape names a class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n // 10 + 1, 10, generator=g).argsort(1).flatten()[:n]

    def u(*shape):
        return torch.rand(*shape, generator=g)

    # geometry scales with res; texture and edge width stay in pixels
    f = res / 16
    cx = (res - 1) / 2 + (u(n) * 2 - 1) * 2 * f         # up to +-2 px of jitter at 16 px
    cy = (res - 1) / 2 + (u(n) * 2 - 1) * 2 * f
    s = (3.6 + 1.4 * u(n)) * f                          # half-size 3.6..5 px at 16 px
    grid = torch.arange(res, dtype=torch.float32)
    xx = grid[None, None, :] - cx[:, None, None]
    yy = grid[None, :, None] - cy[:, None, None]
    d = torch.empty(n, res, res)
    for c in range(10):
        i = (y == c).nonzero().squeeze(1)
        d[i] = TOY_SHAPES[c](xx[i], yy[i], s[i, None, None])
    mask = torch.sigmoid(-d / 0.35)                     # a soft, antialiased edge
    hue = (torch.tensor(TOY_HUES, dtype=torch.float32)[y] + (u(n) * 2 - 1) * 7) / 360 % 1
    if random_hue:
        hue = u(n)
    sat = 0.75 + 0.25 * u(n)
    val = 0.8 + 0.2 * u(n)
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue[:, None]) % 6       # HSV -> RGB [n, 3]
    rgb = val[:, None] - (val * sat)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    # fine texture: 1-px stripes (horizontal, vertical) or a checker, random phase, alternate lines darker
    ix, iy = torch.arange(res)[None, :], torch.arange(res)[:, None]
    patterns = torch.stack([(p + t) % 2 for t in (iy + 0 * ix, ix + 0 * iy, ix + iy) for p in (0, 1)])
    texture = 1 - 0.3 * patterns.float()[(u(n) * 6).long()]
    bg = 0.06 + 0.06 * u(n, 1, 1) + 0.03 * torch.randn(n, res, res, generator=g)
    x = (bg - bg * mask)[:, None] + rgb[:, :, None, None] * (mask * texture)[:, None]
    return x.clamp_(0, 1).mul_(2).sub_(1), y

# --- Data checks: a data directory is checked before anything runs, and a problem is one line ---------------


def is_small_data(path):
    """Pixel data of at most 64 px ("vae": null)? An unreadable meta.json: no, and check_data_dir's line follows."""
    try:
        with open(os.path.join(path, 'meta.json')) as f:
            meta = json.load(f)
        return meta.get('vae', '') is None and (meta.get('shape') or meta['latent_shape'])[-1] <= 64
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return False


def check_data_dir(path):
    """meta.json, its files and labels -> meta with 'store' and a sample's 'shape'; a problem: one line, what to do."""
    redo = f"re-run prepare_latents.py for '{path}'"
    if not os.path.isdir(path):
        raise SystemExit(f"error: no dataset directory '{path}'. Make one with `python prepare_latents.py --images "
                         f"DIR --out {path}` (README: Train on your own data), or try the toy set with --data toy.")
    try:
        with open(os.path.join(path, 'meta.json')) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: '{path}' has no meta.json (unfinished): {redo} with the same arguments.")
    except ValueError as e:
        raise SystemExit(f"error: '{path}/meta.json' is not valid JSON ({e}): {redo}.")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SystemExit(f"error: '{path}/meta.json' lacks {', '.join(map(repr, missing))}: {redo} (pixel data: "
                         f"\"vae\": null, \"scaling_factor\": 1).")
    if meta['format_version'] == 1 and meta['vae'] is None:
        raise SystemExit(f"error: '{path}' holds pixels as float16 (format 1, 4x their uint8 size): prepare it again, "
                         f"`prepare_latents.py --images SRC --vae none --resolution R --out {path} --overwrite`.")
    if meta['format_version'] not in (1, DATA_FORMAT_VERSION):
        raise SystemExit(f"error: '{path}' has format_version {meta['format_version']!r} (unknown): {redo}.")
    meta = dict({'store': 'latents'}, **meta)          # version 1: latents
    store = meta['store']
    latents = store == 'latents'
    shape = meta.get('latent_shape', meta.get('shape'))
    sf = meta['scaling_factor']

    def positive_int(v):
        return type(v) is int and v > 0

    square = isinstance(shape, list) and len(shape) == 3 and all(map(positive_int, shape))
    square = square and shape[1] == shape[2]
    checks = [
        ('N', positive_int(meta['N']), 'a positive integer'),
        ('num_classes', positive_int(meta['num_classes']), 'a positive integer'),
        ('store', store in STORES, ' or '.join(STORES)),
        ('latent_shape' if latents else 'shape',
         square and (shape[0] % 2 == 0 if latents else shape[0] in (1, 3)),
         '[2C, r, r] (mean | std of C channels)' if latents else '[C, r, r], C = 1 or 3'),
        ('scaling_factor', type(sf) in (int, float) and sf > 0, 'a positive number'),
        ('vae', isinstance(meta['vae'], str) if latents else meta['vae'] is None,
         'a VAE name (latents) or null (pixels)'),
        ('images', meta['images'] in ((True,) if store == 'jpeg' else (True, False)),
         'true or false (true for store jpeg)'),
    ]
    for key, ok, want in checks:
        if not ok:
            raise SystemExit(f"error: '{path}/meta.json' has {key} = {meta.get(key)!r}, expected {want}: {redo}.")
    promised = ['labels.npy', STORES[store]] + (['images.bin', 'images_index.npy'] if meta['images'] else [])
    for name in promised:
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"error: '{path}' has no {name}, which its meta.json promises: {redo}.")
    name = STORES[store] if store != 'jpeg' else 'images_index.npy'
    labels = np.load(os.path.join(path, 'labels.npy'), mmap_mode='r')
    arr = np.load(os.path.join(path, name), mmap_mode='r')
    want = (meta['N'], *shape) if store != 'jpeg' else (meta['N'] + 1,)
    if arr.shape != want or labels.shape != (meta['N'],) or (store == 'uint8') != (arr.dtype == np.uint8):
        raise SystemExit(f"error: '{path}' does not match its meta.json ({name} {tuple(arr.shape)} {arr.dtype}, labels "
                         f"{tuple(labels.shape)}, N={meta['N']}, shape={shape}): {redo}.")
    if labels.min() < 0 or labels.max() >= meta['num_classes']:
        raise SystemExit(f"error: '{path}' has labels outside [0, num_classes = {meta['num_classes']}) (from "
                         f"{labels.min()} to {labels.max()}): {redo}, or fix num_classes in its meta.json.")
    return dict(meta, shape=[shape[0] // 2, *shape[1:]] if latents else shape)

# --- The command line ---------------------------------------------------------------------------------------


def comma_ints(text):
    return [int(v) for v in text.split(',')]


def help_default(key, fmt='g'):
    """'Table 6's value; small data: its value' of DEFAULTS[key], for a help text."""
    paper, small = DEFAULTS[key]
    return f'{paper:{fmt}}; small data {small:{fmt}}'


def get_args(argv=None):
    p = argparse.ArgumentParser(description='CAT: Cross-scale Aligned Transformer GAN (arXiv 2605.26449)')
    # model and data
    p.add_argument('--model', help='G size: B, M, H (Table 6; default B), S (small data), T (tests)')
    p.add_argument('--model-d', help='D size (default: B for B/M/H, as the paper); M = D-M/2 of Table 5')
    p.add_argument('--data', default=DEFAULT_DATA, help="prepared data directory (prepare_latents.py), or 'toy'")
    p.add_argument('--scales', type=comma_ints, help='resolutions of x_0..x_K (R/8,R/4,R/2,R; A.3: 16,32,64,256)')
    p.add_argument('--patch', type=int, help="G's patch size (2; App. A.3 at 256 px: 16)")
    p.add_argument('--d-patch', type=comma_ints, help="D's patch size per scale, e.g. 8,8,8,16 (default: G's)")
    p.add_argument('--no-mask', action='store_true', help='attention across scales (Fig. 9: with --lambda-cons 0)')
    p.add_argument('--mbstd', type=int, default=0, help="D's minibatch std over groups of N samples; 0: off (GAT)")
    # the run
    p.add_argument('--out', help='run directory (default: runs/NNN-MODEL)')
    p.add_argument('--resume', nargs='?', const='auto', help='checkpoint file or run directory (default: --out)')
    p.add_argument('--steps', type=int,
                   help=f'total iterations ({help_default("steps", ",")}; the toy set {TOY_STEPS})')
    p.add_argument('--batch-size', type=int, help=f'global batch ({help_default("batch_size")})')
    p.add_argument('--micro-batch', type=int, help='per-process micro-batch; gradients accumulate above it')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--precision', choices=['bf16', 'fp32'], help='autocast dtype (bf16; no CUDA: fp32)')
    p.add_argument('--workers', type=int, help='DataLoader workers per process (8; no CUDA: 0)')
    # objectives and optimization
    p.add_argument('--lr', type=float, help=f'AdamW lr of G and D ({help_default("lr")})')
    p.add_argument('--ema-decay', type=float, help=f'EMA of G ({help_default("ema_decay")})')
    p.add_argument('--lr-final', type=float, default=1.0, help='cosine lr decay to lr x this over the run; 1: none')
    p.add_argument('--clip', type=float, default=1.0, help='gradient clipping norm')
    p.add_argument('--lambda-cons', type=float, default=0.1, help='L_cons weight (Eq. 3); 0: plain scale-wise loss')
    p.add_argument('--cons-detach', action='store_true', help='stop-gradient on the anchor h_K of Eq. 2')
    p.add_argument('--gamma', type=float, help=f'R1 and R2 weight, gamma/2 each ({help_default("gamma")})')
    p.add_argument('--gp-sigma', type=float, default=0.01, help='perturbation scale of the approximated R1/R2')
    p.add_argument('--gp-precision', choices=['bf16', 'fp32'], default='bf16',
                   help='bf16: perturbed quarter in the main autocast pass (App. A.2 cost); fp32: its own fp32 pass')
    p.add_argument('--aug', action=argparse.BooleanOptionalAction, help='DiffAugment (on; small data off)')
    p.add_argument('--lambda-repa', type=float, help=f'REPA weight ({help_default("lambda_repa")}); 0 skips DINOv2')
    p.add_argument('--lambda-va', type=float, default=0.0, help='vision-aided loss weight (App. A.3), pixels; 0: off')
    p.add_argument('--va-model', default=VA_NAME, help='timm name of the frozen ConvNeXt-V2 of the vision-aided loss')
    # logging, evaluation, checkpoints
    p.add_argument('--vae', help='VAE for sample grids (default: the one named in the dataset meta)')
    p.add_argument('--log-every', type=int)
    p.add_argument('--eval-every', type=int, help="EMA sample grid and Eq. 1 (+ fid.py's measures)")
    p.add_argument('--eval-n', type=int, default=1000, help='samples per evaluation')
    p.add_argument('--ckpt-every', type=int, help='periodic checkpoint interval (kept: --keep newest)')
    p.add_argument('--latest-every', type=int, help='latest.pt refresh interval')
    p.add_argument('--keep', type=int, default=3, help='periodic checkpoints kept (besides latest.pt and milestones)')
    p.add_argument('--milestone-every', type=int, default=50_000, help='checkpoints at multiples are never deleted')
    p.add_argument('--toy-n', type=int, default=20000, help='toy training set size')
    p.add_argument('--toy-res', type=int, default=16, help='toy image resolution')
    # speed
    p.add_argument('--compile', action='store_true', help='torch.compile every G and D block')
    p.add_argument('--grad-ckpt', action='store_true', help='activation checkpointing per block (memory for compute)')
    args = p.parse_args(argv)
    if args.model and args.model not in G_CONFIGS or args.model_d and args.model_d not in D_CONFIGS:
        p.error(f"unknown --model {args.model} / --model-d {args.model_d}: G: {list(G_CONFIGS)}, D: {list(D_CONFIGS)}")
    if args.data == 'toy' and args.lambda_repa:
        p.error('--lambda-repa needs ImageNet images: the toy set has no DINOv2 targets; use --lambda-repa 0')
    small = args.data == 'toy' or is_small_data(args.data)
    fill_defaults(args, small, torch.cuda.is_available())
    return args


def fill_defaults(args, small, cuda):
    """Each option left out takes its value for the data (DEFAULTS), the machine and the run's length (cadence)."""
    toy = args.data == 'toy'
    args.model = args.model or ('S' if small else 'B')
    if toy and args.steps is None:
        args.steps = TOY_STEPS
    for key, (paper, small_data) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, small_data if small else paper)
    # no CUDA: fp32 (bf16 autocast is slow on CPUs) and no data workers
    if args.precision is None:
        args.precision = 'bf16' if cuda else 'fp32'
    if args.workers is None:
        args.workers = 8 if cuda else 0
    # cadence: the toy's; else by the run's length (10 evaluations, 5 checkpoints, at most every 5000 / 10000)
    def share(div, most):
        return min(most, max(1, args.steps // div))

    if toy:
        cadence = dict(log_every=50, eval_every=TOY_STEPS // 4, ckpt_every=1000, latest_every=500)
    else:
        cadence = dict(log_every=share(100, 100), eval_every=share(10, 5000), ckpt_every=share(5, 10_000),
                       latest_every=share(20, 1000))
    for key, value in cadence.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def main(argv=None):
    train(get_args(argv))


if __name__ == '__main__':
    main()
