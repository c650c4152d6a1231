"""
Every measure of samples: FID, Inception Score, precision and recall of ADM-format samples (the paper reports
FID-50K), and for small pixel data sets the judges' metrics and the copy check, during training or of a finished run.

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz                # ADM's ImageNet 256 reference batch
    python fid.py samples.npz --ref imagenet/train --save-ref ref.npz --json m.json   # reference from a folder, saved
    python fid.py samples.npz --ref ref.npz --detector inception-2015-12-05.pt        # no download
    python fid.py runs/000-toy                          # a run (or RUN/ckpt-STEP.pt): Eq. 1, judges, the toy line
    python fid.py train --data toy                      # cat.py's training with the judges' metrics at every evaluation
    torchrun --nproc_per_node=8 fid.py train --model H --fid-every 10000 --fid-ref REF.npz   # cat.py's run + FID

Samples: an ADM .npz, arr_0 uint8 [N, H, W, 3] (or a folder of images). Reference: an .npz with mu/sigma (FID) and,
for precision/recall, features (written by --save-ref) or images arr_0 (as ADM's reference batches have); an .npz of
images arr_0; a CAT dataset directory (its training images: pixel data, or the crops stored for REPA); or a folder
of png/jpg images, searched recursively.

How this compares with ADM's TensorFlow evaluator (guided-diffusion/evaluations/evaluator.py): the detector is the
same Inception-v3 graph of 2015-12-05, in the TorchScript port used by StyleGAN2-ADA/StyleGAN3/EDM (it emulates TF's
bilinear resize to 299x299 internally). FID uses its 2048-d pool features with ADM's sqrtm safeguards; IS uses its
logits without the output bias (as ADM and StyleGAN3) in chunks of 5000 and the remainder (ADM); precision/recall use
k = 3 nearest neighbour manifolds (ADM's ManifoldEstimator; it computes distances in float16, we in float32). All
metrics run with TF32 off. FID is expected to agree with ADM's numbers to about 1%, but that
agreement was not measured here.

This file builds on cat.py (its data, generator and training loop) and cat.py imports nothing of it: cat.train()
takes the measures below as arguments (`fid.py train`), and `fid.py RUN_DIR` loads a run's checkpoint.
"""
import argparse
import itertools
import json
import math
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cat
from cat import check_data_dir, full_fp32, LatentDataset

DETECTOR_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
DETECTOR_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'cat', 'inception-2015-12-05.pt')


def load_detector(path=None, device='cpu'):
    """The TorchScript Inception-v3 of FID (StyleGAN3 / EDM / GAT): `path`, else DETECTOR_CACHE, downloaded once."""
    if path is not None and not os.path.isfile(path):
        raise SystemExit(f'error: detector {path} not found (want the TorchScript inception-2015-12-05.pt)')
    if path is None and not os.path.isfile(DETECTOR_CACHE):
        try:
            os.makedirs(os.path.dirname(DETECTOR_CACHE), exist_ok=True)
            torch.hub.download_url_to_file(DETECTOR_URL, DETECTOR_CACHE)
        except Exception as e:
            raise SystemExit(f'error: could not download the Inception detector ({type(e).__name__}): put '
                             f'{DETECTOR_URL} at {DETECTOR_CACHE} or pass its path '
                             '(--detector / --fid-detector)')
    # TorchScript is deprecated, but it is the format the detector ships in
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.load(path or DETECTOR_CACHE, map_location=device).eval()


# ADM computes IS over consecutive chunks of 5000 samples (and the remainder)
IS_SPLIT = 5000
# --save-ref keeps a random subset of this many features (float16) for precision/recall
MAX_REF_FEATURES = 50000

# ----------------------------------------------------------------------------------------------
# Metrics: pure functions of features and class probabilities
# ----------------------------------------------------------------------------------------------




def inception_score(probs, split_size=IS_SPLIT):
    """exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean prediction, averaged over consecutive chunks of split_size
    samples and the remainder as a last, smaller chunk: ADM's evaluator (12345 samples -> 5000, 5000, 2345)."""
    p = np.asarray(probs, np.float64)
    scores = []
    for part in (p[i:i + split_size] for i in range(0, len(p), split_size)):
        py = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0
        kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def feature_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1],) * 2)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) in float64, with ADM's safeguards."""
    import scipy.linalg
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            # a singular product: regularize both covariances and try again
            if not np.isfinite(covmean).all():
                offset = eps * np.eye(len(sigma1))
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        except (np.linalg.LinAlgError, ValueError):
            covmean = None
    if covmean is None or not np.isfinite(covmean).all():
        # e.g. identical images (sigma = 0): tr sqrtm(s1 s2) is the sum of the square roots of its eigenvalues
        tr = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)).sum()
    elif np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}')
    else:
        tr = np.trace(covmean).real         # round-off leaves tiny imaginary parts
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)


