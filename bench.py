"""
Cost of CAT (Table 2, App. A.2): parameters, multiply-adds and per-GPU memory of any configuration without a GPU, and
timed training iterations on synthetic ImageNet-shaped batches. Every other option is cat.py's.

    python bench.py --model H                            # params, GFLOPs (Table 6), GPU memory estimate; no GPU
    python bench.py --model H --batch-size 32 --grad-ckpt        # the memory of another configuration
    python bench.py --model B --time [--compile]         # timed iterations (batch 64 per GPU), MFU, peak memory
    torchrun --nproc_per_node=8 bench.py --model H --time        # the same with DDP
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import cat

PAPER_STEPS = {'B': 50_000, 'M': 100_000, 'H': 150_000}          # 20 / 40 / 60 epochs at batch 512 (Sec. 4)
PEAK_BF16_TFLOPS = {'H100': 989.4, 'H200': 989.4, 'A100': 312.0, 'L40S': 362.0}     # dense, spec sheets


def count_macs(fn):
    """Multiply-adds (FLOPs / 2) of fn(); attention through the math path, so that it is counted on any device."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.nn.attention import sdpa_kernel, SDPBackend
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops() / 2


def imagenet_shapes(args):
    """(info, G config, D config) of ImageNet-256's shapes: latents, or RGB pixels at the finest of --scales."""
    res = args.scales[-1] if args.scales else 32
    latent = res == 32
    info = dict(kind='latent' if latent else 'pixel', channels=4 if latent else 3, res=res, num_classes=1000)
    return (info, *cat.model_configs(args, info))


def cost(args, g_cfg, d_cfg):
    """Meta-device G, D and vision-aided backbone (or None), and App. A.2's multiply-adds per sample: F_G, F_D, F_va
    and an iteration's 4 F_G + 10.5 F_D + 5 F_va (four passes of the backbone and one backward)."""
    import timm
    with torch.device('meta'):
        G = cat.Generator(**g_cfg)
        D = cat.Discriminator(**d_cfg)
        c = torch.zeros(1, dtype=torch.long)
        F_G = count_macs(lambda: G(torch.randn(1, G.z_dim), c))
        F_D = count_macs(lambda: D(cat.multiscale(torch.randn(1, D.channels, D.res, D.res), D.scales), c))
        va = timm.create_model(args.va_model, pretrained=False, num_classes=0) if args.lambda_va > 0 else None
        F_va = count_macs(lambda: va(torch.randn(1, 3, 224, 224))) if va else 0
    return G, D, va, dict(F_G=F_G, F_D=F_D, F_va=F_va, train=4 * F_G + 10.5 * F_D + 5 * F_va)


