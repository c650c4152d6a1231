"""Fingerprint training: prove two checkouts of cat.py train bit-identically.

For each scenario below it trains 16 steps from scratch (torch.manual_seed(0) first), then resumes the step-16
checkpoint to step 24, in process through `cat.main(argv)`, and records a sha256 of every tensor of the final
checkpoint's G, D, ema and of the optimizer states (opt_g, opt_d: each 'state' tensor, plus the param_groups).
Backbones (DINOv2, ConvNeXt-V2) are built with pretrained=False (offline), as test_cat.py's stand_in_backbones.
G's output heads may be renamed: keys of G and ema starting with 'heads.', 'outputs.' or 'out_heads.' become 'OUT.'.

Usage:
    OMP_NUM_THREADS=1 python docs/scripts/fingerprint.py --repo /tmp/old --work /tmp/fp_old --out /tmp/fp_old.json
    OMP_NUM_THREADS=1 python docs/scripts/fingerprint.py --repo /work/main --work /tmp/fp_new --out /tmp/fp_new.json \\
        --resume-from /tmp/fp_old
    python docs/scripts/fingerprint.py --compare /tmp/fp_old.json /tmp/fp_new.json   # exit 1 if anything differs

--resume-from DIR resumes from DIR/NAME/scratch/ckpt-0000016.pt (another checkout's checkpoints) instead of this
run's own; --only NAME[,NAME] runs a subset. WORK/NAME is deleted and rewritten; the fake datasets go to WORK/data.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

TOY = ['--data', 'toy', '--toy-n', '400', '--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--lr', '2e-3',
       '--ema-decay', '0.99', '--no-aug', '--gamma', '0.1', '--lambda-repa', '0']
SMALL = ['--model', 'T', '--batch-size', '8', '--precision', 'fp32', '--lambda-repa', '0']
# the fake datasets: name -> make_latent_dir's keyword arguments
DATASETS = {
    'latent': dict(),
    'latent_images': dict(images=True),
    'grey16': dict(pixels=1, res=16),
    'oneclass16': dict(pixels=3, res=16, num_classes=1),
    'pixel64': dict(pixels=3, res=64),
}
# scenario -> (dataset or None, argv without --data for a dataset); the pixel_va options are test_cat.py's A3_64.
# toy_gp_fp32 trains in bf16: under --precision fp32 the R1/R2 pass is the same either way (identical to 'toy').
# toy_hier uses 4,8,16: 2,4,8,16 is the toy's default (Table 6's R/8..R at 16 px), so identical to 'toy'.
SCENARIOS = {
    'toy': (None, TOY),
    'toy_aug': (None, [('--aug' if a == '--no-aug' else a) for a in TOY]),
    'toy_gp_fp32': (None, [('bf16' if a == 'fp32' else a) for a in TOY] + ['--gp-precision', 'fp32']),
    'toy_micro': (None, TOY + ['--micro-batch', '4']),
    'toy_nomask': (None, TOY + ['--no-mask']),
    'toy_gradckpt': (None, TOY + ['--grad-ckpt']),
    'toy_bf16': (None, [('bf16' if a == 'fp32' else a) for a in TOY]),
    'toy_hier': (None, TOY + ['--scales', '4,8,16']),
    'toy_greyscale': ('grey16', SMALL),
    'toy_oneclass': ('oneclass16', SMALL),
    'latent_paper': ('latent', SMALL),
    'latent_repa': ('latent_images', ['--model', 'T', '--batch-size', '8', '--precision', 'fp32',
                                      '--lambda-repa', '1.0']),
    'pixel_va': ('pixel64', SMALL + ['--scales', '4,8,16,64', '--patch', '4', '--d-patch', '2,2,2,4',
                                     '--lambda-va', '0.1', '--va-model', 'convnextv2_atto']),
}
RUN = ['--eval-every', '0', '--ckpt-every', '8', '--latest-every', '8', '--log-every', '8', '--workers', '0']
OUT_PREFIXES = ('heads.', 'outputs.', 'out_heads.')


def make_latent_dir(path, n=16, num_classes=4, images=False, meta_edits=None, n_lat=None, res=32, pixels=0):
    """Copied from test_cat.py: a dataset directory in prepare_latents.py's format, random content."""
    os.makedirs(path, exist_ok=True)
    g = np.random.default_rng(0)
    lat = np.concatenate([g.normal(size=(n_lat or n, 4, res, res)), np.full((n_lat or n, 4, res, res), 0.5)], 1)
    if pixels:
        np.save(os.path.join(path, 'pixels.npy'), g.integers(0, 256, (n_lat or n, pixels, res, res), dtype=np.uint8))
    else:
        np.save(os.path.join(path, 'latents.npy'), lat.astype(np.float16))
    np.save(os.path.join(path, 'labels.npy'), np.arange(n) % num_classes)
    if images:
        from PIL import Image
        blobs = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(g.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format='JPEG')
            blobs.append(buf.getvalue())
        np.save(os.path.join(path, 'images_index.npy'), np.cumsum([0] + [len(b) for b in blobs]))
        open(os.path.join(path, 'images.bin'), 'wb').write(b''.join(blobs))
    meta = dict(format_version=1, vae='stabilityai/sd-vae-ft-ema', scaling_factor=0.18215, resolution=8 * res,
                latent_shape=[8, res, res], num_classes=num_classes, class_names=[f'c{i}' for i in range(num_classes)],
                N=n, images=images)
    if pixels:
        meta.update(format_version=2, vae=None, scaling_factor=1, resolution=res, store='uint8',
                    shape=[pixels, res, res])
        del meta['latent_shape']
    meta.update(meta_edits or {})
    json.dump(meta, open(os.path.join(path, 'meta.json'), 'w'))
    return path


