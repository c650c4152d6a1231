"""CAT test suite: CPU only, tiny configs, a few minutes on 2 cores.  Run: pytest test_cat.py"""
import argparse
import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bench
import cat
import fid
import prepare_latents
import sample
from cat import make_toy

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
# Stand-ins replace every downloaded weight, so the hub is offline for the tests and the processes they start: a
# missing download then fails at once, not after huggingface_hub's retries (~30 s each). huggingface_hub reads this
# when it is first imported, which none of the imports above does.
os.environ.setdefault('HF_HUB_OFFLINE', '1')


@pytest.fixture(autouse=True)
def quick_judges(monkeypatch):
    """Judges trained for 40 steps (the runs: 300), without the toy's accuracy floor: the tests check that evaluation
    runs and what it reports; the tests that need a well-trained judge train their own or raise the steps."""
    monkeypatch.setattr(fid, 'JUDGE_STEPS', 40)
    monkeypatch.setattr(fid, 'JUDGE_MIN_ACC', 0.0)


def tiny_D(mask=True, attn_impl='split', res=16, channels=3, num_classes=10, repa_dim=0, depth=2, width=32):
    torch.manual_seed(0)
    return cat.Discriminator(depth=depth, width=width, heads=2, channels=channels, res=res, num_classes=num_classes,
                             cmap_dim=64, repa_dim=repa_dim, mask=mask, attn_impl=attn_impl).eval()


def tiny_G(res=16, channels=3, num_classes=10):
    torch.manual_seed(0)
    return cat.Generator(depth=4, width=32, heads=2, channels=channels, res=res, num_classes=num_classes)


def rand_scales(B=3, C=3, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, s, s, generator=g) for s in cat.table6_scales(res)]


# ----------------------------------------------------------------------------------------------
# Table 6 / Table 2: params and GFLOPs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('model,g_params,g_gflops', [('B', 133e6, None), ('M', 261e6, 46.0), ('H', 960e6, 167.0)])
def test_summary_matches_table6(model, g_params, g_gflops):
    lines = []
    s = bench.summary(bench.get_args(['--model', model]), out=lines.append, memory=False)
    assert abs(s['G_params'] / g_params - 1) < 0.01, lines
    assert abs(s['D_params'] / 96e6 - 1) < 0.02, lines
    if g_gflops:
        assert abs(s['F_G'] / 1e9 / g_gflops - 1) < 0.03, lines
    assert any(l.startswith('G params: ') for l in lines) and any('4F_G + 10.5F_D' in l for l in lines)


def test_summary_cli_runs_in_seconds_and_prints_the_memory_line():
    out = subprocess.run([sys.executable, 'bench.py', '--model', 'H', '--no-memory'], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'G params: 959.4M' in out.stdout and 'G GFLOPs: 166.' in out.stdout and 'memory' not in out.stdout
    lines = []
    bench.summary(bench.get_args(['--data', 'toy', '--batch-size', '4']), out=lines.append)   # H's takes 20 s
    assert re.search(r'^memory per GPU at batch 4/GPU, bf16, grad-ckpt off: peak \d+\.\d\d GiB; world > 1: ',
                     '\n'.join(lines), re.M) and 'fake tensors' in lines[-1], lines


def toy_memory_args(batch, precision='fp32'):
    return bench.get_args(['--data', 'toy', '--batch-size', str(batch), '--precision', precision])


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_memory_estimate_equals_real_cpu_tensors(precision, monkeypatch):
    """The fake-tensor trace allocates what real tensors do: the peak of the same 2nd train_step on real CPU tensors
    under a plain MemTracker, with the same stand-in for CUDA's rms_norm."""
    from torch.distributed._tools.mem_tracker import MemTracker
    args = toy_memory_args(4, precision)
    est = bench.memory_estimate(args)
    monkeypatch.setattr(F, 'rms_norm', bench.CudaRMSNorm.rms_norm)
    info, g_cfg, d_cfg = bench.imagenet_shapes(args)
    m = cat.build(args, g_cfg, d_cfg, torch.device('cpu'), 1)
    m = m._replace(opt_g=cat.adamw(m.G, args, True), opt_d=cat.adamw(m.D, args, True))
    x, c = torch.cat([torch.randn(4, 4, 32, 32), torch.rand(4, 4, 32, 32)], 1), torch.randint(0, 1000, (4,))
    mt, threads = MemTracker(), torch.get_num_threads()
    torch.set_num_threads(1)                    # many small ops: 2 threads on a busy 2-core machine take 8x longer
    try:
        for step in range(2):
            if step:
                mt.track_external(m.G, m.D, m.ema, m.opt_g, m.opt_d, x, c)
                mt.__enter__()
            noise, aug = cat.step_noise(0, step, 4, m.G, m.D.scales, 'cpu')
            x_model = cat.data_x(x, noise['posterior_eps'], dict(info, scale=0.18215))
            cat.train_step(m, x_model, c, None, noise, aug, args)
        mt.__exit__(None, None, None)
    finally:
        torch.set_num_threads(threads)
    peak = mt.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']
    assert abs(est['peak'] / peak - 1) < 0.01, (est, peak)
    assert est['act'] > 10 * est['params'], est                 # toy-sized nets: activations dominate


def test_memory_estimate_counts_weights_and_adamw_state_exactly():
    args = toy_memory_args(4, 'bf16')
    est = bench.memory_estimate(args)
    m = cat.build(args, *bench.imagenet_shapes(args)[1:], torch.device('cpu'), 1)
    nbytes = lambda *nets: sum(t.nbytes for n in nets for t in [*n.parameters(), *n.buffers()])
    assert est['params'] == nbytes(m.G, m.D) and est['ema'] == nbytes(m.ema) and est['frozen'] == 0, est
    n_tensors = len([*m.G.parameters(), *m.D.parameters()])      # exp_avg, exp_avg_sq and an fp32 step per tensor
    assert est['opt'] == 2 * est['ddp'] + 4 * n_tensors, est
    assert est['ddp'] == sum(p.nbytes for p in [*m.G.parameters(), *m.D.parameters()])


def test_memory_estimate_activations_scale_with_the_batch():
    """Twice the batch, twice the activations (batches of multiples of 4: R1/R2 take every 4th sample)."""
    small, large = (bench.memory_estimate(toy_memory_args(b, 'bf16')) for b in (4, 8))
    assert abs(large['act'] / small['act'] - 2) < 0.2, (small, large)
    assert large['params'] == small['params'] and large['opt'] == small['opt']


def test_failed_memory_estimate_is_one_line(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError('no kernel\nsecond line')
    monkeypatch.setattr(cat, 'train_step', boom)
    lines = []
    s = bench.summary(toy_memory_args(4), out=lines.append)
    assert lines[-1] == 'memory per GPU: the estimate failed (RuntimeError: no kernel)' and s['memory'] is None


# ----------------------------------------------------------------------------------------------
# Scale-wise discriminator
# ----------------------------------------------------------------------------------------------

def test_d_k_depends_only_on_x_k():
    D = tiny_D()
    xs, c = rand_scales(), torch.tensor([1, 2, 3])
    d0 = D(xs, c)
    for j in range(4):
        xs2 = [x.clone() for x in xs]
        xs2[j] = xs2[j] + torch.randn_like(xs2[j])
        d = D(xs2, c)
        for k in range(4):
            if k == j:
                assert (d[:, k] - d0[:, k]).abs().max() > 1e-4
            else:
                assert torch.allclose(d[:, k], d0[:, k], atol=1e-5), (j, k)


def test_no_mask_mixes_scales():
    D = tiny_D(mask=False)
    xs, c = rand_scales(), torch.tensor([1, 2, 3])
    d0 = D(xs, c)
    xs[3] = xs[3] + torch.randn_like(xs[3])
    d = D(xs, c)
    assert all((d[:, k] - d0[:, k]).abs().max() > 1e-5 for k in range(3))


def test_split_attention_equals_explicit_mask():
    a, b = tiny_D(attn_impl='split'), tiny_D(attn_impl='mask')
    b.load_state_dict(a.state_dict())
    xs, c = rand_scales(), torch.tensor([0, 5, 9])
    assert torch.allclose(a(xs, c), b(xs, c), atol=1e-5)
    m = a.block_mask()
    assert m.shape == (4 + 1 + 4 + 16 + 64,) * 2 and m.sum() == sum((e - s) ** 2 for s, e in a.segments)


def test_d_token_layout_latent():
    D = cat.Discriminator(depth=1, width=32, heads=2, channels=4, res=32, num_classes=5, cmap_dim=16, repa_dim=8)
    assert D.segments[-1][1] == 4 + 4 + 16 + 64 + 256              # 344 tokens, as DESIGN / Table 6
    d, tok = D(cat.multiscale(torch.randn(2, 4, 32, 32), D.scales), torch.tensor([0, 1]), return_tokens=True)
    assert d.shape == (2, 4) and tok.shape == (2, 257, 32) and D.proj(tok).shape == (2, 257, 8)


def test_d_k_depends_only_on_x_k_for_a_nonuniform_hierarchy():
    """App. A.3's shape at 64 px: scales 4, 8, 16, 64 with D patches 2, 2, 2, 4 (grids 2, 4, 8, 16): d_k still sees x_k
    alone; the per-scale attention calls equal one call with the block mask; --no-mask mixes the scales."""
    scales, patches = [4, 8, 16, 64], [2, 2, 2, 4]
    make = lambda **kw: cat.Discriminator(depth=2, width=32, heads=2, channels=3, res=64, num_classes=10, cmap_dim=64,
                                          repa_dim=0, scales=scales, patch=patches, **kw)
    torch.manual_seed(0)
    D = make().eval()
    assert D.grids == [2, 4, 8, 16] and D.segments[-1][1] == 4 + 4 + 16 + 64 + 256
    assert {n for n, _ in D.named_parameters() if n.startswith('patch_embed')} == {
        'patch_embed.weight', 'patch_embed.bias', 'patch_embed_4.weight', 'patch_embed_4.bias'}
    g, c = torch.Generator().manual_seed(1), torch.tensor([1, 2])
    xs = [torch.randn(2, 3, s, s, generator=g) for s in scales]
    with torch.no_grad():
        d0 = D(xs, c)
        for j in range(4):
            d = D([x + (k == j) * torch.randn(x.shape, generator=g) for k, x in enumerate(xs)], c)
            assert all(((d[:, k] - d0[:, k]).abs().max() > 1e-5) == (k == j) for k in range(4))
        D.attn_impl = 'mask'
        assert torch.allclose(D(xs, c), d0, atol=1e-5)
    torch.manual_seed(0)
    Dn = make(mask=False).eval()
    with torch.no_grad():
        d = Dn([xs[0] + 1, *xs[1:]], c) - Dn(xs, c)
    assert (d.abs() > 1e-5).all()


def test_default_hierarchy_is_unchanged():
    """Table 6's hierarchy exactly as before --scales existed: r_k is 2^(K-k) area pooling, w = (1/3, 1/2, 1), output
    layers 3, 6, 9, 12 / 6, 12, 18, 24 / 8, 16, 24, 32, configs without new keys, and the numbers the code gave before
    (a forward pass and three training steps with DiffAugment, recorded from the previous release)."""
    h = torch.randn(2, 4, 32, 32)
    assert all(torch.equal(x, F.avg_pool2d(h, 2 ** (3 - k)) if k < 3 else h)
               for k, x in enumerate(cat.multiscale(h, cat.table6_scales(32))))
    assert cat.w_cons(3) == [1 / 3, 1 / 2, 1.0] and cat.table6_scales(32) == [4, 8, 16, 32]
    for m, layers in (('B', [3, 6, 9, 12]), ('M', [6, 12, 18, 24]), ('H', [8, 16, 24, 32])):
        with torch.device('meta'):
            assert cat.Generator(*cat.G_CONFIGS[m][:3]).out_layers == layers
    g_cfg, d_cfg = cat.model_configs(cat.get_args(['--data', 'toy']),
                                     dict(kind='toy', channels=3, res=16, num_classes=10))
    assert set(g_cfg) == {'depth', 'width', 'heads', 'channels', 'res', 'num_classes'}
    assert set(d_cfg) == {'depth', 'width', 'heads', 'cmap_dim', 'repa_dim', 'mask', 'channels', 'res', 'num_classes'}
    torch.manual_seed(0)
    G = cat.Generator(4, 32, 2, channels=3, res=16, num_classes=10)
    D = cat.Discriminator(2, 32, 2, channels=3, res=16, num_classes=10, cmap_dim=64, repa_dim=0)
    z, c = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3])
    with torch.no_grad():
        hs = G(z, c)
        d = D(cat.multiscale(hs, D.scales), c)
    assert np.allclose([h.double().sum().item() for h in hs], [-196.827251, 723.733387, 1076.341381, 2424.589006],
                       rtol=1e-5)
    assert np.allclose(d.flatten().tolist(), [0.019005, -0.033235, -0.081942, -0.101611, -0.090239, -0.002832,
                                              -0.064625, 0.1228, 0.016285, 0.073263, 0.021431, 0.022376], atol=2e-6)
    r = cat.train(cat.get_args(TINY + ['--steps', '3', '--aug', '--out', os.path.join(tempfile.mkdtemp(), 'r')]))
    got = [sum(p.double().sum().item() for p in r['G'].parameters()), sum(p.double().sum().item()
           for p in r['D'].parameters()), sum(p.double().abs().sum().item() for p in r['ema'].parameters())]
    assert np.allclose(got, [-583.042712, -1226.753038, 60520.018035], rtol=1e-5), got


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------

def test_generator_outputs_and_accumulation():
    G = tiny_G()
    hs = G(torch.randn(5, G.z_dim), torch.arange(5))
    assert len(hs) == 4 and all(h.shape == (5, 3, 16, 16) for h in hs)
    assert G.out_layers == [1, 2, 3, 4]
    # h_k = o_0 + ... + o_k: recompute the heads by hand
    w = G.style(torch.randn(2, G.z_dim), torch.tensor([1, 2]))
    x = G.pos.expand(2, -1, -1)
    rope, o = (G.rope_cos, G.rope_sin), []
    for blk, head in zip(G.blocks, G.out_heads):
        x = blk(x, w, rope)
        o.append(head(x, w))
    hs = G.synthesis(w)
    for k in range(4):
        assert torch.allclose(hs[k], sum(o[:k + 1]), atol=1e-6)


def test_truncation():
    G = tiny_G()
    G.w_avg.normal_()
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 1, 7])
    w = G.style(z, c)
    assert torch.equal(G.truncate(w, c, 1.0), w)
    assert torch.allclose(G.truncate(w, c, 0.0), G.w_avg[c])
    assert torch.allclose(G.truncate(w, c, 0.5), (w + G.w_avg[c]) / 2, atol=1e-6)
    assert torch.allclose(G(z, c, psi=0.0)[-1][1], G(z, c, psi=0.0)[-1][2])  # same class, psi 0: same image


def test_w_avg_update():
    G = tiny_G()
    w, c = torch.randn(4, 32), torch.tensor([3, 3, 5, 3])
    G.update_w_avg(w, c)
    b = G.w_avg_beta
    assert torch.allclose(G.w_avg[3], (1 - b) * w[[0, 1, 3]].mean(0), atol=1e-7)
    assert torch.allclose(G.w_avg[5], (1 - b) * w[2], atol=1e-7)
    assert G.w_avg[[0, 1, 2, 4, 6]].abs().sum() == 0