def summary(args, out=print, memory=True):
    info, g_cfg, d_cfg = imagenet_shapes(args)
    G, D, va, f = cost(args, g_cfg, dict(d_cfg, repa_dim=768))
    n_proj, n_va = cat.n_params(D.proj), cat.n_params(D.va)
    n_d = cat.n_params(D) - n_proj - n_va
    data = 'latents' if info['kind'] == 'latent' else 'RGB pixels'
    out(f"config: {config_name(args, D)} (G depth {g_cfg['depth']}, width {g_cfg['width']}, heads {g_cfg['heads']}; D depth "
        f"{d_cfg['depth']}, width {d_cfg['width']}, heads {d_cfg['heads']}); {info['res']}x{info['res']} {data}, "
        f"scales {','.join(map(str, D.scales))}, D patches {','.join(map(str, D.patches))}, token grids "
        f"{','.join(map(str, D.grids))}")
    out(f"G params: {cat.n_params(G) / 1e6:.1f}M")
    out(f"D params: {n_d / 1e6:.1f}M (+ REPA projector {n_proj / 1e6:.1f}M, training only)")
    out(f"G GFLOPs: {f['F_G'] / 1e9:.1f} (multiply-adds per sample, one-step inference)")
    out(f"D GFLOPs: {f['F_D'] / 1e9:.1f} (all {len(D.scales)} scales, {D.segments[-1][1]} tokens)")
    if va:
        out(f"vision-aided: {args.va_model} {cat.n_params(va) / 1e6:.1f}M frozen params, {f['F_va'] / 1e9:.1f} GFLOPs at "
            f"224 px; head {n_va / 1e6:.2f}M (in D)")
    out(f"train GFLOPs per sample per iteration (App. A.2, 4F_G + 10.5F_D{' + 5F_va' if va else ''}): "
        f"{f['train'] / 1e9:.1f}")
    if args.model in PAPER_STEPS:
        # App. A.3: B/2, 40 epochs
        steps = PAPER_STEPS[args.model] if info['kind'] == 'latent' else 100_000
        flop = 2 * f['train'] * 512 * steps                 # 2 FLOPs per multiply-add
        hours = flop / (8 * 0.4 * PEAK_BF16_TFLOPS['H100'] * 1e12) / 3600
        out(f"paper schedule: {steps} iterations x batch 512 = {flop / 1e18:.0f} EFLOP; at 40% MFU on 8 H100 "
            f"(989 TFLOP/s bf16 dense) {hours:.1f} h (model FLOPs only: data loading, DINOv2 and EMA excluded)")
    r = None
    try:
        r = memory_estimate(args) if memory else None
    except Exception as e:                          # one line, never a traceback
        out(f"memory per GPU: the estimate failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})")
    if r:
        gib = {k: f'{v / 2**30:.2f}' for k, v in dict(r, world=r['peak'] + r['ddp']).items()}
        micro = f' (micro {args.micro_batch})' if args.micro_batch else ''
        out(f"memory per GPU at batch {args.batch_size}/GPU{micro}, {args.precision}, grad-ckpt "
            f"{('off', 'on')[args.grad_ckpt]}: peak {gib['peak']} GiB; world > 1: {gib['world']} GiB\n"
            f"  = G, D params+buffers {gib['params']} + EMA {gib['ema']} + frozen DINOv2/ConvNeXt {gib['frozen']} + "
            f"AdamW {gib['opt']} + gradients at the peak {gib['grads']} + activations and temporaries {gib['act']} "
            f"GiB (world > 1: + DDP buckets {gib['ddp']})\n  an estimate: train_step on fake tensors on the CPU, "
            f"CUDA's flash attention and fused rms_norm modelled; check on a GPU: torch.cuda.max_memory_allocated "
            f"(bench.py --time prints it)")
    return dict(G_params=cat.n_params(G), D_params=n_d, proj_params=n_proj, memory=r, **f)


def config_name(args, D):
    """'G-B/2 + D-B/2' (patch sizes after the slash; App. A.3: 'G-B/16 + D-B/8,16')."""
    d_patches = ','.join(map(str, sorted(set(D.patches))))
    return f"G-{args.model}/{args.patch or 2} + D-{args.model_d or cat.D_FOR_G[args.model]}/{d_patches}"


class CudaRMSNorm(torch.autograd.Function):
    """rms_norm's memory on CUDA, for memory_estimate (values never read): fused, in fp32 under autocast (the CPU's
    runs in bf16), saving its input and an fp32 rstd. Attention needs none: the CPU's flash kernel saves what CUDA's
    do."""

    @staticmethod
    def forward(ctx, x, w, n):
        ctx.save_for_backward(x, x.new_empty((*x.shape[:x.dim() - n], *[1] * n), dtype=torch.float32), w)
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx, g):
        x, _, w = ctx.saved_tensors
        return x.new_empty(x.shape), w.new_empty(w.shape) if ctx.needs_input_grad[1] else None, None

    @staticmethod
    def rms_norm(x, shape, w=None, eps=None):
        """F.rms_norm's stand-in."""
        if torch.is_autocast_enabled('cpu'):
            x, w = x.float(), w.float() if w is not None else None
        return CudaRMSNorm.apply(x, w, len(shape))