def import_cat(repo):
    """The cat module of this checkout, its backbones built without downloaded weights."""
    sys.path.insert(0, os.path.abspath(repo))
    import cat
    real = cat.load_frozen
    cat.load_frozen = lambda name, device, pretrained=True, *a, **k: real(name, device, False, *a, **k)
    return cat


def tensor_hash(t):
    """sha256 of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f'{t.dtype} {list(t.shape)} '.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def normalize(key):
    """G's output heads under one name, whatever this version calls them."""
    for prefix in OUT_PREFIXES:
        if key.startswith(prefix):
            return 'OUT.' + key[len(prefix):]
    return key


def fingerprint(path):
    """{name: sha256} of a checkpoint's model and optimizer tensors."""
    ck = torch.load(path, map_location='cpu', weights_only=True)
    out = {}
    for part in ('G', 'D', 'ema'):
        for key, t in ck[part].items():
            out[f'{part}.{normalize(key) if part != "D" else key}'] = tensor_hash(t)
    for part in ('opt_g', 'opt_d'):
        for index, state in ck[part]['state'].items():
            for key, t in state.items():
                out[f'{part}.state.{index}.{key}'] = tensor_hash(t)
        groups = json.dumps(ck[part]['param_groups'], sort_keys=True, default=str)
        out[f'{part}.param_groups'] = hashlib.sha256(groups.encode()).hexdigest()
    return out


def train(cat, argv):
    """One in-process run of `python cat.py argv`."""
    torch.manual_seed(0)
    print('cat.py', ' '.join(argv), flush=True)
    cat.main(argv)


def run_scenario(cat, name, work, resume_from):
    """Train from scratch to 16 steps, resume resume_from's step-16 checkpoint to 24 -> both fingerprints."""
    data, argv = SCENARIOS[name]
    if data:
        argv = ['--data', make_latent_dir(os.path.join(work, 'data', data), **DATASETS[data])] + argv
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    scratch, resumed = os.path.join(root, 'scratch'), os.path.join(root, 'resumed')
    train(cat, argv + ['--steps', '16', '--out', scratch] + RUN)
    os.makedirs(resumed)
    start = os.path.join(resumed, 'ckpt-0000016.pt')
    shutil.copy(os.path.join(resume_from, name, 'scratch', 'ckpt-0000016.pt'), start)
    train(cat, argv + ['--steps', '24', '--resume', start, '--out', resumed] + RUN)
    return {'scratch': fingerprint(os.path.join(scratch, 'ckpt-0000016.pt')),
            'resumed': fingerprint(os.path.join(resumed, 'ckpt-0000024.pt'))}


def run_all(args):
    cat = import_cat(args.repo)
    names = args.only.split(',') if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f'unknown scenario(s) {unknown}: pick from {list(SCENARIOS)}')
    result = {}
    for name in names:
        t0 = time.time()
        try:
            result[name] = run_scenario(cat, name, args.work, args.resume_from or args.work)
        except (Exception, SystemExit) as e:
            result[name] = {'error': f'{type(e).__name__}: {e}'}
        result[name]['seconds'] = round(time.time() - t0, 1)
        print(f'== {name}: {result[name].get("error", "done")} in {result[name]["seconds"]} s', flush=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1, sort_keys=True)
    for name in names:
        print(f'{name:16s} {result[name]["seconds"]:8.1f} s  {result[name].get("error", "ok")}')
    return 1 if any('error' in r for r in result.values()) else 0


def compare_phase(a, b):
    """'' when equal, else which keys differ or are missing (up to 10)."""
    problems = [f'{k} differs' for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    problems += [f'{k} only in A' for k in sorted(a.keys() - b.keys())]
    problems += [f'{k} only in B' for k in sorted(b.keys() - a.keys())]
    more = f' (+{len(problems) - 10} more)' if len(problems) > 10 else ''
    return ', '.join(problems[:10]) + more


def compare(path_a, path_b):
    a, b = json.load(open(path_a)), json.load(open(path_b))
    bad = 0
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            print(f'{name}: only in {path_a if name in a else path_b}')
            bad += 1
            continue
        for phase in ('scratch', 'resumed'):
            if phase not in a[name] or phase not in b[name]:
                print(f'{name} {phase}: no result (A: {a[name].get("error")}, B: {b[name].get("error")})')
                bad += 1
                continue
            problem = compare_phase(a[name][phase], b[name][phase])
            print(f'{name} {phase}: {"differs: " + problem if problem else "equal"} ({len(a[name][phase])} tensors)')
            bad += bool(problem)
    print('all equal' if not bad else f'{bad} differ')
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repo', help='checkout whose cat.py trains')
    p.add_argument('--work', help='scratch directory for runs and fake datasets')
    p.add_argument('--out', help='JSON file of fingerprints')
    p.add_argument('--resume-from', help="a WORK of another run: resume its step-16 checkpoints (default: --work's)")
    p.add_argument('--only', help='comma-separated scenario names')
    p.add_argument('--compare', nargs=2, metavar=('A.json', 'B.json'))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.repo and args.work and args.out):
        p.error('--repo, --work and --out are needed (or --compare A B)')
    return run_all(args)


if __name__ == '__main__':
    sys.exit(main())
