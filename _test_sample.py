"""sample.py tests: CPU, one tiny toy checkpoint for the module (merged into test_cat.py later)."""
import json, os, socket, subprocess, sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def run_sample(*args, ok=True, nproc=0):
    """sample.py in a subprocess (under torch.distributed.run with nproc > 0); asserts the exit status."""
    launcher = []
    if nproc:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        launcher = ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}']
    r = subprocess.run([sys.executable, *launcher, 'sample.py', *map(str, args)], cwd=HERE, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


def load(path):
    with np.load(path) as f:
        return f['arr_0']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp('sample') / 'run'
    subprocess.run([sys.executable, 'cat.py', '--data', 'toy', '--model', 'T', '--toy-n', '400', '--batch-size', '8',
                    '--precision', 'fp32', '--eval-every', '0', '--log-every', '1', '--ckpt-every', '1',
                    '--latest-every', '1', '--workers', '0', '--steps', '1', '--out', str(out)],
                   cwd=HERE, env=ENV, check=True, capture_output=True, timeout=300)
    return str(out / 'latest.pt')


@pytest.fixture(scope='module')
def single(ckpt):
    """10 samples in batches of 4 (the last one partial), one process, default output path."""
    run_sample('--ckpt', ckpt, '--num', 10, '--batch', 4)
    return os.path.join(os.path.dirname(ckpt), 'samples-0000001-ema-psi1-seed0-10.npz')


def test_sample_npz_shape_count_and_grid(single):
    x = load(single)
    assert x.shape == (10, 16, 16, 3) and x.dtype == np.uint8
    assert not np.array_equal(x[0], x[1])
    assert Image.open(single[:-4] + '.png').size == (8 * 64, 2 * 64)      # 8 per row, toy enlarged x4


def test_sample_torchrun_identical(ckpt, single, tmp_path):
    out = tmp_path / 'ddp.npz'
    run_sample('--ckpt', ckpt, '--num-samples', 10, '--batch', 4, '--out', out, nproc=2)
    assert np.array_equal(load(out), load(single))
    assert sorted(os.listdir(tmp_path)) == ['ddp.npz', 'ddp.png']              # parts and .tmp removed


def test_sample_class_order():
    import sample
    args = SimpleNamespace(seed=3, classes=None, class_balanced=True)
    z, c = sample.sample_inputs(range(25), args, 8, 10)
    assert c.tolist() == [i % 10 for i in range(25)]
    z2, c2 = sample.sample_inputs(range(20, 25), SimpleNamespace(seed=3, classes=None, class_balanced=False), 8, 10)
    assert torch.equal(z2, z[20:]) and c2.min() >= 0 and c2.max() < 10       # z_i depends on i only, not on batching
    _, c3 = sample.sample_inputs(range(5), SimpleNamespace(seed=3, classes=[7, 2], class_balanced=False), 8, 10)
    assert c3.tolist() == [7, 2, 7, 2, 7]


def test_sample_class_balanced_matches_classes(ckpt, tmp_path):
    """--class-balanced gives sample i class i % 10: samples 3 and 13 equal those of --classes 3."""
    run_sample('--ckpt', ckpt, '--num', 14, '--batch', 7, '--class-balanced', '--out', tmp_path / 'cb.npz')
    run_sample('--ckpt', ckpt, '--num', 14, '--batch', 7, '--classes', 3, '--out', tmp_path / 'c3.npz')
    cb, c3 = load(tmp_path / 'cb.npz'), load(tmp_path / 'c3.npz')
    assert np.array_equal(cb[[3, 13]], c3[[3, 13]])
    assert not np.array_equal(cb[0], c3[0])                                    # same z, class 0 vs 3


def test_sample_refuses_to_overwrite(ckpt, tmp_path):
    out = tmp_path / 'old.npz'
    out.write_bytes(b'old samples')
    r = run_sample('--ckpt', ckpt, '--num', 2, '--out', out, ok=False)
    assert r.stderr.strip().count('\n') == 0 and 'exists' in r.stderr and '--overwrite' in r.stderr
    assert out.read_bytes() == b'old samples' and not (tmp_path / 'old.png').exists()
    run_sample('--ckpt', ckpt, '--num', 2, '--out', out, '--overwrite')
    assert load(out).shape == (2, 16, 16, 3)


def test_sample_bad_checkpoints(ckpt, tmp_path):
    data = open(ckpt, 'rb').read()
    (tmp_path / 'half.pt').write_bytes(data[:len(data) // 2])
    torch.save({'model': {}}, tmp_path / 'other.pt')
    for name, msg in [('half.pt', 'truncated'), ('other.pt', 'not a CAT checkpoint')]:
        r = run_sample('--ckpt', tmp_path / name, '--num', 2, '--out', tmp_path / 'x.npz', ok=False)
        assert r.stderr.strip().startswith('error:') and r.stderr.strip().count('\n') == 0 and msg in r.stderr
    assert sorted(os.listdir(tmp_path)) == ['half.pt', 'other.pt']                # nothing written


def test_sample_research_views(ckpt, single, tmp_path):
    """--num 0: no .npz; stages grid 8 rows x 4 stages, its h_3 column = the samples; interp 4 x 8; Eq. 1 table."""
    out, js = tmp_path / 'r.npz', tmp_path / 'm.json'
    r = run_sample('--ckpt', ckpt, '--num', 0, '--batch', 4, '--stages', '--interp', '--analyze', '--json', js,
                   '--out', out)
    assert not out.exists()
    stages = np.asarray(Image.open(tmp_path / 'r-stages.png'))
    assert stages.shape == (8 * 64, 4 * 64, 3)
    x = load(single)[:8].repeat(4, 1).repeat(4, 2)                              # same seeds, same batches of 4
    assert np.array_equal(stages[:, 3 * 64:].reshape(8, 64, 64, 3), x)
    interp = np.asarray(Image.open(tmp_path / 'r-interp.png'))
    assert interp.shape == (4 * 64, 8 * 64, 3)
    assert np.abs(interp[:64, :64].astype(int) - x[0]).max() <= 2              # t = 0 is sample 0 (batch of 32)
    assert np.abs(interp[:64, -64:].astype(int) - x[1]).max() <= 2             # t = 1 is sample 1
    for name in ('delta', 'R', 'A', 'k=0', 'mean'):
        assert name in r.stdout
    m = json.load(open(js))
    assert m['n'] == 1000 and all(len(m[k]) == 4 and np.isfinite(m[k]).all() for k in ('delta', 'R', 'A'))


def test_sample_latent_checkpoint_uses_vae(ckpt, tmp_path):
    """A latent checkpoint is decoded by the VAE named in its meta (here a tiny untrained AutoencoderKL)."""
    from diffusers.models import AutoencoderKL
    vae_dir = tmp_path / 'vae'
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                  norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * 2,
                  up_block_types=('UpDecoderBlock2D',) * 2).save_pretrained(vae_dir)
    ck = torch.load(ckpt, weights_only=False)
    ck['config']['data'].update(kind='latent', scale=0.18215)
    ck['config']['meta'] = dict(vae=str(vae_dir))
    torch.save(ck, tmp_path / 'latent.pt')
    run_sample('--ckpt', tmp_path / 'latent.pt', '--num', 3, '--out', tmp_path / 'l.npz')
    assert load(tmp_path / 'l.npz').shape == (3, 32, 32, 3)                     # 16 x 16 latents, VAE upsamples x2
    r = run_sample('--ckpt', tmp_path / 'latent.pt', '--num', 3, '--out', tmp_path / 'm.npz', '--vae',
                   tmp_path / 'nowhere', ok=False)
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot load the VAE")      # diffusers may warn first
