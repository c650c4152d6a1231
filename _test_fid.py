import json, os, subprocess, sys, warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid

FID_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fid.py')


def _rand_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_fid_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), _rand_spd(rng, 8)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu2 = mu + rng.standard_normal(8)
    want = np.sum((mu - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)


def test_fid_frechet_distance_matches_eigenvalues():
    rng = np.random.default_rng(1)
    for d in (5, 32):
        mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _rand_spd(rng, d), _rand_spd(rng, d)
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(w)) @ v.T                                  # sqrt(s1)
        tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()   # tr sqrt(s1 s2) = tr sqrt(r1 s2 r1)
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_fid_feature_stats():
    x = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    assert np.allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_fid_inception_score():
    C = 7
    assert fid.inception_score(np.tile(np.array([[0.2, 0.5, 0.3]]), (20, 1))) == pytest.approx(1.0)
    onehot = np.eye(C)[np.repeat(np.arange(C), 4)]                 # equal counts per class
    assert fid.inception_score(onehot) == pytest.approx(C)
    assert fid.inception_score(np.concatenate([onehot, onehot]), splits=2) == pytest.approx(C)


def test_fid_precision_recall():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 16))
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 1000) == (0.0, 0.0)
    # real = two far-apart clusters; fake = copies of 30 points of the first: all fake points lie on real points,
    # and the fake balls (radii within cluster A, << 100) cannot reach cluster B, so recall <= 1/2.
    real = np.concatenate([rng.standard_normal((100, 16)), 100 + rng.standard_normal((100, 16))])
    p, r = fid.precision_recall(real, real[:30], batch=64)
    assert p == 1.0 and r <= 0.5


class StandInDetector(nn.Module):
    """Same call convention as inception-2015-12-05.pt (uint8 NCHW at any resolution -> features, or probabilities),
    with small features (32-d) so that sqrtm stays fast on CPU."""
    def __init__(self, dim=32, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 4 * 4, dim, generator=g))
        self.output = nn.Linear(dim, classes)

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        x = F.adaptive_avg_pool2d(img.float() / 255, 4).flatten(1)
        features = x @ self.proj
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


def _detector(tmp_path):
    path = str(tmp_path / 'det.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)              # torch.jit is deprecated, the detector is not
        torch.jit.script(StandInDetector()).save(path)
    return path


def _run(tmp_path, *args):
    env = dict(os.environ, HOME=str(tmp_path))                      # never touch the real cache
    return subprocess.run([sys.executable, FID_PY, *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_fid_detector_outputs_one_pass(tmp_path):
    det = fid.load_detector(_detector(tmp_path))
    imgs = np.random.default_rng(4).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    feats, probs = fid.detector_outputs(det, imgs, batch=4)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    with torch.no_grad():
        want_f, want_p = det(x, return_features=True).numpy(), det(x, no_output_bias=True).numpy()
    assert feats.dtype == probs.dtype == np.float64 and feats.shape == (10, 32) and probs.shape == (10, 10)
    assert np.allclose(feats, want_f, atol=1e-6)
    assert np.allclose(probs, want_p, atol=1e-6)
    assert np.allclose(fid.detector_outputs(det, iter(list(imgs)), batch=3)[0], feats, atol=1e-5)   # any iterable


def test_fid_cli_end_to_end(tmp_path):
    det = _detector(tmp_path)
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    other = (rng.integers(0, 128, (64, 32, 32, 3)) + rng.integers(0, 128, (1, 1, 1, 3))).astype(np.uint8)
    np.savez(tmp_path / 'samples.npz', samples)
    np.savez(tmp_path / 'other.npz', other)
    np.savez(tmp_path / 'ref.npz', samples)                       # reference of images only

    r = _run(tmp_path, 'samples.npz', '--ref', 'ref.npz', '--detector', det, '--json', 'out.json',
             '--save-ref', 'saved.npz')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'out.json').read_text())
    assert {'fid', 'inception_score', 'precision', 'recall', 'num_samples'} <= set(m) and m['num_samples'] == 64
    assert abs(m['fid']) < 1e-6 and m['precision'] == m['recall'] == 1.0 and m['inception_score'] >= 1.0
    saved = np.load(tmp_path / 'saved.npz')
    assert saved['features'].dtype == np.float16 and saved['features'].shape == (64, 32)

    # the saved reference again, against different images; then an ADM-style reference with mu/sigma only
    r = _run(tmp_path, 'other.npz', '--ref', 'saved.npz', '--detector', det, '--json', 'out2.json')
    assert r.returncode == 0, r.stderr
    m2 = json.loads((tmp_path / 'out2.json').read_text())
    assert m2['fid'] > 1 and m2['precision'] is not None
    np.savez(tmp_path / 'musigma.npz', mu=saved['mu'], sigma=saved['sigma'])
    r = _run(tmp_path, 'other.npz', '--ref', 'musigma.npz', '--detector', det, '--json', 'out3.json')
    assert r.returncode == 0, r.stderr
    m3 = json.loads((tmp_path / 'out3.json').read_text())
    assert m3['fid'] == pytest.approx(m2['fid'], rel=1e-9) and m3['precision'] is None and 'skipped' in r.stdout
    assert fid.fid_from_images(other, str(tmp_path / 'musigma.npz'), fid.load_detector(det)) == pytest.approx(m2['fid'])


def test_fid_cli_refuses_overwrite_and_missing_detector(tmp_path, monkeypatch):
    (tmp_path / 'out.json').write_text('{}')
    np.savez(tmp_path / 'samples.npz', np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['fid.py', 'samples.npz', '--ref', 'samples.npz', '--json', 'out.json'])
    with pytest.raises(SystemExit, match='overwrite'):
        fid.main()
    assert (tmp_path / 'out.json').read_text() == '{}'
    r = _run(tmp_path, 'samples.npz', '--ref', 'samples.npz', '--detector', 'missing.pt')
    assert r.returncode != 0 and 'missing.pt' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / '.cache').exists()                       # no download was attempted