def test_ema_update():
    G = tiny_G()
    ema = cat.copy.deepcopy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G.w_avg.fill_(3.0)
    before = [p.clone() for p in ema.parameters()]
    cat.ema_update(ema, G, 0.9)
    for pe, p0, p in zip(ema.parameters(), before, G.parameters()):
        assert torch.allclose(pe, 0.9 * p0 + 0.1 * p, atol=1e-6)
    assert torch.equal(ema.w_avg, G.w_avg)


@pytest.mark.parametrize('fan_in', [128, 2048])
def test_equal_linear_adam_step_is_lr_times_lr_mul(fan_in):
    """GAT's equalized lr: the used weight starts as a xavier-uniform one, and one AdamW step (betas as training) moves
    it by lr * 0.01 per element whatever the fan-in (StyleGAN2's form would move it sqrt(fan_in) times less)."""
    torch.manual_seed(0)
    layer = cat.EqualLinear(fan_in, 64)
    used = lambda: (layer.weight * layer.lr_mul).detach().clone()
    w0, bound = used(), math.sqrt(6 / (fan_in + 64))
    assert w0.abs().max() <= bound and w0.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.0)
    (layer(torch.randn(16, fan_in)) * torch.randn(16, 64)).sum().backward()
    opt.step()
    assert (used() - w0).abs().median().item() == pytest.approx(1e-3 * 0.01, rel=0.01)


def test_class_embedding_inits_as_gat():
    torch.manual_seed(0)
    G = cat.Generator(depth=4, width=32, heads=2, channels=3, res=16, num_classes=1000)
    D = cat.Discriminator(depth=1, width=32, heads=2, channels=3, res=16, num_classes=1000, cmap_dim=64, repa_dim=0)
    assert G.class_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert D.class_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_d_class_projection_by_hand():
    """d_k = <Linear(RMSNorm(cls_k)), e(c)>, e(c) = EqualLinear(SiLU(EqualLinear(embed[c]))) on the raw embedding
    (GAT's LabelEmbedder: no second-moment normalization, so the embedding's scale matters)."""
    D = tiny_D()
    with torch.no_grad():
        for p in D.class_map.parameters():
            p.normal_()
    xs, c, seen = rand_scales(), torch.tensor([1, 2, 3]), {}
    D.norm.register_forward_hook(lambda mod, inp, out: seen.update(cls=out))
    d = D(xs, c)
    (W1, b1), (W2, b2) = [(m.weight * 0.01, m.bias * 0.01) for m in (D.class_map[0], D.class_map[2])]
    e = F.silu(D.class_embed.weight[c] @ W1.T + b1) @ W2.T + b2
    assert torch.allclose(d, ((seen['cls'] @ D.head.weight.T + D.head.bias) * e[:, None]).sum(-1), atol=1e-5)
    with torch.no_grad():
        D.class_embed.weight[2] *= 3
    d3 = D(xs, c)
    assert torch.allclose(d3[[0, 2]], d[[0, 2]]) and (d3[1] - d[1]).abs().min() > 1e-4


# ----------------------------------------------------------------------------------------------
# Objectives against hand computation
# ----------------------------------------------------------------------------------------------

def test_rpgan_losses_by_hand():
    dr, df = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, 3.0], [1.0, -1.0]])
    sp = lambda t: math.log1p(math.exp(t))
    want_d = (sp(-(1 - 0.5)) + sp(-(2 - 3)) + sp(-(0 - 1)) + sp(0)) / 4
    want_g = (sp(-(0.5 - 1)) + sp(-(3 - 2)) + sp(-(1 - 0)) + sp(0)) / 4
    assert math.isclose(cat.rpgan_d_loss(dr, df).item(), want_d, rel_tol=1e-6)
    assert math.isclose(cat.rpgan_g_loss(df, dr).item(), want_g, rel_tol=1e-6)
    dr.requires_grad_(True)
    cat.rpgan_g_loss(df, dr).backward() if df.requires_grad else None
    assert dr.grad is None


def test_consistency_loss_by_hand():
    hs = [torch.full((1, 1, 2, 2), v) for v in (0.0, 1.0, 2.0, 4.0)]
    want = ((4 - 0) ** 2 / 3 + (4 - 1) ** 2 / 2 + (4 - 2) ** 2 * 1) / 3
    assert math.isclose(cat.consistency_loss(hs).item(), want, rel_tol=1e-6)
    hs = [h.requires_grad_(True) for h in hs]
    cat.consistency_loss(hs).backward()
    assert hs[3].grad.abs().sum() > 0                                    # Eq. 2: no stop-gradient on h_K
    hs2 = [h.detach().requires_grad_(True) for h in hs]
    cat.consistency_loss(hs2, detach_anchor=True).backward()
    assert hs2[3].grad is None and hs2[0].grad.abs().sum() > 0


def test_approx_gp_by_hand():
    d, dp = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.01, 1.98]])
    assert math.isclose(cat.approx_gp(d, dp, 0.01).item(), (1 + 4) / 2, rel_tol=1e-4)


def test_approx_r1_matches_exact_r1_fp32():
    """E_eps ((d(x) - d(x + s eps)) / s)^2 = ||grad_x d||^2 + O(s): per scale k, ||grad_{x_k} d_k||^2."""
    D = tiny_D().double()
    xs, c = [x.double() for x in rand_scales(B=8)], torch.arange(8)
    xs = [x.requires_grad_(True) for x in xs]
    d = D(xs, c)
    exact = 0.0
    for k in range(4):
        g = torch.autograd.grad(d[:, k].sum(), xs[k], retain_graph=True)[0]
        exact += g.flatten(1).square().sum(1).mean().item() / 4
    D = D.float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        xf = [x.detach().float() for x in xs]
        d0 = D(xf, c)
        perturbed = lambda: D([x + 0.01 * torch.randn(x.shape, generator=g) for x in xf], c)
        approx = np.mean([cat.approx_gp(d0, perturbed(), 0.01).item() for _ in range(64)])
    assert abs(approx / exact - 1) < 0.25, (approx, exact)


def mbstd_D(size=4):
    """tiny_D with --mbstd's head drawn at random (it starts at zero)."""
    torch.manual_seed(0)
    D = cat.Discriminator(2, 32, 2, channels=3, res=16, num_classes=10, cmap_dim=64, repa_dim=0, mbstd=size).eval()
    with torch.no_grad():
        D.mbstd_head.normal_(0, 1.0)
    return D


def test_mbstd_starts_as_gat_and_sees_its_group():
    """At init --mbstd's D is GAT's D; trained, sample 0's logit moves with its group-mate 4 (groups i mod n/4),
    not with sample 1 of another group; without it no sample's logit depends on another's."""
    xs, c = rand_scales(B=16), torch.arange(16) % 10
    torch.manual_seed(0)
    D_zero = cat.Discriminator(2, 32, 2, channels=3, res=16, num_classes=10, cmap_dim=64, repa_dim=0, mbstd=4)
    assert torch.equal(D_zero.eval()(xs, c), tiny_D()(xs, c))
    for D, depends in ((mbstd_D(), True), (tiny_D(), False)):
        d = D(xs, c)
        for other, same_group in ((4, True), (1, False)):
            moved = [x.clone() for x in xs]
            for x in moved:
                x[other] = torch.randn_like(x[other])
            change = (D(moved, c)[0] - d[0]).abs().max().item()
            assert (change > 1e-3) == (depends and same_group), (depends, other, change)


@pytest.mark.parametrize('gp_precision', ['bf16', 'fp32'])
def test_mbstd_groups_keep_the_penalty_a_finite_difference(monkeypatch, gp_precision):
    """R1/R2 perturb every 4th sample in a part of their own: with StyleGAN's grouping (i, i + n/g, ...) that quarter
    is a group of the clean batch, so a zero perturbation gives R1 = R2 = 0; consecutive groups would not."""
    D = mbstd_D()
    xr, xf = rand_scales(B=16, seed=1), rand_scales(B=16, seed=2)
    zeros = [torch.zeros_like(x) for x in xr]
    c = torch.arange(16) % 10
    args = argparse.Namespace(gp_sigma=0.01, gp_precision=gp_precision, precision='fp32')
    with torch.no_grad():
        _, _, _, r1, r2 = cat.d_logits_and_penalties(D, xr, xf, c, zeros, zeros, args)
    assert r1.item() < 1e-6 and r2.item() < 1e-6, (r1, r2)

    def consecutive(x, size, parts=None):
        return torch.cat([(p.reshape(-1, size, *p.shape[1:]).var(1, unbiased=False) + 1e-8).sqrt()
                          .repeat_interleave(size, 0) for p in x.split(parts or [len(x)])])

    monkeypatch.setattr(cat, 'group_std', consecutive)
    with torch.no_grad():
        _, _, _, r1, r2 = cat.d_logits_and_penalties(D, xr, xf, c, zeros, zeros, args)
    if gp_precision == 'bf16':              # the fp32 path compares the quarter with itself: any grouping holds
        assert r1.item() > 1e-2 and r2.item() > 1e-2, (r1, r2)


def test_mbstd_group_must_divide_the_quarter(tmp_path):
    with pytest.raises(SystemExit, match='--mbstd 3 must divide'):
        run_cat(TINY + ['--steps', '1', '--mbstd', '3', '--out', str(tmp_path / 'r')])
    run = run_cat(TINY + ['--steps', '2', '--mbstd', '2', '--out', str(tmp_path / 'ok')])
    ck = cat.load_checkpoint(os.path.join(run, 'latest.pt'))
    assert ck['config']['D']['mbstd'] == 2 and ck['D']['mbstd_head'].abs().sum() > 0


def test_full_fp32_turns_tf32_off_and_restores():
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    old = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with pytest.raises(ZeroDivisionError), cat.full_fp32():
            assert [f.allow_tf32 for f in flags] == [False, False]
            1 / 0
        assert [f.allow_tf32 for f in flags] == [True, True]
    finally:
        for f, o in zip(flags, old):
            f.allow_tf32 = o


def test_d_logit_is_fp32_under_bf16_autocast():
    D = tiny_D()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        d = D(rand_scales(), torch.tensor([1, 2, 3]))
    assert d.dtype == torch.float32


def test_fp32_penalty_estimates_exact_r1_of_a_trained_d(tmp_path):
    """The trained regime: after a few dozen penalized D steps (bf16 autocast, gamma 1, fp32 penalty path), the fp32
    approximated R1/R2 stays an estimate of the exact penalty (within 50 %) and its parameter gradient points the same
    way (cosine > 0.8); --gp-check measures both paths."""
    run = run_cat(TINY + ['--steps', '40', '--precision', 'bf16', '--gp-precision', 'fp32',
                          '--out', str(tmp_path / 'r')])
    res = sample.gp_check(os.path.join(run, 'latest.pt'), n=32, draws=12)      # 12 draws: ratios 0.98 / 1.06
    for name in ('R1', 'R2'):
        assert 0.5 < res[name]['fp32']['ratio'] < 1.5 and res[name]['fp32']['cos'] > 0.8, res
        assert res[name]['bf16']['ratio'] > res[name]['fp32']['ratio'], res     # the bf16 path reads high


def test_repa_loss_by_hand():
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    cls, patch = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 1.0], [-1.0, -1.0]]])
    assert math.isclose(cat.repa_loss(t, cls, patch).item(), 0 + (0 + 2) / 2, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# Augmentation and resizing
# ----------------------------------------------------------------------------------------------

def test_r_k_is_area_downsampling():
    h = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 1, 8, 8)          # 32 x 32
    xs = cat.multiscale(h, cat.table6_scales(32))
    assert [x.shape[-1] for x in xs] == [4, 8, 16, 32]
    assert torch.allclose(xs[0].mean(), h.mean()) and torch.equal(xs[3], h)


def _aug(n, **fixed):
    """Parameters for n samples with nothing happening, then the given ones."""
    a = dict(color=torch.zeros(n, dtype=torch.bool), bright=torch.zeros(n), sat=torch.ones(n), contrast=torch.ones(n),
             shift=torch.zeros(n, 2, dtype=torch.long), cut=torch.full((n, 2), -100),
             flip=torch.zeros(n, dtype=torch.bool))
    return {**a, **fixed}


def test_augment_translation_flip_and_shared_params():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = cat.augment(x, _aug(1, shift=torch.tensor([[1, 0]])))
    assert torch.equal(y[0, 0, 1:], x[0, 0, :-1]) and y[0, 0, 0].abs().sum() == 0   # shifted down one row, zero fill
    assert torch.equal(cat.augment(x, _aug(1, shift=torch.tensor([[1, 0]]), flip=torch.tensor([True]))), y.flip(-1))
    g = torch.Generator().manual_seed(0)
    a = cat.draw_aug(64, 16, g, 'cpu')
    hs = torch.randn(64, 2, 16, 16)
    stacked = cat.augment(torch.cat([hs, hs]), a)                       # two stages, same parameters per sample
    assert torch.equal(stacked[:64], stacked[64:]) and not torch.equal(stacked[:64], hs)


def test_augment_colour_as_gat():
    """GAT's rand_brightness_saturation_contrast: both means are taken before the brightness shift; only samples with
    the colour flag change."""
    x = torch.rand(2, 3, 8, 8)
    y = cat.augment(x, _aug(2, color=torch.tensor([True, False]), bright=torch.full((2,), 0.3),
                            sat=torch.full((2,), 1.5), contrast=torch.full((2,), 0.7)))
    m_pix, m_img = x.mean(1, keepdim=True), x.mean((1, 2, 3), keepdim=True)
    want = (((x + 0.3) - m_pix) * 1.5 + m_pix - m_img) * 0.7 + m_img
    assert torch.allclose(y[0], want[0], atol=1e-6) and torch.equal(y[1], x[1])


