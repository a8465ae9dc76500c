"""A model bundle on disk, loaded and checked, that turns flows into predictions.

A bundle is a directory: `model.pt` (the fine-tuned checkpoint dict), `phrases.json` (its phrase
dictionary), `bundle.json` (how flows must be built for it: K, B, relevance rules, masks, the
maximum sequence length; and the SHA-256 of every file), plus `metrics.json` and a model card.
Loading verifies every hash before anything is parsed, reads the checkpoint with
`weights_only=True` (no pickled code), and refuses a dictionary the model was not trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flagd import inputs
from flagd.flows import Flow, FlowSettings
from flagd.model import FlagEncoder, load_checkpoint, padding_mask, trim_padding
from flagd.openset import FILE as OPENSET_FILE
from flagd.openset import UNKNOWN, OpenSet
from flagd.phrases import PhraseDict, PhraseDictError

Encoded = tuple[np.ndarray, np.ndarray | None]  # flagd.inputs.encode: ids and packet context

FORMAT = "flagd-model"
VERSION = 1
# The shipped bundles are package data (flagd/models/<name>/), so every kind of install has them;
# the repository's top-level models/ is a symlink to this directory.
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "iscx-vpn2016"


class BundleError(ValueError):
    """A model bundle that cannot be used, with a one-line reason naming the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def installed_models() -> dict[str, Path]:
    """The bundles shipped inside the package, by name (their directory name), sorted."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "bundle.json").is_file()}


def default_model() -> Path:
    """The bundle used when none is given: $FLAGD_MODEL (a name or a path), else iscx-vpn2016."""
    env = os.environ.get("FLAGD_MODEL")
    return resolve_model(env) if env else DEFAULT_MODEL


def resolve_model(name_or_path: str | Path) -> Path:
    """The bundle directory meant by `--model`: a path, or the name of a shipped bundle.

    An existing path wins, so `--model lab12` still means ./lab12 where such a directory exists
    (what it meant before names were accepted); a bare name that is not a path is looked up among
    the shipped bundles. Neither: BundleError naming what is shipped.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    shipped = installed_models()
    if text in shipped:
        return shipped[text]
    if "/" in text or os.sep in text:
        raise BundleError(f"{text}: no such model bundle directory")
    raise BundleError(f"{text}: neither a model bundle directory nor a shipped bundle "
                      f"(shipped: {', '.join(shipped) or 'none'}; see `flagd models`)")


# ---------------------------------------------------------------------------------------------
# Inference: what the daemon calls. Measured in benchmarks/bench_inference.py.


@dataclass(frozen=True, slots=True)
class Prediction:
    """One flow's classification. `label` is the top class, or "unknown" when the bundle's
    open-set rejection (or --min-confidence) refused it; `top_k` always lists the classes.
    `confidence` is the temperature-calibrated top-1 probability; `score` the rejection score
    (higher = more like the validation flows), None when the bundle has no rejection."""

    label: str
    confidence: float
    top_k: tuple[tuple[str, float], ...]
    packets_used: int
    model: str
    score: float | None = None

    def to_dict(self) -> dict:
        d = {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "top_k": [{"label": lab, "confidence": round(p, 4)} for lab, p in self.top_k],
            "packets_used": self.packets_used,
            "model": self.model,
        }
        if self.score is not None:
            d["score"] = round(self.score, 4)
        return d