def memory_estimate(args):
    """Per-GPU bytes of a training iteration, on a CPU: cat.train_step on fake tensors with CUDA's rms_norm; the peak of
    the second iteration (AdamW's state exists then)."""
    from unittest import mock
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _update_peak_stats(self, state):
            # the global peak only (the per-module peaks cost 10x the time)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap['Total']:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap['Total'], dict(snap)

        def _track_module_params_and_buffers(self, mod, install_grad_hooks=True):
            # no gradient hooks on frozen modules: they fail there
            trainable = all(p.requires_grad for p in mod.parameters())
            return super()._track_module_params_and_buffers(mod, install_grad_hooks and trainable)

        def _pre_fw_hook(self, mod, inputs):
            # a step module again in a forward pass: the next micro-batch, not a new iteration
            if mod in (m.d_step, m.g_step) and not self._mod_tracker.is_bw:
                self.memory_tracking.pop(mod, None)
            super()._pre_fw_hook(mod, inputs)

    info, g_cfg, d_cfg = imagenet_shapes(args)
    b, latent = args.batch_size, info['kind'] == 'latent'
    args = argparse.Namespace(**{**vars(args), 'compile': 0})
    with torch.device('meta'):
        m = cat.build(args, g_cfg, d_cfg, torch.device('meta'), 1, pretrained=False)
    nets = [net for net in (m.G, m.D, m.ema, *m.d_step._dino, *m.d_step._va) if net is not None]
    with FakeTensorMode(), mock.patch.object(F, 'rms_norm', CudaRMSNorm.rms_norm):
        for net in nets:                            # meta -> fake CPU tensors; fused AdamW as on CUDA
            net._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype))
        m = m._replace(opt_g=cat.adamw(m.G, args, True), opt_d=cat.adamw(m.D, args, True))
        tracker = Tracker()
        C, R = info['channels'], info['res']
        c = torch.zeros(b, dtype=torch.long)
        # bench()'s batch: posterior moments, or uint8 pixels
        x = torch.empty(b, 2 * C, R, R) if latent else torch.empty(b, C, R, R, dtype=torch.uint8)
        dino_img = None
        if args.lambda_repa > 0:
            dino_img = torch.empty(b, 3, 256, 256, dtype=torch.uint8) if latent else x
        for step in range(2):
            if step:
                tracker.track_external(*nets, m.opt_g, m.opt_d, x, c, dino_img)
                tracker.__enter__()
            noise, aug = cat.step_noise(args.seed, step, b, m.G, m.D.scales, 'cpu')
            x_model = cat.data_x(x, noise['posterior_eps'], dict(info, scale=0.18215))
            cat.train_step(m, x_model, c, dino_img, noise, aug, args)
        tracker.__exit__(None, None, None)
    peak = next(iter(tracker.get_tracker_snapshot('peak').values()))
    snap = {getattr(k, 'value', k): v for k, v in peak.items()}

    def nbytes(*modules):
        return sum(t.nbytes for module in modules for t in [*module.parameters(), *module.buffers()])

    r = dict(params=nbytes(m.G, m.D), ema=nbytes(m.ema), frozen=nbytes(*nets[3:]), opt=snap['Optstate'],
             grads=snap['Gradient'])
    ddp = sum(p.nbytes for p in m.G.parameters()) + sum(p.nbytes for p in m.D.parameters())
    return dict(r, peak=snap['Total'], act=snap['Total'] - sum(r.values()), ddp=ddp)