def test_augment_rates_and_sizes_as_gat():
    """Over many draws: colour on half of the samples, flip with probability 0.4, translation up to 1/8 of the side,
    and a cutout square of half the side whose centre lies anywhere in [0, res] (GAT's rand_cutout): at res 32 a
    corner pixel is cut with probability (9/33)^2, the centre pixel with (16/33)^2."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    a = cat.draw_aug(n, 32, g, 'cpu')
    assert a['flip'].float().mean().item() == pytest.approx(0.4, abs=0.015)
    assert a['color'].float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert sorted(a['shift'].unique().tolist()) == list(range(-4, 5))
    assert sorted(cat.draw_aug(500, 16, g, 'cpu')['shift'].unique().tolist()) == list(range(-2, 3))
    holes = cat.augment(torch.ones(n, 1, 32, 32), _aug(n, cut=a['cut'])) == 0
    area = holes.flatten(1).sum(1)
    assert area.max() == 16 * 16 and area.min() >= 8 * 8
    assert holes[:, 0, 0, 0].float().mean().item() == pytest.approx((9 / 33) ** 2, abs=0.01)
    assert holes[:, 0, 16, 16].float().mean().item() == pytest.approx((16 / 33) ** 2, abs=0.015)


def test_augmented_asymmetric_image_does_not_leak_its_mirror_image():
    """D must see an asymmetric image more often as it is than mirrored, or G is free to generate mirrored content.
    Averaged over many draws of the whole policy, a left-bright image stays left-bright: about (0.6 - 0.4) of its
    left-right contrast survives (a flip probability of 0.5 would leave 0)."""
    x = torch.zeros(1, 3, 16, 16)
    x[..., :8] = 1
    n = 8000
    y = cat.augment(x.expand(n, -1, -1, -1).contiguous(), cat.draw_aug(n, 16, torch.Generator().manual_seed(1), 'cpu'))
    m = y.mean(0)
    kept = (m[..., :8].mean() - m[..., 8:].mean()).item()
    assert 0.1 < kept < 0.3, kept


# ----------------------------------------------------------------------------------------------
# Cross-scale metrics (Eq. 1)
# ----------------------------------------------------------------------------------------------

def test_cross_scale_metrics_identical_and_known():
    h = torch.randn(2, 3, 16, 16)
    flat = h.mean(dim=(2, 3), keepdim=True).expand_as(h).contiguous()    # constant per channel: identical at all scales
    S = cat.table6_scales(16)
    m = cat.cross_scale_metrics([flat] * 4, S)
    assert max(map(abs, m['delta'] + m['R'])) < 1e-6
    # constant images a_k: x_k = a_k everywhere, so delta_k = |a_K - a_k| / |a_K|, R_k = |a_{k+1} - a_k| / |a_K|
    # and A_k = cos(a_{k+1} - a_k, a_K - a_k) = sign agreement
    a = [1.0, 3.0, 2.0, 4.0]
    hs = [torch.full((1, 1, 16, 16), v) for v in a]
    m = cat.cross_scale_metrics(hs, S)
    assert np.allclose(m['delta'], [3 / 4, 1 / 4, 2 / 4], atol=1e-6)
    assert np.allclose(m['R'], [2 / 4, 1 / 4, 2 / 4], atol=1e-6)
    assert np.allclose(m['A'], [1, -1, 1], atol=1e-6)
    assert np.allclose(m['delta_h'], m['delta'], atol=1e-6)            # constant images: pooling loses nothing
    hs = [torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)]
    hs[0][..., ::2, :] = 1                                              # stripes: pool to the same mean as h_K ...
    hs[0][..., 1::2, :] = -1
    m = cat.cross_scale_metrics([hs[0] + 1, *hs[1:]], S)
    assert m['delta'][0] < 1e-6 and abs(m['delta_h'][0] - 1) < 1e-6     # ... which Eq. 1's delta cannot see
    # the floor (sample.py --analyze): a perfect hierarchy h_k = h_K still has delta_k > 0 when h_K has detail finer
    # than scale k; a 1-pixel checker pools to 0 at every coarser scale, so its floor is delta_k = 1 for all k < K
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    m = cat.cross_scale_metrics([checker.expand(1, 1, 16, 16)] * 4, S)
    assert np.allclose(m['delta'], [1, 1, 1], atol=1e-6) and np.allclose(m['R'], [0, 0, 1], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

TINY = ['--data', 'toy', '--model', 'T', '--toy-n', '400', '--batch-size', '8', '--precision', 'fp32',
        '--eval-every', '0', '--log-every', '1', '--ckpt-every', '2', '--latest-every', '1', '--workers', '0']


def run_cat(argv):
    return cat.train(cat.get_args(argv))['run_dir']


def train_judged(argv):
    """cat.py's training with fid.py's judges at every evaluation (what `fid.py train` runs)."""
    return cat.train(cat.get_args(argv), measures=[fid.judges])


def load(run_dir, name='latest.pt'):
    return torch.load(os.path.join(run_dir, name), map_location='cpu', weights_only=True)


def test_training_steps_change_weights_and_stay_finite(tmp_path):
    run = run_cat(TINY + ['--steps', '3', '--out', str(tmp_path / 'r')])
    ck = load(run)
    torch.manual_seed(0)
    G0 = cat.Generator(**ck['config']['G'])
    assert ck['step'] == 3
    assert any(not torch.equal(G0.state_dict()[k], v) for k, v in ck['G'].items() if k != 'w_avg')
    assert ck['G']['w_avg'].abs().sum() > 0
    rows = [json.loads(l) for l in open(tmp_path / 'r' / 'metrics.jsonl')]
    assert len(rows) == 3 and all(math.isfinite(v) for r in rows for v in r.values())


def test_g_step_reuses_the_d_step_z():
    """GAT's loop hands the D step's z to the G step (its step_gen finds z in the shared model_kwargs), so G is
    updated on the very samples D has just been trained on; augmentation is drawn anew."""
    args = cat.get_args(TINY + ['--steps', '1'])
    m = cat.build(args, dict(depth=4, width=32, heads=2, channels=3, res=16, num_classes=10),
                  dict(depth=2, width=32, heads=2, channels=3, res=16, num_classes=10, cmap_dim=64, repa_dim=0),
                  torch.device('cpu'), 1)
    ws = []
    m.G.mapping.register_forward_hook(lambda mod, inp, out: ws.append(out.detach().clone()))
    x, c = make_toy(8, seed=1)
    noise, aug = cat.step_noise(0, 0, 8, m.G, m.D.scales, torch.device('cpu'))
    cat.train_step(m, x, c, None, noise, aug, args)
    assert len(ws) == 2 and torch.equal(ws[0], ws[1])
    assert not torch.equal(aug['d_fake']['shift'], aug['g_fake']['shift'])


def test_resume_is_exact(tmp_path):
    a = run_cat(TINY + ['--steps', '4', '--out', str(tmp_path / 'a')])
    b = run_cat(TINY + ['--steps', '2', '--out', str(tmp_path / 'b')])
    b = run_cat(TINY + ['--steps', '4', '--out', str(tmp_path / 'b'), '--resume'])
    ca, cb = load(a), load(b)
    for part in ('G', 'D', 'ema'):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    sa, sb = ca['opt_d']['state'], cb['opt_d']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)


def test_resume_into_a_new_directory_starts_there(tmp_path, capsys):
    """A requeue script repeats one command: --resume with --out DIR starts a new run when DIR does not exist yet (one
    line says so), and the same command then continues it; a missing --resume FILE stays an error."""
    cmd = TINY + ['--out', str(tmp_path / 'new' / 'run'), '--resume']
    run_cat(cmd + ['--steps', '2'])
    assert 'no checkpoint in ' in capsys.readouterr().out and load(tmp_path / 'new' / 'run')['step'] == 2
    run_cat(cmd + ['--steps', '3'])
    assert load(tmp_path / 'new' / 'run')['step'] == 3
    run_cat(TINY + ['--steps', '1', '--resume', str(tmp_path / 'other')])          # --resume DIR alone
    assert load(tmp_path / 'other')['step'] == 1
    with pytest.raises(SystemExit, match='no such checkpoint file'):
        run_cat(TINY + ['--steps', '1', '--resume', str(tmp_path / 'missing.pt')])
    assert not (tmp_path / 'missing.pt').exists()


def test_cat_stands_alone(tmp_path):
    """A copy of cat.py alone trains the toy set with its own evaluation (Eq. 1, the grid) and says in one line what
    needs fid.py."""
    shutil.copy(os.path.join(HERE, 'cat.py'), tmp_path)
    r = subprocess.run([sys.executable, 'cat.py', *TINY, '--steps', '2', '--eval-every', '2', '--eval-n', '20',
                        '--out', 'r'], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / 'r' / 'log.txt').read_text().splitlines()
    assert log[-1].startswith('toy: delta=') and 'shape_acc' not in log[-1], log[-1]
    assert sum("metrics (class and shape accuracy, FD, precision/recall, the copy check) are fid.py's" in line
               for line in log) == 1
    assert (tmp_path / 'r' / 'samples-0000002.png').exists()


def top_level_imports(name):
    """The project's files that `name` imports anywhere in it (functions included)."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, name)).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split('.')[0])
    return {m + '.py' for m in mods} & {'cat.py', 'fid.py', 'bench.py', 'sample.py', 'prepare_latents.py'}


def test_no_import_circle_and_no_module_loaded_twice(tmp_path):
    """cat.py imports no companion; the companions import cat.py and not each other, so running any file as __main__
    never loads a second copy of cat (a second copy of every class) and there is no circle."""
    assert top_level_imports('cat.py') == set()
    for name in ('fid.py', 'bench.py', 'sample.py', 'prepare_latents.py'):
        assert top_level_imports(name) <= {'cat.py'}, name
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "main = sys.modules['__main__']; "
            "print('MODULES', 'cat' in sys.modules, 'fid' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code, os.path.join(HERE, 'cat.py'), *TINY, '--steps', '1', '--out',
                        str(tmp_path / 'a')], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and 'MODULES False False' in r.stdout, r.stderr[-2000:]


def test_checkpoint_of_the_previous_release_still_loads(tmp_path):
    """The previous release called G's output heads `heads.*`: its checkpoints resume (the step after equals a straight
    run's) and its EMA loads into Generator for sampling."""
    run_cat(TINY + ['--steps', '2', '--out', str(tmp_path / 'a')])
    ck = load(tmp_path / 'a')
    for net in ('G', 'ema'):
        ck[net] = {k.replace('out_heads.', 'heads.'): v for k, v in ck[net].items()}
    assert any(k.startswith('heads.') for k in ck['G']) and not any('out_heads' in k for k in ck['ema'])
    os.makedirs(tmp_path / 'old')
    torch.save(ck, tmp_path / 'old' / 'latest.pt')
    G = cat.Generator(**ck['config']['G'])
    G.load_state_dict(ck['ema'])
    assert torch.equal(G.out_heads[0].linear.weight, ck['ema']['heads.0.linear.weight'])
    resumed = run_cat(TINY + ['--steps', '3', '--resume', str(tmp_path / 'old')])
    straight = run_cat(TINY + ['--steps', '3', '--out', str(tmp_path / 'b')])
    assert all(torch.equal(v, load(straight)['G'][k]) for k, v in load(resumed)['G'].items())


def test_existing_run_dir_is_refused(tmp_path):
    run_cat(TINY + ['--steps', '1', '--out', str(tmp_path / 'r')])
    before = os.path.getmtime(tmp_path / 'r' / 'latest.pt')
    with pytest.raises(SystemExit, match='already holds a run'):
        run_cat(TINY + ['--steps', '1', '--out', str(tmp_path / 'r')])
    assert os.path.getmtime(tmp_path / 'r' / 'latest.pt') == before


def test_torchrun_two_processes_match_one(tmp_path):
    """2-process gloo DDP: identical weights on both ranks (rank 0 saves, rank 1 dumps), equal to a 1-process run."""
    script = tmp_path / 'ddp.py'
    script.write_text(f"import sys, os, torch; sys.path.insert(0, {HERE!r}); import cat\n"
                      f"r = cat.train(cat.get_args(sys.argv[1:]))\n"
                      f"torch.save(r['G'].state_dict(),\n"
                      f"           os.path.join(r['run_dir'], 'G-rank' + os.environ['RANK'] + '.pt'))\n")
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533', str(script),
           *TINY, '--steps', '2', '--out', str(tmp_path / 'ddp')]
    out = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = load(tmp_path / 'ddp', 'G-rank0.pt'), load(tmp_path / 'ddp', 'G-rank1.pt')
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    one = run_cat(TINY + ['--steps', '2', '--out', str(tmp_path / 'one')])
    cd, c1 = load(tmp_path / 'ddp'), load(one)
    # Adam with beta1 = 0 moves each weight by about lr * sign(grad) on its first steps, so a gradient within
    # round-off of 0 (the two runs reduce in different orders) may flip. D's head bias is such a weight: it cancels in
    # d(real) - d(fake) (same class), so its gradient is pure round-off. Allow a few such elements, each
    # < 2.5 lr / step.
    lr = cat.get_args(TINY).lr
    for part in ('G', 'D'):
        diff = torch.cat([(cd[part][k] - c1[part][k]).abs().flatten() for k in c1[part]])
        assert (diff > 1e-5).float().mean() < 0.005 and diff.max() < 2 * 2 * 2.5 * lr, (part, diff.max())
    assert torch.allclose(cd['G']['w_avg'], c1['G']['w_avg'], atol=1e-6)
    # exact resume under 2 processes: 2 steps + resume to 4 equals 4 straight steps, bit for bit
    for extra in (['4', str(tmp_path / 'ddp'), '--resume'], ['4', str(tmp_path / 'ddp4')]):
        args = cmd[:-4] + ['--steps', extra[0], '--out', *extra[1:]]
        out = subprocess.run(args, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    ca, cb = load(tmp_path / 'ddp'), load(tmp_path / 'ddp4')
    assert ca['step'] == cb['step'] == 4
    for part in ('G', 'D', 'ema'):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part


# ----------------------------------------------------------------------------------------------
# Reliability: preemption, guard, bad input, retention
# ----------------------------------------------------------------------------------------------

def make_latent_dir(path, n=16, num_classes=4, images=False, meta_edits=None, n_lat=None, res=32, pixels=0):
    """A dataset directory in prepare_latents.py's format, random content: SD-VAE latents as format_version 1 wrote
    them (version 2 reads them unchanged), or with pixels=C uint8 pixel data of C channels (format_version 2)."""
    os.makedirs(path, exist_ok=True)
    g = np.random.default_rng(0)
    lat = np.concatenate([g.normal(size=(n_lat or n, 4, res, res)), np.full((n_lat or n, 4, res, res), 0.5)], 1)
    if pixels:
        np.save(os.path.join(path, 'pixels.npy'), g.integers(0, 256, (n_lat or n, pixels, res, res), dtype=np.uint8))
    else:
        np.save(os.path.join(path, 'latents.npy'), lat.astype(np.float16))
    np.save(os.path.join(path, 'labels.npy'), np.arange(n) % num_classes)
    if images:
        from PIL import Image
        blobs = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(g.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format='JPEG')
            blobs.append(buf.getvalue())
        np.save(os.path.join(path, 'images_index.npy'), np.cumsum([0] + [len(b) for b in blobs]))
        open(os.path.join(path, 'images.bin'), 'wb').write(b''.join(blobs))
    meta = dict(format_version=1, vae='stabilityai/sd-vae-ft-ema', scaling_factor=0.18215, resolution=8 * res,
                latent_shape=[8, res, res], num_classes=num_classes, class_names=[f'c{i}' for i in range(num_classes)],
                N=n, images=images)
    if pixels:
        meta.update(format_version=2, vae=None, scaling_factor=1, resolution=res, store='uint8',
                    shape=[pixels, res, res])
        del meta['latent_shape']
    meta.update(meta_edits or {})
    json.dump(meta, open(os.path.join(path, 'meta.json'), 'w'))
    return path


LATENT = ['--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--eval-every', '0', '--log-every', '1',
          '--workers', '0', '--lambda-repa', '0']


def test_latent_dataset_training_step(tmp_path):
    data = make_latent_dir(tmp_path / 'data')
    ds = cat.LatentDataset(str(data), cat.check_data_dir(str(data)), images=False)
    m, c, img = ds[3]
    assert m.shape == (8, 32, 32) and m.dtype == torch.float16 and c == 3 and img.numel() == 0
    x = cat.data_x(m[None], torch.ones(1, 4, 32, 32), dict(kind='latent', scale=0.18215))
    assert torch.allclose(x, (m[None, :4].float() + 0.5) * 0.18215, atol=1e-3)
    r = cat.train(cat.get_args(LATENT + ['--data', str(data), '--steps', '2', '--out', str(tmp_path / 'r')]))
    assert load(r['run_dir'])['step'] == 2 and load(r['run_dir'])['config']['data']['kind'] == 'latent'


@pytest.mark.parametrize('problem,msg', [
    ('missing', 'no dataset directory'), ('no_meta', 'no meta.json'), ('shape', 'does not match its meta.json'),
    ('labels', r'labels outside \[0, num_classes = 2\)'), ('version', 'format_version'),
    ('no_vae_key', "lacks 'vae'"), ('geometry', r'8 x 8 images.*multiple of 16.*--resolution 16'),
    ('bad_type', "N = '16', expected a positive integer"), ('no_images', 'has no images.bin'),
    ('old_pixels', 'holds pixels as float16 .*prepare it again')])
def test_bad_dataset_is_one_clear_line(tmp_path, problem, msg):
    """Every problem of a dataset directory is found before anything is built: one line, nothing written."""
    d = str(tmp_path / 'data')
    if problem != 'missing':
        make_latent_dir(d, **{'no_meta': {}, 'shape': dict(n_lat=12), 'labels': dict(meta_edits=dict(num_classes=2)),
                              'version': dict(meta_edits=dict(format_version=99)), 'no_vae_key': {},
                              'geometry': dict(res=8, pixels=3), 'old_pixels': dict(res=16,
                                  meta_edits=dict(vae=None, scaling_factor=1)),
                              'bad_type': dict(meta_edits=dict(N='16')),
                              'no_images': dict(meta_edits=dict(images=True))}[problem])
    if problem == 'no_meta':
        os.remove(os.path.join(d, 'meta.json'))
    if problem == 'no_vae_key':
        meta = json.load(open(os.path.join(d, 'meta.json')))
        del meta['vae']
        json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'))
    with pytest.raises(SystemExit, match=msg) as e:
        cat.train(cat.get_args(LATENT + ['--data', d, '--steps', '1', '--out', str(tmp_path / 'r')]))
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    assert not os.path.exists(tmp_path / 'r')


def test_latents_with_the_papers_defaults_train_as_before(tmp_path):
    """ImageNet-style latents with Table 6's defaults (lr 2e-4, EMA 0.999, DiffAugment, gamma 1; REPA off: no DINOv2
    offline) train as the release before --lr-final existed: the numbers it gave."""
    data = make_latent_dir(tmp_path / 'data')
    opts = ['--data', str(data), '--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--lambda-repa', '0',
            '--workers', '0', '--steps', '3', '--eval-every', '0']
    args = cat.get_args(opts + ['--out', str(tmp_path / 'a')])
    assert (args.lr, args.ema_decay, args.aug, args.gamma, args.lr_final) == (2e-4, 0.999, True, 1, 1)
    r = cat.train(args)
    got = [sum(p.double().sum().item() for p in r['G'].parameters()), sum(p.double().sum().item()
           for p in r['D'].parameters()), sum(p.double().abs().sum().item() for p in r['ema'].parameters())]
    assert np.allclose(got, [-641.0108175526302, -1218.373918629832, 60701.30198385172], rtol=1e-6, atol=0), got


def test_lr_decay_option():
    """--lr-final: a cosine from lr to lr x lr_final over --steps, in both optimizers."""
    cfg_g = dict(depth=4, width=32, heads=2, channels=3, res=16, num_classes=10)
    cfg_d = dict(depth=2, width=32, heads=2, channels=3, res=16, num_classes=10, cmap_dim=64, repa_dim=0)
    args = cat.get_args(TINY + ['--steps', '100', '--lr-final', '0.25'])
    m = cat.build(args, cfg_g, cfg_d, torch.device('cpu'), 1)
    for step, want in ((0, 2e-3), (50, 2e-3 * 0.625), (100, 2e-3 * 0.25)):
        cat.set_lr(m, args, step)
        assert all(g['lr'] == pytest.approx(want) for opt in (m.opt_g, m.opt_d) for g in opt.param_groups)


def test_bad_cli_values(tmp_path):
    out = subprocess.run([sys.executable, 'cat.py', '--model', 'XL'], cwd=HERE, capture_output=True,
                         text=True)
    assert out.returncode != 0 and 'unknown --model XL' in out.stderr
    with pytest.raises(SystemExit, match='must split evenly'):
        run_cat(TINY + ['--steps', '1', '--micro-batch', '3', '--out', str(tmp_path / 'r')])
    with pytest.raises(SystemExit, match='multiple of 4'):
        run_cat(TINY + ['--steps', '1', '--batch-size', '6', '--out', str(tmp_path / 'r')])


def test_bad_checkpoints(tmp_path):
    run = run_cat(TINY + ['--steps', '1', '--out', str(tmp_path / 'r')])
    with pytest.raises(SystemExit, match='different model'):          # resuming into a different --model
        run_cat(TINY[:3] + ['S'] + TINY[4:] + ['--steps', '2', '--resume', os.path.join(run, 'latest.pt')])
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(open(os.path.join(run, 'latest.pt'), 'rb').read()[:1000])
    with pytest.raises(SystemExit, match='truncated or not a torch file'):
        cat.load_checkpoint(str(bad))
    torch.save({'model': 1}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='not a CAT checkpoint'):
        cat.load_checkpoint(str(tmp_path / 'other.pt'))


def test_missing_weights_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit, match='cannot load the VAE'):
        cat.load_vae(str(tmp_path / 'no-such-vae'))
    assert cat.load_vae(str(tmp_path / 'no-such-vae'), required=False) is None
    data = make_latent_dir(tmp_path / 'data', images=True)
    with pytest.raises(SystemExit, match='cannot load DINOv2'):       # REPA requested, no DINOv2 weights offline
        cat.train(cat.get_args(LATENT[:-1] + ['1.0', '--data', str(data), '--steps', '1',
                                              '--out', str(tmp_path / 'r')]))


