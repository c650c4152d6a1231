"""
Class-folder image tree -> CAT dataset directory: SD-VAE posterior (mean, std) of the center crops, labels, and the
crops themselves as JPEG (for D-side REPA); or, with --vae none, the images themselves (pixel space).

    python prepare_latents.py --imagenet /data/ILSVRC2012/train --out data/imagenet256
    torchrun --nproc_per_node=8 prepare_latents.py --imagenet /data/ILSVRC2012/train --out data/imagenet256
    python prepare_latents.py --images my_pngs/ --resolution 16 --vae none --out data/mine16     # pixel space

--imagenet is the ImageNet recipe (256 x 256, SD-VAE); --images takes any tree with one folder per class, at any
--resolution. Full ImageNet: the second line, on one node with a local disk for --out (several nodes work too if
--out is on a shared file system). Throughput per GPU: not measured here (tqdm shows rank 0's images/s).
Interrupt it at any point and run the same command again: finished chunks are kept, the rest is encoded.

Output (format_version 1, read by cat.py; meta.json is written last, cat.py refuses a directory without it):
    latents.npy       float16 [N, 2C, r, r]: channels [:C] posterior mean, [C:] posterior std, unscaled (SD-VAE:
                      C = 4, r = R / 8); pixel space (--vae none): the image in [-1, 1] and std 0, C = 3, r = R
    labels.npy        int64 [N]: index of the class folder in sorted folder names
    images.bin        the R x R RGB crops, each a JPEG (PIL, quality 95, 4:4:4 chroma: no chroma blur for
    images_index.npy  DINOv2), concatenated; image i = images.bin[index[i]:index[i+1]], index int64 [N+1];
                      not written for pixel space (the images are latents.npy) or with --no-images
    meta.json         format_version, vae (null: pixel space), scaling_factor, resolution, crop, latent_shape,
                      num_classes, class_names, N, images, skipped, ...
    skipped.txt       unreadable files (path, reason) and empty class folders
Samples follow the file list (sorted class folders, sorted files within), minus skipped files.
--crop center (default) is ADM's center crop; --crop resize is a plain resize to R x R, for images that are already
(nearly) square at about R, where cropping would only lose their border.

Disk use per image: latents 8*32*32*2 B = 16 KiB; JPEG q95 4:4:4 of a crop measured here at 44 KB and 64 KB
on two detailed photos (not ImageNet); for ImageNet ~35-50 KB is an estimate, not measured here.
ImageNet train (1,281,167 images): latents 21.0 GB (19.5 GiB), images ~45-65 GB, labels 10 MB; while the
chunks are assembled both copies exist, so plan for about twice that free (~130-170 GB peak).
`--no-images` drops the JPEGs (no REPA then).
"""
import argparse
import datetime
import io
import json
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cat

JPEG_QUALITY = 95
# pixel data of this side or more is stored as JPEG by default (ImageNet-256: ~47 GB, not 252 GB)
JPEG_FROM = 128
IMAGE_EXTS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm'}
OUTPUTS = ('meta.json', 'latents.npy', 'pixels.npy', 'labels.npy', 'images.bin', 'images_index.npy',
           'skipped.txt')

# ----------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------


