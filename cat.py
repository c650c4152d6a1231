"""CAT: Cross-scale Aligned Transformer GAN (arXiv 2605.26449), one file.

A one-step class-conditional transformer GAN on SD-VAE latents: GAT's generator emits accumulated outputs h_0..h_3; one
scale-wise D judges x_k = r_k(h_k) (block-diagonal attention); a consistency loss (Eq. 2) keeps h_0..h_2 on h_3's path.

    python cat.py --data toy                                  # the embedded default: CPU, minutes
    python cat.py --model H --summary                         # params / GFLOPs of Table 6, GPU memory; no GPU
    torchrun --nproc_per_node=8 cat.py --model H              # CAT-H/2 on ImageNet latents (prepare_latents.py)
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 cat.py --model H
    torchrun --nproc_per_node=8 cat.py --model H --resume runs/000-H   # continue a run

Sections in the paper's order: configs (Table 6); blocks (A.1); generator (Sec. 3.1, Fig. 11); scale-wise D (Fig. 3);
augmentation; objectives (Sec. 3.2, Eq. 2-3); metrics (Eq. 1); data (Sec. 4); step (App. A.2); eval; loop; cost."""
import argparse, collections, contextlib, copy, glob, io, json, math, os, pickle, re, signal, time, warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

# ==== Notation and configs ==== Table 6. K+1 = 4 stages k = 0..3, coarse to fine.
K = 3                       # Table 6: stages k = 0..K; any other hierarchy: --scales (K = number of scales - 1)
def table6_scales(res):
    """Resolutions of x_0..x_K in Table 6: R/8, R/4, R/2, R (4, 8, 16, 32 for ImageNet latents)."""
    return [res >> (K - k) for k in range(K + 1)]
def w_cons(K):
    """w_k of Eq. 2: (1/3, 1/2, 1) for K = 3 (the paper); other K: 1/(K-k) continues the pattern (our extrapolation)."""
    return [1 / (K - k) for k in range(K)]
DEFAULT_DATA, DEFAULT_VAE = 'data/imagenet256', 'stabilityai/sd-vae-ft-ema'      # data: prepare_latents.py's default
DINO_NAME = 'vit_base_patch14_dinov2.lvd142m'
VA_NAME = 'convnextv2_base.fcmae_ft_in22k_in1k'     # App. A.3's vision-aided loss: pMF's ConvNeXt-V2-B (README)
Z_DIM = 64                  # z ~ N(0, I) and the class embedding of G's mapping network (App. A.1)
TOY_STEPS = 2000            # the embedded default: about 8 minutes on 2 CPU cores (docs/small-data.md)
SMALL_STEPS = 4000          # other small data (pixels up to 64 px): about 17 minutes at 16 px
NetConfig = collections.namedtuple('NetConfig', 'depth width heads cmap', defaults=[2048])    # cmap: D's head (GAT)
# G: output layers are uniformly spaced, depth/4 * (1, 2, 3, 4) (Table 6: 3,6,9,12 / 6,12,18,24 / 8,16,24,32).
G_CONFIGS = {'T': NetConfig(4, 32, 2), 'S': NetConfig(4, 64, 2),     # T: tests only; S: the toy run and CPU experiments
             'B': NetConfig(12, 768, 12), 'M': NetConfig(24, 768, 12), 'H': NetConfig(32, 1280, 16)}
D_CONFIGS = {'T': NetConfig(2, 32, 2, 64), 'S': NetConfig(4, 64, 2, 128),
             'B': NetConfig(12, 768, 12), 'M': NetConfig(24, 768, 12)}
PAPER_STEPS = {'B': 50_000, 'M': 100_000, 'H': 150_000}      # 20 / 40 / 60 epochs at batch 512 (Sec. 4)
D_FOR_G = {'T': 'T', 'S': 'S', 'B': 'B', 'M': 'B', 'H': 'B'}   # the paper: one Base D for every G size

# ==== Shared building blocks ==== App. A.1, and the precision helpers of autocast and TF32.
def sincos_2d(dim, n):
    """Fixed 2D sin-cos embedding [n*n, dim] of an n x n grid, rows first (MAE, DiT, GAT: columns; a permutation)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
    return torch.cat([one_d(dim // 2, ys), one_d(dim // 2, xs)], dim=1).float()
def rope_2d(head_dim, n, n_cls=0, theta=10000.0):
    """Axial 2D RoPE (cos, sin) [n_cls + n*n, head_dim], angle 0 for [cls]; pairs (i, i + d/2): rows, then columns."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
    ang = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)      # [n*n, head_dim/2]
    ang = torch.cat([torch.zeros(n_cls, head_dim // 2, dtype=ang.dtype), ang]).repeat(1, 2)
    return ang.cos().float(), ang.sin().float()
def rms_norm(x, norm):
    """nn.RMSNorm with its weight in x's dtype, so that the fused kernel also runs on bf16 activations."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)
def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)
def autocast(precision, device):
    """bf16 autocast or ('fp32') autocast off, also inside an outer autocast region; a no-op on meta (--summary)."""
    return (contextlib.nullcontext() if device.type == 'meta' else
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'))
@contextlib.contextmanager
def full_fp32(enabled=True):
    """Inside: fp32 matmuls and convolutions in full precision (TF32 off on CUDA); the previous flags are restored."""
    old = [(f, f.allow_tf32) for f in (torch.backends.cuda.matmul, torch.backends.cudnn)]
    for f, _ in old if enabled else ():
        f.allow_tf32 = False
    try:
        yield
    finally:
        for f, o in old:
            f.allow_tf32 = o

class EqualLinear(nn.Module):
    """Equalized lr, GAT's form: weight stored / lr_mul, used x lr_mul: Adam steps ~lr * lr_mul whatever the fan-in."""
    def __init__(self, n_in, n_out, lr_mul=0.01):
        super().__init__()
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_out, n_in), gain=1 / lr_mul))
        self.bias, self.lr_mul = nn.Parameter(torch.zeros(n_out)), lr_mul
    def forward(self, x):
        return F.linear(x, self.weight * self.lr_mul, self.bias * self.lr_mul)
def init_linears(module):
    for m in module.modules():          # xavier-uniform weights, zero biases (as DiT / GAT)
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
def normalize_2nd_moment(x, eps=1e-8):
    return x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()

