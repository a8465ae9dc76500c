"""Open-set rejection: a calibrated confidence, and "unknown" for flows unlike the training data.

A closed-set classifier names one of its classes for every flow, however foreign. This module
fits, on a model's validation flows (never on the flows a figure is measured on):

- a temperature T for the softmax (calibration: the T that minimises the validation NLL);
- a rejection score, higher = more in-distribution, one of
    msp          max softmax probability at T (Hendrycks & Gimpel 2017)
    energy       T * logsumexp(logits / T) (Liu et al. 2020)
    mahalanobis  minus the smallest Mahalanobis distance of the [CLS] vector to a class mean,
                 one covariance shared by all classes (Lee et al. 2018)
    knn          cosine similarity of the unit [CLS] vector to its k-th nearest reference
                 (validation) vector (Sun et al. 2022)
- a threshold: the score below which a flow is "unknown", set so that `reject_rate` of the
  validation flows fall below it, or (given `confidence`) so that at most `reject_rate` of fresh
  in-distribution flows do with that probability, which rejects fewer validation flows.
  Scores of validation flows for the distance methods are out-of-fold (the flow's own fold, or
  its own capture, is left out of the means/references), or the threshold would be set on flows
  scored against themselves and reject too few.

Which score to keep is decided by AUROC between validation flows and an *exposure* set of
foreign flows; that set must not be the one the shipped figures are measured on.

The fitted `OpenSet` is a small .npz (arrays plus a JSON header, loaded with allow_pickle=False)
stored in the bundle and hashed in its manifest like every other file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flagd.evaluate import auroc

if TYPE_CHECKING:
    from flagd.dataset import Dataset

METHODS = ("msp", "energy", "mahalanobis", "knn")
FILE = "openset.npz"
FORMAT = "flagd-openset"
VERSION = 1
UNKNOWN = "unknown"  # the label of a rejected flow
# without exposure data: Mahalanobis had the best validation-vs-exposure AUROC for both
# shipped bundles with either exposure source (model cards, "Open-set rejection")
DEFAULT_METHOD = "mahalanobis"
KNN_K = 5
FOLDS = 5


# ---------------------------------------------------------------------------------------------
# Pure functions over logits (N, K) and [CLS] features (N, C), float arrays.


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    lp = log_softmax(np.asarray(logits, np.float64) / temperature)
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the NLL of softmax(logits / T): a log-spaced grid, then a
    golden-section search around its best point (the NLL is unimodal in log T)."""
    y = np.asarray(y, np.int64)
    grid = np.linspace(math.log(0.05), math.log(20.0), 61)
    losses = [nll(logits, y, math.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if nll(logits, y, math.exp(a)) < nll(logits, y, math.exp(b)):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))