def precision_recall(real_feats, fake_feats, k=3, batch=5000, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019; ADM's ManifoldEstimator); fp32, no TF32 (ADM: fp16)."""

    def radii(x):
        # the k-th nearest other point; with fewer than k + 1 points, the farthest one
        kth = min(k, len(x) - 1) + 1
        return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(kth, dim=1).values
                          for i in range(0, len(x), batch)])

    def covered(x, y, r):
        hits = [(torch.cdist(x[i:i + batch], y) <= r).any(1) for i in range(0, len(x), batch)]
        return torch.cat(hits).double().mean()

    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    with full_fp32():
        return covered(fake, real, radii(real)).item(), covered(real, fake, radii(fake)).item()



# ----------------------------------------------------------------------------------------------
# Detector and images
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def detector_outputs(detector, images, batch=100, device='cpu'):
    """uint8 images [N, H, W, 3] (an array, or any iterable of [H, W, 3]) -> pool features float64 [N, 2048] and class
    probabilities float64 [N, C]. The Inception port exposes its output layer, so probabilities come from the same
    pass: softmax(features @ W^T) without the bias, as ADM and StyleGAN3 compute IS. Other detectors: detector(x).
    TF32 is off inside (as StyleGAN3's calc_metrics.py), whatever the caller (cat.py's training loop) set."""
    W = getattr(getattr(detector, 'output', None), 'weight', None)
    it = iter(images)
    feats = []
    probs = []
    total = len(images) if hasattr(images, '__len__') else None
    with full_fp32(), tqdm(total=total, unit='img', leave=False, disable=None) as bar:
        while chunk := list(itertools.islice(it, batch)):
            # uint8 NCHW, resized inside
            x = torch.from_numpy(np.stack(chunk)).to(device).permute(0, 3, 1, 2)
            f = detector(x, return_features=True).float()
            p = F.softmax(f @ W.T.float(), dim=1) if W is not None else detector(x)
            feats.append(f.double().cpu().numpy())
            probs.append(p.double().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(feats), np.concatenate(probs)


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)      # shape, fortran_order, dtype


class Images:
    """uint8 [H, W, 3] images of a folder of png/jpg (recursive, sorted), of a CAT dataset directory (its training
    images: pixel data, or the JPEG crops of latent data), or of an .npz's arr_0, read lazily: the .npz is streamed,
    as ADM's sample files (50k images of 256^2, about 10 GB) need not fit in memory."""

    def __init__(self, path):
        self.path = path
        self.files = None
        self.data = None
        if os.path.exists(os.path.join(path, 'meta.json')):
            meta = check_data_dir(path)
            if meta['store'] == 'latents' and not meta['images']:
                raise SystemExit(f'fid.py: dataset {path} holds latents without images '
                                 '(prepared with --no-images)')
            self.data, self.shape = LatentDataset(path, meta, images=True), (meta['N'],)
            return
        if os.path.isdir(path):
            self.files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                                if n.lower().endswith(('.png', '.jpg', '.jpeg')))
            self.shape = (len(self.files),)
            return
        with zipfile.ZipFile(path) as z:
            if 'arr_0.npy' not in z.namelist():
                raise SystemExit(f'fid.py: {path} has no images (arr_0)')
            with z.open('arr_0.npy') as f:
                self.shape, fortran, dtype = _npy_header(f)
        if fortran or dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise SystemExit(f'fid.py: {path}: arr_0 must be uint8 [N, H, W, 3], '
                             f'got {dtype} {list(self.shape)}')

    def __len__(self):
        return self.shape[0]

    def __iter__(self):
        if self.data is not None:
            for i in range(len(self)):
                # latents: the JPEG crop; pixel data: x itself (uint8, 1 or 3 ch)
                x, _, img = self.data[i]
                yield (img if img.numel() else x).expand(3, -1, -1).permute(1, 2, 0).numpy()
            return
        if self.files is not None:
            yield from (np.asarray(Image.open(f).convert('RGB')) for f in self.files)
            return
        size, chunk = int(np.prod(self.shape[1:])), 1000
        with zipfile.ZipFile(self.path) as z, z.open('arr_0.npy') as f:
            _npy_header(f)
            for i in range(0, len(self), chunk):
                n = min(chunk, len(self) - i)
                yield from np.frombuffer(f.read(n * size), np.uint8).reshape(n, *self.shape[1:])

