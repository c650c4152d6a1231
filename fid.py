"""
FID, Inception Score, precision and recall of ADM-format samples (the paper reports FID-50K).

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz                # ADM's ImageNet 256 reference batch
    python fid.py samples.npz --ref imagenet/train --save-ref ref.npz --json m.json   # reference from a folder, saved
    python fid.py samples.npz --ref ref.npz --detector inception-2015-12-05.pt        # no download
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
"""
import argparse, itertools, json, os, sys, warnings, zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cat
from cat import check_data_dir, feature_stats, frechet_distance, full_fp32, precision_recall, LatentDataset

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


def train(argv):
    """fid.py train [cat.py options] --fid-every N --fid-ref REF.npz [--fid-n 5000] [--fid-detector PATH]."""
    p = argparse.ArgumentParser(prog='fid.py train',
                                description="cat.py's training, plus FID of the EMA generator every "
                                            "--fid-every steps; every other option is cat.py's")
    p.add_argument('--fid-every', type=int, required=True, help='FID every N steps (and at the last step)')
    p.add_argument('--fid-ref', required=True, help="reference statistics .npz (mu, sigma), e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument('--fid-n', type=int, default=5000, help='samples per FID (5000)')
    p.add_argument('--fid-detector', default=None,
                   help='inception-2015-12-05.pt path (default: download once, cache)')
    f, rest = p.parse_known_args(argv)
    if f.fid_every <= 0 or not os.path.isfile(f.fid_ref):
        p.error('--fid-every must be positive and --fid-ref an existing .npz '
                f'(got {f.fid_every}, {f.fid_ref})')
    args = cat.get_args(rest)
    return cat.train(args, hooks=[TrainingFID(args, f)])

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main():
    if sys.argv[1:2] == ['train']:
        return train(sys.argv[2:])
    p = argparse.ArgumentParser(description='FID, Inception Score, precision and recall of '
                                            'ADM-format samples.')
    p.add_argument('samples', help='ADM .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images')
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
