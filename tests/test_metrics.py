"""PSNR / SSIM / NMSE agree with fastMRI's evaluate.py on the same volumes."""

import numpy as np
import pytest
import torch
from fastmri import evaluate as fm
from fastmri.data.transforms import center_crop as fm_center_crop
from scipy.ndimage import gaussian_filter

from spade_deploy.errors import SpadeError
from spade_deploy.mri.metrics import center_crop, evaluate_volumes, nmse, psnr, slice_metrics, ssim


def volume_pair(seed: int, shape=(4, 40, 36), noise=0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.abs(gaussian_filter(rng.standard_normal(shape), (0, 2, 2))).astype(np.float32) * (1 + seed)
    pred = np.abs(gt + noise * gt.max() * rng.standard_normal(shape)).astype(np.float32)
    return gt, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("maxval", [None, 3.0])
def test_volume_metrics_equal_fastmri(seed, maxval):
    gt, pred = volume_pair(seed)
    assert psnr(gt, pred, maxval) == pytest.approx(float(fm.psnr(gt, pred, maxval)), rel=1e-12)
    assert ssim(gt, pred, maxval) == pytest.approx(float(fm.ssim(gt, pred, maxval)[0]), rel=1e-12)
    assert nmse(gt, pred) == pytest.approx(float(fm.nmse(gt, pred)), rel=1e-6)


def test_metrics_accept_tensors_and_single_slices():
    gt, pred = volume_pair(3)
    assert psnr(torch.from_numpy(gt), torch.from_numpy(pred)) == pytest.approx(float(fm.psnr(gt, pred)), rel=1e-12)
    one = ssim(gt[1], pred[1], maxval=gt.max())
    assert one == pytest.approx(float(fm.ssim(gt[1:2], pred[1:2], gt.max())[0]), rel=1e-12)


def test_better_prediction_scores_higher():
    gt, noisy = volume_pair(0, noise=0.2)
    _, clean = volume_pair(0, noise=0.01)
    assert psnr(gt, clean) > psnr(gt, noisy) + 10
    assert ssim(gt, clean) > ssim(gt, noisy)


def test_slice_metrics_use_the_volume_maxval():
    gt, pred = volume_pair(4)
    per = slice_metrics(gt, pred)
    assert len(per["psnr"]) == len(per["ssim"]) == gt.shape[0]
    for s in range(gt.shape[0]):
        assert per["psnr"][s] == pytest.approx(float(fm.psnr(gt[s], pred[s], gt.max())), rel=1e-12)
    assert np.mean(per["ssim"]) == pytest.approx(ssim(gt, pred), rel=1e-12)
    # the volume maxval, not each slice's own maximum
    assert per["psnr"][0] != pytest.approx(float(fm.psnr(gt[0], pred[0])), rel=1e-6)


def test_evaluate_volumes_matches_fastmri_metrics():
    vols = {f"v{i}.h5": volume_pair(i, shape=(3 + i, 32, 30)) for i in range(3)}
    ref = fm.Metrics(fm.METRIC_FUNCS)
    for gt, pred in vols.values():
        ref.push(gt, pred)
    res = evaluate_volumes(vols)
    means = ref.means()
    assert res.psnr == pytest.approx(float(means["PSNR"]), rel=1e-9)
    assert res.ssim == pytest.approx(float(np.squeeze(means["SSIM"])), rel=1e-9)
    assert res.nmse == pytest.approx(float(means["NMSE"]), rel=1e-6)
    assert res.n_slices == 3 + 4 + 5
    assert res.per_volume["v1.h5"].psnr == pytest.approx(float(fm.psnr(*vols["v1.h5"])), rel=1e-12)
    d = res.as_dict()
    assert d["per_volume"]["v2.h5"]["n_slices"] == 5 and d["psnr"] == res.psnr


@pytest.mark.parametrize("shape,crop", [((2, 9, 8), (5, 4)), ((10, 11), (6, 7)), ((3, 640, 368), (320, 320))])
def test_center_crop_matches_fastmri(shape, crop):
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    torch.testing.assert_close(center_crop(x, crop), fm_center_crop(x, crop))
    np.testing.assert_array_equal(center_crop(x.numpy(), crop), fm_center_crop(x, crop).numpy())
    with pytest.raises(SpadeError, match="centre-crop"):
        center_crop(x, (shape[-2] + 1, 2))


def test_evaluate_crops_a_larger_prediction_like_fastmri():
    gt, pred = volume_pair(5, shape=(2, 20, 20))
    big = np.zeros((2, 32, 27), np.float32)
    big[:, 6:26, 3:23] = pred  # (32 - 20) // 2 = 6, (27 - 20) // 2 = 3
    res = evaluate_volumes({"a": (gt, big)})
    assert res.psnr == pytest.approx(float(fm.psnr(gt, pred)), rel=1e-12)


def test_metric_input_errors():
    gt, pred = volume_pair(0)
    with pytest.raises(SpadeError, match="differ in shape"):
        psnr(gt, pred[:2])
    with pytest.raises(SpadeError, match="complex"):
        ssim(gt, pred.astype(np.complex64))
    with pytest.raises(SpadeError, match="no volumes"):
        evaluate_volumes({})


def test_recon_magnitude_and_fastmri_crop_match_fastmri_transforms():
    from fastmri.data.transforms import center_crop as fm_crop

    from spade_deploy.mri.metrics import fastmri_crop, recon_magnitude

    x = torch.randn(2, 96, 48, dtype=torch.complex64)
    out = recon_magnitude(x, (48, 48))
    assert out.dtype == torch.float32 and out.shape == (2, 48, 48)
    torch.testing.assert_close(out, fm_crop(x.abs(), (48, 48)))
    assert recon_magnitude(x, None).shape == (2, 96, 48)
    assert recon_magnitude(x, (200, 30)).shape == (2, 96, 30)  # each side clipped to the image
    target, pred = np.random.rand(3, 44, 32), np.random.rand(3, 44, 32)
    t, p = fastmri_crop(target, pred)
    np.testing.assert_array_equal(t, fm_crop(target, (32, 32)))
    np.testing.assert_array_equal(p, fm_crop(pred, (32, 32)))
