"""FID through clean-fid, with the embedded evaluator as feature extractor (pure functions).

clean-fid's pipeline for a folder (``cleanfid.fid.get_folder_features``) is: read each file with
PIL as RGB uint8 (H, W, 3) -> ``custom_image_tranform`` -> ``fn_resize`` (``custom_fn_resize``
replaces it; by default a float PIL-bicubic resize to 299x299) -> a (3, H, W) tensor in 0..255
(``ToTensor`` keeps float32 arrays as they are and maps uint8 through /255*255) -> batches of
(B, 3, H, W) float32 in 0..255 -> ``model(batch)`` under ``no_grad`` -> numpy features.

For the embedded world the model is ``evaluator_feature_extractor(evaluator)`` (0..255 -> [-1, 1]
-> ``evaluator.features``) and the resize is ``keep_resize`` (32x32 stays 32x32, exactly; other
sizes get clean-fid's own float PIL-bicubic resize, to 32x32). ``image_features`` applies the
same steps to in-memory images (quantisation to uint8 first, as saving a PNG does), so a folder
of PNGs and the tensor they were written from give the same features.

``inception_fid`` is the real-data path (clean-fid's standard Inception mode); it needs
clean-fid's Inception weights, which cannot be downloaded here, and says so clearly.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from instaflow.state import atomic_file

EVAL_SIZE = (32, 32)  # the evaluator's input resolution (width, height)

INCEPTION_FILE = "inception-2015-12-05.pt"


class EvaluatorFeatures(nn.Module):
    """What clean-fid calls: (B, 3, 32, 32) float in 0..255 -> (B, D) evaluator features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.float() / 127.5 - 1.0)


def evaluator_feature_extractor(model: nn.Module) -> EvaluatorFeatures:
    """Wrap a ``ShapesEvaluator`` (set to eval mode) as clean-fid's ``custom_feat_extractor``."""
    return EvaluatorFeatures(model)


def keep_resize(img: np.ndarray, size: tuple[int, int] = EVAL_SIZE) -> np.ndarray:
    """clean-fid ``custom_fn_resize``: (H, W, 3) in 0..255 -> float32 (32, 32, 3) in 0..255.

    A 32x32 image is returned unchanged (as float32, so clean-fid's ``ToTensor`` does not rescale
    it); any other size gets clean-fid's "clean" resize (float PIL bicubic), to 32x32 instead of 299.
    """
    img = np.asarray(img)
    if img.shape[:2] == (size[1], size[0]):
        return img.astype(np.float32)
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", size)(img)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8, or float in [0, 1] -> uint8 by ``round(255 x)`` (what saving a PNG does)."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def folder_features(folder: str | Path, model: nn.Module, batch_size: int = 256, num: int | None = None,
                    verbose: bool = False) -> np.ndarray:
    """Evaluator features of every image in ``folder`` (recursive, sorted), through clean-fid; (N, D)."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(
        str(folder), model=evaluator_feature_extractor(model), num_workers=0, num=num, batch_size=batch_size,
        device=torch.device("cpu"), mode="clean", custom_fn_resize=keep_resize, verbose=verbose,
    )


@torch.no_grad()
def image_features(images: torch.Tensor, model: nn.Module, batch_size: int = 256) -> np.ndarray:
    """Evaluator features of in-memory images, exactly as ``folder_features`` would see their PNGs; (N, D).

    ``images``: (N, 3, H, W) uint8, or float in [0, 1] (quantised by ``to_uint8`` first).
    """
    extractor = evaluator_feature_extractor(model)
    device = next(model.parameters()).device
    hwc = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    feats = []
    for start in range(0, len(hwc), batch_size):
        batch = np.stack([keep_resize(im) for im in hwc[start:start + batch_size]])  # float32 0..255
        feats.append(extractor(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)).cpu().numpy())
    if not feats:
        return np.zeros((0, getattr(model, "feature_dim", 0)), dtype=np.float32)
    return np.concatenate(feats)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features, as clean-fid computes them."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (clean-fid's ``frechet_distance``).

    Clipped at 0: for (nearly) identical sets, round-off can make the raw value slightly negative.
    """
    from cleanfid.fid import frechet_distance

    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    return max(float(frechet_distance(mu1, s1, mu2, s2)), 0.0)


class FrechetToReference:
    """Frechet distance of many Gaussians to one fixed reference, fast (for bootstrap resamples).

    tr sqrtm(S S_r) = sum sqrt(eig(A S A)) with A = S_r^(1/2) (symmetric PSD), so each distance is
    one symmetric eigendecomposition instead of clean-fid's general ``sqrtm``; same value to ~1e-9.
    """

    def __init__(self, mu_r: np.ndarray, s_r: np.ndarray) -> None:
        w, v = np.linalg.eigh(s_r)
        self.a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_r^(1/2)
        self.mu_r, self.tr_r = mu_r, float(np.trace(s_r))

    def __call__(self, mu: np.ndarray, s: np.ndarray) -> float:
        ev = np.linalg.eigvalsh(self.a @ s @ self.a)
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return float(((mu - self.mu_r) ** 2).sum() + np.trace(s) + self.tr_r - 2 * tr_covmean)


