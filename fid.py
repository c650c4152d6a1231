"""
FID, Inception Score, precision and recall of ADM-format samples (the paper reports FID-50K).

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz                # ADM's ImageNet 256 reference batch
    python fid.py samples.npz --ref imagenet/train --save-ref ref.npz --json m.json   # reference from a folder, saved
    python fid.py samples.npz --ref ref.npz --detector inception-2015-12-05.pt        # no download

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
"""
import argparse, itertools, json, os, warnings, zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cat import full_fp32

DETECTOR_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
DETECTOR_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'cat', 'inception-2015-12-05.pt')
IS_SPLIT = 5000             # ADM computes IS over consecutive chunks of 5000 samples (and the remainder)
MAX_REF_FEATURES = 50000    # --save-ref keeps a random subset of this many features (float16) for precision/recall

# ----------------------------------------------------------------------------------------------
# Metrics: pure functions of features and class probabilities
# ----------------------------------------------------------------------------------------------


def feature_stats(features):
    """features [N, D] -> mean [D], covariance [D, D] (unbiased, as np.cov), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) in float64, with ADM's safeguards.
    At D = 2048 scipy's sqrtm takes 10-30 s on 2 CPU cores (measured here); mind it for the training loop's FID."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():      # singular product: regularize both covariances and retry
        offset = eps * np.eye(len(sigma1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):            # round-off makes tiny imaginary parts; large ones mean a real problem
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}')
        covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=IS_SPLIT):
    """exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean prediction, averaged over consecutive chunks of split_size
    samples and the remainder as a last, smaller chunk: ADM's evaluator (12345 samples -> 5000, 5000, 2345)."""
    p = np.asarray(probs, np.float64)
    scores = []
    for part in (p[i:i + split_size] for i in range(0, len(p), split_size)):
        py = part.mean(axis=0, keepdims=True)
        kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)).sum(axis=1).mean()    # 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def knn_radii(x, k=3, batch=5000):
    """Distance from each row of x [N, D] to its k-th nearest neighbour in x, itself excluded."""
    return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)])


