"""What D can tell apart, per scale: mean logit gaps of a checkpoint's discriminator on its own training data.

    python docs/scripts/gaps.py RUN/ckpt-0000500.pt RUN/ckpt-0001000.pt ...   [--n 512] [--json out.json]

For each checkpoint and each scale k, over n real images of the run's data set (classes as drawn) and n samples of
its raw G (what D was trained against; the same classes):
    real-fake   mean d_k(real) - d_k(fake)
    real-blur   mean d_k(real) - d_k(real blurred 3 x 3): does D reward detail?
    real-clean  mean d_k(real) - d_k(the same toy image without its background noise) (toy only): texture
    std_real    the spread of d_k(real)
No augmentation (the small-data default). Gaps near 0 at a scale: D gives G no signal there.
"""
import argparse
import json
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import cat  # noqa: E402


def reals(args, info, ds, n):
    """n real images in [-1, 1], their classes, and (toy) the same images without background noise, else None."""
    if info['kind'] == 'toy':
        x, y = cat.make_toy(n, seed=args.seed + 4242, res=info['res'])
        # make_toy draws only its background noise with torch.randn: zeros give the clean images
        with mock.patch.object(cat.torch, 'randn', lambda *a, **k: torch.zeros(*a[:3])):
            clean = cat.make_toy(n, seed=args.seed + 4242, res=info['res'])[0]
        return x, y, clean
    idx = torch.randperm(info['N'], generator=torch.Generator().manual_seed(4242))[:n]
    items = [ds[int(i)] for i in idx]
    x = torch.stack([t[0] for t in items]).float() / 127.5 - 1
    return x, torch.tensor([t[1] for t in items]), None


@torch.no_grad()
def gaps(path, n):
    ck = cat.load_checkpoint(path)
    args = argparse.Namespace(**dict(ck['config']['args'], lambda_repa=0.0))
    info, ds = cat.open_data(args)
    if info['kind'] == 'latent':
        raise SystemExit('error: gaps.py reads pixel data (the toy set or a small pixel data set), not latents.')
    G = cat.Generator(**ck['config']['G']).eval()
    D = cat.Discriminator(**ck['config']['D']).eval()
    G.load_state_dict(ck['G'])
    D.load_state_dict(ck['D'])
    x, c, clean = reals(args, info, ds, n)
    z = torch.randn(len(c), G.z_dim, generator=torch.Generator().manual_seed(99))
    fake = torch.cat([G(zb, cb)[-1] for zb, cb in zip(z.split(256), c.split(256))])

    def d(images):
        return torch.cat([D(cat.multiscale(b, D.scales), cb) for b, cb in zip(images.split(256), c.split(256))])

    d_real = d(x)
    out = {'real-fake': (d_real - d(fake)).mean(0).tolist(),
           'real-blur': (d_real - d(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))).mean(0).tolist()}
    if clean is not None:
        out['real-clean'] = (d_real - d(clean)).mean(0).tolist()
    out['std_real'] = d_real.std(0).tolist()
    return dict(step=ck['step'], scales=D.scales, **out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('ckpts', nargs='+', help='checkpoints (ckpt-STEP.pt / latest.pt) of small pixel-data runs')
    p.add_argument('--n', type=int, default=512)
    p.add_argument('--json', help='also write the table to this file (must not exist)')
    a = p.parse_args()
    if a.json and os.path.exists(a.json):
        raise SystemExit(f'error: {a.json} exists: choose another --json.')
    rows = []
    for path in a.ckpts:
        r = dict(gaps(path, a.n), ckpt=path)
        rows.append(r)
        keys = [k for k in ('real-fake', 'real-blur', 'real-clean', 'std_real') if k in r]
        print(f"{path} (step {r['step']}), scales {r['scales']}:")
        for k in keys:
            print(f"  {k:10s} " + ' '.join(f'{v:+.3f}' for v in r[k]))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
