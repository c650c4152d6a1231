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
import argparse, itertools, json, os, zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cat import (DETECTOR_CACHE, check_data_dir, feature_stats, frechet_distance, full_fp32, load_detector,
                 precision_recall, LatentDataset)

IS_SPLIT = 5000             # ADM computes IS over consecutive chunks of 5000 samples (and the remainder)
MAX_REF_FEATURES = 50000    # --save-ref keeps a random subset of this many features (float16) for precision/recall

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
        kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)).sum(axis=1).mean()    # 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores))


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
