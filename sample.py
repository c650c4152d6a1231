"""
One-step samples from a CAT checkpoint: an ADM-format .npz (arr_0 uint8 [N, H, W, 3], arr_1 the classes) for
FID-50K and a grid PNG. Latent checkpoints decode through their data set's VAE; pixel-space ones (the toy set, data
prepared with --vae none) need none, and their small images are enlarged in the PNGs (not in the .npz).

    python sample.py --ckpt runs/000-H/latest.pt                         # 50,000 EMA samples next to the checkpoint
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num-samples 50000 --psi 0.85   # the same images, 8 GPUs
    python sample.py --ckpt CKPT --num-samples 0 --stages --interp --analyze   # research views only, no .npz

Sample i draws its z, and by default its class, from its own seed (seed * 1_000_003 + i), and each process takes a
contiguous run of --batch-sized batches, so the .npz is the same image for image whatever the number of processes
(for the same --batch). Ranks write their parts next to --out (a filesystem all ranks share); rank 0 joins them.
--num is an alias of --num-samples, except under torchrun, whose own parser takes '--num' for --numa-binding.

Truncation, --psi, is StyleGAN's: w <- w_avg[c] + psi (w - w_avg[c]); psi = 1 none, psi = 0 the class mean w_avg[c].
GAT's generator lerps the other way: its truncation_psi p computes w.lerp(w_avg[c], p), i.e.
w_avg[c] + (1 - p)(w - w_avg[c]) (GAT's models/generator.py; its generate.py defaults to p = 0.3, and p = 0 is none),
so GAT's p is our 1 - p. The CAT paper gives psi = 0.85 for CAT-H/2 (Figs. 12-14) without naming the convention; as
far as we can tell it is StyleGAN's (in GAT's sense it would keep only 15 % of w - w_avg[c], far too strong for
uncurated samples), i.e. --psi 0.85 here.
"""
import argparse
import json
import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cat

SEED_STRIDE = 1_000_003     # sample i of --seed s uses the seed s * SEED_STRIDE + i


def sample_inputs(idx, args, z_dim, num_classes):
    """z_i ~ N(0, I) and class c_i for the sample indices idx, each drawn from its own seed."""
    gens = [torch.Generator().manual_seed(args.seed * SEED_STRIDE + i) for i in idx]
    z = torch.stack([torch.randn(z_dim, generator=g) for g in gens])
    if args.classes:
        c = [args.classes[i % len(args.classes)] for i in idx]
    elif args.class_balanced:
        c = [i % num_classes for i in idx]
    else:
        c = [int(torch.randint(num_classes, (), generator=g)) for g in gens]
    return z, torch.tensor(c)


def write_npz(path, parts, labels):
    """ADM-format .npz: arr_0 the images, streamed part by part so no process holds all N, and arr_1 their classes
    (as ADM's class-conditional sample files); atomic."""
    n, shape = sum(len(p) for p in parts), parts[0].shape[1:]
    tmp = path + '.tmp'
    with zipfile.ZipFile(tmp, 'w', allowZip64=True) as zf:
        with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, dict(descr='|u1', fortran_order=False, shape=(n, *shape)))
            for p in parts:
                for i in range(0, len(p), 1024):
                    f.write(np.ascontiguousarray(p[i:i + 1024]).tobytes())
        with zf.open('arr_1.npy', 'w') as f:
            np.lib.format.write_array(f, np.asarray(labels, np.int64))
    os.replace(tmp, path)

# ----------------------------------------------------------------------------------------------
# Research views (rank 0): stages h_0..h_K, cross-scale metrics (Eq. 1), latent interpolation (Fig. 10).
# ----------------------------------------------------------------------------------------------


def stages(G, args, info, vae, device, path):
    z, c = sample_inputs(range(8), args, G.z_dim, G.num_classes)
    with cat.autocast(args.precision, device):
        # [K+1, 8, C, R, R]
        hs = cat.generate(G, z.to(device), c.to(device), args.psi, args.batch, all_stages=True)
    cat.save_grid(cat.decode(hs.transpose(0, 1).flatten(0, 1).float(), info, vae), hs.shape[0], path)
    print(f'wrote {path} (rows: samples 0-7, columns: h_0..h_{G.stages - 1})')