# ----------------------------------------------------------------------------------------------
# Reference statistics, and FID for the training loop
# ----------------------------------------------------------------------------------------------


def load_ref(path, detector=None, device='cpu', batch=100):
    """-> dict(mu, sigma, features or None). With a detector, images (a folder, or arr_0 of an .npz without stored
    features) are run through it; without one only stored mu/sigma/features are used (cheap: for the training loop)."""
    if not os.path.exists(path):
        raise SystemExit(f'fid.py: reference {path} not found')
    ref = dict(features=None)
    if not os.path.isdir(path):
        with np.load(path) as z:
            ref.update({k: z[k] for k in ('mu', 'sigma', 'features') if k in z.files})
            has_images = 'arr_0' in z.files
    if ref['features'] is None and detector is not None and (os.path.isdir(path) or has_images):
        ref['features'] = detector_outputs(detector, Images(path), batch, device)[0]
    if 'mu' not in ref:
        if ref['features'] is None:
            raise SystemExit(f'fid.py: reference {path} has no mu/sigma, features or images (arr_0)'
                             + ('' if detector is not None else ' that can be used without a detector'))
        ref['mu'], ref['sigma'] = feature_stats(ref['features'])
    return ref


def save_ref(ref, path):
    """mu, sigma (float64) and up to MAX_REF_FEATURES features (float16, seeded random subset) for precision/recall."""
    out = dict(mu=ref['mu'], sigma=ref['sigma'])
    if ref['features'] is not None:
        f = ref['features']
        if len(f) > MAX_REF_FEATURES:
            f = f[np.sort(np.random.default_rng(0).choice(len(f), MAX_REF_FEATURES, replace=False))]
        out['features'] = f.astype(np.float16)
    with open(path, 'wb') as fh:            # a file object: np.savez would append .npz to a bare name
        np.savez(fh, **out)


def fid_from_images(images, ref_path, detector, device='cpu', batch=100):
    """FID of uint8 images [N, H, W, 3] against the mu/sigma (or stored features) of a reference .npz."""
    ref = load_ref(ref_path)
    mu, sigma = feature_stats(detector_outputs(detector, images, batch, device)[0])
    return frechet_distance(mu, sigma, ref['mu'], ref['sigma'])

# ----------------------------------------------------------------------------------------------
# FID during training: a hook that cat.train calls on rank 0 after every step (`fid.py train CAT_OPTIONS ...`)
# ----------------------------------------------------------------------------------------------


class TrainingFID:
    """FID of --fid-n EMA samples (random classes, fixed seed, all metric maths with TF32 off) against the mu / sigma
    of --fid-ref every --fid-every steps and at the last one; logged as `fid STEP: fid5k=...` and to metrics.jsonl."""

    def __init__(self, args, f):
        self.a = args
        self.f = f
        self.detector = None
        self.vae = None
        self.ready = False

    @torch.no_grad()
    def __call__(self, step, ema, info, log):
        a = self.a
        f = self.f
        dev = next(ema.parameters()).device
        if step % f.fid_every and step != a.steps:
            return
        # first use: the detector (a missing one turns FID off) and the VAE
        if not self.ready:
            self.ready = True
            try:
                self.detector = load_detector(f.fid_detector, dev)
            except SystemExit as e:
                log(f"warning: {e}. FID during training is off.")
            self.vae = (cat.load_vae(a.vae or info['vae'], dev, required=False) if info['kind'] == 'latent'
                        else None)
        if self.detector is None or (info['kind'] == 'latent' and self.vae is None):
            if self.detector is not None:
                log("warning: no VAE to decode samples: FID skipped.")
            return
        g = torch.Generator().manual_seed(a.seed + 999)
        z = torch.randn(f.fid_n, ema.z_dim, generator=g)
        c = torch.randint(0, info['num_classes'], (f.fid_n,), generator=g)
        feats = []
        with full_fp32():
            for zb, cb in zip(z.split(100), c.split(100)):
                with cat.autocast(a.precision, dev):
                    h = ema(zb.to(dev), cb.to(dev))[-1].float()
                x = cat.decode(h, info, self.vae).permute(0, 3, 1, 2).to(dev)
                feats.append(self.detector(x, return_features=True).double().cpu())
        with np.load(f.fid_ref) as ref:
            score = frechet_distance(*feature_stats(torch.cat(feats).numpy()), ref['mu'], ref['sigma'])
        log(f"fid {step}: fid{f.fid_n // 1000}k={score:.3f}", dict(step=step, fid=score, fid_n=f.fid_n))


