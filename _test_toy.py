import torch
import torch.nn.functional as F

from cat import ToyClassifier, frechet, make_toy, toy_eval, train_toy_classifier


def test_toy_make_deterministic_balanced():
    for res in (16, 32):
        x, y = make_toy(200, seed=3, res=res)
        assert x.shape == (200, 3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        assert torch.bincount(y, minlength=10).tolist() == [20] * 10
        assert torch.bincount(y[:100], minlength=10).tolist() == [10] * 10  # halves balanced too
        x2, y2 = make_toy(200, seed=3, res=res)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(x, make_toy(200, seed=4, res=res)[0])
    counts = torch.bincount(make_toy(23)[1], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_toy_frechet():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g)
    assert abs(frechet(a, a)) < 1e-6
    b = torch.randn(4000, 8, generator=g) * 2 + 1  # exact: 8 * 1 + 8 * (1 + 4 - 2 * 2) = 16
    assert abs(frechet(a, b) - 16) < 1.0


def test_toy_classifier_and_eval():
    torch.manual_seed(0)
    clf = train_toy_classifier(res=16, seed=0, steps=150)
    assert clf.val_acc >= 0.98 and not clf.training
    assert clf.features(torch.zeros(2, 3, 16, 16)).shape == (2, 128)
    real, _ = make_toy(400, seed=7)
    fx, fy = make_toy(200, seed=8)
    good = toy_eval(clf, fx, fy, real)
    assert good['class_acc'] > 0.98
    noise = toy_eval(clf, torch.rand(200, 3, 16, 16) * 2 - 1, fy, real)
    blur = toy_eval(clf, F.interpolate(F.avg_pool2d(fx, 4), scale_factor=4.0, mode='bilinear'), fy, real)
    assert noise['fd'] > blur['fd'] > 2 * good['fd_floor'] and good['fd'] < 3 * good['fd_floor'] + 1