def analyze(G, args, device, scales):
    n = min(args.num or 1000, 1000)
    z, c = sample_inputs(range(n), args, G.z_dim, G.num_classes)
    with cat.autocast(args.precision, device):
        hs = cat.generate(G, z.to(device), c.to(device), args.psi, args.batch, all_stages=True)
    m = {name: v + [sum(v) / len(v)] for name, v in cat.cross_scale_metrics(list(hs.float()), scales).items()}
    print(f'cross-scale metrics (Eq. 1) over {n} samples, psi {args.psi:g}; floor: the same with h_k = h_K')
    print(f"{'':14}" + ''.join(f'{col:>9}' for col in [f'k={k}' for k in range(G.stages - 1)] + ['mean']))
    for name in ('delta', 'R', 'A', 'delta_h'):
        for key in (name, name + '_floor'):
            if key in m:
                print(f"{key.replace('_floor', ' floor'):14}" + ''.join(f'{v:9.4f}' for v in m[key]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, psi=args.psi, n=n, **m),
                      f, indent=1)
        print(f'wrote {args.json}')


def interp(G, args, info, vae, device, path, steps=8):
    """4 rows: w = lerp(w_0, w_1, t) between samples (0, 1), (2, 3), (4, 5), (6, 7), each truncated by --psi."""
    z, c = sample_inputs(range(8), args, G.z_dim, G.num_classes)
    z, c = z.to(device), c.to(device)
    with cat.autocast(args.precision, device):
        w = G.truncate(G.style(z, c), c, args.psi).float()
        t = torch.linspace(0, 1, steps, device=device)[None, :, None]
        h = G.synthesis(w[0::2, None].lerp(w[1::2, None], t).flatten(0, 1))[-1]
    cat.save_grid(cat.decode(h.float(), info, vae), steps, path)
    print(f'wrote {path} (rows: samples 0>1, 2>3, 4>5, 6>7 in {steps} steps)')