class Attention(nn.Module):
    """qkv bias, qk-norm, 2D RoPE; segments: None full, [(start, end)] block-diagonal (a call each), [L, L] a mask."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)
    def forward(self, x, rope, segments=None):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(rms_norm(q, self.q_norm), *rope), apply_rope(rms_norm(k, self.k_norm), *rope)
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
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)
def patchify(x, p):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
def unpatchify(t, p, C):
    B, n = t.shape[0], math.isqrt(t.shape[1])
    return t.reshape(B, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, n * p, n * p)
def modulate(x, shift, scale):
    return x * (1 + scale) + shift

# ==== Generator ==== GAT's, Table 6, App. A.1: sin-cos inputs, AdaLN on w = mapping(z, c), output skip accumulation.
class GBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False), Attention(width, heads)
        self.norm2, self.mlp = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False), SwiGLU(width)
        self.ada = nn.Linear(width, 6 * width)      # w -> shift, scale, gate for attention and MLP
    def forward(self, x, w, rope):
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(w)).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), s1, c1), rope)
        return x + g2 * self.mlp(modulate(self.norm2(x), s2, c2))

class OutputHead(nn.Module):
    def __init__(self, width, patch, channels):
        super().__init__()
        self.norm, self.ada = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False), nn.Linear(width, 2 * width)
        self.linear, self.patch, self.channels = nn.Linear(width, patch * patch * channels), patch, channels
    def forward(self, x, w):
        shift, scale = self.ada(F.silu(w)).unsqueeze(1).chunk(2, dim=-1)
        return unpatchify(self.linear(modulate(self.norm(x), shift, scale)), self.patch, self.channels)

class Generator(nn.Module):
    def __init__(self, depth, width, heads, channels=4, res=32, patch=2, num_classes=1000, z_dim=Z_DIM,
                 w_avg_beta=0.995, stages=K + 1):
        super().__init__()
        self.depth, self.width, self.channels, self.res, self.patch = depth, width, channels, res, patch
        self.num_classes, self.z_dim, self.w_avg_beta, self.stages = num_classes, z_dim, w_avg_beta, stages
        self.grad_ckpt = False      # --grad-ckpt: recompute block activations in the backward pass
        self.out_layers = [depth * (k + 1) // stages for k in range(stages)]     # uniformly spaced, 1-based
        n = res // patch
        self.register_buffer('pos', sincos_2d(width, n)[None], persistent=False)   # fixed input tokens
        self.register_buffer('rope_cos', rope_2d(width // heads, n)[0], persistent=False)
        self.register_buffer('rope_sin', rope_2d(width // heads, n)[1], persistent=False)
        self.class_embed = nn.Embedding(num_classes, z_dim)     # mapping: [norm(z), norm(embed(c))] -> equalized-lr MLP
        self.mapping = nn.Sequential(EqualLinear(2 * z_dim, width), nn.SiLU(), EqualLinear(width, width))
        self.register_buffer('w_avg', torch.zeros(num_classes, width))   # per-class running mean, for truncation
        self.blocks = nn.ModuleList([GBlock(width, heads) for _ in range(depth)])
        self.heads = nn.ModuleList([OutputHead(width, patch, channels) for _ in range(stages)])
        self.initialize_weights()
    def initialize_weights(self):
        init_linears(self)
        for m in list(self.blocks) + list(self.heads):
            nn.init.xavier_uniform_(m.ada.weight, gain=0.1)    # small modulation at init (as GAT)
        nn.init.normal_(self.class_embed.weight, std=0.02)     # as GAT: small, so Adam turns its direction quickly
    def style(self, z, c):
        return self.mapping(torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(self.class_embed(c))], dim=1))
    def truncate(self, w, c, psi):
        """StyleGAN convention: psi = 1 is no truncation, psi = 0 gives w_avg[c]."""
        return self.w_avg[c].lerp(w, psi) if psi != 1 else w
    def synthesis(self, w):
        """Returns [h_0, ..., h_K]: accumulated outputs h_k = o_0 + ... + o_k, each [B, C, res, res]."""
        x = self.pos.expand(w.shape[0], -1, -1)        # fp32: the residual stream stays fp32 under autocast
        rope, hs = (self.rope_cos, self.rope_sin), []
        for i, block in enumerate(self.blocks):
            x = (checkpoint(block, x, w, rope, use_reentrant=False) if self.grad_ckpt and torch.is_grad_enabled()
                 else block(x, w, rope))
            if i + 1 == self.out_layers[len(hs)]:       # output skip accumulation: h_k = h_{k-1} + o_k
                hs.append((hs[-1] if hs else 0) + self.heads[len(hs)](x, w))
        return hs
    def forward(self, z, c, psi=1.0):
        return self.synthesis(self.truncate(self.style(z, c), c, psi))
    @torch.no_grad()
    def update_w_avg(self, w, c):
        """w_avg[c] <- lerp(w_avg[c], mean of this step's w of class c, 1 - beta), classes of the global batch."""
        sums = torch.zeros_like(self.w_avg).index_add_(0, c, w.float())         # counts: not bincount (syncs on CUDA)
        counts = torch.zeros(self.num_classes, device=c.device).index_add_(0, c, torch.ones_like(c, dtype=torch.float))
        if dist.is_initialized():
            packed = torch.cat([sums, counts[:, None]], dim=1)
            dist.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        mean = sums / counts.clamp(min=1)[:, None]
        self.w_avg.copy_(torch.where(counts[:, None] > 0, self.w_avg.lerp(mean, 1 - self.w_avg_beta), self.w_avg))

# ==== Scale-wise discriminator ==== Sec. 3.1, Fig. 3, App. A.1: one transformer, block-diagonal so d_k sees x_k alone.
def r_k(h, size):
    """Resize to scale k's resolution `size` (a divisor of h's) by area (average-pool) downsampling."""
    return F.avg_pool2d(h, h.shape[-1] // size) if size < h.shape[-1] else h
def multiscale(hs, scales):
    """[h_0..h_K] -> [x_0..x_K] at resolutions `scales`; a single tensor (a real image) is used for every scale."""
    return [r_k(hs if torch.is_tensor(hs) else hs[k], s) for k, s in enumerate(scales)]

class DBlock(nn.Module):
    def __init__(self, width, heads, layerscale=0.1):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.RMSNorm(width, eps=1e-6), SwiGLU(width)
        self.ls1, self.ls2 = (nn.Parameter(torch.full((width,), layerscale)) for _ in range(2))
    def forward(self, x, rope, segments):
        x = x + self.ls1 * self.attn(self.norm1(x), rope, segments)
        return x + self.ls2 * self.mlp(self.norm2(x))

class Discriminator(nn.Module):
    """Per scale [cls_k, tokens of x_k]; block-diagonal attention ('split' | 'mask'; mask=False: Fig. 9); patch: A.3."""
    def __init__(self, depth, width, heads, channels=4, res=32, patch=2, num_classes=1000, cmap_dim=2048,
                 repa_dim=768, mask=True, attn_impl='split', scales=None, va_dim=0):
        super().__init__()
        self.scales = scales or table6_scales(res)
        self.patches = patch if isinstance(patch, list) else [patch] * len(self.scales)
        self.width, self.channels, self.res = width, channels, res
        self.mask, self.attn_impl, self.grad_ckpt = mask, attn_impl, False
        self.grids = [s // p for s, p in zip(self.scales, self.patches)]            # 2, 4, 8, 16 tokens per side
        bounds = np.cumsum([0] + [1 + n * n for n in self.grids]).tolist()
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        self.sizes = list(dict.fromkeys(self.patches))          # distinct patch sizes: one embedding each, shared
        self.patch_embed = nn.Linear(self.sizes[0] ** 2 * channels, width)          # by the scales of that size
        for p in self.sizes[1:]:
            self.add_module(f'patch_embed_{p}', nn.Linear(p * p * channels, width))
        self.register_buffer('pos', torch.cat([sincos_2d(width, n) for n in self.grids]), persistent=False)
        self.scale_embed, self.cls = (nn.Parameter(torch.zeros(len(self.scales), width)) for _ in range(2))
        ropes = [rope_2d(width // heads, n, n_cls=1) for n in self.grids]         # RoPE on each scale's own grid
        self.register_buffer('rope_cos', torch.cat([r[0] for r in ropes]), persistent=False)
        self.register_buffer('rope_sin', torch.cat([r[1] for r in ropes]), persistent=False)
        self.blocks = nn.ModuleList([DBlock(width, heads) for _ in range(depth)])
        self.norm = nn.RMSNorm(width, eps=1e-6)    # projection head (GAT's): d_k = <Linear(norm(cls_k)), map(e(c))>
        self.head, self.class_embed = nn.Linear(width, cmap_dim), nn.Embedding(num_classes, cmap_dim)
        self.class_map = nn.Sequential(EqualLinear(cmap_dim, cmap_dim), nn.SiLU(), EqualLinear(cmap_dim, cmap_dim))
        self.proj = nn.Sequential(nn.Linear(width, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                                  nn.Linear(2048, repa_dim)) if repa_dim else None      # REPA: tokens -> DINOv2's
        self.va = VisionAidedHead(va_dim, num_classes) if va_dim else None      # App. A.3 (--lambda-va)
        self.initialize_weights()
    def initialize_weights(self):
        init_linears(self)
        for p in (self.scale_embed, self.cls, self.class_embed.weight) + ((self.va.embed.weight,) if self.va else ()):
            nn.init.normal_(p, std=0.02)
    def block_mask(self):
        return torch.block_diag(*[torch.ones(e - s, e - s, dtype=torch.bool, device=self.cls.device)
                                  for s, e in self.segments])
    def forward(self, xs, c, return_tokens=False):
        """xs = [x_0..x_K] -> d [B, K+1]; with return_tokens also the finest scale's tokens (cls_K first) for REPA."""
        B, tk = xs[0].shape[0], {}
        for i, p in enumerate(self.sizes):          # one embedding call per patch size, on all scales of that size
            embed = getattr(self, f'patch_embed_{p}' if i else 'patch_embed')
            ks = [k for k, q in enumerate(self.patches) if q == p]
            t = embed(torch.cat([patchify(xs[k], p) for k in ks], 1))
            tk.update(zip(ks, t.split([self.grids[k] ** 2 for k in ks], dim=1)))
        t = torch.cat([tk[k] for k in range(len(xs))], dim=1) + self.pos.to(xs[0].dtype)
        x = torch.cat([u for k, tk in enumerate(t.split([n * n for n in self.grids], dim=1))
                       for u in (self.cls[k].expand(B, 1, -1), tk)], dim=1)        # segments [cls_k, tokens of x_k]
        x = x + torch.cat([self.scale_embed[k].expand(1 + n * n, -1) for k, n in enumerate(self.grids)])
        segments = (self.segments if self.attn_impl == 'split' else self.block_mask()) if self.mask else None
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = (checkpoint(block, x, rope, segments, use_reentrant=False) if self.grad_ckpt and torch.is_grad_enabled()
                 else block(x, rope, segments))
        with autocast('fp32', x.device):        # the logit in fp32: R1/R2 take differences of it at sigma = 0.01
            cls = self.norm(x[:, [s for s, _ in self.segments]].to(self.head.weight.dtype))     # [B, K+1, width]
            e = self.class_map(self.class_embed(c))               # [B, cmap_dim]; raw embedding, as GAT
            d = (self.head(cls) * e[:, None]).sum(-1)
        return (d, x[:, self.segments[-1][0]:]) if return_tokens else d

# ==== Augmentation ==== GAT's DiffAugment (losses/diffaug.py) on every D input, p = 1; at full res, then r_k (shared).
def draw_aug(n, res, g, device):
    """Per-sample parameters from g as GAT's, but flip p = 0.4, not 0.5: at 0.5 D can't tell mirror images apart."""
    u = torch.rand(n, 5, generator=g, device=device)
    t, s = int(res * 0.125 + 0.5), int(res * 0.5 + 0.5)
    return dict(color=u[:, 0] < 0.5, bright=u[:, 1] - 0.5, sat=u[:, 2] * 2, contrast=u[:, 3] + 0.5,
                flip=u[:, 4] < 0.4, shift=torch.randint(-t, t + 1, (n, 2), generator=g, device=device),
                cut=torch.randint(0, res + 1 - s % 2, (n, 2), generator=g, device=device) - s // 2)   # top-left corner
def augment(x, a, color=True, cutout=True, scale=1):
    """x [B or n*B, C, H, W]; colour by each image's own means (GAT: h_K's); scale: px per data px (224 / 32 = 7)."""
    rep = x.shape[0] // a['flip'].shape[0]
    a = {k: v.repeat(rep, *[1] * (v.dim() - 1)) for k, v in a.items()}
    B, C, H, W = x.shape
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    v = lambda t: t.to(x.dtype).view(B, 1, 1, 1)
    if color:
        m_pix, m_img = x.mean(dim=1, keepdim=True), x.mean(dim=(1, 2, 3), keepdim=True)
        y = x + v(a['bright'])
        y = (y - m_pix) * v(a['sat']) + m_pix
        y = (y - m_img) * v(a['contrast']) + m_img
        x = torch.where(a['color'].view(B, 1, 1, 1), y, x)
    shift = (a['shift'] * scale).round().long()                 # per-sample integer translation with zero fill
    iy, ix = ar_h[None] - shift[:, :1], ar_w[None] - shift[:, 1:]                 # source rows / columns [B, H]
    vy, vx = (iy >= 0) & (iy < H), (ix >= 0) & (ix < W)
    x = x.gather(2, iy.clamp(0, H - 1)[:, None, :, None].expand(B, C, H, W))
    x = x.gather(3, ix.clamp(0, W - 1)[:, None, None, :].expand(B, C, H, W))
    x = x * (vy[:, None, :, None] & vx[:, None, None, :]).to(x.dtype)
    if cutout:
        s = int(H * 0.5 + 0.5)
        dy, dx = ar_h.view(1, H, 1) - a['cut'][:, 0].view(B, 1, 1), ar_w.view(1, 1, W) - a['cut'][:, 1].view(B, 1, 1)
        hole = (dy >= 0) & (dy < s) & (dx >= 0) & (dx < s)
        x = x * (~hole)[:, None].to(x.dtype)
    return torch.where(a['flip'].view(B, 1, 1, 1), x.flip(-1), x)

# ==== Objectives ==== Sec. 3.2, Table 6: RpGAN, approximated R1/R2, consistency L_cons (Eq. 2), D-side REPA.
def rpgan_d_loss(d_real, d_fake):
    """L_D = mean_k softplus(-(d_k(real) - d_k(fake))), pairs (real i, fake i)."""
    return F.softplus(d_fake - d_real).mean()
def rpgan_g_loss(d_fake, d_real):
    """L_adv(G) = mean_k softplus(-(d_k(fake) - d_k(real))); d_real carries no gradient."""
    return F.softplus(d_real.detach() - d_fake).mean()
def approx_gp(d, d_perturbed, sigma):
    """Approximated R1/R2 (Seaweed-APT): mean ((d(x) - d(x + sigma eps)) / sigma)^2, ~ ||grad_x d||^2 as sigma -> 0."""
    return ((d - d_perturbed) / sigma).square().mean()
def approx_gp_pass(D, xs, eps, c, sigma, precision):
    """approx_gp per sample over scales, one D pass on [x; x + sigma eps]; fp32: a ~1e-3 gap drowns in bf16 (README)."""
    n = xs[0].shape[0]
    with autocast(precision, xs[0].device), full_fp32(precision == 'fp32'):
        d = D([torch.cat([x, x + sigma * e]).float() for x, e in zip(xs, eps)], torch.cat([c, c]))
    return ((d[:n] - d[n:]) / sigma).square().mean(1)
def consistency_loss(hs, detach_anchor=False):
    """Eq. 2: L_cons = 1/K sum_{k<K} w_k * mean((h_k - h_K)^2). No stop-gradient on h_K by default (as Eq. 2)."""
    anchor, K = hs[-1].detach() if detach_anchor else hs[-1], len(hs) - 1
    return sum(wk * (h - anchor).float().square().mean() for wk, h in zip(w_cons(K), hs[:-1])) / K
def repa_loss(pred_tokens, dino_cls, dino_patch):
    """(1 - cos) between projected D tokens and frozen DINOv2 features: the cls term plus the mean patch term."""
    cls = 1 - F.cosine_similarity(pred_tokens[:, 0].float(), dino_cls.float(), dim=-1)
    patch = 1 - F.cosine_similarity(pred_tokens[:, 1:].float(), dino_patch.float(), dim=-1).mean(1)
    return (cls + patch).mean()
def load_frozen(name, device, pretrained=True, what='DINOv2', off='--lambda-repa 0', **kw):
    """A frozen timm backbone in eval mode, ImageNet normalization: DINOv2-B/14 (REPA) or ConvNeXt-V2 (App. A.3)."""
    import timm
    try:
        m = timm.create_model(name, pretrained=pretrained, num_classes=0, **kw)
    except Exception as e:
        raise SystemExit(f"error: cannot load {what} '{name}' ({type(e).__name__}): fetch it once online or use {off}.")
    m.register_buffer('pixel_mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))     # ImageNet normalization
    m.register_buffer('pixel_std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    return m.to(device).eval().requires_grad_(False)
def dino_features(dino, img, aug=None, res=32, grid=16):
    """DINOv2 tokens [B, 1 + grid^2, 768] of 224-px crops, the real's flip, shift x 224/res (GAT: x res/224, a bug)."""
    x = F.interpolate(img.float() / 255, size=(224, 224), mode='bicubic', align_corners=False)
    x = (x - dino.pixel_mean) / dino.pixel_std
    if aug is not None:
        x = augment(x, aug, color=False, cutout=False, scale=224 / res)
    f = dino.forward_features(x)
    if grid != 16:
        p = f[:, 1:].transpose(1, 2).unflatten(2, (16, 16))
        p = F.interpolate(p, size=(grid, grid), mode='area' if grid < 16 else 'bilinear', align_corners=None)
        f = torch.cat([f[:, :1], p.flatten(2).transpose(1, 2)], dim=1)
    return f
def va_features(net, x):
    """App. A.3: images in [-1, 1] -> the frozen ConvNeXt-V2's pooled, normalized features [B, F] (pMF's), 224 px."""
    x = F.interpolate((x.float().expand(-1, 3, -1, -1) + 1) / 2, size=(224, 224), mode='bicubic', antialias=True)
    return net.forward_head(net.forward_features((x - net.pixel_mean) / net.pixel_std), pre_logits=True)

class VisionAidedHead(nn.Module):
    """Part of D: d_va = <MLP(f), e(c)> on the frozen features, in the RpGAN pairing of d_k (README: departures)."""
    def __init__(self, feat_dim, num_classes, dim=512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feat_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.embed = nn.Embedding(num_classes, dim)
    def forward(self, f, c):
        return (self.mlp(f.float()) * self.embed(c)).sum(-1, keepdim=True)

# ==== Cross-scale metrics ==== Eq. 1: how coherently the stages accumulate toward the final output.
def cross_scale_metrics(hs, scales):
    """Eq. 1's delta_k, R_k, A_k (k < K, batch means); ours: delta_h_k of raw h_k, *_floor: Eq. 1 if all h_k = h_K."""
    full, K = scales[-1], len(hs) - 1
    up = lambda x: (F.interpolate(x, size=(full, full), mode='bilinear', align_corners=False)
                    if x.shape[-1] != full else x)
    def eq1(hs):
        xs = [up(r_k(h.float(), s)).flatten(1) for h, s in zip(hs, scales)]
        xK, nK = xs[-1], xs[-1].norm(dim=1)
        return ([((xK - xs[k]).norm(dim=1) / nK).mean().item() for k in range(K)],
                [((xs[k + 1] - xs[k]).norm(dim=1) / nK).mean().item() for k in range(K)],
                [F.cosine_similarity(xs[k + 1] - xs[k], xK - xs[k], dim=1).mean().item() for k in range(K)])
    (delta, R, A), (delta_f, R_f, A_f) = eq1(hs), eq1([hs[-1]] * len(hs))
    hK = hs[-1].float().flatten(1)
    delta_h = [((hK - hs[k].float().flatten(1)).norm(dim=1) / hK.norm(dim=1)).mean().item() for k in range(K)]
    return dict(delta=delta, R=R, A=A, delta_h=delta_h, delta_floor=delta_f, R_floor=R_f, A_floor=A_f)

# ==== Data ==== prepare_latents.py's directories (SD-VAE posteriors, sampled anew at each use, or pixels); the toy set.
def load_vae(name_or_path=DEFAULT_VAE, device='cpu', required=True):
    """Frozen SD-VAE from a hub name or save_pretrained directory; unavailable: SystemExit, or None if not required."""
    from diffusers.models import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:
        if not required:
            return None
        raise SystemExit(f"error: cannot load the VAE '{name_or_path}' ({type(e).__name__}): download it once online "
                         f"(huggingface_hub caches it) or pass a local save_pretrained directory with --vae.")
    return vae.to(device).eval().requires_grad_(False)
DATA_FORMAT_VERSION = 2     # 2: pixels as uint8 or JPEG ('store'); latent directories of version 1 read unchanged
META_KEYS = ('format_version', 'N', 'num_classes', 'scaling_factor', 'vae', 'images')
STORES = {'latents': 'latents.npy', 'uint8': 'pixels.npy', 'jpeg': 'images.bin'}   # where the training data lies
def is_small_data(path):
    """Pixel data of at most 64 px ("vae": null)? Unreadable meta.json: no, and check_data_dir's one line follows."""
    try:
        with open(os.path.join(path, 'meta.json')) as f:
            meta = json.load(f)
        return meta.get('vae', '') is None and (meta.get('shape') or meta['latent_shape'])[-1] <= 64
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return False
def check_data_dir(path):
    """Checks a data directory first (meta.json, files, labels; not geometry) -> meta + 'store', a sample's 'shape'."""
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
    if missing := [k for k in META_KEYS if k not in meta]:
        raise SystemExit(f"error: '{path}/meta.json' lacks {', '.join(map(repr, missing))}: {redo} (pixel data: "
                         f"\"vae\": null, \"scaling_factor\": 1).")
    if meta['format_version'] == 1 and meta['vae'] is None:
        raise SystemExit(f"error: '{path}' holds pixels as float16 (format 1, 4x their uint8 size): prepare it again, "
                         f"`prepare_latents.py --images SRC --vae none --resolution R --out {path} --overwrite`.")
    if meta['format_version'] not in (1, DATA_FORMAT_VERSION):
        raise SystemExit(f"error: '{path}' has format_version {meta['format_version']!r} (unknown): {redo}.")
    meta = dict({'store': 'latents'}, **meta)                    # version 1: latents
    count = lambda v: type(v) is int and v > 0
    store, shape, sf = meta['store'], meta.get('latent_shape', meta.get('shape')), meta['scaling_factor']
    latents = store == 'latents'
    square = isinstance(shape, list) and len(shape) == 3 and all(map(count, shape)) and shape[1] == shape[2]
    for key, ok, want in (('N', count(meta['N']), 'a positive integer'),
                          ('num_classes', count(meta['num_classes']), 'a positive integer'),
                          ('store', store in STORES, ' or '.join(STORES)),
                          ('latent_shape' if latents else 'shape',
                           square and (shape[0] % 2 == 0 if latents else shape[0] in (1, 3)),
                           '[2C, r, r] (mean | std of C channels)' if latents else '[C, r, r], C = 1 or 3'),
                          ('scaling_factor', type(sf) in (int, float) and sf > 0, 'a positive number'),
                          ('vae', isinstance(meta['vae'], str) if latents else meta['vae'] is None,
                           'a VAE name (latents) or null (pixels)'),
                          ('images', meta['images'] in ((True,) if store == 'jpeg' else (True, False)),
                           'true or false (true for store jpeg)')):
        if not ok:
            raise SystemExit(f"error: '{path}/meta.json' has {key} = {meta.get(key)!r}, expected {want}: {redo}.")
    for name in ['labels.npy', STORES[store]] + (['images.bin', 'images_index.npy'] if meta['images'] else []):
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"error: '{path}' has no {name}, which its meta.json promises: {redo}.")
    name = STORES[store] if store != 'jpeg' else 'images_index.npy'
    lab, arr = (np.load(os.path.join(path, f), mmap_mode='r') for f in ('labels.npy', name))
    want = (meta['N'], *shape) if store != 'jpeg' else (meta['N'] + 1,)
    if arr.shape != want or lab.shape != (meta['N'],) or (store == 'uint8') != (arr.dtype == np.uint8):
        raise SystemExit(f"error: '{path}' does not match its meta.json ({name} {tuple(arr.shape)} {arr.dtype}, labels "
                         f"{tuple(lab.shape)}, N={meta['N']}, shape={shape}): {redo}.")
    if lab.min() < 0 or lab.max() >= meta['num_classes']:
        raise SystemExit(f"error: '{path}' has labels outside [0, num_classes = {meta['num_classes']}) (from "
                         f"{lab.min()} to {lab.max()}): {redo}, or fix num_classes in its meta.json.")
    return dict(meta, shape=[shape[0] // 2, *shape[1:]] if latents else shape)

class LatentDataset(torch.utils.data.Dataset):
    """Item i -> (x, label, img): latent moments [2C, r, r] (mean | std) or uint8 pixels [C, r, r]; img: REPA's crop."""
    def __init__(self, path, meta, images):
        self.path, self.meta, self.images, self.store = path, meta, images and meta['store'] == 'latents', meta['store']
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
        a = np.asarray(Image.open(io.BytesIO(self.blob[self.index[i]:self.index[i + 1]].tobytes())).convert(mode))
        return torch.from_numpy(a.reshape(*a.shape[:2], -1).copy()).permute(2, 0, 1)
    def __getitem__(self, i):
        self.open()
        x = (self.jpeg(i, 'L' if self.meta['shape'][0] == 1 else 'RGB') if self.store == 'jpeg' else
             torch.from_numpy(np.array(self.data[i])))
        img = self.jpeg(i, 'RGB') if self.images else torch.empty(0, dtype=torch.uint8)
        return x, int(self.labels[i]), img

def open_data(args):
    """-> info (kind toy | pixel | latent, N, channels, res, ...), data, notes; latents without images: REPA off."""
    if args.data == 'toy':
        x, y = make_toy(args.toy_n, seed=args.seed, res=args.toy_res)
        return dict(kind='toy', N=len(y), channels=3, res=args.toy_res, num_classes=int(y.max()) + 1, scale=1.0,
                    vae=None, meta=None), (x, y), []
    meta, notes = check_data_dir(args.data), []
    if args.lambda_repa > 0 and not meta['images'] and meta['store'] == 'latents':
        if args.repa_given:
            raise SystemExit(f"error: '{args.data}' has no images for REPA (prepared with --no-images): re-run "
                             f"prepare_latents.py without --no-images, or train with --lambda-repa 0.")
        args.lambda_repa = 0.0
        notes.append(f"REPA off: '{args.data}' has no images for DINOv2 (pass --lambda-repa to insist)")
    return dict(kind='pixel' if meta['vae'] is None else 'latent', N=meta['N'], channels=meta['shape'][0],
                res=meta['shape'][1], num_classes=meta['num_classes'], scale=meta['scaling_factor'],
                vae=meta['vae'], meta=meta), LatentDataset(args.data, meta, images=args.lambda_repa > 0), notes
def real_x(batch, nz, info):
    if info['kind'] == 'latent':
        return posterior_sample(batch, nz['eps'], info['scale'])
    return batch if batch.is_floating_point() else batch.float() / 127.5 - 1
def posterior_sample(moments, eps, scale):
    """x = (mean + std * eps) * scaling_factor: a fresh posterior draw at each use (pixel data: std = 0, factor 1)."""
    C = moments.shape[1] // 2
    return (moments[:, :C].float() + moments[:, C:].float() * eps) * scale
def step_indices(n, global_batch, rank, world, seed, start, steps):
    """This rank's indices per step, from (seed, step) alone: a resume replays the same data, at any world size."""
    b, epoch = global_batch // world, None
    for step in range(start, steps):
        idx, pos = [], step * global_batch
        while len(idx) < global_batch:
            e, off = divmod(pos + len(idx), n)
            if e != epoch:          # the permutation of an epoch, kept while its batches are drawn
                epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
            idx += perm[off:off + global_batch - len(idx)].tolist()
        yield idx[rank * b:(rank + 1) * b]
def real_batches(ds, info, sampler, device, workers):
    """Yields this rank's (x, c, img) per step; x is the posterior (mean | std) for data sets, pixels for toy."""
    if info['kind'] == 'toy':
        x, y = ds[0].to(device), ds[1].to(device)
        yield from ((x[idx], y[idx], None) for idx in sampler)
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == 'cuda', prefetch_factor=4 if workers else None)
    for m, c, img in loader:
        yield m.to(device, non_blocking=True), c.to(device, non_blocking=True), img.to(device, non_blocking=True)

# The toy set (--data toy), to run it all on a CPU in minutes: 10 classes = (shape, base hue), seen after 4x pooling.
TOY_HUES = (0, 216, 72, 288, 36, 252, 324, 144, 108, 180)  # degrees, per class
TOY_SUMMARY = tuple('shape_acc class_acc min_class_acc fd fd_floor precision precision_floor recall recall_floor '
                    'diversity recall_px recall_px_floor diversity_px delta R A delta_h'.split())    # the final line
def _toy_sdf(c, x, y, s):
    """Signed distance (pixels, <0 inside) of shape c at offsets x, y (image y points down), half-size s."""
    ax, ay = x.abs(), y.abs()
    plus = lambda ax, ay: torch.minimum(torch.maximum(ax - s, ay - 0.3 * s), torch.maximum(ay - s, ax - 0.3 * s))
    shapes = (lambda: (x * x + y * y).sqrt() - s,                                   # disk
              lambda: torch.maximum(ax, ay) - 0.8 * s,                              # square
              lambda: ((x * x + y * y).sqrt() - 0.72 * s).abs() - 0.28 * s,         # ring
              lambda: plus(ax, ay),                                                 # plus
              lambda: torch.maximum(ax - 1.1 * s, ay - 0.38 * s),                   # horizontal bar
              lambda: torch.maximum(ay - 1.1 * s, ax - 0.38 * s),                   # vertical bar
              lambda: torch.maximum(y - 0.7 * s, (2 * ax - y - 1.05 * s) / 5 ** 0.5),  # triangle: apex up, slope 2
              lambda: (ax + ay - 1.15 * s) / 2 ** 0.5,                              # diamond
              lambda: plus((x + y).abs() / 2 ** 0.5, (x - y).abs() / 2 ** 0.5),     # X-cross: plus rotated by 45 deg
              lambda: (torch.maximum(ax, ay) - 0.68 * s).abs() - 0.25 * s)          # frame
    return shapes[c]()

def make_toy(n, seed=0, res=16, random_hue=False):
    """x [n, 3, res, res] in [-1, 1], y [n], each aligned block of 10 holding every class once; random_hue: any hue."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n // 10 + 1, 10, generator=g).argsort(1).flatten()[:n]
    u = lambda *shape: torch.rand(*shape, generator=g)
    f = res / 16  # geometry scales with res; texture and edge width stay in pixels
    cx, cy = ((res - 1) / 2 + (u(n) * 2 - 1) * 2 * f for _ in range(2))  # up to +-2 px (at 16) jitter
    s = (3.6 + 1.4 * u(n)) * f  # half-size 3.6..5 px at 16
    grid = torch.arange(res, dtype=torch.float32)
    xx, yy = grid[None, None, :] - cx[:, None, None], grid[None, :, None] - cy[:, None, None]
    d = torch.empty(n, res, res)
    for c in range(10):
        i = (y == c).nonzero().squeeze(1)
        d[i] = _toy_sdf(c, xx[i], yy[i], s[i, None, None])
    mask = torch.sigmoid(-d / 0.35)  # soft, antialiased edge
    hue = (torch.tensor(TOY_HUES, dtype=torch.float32)[y] + (u(n) * 2 - 1) * 7) / 360 % 1
    hue = u(n) if random_hue else hue
    sat, val = 0.75 + 0.25 * u(n), 0.8 + 0.2 * u(n)
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue[:, None]) % 6       # HSV -> RGB [n, 3]
    rgb = val[:, None] - (val * sat)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    ix, iy = torch.arange(res)[None, :], torch.arange(res)[:, None]    # fine texture: 1-px stripes (h / v) or checker
    pats = torch.stack([(p + t) % 2 for t in (iy + 0 * ix, ix + 0 * iy, ix + iy) for p in (0, 1)])
    tex = 1 - 0.3 * pats.float()[(u(n) * 6).long()]  # random phase; every other line 30 % darker
    bg = 0.06 + 0.06 * u(n, 1, 1) + 0.03 * torch.randn(n, res, res, generator=g)
    x = (bg - bg * mask)[:, None] + rgb[:, :, None, None] * (mask * tex)[:, None]
    return x.clamp_(0, 1).mul_(2).sub_(1), y

# ==== One training iteration ==== App. A.2: a D step, then a G step, each a module so DDP wraps just what it trains.
def step_noise(seed, step, n, G, scales, device):
    """All noise of a step's global batch (n) from (seed, step) alone: exact resume at any world size, no RNG state."""
    g, C, R = torch.Generator(device).manual_seed(seed * 1_000_003 + step + 1), G.channels, G.res
    nz = dict(z=torch.randn(n, G.z_dim, generator=g, device=device),        # both steps' z, as GAT's loop (see README)
              eps=torch.randn(n, C, R, R, generator=g, device=device))          # posterior sample of the real latent
    nz.update({name: draw_aug(n, R, g, device) for name in ('aug_dr', 'aug_df', 'aug_gr', 'aug_gf')})
    nz.update({k: [torch.randn(n, C, s, s, generator=g, device=device) for s in scales] for k in ('gp_r', 'gp_f')})
    return nz
def take(nz, lo, hi):
    if torch.is_tensor(nz):
        return nz[lo:hi]
    return [take(v, lo, hi) for v in nz] if isinstance(nz, list) else {k: take(v, lo, hi) for k, v in nz.items()}

class DStep(nn.Module):
    """L_D = RpGAN + gamma/2 (R1 + R2) + lambda_REPA REPA (+ lambda_va RpGAN of d_va); G, backbones outside the tree."""
    def __init__(self, D, G, args, dino=None, va=None):
        super().__init__()
        self.D, self._G, self._dino, self._va, self.a = D, [G], [dino], [va], args
    def forward(self, x_real, c, img, nz):
        a, D, B, amp = self.a, self.D, x_real.shape[0], autocast(self.a.precision, x_real.device)
        with torch.no_grad(), amp:
            fake = torch.cat(self._G[0](nz['z'], c))                            # [h_0; ...; h_K], [(K+1)B, C, R, R]
        xr, xf = (augment(x_real, nz['aug_dr']), augment(fake, nz['aug_df'])) if a.aug else (x_real, fake)
        va_in = torch.cat([xr, xf.chunk(len(D.scales))[-1]])                   # real and h_K, as augmented for D
        xr, xf = multiscale(xr, D.scales), multiscale(xf.chunk(len(D.scales)), D.scales)
        q = slice(None, None, 4)                                               # the GP quarter: every 4th sample
        nq, repa = len(range(B)[q]), a.lambda_repa > 0
        if a.gp_precision == 'bf16' or a.precision == 'fp32':   # one pass: real, fake, perturbed quarter (App. A.2)
            pr, pf = ([x[q] + a.gp_sigma * e[q] for x, e in zip(xs, nz[k])] for xs, k in ((xr, 'gp_r'), (xf, 'gp_f')))
            with amp:
                out = D([torch.cat(t) for t in zip(xr, xf, pr, pf)], torch.cat([c, c, c[q], c[q]]), return_tokens=repa)
            d, tok = out if repa else (out, None)
            d_real, d_fake, d_pr, d_pf = d.split([B, B, nq, nq])
            r1, r2 = approx_gp(d_real[q], d_pr, a.gp_sigma), approx_gp(d_fake[q], d_pf, a.gp_sigma)
        else:                       # --gp-precision fp32: clean and perturbed quarter in their own full-fp32 pass
            with amp:
                out = D([torch.cat(t) for t in zip(xr, xf)], torch.cat([c, c]), return_tokens=repa)
            d, tok = out if repa else (out, None)
            d_real, d_fake = d.split([B, B])
            sq = approx_gp_pass(D, [torch.cat([r[q], f[q]]) for r, f in zip(xr, xf)],
                                [torch.cat([er[q], ef[q]]) for er, ef in zip(nz['gp_r'], nz['gp_f'])],
                                torch.cat([c[q], c[q]]), a.gp_sigma, 'fp32')
            r1, r2 = sq[:nq].mean(), sq[nq:].mean()
        adv = rpgan_d_loss(d_real, d_fake)
        loss, stats = adv + a.gamma / 2 * (r1 + r2), dict(loss_d=adv.detach(), r1=r1.detach(), r2=r2.detach(),
                                                          d_real=d_real.detach().mean(), d_fake=d_fake.detach().mean())
        if repa:
            with torch.no_grad(), amp:
                f = dino_features(self._dino[0], img, nz['aug_dr'] if a.aug else None, x_real.shape[-1], D.grids[-1])
            with amp:
                lr = repa_loss(D.proj(tok[:B]), f[:, 0], f[:, 1:])
            loss, stats['repa'] = loss + a.lambda_repa * lr, lr.detach()
        if self._va[0] is not None:                                            # the backbone needs no gradient here
            with torch.no_grad(), amp:
                f = va_features(self._va[0], va_in)
            va = rpgan_d_loss(*D.va(f, torch.cat([c, c])).chunk(2))
            loss, stats['va_d'] = loss + a.lambda_va * va, va.detach()
        return loss, stats

class GStep(nn.Module):
    """L_G = L_adv + lambda_cons * L_cons (Eq. 3), D frozen, outside the tree; the D step's z (as GAT), new augment."""
    def __init__(self, G, D, args, va=None):
        super().__init__()
        self.G, self._D, self._va, self.a = G, [D], [va], args
    def forward(self, x_real, c, nz):
        a, G, D, va = self.a, self.G, self._D[0], self._va[0]
        with autocast(a.precision, x_real.device):
            w = G.style(nz['z'], c)
            hs = G.synthesis(w)
            xr, xf = x_real, torch.cat(hs)
            xr, xf = (augment(xr, nz['aug_gr']), augment(xf, nz['aug_gf'])) if a.aug else (xr, xf)
            d_fake = D(multiscale(xf.chunk(len(hs)), D.scales), c)
            with torch.no_grad():
                d_real = D(multiscale(xr, D.scales), c)
                f_real = va_features(va, xr) if va is not None else None
            f_fake = va_features(va, xf.chunk(len(hs))[-1]) if va is not None else None    # G's gradient flows through
        adv, cons = rpgan_g_loss(d_fake, d_real), consistency_loss(hs, detach_anchor=a.cons_detach)
        loss, stats = adv + a.lambda_cons * cons, dict(loss_g=adv.detach(), cons=cons.detach())
        if va is not None:
            va_g = rpgan_g_loss(D.va(f_fake, c), D.va(f_real, c))
            loss, stats['va_g'] = loss + a.lambda_va * va_g, va_g.detach()
        return loss, w.detach(), stats

@torch.no_grad()
def ema_update(ema, G, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()), 1 - decay)
    for be, b in zip(ema.buffers(), G.buffers()):
        be.copy_(b)
Models = collections.namedtuple('Models', 'G D ema opt_g opt_d d_step g_step world micro')    # build()'s result

def train_step(m, x, c, img, nz, args):
    """One iteration (App. A.2): D step, G step (D frozen), w_avg and EMA; micro-batches accumulate; no host sync."""
    n_acc = x.shape[0] // m.micro
    chunks = [(i * m.micro, (i + 1) * m.micro) for i in range(n_acc)]
    sync = lambda mod, i: contextlib.nullcontext() if m.world == 1 or i == n_acc - 1 else mod.no_sync()
    m.D.requires_grad_(True)
    for i, (lo, hi) in enumerate(chunks):           # fp32 R1/R2: TF32 off for its backward too (bf16 parts unaffected)
        with sync(m.d_step, i), full_fp32(args.gp_precision == 'fp32'):
            loss_d, st_d = m.d_step(x[lo:hi], c[lo:hi], None if img is None else img[lo:hi], take(nz, lo, hi))
            (loss_d / n_acc).backward()
    gn_d = torch.nn.utils.clip_grad_norm_(m.D.parameters(), args.clip)
    m.opt_d.step()
    m.opt_d.zero_grad(set_to_none=True)
    m.D.requires_grad_(False)
    ws = []
    for i, (lo, hi) in enumerate(chunks):
        with sync(m.g_step, i):
            loss_g, w, st_g = m.g_step(x[lo:hi], c[lo:hi], take(nz, lo, hi))
            (loss_g / n_acc).backward()
        ws.append(w)
    gn_g = torch.nn.utils.clip_grad_norm_(m.G.parameters(), args.clip)
    m.opt_g.step()
    m.opt_g.zero_grad(set_to_none=True)
    m.G.update_w_avg(torch.cat(ws), c)
    ema_update(m.ema, m.G, args.ema_decay)
    return [*st_d, *st_g, 'gnorm_d', 'gnorm_g'], torch.stack([*st_d.values(), *st_g.values(), gn_d, gn_g]).float()

def adamw(net, args, fused):
    return torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.0, fused=fused)
def build(args, g_cfg, d_cfg, device, world, ck=None, pretrained=True):
    """G, D, EMA, AdamW (0, 0.99) optimizers and the (DDP-wrapped) step modules; state from checkpoint ck if given."""
    torch.manual_seed(args.seed)
    G, D = Generator(**g_cfg).to(device), Discriminator(**d_cfg, attn_impl=args.d_attn).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g, opt_d = adamw(G, args, device.type == 'cuda'), adamw(D, args, device.type == 'cuda')
    if ck is not None:
        G.load_state_dict(ck['G']), D.load_state_dict(ck['D']), ema.load_state_dict(ck['ema'])
        opt_g.load_state_dict(ck['opt_g']), opt_d.load_state_dict(ck['opt_d'])
    G.grad_ckpt = D.grad_ckpt = args.grad_ckpt
    if args.compile:                                   # per block, in place: state_dict keys stay unchanged
        for blk in [*G.blocks, *D.blocks]:
            blk.compile()
    dino = load_frozen(DINO_NAME, device, pretrained, img_size=224) if args.lambda_repa > 0 else None
    va = load_frozen(args.va_model, device, pretrained, 'vision-aided (ConvNeXt-V2)', '--lambda-va 0') \
        if args.lambda_va > 0 else None
    d_step, g_step = DStep(D, G, args, dino, va), GStep(G, D, args, va)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == 'cuda' else None
        d_step, g_step = (DDP(s, device_ids=ids, broadcast_buffers=False) for s in (d_step, g_step))
    return Models(G, D, ema, opt_g, opt_d, d_step, g_step, world, args.micro_batch or args.batch_size // world)

def hierarchy(args, info):
    """(scales, G's patch, D's patches) of --scales / --patch / --d-patch (default Table 6's, 2), or an error line."""
    r, kind = info['res'], 'images' if info['kind'] != 'latent' else 'latents'
    scales, p = args.scales or table6_scales(r), args.patch or 2
    dp = args.d_patch * len(scales) if args.d_patch and len(args.d_patch) == 1 else args.d_patch or [p] * len(scales)
    unit = 8 * max(dp + [p])
    if not args.scales and r % unit:                        # the data's size is wrong for the default hierarchy
        fix = (f"use --toy-res {unit}" if info['kind'] == 'toy' else f"re-run prepare_latents.py for '{args.data}' "
               f"with --resolution {unit if kind == 'images' else 8 * unit}")
        raise SystemExit(f"error: '{args.data}' holds {r} x {r} {kind}, but CAT's four scales (r/8, r/4, r/2, r) with "
                         f"patch {p} need r to be a multiple of {unit}: {fix} (or a multiple of it).")
    bad = next((why for wrong, why in (
        (len(scales) < 2, 'CAT needs at least two scales'),
        (any(b <= a for a, b in zip(scales, scales[1:])), 'the resolutions must increase'),
        (any(s < 1 or r % s for s in scales), f'each must divide the data resolution {r}'),
        (len(dp) != len(scales), f'--d-patch {",".join(map(str, dp))} needs one patch size per scale'),
        (any(q < 1 or s % q for s, q in zip(scales, dp)), f'each must be a whole number of D patches '
                                                           f'({",".join(map(str, dp))})'),
        (r % p, f"G's patch {p} must divide {r}"),
        (G_CONFIGS[args.model].depth < len(scales), f'G-{args.model} has fewer blocks than stages')) if wrong), None)
    if bad:
        raise SystemExit(f"error: --scales {','.join(map(str, scales))} for {r} x {r} {kind}: {bad}.")
    return scales, p, dp

def model_configs(args, info):
    """G and D constructor arguments (--model, --model-d, hierarchy, data); Table 6's hierarchy, patch 2 left out."""
    g, d = G_CONFIGS[args.model], D_CONFIGS[args.model_d or D_FOR_G[args.model]]
    common = dict(channels=info['channels'], res=info['res'], num_classes=info['num_classes'])
    g_cfg = dict(depth=g.depth, width=g.width, heads=g.heads, **common)
    d_cfg = dict(depth=d.depth, width=d.width, heads=d.heads, cmap_dim=d.cmap,
                 repa_dim=768 if args.lambda_repa > 0 else 0, mask=not args.no_mask, **common)
    scales, p, dp = hierarchy(args, info)
    if scales != table6_scales(info['res']):
        g_cfg['stages'], d_cfg['scales'] = len(scales), scales
    if p != 2:
        g_cfg['patch'] = p
    if dp != [2] * len(scales):
        d_cfg['patch'] = dp if len(set(dp)) > 1 else dp[0]
    if args.lambda_va > 0:
        if info['kind'] == 'latent':
            raise SystemExit("error: --lambda-va needs pixel data (App. A.3), not latents: train with --lambda-va 0.")
        import timm
        with torch.device('meta'):                      # the backbone's feature width, without its weights
            d_cfg['va_dim'] = timm.create_model(args.va_model, pretrained=False, num_classes=0).num_features
    return g_cfg, d_cfg

# ==== Evaluation ==== rank 0, every --eval-every: EMA grids, Eq. 1, judge_metrics; fid.py and sample.py reuse these.
def to_uint8(x):
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu()
def decode(x, info, vae=None):
    """-> uint8 [N, H, W, 3]: pixel data as is, latents via the VAE (x / scale), else channels 0..2 in false colour."""
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
    """Samples in batches: the final h_K [N, C, R, R], or every stage [h_0..h_K] stacked [K+1, N, C, R, R]."""
    outs = (G(zb, cb, psi) for zb, cb in zip(z.split(batch), c.split(batch)))
    return torch.cat([torch.stack(hs) if all_stages else hs[-1] for hs in outs], dim=1 if all_stages else 0)
def feature_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1],) * 2)
def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) in float64, with ADM's safeguards."""
    import scipy.linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if not np.isfinite(covmean).all():      # singular product: regularize both covariances and retry
                offset = eps * np.eye(len(sigma1))
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        except (np.linalg.LinAlgError, ValueError):
            covmean = None
    if covmean is None or not np.isfinite(covmean).all():   # e.g. identical images (sigma = 0): tr sqrtm(s1 s2) is
        tr = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)).sum()   # the sum of sqrt eigenvalues (>= 0)
    elif np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}')
    else:                                   # round-off makes tiny imaginary parts; large ones mean a real problem
        tr = np.trace(covmean).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)
def precision_recall(real_feats, fake_feats, k=3, batch=5000, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019; ADM's ManifoldEstimator); fp32, no TF32 (ADM: fp16)."""
    rows = lambda x: range(0, len(x), batch)
    radii = lambda x: torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(min(k, len(x) - 1) + 1, dim=1).values
                                 for i in rows(x)])          # fewer than k + 1 points: the farthest other one
    covered = lambda x, y, r: torch.cat([(torch.cdist(x[i:i + batch], y) <= r).any(1) for i in rows(x)]).double().mean()
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real_feats, fake_feats))
    with full_fp32():
        return covered(fake, real, radii(real)).item(), covered(real, fake, radii(fake)).item()