def _covered(x, y, radii, batch):
    """Fraction of rows of x within radii[j] of some y[j]."""
    inside = [(torch.cdist(x[i:i + batch], y) <= radii).any(dim=1) for i in range(0, len(x), batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats, fake_feats, k=3, batch=5000, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019), as ADM's ManifoldEstimator: each set's manifold is
    the union of balls reaching every point's k-th nearest neighbour; precision = fraction of fake points inside the
    real manifold, recall = fraction of real points inside the fake manifold. Differences from ADM: Euclidean distances
    from torch.cdist in float32 with TF32 off, where ADM computes the squared distances in float16 (float32 only when a
    float16 result is not finite), so decisions at a ball's edge can differ; and no option to clamp radii at a
    percentile (ADM has one, off in its evaluator)."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    with full_fp32():
        precision = _covered(fake, real, knn_radii(real, k, batch), batch)
        recall = _covered(real, fake, knn_radii(fake, k, batch), batch)
    return precision, recall

# ----------------------------------------------------------------------------------------------
# Detector and images
# ----------------------------------------------------------------------------------------------


def load_detector(path=None, device='cpu'):
    """The TorchScript Inception-v3: `path`, else DETECTOR_CACHE, which is downloaded once from DETECTOR_URL."""
    if path is not None and not os.path.isfile(path):
        raise SystemExit(f'fid.py: detector {path} not found (want the TorchScript inception-2015-12-05.pt)')
    if path is None:
        path = DETECTOR_CACHE
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(DETECTOR_URL, path)
            except Exception as e:
                raise SystemExit(f'fid.py: could not download the Inception detector ({type(e).__name__}): '
                                 f'put {DETECTOR_URL} at {path} or pass --detector PATH') from None
    with warnings.catch_warnings():         # TorchScript is deprecated, but it is the format the detector ships in
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.load(path, map_location=device).eval()


@torch.no_grad()
def detector_outputs(detector, images, batch=100, device='cpu'):
    """uint8 images [N, H, W, 3] (an array, or any iterable of [H, W, 3]) -> pool features float64 [N, 2048] and class
    probabilities float64 [N, C]. The Inception port exposes its output layer, so probabilities come from the same
    pass: softmax(features @ W^T) without the bias, as ADM and StyleGAN3 compute IS. Other detectors: detector(x).
    TF32 is off inside (as StyleGAN3's calc_metrics.py), whatever the caller (cat.py's training loop) set."""
    W = getattr(getattr(detector, 'output', None), 'weight', None)
    it, feats, probs = iter(images), [], []
    total = len(images) if hasattr(images, '__len__') else None
    with full_fp32(), tqdm(total=total, unit='img', leave=False, disable=None) as bar:
        while chunk := list(itertools.islice(it, batch)):
            x = torch.from_numpy(np.stack(chunk)).to(device).permute(0, 3, 1, 2)      # uint8 NCHW, resized inside
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
        self.path, self.files, self.data = path, None, None
        if os.path.exists(os.path.join(path, 'meta.json')):
            from cat import LatentDataset
            from prepare_latents import check_data_dir
            meta = check_data_dir(path)
            if meta['vae'] is not None and not meta['images']:
                raise SystemExit(f'fid.py: dataset {path} holds latents without images (prepared with --no-images)')
            self.data, self.shape = LatentDataset(path, meta, images=meta['images']), (meta['N'],)
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
            raise SystemExit(f'fid.py: {path}: arr_0 must be uint8 [N, H, W, 3], got {dtype} {list(self.shape)}')

    def __len__(self):
        return self.shape[0]

    def __iter__(self):
        if self.data is not None:
            for i in range(len(self)):
                m, _, img = self.data[i]
                yield img.permute(1, 2, 0).numpy() if self.data.images else \
                    (m[:m.shape[0] // 2].float() * 127.5 + 128).clamp(0, 255).byte().permute(1, 2, 0).numpy()
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
# A data set's own classifier as the detector, for small pixel-space data (the toy set, your own): the share of
# samples classified as their class, and the Frechet distance in its 128-d features
# ----------------------------------------------------------------------------------------------


class SmallClassifier(nn.Module):
    """3 convs (the first strided down to 16 x 16 or less), global average pool, 128-d features, a linear head."""
    def __init__(self, res=16, num_classes=10, channels=3, dim=128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=max(1, res // 16), padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU())
        self.fc = nn.Sequential(nn.Linear(64, dim), nn.SiLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x):
        return self.fc(self.convs(x).mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(x, y, num_classes, val, steps=300, batch=128, seed=0):
    """A SmallClassifier trained on images x [N, C, R, R] in [-1, 1] with labels y (batches in order, cycling
    through seeded shuffles when N < steps * batch; light Gaussian noise), Adam with a one-cycle schedule; in eval
    mode, its accuracy on val = (x, y) in .val_acc. Leaves the global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = SmallClassifier(x.shape[-1], num_classes, x.shape[1])
    order = torch.arange(steps * batch)
    if len(x) < steps * batch:
        perm = torch.Generator().manual_seed(seed + 1)
        order = torch.cat([torch.randperm(len(x), generator=perm) for _ in range(-(-steps * batch // len(x)))])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    clf.train()
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        xb = x[idx].float()
        xb = xb + 0.1 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        clf.val_acc = (clf(val[0].float()).argmax(1) == val[1]).float().mean().item()
    return clf


@torch.no_grad()
def classifier_metrics(clf, fake_x, fake_y, real_x):
    """n fakes [n, C, R, R] in [-1, 1] with their classes fake_y, judged against 2n reals real_x:
    class_acc: the share classified as their class; class_acc_flip: the same for the mirrored fakes (on a data set
    with asymmetric classes it stays low unless G draws mirror images); fd: Frechet distance in the classifier's
    features, fakes vs real_x[:n]; fd_floor: real_x[n:2n] vs real_x[:n], the real-vs-real floor at equal n."""
    n = len(fake_x)
    if len(real_x) < 2 * n:
        raise ValueError(f'classifier_metrics needs 2n = {2 * n} real images, got {len(real_x)}')
    feats = lambda x: torch.cat([clf.features(b.float().clamp(-1, 1)) for b in x.split(1000)]).double().numpy()
    acc = lambda x: (torch.cat([clf(b.float().clamp(-1, 1)) for b in x.split(1000)]).argmax(1) == fake_y).float()
    ff, fa, fb = feats(fake_x), feats(real_x[:n]), feats(real_x[n:2 * n])
    return dict(class_acc=acc(fake_x).mean().item(), class_acc_flip=acc(fake_x.flip(-1)).mean().item(),
                fd=frechet_distance(*feature_stats(ff), *feature_stats(fa)),
                fd_floor=frechet_distance(*feature_stats(fb), *feature_stats(fa)))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description='FID, Inception Score, precision and recall of ADM-format samples.')
    p.add_argument('samples', help='ADM .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images')
    p.add_argument('--ref', required=True,
                   help='.npz with mu/sigma (+ features or images arr_0), .npz of images arr_0, or a folder of images')
    p.add_argument('--detector', help=f'TorchScript Inception (default {DETECTOR_CACHE}, downloaded once)')
    p.add_argument('--json', help='also write the metrics to this file')
    p.add_argument('--save-ref', help='write the reference mu, sigma and features to this .npz, for reuse as --ref')
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
        print(f'{k:16s}{v:.4f}' if v is not None else f'{k:16s}skipped: the reference has no features or images')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(m, num_samples=len(feats), samples=args.samples, ref=args.ref), f, indent=2)


if __name__ == '__main__':
    main()