def msp_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(logits, temperature).max(1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(1)
    return temperature * (m + np.log(np.exp(z - m[:, None]).sum(1)))


def unit(feats: np.ndarray) -> np.ndarray:
    f = np.asarray(feats, np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def fit_mahalanobis(feats: np.ndarray, y: np.ndarray, n_classes: int,
                    shrinkage: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, C) and the precision (C, C) of the covariance shared by all classes.

    The covariance is shrunk towards a multiple of the identity (weight `shrinkage`): with a few
    hundred flows in 128 dimensions the plain estimate is near-singular. A class without flows
    gets a mean of NaN and is never the nearest."""
    f = np.asarray(feats, np.float64)
    means = np.full((n_classes, f.shape[1]), np.nan)
    centred = []
    for c in range(n_classes):
        rows = f[y == c]
        if len(rows):
            means[c] = rows.mean(0)
            centred.append(rows - means[c])
    d = np.concatenate(centred)
    cov = d.T @ d / max(len(d), 1)
    target = np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    cov = (1 - shrinkage) * cov + shrinkage * target
    return means, np.linalg.inv(cov)


def mahalanobis_score(feats: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean: higher = closer."""
    f = np.asarray(feats, np.float64)
    ok = ~np.isnan(means).any(1)
    mu = means[ok]
    fp = f @ precision  # (N, C)
    d = ((fp * f).sum(1)[:, None] - 2 * fp @ mu.T
         + ((mu @ precision) * mu).sum(1)[None, :])  # (N, K): (x-mu)^T P (x-mu)
    return -d.min(1)


def knn_score(feats: np.ndarray, reference: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Cosine similarity to the k-th nearest reference vector (both unit-normalised here)."""
    ref = unit(reference)
    sims = unit(feats) @ ref.T  # (N, R)
    k = min(k, ref.shape[0])
    return -np.partition(-sims, k - 1, axis=1)[:, k - 1]


def threshold_for(scores: np.ndarray, reject_rate: float, confidence: float | None = None) -> float:
    """The score below which `reject_rate` of these (in-distribution) scores fall.

    With `confidence`, a bound instead of an estimate: the k-th smallest of the n scores, k as
    large as keeps the share of *fresh* in-distribution flows below it at most `reject_rate` with
    that probability over the draw of these n. (The split-conformal, training-conditional bound:
    for exchangeable scores the share below the k-th is Beta(k, n + 1 - k), and
    P(Beta(k, n + 1 - k) <= rate) = P(Binomial(n, rate) >= k).) -inf when even k = 1 is too many.
    """
    s = np.sort(np.asarray(scores, np.float64))
    if confidence is None:
        return float(np.quantile(s, reject_rate))
    k = _largest_k(len(s), reject_rate, confidence)
    return float(s[k - 1]) if k else -math.inf


def _largest_k(n: int, rate: float, confidence: float) -> int:
    """Largest k in 0..n with P(Binomial(n, rate) >= k) >= confidence."""
    if rate <= 0:
        return 0
    i = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
               + i * math.log(rate) + (n - i) * math.log1p(-rate))
    at_least = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # at_least[k] = P(X >= k)
    ok = np.nonzero(at_least[1:] >= confidence)[0]
    return int(ok[-1]) + 1 if len(ok) else 0


def folds(y: np.ndarray, groups: np.ndarray | None, seed: int = 0, k: int = FOLDS) -> np.ndarray:
    """A fold number per row: whole groups (captures) per fold when every class has at least k
    of them, so a flow's own session never scores it; otherwise rows at random (one capture
    per class, as in ISCX, would otherwise leave whole classes out of a fold's fit)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    if groups is not None and all(len(np.unique(groups[y == c])) >= k for c in np.unique(y)):
        uniq = np.unique(groups)
        g_fold = dict(zip(uniq.tolist(), (rng.permutation(len(uniq)) % k).tolist(), strict=True))
        return np.array([g_fold[g] for g in np.asarray(groups).tolist()], np.int64)
    return rng.permutation(n) % k


def scores_of(method: str, logits: np.ndarray, feats: np.ndarray, temperature: float,
              means: np.ndarray | None = None, precision: np.ndarray | None = None,
              reference: np.ndarray | None = None, k: int = KNN_K) -> np.ndarray:
    if method == "msp":
        return msp_score(logits, temperature)
    if method == "energy":
        return energy_score(logits, temperature)
    if method == "mahalanobis":
        return mahalanobis_score(feats, means, precision)
    if method == "knn":
        return knn_score(feats, reference, k)
    raise ValueError(f"unknown rejection method {method!r}; choose from {', '.join(METHODS)}")


def out_of_fold_scores(method: str, logits: np.ndarray, feats: np.ndarray, y: np.ndarray,
                       n_classes: int, temperature: float, groups: np.ndarray | None = None,
                       seed: int = 0) -> np.ndarray:
    """Each validation flow's score from parameters fitted without its fold (distance methods);
    msp and energy have nothing to fit but T and are scored directly."""
    if method in ("msp", "energy"):
        return scores_of(method, logits, feats, temperature)
    fold = folds(y, groups, seed)
    out = np.empty(len(feats))
    for f in np.unique(fold):
        test, fit = fold == f, fold != f
        if method == "mahalanobis":
            means, prec = fit_mahalanobis(feats[fit], y[fit], n_classes)
            out[test] = mahalanobis_score(feats[test], means, prec)
        else:
            out[test] = knn_score(feats[test], feats[fit])
    return out


# ---------------------------------------------------------------------------------------------
# The fitted object a bundle carries.


@dataclass
class OpenSet:
    method: str  # one of METHODS
    temperature: float  # softmax temperature (calibration)
    threshold: float  # score below which a flow is "unknown" (scores: higher = in-distribution)
    reject_rate: float  # share of in-distribution flows the threshold was set to reject
    means: np.ndarray | None = None  # mahalanobis: (K, C) class means
    precision: np.ndarray | None = None  # mahalanobis: (C, C) shared precision
    reference: np.ndarray | None = None  # knn: (R, C) unit vectors, stored float16
    k: int = KNN_K
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted (flows, AUROCs)

    def score(self, logits: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Rejection score per flow, higher = more in-distribution."""
        return scores_of(self.method, logits, feats, self.temperature, self.means,
                         self.precision, self.reference, self.k)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "method": self.method,
                  "temperature": self.temperature, "threshold": self.threshold,
                  "reject_rate": self.reject_rate, "k": self.k, "info": self.info}
        arrays = {"header": np.array(json.dumps(header))}
        if self.method == "mahalanobis":
            arrays.update(means=self.means.astype(np.float32),
                          precision=self.precision.astype(np.float32))
        if self.method == "knn":
            arrays["reference"] = unit(self.reference).astype(np.float16)
        with open(path, "wb") as f:  # np.savez on a path would append .npz to any other name
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OpenSet:
        """Read a saved OpenSet; ValueError with a one-line reason when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k].astype(np.float64) for k in ("means", "precision", "reference")
                          if k in z}
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not an open-set file ({e})") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
        method = header.get("method")
        need = {"mahalanobis": ("means", "precision"), "knn": ("reference",)}.get(method, ())
        if method not in METHODS or any(k not in arrays for k in need):
            raise ValueError(f"{path}: method {method!r} without its parameters")
        return cls(method, float(header["temperature"]), float(header["threshold"]),
                   float(header["reject_rate"]), arrays.get("means"), arrays.get("precision"),
                   arrays.get("reference"), int(header.get("k", KNN_K)), header.get("info", {}))


def fit(logits: np.ndarray, feats: np.ndarray, y: np.ndarray, n_classes: int, *,
        reject_rate: float = 0.05, confidence: float | None = None, method: str | None = None,
        exposure: tuple[np.ndarray, np.ndarray] | None = None,
        groups: np.ndarray | None = None, seed: int = 0) -> OpenSet:
    """Fit temperature, score and threshold on validation logits/features/labels.

    method None: the method with the best AUROC between the validation flows and `exposure`
    (foreign logits, features); without exposure data, DEFAULT_METHOD. confidence: see
    threshold_for."""
    if not 0 <= reject_rate < 1:
        raise ValueError(f"reject rate {reject_rate} is not in [0, 1)")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    y = np.asarray(y, np.int64)
    logits, feats = np.asarray(logits, np.float64), np.asarray(feats, np.float64)
    t = fit_temperature(logits, y)
    info: dict[str, Any] = {"validation_flows": int(len(y)), "nll_before": nll(logits, y, 1.0),
                            "nll_after": nll(logits, y, t)}
    oof = {m: out_of_fold_scores(m, logits, feats, y, n_classes, t, groups, seed)
           for m in METHODS if method in (None, m)}
    if exposure is not None:
        info["exposure_flows"] = int(len(exposure[0]))
        info["exposure_auroc"] = {}
        for m in oof:
            foreign = _fit_params(m, logits, feats, y, n_classes, t).score(*exposure)
            info["exposure_auroc"][m] = auroc(oof[m], foreign)
    if method is None:
        method = (max(info["exposure_auroc"], key=info["exposure_auroc"].get)
                  if exposure is not None else DEFAULT_METHOD)
    model = _fit_params(method, logits, feats, y, n_classes, t)
    model.threshold = threshold_for(oof[method], reject_rate, confidence)
    model.reject_rate = reject_rate
    if confidence is not None:
        info["confidence"] = confidence
    info["validation_rejected"] = float(np.mean(oof[method] < model.threshold))
    model.info = info
    return model


def _fit_params(method: str, logits: np.ndarray, feats: np.ndarray, y: np.ndarray,
                n_classes: int, temperature: float) -> OpenSet:
    """The method's parameters on every validation flow (threshold left at -inf)."""
    if method not in METHODS:
        raise ValueError(f"unknown rejection method {method!r}; choose from {', '.join(METHODS)}")
    o = OpenSet(method, temperature, -math.inf, 0.0)
    if method == "mahalanobis":
        o.means, o.precision = fit_mahalanobis(feats, y, n_classes)
    elif method == "knn":
        o.reference = unit(feats).astype(np.float16).astype(np.float64)  # as stored
    return o


def fit_rejection(bundle_dir: str | Path, val: Dataset, *, reject_rate: float = 0.05,
                  confidence: float | None = None, method: str | None = None,
                  exposure: list[Dataset] | None = None, seed: int = 0) -> OpenSet:
    """Fit calibration and rejection for the bundle at `bundle_dir` on its validation flows
    `val` (labelled with the bundle's classes, built with its flow settings), write
    `openset.npz` into the bundle and hash it into bundle.json. Returns what was fitted.

    method None: chosen by AUROC against `exposure` (foreign flows, labels unused), else
    DEFAULT_METHOD. Validation flows are grouped by capture for the out-of-fold scores."""
    from flagd.infer import Bundle, add_to_bundle

    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir, device="cpu")  # verifies every hash before we add one
    bundle.check_dataset(val.settings, "validation data")
    y = labels_for(bundle.labels, val)
    logits, feats = bundle.outputs_for(val.flows, val.sides)
    exp = None
    if exposure:
        for ds in exposure:
            bundle.check_dataset(ds.settings, "exposure data")
        outs = [bundle.outputs_for(ds.flows, ds.sides) for ds in exposure]
        exp = (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))
    o = fit(logits, feats, y, len(bundle.labels), reject_rate=reject_rate,
            confidence=confidence, method=method,
            exposure=exp, groups=np.asarray(val.source), seed=seed)
    o.info["validation_captures"] = int(len(np.unique(val.source)))
    o.save(bundle_dir / FILE)
    add_to_bundle(bundle_dir, FILE)
    return o


def labels_for(classes: list[str], ds: Dataset) -> np.ndarray:
    """ds's labels as indices into `classes` (a bundle's); ValueError naming unknown classes."""
    unknown = sorted(set(ds.classes) - set(classes))
    if unknown:
        raise ValueError(f"classes the model does not know: {', '.join(unknown)}")
    if (np.asarray(ds.labels) < 0).any():
        raise ValueError("unlabelled flows in data that needs labels")
    index = np.array([classes.index(c) for c in ds.classes], np.int64)
    return index[np.asarray(ds.labels, np.int64)]
