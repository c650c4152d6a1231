"""Tests of prepare_latents.py (CPU): a small mixed-format image tree and a tiny random AutoencoderKL."""
import argparse, io, json, os, shutil, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, 'prepare_latents.py')
CLASSES = ['n01_cat', 'n02_empty', 'n03_dog', 'n04_owl']  # the empty folder sits in the middle on purpose


def prepare(*args, torchrun=False):
    """Runs prepare_latents.py; one CPU thread per process, as torchrun sets it, so outputs compare bitwise."""
    launch = ['-m', 'torch.distributed.run', '--nproc_per_node=2'] if torchrun else []
    return subprocess.run([sys.executable, *launch, SCRIPT, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def smooth_image(rng, w, h):
    """Something photo-like: a smooth colour field plus a little noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a, b, c = rng.uniform(1, 6, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], -1) * 100 + 128
    return Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """3 classes of mixed formats + one empty class folder + a corrupt file; a tiny VAE (256 -> 32, 4 channels)."""
    from diffusers.models import AutoencoderKL
    root, rng = tmp_path_factory.mktemp('imagenet'), np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
    img = lambda w, h: smooth_image(rng, w, h)
    img(400, 300).save(root / 'n01_cat/a.JPEG')
    img(640, 520).save(root / 'n01_cat/b.png')                              # min side >= 512: BOX halving
    img(300, 300).convert('L').save(root / 'n01_cat/c_gray.JPEG')
    rgba = img(280, 260).convert('RGBA')
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (260, 280), dtype=np.uint8)))
    rgba.save(root / 'n03_dog/a_rgba.png')
    img(300, 270).convert('P', palette=Image.ADAPTIVE).save(root / 'n03_dog/b_palette.png')
    img(320, 300).convert('CMYK').save(root / 'n03_dog/c_cmyk.JPEG')
    (root / 'n03_dog/d_corrupt.JPEG').write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    img(100, 80).save(root / 'n03_dog/e_small.JPEG')                         # upscaled
    (root / 'n03_dog/notes.txt').write_text('not an image')                  # ignored
    (root / 'n04_owl/sub').mkdir()
    for name in ('a.JPEG', 'b.JPEG', 'sub/c.JPEG'):
        img(500, 380).save(root / 'n04_owl' / name)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256)
    vae_dir = tmp_path_factory.mktemp('vae')
    vae.save_pretrained(vae_dir)
    return root, vae_dir


@pytest.fixture(scope='module')
def base(tree, tmp_path_factory):
    """One uninterrupted run, the reference for the others."""
    root, vae = tree
    out = tmp_path_factory.mktemp('base') / 'data'
    r = prepare('--imagenet', root, '--out', out, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 0)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def same_output(a, b, images=True):
    names = ['latents.npy', 'labels.npy'] + (['images.bin', 'images_index.npy'] if images else [])
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_prepare_format(tree, base):
    root, vae_dir = tree
    out, r = base
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['format_version'] == 1 and meta['resolution'] == 256 and meta['images'] is True
    assert meta['class_names'] == CLASSES and meta['num_classes'] == 4 and meta['empty_classes'] == ['n02_empty']
    assert meta['scaling_factor'] == pytest.approx(0.18215) and meta['latent_shape'] == [8, 32, 32]
    assert meta['N'] == 10 and meta['skipped'] == 1
    assert not (out / 'parts').exists() and 'holds no images' in r.stdout

    latents, labels = np.load(out / 'latents.npy'), np.load(out / 'labels.npy')
    assert latents.shape == (10, 8, 32, 32) and latents.dtype == np.float16
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 2, 2, 2, 2, 3, 3, 3]
    assert np.isfinite(latents).all() and (latents[:, 4:] > 0).all()

    index = np.load(out / 'images_index.npy')
    blob = (out / 'images.bin').read_bytes()
    assert index.dtype == np.int64 and index.shape == (11,) and index[0] == 0 and index[-1] == len(blob)
    crops = [np.asarray(Image.open(io.BytesIO(blob[index[i]:index[i + 1]]))) for i in range(10)]
    assert all(c.shape == (256, 256, 3) and c.dtype == np.uint8 for c in crops)

    report = (out / 'skipped.txt').read_text().splitlines()
    assert len(report) == 2 and 'd_corrupt.JPEG' in report[0] and report[1].startswith(str(root / 'n02_empty'))

    # channels = posterior mean, std of the VAE on the ADM crop of the first file
    sys.path.insert(0, REPO)
    from prepare_latents import center_crop_arr
    from diffusers.models import AutoencoderKL
    crop = center_crop_arr(Image.open(root / 'n01_cat/a.JPEG').convert('RGB'))
    assert np.abs(crop.astype(int) - crops[0]).mean() < 3  # the stored JPEG is that crop
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(vae_dir).eval().encode(x).latent_dist
    ref = torch.cat([posterior.mean, posterior.std], 1)[0].half().numpy()
    np.testing.assert_allclose(latents[0].astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-3)


def test_prepare_center_crop():
    sys.path.insert(0, REPO)
    from prepare_latents import center_crop_arr, to_rgb
    for size in [(1030, 600), (100, 80), (256, 256), (300, 900)]:
        assert center_crop_arr(Image.new('RGB', size)).shape == (256, 256, 3)
    rgba = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(Image.new('CMYK', (4, 4))).mode == 'RGB' and to_rgb(Image.new('L', (4, 4))).mode == 'RGB'


def test_prepare_resume_with_torchrun(tree, base, tmp_path):
    """Killed after 2 of 4 chunks, continued by 2 torchrun ranks (gloo): only the 2 missing chunks are encoded,
    one per rank, and the result is byte-identical to the uninterrupted single-process run."""
    root, vae = tree
    out = tmp_path / 'data'
    args = ['--imagenet', root, '--out', out, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 0]
    r = prepare(*args, '--stop-after-chunks', 2)  # dies like a killed process
    assert r.returncode != 0 and not (out / 'meta.json').exists()
    assert sorted(p.name for p in (out / 'parts').glob('*.npz')) == ['000000.npz', '000001.npz']
    (out / 'parts/000002.npz.tmp').write_bytes(b'half a chunk')  # killed while writing chunk 2
    r = prepare(*args, torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'skipping 2 finished chunks, 2 left to encode' in r.stdout and 'encoding (2 ranks' in r.stderr
    assert same_output(base[0], out) and not (out / 'parts').exists()


def test_prepare_refusals(tree, base, tmp_path):
    root, vae = tree
    out = base[0]
    stamp = (out / 'meta.json').stat().st_mtime_ns
    r = prepare('--imagenet', root, '--out', out, '--vae', vae)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f'error: {out} already holds a complete dataset (meta.json); pass --overwrite to replace it']
    assert (out / 'meta.json').stat().st_mtime_ns == stamp

    # the same checks in-process (a subprocess each would cost seconds)
    sys.path.insert(0, REPO)
    from prepare_latents import plan_run
    opts = lambda imagenet, out, vae=vae, **kw: argparse.Namespace(**{**dict(
        imagenet=str(imagenet), out=str(out), vae=str(vae), precision='fp32', chunk=3, no_images=False,
        overwrite=False), **kw})
    with pytest.raises(SystemExit, match='error: --imagenet .* is not a directory'):
        plan_run(opts(tmp_path / 'nope', tmp_path / 'x'))
    (tmp_path / 'flat').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'flat/a.JPEG')
    with pytest.raises(SystemExit, match='no class sub-folders'):
        plan_run(opts(tmp_path / 'flat', tmp_path / 'x'))

    # an unfinished run refuses a different tree or VAE once a chunk is finished; --overwrite starts over
    tree2, vae2, out2 = tmp_path / 'tree2', tmp_path / 'vae2', tmp_path / 'data'
    shutil.copytree(root, tree2)
    shutil.copytree(vae, vae2)
    plan_run(opts(tree2, out2))
    plan_run(opts(tree2, out2, vae=vae2))  # no chunk finished yet: nothing to lose, the new plan wins
    assert json.loads((out2 / 'parts/files.json').read_text())['vae'] == str(vae2)
    plan_run(opts(tree2, out2))
    (out2 / 'parts/000000.npz').write_bytes(b'')  # a finished chunk
    with pytest.raises(SystemExit, match='different vae'):
        plan_run(opts(tree2, out2, vae=vae2))
    Image.new('RGB', (300, 300)).save(tree2 / 'n04_owl/new.JPEG')
    with pytest.raises(SystemExit, match=r'different files \(11 saved, 12 now\).*--overwrite'):
        plan_run(opts(tree2, out2))
    (tree2 / 'n04_owl/new.JPEG').unlink()
    r = prepare('--imagenet', tree2, '--out', out2, '--vae', vae, '--chunk', 3, '--batch', 2, '--workers', 2,
                '--overwrite', '--no-images')
    assert r.returncode == 0, r.stderr
    assert 'finished chunks' not in r.stdout and same_output(out, out2, images=False)  # deterministic, any workers
    assert json.loads((out2 / 'meta.json').read_text())['images'] is False and not (out2 / 'images.bin').exists()
