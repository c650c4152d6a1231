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
import argparse, json, os, zipfile

import numpy as np
import torch
import torch.distributed as dist
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
        hs = cat.generate(G, z.to(device), c.to(device), args.psi, args.batch, all_stages=True)  # [K+1, 8, C, R, R]
    cat.save_grid(cat.enlarge(cat.decode(hs.transpose(0, 1).flatten(0, 1).float(), info, vae)), hs.shape[0], path)
    print(f'wrote {path} (rows: samples 0-7, columns: h_0..h_{cat.K})')


def analyze(G, args, device):
    n = min(args.num or 1000, 1000)
    z, c = sample_inputs(range(n), args, G.z_dim, G.num_classes)
    with cat.autocast(args.precision, device):
        hs = cat.generate(G, z.to(device), c.to(device), args.psi, args.batch, all_stages=True)
    m = {name: v + [sum(v) / len(v)] for name, v in cat.cross_scale_metrics(list(hs.float())).items()}
    print(f'cross-scale metrics (Eq. 1) over {n} samples, psi {args.psi:g}:')
    print(f"{'':8}" + ''.join(f'{col:>9}' for col in [f'k={k}' for k in range(cat.K)] + ['mean']))
    for name, vals in m.items():
        print(f'{name:8}' + ''.join(f'{v:9.4f}' for v in vals))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, psi=args.psi, n=n, **m), f, indent=1)
        print(f'wrote {args.json}')


def interp(G, args, info, vae, device, path, steps=8):
    """4 rows: w = lerp(w_0, w_1, t) between samples (0, 1), (2, 3), (4, 5), (6, 7), each truncated by --psi."""
    z, c = sample_inputs(range(8), args, G.z_dim, G.num_classes)
    z, c = z.to(device), c.to(device)
    with cat.autocast(args.precision, device):
        w = G.truncate(G.style(z, c), c, args.psi).float()
        t = torch.linspace(0, 1, steps, device=device)[None, :, None]
        h = G.synthesis(w[0::2, None].lerp(w[1::2, None], t).flatten(0, 1))[-1]
    cat.save_grid(cat.enlarge(cat.decode(h.float(), info, vae)), steps, path)
    print(f'wrote {path} (rows: samples 0>1, 2>3, 4>5, 6>7 in {steps} steps)')

# ----------------------------------------------------------------------------------------------
# Samples for FID: each rank a contiguous run of batches, rank 0 joins the parts in order.
# ----------------------------------------------------------------------------------------------


def sample_npz(G, args, info, vae, device, rank, world, out):
    nb = -(-args.num // args.batch)
    runs = np.array_split(np.arange(nb), world)          # rank 0 gets the longest run, so it always has images
    part = lambda r: f'{out}.part{r}.npy'
    mine, pbar = [], tqdm(total=args.num, unit='img', disable=rank != 0, desc=f'sampling ({world} process(es))')
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
        cat.save_grid(cat.enlarge(torch.from_numpy(np.concatenate([p[:64] for p in parts])[:64])), 8, grid)
        for r in range(1, world):
            if len(runs[r]):
                os.remove(part(r))
        print(f'wrote {out} ({args.num} images, {mine.shape[1]}x{mine.shape[2]}) and {grid}')


def get_args(argv=None):
    p = argparse.ArgumentParser(description='One-step samples from a CAT checkpoint: ADM .npz + grid PNG.')
    p.add_argument('--ckpt', required=True, help='checkpoint written by cat.py (latest.pt, ckpt-*.pt)')
    p.add_argument('--weights', choices=['ema', 'raw'], default='ema', help="EMA generator, or the raw 'G'")
    p.add_argument('--num-samples', '--num', dest='num', type=int, default=50_000,
                   help='number of samples (0: no .npz, research views only); --num is an alias (not under torchrun)')
    p.add_argument('--batch', type=int, default=256, help='samples per forward pass, per process')
    p.add_argument('--psi', type=float, default=1.0, help='truncation, StyleGAN convention: 1 none, 0 w_avg[c]')
    p.add_argument('--seed', type=int, default=0, help='sample i draws z (and a random class) from seed * 1_000_003 + i')
    cls = p.add_mutually_exclusive_group()
    cls.add_argument('--classes', type=lambda s: [int(c) for c in s.split(',')],
                     help='comma-separated class ids; sample i gets the (i %% len)-th (default: random per sample)')
    cls.add_argument('--class-balanced', action='store_true',
                     help='sample i gets class i %% num_classes (class counts differ by at most one)')
    p.add_argument('--out', help='.npz path (default: samples-STEP-WEIGHTS-psiPSI-seedSEED-NUM.npz by the checkpoint)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing .npz')
    p.add_argument('--precision', choices=['bf16', 'fp32'], help='autocast dtype (default: bf16 on CUDA, fp32 on CPU)')
    p.add_argument('--vae', help="VAE for latent checkpoints, hub name or local directory (default: the dataset's)")
    p.add_argument('--stages', action='store_true', help='PNG of h_0..h_K (columns) of the first 8 samples (rows)')
    p.add_argument('--analyze', action='store_true',
                   help='print delta_k, R_k, A_k (Eq. 1) over the first min(--num-samples, 1000) samples (1000 if 0)')
    p.add_argument('--json', help='with --analyze: also write the metrics to this JSON file')
    p.add_argument('--interp', action='store_true', help='PNG of 4 rows x 8 steps interpolating w (Fig. 10)')
    args = p.parse_args(argv)
    if args.num < 0 or args.batch < 1:
        p.error('--num-samples must be >= 0 and --batch >= 1')
    if args.json and not args.analyze:
        p.error('--json needs --analyze')
    return args


def main(argv=None):
    args = get_args(argv)
    ck = cat.load_checkpoint(args.ckpt)
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
            analyze(G, args, device)
        if args.interp:
            interp(G, args, info, vae, device, prefix + '-interp.png')
    if args.num:
        sample_npz(G, args, info, vae, device, rank, world, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
