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

import numpy as np
import torch
from torch import nn

from flagd import inputs
from flagd.events import Prediction
from flagd.flows import Flow, FlowSettings
from flagd.model import FlagEncoder, load_checkpoint, padding_mask, trim_padding
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
# CPU inference: what the daemon calls. Measured in benchmarks/bench_inference.py.


def prepare_for_inference(model: FlagEncoder, *, quantize: bool = True) -> FlagEncoder:
    """A frozen, eval-mode copy for CPU inference.

    quantize: dynamic int8 quantisation of every nn.Linear (weights int8 once, activations
    quantised per batch): the matmuls dominate at these sizes and this CPU has VNNI.
    The token embeddings and the tied masked-phrase decoder stay fp32.
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


@torch.inference_mode()
def predict_logits(model: FlagEncoder, ids: torch.Tensor, batch_size: int = 256,
                   ctx: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits (N, n_classes), float32 on ids' device, for ids (N, T) (and a packet-aware
    model's context (N, T, 4)), with padding-aware batching: rows are sorted by real length so
    each batch holds similar lengths, then each batch is cut to its longest row. Short flows
    (most of them) then cost only their length."""
    n = ids.size(0)
    order = torch.argsort(padding_mask(ids).sum(1), descending=True, stable=True)
    out = torch.empty(n, model.cfg.n_classes, device=ids.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        rows = trim_padding(ids[idx])
        rows_ctx = None if ctx is None else ctx[idx, : rows.size(1)]
        out[idx] = model.classify(rows, ctx=rows_ctx)[0].float()
    return out


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

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, quantize: bool = True,
             top_k: int = 3) -> Bundle:
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
        return cls(manifest.get("name", path.name), model, phrases, labels, max_len, settings,
                   device, top_k)

    def encode(self, flows: list[Flow]) -> Encoded:
        return inputs.encode(self.phrases, [f.packets for f in flows], [f.sides for f in flows],
                             self.max_len, self.model.cfg.packet_aware)

    def logits(self, encoded: Encoded) -> torch.Tensor:
        ids, ctx = encoded
        x = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        c = None if ctx is None else torch.from_numpy(ctx).to(self.device)
        if self.device == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return predict_logits(self.model, x, ctx=c)
        return predict_logits(self.model, x, ctx=c)

    def predict(self, encoded: Encoded, packets_used: list[int]) -> list[Prediction]:
        logits = self.logits(encoded)
        probs = torch.softmax(logits.float(), -1)
        k = min(self.top_k, probs.size(1))
        top_p, top_i = probs.topk(k, dim=-1)
        top_p, top_i = top_p.tolist(), top_i.tolist()
        labels = self.labels
        out = []
        for ps, idx, n in zip(top_p, top_i, packets_used, strict=True):
            top = tuple((labels[i], p) for i, p in zip(idx, ps, strict=True))
            out.append(Prediction(top[0][0], top[0][1], top, n, self.name))
        return out

    def predict_flows(self, flows: list[list[bytes]], sides: list | None = None,
                      batch: int = 512) -> np.ndarray:
        """Class indices for flows given as packet-byte lists and their sides (evaluation)."""
        preds = []
        aware = self.model.cfg.packet_aware
        for i in range(0, len(flows), batch):
            encoded = inputs.encode(self.phrases, flows[i:i + batch],
                                    None if sides is None else sides[i:i + batch],
                                    self.max_len, aware)
            preds.append(self.logits(encoded).argmax(-1).cpu().numpy())
        return np.concatenate(preds) if preds else np.zeros(0, np.int64)