def test_nonfinite_guard_keeps_last_checkpoint(tmp_path):
    run = run_cat(TINY + ['--steps', '2', '--out', str(tmp_path / 'r')])
    before = open(os.path.join(run, 'latest.pt'), 'rb').read()
    with pytest.raises(SystemExit, match=r'non-finite .*r1.* within steps 3-3'):
        run_cat(TINY + ['--steps', '4', '--out', run, '--resume', '--gp-sigma', '0'])   # 0/0 in the approximated R1
    assert open(os.path.join(run, 'latest.pt'), 'rb').read() == before


def test_retention_and_damaged_latest_fallback(tmp_path):
    run = run_cat(TINY + ['--steps', '8', '--ckpt-every', '1', '--keep', '2', '--milestone-every', '4',
                          '--out', str(tmp_path / 'r')])
    names = sorted(os.listdir(run))
    kept = ['ckpt-0000004.pt', 'ckpt-0000006.pt', 'ckpt-0000007.pt', 'ckpt-0000008.pt']     # 4, 8: milestones
    assert [n for n in names if n.startswith('ckpt-')] == kept
    latest = os.path.join(run, 'latest.pt')
    data = open(latest, 'rb').read()[:500]
    os.remove(latest)                                                   # latest.pt is a hard link to ckpt-0000008.pt
    open(latest, 'wb').write(data)                                      # a damaged copy (e.g. an interrupted rsync)
    assert cat.find_resume(run).endswith('ckpt-0000008.pt')


def test_sigterm_then_resume_equals_straight_run(tmp_path):
    import signal, time
    env = dict(os.environ, OMP_NUM_THREADS='1')
    args = TINY + ['--steps', '12', '--ckpt-every', '100']
    p = subprocess.Popen([sys.executable, 'cat.py', *args, '--out', str(tmp_path / 'a')], cwd=HERE, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / 'a' / 'metrics.jsonl'
    t0 = time.time()
    while time.time() - t0 < 120 and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and 'Resume with the same command' in out, out[-2000:]
    stopped = load(tmp_path / 'a')['step']
    assert 3 <= stopped < 12
    run_cat(args + ['--out', str(tmp_path / 'a'), '--resume'])
    straight = run_cat(args + ['--out', str(tmp_path / 'b')])
    ca, cb = load(tmp_path / 'a'), load(straight)
    assert ca['step'] == cb['step'] == 12
    for part in ('G', 'D', 'ema'):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part


# ----------------------------------------------------------------------------------------------
# The toy set and the data set classifier
# ----------------------------------------------------------------------------------------------

def test_toy_make_deterministic_balanced():
    for res in (16, 32):
        x, y = make_toy(200, seed=3, res=res)
        assert x.shape == (200, 3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        assert torch.bincount(y, minlength=10).tolist() == [20] * 10
        assert torch.bincount(y[:100], minlength=10).tolist() == [10] * 10  # halves balanced too
        x2, y2 = make_toy(200, seed=3, res=res)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(x, make_toy(200, seed=4, res=res)[0])
    counts = torch.bincount(make_toy(23)[1], minlength=10)
    assert counts.max() - counts.min() <= 1


@pytest.fixture(scope='module')
def toy_judges():
    """The toy's judge (trained as the training evaluation trains it, fewer steps) and its shape judge (random hues)."""
    judge = fid.train_judge(*make_toy(150 * 128, seed=1000), 10, steps=150)
    shape = fid.train_judge(*make_toy(150 * 128, seed=1001, random_hue=True), 10, steps=150, seed=1)
    return judge, shape


def test_judge_separates_good_blurred_and_noisy_samples(toy_judges):
    judge, shape = toy_judges
    assert not judge.training and judge.features(torch.zeros(2, 3, 16, 16)).shape == (2, 128)
    assert fid.class_accuracy(judge, *make_toy(2000, seed=2000), 10)[0] >= 0.98
    assert fid.class_accuracy(shape, *make_toy(2000, seed=2001, random_hue=True), 10)[0] >= 0.95
    real, c_real = make_toy(400, seed=7)
    fx, fy = make_toy(200, seed=8)                  # the same class counts as set A (any 10-block is balanced)
    m = lambda x: fid.judge_metrics(judge, x, fy, real, c_real, 10, shape_judge=shape)
    good, noise = m(fx), m(torch.rand(200, 3, 16, 16) * 2 - 1)
    blur = m(F.interpolate(F.avg_pool2d(fx, 4), scale_factor=4.0, mode='bilinear'))     # blobs of the right hue
    assert good['class_acc'] > 0.98 and good['shape_acc'] > 0.9 and good['class_acc_flip'] > 0.9   # symmetric shapes
    assert good['fd'] < 3 * good['fd_floor'] + 1 and noise['fd'] > blur['fd'] > 2 * good['fd_floor']
    assert blur['shape_acc'] < 0.6 and good['recall'] > 0.7 * good['recall_floor']
    # every sample at the centre at one size: the features keep position and size, so diversity and recall fall
    centred = torch.stack([make_toy(1, seed=100 + k)[0][0] for k in range(10)])      # one fixed image per class ...
    one = m(centred[fy])                                                              # ... drawn for every sample
    assert one['diversity'] < 0.05 and one['recall'] < 0.1 and good['diversity'] > 0.8


def test_judge_metrics_identical_sets_and_one_image_per_class():
    """Fakes equal to real set A: every distance-based metric at its ideal (fd 0, precision = recall = diversity = 1).
    A generator that draws one image per class: diversity 0 and recall near 0."""
    torch.manual_seed(0)
    judge = fid.Judge(16, 3, 3)
    real = torch.rand(300, 3, 16, 16) * 2 - 1
    c_real = torch.arange(300) % 3
    same = fid.judge_metrics(judge, real[:150], c_real[:150], real, c_real, 3)
    assert abs(same['fd']) < 1e-6 and same['precision'] == same['recall'] == 1.0
    assert same['diversity'] == pytest.approx(1)
    assert same['fd_floor'] > 0 and 0 < same['recall_floor'] <= 1
    one = fid.judge_metrics(judge, real[:3][c_real[:150]], c_real[:150], real, c_real, 3)
    assert one['diversity'] == 0 and one['recall'] <= 3 / 150 and one['precision'] == 1.0
    px = fid.judge_metrics(fid.PooledPixels(), real[:3][c_real[:150]], c_real[:150], real, c_real, 3, False)
    assert px['diversity'] == 0 and px['recall'] <= 3 / 150 and 'class_acc' not in px
    assert set(f'class_acc_{k}' for k in range(3)) | {'min_class_acc', 'diversity_2'} <= set(one)
    assert 'class_acc' not in fid.judge_metrics(judge, real[:150], c_real[:150], real, c_real, 3, labelled=False)


def test_judge_metrics_are_defined_for_degenerate_sets():
    """Reals whose classes hold identical images, one image in all, one image per class: every metric is a number (nan
    only for a ratio over a zero spread, diversity of such a class), and fd of a perfect copy is 0."""
    torch.manual_seed(0)
    judge = fid.Judge(16, 2, 3)
    base = torch.rand(2, 3, 16, 16) * 2 - 1
    c_real = torch.arange(20) % 2
    real = base[c_real]                                                   # class k: 10 copies of one image
    for labelled in (True, False):
        failed = {}
        m = fid.judge_metrics(judge, real[:10], c_real[:10], real, c_real, 2, labelled, None, failed)
        assert failed == {} and abs(m['fd']) < 1e-3 and m['precision'] == m['recall'] == 1.0
        assert math.isnan(m['diversity']) and math.isnan(m['diversity_0'])
    one = torch.rand(1, 3, 16, 16)                                          # a one-image set: A = B = it
    m = fid.judge_metrics(judge, one, torch.zeros(1, dtype=torch.long), one.repeat(2, 1, 1, 1),
                          torch.zeros(2, dtype=torch.long), 1, False, None, failed)
    assert failed == {} and abs(m['fd']) < 1e-6 and m['recall'] == 1 and math.isnan(m['diversity'])
    assert fid.frechet_distance(np.zeros(4), np.zeros((4, 4)), np.ones(4), np.zeros((4, 4))) == pytest.approx(4)


def pixel_dir(path, images, labels):
    """A format-2 pixel dataset directory (uint8 [N, C, r, r]) of exactly these images."""
    make_latent_dir(path, n=len(labels), num_classes=int(max(labels)) + 1, res=images.shape[-1], pixels=images.shape[1])
    np.save(os.path.join(path, 'pixels.npy'), images.astype(np.uint8))
    np.save(os.path.join(path, 'labels.npy'), np.asarray(labels, np.int64))
    return str(path)


EVAL = ['--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--log-every', '1', '--workers', '0',
        '--steps', '2', '--eval-every', '2', '--eval-n', '16']


@pytest.mark.parametrize('case', ['identical_per_class', 'one_class_identical', 'one_per_class'])
def test_evaluation_of_degenerate_data_keeps_the_run(tmp_path, case):
    """The issue's sets: 4 classes of 12 identical images, one class of 20 identical images, one image per class.
    The run ends with its checkpoint and an evaluation line in which no metric failed."""
    g = np.random.default_rng(0)
    n, nc = {'identical_per_class': (48, 4), 'one_class_identical': (20, 1), 'one_per_class': (4, 4)}[case]
    labels = np.arange(n) % nc
    images = (g.integers(0, 256, (nc, 3, 16, 16))[labels] if case != 'one_per_class' else
              g.integers(0, 256, (4, 3, 16, 16)))
    data = pixel_dir(tmp_path / 'data', images, labels)
    r = train_judged(EVAL + ['--data', data, '--out', str(tmp_path / 'r')])
    log = (tmp_path / 'r' / 'log.txt').read_text()
    assert load(r['run_dir'])['step'] == 2 and 'failed' not in log and 'eval 2: ' in log
    assert set(r['eval']) >= {'fd', 'fd_floor', 'precision', 'recall', 'diversity', 'recall_px', 'diversity_px'}


def test_a_failing_metric_is_one_line_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError('broken on purpose')
    monkeypatch.setattr(fid, 'precision_recall', broken)
    r = train_judged(TINY + ['--steps', '4', '--eval-every', '2', '--eval-n', '40', '--toy-n', '400',
                             '--out', str(tmp_path / 'r')])
    lines = (tmp_path / 'r' / 'log.txt').read_text().splitlines()
    assert 'eval 2: precision/recall failed (RuntimeError: broken on purpose); training goes on' in lines
    assert 'eval 4: precision/recall failed (RuntimeError: broken on purpose); training goes on' in lines
    assert load(r['run_dir'])['step'] == 4 and 'recall' not in r['eval'] and 'fd' in r['eval']     # the rest is there


def test_stop_request_skips_the_evaluation_not_the_checkpoint(tmp_path, monkeypatch):
    """A signal that arrives on an evaluation step: the checkpoint is written, the evaluation is not run."""
    calls = []
    monkeypatch.setattr(cat.Preemption, 'requested', lambda self: calls.append(1) or len(calls) >= 2)
    r = cat.train(cat.get_args(TINY + ['--steps', '6', '--eval-every', '2', '--eval-n', '40',
                                       '--out', str(tmp_path / 'r')]))
    log = (tmp_path / 'r' / 'log.txt').read_text()
    assert r['step'] == 2 and load(r['run_dir'])['step'] == 2 and 'eval 2' not in log and 'stopped by signal' in log


class FlatJudge(nn.Module):
    """features = the image's values; the class is the sign of pixel 0."""
    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return torch.stack([-x.flatten(1)[:, 0], x.flatten(1)[:, 0]], 1)


def test_memorization_reads_copies_near_zero_and_fresh_images_near_one():
    """The copy check: samples that copy training images read ~0, fresh images of the same distribution ~1; held-out
    images that are themselves training images skip their own index (leave one out: ~1; without it they would find
    themselves); a set of identical images gives nan, not an error. The copied share: all copies 1, fresh ~0.05, and
    a generator that copies 30 % and blurs the rest reads about 1 in the median but 0.3 copied."""
    train, _ = make_toy(2000, seed=5)
    held_out, _ = make_toy(200, seed=6)
    train_px = fid.PooledPixels().features(train)
    copies = train[:200] + 0.001 * torch.randn(200, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ratio, copied = fid.memorization(copies, held_out, train_px)
    assert ratio < 0.1 and copied == 1.0
    fresh = make_toy(200, seed=7)[0]
    ratio, copied = fid.memorization(fresh, held_out, train_px)
    assert 0.8 < ratio < 1.25 and copied < 0.15
    assert 0.8 < fid.memorization(fresh, train[:200], train_px, torch.arange(200))[0] < 1.25
    assert all(map(math.isnan, fid.memorization(fresh, train[:200], train_px)))   # not left out: each finds itself
    blurred = F.avg_pool2d(fresh, 3, 1, 1)
    ratio, copied = fid.memorization(torch.cat([copies[:60], blurred[60:]]), held_out, train_px)
    assert ratio > 0.8 and 0.27 <= copied <= 0.4, (ratio, copied)
    same = torch.zeros(10, 3, 16, 16)
    assert all(map(math.isnan, fid.memorization(same, same, fid.PooledPixels().features(same), torch.arange(10))))


def test_judge_metrics_by_hand():
    """Two classes of 1-pixel, 2-channel 'images' (features = their values), worked out by hand."""
    pt = lambda *v: torch.tensor(v, dtype=torch.float).view(-1, 2, 1, 1)
    # set A (first 4) and B (last 4); classes 1, 1, 0, 0 (class = sign of channel 0)
    real = torch.cat([pt(1, 0, 3, 0, -1, 0, -1, 4), pt(1, 1, 3, 1, -1, 1, -1, 3)])
    c_real = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0])
    fake = pt(1, 0, 2, 0, -1, 0, 1, 0)                # classes 1, 1, 0, 0: the last is on the wrong side
    m = fid.judge_metrics(FlatJudge(), fake, c_real[:4], real, c_real, 2)
    # class 1: fakes 1 apart, reals 2 apart -> 0.5; class 0: fakes (-1,0), (1,0) 2 apart, reals 4 apart -> 0.5
    assert m['diversity_1'] == pytest.approx(0.5) and m['diversity_0'] == pytest.approx(0.5)
    assert m['diversity'] == pytest.approx(0.5)
    assert m['class_acc'] == 0.75 and m['class_acc_1'] == 1 and m['class_acc_0'] == 0.5 and m['min_class_acc'] == 0.5
    # precision / recall with k = 1 on a line: reals 0, 1, 2, 3 (radius 1 each) hold all three fakes; the fakes 0,
    # 0.2, 0.3 (radii 0.2, 0.1, 0.1) reach only the real 0
    line = lambda *v: np.array(v, dtype=np.float32)[:, None]
    assert fid.precision_recall(line(0, 1, 2, 3), line(0, 0.2, 0.3), k=1) == (1.0, 0.25)


# ----------------------------------------------------------------------------------------------
# fid.py
# ----------------------------------------------------------------------------------------------

FID_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fid.py')


def _rand_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_fid_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), _rand_spd(rng, 8)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu2 = mu + rng.standard_normal(8)
    want = np.sum((mu - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)


def test_fid_frechet_distance_matches_eigenvalues():
    rng = np.random.default_rng(1)
    for d in (5, 32):
        mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _rand_spd(rng, d), _rand_spd(rng, d)
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(w)) @ v.T                                  # sqrt(s1)
        tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()   # tr sqrt(s1 s2) = tr sqrt(r1 s2 r1)
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_fid_feature_stats():
    x = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    assert np.allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_fid_inception_score():
    C = 7
    assert fid.inception_score(np.tile(np.array([[0.2, 0.5, 0.3]]), (20, 1))) == pytest.approx(1.0)
    onehot = np.eye(C)[np.repeat(np.arange(C), 4)]                 # equal counts per class
    assert fid.inception_score(onehot) == pytest.approx(C)
    assert fid.inception_score(np.concatenate([onehot, onehot]), split_size=len(onehot)) == pytest.approx(C)