def center_crop_arr(img, size=256):
    """ADM's center crop: halve with BOX while the short side is >= 2*size, BICUBIC to short side = size
    (this also upscales small images), crop the center. Returns uint8 [size, size, 3]."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def to_rgb(img):
    """Grayscale, CMYK, palette -> RGB; transparent images are composited on white."""
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img.convert('RGBA'))
    return img.convert('RGB')


def list_images(root, one_class=False):
    """-> (classes, files, labels, note). Class folders (sorted names) with their image files (sorted relative paths,
    recursive); or one unlabelled class, every image under root, when root holds images itself or one_class is set."""

    def images(d):
        return sorted(os.path.relpath(os.path.join(dirpath, f), root)
                      for dirpath, _, fs in os.walk(d) for f in fs
                      if os.path.splitext(f)[1].lower() in IMAGE_EXTS and not f.startswith('.'))

    top = [f for f in os.listdir(root)
           if os.path.splitext(f)[1].lower() in IMAGE_EXTS and not f.startswith('.')]
    if top or one_class:
        files = images(root)
        why = '--one-class' if one_class else f'{plural(len(top), "image")} directly in it'
        return ([os.path.basename(os.path.abspath(root))], files, [0] * len(files),
                f'{root}: one unlabelled class of {plural(len(files), "image")} ({why}; class folders are '
                'read only when the folder holds no images itself)')
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.'))
    found = [images(os.path.join(root, name)) for name in classes]
    return classes, sum(found, []), [c for c, f in enumerate(found) for _ in f], None


def plural(n, word, words=None):
    return f'{n} {word if n == 1 else words or word + "s"}'


def resize_arr(img, size):
    """A plain BICUBIC resize to size x size (the aspect ratio is not kept). Returns uint8 [size, size, 3]."""
    return np.asarray(img.resize((size, size), resample=Image.BICUBIC))


class ImageFiles(Dataset):
    """Item i -> (i, crop uint8 [R, R, 3] or None, JPEG bytes, reason for a skip or '', grey: R = G = B everywhere)."""

    def __init__(self, root, files, jpeg, resolution, crop):
        self.root = root
        self.files = files
        self.jpeg = jpeg
        self.resolution = resolution
        self.crop = center_crop_arr if crop == 'center' else resize_arr

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(os.path.join(self.root, self.files[i])) as img:
                crop = self.crop(to_rgb(img), self.resolution)
            grey = bool((crop[..., :1] == crop).all())
            buf = io.BytesIO()
            if self.jpeg:
                Image.fromarray(crop).save(buf, format='JPEG', quality=JPEG_QUALITY, subsampling=0)
            return i, crop, buf.getvalue(), '', grey
        except Exception as e:  # unreadable or corrupt: reported, no sample
            return i, None, b'', f'{type(e).__name__}: {e}', False


def collate(items):
    return tuple(zip(*items))

# ----------------------------------------------------------------------------------------------
# Helper functions
# ----------------------------------------------------------------------------------------------


def fail(msg):
    raise SystemExit(f'error: {msg}')


def save_atomic(path, write):
    """write(file) to a temp name, then rename: the file exists completely or not at all."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_latents(lat, labels, num_classes, where, pixels=False):
    C = lat.shape[1] // 2
    if not pixels and not np.isfinite(lat).all():
        fail(f'non-finite latents in {where}')
    if not pixels and not (lat[:, C:] > 0).all():
        fail(f'posterior std <= 0 (fp16 underflow?) in {where}')
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        fail(f'labels outside [0, {num_classes}) in {where}')


def plan_run(args):
    """Rank 0: check the input and output, list the files (saved in parts/files.json so a re-run uses the
    same list), or refuse. Returns the saved plan."""
    out = args.out
    parts = os.path.join(args.out, 'parts')
    src = args.source
    if not os.path.isdir(src):
        fail(f'{src} is not a directory')
    classes, files, labels, note = list_images(src, args.one_class)
    if not files:
        fail(f'{src} holds no image files ({", ".join(sorted(IMAGE_EXTS))}), neither itself nor in '
             'sub-folders')
    print(note or f'{src}: {plural(len(files), "image")} in {plural(len(classes), "class folder")}')
    pixels = args.vae.lower() == 'none'
    if args.store and not pixels:
        fail(f'--store {args.store} is for pixel data (--vae none); latents are stored as float16 posteriors')
    vae = None if pixels else os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae
    # training resolution: the image, or the latent
    r = args.resolution // (1 if pixels else 8)
    if r < 16 or r % 16:
        fail(f'--resolution {args.resolution} gives {r} x {r} {"images" if pixels else "latents"}, but '
             f'CAT\'s four scales (1/8 ... 1) with patch 2 need a multiple of 16: use --resolution '
             f'{"16, 32, 64" if pixels else "128, 256, 512"}, ...')
    store = 'latents' if not pixels else args.store or ('jpeg' if args.resolution >= JPEG_FROM else 'uint8')
    plan = dict(source=os.path.abspath(src), vae=vae, resolution=args.resolution, crop=args.crop,
                precision=args.precision, chunk=args.chunk, store=store,
                images=store == 'jpeg' or not (args.no_images or pixels),
                classes=classes, files=files, labels=labels)
    saved_path = os.path.join(parts, 'files.json')
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else None
    complete = os.path.exists(os.path.join(out, 'meta.json'))
    if complete and not args.overwrite:
        fail(f'{out} already holds a complete dataset (meta.json); pass --overwrite to replace it')
    finished = saved is not None and any(f.endswith('.npz') for f in os.listdir(parts))
    if saved not in (None, plan) and finished and not args.overwrite:  # else nothing is lost by starting over
        key = next(k for k in plan if saved.get(k) != plan[k])
        what = (f'{len(saved.get(key) or [])} saved, {len(plan[key])} now'
                if key in ('files', 'labels', 'classes')
                else f'saved {saved.get(key)!r}, now {plan[key]!r}')
        fail(f'{parts} holds an unfinished run with a different {key} ({what}); '
             f'rerun with the same arguments to continue, or pass --overwrite to start over')
    if complete or saved != plan:  # a fresh start; an unfinished run with the same plan continues instead
        for f in OUTPUTS:  # meta.json first: the directory stops being "complete" before anything else goes
            for path in (os.path.join(out, f), os.path.join(out, f + '.tmp')):
                if os.path.exists(path):
                    os.remove(path)
        shutil.rmtree(parts, ignore_errors=True)
        os.makedirs(parts)
        save_atomic(saved_path, lambda f: f.write(json.dumps(plan).encode()))
    for c in sorted(set(range(len(classes))) - set(labels)):
        print(f'warning: class folder {classes[c]!r} (index {c}) holds no images')
    return plan