def bench(args, out=print):
    """The median time of --bench-steps iterations after --bench-warmup, each printed; REPA with a random DINOv2-B."""
    rank, world, device = cat.setup_ddp()
    out = out if rank == 0 else (lambda line: None)        # one report, from rank 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    info, g_cfg, d_cfg = imagenet_shapes(args)
    m = cat.build(args, g_cfg, d_cfg, device, world, pretrained=False)
    b = args.batch_size // world
    C, R = info['channels'], info['res']
    cuda = device.type == 'cuda'
    g = torch.Generator(device).manual_seed(0)
    if info['kind'] == 'latent':
        batch = torch.cat([torch.randn(b, C, R, R, generator=g, device=device),
                           torch.rand(b, C, R, R, generator=g, device=device)], 1)
    else:
        batch = torch.randint(0, 256, (b, C, R, R), generator=g, device=device, dtype=torch.uint8)
    c = torch.randint(0, 1000, (b,), generator=g, device=device)
    dino_img = None
    if args.lambda_repa > 0:
        dino_img = batch if info['kind'] != 'latent' else torch.randint(0, 256, (b, 3, 256, 256), generator=g,
                                                                   device=device, dtype=torch.uint8)
    name = torch.cuda.get_device_name(device) if cuda else f'CPU ({torch.get_num_threads()} threads)'
    out(f"bench {name}: {config_name(args, m.D)}, {R}x{R}x{C} {info['kind']}, batch {b}/device (micro {m.micro}), "
        f"{args.precision}, REPA {'on' if dino_img is not None else 'off'}, vision-aided "
        f"{('off', 'on')[args.lambda_va > 0]}, compile={args.compile}, grad_ckpt={args.grad_ckpt}"
        + ("" if cuda else " (no CUDA: fp32 and no DINOv2 unless --precision / --lambda-repa)"))
    times = []
    for step in range(args.bench_warmup + args.bench_steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        noise, aug = cat.step_noise(0, step, args.batch_size, m.G, m.D.scales, device)
        noise, aug = cat.take(noise, rank * b, (rank + 1) * b), cat.take(aug, rank * b, (rank + 1) * b)
        x = cat.data_x(batch, noise['posterior_eps'], dict(info, scale=0.18215))
        cat.train_step(m, x, c, dino_img, noise, aug, args)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        out(f"  iteration {step + 1}: {times[-1] * 1e3:.1f} ms{' (warm-up)' if step < args.bench_warmup else ''}")
        if step == args.bench_warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
    t = float(np.median(times[args.bench_warmup:]))
    tflops = 2 * cost(args, g_cfg, d_cfg)[-1]['train'] * b / t / 1e12
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else 'n/a (CPU)'
    out(f"  {t * 1e3:.1f} ms/it (median of {args.bench_steps}), {b / t:.1f} img/s/device, {tflops:.3g} TFLOP/s "
        f"(App. A.2 model FLOPs), MFU {f'{100 * tflops / peak:.1f}%' if peak else 'n/a'}, peak memory {mem}")
    return dict(device=name, batch_per_device=b, ms_per_it=t * 1e3, img_per_s_per_device=b / t, tflops=tflops,
                mfu=tflops / peak if peak else None, peak_mem=mem)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="CAT's cost: a summary (default) or timed iterations (--time); every "
                                            "other option is cat.py's (batch 64 per GPU unless given)")
    p.add_argument('--time', action='store_true', help='time training iterations on synthetic batches')
    p.add_argument('--bench-steps', type=int, default=10)
    p.add_argument('--bench-warmup', type=int, default=3)
    p.add_argument('--peak-tflops', type=float, help='device peak for MFU (default: known GPUs)')
    p.add_argument('--no-memory', action='store_true', help='skip the memory estimate of the summary')
    own, rest = p.parse_known_args(argv)
    given = set(a.split('=')[0] for a in rest)
    if '--batch-size' not in given:
        rest += ['--batch-size', '64']          # one GPU's share of 512
    if not own.time and '--precision' not in given:
        rest += ['--precision', 'bf16']         # the summary describes a GPU run
    if own.time and not torch.cuda.is_available() and '--lambda-repa' not in given:
        rest += ['--lambda-repa', '0']          # no DINOv2 on a CPU unless asked for
    return argparse.Namespace(**vars(cat.get_args(rest)), **vars(own))


def main(argv=None):
    args = get_args(argv)
    if args.time:
        return bench(args)
    return summary(args, memory=not args.no_memory)


if __name__ == '__main__':
    main()