def test_fid_inception_score_chunks_as_adm():
    """ADM: consecutive chunks of 5000 and the remainder (12345 -> 5000, 5000, 2345), not N // 5000 equal chunks."""
    p = scipy.special.softmax(3 * np.random.default_rng(6).standard_normal((12345, 1000)), axis=1)
    score = lambda q: np.exp((q * (np.log(q) - np.log(q.mean(0, keepdims=True)))).sum(1).mean())
    want = np.mean([score(p[:5000]), score(p[5000:10000]), score(p[10000:])])
    assert fid.inception_score(p) == pytest.approx(want, rel=1e-12)
    assert abs(np.mean([score(q) for q in np.array_split(p, 2)]) / want - 1) > 5e-3    # equal halves: 0.8 % off


def test_fid_precision_recall():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 16))
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 1000) == (0.0, 0.0)
    # real = two far-apart clusters; fake = copies of 30 points of the first: all fake points lie on real points,
    # and the fake balls (radii within cluster A, << 100) cannot reach cluster B, so recall <= 1/2.
    real = np.concatenate([rng.standard_normal((100, 16)), 100 + rng.standard_normal((100, 16))])
    p, r = fid.precision_recall(real, real[:30], batch=64)
    assert p == 1.0 and r <= 0.5


class StandInDetector(nn.Module):
    """Same call convention as inception-2015-12-05.pt (uint8 NCHW at any resolution -> features, or probabilities),
    with small features (32-d) so that sqrtm stays fast on CPU."""
    def __init__(self, dim=32, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 4 * 4, dim, generator=g))
        self.output = nn.Linear(dim, classes)

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        x = F.adaptive_avg_pool2d(img.float() / 255, 4).flatten(1)
        features = x @ self.proj
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


def _detector(tmp_path):
    path = str(tmp_path / 'det.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)              # torch.jit is deprecated, the detector is not
        torch.jit.script(StandInDetector()).save(path)
    return path


def _run(tmp_path, *args):
    env = dict(os.environ, HOME=str(tmp_path))                      # never touch the real cache
    return subprocess.run([sys.executable, FID_PY, *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_fid_detector_outputs_one_pass(tmp_path):
    det = fid.load_detector(_detector(tmp_path))
    imgs = np.random.default_rng(4).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    feats, probs = fid.detector_outputs(det, imgs, batch=4)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    with torch.no_grad():
        want_f, want_p = det(x, return_features=True).numpy(), det(x, no_output_bias=True).numpy()
    assert feats.dtype == probs.dtype == np.float64 and feats.shape == (10, 32) and probs.shape == (10, 10)
    assert np.allclose(feats, want_f, atol=1e-6)
    assert np.allclose(probs, want_p, atol=1e-6)
    assert np.allclose(fid.detector_outputs(det, iter(list(imgs)), batch=3)[0], feats, atol=1e-5)   # any iterable


def test_fid_metrics_run_without_tf32(tmp_path):
    """The detector pass and the distances run with TF32 off (as StyleGAN3's calc_metrics.py), even inside cat.py's
    training loop, which turns it on; the caller's flags are restored."""
    seen = []

    class Probe(StandInDetector):
        def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().forward(img, return_features, no_output_bias)

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    old = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        feats, _ = fid.detector_outputs(Probe(), np.zeros((6, 8, 8, 3), np.uint8), batch=4)
        assert seen == [(False, False)] * 2 and [f.allow_tf32 for f in flags] == [True, True]
        fid.precision_recall(feats, feats)
        assert [f.allow_tf32 for f in flags] == [True, True]
    finally:
        for f, o in zip(flags, old):
            f.allow_tf32 = o


def test_fid_cli_end_to_end(tmp_path):
    det = _detector(tmp_path)
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    other = (rng.integers(0, 128, (64, 32, 32, 3)) + rng.integers(0, 128, (1, 1, 1, 3))).astype(np.uint8)
    np.savez(tmp_path / 'samples.npz', samples)
    np.savez(tmp_path / 'other.npz', other)
    np.savez(tmp_path / 'ref.npz', samples)                       # reference of images only

    r = _run(tmp_path, 'samples.npz', '--ref', 'ref.npz', '--detector', det, '--json', 'out.json',
             '--save-ref', 'saved.npz')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'out.json').read_text())
    assert {'fid', 'inception_score', 'precision', 'recall', 'num_samples'} <= set(m) and m['num_samples'] == 64
    assert abs(m['fid']) < 1e-6 and m['precision'] == m['recall'] == 1.0 and m['inception_score'] >= 1.0
    saved = np.load(tmp_path / 'saved.npz')
    assert saved['features'].dtype == np.float16 and saved['features'].shape == (64, 32)

    # the saved reference again, against different images; then an ADM-style reference with mu/sigma only
    r = _run(tmp_path, 'other.npz', '--ref', 'saved.npz', '--detector', det, '--json', 'out2.json')
    assert r.returncode == 0, r.stderr
    m2 = json.loads((tmp_path / 'out2.json').read_text())
    assert m2['fid'] > 1 and m2['precision'] is not None
    np.savez(tmp_path / 'musigma.npz', mu=saved['mu'], sigma=saved['sigma'])
    r = _run(tmp_path, 'other.npz', '--ref', 'musigma.npz', '--detector', det, '--json', 'out3.json')
    assert r.returncode == 0, r.stderr
    m3 = json.loads((tmp_path / 'out3.json').read_text())
    assert m3['fid'] == pytest.approx(m2['fid'], rel=1e-9) and m3['precision'] is None and 'skipped' in r.stdout
    assert fid.fid_from_images(other, str(tmp_path / 'musigma.npz'), fid.load_detector(det)) == pytest.approx(m2['fid'])


def test_fid_cli_refuses_overwrite_and_missing_detector(tmp_path, monkeypatch):
    (tmp_path / 'out.json').write_text('{}')
    np.savez(tmp_path / 'samples.npz', np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['fid.py', 'samples.npz', '--ref', 'samples.npz', '--json', 'out.json'])
    with pytest.raises(SystemExit, match='overwrite'):
        fid.main()
    assert (tmp_path / 'out.json').read_text() == '{}'
    r = _run(tmp_path, 'samples.npz', '--ref', 'samples.npz', '--detector', 'missing.pt')
    assert r.returncode != 0 and 'missing.pt' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / '.cache').exists()                       # no download was attempted


# ----------------------------------------------------------------------------------------------
# prepare_latents.py
# ----------------------------------------------------------------------------------------------

SCRIPT = os.path.join(HERE, 'prepare_latents.py')
CLASSES = ['n01_cat', 'n02_empty', 'n03_dog', 'n04_owl']  # the empty folder sits in the middle on purpose


