"""Where does the variety go (docs/small-data.md, third pass)? From the repository root:

    python docs/scripts/variety.py RUN_DIR [--n 300] [--classes 0,8 --png PREFIX] [--json FILE]

Per class: the spread (standard deviation) of simple factors of the images (position, ink, size, slant, texture,
foreground and background brightness; saturation and hue for colour) among EMA samples, over the same among the
real images of the class; the mean pairwise pixel distance likewise. --png: ten samples of a class above ten reals.
"""
import argparse
import json
import math
import os
import sys
import numpy as np
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import cat
import fid

p = argparse.ArgumentParser()
p.add_argument('run')
p.add_argument('--ckpt', default='latest.pt')
p.add_argument('--n', type=int, default=300)
p.add_argument('--classes', default='')
p.add_argument('--png', default='')
p.add_argument('--json', default='')
p.add_argument('--seed', type=int, default=1)
p.add_argument('--weights', default='ema')
a = p.parse_args()
if a.json and os.path.exists(a.json):
    raise SystemExit(f'error: {a.json} exists; pick another --json (nothing was written).')
ck = cat.load_checkpoint(os.path.join(a.run, a.ckpt))
cfg = ck['config']
args = argparse.Namespace(**cfg['args'])
G = cat.Generator(**cfg['G'])
G.load_state_dict(ck[a.weights])
G.eval()
info, ds = cat.open_data(argparse.Namespace(**{**vars(args), 'lambda_repa': 0.0}))
nc = info['num_classes']
show = [int(v) for v in a.classes.split(',') if v]
if any(not 0 <= k < nc for k in show):
    raise SystemExit(f'error: --classes {a.classes}: this data set has classes 0..{nc - 1}.')
taken = [f'{a.png}-class{k}.png' for k in show if a.png and os.path.exists(f'{a.png}-class{k}.png')]
if taken:
    raise SystemExit(f'error: {taken[0]} exists; pick another --png prefix (nothing was written).')
if info['kind'] == 'toy':
    real_x, real_y = cat.make_toy(20000, seed=args.seed + 4242, res=info['res'])
else:
    real_x, real_y = fid.pixels(ds, np.arange(info['N']))


def factors(x):
    """x [n, C, r, r] in [-1, 1] -> dict of per-image factors."""
    x = (x.float() + 1) / 2
    n, C, r, _ = x.shape
    v = x.max(1).values                                   # brightness
    m = torch.sigmoid((v - 0.4) / 0.06)                   # foreground weight
    w = m.sum((1, 2)).clamp(min=1e-3)
    yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float32), torch.arange(r, dtype=torch.float32), indexing='ij')
    cx = (m * xx).sum((1, 2)) / w
    cy = (m * yy).sum((1, 2)) / w
    sxx = (m * (xx - cx[:, None, None]) ** 2).sum((1, 2)) / w
    syy = (m * (yy - cy[:, None, None]) ** 2).sum((1, 2)) / w
    sxy = (m * (xx - cx[:, None, None]) * (yy - cy[:, None, None])).sum((1, 2)) / w
    extent = (sxx + syy).sqrt()                             # spatial spread of the ink (size)
    slant = sxy / (sxx * syy).clamp(min=1e-6).sqrt()        # correlation of x and y in the ink (slant)
    fg = (x * m[:, None]).sum((2, 3)) / w[:, None]          # mean foreground colour [n, C]
    bg = (x * (1 - m[:, None])).sum((2, 3)) / (1 - m).sum((1, 2)).clamp(min=1e-3)[:, None]
    lap = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, 1)
    texture = (lap.abs().mean(1) * m).sum((1, 2)) / w       # high-frequency energy in the foreground
    out = dict(x=cx, y=cy, ink=m.sum((1, 2)), size=extent, slant=slant, texture=texture,
               fg_lum=fg.mean(1), bg_lum=bg.mean(1))
    if C == 3:
        # foreground hue as a unit vector (spread: 1 - |mean vector|, in [0, 1]) and saturation
        mx, mn = fg.max(1).values, fg.min(1).values
        out['fg_sat'] = (mx - mn) / mx.clamp(min=1e-3)
        r_, g_, b_ = fg.unbind(1)
        hue = torch.atan2(math.sqrt(3) * (g_ - b_), 2 * r_ - g_ - b_)
        out['hue_cos'], out['hue_sin'] = hue.cos(), hue.sin()
    return out


def spread(f, key):
    if key == 'hue':
        return float(1 - torch.stack([f['hue_cos'].mean(), f['hue_sin'].mean()]).norm())
    return float(f[key].std())


keys = ['x', 'y', 'ink', 'size', 'slant', 'texture', 'fg_lum', 'bg_lum']
g = torch.Generator().manual_seed(a.seed)
rows = {}
fake_all = {}
for k in range(nc):
    z = torch.randn(a.n, G.z_dim, generator=g)
    c = torch.full((a.n,), k)
    with torch.no_grad():
        fake = cat.generate(G, z, c)
    fake_all[k] = fake
    real = real_x[real_y == k][:2000]
    ff, fr = factors(fake), factors(real)
    ks = keys + (['fg_sat', 'hue'] if info['channels'] == 3 else [])
    rows[k] = {key: (spread(ff, key), spread(fr, key)) for key in ks}
    # pixel variety: mean pairwise distance (full pixels) samples / reals
    sub = real[torch.randperm(len(real), generator=g)[:a.n]]
    rows[k]['pairwise_px'] = (float(torch.pdist(fake.flatten(1)).mean()), float(torch.pdist(sub.flatten(1)).mean()))
ks = list(rows[0])
print('class ' + ' '.join(f'{key:>9}' for key in ks) + '   (spread of samples / spread of reals)')
for k in range(nc):
    print(f'{k:5d} ' + ' '.join(f'{rows[k][key][0] / max(rows[k][key][1], 1e-9):9.2f}' for key in ks))
mean = {key: float(np.mean([rows[k][key][0] / max(rows[k][key][1], 1e-9) for k in range(nc)])) for key in ks}
print('mean  ' + ' '.join(f'{mean[key]:9.2f}' for key in ks))
if a.json:
    json.dump(dict(rows={k: v for k, v in rows.items()}, mean=mean), open(a.json, 'w'), indent=1)
if a.png:
    for k in show:
        real = real_x[real_y == k]
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:10]]
        grid = torch.cat([fake_all[k][:10], real])
        cat.save_grid(cat.to_uint8(grid), 10, f'{a.png}-class{k}.png')
        print('wrote', f'{a.png}-class{k}.png (row 1: samples, row 2: reals)')