# ----------------------------------------------------------------------------------------------
# Small pixel data: judges trained on the data set, their metrics, pooled pixels and the copy check
# ----------------------------------------------------------------------------------------------

JUDGE_STEPS = 300           # the judges' training steps
# the toy run's last line, before Eq. 1's means
TOY_SUMMARY = ['shape_acc', 'class_acc', 'min_class_acc', 'fd', 'fd_floor', 'precision', 'precision_floor', 'recall',
               'recall_floor', 'diversity', 'recall_px', 'recall_px_floor', 'diversity_px', 'memorization', 'copied']
JUDGE_MIN_ACC = 0.95        # the toy's judges must reach this accuracy on held-out images


class Judge(nn.Module):
    """A small CNN for small pixel data: 3 convolutions to 4 x 4, then a 128-d layer over the whole map (no pooling,
    so its features keep where things are and how big)."""

    def __init__(self, res=16, num_classes=10, channels=3, dim=128):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(channels, 32, 3, max(1, res // 16), 1), nn.SiLU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                                   nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, dim), nn.SiLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x):
        return self.fc(self.convs(x.float().clamp(-1, 1)))

    def forward(self, x):
        return self.head(self.features(x))


def train_judge(x, y, num_classes, steps=300, batch=128, seed=0):
    """A Judge trained on x in [-1, 1] with labels y: seeded shuffles, light noise, one-cycle Adam; global RNG kept."""
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
    """The share of x classified as y, overall and per class (nan for a class absent from y)."""
    hit = torch.cat([judge(b).argmax(1) for b in x.split(1000)]) == y
    return hit.float().mean().item(), [hit[y == k].float().mean().item() for k in range(num_classes)]


@torch.no_grad()
def judge_metrics(judge, fake, c, real, c_real, num_classes, labelled=True, shape_judge=None, failed=None):
    """n fakes of A's classes c against the reals A = real[:n] and B = real[n:2n], in the judge's features: fd,
    precision and recall (floors: B against A), diversity (per class, the fakes' mean pairwise distance over A's),
    class_acc (per class, the worst, _flip of mirrored fakes), the toy's shape_acc. A failed metric is named in
    `failed`."""
    n = len(fake)
    out = {}
    failed = {} if failed is None else failed

    def metric(name, fn):
        try:
            out.update(fn())
        except Exception as e:
            failed[name] = f'{type(e).__name__}: {e}'

    def features(x):
        return torch.cat([judge.features(b) for b in x.split(1000)])

    ff, fa, fb = (features(x) for x in (fake, real[:n], real[n:2 * n]))
    if not labelled:
        # an untrained CNN's features are tiny: measure them in units of the reals' spread
        spread = fa.std(0).mean().item() if n > 1 else 0
        spread = spread if spread > 1e-5 * fa.abs().mean().item() else 1.0     # identical reals: no unit
        ff, fa, fb = (f / spread for f in (ff, fa, fb))
    metric('fd', lambda: dict(fd=frechet_distance(*feature_stats(ff), *feature_stats(fa)),
                              fd_floor=frechet_distance(*feature_stats(fb), *feature_stats(fa))))
    metric('precision/recall', lambda: dict(zip(('precision', 'recall', 'precision_floor', 'recall_floor'),
                                                precision_recall(fa, ff) + precision_recall(fa, fb))))

    def diversity():
        tol = 1e-5 * fa.norm(dim=1).mean().item()          # below: identical images up to float round-off
        div = []
        for k in range(num_classes):
            f_fake, f_real = ff[c == k], fa[c_real[:n] == k]
            spread_real = torch.pdist(f_real).mean().item() if len(f_real) > 1 else float('nan')
            spread_fake = torch.pdist(f_fake).mean().item() if len(f_fake) > 1 else float('nan')
            div.append(spread_fake / spread_real if spread_real > tol else float('nan'))
        seen = [v for v in div if v == v]                   # a nanmean without numpy's warning
        return dict(diversity=sum(seen) / len(seen) if seen else float('nan'),
                    **{f'diversity_{k}': v for k, v in enumerate(div)})

    def accuracy():
        acc, per = class_accuracy(judge, fake, c, num_classes)
        return dict(class_acc=acc, min_class_acc=min((p for p in per if p == p), default=float('nan')),
                    class_acc_flip=class_accuracy(judge, fake.flip(-1), c, num_classes)[0],
                    **{f'class_acc_{k}': v for k, v in enumerate(per)})

    metric('diversity', diversity)
    if labelled:
        metric('class_acc', accuracy)
    if shape_judge is not None:
        metric('shape_acc', lambda: dict(shape_acc=class_accuracy(shape_judge, fake, c, num_classes)[0]))
    return out


class PooledPixels(nn.Module):
    """Label-free features for variety: the image pooled by area to 8 x 8 x C (at 16 px 2 x 2 pooling; at 64 px the
    Frechet distance's sqrtm of 32 x 32 x C features would cost ~30 s per call on a CPU)."""

    def features(self, x):
        return F.adaptive_avg_pool2d(x.float(), 8).flatten(1)


def nearest_distance(x, train, exclude=None, batch=1000):
    """Each row of x: its distance to the nearest row of train, skipping row exclude[i] of train where given."""
    out = []
    for i in range(0, len(x), batch):
        d = torch.cdist(x[i:i + batch], train)
        if exclude is not None:
            own = exclude[i:i + batch]
            keep = own < len(train)
            d[torch.arange(len(d))[keep], own[keep]] = float('inf')
        out.append(d.min(1).values)
    return torch.cat(out)


def memorization(fake, held_out, train_px, held_out_index=None):
    """The copy check, in pooled pixels -> (memorization, copied). memorization: the median distance of the samples to
    their nearest training image over the same for real images held out from that search (training images skip their
    own index); about 1: no copying, far below 1: the generator reproduces training images. copied: the share of
    samples nearer to a training image than the 5th percentile of the held-out reals' distances (fresh images: about
    0.05), which counts a copied minority that the median hides. Both nan where the reals have nothing to compare."""
    d_fake = nearest_distance(PooledPixels().features(fake), train_px)
    d_real = nearest_distance(PooledPixels().features(held_out), train_px, held_out_index)
    median = d_real.median().item()
    if not math.isfinite(median) or median <= 1e-5 * train_px.norm(dim=1).mean().item():
        return float('nan'), float('nan')
    near = torch.quantile(d_real[d_real.isfinite()], 0.05).item()
    return d_fake.median().item() / median, (d_fake < near).double().mean().item()


def pixels(ds, idx):
    """Images idx (in that order) of a pixel-space LatentDataset as float [n, C, r, r] in [-1, 1], and their labels."""
    idx = np.asarray(idx, dtype=np.int64)
    x = torch.from_numpy(ds.open().data[idx]) if ds.store == 'uint8' else torch.stack([ds[i][0] for i in idx])
    return x.float() / 127.5 - 1, torch.from_numpy(ds.labels[idx].astype(np.int64))


class JudgeMeasures:
    """cat.Evaluation's measure on pixel data: judge_metrics in the features of a judge trained on the data set (one
    class: an untrained CNN's, Naeem et al. 2020's 'T4'), again as *_px in pixels pooled to 8 x 8, which keep what
    a classifier forgets (where, how big), and the copy check. The samples follow the classes of the real set A."""

    def __init__(self, evaluation):
        """The real sets A and B (n images each), the judges (cached in the run directory, judge.pt), and the
        training images for the copy check."""
        args = evaluation.args
        info = evaluation.info
        ds = evaluation.ds
        log = evaluation.log
        self.info = info
        self.summary = TOY_SUMMARY if info['kind'] == 'toy' else []
        nc = info['num_classes']

        def toy(n, seed, hue=False):
            return cat.make_toy(n, seed=args.seed + seed, res=info['res'], random_hue=hue)

        if info['kind'] == 'toy':
            n = args.eval_n
            self.real, self.c_real = toy(2 * n, 777)
            train, val = toy(38400, 1000), toy(2000, 2000)
            self.train_px = PooledPixels().features(ds[0])         # the GAN's training set; B is not in it
            self.b_index = None
        else:
            # a seeded permutation: the judge trains on all but the first fifth (at most 2000 held out)
            n = max(1, min(args.eval_n, info['N'] // 2))           # a set of one image: A = B = that image
            perm = torch.randperm(info['N'], generator=torch.Generator().manual_seed(args.seed + 777)).numpy()
            hold = min(2000, info['N'] // 5)
            self.real, self.c_real = pixels(ds, perm[np.arange(2 * n) % info['N']])
            train, val = pixels(ds, perm[hold:hold + 38400]), pixels(ds, perm[:hold])
            # the copy check searches (up to 20,000 of) the training images in the permutation's order; B's
            # images are among them, so each skips its own index (leave one out)
            chunks = np.array_split(perm[:20_000], max(1, min(20_000, info['N']) // 1000))
            self.train_px = torch.cat([PooledPixels().features(pixels(ds, idx)[0]) for idx in chunks])
            self.b_index = torch.from_numpy((n + np.arange(n)) % info['N'])
        path = os.path.join(evaluation.run_dir, 'judge.pt')
        state = torch.load(path, map_location='cpu', weights_only=True) if os.path.exists(path) else {}
        self.labelled = nc > 1
        self.shape_judge = None
        if self.labelled:
            self.judge = self.trained(state, 'judge', train, val, args.seed, log)
            self.features = 'judge (trained on the data set)'
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.judge = Judge(info['res'], nc, info['channels']).eval()
            self.features = 'random CNN (untrained judge, seed 0: the data set has one class)'
        self.features += '; *_px: pixels pooled to 8 x 8'
        if info['kind'] == 'toy':
            shape_train, shape_val = toy(38400, 1001, True), toy(2000, 2001, True)
            self.shape_judge = self.trained(state, 'shape_judge', shape_train, shape_val, args.seed + 1, log)
        judges = {name: getattr(self, name) for name in ('judge', 'shape_judge') if getattr(self, name)}
        torch.save({name: judge.state_dict() for name, judge in judges.items()}, path)
        log(f"judge features: {self.features}; {n} EMA samples against two real sets of {n} per evaluation")
        self.classes = self.c_real[:n]         # the samples follow set A's classes
        # reals.png: (up to) 10 per class, short rows filled with black
        rows = [self.real[self.c_real == k][:10] for k in range(min(nc, 16))] if nc > 1 else [self.real[:100]]
        rows = [torch.cat([r, -torch.ones(-len(r) % 10, *r.shape[1:])]) for r in rows]
        cat.save_grid(cat.to_uint8(torch.cat(rows)), 10, os.path.join(evaluation.run_dir, 'reals.png'))

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
    def __call__(self, fake, c, failed):
        """The metrics of the samples `fake` of classes c; a failed metric is named in `failed`."""
        sets = (fake, c, self.real, self.c_real, self.info['num_classes'])
        out = judge_metrics(self.judge, *sets, self.labelled, self.shape_judge, failed)
        out['features'] = self.features
        failed_px = {}
        px = judge_metrics(PooledPixels(), *sets, False, None, failed_px)
        failed.update({f'{k} (pooled pixels)': v for k, v in failed_px.items()})
        # precision -> precision_px, recall_floor -> recall_px_floor, diversity_3 -> diversity_px_3
        out.update({f'{k}_px' if '_' not in k else k.replace('_', '_px_', 1): v for k, v in px.items()})
        held_out = self.real[len(c):2 * len(c)]        # set B
        try:
            out['memorization'], out['copied'] = memorization(fake, held_out, self.train_px, self.b_index)
        except Exception as e:
            failed['memorization'] = f'{type(e).__name__}: {e}'
        return out


def judges(evaluation):
    """JudgeMeasures for pixel data, or None: cat.train's measure factory."""
    return JudgeMeasures(evaluation) if evaluation.info['kind'] != 'latent' else None

# ----------------------------------------------------------------------------------------------
# A run: measured as it trains (fid.py train), or afterwards from its checkpoint (fid.py RUN_DIR)
# ----------------------------------------------------------------------------------------------


def measure_run(path):
    """A run directory's newest checkpoint (or the checkpoint file `path`): its EMA generator through cat.Evaluation
    with the judges, as the run's evaluation at that step would have measured it; logged to the run's log.txt and
    metrics.jsonl (grid: measured-STEP.png)."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    path = cat.find_resume(path)
    ck = cat.load_checkpoint(path)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    saved = dict(ck['config']['args'], lambda_repa=0.0)         # no DINOv2 here
    if device.type == 'cpu':
        saved['precision'] = 'fp32'
    args = argparse.Namespace(**saved)
    info, ds = cat.open_data(args)
    ema = cat.Generator(**ck['config']['G']).to(device)
    ema.load_state_dict(ck['ema'])
    ema.eval()
    log = cat.make_logger(run_dir, 0)
    log(f"fid.py: measuring {path} (step {ck['step']})")
    evaluation = cat.Evaluation(args, info, ds, device, run_dir, log, [judges])
    evaluation.grid_name = 'measured'
    metrics = cat.evaluate(evaluation, ema, ck['step'], log)
    if info['kind'] == 'toy' and metrics is not None:
        log(cat.toy_line(metrics, evaluation.measures))
    return metrics


def train(argv):
    """fid.py train [cat.py options] [--fid-every N --fid-ref REF.npz [--fid-n 5000] [--fid-detector PATH]]."""
    p = argparse.ArgumentParser(prog='fid.py train',
                                description="cat.py's training with the judges' metrics at every evaluation (pixel "
                                            "data) and FID of the EMA generator every --fid-every steps; every "
                                            "other option is cat.py's")
    p.add_argument('--fid-every', type=int, help='FID every N steps (and at the last step); needs --fid-ref')
    p.add_argument('--fid-ref', help="reference statistics .npz (mu, sigma), e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument('--fid-n', type=int, default=5000, help='samples per FID (5000)')
    p.add_argument('--fid-detector', default=None,
                   help='inception-2015-12-05.pt path (default: download once, cache)')
    f, rest = p.parse_known_args(argv)
    hooks = []
    if f.fid_every is not None or f.fid_ref is not None:
        if f.fid_every is None or f.fid_every <= 0 or f.fid_ref is None or not os.path.isfile(f.fid_ref):
            p.error('FID during training needs a positive --fid-every and --fid-ref an existing .npz '
                    f'(got {f.fid_every}, {f.fid_ref})')
    args = cat.get_args(rest)
    if f.fid_every is not None:
        hooks.append(TrainingFID(args, f))
    return cat.train(args, measures=[judges], hooks=hooks)

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main():
    if sys.argv[1:2] == ['train']:
        return train(sys.argv[2:])
    run = sys.argv[1] if len(sys.argv) == 2 else ''
    if os.path.isdir(run) and cat.checkpoints_in(run) or run.endswith('.pt') and os.path.isfile(run):
        return measure_run(run)
    p = argparse.ArgumentParser(description='FID, Inception Score, precision and recall of '
                                            'ADM-format samples.')
    p.add_argument('samples', help='ADM .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images; a run directory '
                                   'alone: measure its newest checkpoint')
    p.add_argument('--ref', required=True,
                   help='.npz with mu/sigma (+ features or images arr_0), .npz of images arr_0, '
                        'or a folder of images')
    p.add_argument('--detector', help=f'TorchScript Inception (default {DETECTOR_CACHE}, downloaded once)')
    p.add_argument('--json', help='also write the metrics to this file')
    p.add_argument('--save-ref',
                   help='write the reference mu, sigma and features to this .npz, for reuse as --ref')
    p.add_argument('--overwrite', action='store_true', help='replace existing --json / --save-ref files')
    p.add_argument('--batch', type=int, default=100)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    for out in (args.json, args.save_ref):
        if out and os.path.exists(out) and not args.overwrite:
            raise SystemExit(f'fid.py: {out} exists; pass --overwrite to replace it')

    detector = load_detector(args.detector, args.device)
    ref = load_ref(args.ref, detector, args.device, args.batch)
    if args.save_ref:
        save_ref(ref, args.save_ref)
    feats, probs = detector_outputs(detector, Images(args.samples), args.batch, args.device)
    m = dict(fid=frechet_distance(*feature_stats(feats), ref['mu'], ref['sigma']),
             inception_score=inception_score(probs), precision=None, recall=None)
    if ref['features'] is not None:
        m['precision'], m['recall'] = precision_recall(ref['features'], feats, device=args.device)
    print(f'{len(feats)} samples from {args.samples} vs {args.ref}')
    for k, v in m.items():
        print(f'{k:16s}{v:.4f}' if v is not None
              else f'{k:16s}skipped: the reference has no features or images')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(m, num_samples=len(feats), samples=args.samples, ref=args.ref), f, indent=2)


if __name__ == '__main__':
    main()