def encode(vae, x, precision):
    """uint8 [B, R, R, 3] -> float16 [B, 2C, r, r]: posterior mean and std of the VAE at [-1, 1]; without a VAE
    (pixel space) the uint8 image [B, 3, R, R] itself."""
    if vae is None:
        return x.permute(0, 3, 1, 2).cpu().numpy()
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.autocast(x.device.type, torch.bfloat16, enabled=precision == 'bf16'):
        posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], 1).half().cpu().numpy()


def load(path, key):
    with np.load(path) as part:
        return part[key]


def write_part(path, latents, labels, jpegs, greys, skipped, num_classes, shape, pixels):
    dtype = np.uint8 if pixels else np.float16
    # all files skipped (or JPEG store)
    latents = np.concatenate(latents) if latents else np.zeros((0, *shape), dtype)
    labels = np.array(labels, dtype=np.int64)
    check_latents(latents, labels, num_classes, os.path.basename(path), pixels)
    save_atomic(path, lambda f: np.savez(f, latents=latents, labels=labels, grey=np.array(greys, bool),
                                         jpeg=np.frombuffer(b''.join(jpegs), np.uint8),
                                         jpeg_sizes=np.array([len(j) for j in jpegs], np.int64),
                                         skipped=np.array(json.dumps(skipped))))