def prepare(*args, torchrun=False):
    """Runs prepare_latents.py; one CPU thread per process, as torchrun sets it, so outputs compare bitwise."""
    launch = ['-m', 'torch.distributed.run', '--nproc_per_node=2'] if torchrun else []
    return subprocess.run([sys.executable, *launch, SCRIPT, *map(str, args)], cwd=HERE, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def smooth_image(rng, w, h):
    """Something photo-like: a smooth colour field plus a little noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a, b, c = rng.uniform(1, 6, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], -1) * 100 + 128
    return Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """3 classes of mixed formats + one empty class folder + a corrupt file; a tiny VAE (256 -> 32, 4 channels)."""
    from diffusers.models import AutoencoderKL
    root, rng = tmp_path_factory.mktemp('imagenet'), np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
    img = lambda w, h: smooth_image(rng, w, h)
    img(400, 300).save(root / 'n01_cat/a.JPEG')
    img(640, 520).save(root / 'n01_cat/b.png')                              # min side >= 512: BOX halving
    img(300, 300).convert('L').save(root / 'n01_cat/c_gray.JPEG')
    rgba = img(280, 260).convert('RGBA')
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (260, 280), dtype=np.uint8)))
    rgba.save(root / 'n03_dog/a_rgba.png')
    img(300, 270).convert('P', palette=Image.ADAPTIVE).save(root / 'n03_dog/b_palette.png')
    img(320, 300).convert('CMYK').save(root / 'n03_dog/c_cmyk.JPEG')
    (root / 'n03_dog/d_corrupt.JPEG').write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    img(100, 80).save(root / 'n03_dog/e_small.JPEG')                         # upscaled
    (root / 'n03_dog/notes.txt').write_text('not an image')                  # ignored
    (root / 'n04_owl/sub').mkdir()
    for name in ('a.JPEG', 'b.JPEG', 'sub/c.JPEG'):
        img(500, 380).save(root / 'n04_owl' / name)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256)
    vae_dir = tmp_path_factory.mktemp('vae')
    vae.save_pretrained(vae_dir)
    return root, vae_dir


@pytest.fixture(scope='module')
def base(tree, tmp_path_factory):
    """One uninterrupted run, the reference for the others."""
    root, vae = tree
    out = tmp_path_factory.mktemp('base') / 'data'
    r = prepare('--imagenet', root, '--out', out, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 0)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def same_output(a, b, images=True):
    names = ['latents.npy', 'labels.npy'] + (['images.bin', 'images_index.npy'] if images else [])
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_prepare_format(tree, base):
    root, vae_dir = tree
    out, r = base
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['format_version'] == 2 and meta['resolution'] == 256 and meta['images'] is True
    assert meta['class_names'] == CLASSES and meta['num_classes'] == 4 and meta['empty_classes'] == ['n02_empty']
    assert meta['scaling_factor'] == pytest.approx(0.18215) and meta['latent_shape'] == [8, 32, 32]
    assert meta['N'] == 10 and meta['skipped'] == 1
    assert not (out / 'parts').exists() and 'holds no images' in r.stdout

    latents, labels = np.load(out / 'latents.npy'), np.load(out / 'labels.npy')
    assert latents.shape == (10, 8, 32, 32) and latents.dtype == np.float16
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 2, 2, 2, 2, 3, 3, 3]
    assert np.isfinite(latents).all() and (latents[:, 4:] > 0).all()

    index = np.load(out / 'images_index.npy')
    blob = (out / 'images.bin').read_bytes()
    assert index.dtype == np.int64 and index.shape == (11,) and index[0] == 0 and index[-1] == len(blob)
    crops = [np.asarray(Image.open(io.BytesIO(blob[index[i]:index[i + 1]]))) for i in range(10)]
    assert all(c.shape == (256, 256, 3) and c.dtype == np.uint8 for c in crops)

    report = (out / 'skipped.txt').read_text().splitlines()
    assert len(report) == 2 and 'd_corrupt.JPEG' in report[0] and report[1].startswith(str(root / 'n02_empty'))

    # channels = posterior mean, std of the VAE on the ADM crop of the first file
    sys.path.insert(0, HERE)
    from prepare_latents import center_crop_arr
    from diffusers.models import AutoencoderKL
    crop = center_crop_arr(Image.open(root / 'n01_cat/a.JPEG').convert('RGB'))
    assert np.abs(crop.astype(int) - crops[0]).mean() < 3  # the stored JPEG is that crop
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(vae_dir).eval().encode(x).latent_dist
    ref = torch.cat([posterior.mean, posterior.std], 1)[0].half().numpy()
    np.testing.assert_allclose(latents[0].astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-3)


def test_prepare_center_crop():
    sys.path.insert(0, HERE)
    from prepare_latents import center_crop_arr, to_rgb
    for size in [(1030, 600), (100, 80), (256, 256), (300, 900)]:
        assert center_crop_arr(Image.new('RGB', size)).shape == (256, 256, 3)
    rgba = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(Image.new('CMYK', (4, 4))).mode == 'RGB' and to_rgb(Image.new('L', (4, 4))).mode == 'RGB'


def test_prepare_resume_with_torchrun(tree, base, tmp_path):
    """Killed after 2 of 4 chunks, continued by 2 torchrun ranks (gloo): only the 2 missing chunks are encoded,
    one per rank, and the result is byte-identical to the uninterrupted single-process run."""
    root, vae = tree
    out = tmp_path / 'data'
    args = ['--imagenet', root, '--out', out, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 0]
    r = prepare(*args, '--stop-after-chunks', 2)  # dies like a killed process
    assert r.returncode != 0 and not (out / 'meta.json').exists()
    assert sorted(p.name for p in (out / 'parts').glob('*.npz')) == ['000000.npz', '000001.npz']
    (out / 'parts/000002.npz.tmp').write_bytes(b'half a chunk')  # killed while writing chunk 2
    r = prepare(*args, torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'skipping 2 finished chunks, 2 left to encode' in r.stdout and 'encoding (2 ranks' in r.stderr
    assert same_output(base[0], out) and not (out / 'parts').exists()


def test_prepare_refusals(tree, base, tmp_path):
    root, vae = tree
    out = base[0]
    stamp = (out / 'meta.json').stat().st_mtime_ns
    r = prepare('--imagenet', root, '--out', out, '--vae', vae)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f'error: {out} already holds a complete dataset (meta.json); pass --overwrite to replace it']
    assert (out / 'meta.json').stat().st_mtime_ns == stamp

    # the same checks in-process (a subprocess each would cost seconds)
    sys.path.insert(0, HERE)
    from prepare_latents import plan_run
    opts = lambda source, out, vae=vae, **kw: argparse.Namespace(**{**dict(
        source=str(source), out=str(out), vae=str(vae), resolution=256, crop='center', precision='fp32', chunk=3,
        no_images=False, overwrite=False, one_class=False, store=None), **kw})
    with pytest.raises(SystemExit, match='error: .*nope is not a directory'):
        plan_run(opts(tmp_path / 'nope', tmp_path / 'x'))
    with pytest.raises(SystemExit, match=r'--resolution 64 gives 8 x 8 latents.*multiple of 16'):
        plan_run(opts(root, tmp_path / 'x', resolution=64))
    with pytest.raises(SystemExit, match=r'--resolution 8 gives 8 x 8 images.*multiple of 16'):
        plan_run(opts(root, tmp_path / 'x', resolution=8, vae='none'))
    with pytest.raises(SystemExit, match=r'--store jpeg is for pixel data'):
        plan_run(opts(root, tmp_path / 'x', store='jpeg'))
    (tmp_path / 'empty/sub').mkdir(parents=True)
    with pytest.raises(SystemExit, match='holds no image files'):
        plan_run(opts(tmp_path / 'empty', tmp_path / 'x'))

    # an unfinished run refuses a different tree or VAE once a chunk is finished; --overwrite starts over
    tree2, vae2, out2 = tmp_path / 'tree2', tmp_path / 'vae2', tmp_path / 'data'
    shutil.copytree(root, tree2)
    shutil.copytree(vae, vae2)
    plan_run(opts(tree2, out2))
    plan_run(opts(tree2, out2, vae=vae2))  # no chunk finished yet: nothing to lose, the new plan wins
    assert json.loads((out2 / 'parts/files.json').read_text())['vae'] == str(vae2)
    plan_run(opts(tree2, out2))
    (out2 / 'parts/000000.npz').write_bytes(b'')  # a finished chunk
    with pytest.raises(SystemExit, match='different vae'):
        plan_run(opts(tree2, out2, vae=vae2))
    Image.new('RGB', (300, 300)).save(tree2 / 'n04_owl/new.JPEG')
    with pytest.raises(SystemExit, match=r'different files \(11 saved, 12 now\).*--overwrite'):
        plan_run(opts(tree2, out2))
    (tree2 / 'n04_owl/new.JPEG').unlink()
    r = prepare('--imagenet', tree2, '--out', out2, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 2,
                '--overwrite', '--no-images')
    assert r.returncode == 0, r.stderr
    assert 'finished chunks' not in r.stdout and same_output(out, out2, images=False)  # deterministic, any workers
    assert json.loads((out2 / 'meta.json').read_text())['images'] is False and not (out2 / 'images.bin').exists()


# ----------------------------------------------------------------------------------------------
# sample.py
# ----------------------------------------------------------------------------------------------



ENV = dict(os.environ, OMP_NUM_THREADS='1')


def run_sample(*args, ok=True, nproc=0):
    """sample.py's command line: a run expected to succeed through its entry point main() in this process (stdout
    captured); one expected to fail, or under torch.distributed.run (nproc > 0), as a process of its own (its exit
    status and stderr are what the test checks)."""
    if ok and not nproc:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), torch.enable_grad():      # main() turns gradients off for good
            sample.main([str(a) for a in args])
        return SimpleNamespace(returncode=0, stdout=out.getvalue(), stderr='')
    launcher = []
    if nproc:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        launcher = ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}']
    r = subprocess.run([sys.executable, *launcher, 'sample.py', *map(str, args)], cwd=HERE, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


def load_npz(path):
    with np.load(path) as f:
        return f['arr_0']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp('sample') / 'run'
    cat.main(['--data', 'toy', '--model', 'T', '--toy-n', '400', '--batch-size', '8', '--precision', 'fp32',
              '--eval-every', '0', '--log-every', '1', '--ckpt-every', '1', '--latest-every', '1', '--workers', '0',
              '--steps', '1', '--out', str(out)])
    return str(out / 'latest.pt')


@pytest.fixture(scope='module')
def single(ckpt):
    """10 samples in batches of 4 (the last one partial), one process, default output path."""
    run_sample('--ckpt', ckpt, '--num-samples', 10, '--batch', 4)
    return os.path.join(os.path.dirname(ckpt), 'samples-0000001-ema-psi1-seed0-10.npz')


def test_sample_npz_shape_count_and_grid(single):
    x = load_npz(single)
    assert x.shape == (10, 16, 16, 3) and x.dtype == np.uint8
    assert not np.array_equal(x[0], x[1])
    assert Image.open(single[:-4] + '.png').size == (8 * 65 + 1, 2 * 65 + 1)   # 8 per row, x4, 1-pixel gaps


def test_sample_torchrun_identical(ckpt, single, tmp_path):
    out = tmp_path / 'ddp.npz'
    run_sample('--ckpt', ckpt, '--num-samples', 10, '--batch', 4, '--out', out, nproc=2)
    assert np.array_equal(load_npz(out), load_npz(single))
    assert sorted(os.listdir(tmp_path)) == ['ddp.npz', 'ddp.png']              # parts and .tmp removed


def test_sample_class_order():
    import sample
    args = SimpleNamespace(seed=3, classes=None, class_balanced=True)
    z, c = sample.sample_inputs(range(25), args, 8, 10)
    assert c.tolist() == [i % 10 for i in range(25)]
    z2, c2 = sample.sample_inputs(range(20, 25), SimpleNamespace(seed=3, classes=None, class_balanced=False), 8, 10)
    assert torch.equal(z2, z[20:]) and c2.min() >= 0 and c2.max() < 10       # z_i depends on i only, not on batching
    _, c3 = sample.sample_inputs(range(5), SimpleNamespace(seed=3, classes=[7, 2], class_balanced=False), 8, 10)
    assert c3.tolist() == [7, 2, 7, 2, 7]


def test_sample_class_balanced_matches_classes(ckpt, tmp_path):
    """--class-balanced gives sample i class i % 10: samples 3 and 13 equal those of --classes 3."""
    run_sample('--ckpt', ckpt, '--num-samples', 14, '--batch', 7, '--class-balanced', '--out', tmp_path / 'cb.npz')
    run_sample('--ckpt', ckpt, '--num-samples', 14, '--batch', 7, '--classes', 3, '--out', tmp_path / 'c3.npz')
    cb, c3 = load_npz(tmp_path / 'cb.npz'), load_npz(tmp_path / 'c3.npz')
    assert np.array_equal(cb[[3, 13]], c3[[3, 13]])
    assert not np.array_equal(cb[0], c3[0])                                    # same z, class 0 vs 3


def test_sample_refuses_to_overwrite(ckpt, tmp_path):
    out = tmp_path / 'old.npz'
    out.write_bytes(b'old samples')
    r = run_sample('--ckpt', ckpt, '--num-samples', 2, '--out', out, ok=False)
    assert r.stderr.strip().count('\n') == 0 and 'exists' in r.stderr and '--overwrite' in r.stderr
    assert out.read_bytes() == b'old samples' and not (tmp_path / 'old.png').exists()
    run_sample('--ckpt', ckpt, '--num-samples', 2, '--out', out, '--overwrite')
    assert load_npz(out).shape == (2, 16, 16, 3)


def test_sample_bad_checkpoints(ckpt, tmp_path):
    data = open(ckpt, 'rb').read()
    (tmp_path / 'half.pt').write_bytes(data[:len(data) // 2])
    torch.save({'model': {}}, tmp_path / 'other.pt')
    for name, msg in [('half.pt', 'truncated'), ('other.pt', 'not a CAT checkpoint')]:
        r = run_sample('--ckpt', tmp_path / name, '--num-samples', 2, '--out', tmp_path / 'x.npz', ok=False)
        assert r.stderr.strip().startswith('error:') and r.stderr.strip().count('\n') == 0 and msg in r.stderr
    assert sorted(os.listdir(tmp_path)) == ['half.pt', 'other.pt']                # nothing written


class Payload:
    """Unpickling this writes a file: what a malicious checkpoint would do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


# ----------------------------------------------------------------------------------------------
# Scale hierarchies, pixel data (App. A.3) and the vision-aided loss
# ----------------------------------------------------------------------------------------------

A3_64 = ['--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--log-every', '1', '--workers', '0',
         '--scales', '4,8,16,64', '--patch', '4', '--d-patch', '2,2,2,4', '--eval-n', '8']


@pytest.fixture
def stand_in_backbones(monkeypatch):
    """Random-initialized timm backbones instead of downloaded weights (offline), as DINOv2 is tested."""
    real = cat.load_frozen
    monkeypatch.setattr(cat, 'load_frozen', lambda name, device, pretrained=True, *a, **k: real(name, device, False,
                                                                                                *a, **k))


@pytest.mark.parametrize('va', [False, True])
def test_pixel_hierarchy_at_64px_trains_and_resumes(tmp_path, stand_in_backbones, va):
    """App. A.3's configuration shrunk to 64 px: G patch 4 (16 x 16 tokens), D patches 2, 2, 2, 4 over scales 4, 8, 16,
    64, with and without the vision-aided loss (stand-in ConvNeXt-V2); resuming restores the vision-aided head."""
    g = np.random.default_rng(0)
    data = pixel_dir(tmp_path / 'data', g.integers(0, 256, (16, 3, 64, 64)), np.arange(16) % 2)
    opts = A3_64 + ['--data', data] + (['--lambda-va', '0.5', '--va-model', 'convnextv2_atto'] if va else [])
    r = train_judged(opts + ['--steps', '2', '--eval-every', '2', '--out', str(tmp_path / 'a')])
    ck = load(r['run_dir'])
    assert ck['config']['G']['patch'] == 4 and ck['config']['D']['scales'] == [4, 8, 16, 64]
    assert r['G'].out_layers == [1, 2, 3, 4] and r['D'].grids == [2, 4, 8, 16] and 'fd' in r['eval']
    assert ('va.mlp.0.weight' in ck['D']) == va and ('va_dim' in ck['config']['D']) == va
    rows = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl') if '"loss_d"' in l]
    assert all(math.isfinite(v) for row in rows for v in row.values()) and ('va_g' in rows[-1]) == va
    cat.train(cat.get_args(opts + ['--steps', '3', '--eval-every', '0', '--resume', str(tmp_path / 'a')]))
    straight = cat.train(cat.get_args(opts + ['--steps', '3', '--eval-every', '0', '--out', str(tmp_path / 'b')]))
    resumed = load(str(tmp_path / 'a'))
    assert all(torch.equal(v, straight['D'].state_dict()[k]) for k, v in resumed['D'].items())    # the head too
    assert all(torch.equal(v, straight['G'].state_dict()[k]) for k, v in resumed['G'].items())


def test_vision_aided_backbone_is_frozen_and_passes_gradient_to_g():
    net = cat.load_frozen('convnextv2_atto', 'cpu', pretrained=False)
    G = cat.Generator(4, 32, 2, channels=3, res=64, patch=4, num_classes=3, stages=2)
    D = cat.Discriminator(1, 32, 2, channels=3, res=64, num_classes=3, cmap_dim=16, repa_dim=0, scales=[8, 64],
                          patch=[2, 4], va_dim=net.num_features)
    args = cat.get_args(['--data', 'toy', '--lambda-va', '1', '--precision', 'fp32'])
    d_step, g_step = cat.DStep(D, G, args, None, net), cat.GStep(G, D, args, net)
    d_step.train(), g_step.train()                              # a module-wide train() does not reach the backbone
    noise, aug = cat.step_noise(0, 0, 4, G, D.scales, torch.device('cpu'))
    x, c = torch.rand(4, 3, 64, 64) * 2 - 1, torch.tensor([0, 1, 2, 0])
    loss, st = d_step(x, c, None, noise, aug)
    loss.backward()
    assert D.va.mlp[0].weight.grad.abs().sum() > 0 and 'va_d' in st
    D.requires_grad_(False)
    args.lambda_cons = 0.0
    loss, _, st = g_step(x, c, noise, aug)
    (st['va_g'] - st['va_g'].detach() + args.lambda_va * cat.rpgan_g_loss(
        D.va(cat.va_features(net, G(noise['z'], c)[-1]), c), D.va(cat.va_features(net, x), c).detach())).backward()
    assert all(p.grad is None and not p.requires_grad for p in net.parameters()) and not net.training
    assert G.out_heads[-1].linear.weight.grad.abs().sum() > 0       # G's gradient flows through the frozen backbone
    assert set(dict(d_step.named_modules())) == set(dict(d_step.D.named_modules(prefix='D'))) | {''}