def fid_bootstrap(f_gen: np.ndarray, f_ref: np.ndarray, n: int = 200, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float, float]:
    """FID with a bootstrap interval: ``(fid, low, high)``.

    What is resampled: the *generated* features, N rows drawn with replacement, ``n`` times; the
    reference statistics stay fixed (the reference set is the fixed target). The interval thus
    measures how much the score moves with the particular generated sample.

    A resample with replacement holds only ~63% distinct images, and FID is biased upward as the
    effective sample shrinks, so the raw bootstrap distribution sits above the point estimate.
    That shift is removed: the interval is the point estimate plus the (``1-level``)/2 and
    (``1+level``)/2 quantiles of the bootstrap values minus their mean (a bias-centred
    percentile interval). FID's own finite-sample bias is not in the interval; it is the same for
    every model scored with the same N, which is why scores are only compared at equal N.
    """
    return fid_to_stats(f_gen, *feature_stats(f_ref), n=n, seed=seed, level=level)


def fid_to_stats(f_gen: np.ndarray, mu_r: np.ndarray, s_r: np.ndarray, n: int = 200, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``fid_bootstrap`` against reference statistics (mu, sigma) instead of features (cached or gathered)."""
    from cleanfid.fid import frechet_distance

    f_gen = np.asarray(f_gen, dtype=np.float64)
    mu_g, s_g = feature_stats(f_gen)
    point = max(float(frechet_distance(mu_g, s_g, mu_r, s_r)), 0.0)
    if n <= 0:  # no interval asked (e.g. the small curves logged during training)
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    to_ref = FrechetToReference(mu_r, s_r)
    boots = np.empty(n)
    for i in range(n):
        boots[i] = to_ref(*feature_stats(f_gen[rng.integers(0, len(f_gen), len(f_gen))]))
    delta = boots - boots.mean()
    lo, hi = np.quantile(delta, [(1 - level) / 2, (1 + level) / 2])
    return point, max(point + float(lo), 0.0), point + float(hi)


# -- the real-data path: clean-fid's standard Inception FID ---------------------------------------

class InceptionWeightsMissing(RuntimeError):
    """clean-fid's Inception weights are not on disk and could not be downloaded."""


def inception_weights_path() -> Path:
    """Where clean-fid 0.1.35 looks for its Inception weights (``cleanfid.features.feature_extractor``)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / INCEPTION_FILE


def inception_fid(fdir_gen: str | Path, fdir_ref: str | Path, mode: str = "clean", download: bool = True,
                  device: str | torch.device = "cpu", batch_size: int = 32, num_workers: int = 0) -> float:
    """Standard clean-fid FID (Inception-v3 pool3 features, 299x299 "clean" resize) between two folders.

    For real LAION-scale runs; the embedded world uses ``folder_features`` + ``fid_from_features``.
    clean-fid wants the TorchScript Inception weights ``inception-2015-12-05.pt`` (from
    ``cleanfid.downloads_helper.inception_url``) at ``inception_weights_path()`` (``/tmp`` on
    Linux). If the file is absent and cannot be downloaded (``download=False``, or no network),
    this raises ``InceptionWeightsMissing`` naming the file, its URL and where to put it.
    """
    from cleanfid.fid import compute_fid

    ensure_inception_weights(download)
    return float(compute_fid(str(fdir_gen), str(fdir_ref), mode=mode, device=torch.device(device),
                             batch_size=batch_size, num_workers=num_workers, verbose=False,
                             use_dataparallel=False))


def ensure_inception_weights(download: bool = True) -> Path:
    """The path of clean-fid's Inception weights, downloading them if allowed; else ``InceptionWeightsMissing``.

    The message names the file, its URL and where clean-fid looks for it, so an offline machine
    (or one whose download failed) knows what to copy where. Safe when every rank of a node calls it
    at once: one process downloads, under an exclusive lock on ``<file>.lock`` beside it, into a
    temporary file renamed into place when complete; the others wait for the lock and find the whole
    file. A failed download leaves no file (and each caller raises ``InceptionWeightsMissing``).
    """
    from cleanfid import downloads_helper

    path = inception_weights_path()
    if path.is_file():  # only ever created by a rename: present means complete
        return path
    url = downloads_helper.inception_url
    hint = (f"clean-fid's Inception weights are missing: it wants {INCEPTION_FILE} at {path} "
            f"(clean-fid's cache location on this platform), downloaded from {url}. On a machine with "
            f"network access run `wget {url} -O {path}` (or copy the file there), then rerun.")
    if not download:
        raise InceptionWeightsMissing(hint)
    try:
        with machine_lock(path):
            if not path.is_file():  # else another process on this machine finished it while this one waited
                download_file(url, path)
    except Exception as exn:  # URLError, HTTPError, timeouts, a cut transfer, ...
        raise InceptionWeightsMissing(f"{hint} (download failed: {exn!r})") from exn
    return path


@contextlib.contextmanager
def machine_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<path>.lock``: one process of this machine at a time (released when it
    exits, even by a kill). Where ``fcntl`` does not exist (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lock), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def download_file(url: str, path: Path, timeout: float = 60.0, chunk: int = 1 << 20) -> Path:
    """Fetch ``url`` into ``path`` through a temporary file beside it, renamed only when the whole body arrived."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_file(path, "wb") as f:
        size, expected = 0, response.headers.get("Content-Length")
        while block := response.read(chunk):
            f.write(block)
            size += len(block)
        if expected is not None and size != int(expected):
            raise OSError(f"the transfer stopped after {size} of {expected} bytes")
    return path