JUDGE_STEPS, JUDGE_MIN_ACC = 300, 0.95     # the judges' training steps; the toy's judges must reach this accuracy

class Judge(nn.Module):
    """Small CNN for small pixel data: 3 convs to 4 x 4, a 128-d layer on the whole map (no pooling: where, how big)."""
    def __init__(self, res=16, num_classes=10, channels=3, dim=128):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(channels, 32, 3, max(1, res // 16), 1), nn.SiLU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, dim), nn.SiLU())
        self.head = nn.Linear(dim, num_classes)
    def features(self, x):
        return self.fc(self.convs(x.float().clamp(-1, 1)))
    def forward(self, x):
        return self.head(self.features(x))

def train_judge(x, y, num_classes, steps=300, batch=128, seed=0):
    """Judge trained on x in [-1, 1], labels y (seeded shuffles, light noise, one-cycle Adam); global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(x.shape[-1], num_classes, x.shape[1])
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(-(-steps * batch // len(x)))])
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        xb = x[idx].float()
        xb = xb + 0.1 * torch.rand(len(idx), 1, 1, 1, generator=g) * torch.randn(xb.shape, generator=g)
        F.cross_entropy(judge(xb), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return judge.eval()
@torch.no_grad()
def class_accuracy(judge, x, y, num_classes):
    """Share of x classified as y, overall and per class (nan for a class absent from y)."""
    hit = torch.cat([judge(b).argmax(1) for b in x.split(1000)]) == y
    return hit.float().mean().item(), [hit[y == k].float().mean().item() for k in range(num_classes)]
@torch.no_grad()
def judge_metrics(judge, fake, c, real, c_real, num_classes, labelled=True, shape_judge=None, failed=None):
    """n fakes of A's classes c vs reals A = real[:n], B = real[n:2n]: fd, precision, recall (floors: B vs A), diversity
    (per class, fakes' pairwise distance / A's), class_acc (per class, worst, _flip: mirrored), shape_acc (toy)."""
    n, out, failed = len(fake), {}, {} if failed is None else failed
    def metric(name, fn):
        try:
            out.update(fn())
        except Exception as e:
            failed[name] = f'{type(e).__name__}: {e}'
    feats = lambda x: torch.cat([judge.features(b) for b in x.split(1000)])
    ff, fa, fb = feats(fake), feats(real[:n]), feats(real[n:2 * n])
    if not labelled:                # an untrained CNN's features are tiny: measure them in units of the reals' spread
        spread = fa.std(0).mean().item() if n > 1 else 0
        spread = spread if spread > 1e-5 * fa.abs().mean().item() else 1.0     # identical reals: no unit to take
        ff, fa, fb = ff / spread, fa / spread, fb / spread
    metric('fd', lambda: dict(fd=frechet_distance(*feature_stats(ff), *feature_stats(fa)),
                              fd_floor=frechet_distance(*feature_stats(fb), *feature_stats(fa))))
    metric('precision/recall', lambda: dict(zip(('precision', 'recall', 'precision_floor', 'recall_floor'),
                                                precision_recall(fa, ff) + precision_recall(fa, fb))))
    spread = lambda f: torch.pdist(f).mean().item() if len(f) > 1 else float('nan')
    tol = 1e-5 * fa.norm(dim=1).mean().item()         # below: identical images up to float round-off
    ratio = lambda a, b: a / b if b > tol else float('nan')
    def diversity():
        div = [ratio(spread(ff[c == k]), spread(fa[c_real[:n] == k])) for k in range(num_classes)]
        seen = [v for v in div if v == v]               # nanmean without numpy's warning
        return dict(diversity=sum(seen) / len(seen) if seen else float('nan'),
                    **{f'diversity_{k}': v for k, v in enumerate(div)})
    metric('diversity', diversity)
    def accuracy():
        acc, per = class_accuracy(judge, fake, c, num_classes)
        return dict(class_acc=acc, min_class_acc=min((p for p in per if p == p), default=float('nan')),
                    class_acc_flip=class_accuracy(judge, fake.flip(-1), c, num_classes)[0],
                    **{f'class_acc_{k}': v for k, v in enumerate(per)})
    if labelled:
        metric('class_acc', accuracy)
    if shape_judge is not None:
        metric('shape_acc', lambda: dict(shape_acc=class_accuracy(shape_judge, fake, c, num_classes)[0]))
    return out

class PooledPixels(nn.Module):
    """Label-free features for variety: the image pooled by area to 8 x 8 x C (16 px: 2 x 2; 64 px: 8 x 8, else the
    Frechet distance's sqrtm of a 32 x 32 x C matrix costs ~30 s per call on a CPU)."""
    def features(self, x):
        return F.adaptive_avg_pool2d(x.float(), 8).flatten(1)
def pixels(ds, idx):
    """Images idx (in that order) of a pixel-space LatentDataset as float [n, C, r, r] in [-1, 1], and their labels."""
    idx = np.asarray(idx, dtype=np.int64)
    x = torch.from_numpy(ds.open().data[idx]) if ds.store == 'uint8' else torch.stack([ds[i][0] for i in idx])
    return x.float() / 127.5 - 1, torch.from_numpy(ds.labels[idx].astype(np.int64))

class Evaluation:
    """On fixed EMA samples: Eq. 1, a grid; pixel data: judge_metrics in the judge's features (one class: an untrained
    CNN's, Naeem et al. 2020's 'T4') and, *_px, in pixels pooled to 8 x 8 (what a classifier ignores: where, size)."""
    def __init__(self, args, info, ds, device, run_dir, log):
        self.a, self.info, self.device, self.run_dir = args, info, device, run_dir
        self.scales, nc = hierarchy(args, info)[0], info['num_classes']
        self.vae = self.judge = self.shape_judge = None
        self.z = torch.randn(args.eval_n, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 12345))
        self.c = torch.arange(args.eval_n) % nc
        self.grid_c = torch.arange(min(nc, 16) if nc > 1 else 10).repeat_interleave(10) % nc    # a row of 10 per class
        if info['kind'] == 'latent':
            self.grid_c = self.c[:32]
            self.vae = load_vae(args.vae or info['vae'], device, required=False)
            if self.vae is None:
                log(f"warning: VAE '{args.vae or info['vae']}' unavailable: sample grids show latent channels 0-2.")
        else:
            self.setup_judge(ds, log)
        self.z_grid = torch.randn(len(self.grid_c), Z_DIM, generator=torch.Generator().manual_seed(args.seed + 54321))
    def setup_judge(self, ds, log):
        """Real sets A and B (n images each) and the judges, cached in the run directory (judge.pt)."""
        a, info, nc = self.a, self.info, self.info['num_classes']
        if info['kind'] == 'toy':
            n = a.eval_n
            toy = lambda n, s, hue=False: make_toy(n, seed=a.seed + s, res=info['res'], random_hue=hue)
            (self.real, self.c_real), train, val = toy(2 * n, 777), toy(38400, 1000), toy(2000, 2000)
        else:                   # a seeded permutation: the judge trains on all but the first fifth (at most 2000)
            n = max(1, min(a.eval_n, info['N'] // 2))                   # a set of one image: A = B = that image
            perm = torch.randperm(info['N'], generator=torch.Generator().manual_seed(a.seed + 777)).numpy()
            hold = min(2000, info['N'] // 5)
            self.real, self.c_real = pixels(ds, perm[np.arange(2 * n) % info['N']])
            train, val = pixels(ds, perm[hold:hold + 38400]), pixels(ds, perm[:hold])
        path = os.path.join(self.run_dir, 'judge.pt')
        state = torch.load(path, map_location='cpu', weights_only=True) if os.path.exists(path) else {}
        self.labelled = nc > 1
        if self.labelled:
            self.judge = self.trained(state, 'judge', train, val, a.seed, log)
            self.features = 'judge (trained on the data set)'
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.judge = Judge(info['res'], nc, info['channels']).eval()
            self.features = 'random CNN (untrained judge, seed 0: the data set has one class)'
        self.features += '; *_px: pixels pooled to 8 x 8'
        if info['kind'] == 'toy':
            self.shape_judge = self.trained(state, 'shape_judge', toy(38400, 1001, True), toy(2000, 2001, True),
                                            a.seed + 1, log)
        torch.save({k: getattr(self, k).state_dict() for k in ('judge', 'shape_judge') if getattr(self, k)}, path)
        log(f"judge features: {self.features}; {n} EMA samples against two real sets of {n} per evaluation")
        self.z_judge, self.c_judge = self.z[:n], self.c_real[:n]       # the fakes follow set A's classes
        rows = [self.real[self.c_real == k][:10] for k in range(min(nc, 16))] if nc > 1 else [self.real[:100]]
        rows = [torch.cat([r, -torch.ones(-len(r) % 10, *r.shape[1:])]) for r in rows]     # short rows: black
        save_grid(to_uint8(torch.cat(rows)), 10, os.path.join(self.run_dir, 'reals.png'))
    def trained(self, state, name, train, val, seed, log):
        """Judge `name` from the cache, or trained on `train`; its accuracy on the held-out reals `val` is logged."""
        nc = self.info['num_classes']
        judge = Judge(self.info['res'], nc, self.info['channels'])
        if name in state:
            judge.load_state_dict(state[name])
        else:
            judge = train_judge(*train, nc, steps=JUDGE_STEPS, seed=seed)
        acc, per = class_accuracy(judge.eval(), *val, nc)
        per_class = ' '.join(f'{100 * p:.0f}' for p in per)
        log(f"{name}: {100 * acc:.1f}% right on {len(val[1])} held-out real images (per class {per_class})",
            {'step': 0, f'{name}_acc': acc, f'{name}_acc_per_class': per})
        if self.info['kind'] == 'toy' and acc < JUDGE_MIN_ACC:
            raise RuntimeError(f'{name}: accuracy {acc:.3f} < {JUDGE_MIN_ACC} on held-out toy images')
        return judge
    @torch.no_grad()
    def __call__(self, ema, step):
        """-> (metrics, {name of a failed metric: why}): a failure costs that metric, not the run."""
        a, info, dev, out, failed = self.a, self.info, self.device, {}, {}
        z, c = (self.z, self.c) if self.judge is None else (self.z_judge, self.c_judge)
        with autocast(a.precision, dev):
            hs = list(generate(ema, z.to(dev), c.to(dev), all_stages=True).float().cpu())
            grid = generate(ema, self.z_grid.to(dev), self.grid_c.to(dev)).float().cpu()
        try:
            eq1 = cross_scale_metrics(hs, self.scales)
            out = {f'{name}_{k}': v for name, vals in eq1.items() for k, v in enumerate(vals)}
            out.update({name: sum(eq1[name]) / len(eq1[name]) for name in ('delta', 'R', 'A', 'delta_h')})
        except Exception as e:
            failed['Eq. 1 (delta, R, A)'] = f'{type(e).__name__}: {e}'
        if self.judge is not None:
            ab, fail = (hs[-1], c, self.real, self.c_real, info['num_classes']), {}
            out.update(judge_metrics(self.judge, *ab, self.labelled, self.shape_judge, failed), features=self.features)
            px = judge_metrics(PooledPixels(), *ab, False, None, fail)
            failed.update({f'{k} (pooled pixels)': v for k, v in fail.items()})
            out.update({f'{k}_px' if '_' not in k else k.replace('_', '_px_', 1): v for k, v in px.items()})
        save_grid(decode(grid, info, self.vae), 10 if self.judge is not None else 8,
                  os.path.join(self.run_dir, f'samples-{step:07d}.png'))
        return out, failed

# ==== Training loop ==== Table 6: DDP through torchrun, run directory and resume, checkpoints, logging, evaluation.
CKPT_VERSION = 2            # 2: GAT's form of the equalized-lr weights (version-1 weights would load but mean else)
def setup_ddp():
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cuda, local = torch.cuda.is_available(), int(os.environ['LOCAL_RANK'])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group('nccl' if cuda else 'gloo')
    return dist.get_rank(), dist.get_world_size(), torch.device('cuda', local) if cuda else torch.device('cpu')
def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous file intact."""
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)
def load_checkpoint(path, map_location='cpu'):
    """A CAT checkpoint dict (weights-only: runs no code; .safetensors: 'ema' and config only), else one clear line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint file '{path}'.")
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, 'pt', device=str(map_location)) as f:
                meta, ema = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            ck = dict(json.loads(meta.get('cat', '{}')), ema=ema)
        else:
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r'GLOBAL (\S+)', str(e))        # the first object the safe unpickler refused
        raise SystemExit(f"error: '{path}' is not a safe CAT checkpoint: it holds {what[1] if what else 'an object'}, "
                         f"not only tensors and plain data, and is not loaded (no code in it ran).")
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint '{path}' ({type(e).__name__}): truncated or not a torch file.")
    if not isinstance(ck, dict) or ck.get('format') != 'cat' or 'config' not in ck:
        raise SystemExit(f"error: '{path}' is not a CAT checkpoint (written by cat.py or sample.py --export).")
    if ck.get('version', 1) < CKPT_VERSION:
        raise SystemExit(f"error: '{path}' is from an older cat.py (another equalized-lr form): retrain with this one.")
    return ck
def checkpoints_in(run_dir):
    steps = sorted(glob.glob(os.path.join(run_dir, 'ckpt-*.pt')), reverse=True)
    latest = os.path.join(run_dir, 'latest.pt')
    return ([latest] if os.path.exists(latest) else []) + steps
def find_resume(path):
    """--resume FILE, or a run directory: its newest checkpoint that loads (a damaged latest.pt falls back)."""
    if os.path.isfile(path):
        return path
    for p in checkpoints_in(path):
        try:
            load_checkpoint(p)
            return p
        except SystemExit as e:
            print(f"warning: skipping {p}: {e}")
    raise SystemExit(f"error: --resume {path}: no readable checkpoint there.")
def resolve_run(args, info, g_cfg, d_cfg, rank, world):
    """-> (run dir, checkpoint or None): --resume FILE | DIR (none there yet: a new run there), --out, or runs/NNN."""
    ck = None
    if args.resume:
        src = args.resume if args.resume != 'auto' else (args.out or '')
        if not src:
            raise SystemExit("error: --resume without a path needs --out RUN_DIR.")
        if src.endswith('.pt') and not os.path.isfile(src):
            raise SystemExit(f"error: --resume {src}: no such checkpoint file.")
        if not os.path.isfile(src) and not checkpoints_in(src):     # a requeued job's first start: a new run there
            print(f"--resume: no checkpoint in {src} {'yet' if os.path.isdir(src) else '(a new directory)'}, "
                  f"starting a new run there")
            run_dir = args.out or src
        else:
            path = find_resume(src)
            ck = dict(load_checkpoint(path), path=path)
            if 'G' not in ck:
                raise SystemExit(f"error: {path} holds only the EMA generator: resume from latest.pt or ckpt-*.pt.")
            run_dir = args.out or (src if os.path.isdir(src) else os.path.dirname(path))
            if ck['config']['G'] != g_cfg or ck['config']['D'] != d_cfg:
                a = ck['config']['args']
                raise SystemExit(f"error: {path} holds a different model (--model {a['model']}, --model-d "
                                 f"{a['model_d']}, data {a['data']}): resume with the same model options and --data.")
    else:
        run_dir = args.out or new_run_dir('runs', 'toy' if info['kind'] == 'toy' else args.model)
        if rank == 0 and checkpoints_in(run_dir):
            raise SystemExit(f"error: {run_dir} already holds a run: add --resume to continue it, or pick a new --out.")
    if world > 1:                                   # every rank writes logs / reads checkpoints of rank 0's choice
        dist.broadcast_object_list(obj := [run_dir], src=0)
        run_dir = obj[0]
    return run_dir, ck
def new_run_dir(root, name):
    os.makedirs(root, exist_ok=True)
    ids = [int(m.group(1)) for d in os.listdir(root) if (m := re.match(r'(\d+)-', d))]
    return os.path.join(root, f'{max(ids, default=-1) + 1:03d}-{name}')
def write_checkpoint(run_dir, state, args):
    """latest.pt; at --ckpt-every and the end ckpt-STEP.pt, linked as latest.pt; then pruned (--keep, milestones)."""
    step, latest = state['step'], os.path.join(run_dir, 'latest.pt')
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
                if not (args.milestone_every and int(p[-10:-3]) % args.milestone_every == 0)]
    for old in periodic[:-args.keep]:
        os.remove(old)

def make_logger(run_dir, rank):
    """log(msg, metrics=None): on rank 0 to stdout (through tqdm), log.txt and metrics.jsonl in the run directory."""
    if rank != 0:
        return lambda msg, metrics=None: None
    from tqdm import tqdm
    os.makedirs(run_dir, exist_ok=True)
    txt, jsonl = (open(os.path.join(run_dir, name), 'a') for name in ('log.txt', 'metrics.jsonl'))
    def log(msg, metrics=None):
        tqdm.write(msg)
        print(msg, file=txt, flush=True)
        if metrics is not None:
            print(json.dumps(metrics), file=jsonl, flush=True)
    return log

class Preemption:
    """SIGTERM / SIGINT / SIGUSR1 (SLURM) set a flag, summed async on gloo: a signal in step s stops all after s + 1."""
    def __init__(self, world):
        self.flag, self.world, self.work = torch.zeros(1), world, None
        self.old = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        self.group = dist.new_group(backend='gloo') if world > 1 else None
    def handler(self, signum, frame):
        if self.flag.item():                    # a second signal: stop now
            raise KeyboardInterrupt
        self.flag.fill_(1)
    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)
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

def train(args, hooks=()):
    """The run. hooks: callables hook(step, ema, info, log), called on rank 0 after every step (fid.py train: FID)."""
    rank, world, device = setup_ddp()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    b, micro = args.batch_size // world, args.micro_batch or args.batch_size // world
    if args.batch_size % world or b % micro:
        raise SystemExit(f"error: --batch-size {args.batch_size} must split evenly over {world} processes and into "
                         f"micro-batches of {args.micro_batch}: pick sizes that divide.")
    if micro % 4:
        raise SystemExit(f"error: the per-process micro-batch ({micro}) must be a multiple of 4 (R1/R2: every 4th).")
    info, ds, notes = open_data(args)
    g_cfg, d_cfg = model_configs(args, info)
    run_dir, ck = resolve_run(args, info, g_cfg, d_cfg, rank, world)
    log = make_logger(run_dir, rank)
    if device.type == 'cpu' and args.model not in ('S', 'T'):
        notes.append(f"note: G-{args.model}/2 is sized for GPUs; for a small data set on the CPU see the README's "
                     f"'Train on your own data' (--model S: small-data defaults)")
    for line in notes:
        log(line)
    m = build(args, g_cfg, d_cfg, device, world, ck)
    start = 0 if ck is None else ck['step']
    if ck is not None:
        log(f"resumed from {ck['path']} at step {start}")
    indices = step_indices(info['N'], args.batch_size, rank, world, args.seed, start, args.steps)
    batches = real_batches(ds, info, indices, device, args.workers)
    evaluation = None
    if rank == 0 and args.eval_every:
        try:
            evaluation = Evaluation(args, info, ds, device, run_dir, log)
        except Exception as e:                          # no evaluation can end a run
            log(f"evaluation off: its set-up failed ({type(e).__name__}: {e}); training goes on")
    config = dict(G=g_cfg, D=d_cfg, args=vars(args), data={k: v for k, v in info.items() if k != 'meta'},
                  meta=info['meta'])
    log(f"run {run_dir}: G {sum(p.numel() for p in m.G.parameters()) / 1e6:.2f}M, D "
        f"{sum(p.numel() for p in m.D.parameters()) / 1e6:.2f}M params, {world} process(es) x batch {b} (micro "
        f"{micro}), {args.precision}, device {device}, {args.workers} data workers")
    from tqdm import tqdm
    stop, pending, t0, last_eval, done = Preemption(world), [], time.time(), None, start
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, dynamic_ncols=True):
        moments, c, img = next(batches)
        nz = take(step_noise(args.seed, step, args.batch_size, m.G, m.D.scales, device), rank * b, (rank + 1) * b)
        x = real_x(moments, nz, info)
        if info['kind'] == 'pixel' and args.lambda_repa > 0:       # REPA of pixel data: DINOv2 sees x's own pixels
            img = moments.expand(-1, 3, -1, -1)
        names, st = train_step(m, x, c, img, nz, args)
        pending.append(st)
        done, stopping = step + 1, stop.requested()
        save = done % args.latest_every == 0 or done % args.ckpt_every == 0 or done == args.steps or stopping
        if done % args.log_every == 0 or save:         # one host sync per interval, and the non-finite guard
            vals = torch.stack(pending).mean(0).tolist()
            bad = [n for n, v in zip(names, vals) if not math.isfinite(v)]
            if bad:
                raise SystemExit(f"error: non-finite {', '.join(bad)} within steps {done - len(pending) + 1}-{done}: "
                                 f"stopped; the last checkpoint ({run_dir}/latest.pt) is from before them, untouched.")
            metrics = dict(step=done, **dict(zip(names, vals)), sec_per_it=(time.time() - t0) / len(pending))
            pending, t0 = [], time.time()
            log(f"step {done}: " + ' '.join(f"{k}={v:.4g}" for k, v in metrics.items() if k != 'step'), metrics)
        if rank == 0 and save:                          # the step's checkpoint first, then its evaluation
            write_checkpoint(run_dir, dict(format='cat', version=CKPT_VERSION, step=done, config=config,
                                           G=m.G.state_dict(), D=m.D.state_dict(), ema=m.ema.state_dict(),
                                           opt_g=m.opt_g.state_dict(), opt_d=m.opt_d.state_dict()), args)
        if evaluation and (done % args.eval_every == 0 or done == args.steps) and not stopping:
            try:                                        # the log line: summaries; metrics.jsonl: everything
                last_eval, failed = evaluation(m.ema, done)
            except Exception as e:
                last_eval, failed = None, {'evaluation': f'{type(e).__name__}: {e}'}
            for name, why in failed.items():
                log(f"eval {done}: {name} failed ({why}); training goes on")
            ev = last_eval or {}
            shown = ' '.join(f"{k}={v:.4f}" for k, v in ev.items() if k != 'features' and not re.search(r'_\d+$', k))
            log(f"eval {done}: {shown}", dict(step=done, **ev))
        for hook in hooks if rank == 0 and not stopping else ():
            try:
                hook(done, m.ema, info, log)
            except Exception as e:
                log(f"step {done}: {getattr(hook, '__name__', type(hook).__name__)} failed ({type(e).__name__}: "
                    f"{e}); training goes on")
        if stopping:
            log(f"stopped by signal after step {done}; checkpoint {run_dir}/latest.pt. Resume with the same command "
                f"plus --resume {run_dir}")
            break
    stop.restore()
    if info['kind'] == 'toy' and last_eval is not None:
        log("toy: " + ' '.join(f"{k}={last_eval.get(k, float('nan')):.4f}" for k in TOY_SUMMARY))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return dict(run_dir=run_dir, G=m.G, D=m.D, ema=m.ema, eval=last_eval, step=done)