def prepare_for_inference(model: FlagEncoder, *, quantize: bool = False) -> FlagEncoder:
    """A frozen, eval-mode copy for CPU inference.

    fp32 by default: a flow's label and confidence must not depend on the flows batched with
    it, and dynamic int8 (quantize=True, kept for comparison in the benchmarks) takes one
    activation scale per batch, padding included: logits moved by up to 1.4 and 2% of top-1
    labels changed with the batch (issue 12). At these model sizes the int8 matmuls saved
    little anyway (benchmarks/bench_inference.py). The token embeddings stay fp32 either way.
    """
    model = model.eval().requires_grad_(False)
    if not quantize:
        return model
    import warnings

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which we do not depend on;
        # the dynamic-int8 path it provides still works in the pinned torch
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _head(model: FlagEncoder, ids: torch.Tensor,
          ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one call into the encoder: class logits (B, n_classes) and the [CLS] vector (B, C).

    FlagEncoder.classify's head written out so the [CLS] vector comes with the logits from
    one forward pass (tests/test_infer.py checks the logits equal classify's)."""
    h = model.cls_embedding(ids, ctx)  # (B, C)
    logits = model.classifier(model.cls_drop(torch.tanh(model.pooler(h))))  # (B, n_classes)
    return logits, h


@torch.inference_mode()
def predict_outputs(model: FlagEncoder, ids: torch.Tensor, batch_size: int = 256,
                    ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (N, n_classes) and [CLS] vectors (N, C), float32 on ids' device, for ids
    (N, T) (and a packet-aware model's context (N, T, 4)), with padding-aware batching: rows
    are sorted by real length so each batch holds similar lengths, then each batch is cut to
    its longest row. Short flows (most of them) then cost only their length; padding is masked
    out as attention keys, so a row's outputs do not depend on its batch-mates."""
    n = ids.size(0)
    order = torch.argsort(padding_mask(ids).sum(1), descending=True, stable=True)
    logits = torch.empty(n, model.cfg.n_classes, device=ids.device)
    cls = torch.empty(n, model.cfg.n_embd, device=ids.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        rows = trim_padding(ids[idx])
        rows_ctx = None if ctx is None else ctx[idx, : rows.size(1)]
        lg, h = _head(model, rows, rows_ctx)
        logits[idx], cls[idx] = lg.float(), h.float()
    return logits, cls


def predict_logits(model: FlagEncoder, ids: torch.Tensor, batch_size: int = 256,
                   ctx: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits (N, n_classes) only: `predict_outputs`' first half."""
    return predict_outputs(model, ids, batch_size, ctx)[0]


def save_bundle(out: Path, checkpoint: dict, phrases: PhraseDict, settings: FlowSettings,
                max_len: int, metrics: dict | None = None, card: str | None = None,
                test_flows: list | None = None) -> Path:
    """Write a bundle directory; the manifest hashes every file written. test_flows: the
    [capture, flow start] of every flow of the model's test split (test-flows.json)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out / "model.pt")
    phrases.save(out / "phrases.json")
    files = ["model.pt", "phrases.json"]
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        files.append("metrics.json")
    if card is not None:
        (out / "README.md").write_text(card)
        files.append("README.md")
    if test_flows is not None:
        (out / "test-flows.json").write_text(json.dumps(test_flows) + "\n")
        files.append("test-flows.json")
    manifest = {
        "format": FORMAT, "version": VERSION, "name": out.name,
        "labels": checkpoint["labels"], "max_len": max_len,
        "ready_packets": settings.ready_packets,
        "preprocessing": settings.preprocessing.to_dict(),
        "files": {f: sha256_file(out / f) for f in files},
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def add_to_bundle(path: Path, name: str, **manifest_keys: Any) -> None:
    """Hash `name` (already written inside the bundle at `path`) into its manifest, with any
    other manifest keys given; the rest of the manifest stays as it is. Callers load the bundle
    first, so only a verified bundle gets a new entry."""
    manifest_path = path / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(manifest_keys)
    manifest["files"][name] = sha256_file(path / name)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)  # a reader sees the old manifest or the new, never half


@dataclass
class Bundle:
    name: str
    model: torch.nn.Module
    phrases: PhraseDict
    labels: list[str]
    max_len: int
    settings: FlowSettings  # how flows must be built for this model
    device: str
    top_k: int = 3
    openset: OpenSet | None = None  # calibration and rejection, when the bundle has them
    reject: bool = True  # label flows below the rejection threshold "unknown"
    min_confidence: float = 0.0  # and flows whose calibrated top-1 probability is below this
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, quantize: bool = False,
             top_k: int = 3, reject: bool = True, min_confidence: float = 0.0) -> Bundle:
        path = Path(path)
        manifest_path = path / "bundle.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise BundleError(f"{path}: not a model bundle (no bundle.json)") from None
        except (OSError, ValueError) as e:
            raise BundleError(f"{manifest_path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise BundleError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{manifest_path}: no 'files' table of SHA-256 digests")
        # Every file loaded below must be covered, or dropping its entry would skip its check.
        for name in ("model.pt", "phrases.json"):
            if name not in files:
                raise BundleError(f"{manifest_path}: the manifest has no SHA-256 for {name}")
        for name, digest in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise BundleError(f"{manifest_path}: file name {name!r} is not inside the bundle")
            f = path / name
            try:
                actual = sha256_file(f)
            except OSError as e:
                raise BundleError(f"{f}: unreadable ({e.strerror})") from None
            if actual != digest:
                raise BundleError(f"{f}: SHA-256 does not match the manifest (tampered or truncated)")
        try:
            phrases = PhraseDict.load(path / "phrases.json")
        except PhraseDictError as e:
            raise BundleError(str(e)) from None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, ckpt = load_checkpoint(path / "model.pt")
        except Exception as e:  # weights_only refuses anything but tensors and plain types
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch's are paragraphs
            raise BundleError(f"{path / 'model.pt'}: not a loadable checkpoint ({why})") from None
        try:
            phrases.check_sha256(ckpt.get("vocab_sha256", ""), f"model {path.name}")
        except PhraseDictError as e:
            raise BundleError(f"{path / 'phrases.json'}: {e}") from None
        if device == "cpu":
            model = prepare_for_inference(model, quantize=quantize)
        else:
            model = model.to(device).eval()
        try:
            settings = FlowSettings.from_dict(manifest)
            max_len, labels = int(manifest["max_len"]), list(ckpt["labels"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_path}: bad or missing entry ({type(e).__name__}: {e})") from None
        openset = None
        if OPENSET_FILE in files:  # hashed above like the rest
            try:
                openset = OpenSet.load(path / OPENSET_FILE)
            except ValueError as e:
                raise BundleError(str(e)) from None
            n_feat = openset.reference if openset.reference is not None else openset.means
            if n_feat is not None and n_feat.shape[1] != model.cfg.n_embd:
                raise BundleError(f"{path / OPENSET_FILE}: fitted for another model "
                                  f"({n_feat.shape[1]}-wide [CLS], this one is {model.cfg.n_embd})")
        return cls(manifest.get("name", path.name), model, phrases, labels, max_len, settings,
                   device, top_k, openset, reject, min_confidence, path)

    def check_dataset(self, settings: dict, what: str) -> None:
        """BundleError, one line, when flows built with `settings` (a dataset's) are not what
        this model reads: another K (ready_packets), bytes per packet or preprocessing."""
        want = self.settings
        try:
            k, pre = int(settings["ready_packets"]), dict(settings["preprocessing"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{what}: no flow settings recorded; rebuild it") from None
        b, want_b = pre.get("packet_bytes"), want.preprocessing.packet_bytes
        if k != want.ready_packets or b != want_b:
            raise BundleError(f"{what}: built with K={k}, B={b} bytes per packet; model {self.name} "
                              f"reads K={want.ready_packets}, B={want_b}: rebuild it with "
                              f"--packets {want.ready_packets} --packet-bytes {want_b}")
        if pre != want.preprocessing.to_dict():
            raise BundleError(f"{what}: built with other preprocessing than model {self.name} "
                              f"expects (rules or masks differ); rebuild it")

    def encode(self, flows: list[Flow]) -> Encoded:
        return self.encode_packets([f.packets for f in flows], [f.sides for f in flows])

    def encode_packets(self, packets: list[list[bytes]], sides: list | None) -> Encoded:
        """The model input for flows given as packet-byte lists and their side channels (a
        dataset's `flows` and `sides`): what `encode` builds from live flows."""
        cfg = self.model.cfg
        return inputs.encode(self.phrases, packets, sides, self.max_len, cfg.packet_aware,
                             cfg.unwrap_tunnels, cfg.tunnel_packets)

    def outputs(self, encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """Class logits (N, n_classes) and [CLS] vectors (N, C) as float32 numpy: the single
        inference path; `predict` and evaluation both go through it."""
        ids, ctx = encoded
        x = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        c = None if ctx is None else torch.from_numpy(ctx).to(self.device)
        if self.device == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, cls = predict_outputs(self.model, x, ctx=c)
        else:
            logits, cls = predict_outputs(self.model, x, ctx=c)
        return logits.float().cpu().numpy(), cls.float().cpu().numpy()

    def decide(self, logits: np.ndarray, feats: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Calibrated probabilities (N, n_classes), rejection scores (None without rejection)
        and which flows are accepted, from `outputs`."""
        t = self.openset.temperature if self.openset else 1.0
        z = logits.astype(np.float64) / t
        z -= z.max(1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(1, keepdims=True)
        accept = probs.max(1) >= self.min_confidence
        scores = None
        if self.openset is not None:
            scores = self.openset.score(logits, feats)
            if self.reject:
                accept &= scores >= self.openset.threshold
        return probs, scores, accept

    def predict(self, encoded: Encoded, packets_used: list[int]) -> list[Prediction]:
        """Predictions for encoded flows; packets_used: each flow's packet count, reported as
        the packets the model actually read where its input holds fewer (a tunnel flow read
        from inside, or cut to tunnel_packets)."""
        probs, scores, accept = self.decide(*self.outputs(encoded))
        read = inputs.packets_read(*encoded)
        packets_used = [min(n, max(1, int(r))) for n, r in zip(packets_used, read, strict=True)]
        k = min(self.top_k, probs.shape[1])
        top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, top_i, 1)
        labels = self.labels
        out = []
        for j, (ps, idx, n) in enumerate(zip(top_p.tolist(), top_i.tolist(), packets_used, strict=True)):
            top = tuple((labels[i], p) for i, p in zip(idx, ps, strict=True))
            out.append(Prediction(top[0][0] if accept[j] else UNKNOWN, top[0][1], top, n,
                                  self.name, None if scores is None else float(scores[j])))
        return out

    def outputs_for(self, packets: list[list[bytes]], sides: list | None = None,
                    batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """`outputs` for flows given as packet-byte lists and their sides (evaluation,
        calibration), encoded `batch` flows at a time."""
        parts = [self.outputs(self.encode_packets(packets[i:i + batch],
                                                  None if sides is None else sides[i:i + batch]))
                 for i in range(0, len(packets), batch)]
        if not parts:
            return (np.zeros((0, len(self.labels)), np.float32),
                    np.zeros((0, self.model.cfg.n_embd), np.float32))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def predict_flows(self, flows: list[list[bytes]], sides: list | None = None,
                      batch: int = 512) -> np.ndarray:
        """Closed-set class indices (rejection off) for flows given as packet-byte lists."""
        return self.outputs_for(flows, sides, batch)[0].argmax(-1)