def assemble(out, plan, part_paths, scaling_factor):
    """Rank 0, once every chunk exists: parts -> final files (temp names), validate, rename, meta.json last. Pixel
    data whose every image is grey (R = G = B) is stored with one channel."""

    def tmp(name):
        return os.path.join(out, name + '.tmp')

    num_classes = len(plan['classes'])
    skipped = []
    store = plan['store']
    counts = [len(load(p, 'labels')) for p in part_paths]
    N, shape = sum(counts), load(part_paths[0], 'latents').shape[1:]
    if N == 0:
        fail(f'no image under {plan["source"]} could be read, see the skipped lines above')
    C = 1 if store != 'latents' and all(load(p, 'grey').all() for p in part_paths) else 3
    name = {'latents': 'latents.npy', 'uint8': 'pixels.npy', 'jpeg': None}[store]
    shape = shape if store == 'latents' else (C, *shape[1:])
    if name:
        data = np.lib.format.open_memmap(tmp(name), 'w+', np.float16 if store == 'latents' else np.uint8,
                                         (N, *shape))
    labels, index = np.empty(N, np.int64), np.zeros(N + 1, np.int64)
    with open(tmp('images.bin') if plan['images'] else os.devnull, 'wb') as images:
        n = 0
        for p, count in zip(tqdm(part_paths, desc='assembling'), counts):
            with np.load(p) as part:
                if name:
                    data[n:n + count] = part['latents'][:, :shape[0]]
                labels[n:n + count] = part['labels']
                index[n + 1:n + count + 1] = index[n] + np.cumsum(part['jpeg_sizes'])
                images.write(part['jpeg'].tobytes())
                skipped += json.loads(str(part['skipped']))
            n += count
    if name:
        data.flush()
        del data

    # validation pass over what was written, then the final names
    if not len(labels) == len(index) - 1 == len(plan['files']) - len(skipped):
        fail('sample counts do not match after assembly')
    if store == 'latents':
        latents = np.load(tmp(name), mmap_mode='r')
        for s in range(0, N, 10000):
            check_latents(latents[s:s + 10000], labels[s:s + 10000], num_classes, name)
    check_latents(np.zeros((0, 2)), labels, num_classes, 'labels.npy', pixels=True)
    if plan['images'] and (index[-1] != os.path.getsize(tmp('images.bin')) or not (np.diff(index) > 0).all()):
        fail('images_index.npy does not match images.bin')
    if name:
        os.replace(tmp(name), os.path.join(out, name))
    save_atomic(os.path.join(out, 'labels.npy'), lambda f: np.save(f, labels))
    if plan['images']:
        os.replace(tmp('images.bin'), os.path.join(out, 'images.bin'))
        save_atomic(os.path.join(out, 'images_index.npy'), lambda f: np.save(f, index))

    empty = [plan['classes'][c] for c in sorted(set(range(num_classes)) - set(plan['labels']))]
    report = [f'{os.path.join(plan["source"], f)}\t{reason}' for f, reason in skipped]
    report += [f'{os.path.join(plan["source"], c)}\tempty class folder' for c in empty]
    save_atomic(os.path.join(out, 'skipped.txt'),
                lambda f: f.write(''.join(r + '\n' for r in report).encode()))
    shape = {'latent_shape' if store == 'latents' else 'shape': list(shape)}
    meta = dict(format_version=cat.DATA_FORMAT_VERSION, vae=plan['vae'], scaling_factor=float(scaling_factor),
                resolution=plan['resolution'], crop=plan['crop'], store=store, **shape,
                num_classes=num_classes, class_names=plan['classes'], N=N, images=plan['images'],
                skipped=len(skipped), empty_classes=empty, precision=plan['precision'], source=plan['source'],
                jpeg=dict(quality=JPEG_QUALITY, subsampling='4:4:4') if plan['images'] else None)
    save_atomic(os.path.join(out, 'meta.json'), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    shutil.rmtree(os.path.join(out, 'parts'))
    print(f'wrote {plural(N, "sample")} of {plural(num_classes, "class", "classes")} to {out} ('
          f'{plural(len(skipped), "file")} skipped, {plural(len(empty), "empty class folder")}'
          f'{", see skipped.txt" if report else ""})')

# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args):
    ddp = 'RANK' in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo',
                                timeout=datetime.timedelta(hours=6))
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f'cuda:{os.environ.get("LOCAL_RANK", 0)}' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)

    # Rank 0 checks and lists; a refusal stops every rank.
    status = [None]
    if rank == 0:
        try:
            plan_run(args)
        except SystemExit as e:
            status[0] = str(e)
    if ddp:
        dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise SystemExit(status[0] if rank == 0 else 1)
    parts = os.path.join(args.out, 'parts')
    plan = json.load(open(os.path.join(parts, 'files.json')))
    N_files = len(plan['files'])
    chunk = plan['chunk']
    num_classes = len(plan['classes'])
    part_paths = [os.path.join(parts, f'{c:06d}.npz') for c in range(-(-N_files // chunk))]
    todo = [c for c, p in enumerate(part_paths) if not os.path.exists(p)]
    if ddp:
        dist.barrier()  # every rank has seen the same finished chunks before anyone writes new ones
    if rank == 0 and len(todo) < len(part_paths):
        print(f'skipping {len(part_paths) - len(todo)} finished chunks, {len(todo)} left to encode')

    # Encode this rank's share of the unfinished chunks; batches never straddle a chunk.
    mine = todo[rank::world]
    spans = [(c * chunk, min((c + 1) * chunk, N_files)) for c in mine]
    batches = [list(range(s, min(s + args.batch, end)))
               for start, end in spans for s in range(start, end, args.batch)]
    dataset = ImageFiles(plan['source'], plan['files'], plan['images'], plan['resolution'], plan['crop'])
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.workers, collate_fn=collate)
    pixels = plan['vae'] is None
    vae = None if pixels else cat.load_vae(plan['vae'], device)
    r = plan['resolution'] // (1 if pixels else 2 ** (len(vae.config.block_out_channels) - 1))
    shape = (3, r, r) if pixels else (2 * vae.config.latent_channels, r, r)
    bar = tqdm(total=sum(e - s for s, e in spans), unit='img', disable=rank != 0, dynamic_ncols=True,
               desc=f'encoding ({world} rank{"s" if world > 1 else ""}, rank 0 shown)')
    latents = []
    labels = []
    jpegs = []
    greys = []
    skipped = []
    written = 0
    with torch.inference_mode():
        for idx, crops, jpeg, reasons, grey in loader:
            ok = [k for k, reason in enumerate(reasons) if not reason]
            for k in (k for k, reason in enumerate(reasons) if reason):
                skipped.append((plan['files'][idx[k]], reasons[k]))
                tqdm.write(f'skipped {plan["files"][idx[k]]}: {reasons[k]}')
            if ok and plan['store'] != 'jpeg':          # a JPEG store keeps only the JPEGs
                x = torch.from_numpy(np.stack([crops[k] for k in ok])).to(device)
                latents.append(encode(vae, x, plan['precision']))
            labels += [plan['labels'][idx[k]] for k in ok]
            jpegs += [jpeg[k] for k in ok]
            greys += [grey[k] for k in ok]
            bar.update(len(idx))
            c = idx[0] // chunk
            if idx[-1] == min((c + 1) * chunk, N_files) - 1:  # chunk complete
                write_part(part_paths[c], latents, labels, jpegs, greys, skipped, num_classes, shape, pixels)
                latents = []
                labels = []
                jpegs = []
                greys = []
                skipped = []
                written += 1
                if written == args.stop_after_chunks:  # tests only: die like a killed process
                    print(f'stopping after {written} chunks', flush=True)
                    os._exit(3)
    bar.close()
    if ddp:
        dist.barrier()
    if rank == 0:
        missing = [p for p in part_paths if not os.path.exists(p)]
        if missing:
            fail(f'{len(missing)} chunks missing in {parts}; run the same command again')
        assemble(args.out, plan, part_paths, 1.0 if pixels else vae.config.scaling_factor)
    if ddp:
        dist.destroy_process_group()


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--imagenet', dest='source',
                     help='ILSVRC2012 train folder: the ImageNet recipe (256, SD-VAE)')
    src.add_argument('--images', dest='source',
                     help='a folder with one sub-folder of images per class, or a folder of '
                          'images (one unlabelled class: every image under it)')
    parser.add_argument('--one-class', action='store_true',
                        help='one unlabelled class from every image under --images, even if it holds only '
                             'sub-folders')
    parser.add_argument('--out', default=cat.DEFAULT_DATA,
                        help=f'dataset directory to write (default {cat.DEFAULT_DATA})')
    parser.add_argument('--resolution', type=int, default=256,
                        help='image side R after cropping (default 256)')
    parser.add_argument('--crop', choices=['center', 'resize'], default='center',
                        help="'center': ADM's center crop; 'resize': plain resize to R x R "
                             "(images already about R)")
    parser.add_argument('--vae', default=cat.DEFAULT_VAE,
                        help="diffusers name (sd-vae-ft-ema / -ft-mse), a save_pretrained dir, "
                             "or 'none' (pixels)")
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32', help='encoder precision')
    parser.add_argument('--batch', type=int, default=64, help='encoder batch per rank')
    parser.add_argument('--workers', type=int, default=min(8, len(os.sched_getaffinity(0))),
                        help='image-decoding DataLoader workers per rank '
                             '(default: the cores available, at most 8)')
    parser.add_argument('--chunk', type=int, default=10000, help='images per resumable chunk')
    parser.add_argument('--no-images', action='store_true', help='store no JPEG crops (no REPA)')
    parser.add_argument('--store', choices=['uint8', 'jpeg'], default=None,
                        help=f'pixel data (--vae none): uint8 array, or JPEG q{JPEG_QUALITY} 4:4:4 decoded '
                             f'while training (default: JPEG from {JPEG_FROM} px, where it is ~5x smaller; '
                             f'README: pixel data)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a complete output or an unfinished one with other settings')
    parser.add_argument('--stop-after-chunks', type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(get_args())
