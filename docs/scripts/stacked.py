"""1000-mode stacked digits (docs/small-data.md, third pass), from the repository root:

    python docs/scripts/stacked.py make stacked [N]           # N (10,000) 16-px RGB PNGs in one flat folder
    python docs/scripts/stacked.py count SAMPLES.npz | DIR      # modes covered and KL to uniform

make: each channel of an image is one of scikit-learn's 8 x 8 digits, upsampled to 16 px: 10^3 modes (digit triples).
count: a digit judge (fid.train_judge on the same digits) reads each channel; prints the modes covered and
KL(mode histogram || uniform) over the first 10,000 images.
"""
import os
import sys
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
import fid


def digits16():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16            # [1797, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=16, mode='bilinear', align_corners=False)[:, 0]
    return x, torch.tensor(d.target)


def make(out, n=10_000, seed=0):
    x, y = digits16()
    g = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    by_class = [np.flatnonzero(y.numpy() == k) for k in range(10)]
    for i in range(n):
        mode = g.integers(0, 10, 3)
        img = np.stack([x[g.choice(by_class[k])].numpy() for k in mode], -1)    # [16, 16, 3]
        Image.fromarray((img * 255).round().astype(np.uint8)).save(f'{out}/{i:05d}_{"".join(map(str, mode))}.png')


def classifier():
    x, y = digits16()
    return fid.train_judge(x[:, None] * 2 - 1, y, 10, steps=600, seed=0)


def count(images, n=10_000):
    """images: uint8 [N, H, W, 3] -> (modes covered, KL to uniform, images read)."""
    judge = classifier()
    x = torch.from_numpy(np.asarray(images[:n])).float().permute(0, 3, 1, 2) / 127.5 - 1
    if x.shape[-1] != 16:
        x = F.interpolate(x, size=16, mode='area')
    with torch.no_grad():
        digits = torch.stack([judge(x[:, ch:ch + 1]).argmax(1) for ch in range(3)], 1)   # [n, 3]
    modes = digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]
    hist = torch.bincount(modes, minlength=1000).double()
    p = hist / hist.sum()
    kl = float((p[p > 0] * (p[p > 0] * 1000).log()).sum())
    return int((hist > 0).sum()), kl, len(x)


def load_images(src):
    """A sample.py .npz (arr_0: uint8 [N, H, W, 3]) or a folder of PNGs -> uint8 [N, H, W, 3]."""
    if src.endswith('.npz'):
        images = np.load(src)['arr_0']
    else:
        files = sorted(f for f in os.listdir(src) if f.endswith('.png'))
        if not files:
            raise SystemExit(f'error: no .png files in {src}.')
        images = np.stack([np.asarray(Image.open(os.path.join(src, f)).convert('RGB')) for f in files])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SystemExit(f'error: {src} holds images of shape {images.shape[1:]}; stacked digits need 3 channels.')
    return images


if __name__ == '__main__':
    if len(sys.argv) < 3 or sys.argv[1] not in ('make', 'count'):
        raise SystemExit('usage: stacked.py make OUT_DIR [N]  |  stacked.py count SAMPLES.npz|DIR')
    src = sys.argv[2]
    if sys.argv[1] == 'make':
        if os.path.isdir(src) and os.listdir(src):
            raise SystemExit(f'error: {src} is not empty; pick a new folder (nothing was written).')
        make(src, int(sys.argv[3]) if len(sys.argv) > 3 else 10_000)
    elif not os.path.exists(src):
        raise SystemExit(f'error: no such file or folder: {src}.')
    else:
        covered, kl, n = count(load_images(src))
        print(f'{src}: {covered} of 1000 modes covered, KL {kl:.3f} (first {n} images)')