# ==== Cost ==== Table 2, App. A.2: --summary (params, multiply-adds; meta device, no GPU), --bench (synthetic latents).
PEAK_BF16_TFLOPS = {'H100': 989.4, 'H200': 989.4, 'A100': 312.0, 'L40S': 362.0}   # dense, from vendor spec sheets
def count_macs(fn):
    """Multiply-adds (FLOPs / 2) of fn(); attention through the math path, so that it is counted on any device."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.nn.attention import sdpa_kernel, SDPBackend
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        fn()
    return fc.get_total_flops() / 2
def synthetic(args):
    """(info, G and D configs) of --summary / --bench: ImageNet-256 latents, or RGB pixels at the finest --scales."""
    res = args.scales[-1] if args.scales else 32
    info = dict(kind='latent' if res == 32 else 'pixel', channels=4 if res == 32 else 3, res=res, num_classes=1000)
    return (info, *model_configs(args, info))
def cost(args, g_cfg, d_cfg):
    """Meta-device G, D, va backbone (or None) and App. A.2 multiply-adds: F_G, F_D, train = 4F_G + 10.5F_D + 5F_va."""
    import timm
    with torch.device('meta'):
        G, D, c = Generator(**g_cfg), Discriminator(**d_cfg), torch.zeros(1, dtype=torch.long)
        F_G = count_macs(lambda: G(torch.randn(1, G.z_dim), c))
        F_D = count_macs(lambda: D(multiscale(torch.randn(1, D.channels, D.res, D.res), D.scales), c))
        va = timm.create_model(args.va_model, pretrained=False, num_classes=0) if args.lambda_va > 0 else None
        F_va = count_macs(lambda: va(torch.randn(1, 3, 224, 224))) if va else 0
    return G, D, va, dict(F_G=F_G, F_D=F_D, F_va=F_va, train=4 * F_G + 10.5 * F_D + 5 * F_va)    # F_va: 4 passes + grad

def summary(args, out=print, memory=True):
    info, g_cfg, d_cfg = synthetic(args)
    G, D, va, f = cost(args, g_cfg, dict(d_cfg, repa_dim=768))
    n_g, n_proj, n_va = (sum(p.numel() for p in net.parameters()) if net else 0 for net in (G, D.proj, D.va))
    n_d = sum(p.numel() for p in D.parameters()) - n_proj - n_va
    out(f"config: {names(args, D)} (G depth {g_cfg['depth']}, width {g_cfg['width']}, heads {g_cfg['heads']}; D depth "
        f"{d_cfg['depth']}, width {d_cfg['width']}, heads {d_cfg['heads']}); {info['res']}x{info['res']} "
        f"{'latents' if info['kind'] == 'latent' else 'RGB pixels'}, scales {','.join(map(str, D.scales))}, "
        f"D patches {','.join(map(str, D.patches))}, token grids {','.join(map(str, D.grids))}")
    out(f"G params: {n_g / 1e6:.1f}M")
    out(f"D params: {n_d / 1e6:.1f}M (+ REPA projector {n_proj / 1e6:.1f}M, training only)")
    out(f"G GFLOPs: {f['F_G'] / 1e9:.1f} (multiply-adds per sample, one-step inference)")
    out(f"D GFLOPs: {f['F_D'] / 1e9:.1f} (all {len(D.scales)} scales, {D.segments[-1][1]} tokens)")
    if va:
        out(f"vision-aided: {args.va_model} {sum(p.numel() for p in va.parameters()) / 1e6:.1f}M frozen params, "
            f"{f['F_va'] / 1e9:.1f} GFLOPs at 224 px; head {n_va / 1e6:.2f}M (in D)")
    out(f"train GFLOPs per sample per iteration (App. A.2, 4F_G + 10.5F_D{' + 5F_va' if va else ''}): "
        f"{f['train'] / 1e9:.1f}")
    if args.model in PAPER_STEPS:
        steps = PAPER_STEPS[args.model] if info['kind'] == 'latent' else 100_000    # App. A.3: B/2, 40 epochs
        flop = 2 * f['train'] * 512 * steps                 # 2 FLOPs per multiply-add
        hours = flop / (8 * 0.4 * PEAK_BF16_TFLOPS['H100'] * 1e12) / 3600
        out(f"paper schedule: {steps} iterations x batch 512 = {flop / 1e18:.0f} EFLOP; at 40% MFU on 8 H100 "
            f"(989 TFLOP/s bf16 dense) {hours:.1f} h (model FLOPs only: data loading, DINOv2 and EMA excluded)")
    try:
        r = memory_estimate(args) if memory else None
    except Exception as e:                          # one line, never a traceback
        r = out(f"memory per GPU: the estimate failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})")
    if r:
        g = {k: f'{v / 2**30:.2f}' for k, v in dict(r, world=r['peak'] + r['ddp']).items()}      # GiB
        out(f"memory per GPU at batch {args.batch_size}/GPU{f' (micro {args.micro_batch})' if args.micro_batch else ''}"
            f", {args.precision}, grad-ckpt {('off', 'on')[args.grad_ckpt]}: peak {g['peak']} GiB; world > 1: "
            f"{g['world']} GiB\n  = G, D params+buffers {g['params']} + EMA {g['ema']} + frozen DINOv2/ConvNeXt "
            f"{g['frozen']} + AdamW {g['opt']} + gradients at the peak {g['grads']} + activations and temporaries "
            f"{g['act']} GiB (world > 1: + DDP buckets {g['ddp']})\n  an estimate: train_step on fake tensors on the "
            f"CPU, CUDA's flash attention and fused rms_norm modelled; check on a GPU: torch.cuda.max_memory_allocated "
            "(--bench prints it)")
    return dict(G_params=n_g, D_params=n_d, proj_params=n_proj, memory=r, **f)
def names(args, D):
    """'G-B/2 + D-B/2' (patch sizes after the slash; App. A.3: 'G-B/16 + D-B/8,16')."""
    return (f"G-{args.model}/{args.patch or 2} + D-{args.model_d or D_FOR_G[args.model]}/"
            f"{','.join(map(str, sorted(set(D.patches))))}")

class CudaRMSNorm(torch.autograd.Function):
    """rms_norm's memory on CUDA, for memory_estimate (values never read): fused, in fp32 under autocast (the CPU's: in
    bf16), saving its input and an fp32 rstd. Attention needs no stand-in: CPU's flash kernel saves what CUDA's do."""
    @staticmethod
    def forward(ctx, x, w, n):
        ctx.save_for_backward(x, x.new_empty((*x.shape[:x.dim() - n], *[1] * n), dtype=torch.float32), w)
        return x.new_empty(x.shape)
    @staticmethod
    def backward(ctx, g):
        x, _, w = ctx.saved_tensors
        return x.new_empty(x.shape), w.new_empty(w.shape) if ctx.needs_input_grad[1] else None, None
    @staticmethod
    def rms_norm(x, shape, w=None, eps=None):       # for F.rms_norm
        fp32 = lambda t: t.float() if t is not None and torch.is_autocast_enabled('cpu') else t
        return CudaRMSNorm.apply(fp32(x), fp32(w), len(shape))

def memory_estimate(args):
    """Per-GPU bytes of an iteration on a CPU: train_step on fake tensors, CUDA's rms_norm, 2nd step (AdamW state)."""
    from unittest import mock
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    class Tracker(MemTracker):
        def _update_peak_stats(self, state):        # the global peak only (per-module peaks: 10x slower)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap['Total']:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap['Total'], dict(snap)
        def _track_module_params_and_buffers(self, mod, install_grad_hooks=True):     # no gradient hooks on frozen
            return super()._track_module_params_and_buffers(mod, install_grad_hooks and all(    # modules: they fail
                p.requires_grad for p in mod.parameters()))
        def _pre_fw_hook(self, mod, inputs):        # a step module again: the next micro-batch, not a new iteration
            if mod in (m.d_step, m.g_step) and not self._mod_tracker.is_bw:
                self.memory_tracking.pop(mod, None)
            super()._pre_fw_hook(mod, inputs)
    (info, g_cfg, d_cfg), b, args = synthetic(args), args.batch_size, argparse.Namespace(**{**vars(args), 'compile': 0})
    with torch.device('meta'):
        m = build(args, g_cfg, d_cfg, torch.device('meta'), 1, pretrained=False)
    nets = [n for n in (m.G, m.D, m.ema, *m.d_step._dino, *m.d_step._va) if n is not None]
    with FakeTensorMode(), mock.patch.object(F, 'rms_norm', CudaRMSNorm.rms_norm):
        for net in nets:                                                    # meta -> fake CPU tensors
            net._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype))
        m, mt = m._replace(opt_g=adamw(m.G, args, True), opt_d=adamw(m.D, args, True)), Tracker()   # as on CUDA
        C, R, lat, c = info['channels'], info['res'], info['kind'] == 'latent', torch.zeros(b, dtype=torch.long)
        x = torch.empty(b, 2 * C, R, R) if lat else torch.empty(b, C, R, R, dtype=torch.uint8)   # bench()'s batch
        img = (torch.empty(b, 3, 256, 256, dtype=torch.uint8) if lat else x) if args.lambda_repa > 0 else None
        for step in range(2):
            if step:
                mt.track_external(*nets, m.opt_g, m.opt_d, x, c, img)
                mt.__enter__()
            nz = step_noise(args.seed, step, b, m.G, m.D.scales, 'cpu')
            train_step(m, real_x(x, nz, dict(info, scale=0.18215)), c, img, nz, args)
        mt.__exit__(None, None, None)
    s = {getattr(k, 'value', k): v for k, v in next(iter(mt.get_tracker_snapshot('peak').values())).items()}
    both = lambda *ns: sum(t.nbytes for n in ns for t in [*n.parameters(), *n.buffers()])     # parameters, buffers
    r = dict(params=both(m.G, m.D), ema=both(m.ema), frozen=both(*nets[3:]), opt=s['Optstate'], grads=s['Gradient'])
    return dict(r, peak=s['Total'], act=s['Total'] - sum(r.values()), ddp=sum(p.nbytes for p in m.G.parameters()) +
                sum(p.nbytes for p in m.D.parameters()))