def test_two_and_five_stage_hierarchies_train(tmp_path, monkeypatch):
    monkeypatch.setitem(cat.G_CONFIGS, 'T', cat.NetConfig(5, 32, 2))
    data = pixel_dir(tmp_path / 'data', np.random.default_rng(0).integers(0, 256, (16, 3, 16, 16)), np.arange(16) % 2)
    for scales, K in (('8,16', 1), ('1,2,4,8,16', 4)):
        r = cat.train(cat.get_args(EVAL + ['--data', data, '--scales', scales, '--d-patch', '1', '--out',
                                           str(tmp_path / scales)]))
        assert len(r['G'].out_heads) == K + 1 and len(r['D'].segments) == K + 1 and 'delta_h' in r['eval']
        assert r['D'].scales == [int(s) for s in scales.split(',')] and f'delta_{K - 1}' in r['eval']
        assert f'delta_{K}' not in r['eval'] and load(r['run_dir'])['config']['G']['stages'] == K + 1
    assert cat.w_cons(4) == [1 / 4, 1 / 3, 1 / 2, 1.0] and cat.w_cons(1) == [1.0]


@pytest.mark.parametrize('opts,msg', [
    (['--scales', '4,8,16,32'], 'must divide the data resolution 16'), (['--scales', '8,4,16'], 'must increase'),
    (['--scales', '16'], 'at least two scales'), (['--scales', '2,4,8,16', '--d-patch', '4'], 'whole number of D'),
    (['--d-patch', '1,1'], 'one patch size per scale'), (['--patch', '3'], 'multiple of 24: use --toy-res 24')])
def test_bad_hierarchy_is_one_clear_line(tmp_path, opts, msg):
    with pytest.raises(SystemExit, match=msg) as e:
        cat.train(cat.get_args(TINY + opts + ['--steps', '1', '--out', str(tmp_path / 'r')]))
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value) and not (tmp_path / 'r').exists()


def test_jpeg_pixel_store_trains_and_scores(tmp_path):
    """Pixel data kept as JPEG (default from 128 px; forced here at 16 px): decoded by the loader, scored by fid.py."""
    rng, root = np.random.default_rng(3), tmp_path / 'tree'
    for c in range(2):
        (root / f'c{c}').mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f'c{c}' / f'{i}.png')
    data = tmp_path / 'data'
    assert prepare('--images', root, '--out', data, '--resolution', 16, '--vae', 'none', '--store', 'jpeg',
                   '--workers', 0).returncode == 0
    meta = json.loads((data / 'meta.json').read_text())
    assert meta['store'] == 'jpeg' and meta['images'] and not (data / 'pixels.npy').exists()
    ds = cat.LatentDataset(str(data), cat.check_data_dir(str(data)), images=False)
    x, label, img = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and img.numel() == 0
    r = train_judged(['--data', str(data), '--model', 'T', '--batch-size', '8', '--steps', '2',
                      '--eval-every', '2', '--eval-n', '6', '--out', str(tmp_path / 'r')])
    assert load(r['run_dir'])['step'] == 2 and 'fd' in r['eval']
    assert len(list(__import__('fid').Images(str(data)))) == 12


def test_unsafe_checkpoint_is_refused_and_runs_no_code(ckpt, tmp_path):
    evil, marker = tmp_path / 'evil.pt', tmp_path / 'pwned'
    torch.save({'format': 'cat', 'version': cat.CKPT_VERSION, 'config': {}, 'x': Payload(str(marker))}, evil)
    torch.load(evil, weights_only=False)                     # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(SystemExit, match="not a safe CAT checkpoint: it holds io.open"):
        cat.load_checkpoint(str(evil))
    r = run_sample('--ckpt', evil, '--num-samples', 2, '--out', tmp_path / 'x.npz', ok=False)
    assert r.stderr.strip().count('\n') == 0 and 'not a safe CAT checkpoint' in r.stderr
    with pytest.raises(SystemExit, match='not a safe CAT checkpoint'):
        run_cat(TINY + ['--steps', '2', '--resume', str(evil), '--out', str(tmp_path / 'r')])
    assert not marker.exists()
    assert cat.load_checkpoint(ckpt)['step'] == 1              # what cat.py writes loads with the safe unpickler


def test_export_safetensors_samples_exactly_as_the_checkpoint(ckpt, single, tmp_path):
    from safetensors import safe_open
    st = tmp_path / 'ema.safetensors'
    r = run_sample('--ckpt', ckpt, '--export', st)
    assert 'EMA generator of step 1' in r.stdout
    with safe_open(str(st), 'pt') as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()['cat'])
    ck = cat.load_checkpoint(ckpt)
    assert keys == set(ck['ema']) and meta['config'] == ck['config'] and meta['step'] == 1     # EMA only, no D/Adam
    run_sample('--ckpt', st, '--num-samples', 10, '--batch', 4, '--out', tmp_path / 'st.npz')
    assert np.array_equal(load_npz(tmp_path / 'st.npz'), load_npz(single))    # bit-identical samples, same seed
    run_sample('--ckpt', ckpt, '--export', tmp_path / 'half.safetensors', '--export-dtype', 'bf16')
    assert os.path.getsize(tmp_path / 'half.safetensors') < 0.6 * os.path.getsize(st)
    run_sample('--ckpt', tmp_path / 'half.safetensors', '--num-samples', 10, '--batch', 4, '--out', tmp_path / 'h.npz')
    half = load_npz(tmp_path / 'h.npz')
    assert np.abs(half.astype(int) - load_npz(single)).mean() < 2                # close, not identical
    for extra, msg in [(['--weights', 'raw'], 'only the EMA generator'), (['--export', st], 'exists')]:
        r = run_sample('--ckpt', st, *extra, '--num-samples', 2, '--out', tmp_path / 'x.npz', ok=False)
        assert r.stderr.strip().count('\n') == 0 and msg in r.stderr
    with pytest.raises(SystemExit, match='only the EMA generator'):
        run_cat(TINY + ['--steps', '2', '--resume', str(st), '--out', str(tmp_path / 'r')])


def tiles(png, size=64):
    """A grid PNG (1-pixel gaps) -> its tiles [rows, cols, size, size, 3]; the gaps must be white."""
    g = np.asarray(Image.open(png))
    rows, cols = (g.shape[0] - 1) // (size + 1), (g.shape[1] - 1) // (size + 1)
    assert g.shape[:2] == (rows * (size + 1) + 1, cols * (size + 1) + 1) and (g[::size + 1] == 255).all()
    return np.stack([np.stack([g[1 + i * (size + 1):(i + 1) * (size + 1), 1 + j * (size + 1):(j + 1) * (size + 1)]
                               for j in range(cols)]) for i in range(rows)])


def test_sample_research_views(ckpt, single, tmp_path):
    """--num 0: no .npz; stages grid 8 rows x 4 stages, its h_3 column = the samples; interp 4 x 8; Eq. 1 table."""
    out, js = tmp_path / 'r.npz', tmp_path / 'm.json'
    r = run_sample('--ckpt', ckpt, '--num-samples', 0, '--batch', 4, '--stages', '--interp', '--analyze', '--json', js,
                   '--out', out)
    assert not out.exists()
    stages = tiles(tmp_path / 'r-stages.png')
    assert stages.shape == (8, 4, 64, 64, 3)
    x = load_npz(single)[:8].repeat(4, 1).repeat(4, 2)                              # same seeds, same batches of 4
    assert np.array_equal(stages[:, 3], x)
    interp = tiles(tmp_path / 'r-interp.png')
    assert interp.shape == (4, 8, 64, 64, 3)
    assert np.abs(interp[0, 0].astype(int) - x[0]).max() <= 2              # t = 0 is sample 0 (batch of 32)
    assert np.abs(interp[0, -1].astype(int) - x[1]).max() <= 2             # t = 1 is sample 1
    for name in ('delta', 'R', 'A', 'k=0', 'mean'):
        assert name in r.stdout
    m = json.load(open(js))
    assert m['n'] == 1000 and all(len(m[k]) == 4 and np.isfinite(m[k]).all() for k in ('delta', 'R', 'A'))
    assert 'delta floor' in r.stdout and 'delta_h floor' not in r.stdout
    assert m['A_floor'][2] == 1 and m['R_floor'][2] == m['delta_floor'][2]
    assert all(0 <= f for f in m['delta_floor'])


def test_sample_latent_checkpoint_uses_vae(ckpt, tmp_path):
    """A latent checkpoint is decoded by the VAE named in its meta (here a tiny untrained AutoencoderKL)."""
    from diffusers.models import AutoencoderKL
    vae_dir = tmp_path / 'vae'
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                  norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * 2,
                  up_block_types=('UpDecoderBlock2D',) * 2).save_pretrained(vae_dir)
    ck = torch.load(ckpt, weights_only=True)
    ck['config']['data'].update(kind='latent', scale=0.18215)
    ck['config']['meta'] = dict(vae=str(vae_dir))
    torch.save(ck, tmp_path / 'latent.pt')
    run_sample('--ckpt', tmp_path / 'latent.pt', '--num-samples', 3, '--out', tmp_path / 'l.npz')
    assert load_npz(tmp_path / 'l.npz').shape == (3, 32, 32, 3)                     # 16 x 16 latents, VAE upsamples x2
    r = run_sample('--ckpt', tmp_path / 'latent.pt', '--num-samples', 3, '--out', tmp_path / 'm.npz', '--vae',
                   tmp_path / 'nowhere', ok=False)
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot load the VAE")      # diffusers may warn first


def test_own_pixel_data_end_to_end(tmp_path):
    """The README's four commands on a class-folder tree of small PNGs (3 classes, mixed sizes and modes): prepare in
    pixel space, train a few steps, sample, score with a stand-in detector against the data set itself."""
    rng, root = np.random.default_rng(0), tmp_path / 'pngs'
    for c, name in enumerate(['left', 'top', 'dot']):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate([(16, 16), (24, 20), (40, 40), (12, 12), (20, 30), (16, 16)]):
            a = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            if c == 0:
                a[:, :w // 3] = 230
            elif c == 1:
                a[:h // 3] = 230
            else:
                a[h // 3:2 * h // 3, w // 3:2 * w // 3] = 230
            img = Image.fromarray(a)
            (img.convert('L') if i == 3 else img).save(root / name / f'{i}.png')
    data, run = tmp_path / 'data16', tmp_path / 'run'
    r = prepare('--images', root, '--out', data, '--resolution', 16, '--vae', 'none', '--workers', 0)
    assert r.returncode == 0, r.stderr
    meta = json.loads((data / 'meta.json').read_text())
    assert meta['vae'] is None and meta['scaling_factor'] == 1 and meta['shape'] == [3, 16, 16]
    assert meta['images'] is False and meta['crop'] == 'center' and meta['N'] == 18 and meta['num_classes'] == 3
    assert meta['store'] == 'uint8' and meta['format_version'] == 2 and not (data / 'latents.npy').exists()
    px = np.load(data / 'pixels.npy')
    sys.path.insert(0, HERE)
    from prepare_latents import center_crop_arr
    want = center_crop_arr(Image.open(root / 'dot' / '2.png').convert('RGB'), 16)       # classes: dot, left, top
    assert px.dtype == np.uint8 and np.array_equal(px[2], want.transpose(2, 0, 1))       # exact: uint8 as read

    # the README's command line, fid.py train (cat.py's training judged), in this process
    fid.train(['--data', str(data), '--model', 'T', '--batch-size', '8', '--steps', '4', '--eval-n', '18',
               '--out', str(run)])
    log = (run / 'log.txt').read_text()
    assert 'fp32, device cpu, 0 data workers' in log and 'G-T/2 is sized' not in log and 'fid.py' not in log
    ev = [json.loads(l) for l in open(run / 'metrics.jsonl') if 'class_acc' in l][-1]
    assert ev['step'] == 4 and 0 <= ev['class_acc'] <= 1 and math.isfinite(ev['fd'])
    assert ev['R_floor_2'] == ev['delta_floor_2'] and abs(ev['A_floor_2'] - 1) < 1e-5    # Eq. 1's floor is logged
    assert Image.open(run / 'samples-0000004.png').size == (65 * 10 + 1, 65 * 3 + 1)   # 3 classes x 10 seeds, x4

    run_sample('--ckpt', run / 'latest.pt', '--num-samples', 12, '--stages', '--out', tmp_path / 's.npz')
    with np.load(tmp_path / 's.npz') as z:
        assert z['arr_0'].shape == (12, 16, 16, 3) and z['arr_0'].dtype == np.uint8 and z['arr_1'].shape == (12,)
    assert Image.open(tmp_path / 's-stages.png').size == (65 * 4 + 1, 65 * 8 + 1)
    r = _run(tmp_path, 's.npz', '--ref', str(data), '--detector', _detector(tmp_path), '--json', 'm.json')
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads((tmp_path / 'm.json').read_text())['fid'])


def test_unlabelled_folder_end_to_end(tmp_path):
    """A folder of images without class folders (some in a nested folder): one class, said in one line; trains with
    an evaluation in label-free features (random CNN) that names its feature space; samples; scores."""
    rng, root = np.random.default_rng(1), tmp_path / 'faces'
    (root / 'more').mkdir(parents=True)
    for i in range(14):
        a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
        a[5 + i % 5:12 + i % 5, 4:14] = 200
        Image.fromarray(a).save((root / 'more' if i >= 10 else root) / f'{i}.png')
    data, run = tmp_path / 'data16', tmp_path / 'run'
    r = prepare('--images', root, '--out', data, '--resolution', 16, '--vae', 'none')
    assert r.returncode == 0, r.stderr
    assert f'{root}: one unlabelled class of 14 images (10 images directly in it;' in r.stdout
    assert 'wrote 14 samples of 1 class to' in r.stdout and '0 files skipped, 0 empty class folders' in r.stdout
    assert json.loads((data / 'meta.json').read_text())['num_classes'] == 1
    fid.train(['--data', str(data), '--model', 'T', '--batch-size', '8', '--steps', '2', '--eval-n', '7',
               '--out', str(run)])
    assert 'judge features: random CNN (untrained judge' in (run / 'log.txt').read_text()
    ev = [json.loads(l) for l in open(run / 'metrics.jsonl') if '"fd"' in l][-1]
    assert 'class_acc' not in ev and ev['features'].startswith('random CNN')
    assert all(math.isfinite(ev[k]) for k in ('fd', 'fd_floor', 'precision', 'recall', 'recall_floor', 'diversity'))
    assert Image.open(run / 'samples-0000002.png').size == (10 * 65 + 1,) * 2          # one class: 10 rows of 10
    assert Image.open(run / 'reals.png').size == (10 * 65 + 1, 2 * 65 + 1)            # the 14 reals, in rows of 10
    run_sample('--ckpt', run / 'latest.pt', '--num-samples', 6, '--out', tmp_path / 's.npz')
    r = _run(tmp_path, 's.npz', '--ref', str(data), '--detector', _detector(tmp_path), '--json', 'm.json')
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads((tmp_path / 'm.json').read_text())['fid'])


def test_greyscale_folder_stays_greyscale(tmp_path):
    """A tree of one-channel PNGs (and one RGB PNG whose channels are equal) is stored, trained, evaluated and sampled
    as one channel; every image written (grids, .npz) is RGB with R = G = B."""
    rng, root = np.random.default_rng(2), tmp_path / 'grey'
    for c in range(2):
        (root / f'c{c}').mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 80, (16, 16), dtype=np.uint8)
            a[4:12, 2 + 8 * c:6 + 8 * c] = 220
            img = Image.fromarray(a)
            (img.convert('RGB') if i == 0 else img).save(root / f'c{c}' / f'{i}.png')
    data, run = tmp_path / 'data16', tmp_path / 'run'
    assert prepare('--images', root, '--out', data, '--resolution', 16, '--crop', 'resize', '--vae', 'none',
                   '--workers', 0).returncode == 0
    assert json.loads((data / 'meta.json').read_text())['shape'] == [1, 16, 16]
    assert np.load(data / 'pixels.npy').shape == (16, 1, 16, 16)
    fid.train(['--data', str(data), '--model', 'T', '--batch-size', '8', '--steps', '2', '--eval-n', '8',
               '--out', str(run)])
    assert cat.load_checkpoint(str(run / 'latest.pt'))['config']['G']['channels'] == 1
    for png in ('samples-0000002.png', 'reals.png'):
        a = np.asarray(Image.open(run / png).convert('RGB')).astype(int)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all() and a.std() > 0, png
    run_sample('--ckpt', run / 'latest.pt', '--num-samples', 6, '--out', tmp_path / 's.npz')
    x = load_npz(tmp_path / 's.npz')
    assert x.shape == (6, 16, 16, 3) and (x[..., :1] == x).all()