def curves(runs, path):
    """Fig. 4's layout from training logs: delta_k, R_k, A_k (and delta_h_k, not in the paper) of every evaluation in
    each run's metrics.jsonl against the iteration; one colour per stage k, one line style per run (solid, dashed,
    ...). R_{K-1} = delta_{K-1} and A_{K-1} = 1 by definition and are left out. When the runs logged Eq. 1's floor
    (every stage replaced by the final output), a second row shows how far above it (A: below) each stage is.
    runs: 'RUN_DIR' or 'RUN_DIR=label'."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --curves draws with matplotlib, which is not installed: "
                         "pip install matplotlib (the numbers themselves are in each run's metrics.jsonl).")
    data = []
    for run in runs:
        run_dir, _, label = run.partition('=')
        metrics = os.path.join(run_dir, 'metrics.jsonl')
        if not os.path.exists(metrics):
            raise SystemExit(f"error: {metrics} not found: --curves takes run directories written by cat.py.")
        data.append((label or os.path.basename(run_dir),
                     [r for r in map(json.loads, open(metrics)) if 'delta_0' in r]))
    # K of the first run
    K = sum(f'delta_{k}' in data[0][1][0] for k in range(64)) if data[0][1] else 3
    panels = [('delta', K, 'distance to the final stage $\\delta_k$'), ('R', K - 1, 'rewrite $R_k$'),
              ('A', K - 1, 'rewrite alignment $A_k$'),
              ('delta_h', K, '$\\delta^h_k$ on raw $h_k$ (not in the paper)')]
    # second row when every run logged Eq. 1's floor (h_k = h_K):
    # how far each stage is above what pooling leaves
    floors = all(rows and 'delta_floor_0' in rows[0] for _, rows in data)
    fig, axes = plt.subplots(1 + floors, len(panels), figsize=(4.2 * len(panels), 3.4 * (1 + floors)),
                             squeeze=False)
    for (label, rows), style in zip(data, ['-', '--', ':', '-.']):
        steps = [r['step'] for r in rows]
        for ax, (name, n, title) in zip(axes[0], panels):
            for k in range(n):
                ax.plot(steps, [r[f'{name}_{k}'] for r in rows], style, color=f'C{k}')
            ax.set_title(title, fontsize=10)
        for ax, (name, n, _) in zip(axes[1] if floors else [], panels[:3]):
            sign = -1 if name == 'A' else 1                     # A: how far below its floor
            for k in range(n):
                ax.plot(steps, [sign * (r[f'{name}_{k}'] - r[f'{name}_floor_{k}']) for r in rows], style,
                        color=f'C{k}')
            ax.axhline(0, color='gray', lw=0.5)
            sym = {'delta': '$\\delta_k$', 'R': '$R_k$', 'A': '$A_k$'}[name]
            ax.set_title(f"{sym} {'below' if sign < 0 else 'above'} its floor (all stages = $h_K$)",
                         fontsize=10)
        axes[0, -1].plot([], [], style, color='gray', label=label)
    if floors:
        axes[1, -1].axis('off')
    for ax in axes.flat:
        ax.set_xlabel('iteration')
    for k in range(K):
        axes[0, -1].plot([], [], color=f'C{k}', label=f'stage k = {k}')
    fig.legend(*axes[0, -1].get_legend_handles_labels(), loc='lower center', ncol=8, fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07 / (1 + floors), 1, 1))
    fig.savefig(path, dpi=110)
    print(f'wrote {path}')


def exact_gp(D, xs, c):
    """What the approximated R1/R2 estimates: per sample, the mean over scales k of ||grad_x d_k||^2 (x = all scales;
    with the block-diagonal mask only x_k counts), by double backprop in full fp32 with the math attention kernel."""
    from torch.nn.attention import sdpa_kernel, SDPBackend
    xs = [x.detach().float().requires_grad_(True) for x in xs]
    with cat.no_autocast(xs[0].device), cat.full_fp32(), sdpa_kernel(SDPBackend.MATH):
        d = D(xs, c)
        sq = [g.flatten(1).square().sum(1) for k in range(d.shape[1])
              for g in torch.autograd.grad(d[:, k].sum(), xs, create_graph=True)]
    return sum(sq) / d.shape[1]


def gp_check(ckpt, n=64, seed=0, draws=8, out=print):
    """For the D of checkpoint ckpt, on n real and n fake samples (augmented as in training):
    exact R1 / R2 (fp32 double backprop) against the approximated penalty averaged over `draws` perturbations, for
    the bf16 and the fp32 path; ratio estimate / exact and cosine between their gradients w.r.t. D's parameters."""
    ck = load_weights(ckpt)
    cfg, a = ck['config'], argparse.Namespace(**ck['config']['args'])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    G, D = cat.Generator(**cfg['G']).to(device), cat.Discriminator(**cfg['D']).to(device)
    G.load_state_dict(ck['G'])
    D.load_state_dict(ck['D'])
    G.requires_grad_(False)
    D.requires_grad_(False)
    g = torch.Generator(device).manual_seed(seed)
    info, ds = cat.open_data(argparse.Namespace(**{**vars(a), 'lambda_repa': 0.0}))
    if info['kind'] == 'toy':
        x, c = ds[0][:n].to(device), ds[1][:n].to(device)
    else:
        items = [ds[i] for i in range(n)]
        m = torch.stack([t[0] for t in items]).to(device)
        c = torch.tensor([t[1] for t in items], device=device)
        eps = torch.randn(n, G.channels, G.res, G.res, generator=g, device=device)
        x = cat.data_x(m, eps, info)
    with torch.no_grad():
        fake = torch.cat(G(torch.randn(n, G.z_dim, generator=g, device=device), c))
    if a.aug:
        x, fake = (cat.augment(t, cat.draw_aug(n, G.res, g, device)) for t in (x, fake))
    params = [p for name, p in D.named_parameters() if not name.startswith('proj.')]
    D.requires_grad_(True)

    def flat(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return torch.cat([t.flatten() for t in grads])

    res = {}
    for name, xs in (('R1', cat.multiscale(x, D.scales)),
                     ('R2', cat.multiscale(fake.chunk(G.stages), D.scales))):
        exact = exact_gp(D, xs, c).mean()
        g_exact = flat(exact)
        res[name] = dict(exact=exact.item())
        for prec in ('bf16', 'fp32'):
            est, g_est = 0.0, 0.0
            for _ in range(draws):
                eps = [torch.randn(x.shape, generator=g, device=device) for x in xs]
                e = cat.approx_gp_pass(D, xs, eps, c, a.gp_sigma, prec).mean() / draws
                est, g_est = est + e.item(), g_est + flat(e)
            res[name][prec] = dict(ratio=est / exact.item(),
                                   cos=F.cosine_similarity(g_est, g_exact, dim=0).item())
    out(f"gp-check {ckpt} (step {ck['step']}): {n} real / {n} fake samples, sigma {a.gp_sigma}, "
        f"{draws} perturbations, {'augmented' if a.aug else 'no augmentation'}")
    for name, r in res.items():
        out(f"  {name}: exact {r['exact']:.4g} | bf16 path: {r['bf16']['ratio']:.3g} x exact, "
            f"gradient cosine {r['bf16']['cos']:.3f} | fp32 path: {r['fp32']['ratio']:.3g} x exact, "
            f"gradient cosine {r['fp32']['cos']:.3f}")
    return res

# ----------------------------------------------------------------------------------------------
# Samples for FID: each rank a contiguous run of batches, rank 0 joins the parts in order.
# ----------------------------------------------------------------------------------------------


def sample_npz(G, args, info, vae, device, rank, world, out):
    nb = -(-args.num // args.batch)
    # rank 0 gets the longest run, so it always has images
    runs = np.array_split(np.arange(nb), world)

    def part(r):
        return f'{out}.part{r}.npy'

    mine = []
    pbar = tqdm(total=args.num, unit='img', disable=rank != 0, desc=f'sampling ({world} process(es))')
    for j in runs[rank]:
        idx = range(j * args.batch, min((j + 1) * args.batch, args.num))
        z, c = sample_inputs(idx, args, G.z_dim, G.num_classes)
        with cat.autocast(args.precision, device):
            h = G(z.to(device), c.to(device), args.psi)[-1]
        mine.append(cat.decode(h.float(), info, vae))
        pbar.update(min(len(idx) * world, pbar.total - pbar.n))   # ranks run in step: rank 0's rate x world
    pbar.close()
    mine = torch.cat(mine).numpy() if len(mine) else None
    if rank > 0 and mine is not None:
        np.save(part(rank), mine)
    if world > 1:
        dist.barrier()
    if rank == 0:
        parts = [mine] + [np.load(part(r), mmap_mode='r') for r in range(1, world) if len(runs[r])]
        write_npz(out, parts, sample_inputs(range(args.num), args, G.z_dim, G.num_classes)[1].numpy())
        grid = os.path.splitext(out)[0] + '.png'
        cat.save_grid(torch.from_numpy(np.concatenate([p[:64] for p in parts])[:64]), 8, grid)
        for r in range(1, world):
            if len(runs[r]):
                os.remove(part(r))
        print(f'wrote {out} ({args.num} images, {mine.shape[1]}x{mine.shape[2]}) and {grid}')


def export(ck, path, dtype, overwrite):
    """The EMA generator's weights (w_avg included) as safetensors, the checkpoint's config as JSON metadata: what
    sampling needs, with no optimizer state and no pickle (nothing in it can run code when it is opened)."""
    from safetensors.torch import save_file
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: '{path}' exists: pass --overwrite to replace it, or choose another "
                         "--export.")
    cast = torch.bfloat16 if dtype == 'bf16' else torch.float32
    ema = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in ck['ema'].items()}
    meta = dict(format='cat', version=ck.get('version'), step=ck['step'], config=ck['config'], dtype=dtype)
    save_file(ema, path + '.tmp', metadata={'cat': json.dumps(meta)})
    os.replace(path + '.tmp', path)
    n = sum(v.numel() for v in ema.values())
    print(f"wrote {path}: EMA generator of step {ck['step']}, {n / 1e6:.1f}M values in {dtype} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description='One-step samples from a CAT checkpoint: ADM .npz + grid PNG.')
    p.add_argument('--ckpt', help='checkpoint written by cat.py (latest.pt, ckpt-*.pt)')
    p.add_argument('--gp-check', type=int, nargs='?', const=64, metavar='N',
                   help="exact vs approximated R1/R2 of the checkpoint's D on N real and N fake "
                        "samples (64), and exit")
    p.add_argument('--curves', nargs='+', metavar='RUN[=LABEL]',
                   help='plot Eq. 1 over training from run directories (Fig. 4 layout) to --out PNG, '
                        'and exit')
    p.add_argument('--export', metavar='FILE.safetensors',
                   help="write the EMA generator and its config to a safetensors file (for sharing), "
                        "and exit")
    p.add_argument('--export-dtype', choices=['fp32', 'bf16'], default='fp32',
                   help='fp32: samples identical to the checkpoint\'s; bf16: half the size, samples differ '
                        'slightly')
    p.add_argument('--weights', choices=['ema', 'raw'], default='ema', help="EMA generator, or the raw 'G'")
    p.add_argument('--num-samples', '--num', dest='num', type=int, default=50_000,
                   help='number of samples (0: no .npz, research views only); --num is an alias '
                        '(not under torchrun)')
    p.add_argument('--batch', type=int, default=256, help='samples per forward pass, per process')
    p.add_argument('--psi', type=float, default=1.0,
                   help='truncation, StyleGAN convention: 1 none, 0 w_avg[c]')
    p.add_argument('--seed', type=int, default=0,
                   help='sample i draws z (and its class) from seed * 1_000_003 + i')
    cls = p.add_mutually_exclusive_group()
    cls.add_argument('--classes', type=lambda s: [int(c) for c in s.split(',')],
                     help='comma-separated class ids; sample i gets the (i %% len)-th '
                          '(default: random per sample)')
    cls.add_argument('--class-balanced', action='store_true',
                     help='sample i gets class i %% num_classes (class counts differ by at most one)')
    p.add_argument('--out',
                   help='.npz path (default: samples-STEP-WEIGHTS-psiPSI-seedSEED-NUM.npz by the checkpoint)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing .npz')
    p.add_argument('--precision', choices=['bf16', 'fp32'],
                   help='autocast dtype (default: bf16 on CUDA, fp32 on CPU)')
    p.add_argument('--vae',
                   help="VAE for latent checkpoints, hub name or local directory (default: the dataset's)")
    p.add_argument('--stages', action='store_true',
                   help='PNG of h_0..h_K (columns) of the first 8 samples (rows)')
    p.add_argument('--analyze', action='store_true',
                   help='print delta_k, R_k, A_k (Eq. 1) over the first min(--num-samples, 1000) samples '
                        '(1000 if 0) and their floor (every stage replaced by the final output)')
    p.add_argument('--json', help='with --analyze: also write the metrics to this JSON file')
    p.add_argument('--interp', action='store_true', help='PNG of 4 rows x 8 steps interpolating w (Fig. 10)')
    args = p.parse_args(argv)
    if not args.ckpt and not args.curves:
        p.error('give --ckpt CKPT (or --curves RUN ... --out PNG)')
    if args.export and not args.export.endswith('.safetensors'):
        p.error(f'--export writes a .safetensors file: got {args.export}')
    if args.num < 0 or args.batch < 1:
        p.error('--num-samples must be >= 0 and --batch >= 1')
    if args.json and not args.analyze:
        p.error('--json needs --analyze')
    return args


def load_weights(path):
    """A training checkpoint (cat.load_checkpoint), or an --export: 'ema' and the config, read as safetensors."""
    if not path.endswith('.safetensors') or not os.path.isfile(path):
        return cat.load_checkpoint(path)
    from safetensors import safe_open
    try:
        with safe_open(path, 'pt', device='cpu') as f:
            meta = f.metadata() or {}
            ema = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SystemExit(f"error: cannot read '{path}' ({type(e).__name__}): truncated or not a safetensors file.")
    ck = dict(json.loads(meta.get('cat', '{}')), ema=ema)
    if ck.get('format') != 'cat' or 'config' not in ck:
        raise SystemExit(f"error: '{path}' is not a CAT export (written by sample.py --export).")
    return ck


def main(argv=None):
    args = get_args(argv)
    if args.curves:
        return curves(args.curves, args.out or 'curves.png')
    ck = load_weights(args.ckpt)
    if 'G' not in ck and (args.weights == 'raw' or args.gp_check):
        raise SystemExit(f"error: {args.ckpt} holds only the EMA generator: --weights raw and --gp-check "
                         f"need the training checkpoint (latest.pt, ckpt-*.pt).")
    if args.gp_check:
        return gp_check(args.ckpt, args.gp_check, args.seed)
    if args.export:
        return export(ck, args.export, args.export_dtype, args.overwrite)
    cfg, info = ck['config'], ck['config']['data']
    stem = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                        f'samples-{ck["step"]:07d}-{args.weights}-psi{args.psi:g}-seed{args.seed}')
    out = args.out or f'{stem}-{args.num}.npz'
    prefix = os.path.splitext(args.out)[0] if args.out else stem       # for the research PNGs
    if args.num and os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"error: '{out}' exists: pass --overwrite to replace it, or choose another --out.")
    if args.classes and not all(0 <= c < info['num_classes'] for c in args.classes):
        raise SystemExit(f"error: --classes must lie in 0..{info['num_classes'] - 1}.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    rank, world, device = cat.setup_ddp()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    G = cat.Generator(**cfg['G'])
    G.load_state_dict(ck['ema' if args.weights == 'ema' else 'G'])
    G = G.to(device).eval()
    del ck
    vae = cat.load_vae(args.vae or cfg['meta']['vae'], device) if info['kind'] == 'latent' else None

    if rank == 0:
        if args.stages:
            stages(G, args, info, vae, device, prefix + '-stages.png')
        if args.analyze:
            analyze(G, args, device, cfg['D'].get('scales') or cat.table6_scales(cfg['D']['res']))
        if args.interp:
            interp(G, args, info, vae, device, prefix + '-interp.png')
    if args.num:
        sample_npz(G, args, info, vae, device, rank, world, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