def bench(args, out=print):
    """Median time of --bench-steps iterations after --bench-warmup, each logged; REPA vs a random-init DINOv2-B."""
    rank, world, device = setup_ddp()
    out = out if rank == 0 else (lambda line: None)         # one report, from rank 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    info, g_cfg, d_cfg = synthetic(args)
    m = build(args, g_cfg, d_cfg, device, world, pretrained=False)
    b, g, C, R = args.batch_size // world, torch.Generator(device).manual_seed(0), info['channels'], info['res']
    batch = (torch.cat([torch.randn(b, C, R, R, generator=g, device=device),
                        torch.rand(b, C, R, R, generator=g, device=device)], 1) if info['kind'] == 'latent' else
             torch.randint(0, 256, (b, C, R, R), generator=g, device=device, dtype=torch.uint8))
    c = torch.randint(0, 1000, (b,), generator=g, device=device)
    img = ((torch.randint(0, 256, (b, 3, 256, 256), generator=g, device=device, dtype=torch.uint8)
            if info['kind'] == 'latent' else batch) if args.lambda_repa > 0 else None)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    out(f"bench {name}: {names(args, m.D)}, {info['res']}x{info['res']}x{C} {info['kind']}, batch {b}/device (micro "
        f"{m.micro}), {args.precision}, REPA {'on' if img is not None else 'off'}, vision-aided "
        f"{('off', 'on')[args.lambda_va > 0]}, compile={args.compile}, grad_ckpt={args.grad_ckpt}, d_attn={args.d_attn}"
        + ("" if device.type == 'cuda' else " (no CUDA: fp32 and no DINOv2 unless --precision / --lambda-repa)"))
    sync, times = (torch.cuda.synchronize if device.type == 'cuda' else lambda: None), []
    for step in range(args.bench_warmup + args.bench_steps):
        sync()
        t = time.perf_counter()
        nz = take(step_noise(0, step, args.batch_size, m.G, m.D.scales, device), rank * b, (rank + 1) * b)
        train_step(m, real_x(batch, nz, dict(info, scale=0.18215)), c, img, nz, args)
        sync()
        times.append(time.perf_counter() - t)
        out(f"  iteration {step + 1}: {times[-1] * 1e3:.1f} ms{' (warm-up)' if step < args.bench_warmup else ''}")
        if step == args.bench_warmup - 1 and device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
    t = float(np.median(times[args.bench_warmup:]))
    tflops = 2 * cost(args, g_cfg, d_cfg)[-1]['train'] * b / t / 1e12
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == 'cuda' else 'n/a (CPU)'
    out(f"  {t * 1e3:.1f} ms/it (median of {args.bench_steps}), {b / t:.1f} img/s/device, {tflops:.3g} TFLOP/s "
        f"(App. A.2 model FLOPs), MFU {'%.1f%%' % (100 * tflops / peak) if peak else 'n/a'}, peak memory {mem}")
    return dict(device=name, batch_per_device=b, ms_per_it=t * 1e3, img_per_s_per_device=b / t, tflops=tflops,
                mfu=tflops / peak if peak else None, peak_mem=mem)