def test_one_image_generator_scores_worse_in_label_free_features():
    """The one-class evaluation's random CNN features: a generator that draws one image is clearly worse than a second
    real set on every label-free metric."""
    real = make_toy(600)[0]
    c = torch.zeros(600, dtype=torch.long)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        judge = fid.Judge(16, 1, 3).eval()
    one = fid.judge_metrics(judge, real[:1].expand(300, -1, -1, -1), c[:300], real, c, 1, labelled=False)
    assert one['diversity'] == 0 and one['recall'] < 0.02 and one['fd'] > 3 * one['fd_floor']
    assert one['recall_floor'] > 0.8 and 'class_acc' not in one
    assert one['fd_floor'] > 1          # in units of the reals' spread: a log line with 4 decimals cannot read 0.0000


def test_small_data_defaults_follow_the_data(tmp_path):
    """The toy set and pixel data up to 64 px get the small-data defaults (README: small-data ablations); latents and
    larger pixel data (App. A.3: ImageNet-256 pixels) keep Table 6's; every one of them yields to an explicit option."""
    for kind, vae, shape in (('pixel', None, [3, 64, 64]), ('pixel256', None, [3, 256, 256]),
                             ('latent', 'stabilityai/sd-vae-ft-ema', None)):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / 'meta.json').write_text(json.dumps({'vae': vae, 'shape': shape,
                                                               'latent_shape': [8, 32, 32]}))
    keys = ('model', 'batch_size', 'lr', 'ema_decay', 'aug', 'gamma', 'lambda_repa')
    small, table6 = ("S", 16, 2e-3, 0.99, False, 0.1, 0.0), ('B', 512, 2e-4, 0.999, True, 1.0, 1.0)
    for data, want in (('toy', small), (str(tmp_path / 'pixel'), small), (str(tmp_path / 'pixel256'), table6),
                       (str(tmp_path / 'latent'), table6), ('no/such/dir', None)):
        a = cat.get_args(['--data', data])
        assert tuple(getattr(a, k) for k in keys) == (want or table6), data
    a = cat.get_args(['--data', 'toy', '--aug', '--gamma', '1', '--model', 'T', '--lr', '2e-4'])
    assert (a.aug, a.gamma, a.model, a.lr) == (True, 1.0, 'T', 2e-4)
    assert cat.get_args(['--data', str(tmp_path / 'latent'), '--no-aug']).aug is False
    assert [cat.get_args(['--data', d]).steps for d in ('toy', str(tmp_path / 'pixel'), str(tmp_path / 'latent'))] == [
        cat.TOY_STEPS, 4000, 50_000]
    for bad in ('{not json', '[1, 2]'):         # left to check_data_dir's one line, not a traceback in get_args
        (tmp_path / 'pixel' / 'meta.json').write_text(bad)
        assert cat.get_args(['--data', str(tmp_path / 'pixel')]).model == 'B'


def test_prepare_defaults_on_a_cpu():
    """Image-decoding workers default to the cores available (at most 8); messages count in the singular for one."""
    sys.path.insert(0, HERE)
    import prepare_latents
    assert 1 <= prepare_latents.get_args(['--images', 'x']).workers <= min(8, len(os.sched_getaffinity(0)))
    assert prepare_latents.plural(1, 'class', 'classes') == '1 class'
    assert prepare_latents.plural(2, 'image') == '2 images'


def test_curves_draws_fig4_layout_or_says_matplotlib_is_missing(tmp_path):
    """sample.py --curves over two runs' metrics.jsonl: one row of panels, a second row (distance above Eq. 1's
    floor) when every run logged the floor; without matplotlib, one line naming the fix and nothing written."""
    rng = np.random.default_rng(0)
    for name, floors in (('a', True), ('b', True), ('c', False)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / 'metrics.jsonl', 'w') as f:
            for step in (250, 500, 750):
                row = dict(step=step, **{f'{m}_{k}': float(rng.random()) for m in ('delta', 'R', 'A', 'delta_h')
                                         for k in range(3)})
                if floors:
                    row.update({f'{m}_floor_{k}': float(rng.random()) for m in ('delta', 'R', 'A')
                                for k in range(3)})
                f.write(json.dumps(dict(step=step, loss_d=0.7)) + '\n' + json.dumps(row) + '\n')
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = run_sample('--curves', tmp_path / 'a', '--out', tmp_path / 'x.png', ok=False)
        assert r.stderr.strip().count('\n') == 0 and 'pip install matplotlib' in r.stderr
        assert not (tmp_path / 'x.png').exists()
        return
    run_sample('--curves', f"{tmp_path / 'a'}=CAT", f"{tmp_path / 'b'}=no L_cons", '--out', tmp_path / 'two.png')
    run_sample('--curves', tmp_path / 'a', tmp_path / 'c', '--out', tmp_path / 'one.png')
    (w2, h2), (w1, h1) = Image.open(tmp_path / 'two.png').size, Image.open(tmp_path / 'one.png').size
    assert w1 == w2 and h2 == 2 * h1                          # a and c: c has no floor, so one row
    r = run_sample('--curves', tmp_path / 'nope', '--out', tmp_path / 'y.png', ok=False)
    assert 'not found' in r.stderr and not (tmp_path / 'y.png').exists()


def test_bad_pixel_meta_exits_with_one_line(tmp_path):
    """Run as a user would: exit status 1 and a single line on stderr."""
    d = make_latent_dir(tmp_path / 'data', res=8, pixels=3)
    out = subprocess.run([sys.executable, 'cat.py', '--data', str(d), '--model', 'T', '--steps', '1', '--out',
                          str(tmp_path / 'r')], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and 'multiple of 16' in out.stderr
    assert not (tmp_path / 'r').exists()


def test_prepare_then_train(base, tmp_path):
    """cat.py trains on what prepare_latents.py wrote (with REPA's images read from images.bin)."""
    out, _ = base
    ds = cat.LatentDataset(str(out), cat.check_data_dir(str(out)), images=True)
    m, c, img = ds[0]
    assert m.shape == (8, 32, 32) and img.shape == (3, 256, 256) and img.dtype == torch.uint8
    r = cat.train(cat.get_args(LATENT + ['--data', str(out), '--steps', '1', '--out', str(tmp_path / 'r')]))
    assert load(r['run_dir'])['config']['meta']['num_classes'] == 4


def test_training_logs_fid_with_stand_in_detector(tmp_path):
    det = _detector(tmp_path)
    x, _ = make_toy(64, seed=5)
    feats, _ = fid.detector_outputs(fid.load_detector(det), cat.to_uint8(x).numpy(), batch=32)
    mu, sigma = fid.feature_stats(feats)
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
    run = fid.train(TINY + ['--steps', '2', '--fid-every', '2', '--fid-n', '40', '--fid-ref', str(tmp_path / 'ref.npz'),
                            '--fid-detector', det, '--out', str(tmp_path / 'r')])['run_dir']
    rows = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
    fids = [r['fid'] for r in rows if 'fid' in r]
    assert len(fids) == 1 and math.isfinite(fids[0]) and fids[0] > 0


# ----------------------------------------------------------------------------------------------
# Fast paths equal the reference paths
# ----------------------------------------------------------------------------------------------

def test_grad_ckpt_gives_the_same_gradients():
    G, D = tiny_G(), tiny_D()
    z, c = torch.randn(3, G.z_dim), torch.tensor([0, 4, 9])
    grads = []
    for ckpt in (False, True):
        G.grad_ckpt = D.grad_ckpt = ckpt
        G.zero_grad(), D.zero_grad()
        hs = G(z, c)
        (D(cat.multiscale(hs, D.scales), c).sum() + cat.consistency_loss(hs)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in [*G.parameters(), *D.parameters()] if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_step_on_cpu(tmp_path):
    """The bf16 path (the GPU default) runs on CPU too; approximated R1/R2 in the same pass or in its own fp32 pass."""
    for gp in ('bf16', 'fp32'):
        bf16 = ['bf16' if a == 'fp32' else a for a in TINY]
        run = run_cat(bf16 + ['--gp-precision', gp, '--steps', '2', '--out', str(tmp_path / gp)])
        rows = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
        assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values())


def test_bench_on_cpu_prints_every_iteration_with_cpu_defaults():
    """A bare --bench without CUDA: fp32 and no DINOv2 (said in the first line), then a line per timed iteration."""
    lines = []
    r = bench.bench(bench.get_args(['--model', 'T', '--time', '--batch-size', '8', '--bench-steps', '2',
                                    '--bench-warmup', '1']), out=lines.append)
    assert r['ms_per_it'] > 0 and r['tflops'] > 0 and r['mfu'] is None and r['batch_per_device'] == 8
    if not torch.cuda.is_available():
        assert 'fp32, REPA off' in lines[0] and 'no CUDA' in lines[0]
    assert [l.split(':')[0].strip() for l in lines[1:4]] == ['iteration 1', 'iteration 2', 'iteration 3']
    assert 'warm-up' in lines[1] and 'warm-up' not in lines[2] and 'ms/it (median of 2)' in lines[4]


def test_compiled_blocks_match_eager():
    """--compile (torch.compile of each block, in place) on CPU equals eager within fp32 tolerance."""
    D = tiny_D(depth=1)
    xs, c = rand_scales(), torch.tensor([1, 2, 3])
    want = D(xs, c)
    for blk in D.blocks:
        blk.compile()
    assert torch.allclose(D(xs, c), want, atol=1e-5)
    assert set(D.state_dict()) == set(tiny_D(depth=1).state_dict())      # keys unchanged: checkpoints stay portable


def test_toy_run_with_evaluator(tmp_path, monkeypatch):
    """A few toy steps with fid.py's judges (fid.py train): the toy line with every summary, the cached judges,
    per-class values in metrics.jsonl, Eq. 1, the sample grid (one row per class, 1-pixel gaps) and the grid of real
    images. `fid.py RUN_DIR` on cat.py's own run of the same options prints the same toy line."""
    opts = TINY + ['--steps', '2', '--eval-every', '2', '--eval-n', '100']
    run = train_judged(opts + ['--out', str(tmp_path / 'r')])['run_dir']
    log = open(os.path.join(run, 'log.txt')).read().splitlines()
    assert log[-1].startswith('toy: shape_acc=') and all(f' {k}=' in log[-1] for k in fid.TOY_SUMMARY[1:] + cat.EQ1_SUMMARY)
    plain = run_cat(opts + ['--out', str(tmp_path / 'plain')])
    monkeypatch.setattr(sys, 'argv', ['fid.py', plain])
    fid.main()
    assert open(os.path.join(plain, 'log.txt')).read().splitlines()[-1] == log[-1]
    assert os.path.exists(os.path.join(plain, 'measured-0000002.png'))
    assert any(line.startswith('shape_judge: ') for line in log)
    rows = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
    ev = [r for r in rows if 'class_acc' in r][0]
    assert 0 <= ev['class_acc'] <= 1 and ev['fd'] > ev['fd_floor'] > 0 and all(f'delta_{k}' in ev for k in range(3))
    assert ev['min_class_acc'] == min(ev[f'class_acc_{k}'] for k in range(10)) and 'diversity_9' in ev
    assert ev['features'].startswith('judge') and 0 <= ev['recall'] <= 1 and 0 < ev['recall_floor'] <= 1
    assert os.path.exists(os.path.join(run, 'judge.pt'))
    for name in ('samples-0000002.png', 'reals.png'):       # 10 rows x 10 seeds of 16 px x 4, 1-pixel gaps
        assert Image.open(os.path.join(run, name)).size == (10 * 65 + 1, 10 * 65 + 1)


def test_sample_then_fid_on_toy_checkpoint(single, tmp_path):
    """sample.py's .npz of a toy checkpoint through fid.py with the stand-in detector, against real toy images."""
    det = _detector(tmp_path)
    x, _ = make_toy(64, seed=3)
    np.savez(tmp_path / 'ref.npz', arr_0=cat.to_uint8(x).numpy())
    r = _run(tmp_path, str(single), '--ref', str(tmp_path / 'ref.npz'), '--detector', det,
             '--json', str(tmp_path / 'm.json'))
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / 'm.json'))
    assert m['num_samples'] == 10 and math.isfinite(m['fid']) and m['fid'] > 0


def test_d_step_with_repa_trains_the_projector():
    """The D step with REPA: a small randomly initialized timm DINOv2 (same interface, 16 x 16 patches at 224)."""
    import timm
    dino = timm.create_model(cat.DINO_NAME, pretrained=False, img_size=224, num_classes=0, depth=1, embed_dim=64,
                             num_heads=2).eval().requires_grad_(False)
    dino.register_buffer('pixel_mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    dino.register_buffer('pixel_std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    G = cat.Generator(depth=4, width=32, heads=2, channels=4, res=32, num_classes=5)
    D = cat.Discriminator(depth=1, width=32, heads=2, channels=4, res=32, num_classes=5, cmap_dim=16, repa_dim=64)
    args = cat.get_args(['--model', 'T', '--precision', 'fp32'])
    step = cat.DStep(D, G, args, dino)
    noise, aug = cat.step_noise(0, 0, 4, G, D.scales, torch.device('cpu'))
    img = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8)
    loss, st = step(torch.randn(4, 4, 32, 32), torch.tensor([0, 1, 2, 3]), img, noise, aug)
    loss.backward()
    assert 0 < st['repa'] < 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.proj.parameters())


def github_anchor(heading):
    """GitHub's id of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_readme_and_docs_links_resolve():
    """Every relative link and image in README.md and docs/*.md names a file that exists, and every #anchor a heading
    of its page: what a reader clicks on GitHub works."""
    pages = [os.path.join(HERE, 'README.md')] + sorted(glob.glob(os.path.join(HERE, 'docs', '*.md')))
    anchors = {p: {github_anchor(h) for h in re.findall(r'^#+ (.+)$', open(p).read(), re.M)} for p in pages}
    bad, n = [], 0
    for page in pages:
        text = re.sub(r'```.*?```', '', open(page).read(), flags=re.S)         # code blocks hold no links
        for target in re.findall(r'!?\[[^\]]*\]\(([^)\s]+)\)', text) + re.findall(r'src="([^"]+)"', text):
            if re.match(r'[a-z]+:', target):
                continue                                                        # http(s), mailto
            n += 1
            path, _, anchor = target.partition('#')
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                bad.append(f'{os.path.relpath(page, HERE)}: {target} (no such file)')
            elif anchor and file.endswith('.md') and anchor not in anchors.get(file, set()):
                bad.append(f'{os.path.relpath(page, HERE)}: {target} (no such heading)')
    assert len(pages) >= 6 and n >= 20, (len(pages), n)
    assert not bad, bad