# ==== Command line ====
def get_args(argv=None):
    p = argparse.ArgumentParser(description='CAT: Cross-scale Aligned Transformer GAN (arXiv 2605.26449)')
    p.add_argument('--model', default=None, help='G size: S, B, M, H (Table 6; default B, small data S); T: tests')
    p.add_argument('--model-d', default=None, help='D size (default: B for B/M/H, the paper); M = D-M/2 of Table 5')
    p.add_argument('--data', default=DEFAULT_DATA, help="prepared latents directory (prepare_latents.py), or 'toy'")
    p.add_argument('--out', default=None, help='run directory (default: runs/NNN-MODEL)')
    p.add_argument('--resume', nargs='?', const='auto', help='checkpoint file or run directory (default: --out)')
    p.add_argument('--steps', type=int, default=None, help='total iterations (B 50K, M 100K, H 150K in the paper)')
    p.add_argument('--batch-size', type=int, default=None, help='global batch (512)')
    p.add_argument('--micro-batch', type=int, default=None, help='per-process micro-batch; gradients accumulate above')
    p.add_argument('--lr', type=float, default=None, help='AdamW lr of G and D (2e-4; small data 2e-3)')
    p.add_argument('--lambda-cons', type=float, default=0.1, help='L_cons weight (Eq. 3); 0: plain scale-wise loss')
    p.add_argument('--cons-detach', action='store_true', help='stop-gradient on the anchor h_K of Eq. 2')
    p.add_argument('--lambda-repa', type=float, default=None, help='REPA weight (1.0); 0 disables REPA and DINOv2')
    p.add_argument('--lambda-va', type=float, default=0.0, help='vision-aided loss weight (App. A.3), pixels; 0: off')
    p.add_argument('--va-model', default=VA_NAME, help='timm name of the frozen ConvNeXt-V2 of the vision-aided loss')
    p.add_argument('--gamma', type=float, default=None, help='R1 and R2 weight, gamma/2 each (1; small data 0.1)')
    p.add_argument('--gp-sigma', type=float, default=0.01, help='perturbation scale of the approximated R1/R2')
    p.add_argument('--gp-precision', choices=['bf16', 'fp32'], default='bf16',
                   help='bf16: perturbed quarter in the main autocast pass (App. A.2 cost); fp32: its own fp32 pass')
    p.add_argument('--no-mask', action='store_true', help='scale-aggregated D: attention across scales (Fig. 9)')
    ints = lambda text: [int(v) for v in text.split(',')]
    p.add_argument('--scales', type=ints, help='resolutions of x_0..x_K, e.g. 16,32,64,256 (default R/8,R/4,R/2,R)')
    p.add_argument('--patch', type=int, help="G's patch size (2; App. A.3 at 256 px: 16)")
    p.add_argument('--d-patch', type=ints, help="D's patch size per scale, e.g. 8,8,8,16 (default: G's patch)")
    p.add_argument('--aug', action=argparse.BooleanOptionalAction, help='DiffAugment (on; small data off)')
    p.add_argument('--ema-decay', type=float, default=None, help='EMA of G (0.999; small data 0.99)')
    p.add_argument('--clip', type=float, default=1.0, help='gradient clipping norm')
    p.add_argument('--precision', choices=['bf16', 'fp32'], default=None, help='autocast dtype (bf16; no CUDA: fp32)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers per process (8; no CUDA: 0)')
    p.add_argument('--vae', default=None, help='VAE for sample grids (default: the one named in the dataset meta)')
    p.add_argument('--log-every', type=int, default=None)
    p.add_argument('--eval-every', type=int, default=None, help='EMA sample grid + cross-scale metrics (+ toy metrics)')
    p.add_argument('--eval-n', type=int, default=None, help='samples per evaluation (1000)')
    p.add_argument('--ckpt-every', type=int, default=None, help='periodic checkpoint interval (kept: --keep newest)')
    p.add_argument('--latest-every', type=int, default=None, help='latest.pt refresh interval')
    p.add_argument('--keep', type=int, default=3, help='periodic checkpoints kept (besides latest.pt and milestones)')
    p.add_argument('--milestone-every', type=int, default=50_000, help='checkpoints at multiples are never deleted')
    p.add_argument('--toy-n', type=int, default=20000, help='toy training set size')
    p.add_argument('--toy-res', type=int, default=16, help='toy image resolution')
    p.add_argument('--summary', action='store_true', help='print params, GFLOPs, GPU memory of --model; exit (no GPU)')
    p.add_argument('--bench', action='store_true', help='time training iterations on synthetic latents and exit')
    p.add_argument('--bench-steps', type=int, default=10)
    p.add_argument('--bench-warmup', type=int, default=3)
    p.add_argument('--peak-tflops', type=float, default=None, help='device peak for MFU (default: known GPUs)')
    p.add_argument('--compile', action='store_true', help='torch.compile every G and D block')
    p.add_argument('--grad-ckpt', action='store_true', help='activation checkpointing per block (memory for compute)')
    p.add_argument('--d-attn', choices=['split', 'mask'], default='split',
                   help="block-diagonal attention: one fused call per scale, or one call with an explicit mask")
    args = p.parse_args(argv)
    toy, cuda = args.data == 'toy', torch.cuda.is_available()
    small = toy or is_small_data(args.data)
    args.model = args.model or ('S' if small else 'B')     # small data: a small config, minutes on a CPU
    if args.model not in G_CONFIGS or (args.model_d or 'B') not in D_CONFIGS:
        p.error(f"unknown --model {args.model} / --model-d {args.model_d}: G: {list(G_CONFIGS)}, D: {list(D_CONFIGS)}")
    args.repa_given = args.lambda_repa is not None
    # Small data (toy, pixels <= 64 px), minutes on a CPU (docs/small-data.md): batch 16 (beat 64, 32, 8, 4 per minute),
    # lr 2e-3 (GAT: lr x 768 / width = 2.4e-3 at 64), EMA 0.99 (0.995, 0.998 lag), no DiffAugment, gamma 0.1 (else a
    # 64-wide D can't tell real from fake at 16 px), no REPA. No CUDA: fp32 (bf16 autocast is slow on CPUs), no workers.
    defaults = dict(steps=TOY_STEPS if toy else SMALL_STEPS if small else 50_000,
                    batch_size=64 if args.bench or args.summary else 16 if small else 512,
                    lambda_repa=0.0 if small or (args.bench and not cuda) else 1.0, lr=2e-3 if small else 2e-4,
                    ema_decay=0.99 if small else 0.999, aug=not small, gamma=0.1 if small else 1.0, eval_n=1000,
                    precision='bf16' if cuda or args.summary else 'fp32', workers=8 if cuda else 0)
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    # Cadence: the toy's; else by run length (10 evals, 5 checkpoints) capped at Table 6's, so short runs show progress.
    cap = lambda most, div: min(most, max(1, args.steps // div))         # a share of the run, at most `most`
    cadence = (dict(log_every=50, eval_every=TOY_STEPS // 4, ckpt_every=1000, latest_every=500) if toy else dict(
        log_every=cap(100, 100), eval_every=cap(5000, 10), ckpt_every=cap(10_000, 5), latest_every=cap(1000, 20)))
    vars(args).update({k: v for k, v in cadence.items() if getattr(args, k) is None})
    if toy and args.lambda_repa > 0:
        p.error('--lambda-repa needs ImageNet images: the toy set has no DINOv2 targets; use --lambda-repa 0')
    return args
def main(argv=None):
    args = get_args(argv)
    (summary if args.summary else bench if args.bench else train)(args)
if __name__ == '__main__':
    main()
