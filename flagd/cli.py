"""The `flagd` command line: one thin function per command.

Each command builds settings, calls one function, and turns the errors it expects into one
line on stderr and an exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from flagd.lab.cli import lab_app

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Classify encrypted traffic flows with FLAG, live or from captures.")
dataset_app = typer.Typer(no_args_is_help=True, help="Build labelled flow datasets from captures.")
vocab_app = typer.Typer(no_args_is_help=True, help="Build N-phrase dictionaries.")
app.add_typer(dataset_app, name="dataset")
app.add_typer(vocab_app, name="vocab")
app.add_typer(lab_app, name="lab", help="Generate labelled captures of real applications in network namespaces.")


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1  # bad input: unreadable file, unknown interface, missing privilege, ...
    USAGE = 2
    INTERRUPTED = 130


def fail(msg: str, code: Exit = Exit.ERROR) -> typer.Exit:
    typer.echo(f"flagd: {msg}", err=True)
    return typer.Exit(code)


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    if value == "realtime":
        return 1.0
    try:
        f = float(value)
    except ValueError:
        raise typer.BadParameter("use max, realtime or a factor such as 2.5") from None
    if f <= 0:
        raise typer.BadParameter("the factor must be positive")
    return f


def _load_model(model: str | None, no_model: bool, top_k: int):
    """The bundle to classify with, or None for flow events only."""
    if no_model:
        return None  # without a model, torch is never imported
    from flagd.infer import Bundle, BundleError, default_model, resolve_model
    try:
        return Bundle.load(resolve_model(model) if model else default_model(), top_k=top_k)
    except BundleError as e:
        raise fail(str(e)) from None


@app.command(name="models")
def models_cmd() -> None:
    """List the model bundles shipped with flagd: name, classes, held-out test figures."""
    import json

    from flagd.infer import MODELS_DIR, BundleError, default_model, installed_models

    shipped = installed_models()
    if not shipped:
        raise fail(f"no model bundle installed in {MODELS_DIR}")
    try:
        default = default_model().resolve()
    except BundleError:
        default = None  # a bad FLAGD_MODEL is reported where a model is loaded, not here
    for name, path in shipped.items():
        typer.echo(f"{name}{'  (default)' if path.resolve() == default else ''}")
        try:
            manifest = json.loads((path / "bundle.json").read_text())
            labels, pre = manifest["labels"], manifest["preprocessing"]
            typer.echo(f"  {len(labels)} classes: {' '.join(labels)}")
            typer.echo(f"  flows: first {manifest['ready_packets']} relevant packets, "
                       f"{pre['packet_bytes']} bytes each, at most {manifest['max_len']} phrase ids")
        except (OSError, ValueError, KeyError, TypeError) as e:
            typer.echo(f"  bundle.json unreadable ({type(e).__name__}: {e})")
        try:
            metrics = json.loads((path / "metrics.json").read_text())
            test = metrics["test"]
            typer.echo(f"  test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, "
                       f"{test['n_flows']} flows ({metrics.get('note', 'held-out test split')})")
        except (OSError, ValueError, KeyError, TypeError):
            typer.echo("  test: no figures (metrics.json missing or without a test split)")
        card = path / "README.md"
        typer.echo(f"  card: {card if card.is_file() else 'none'}")


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model bundle: a shipped bundle's name (see `flagd models`) or a bundle directory [default: iscx-vpn2016].")]
NoModelOpt = Annotated[bool, typer.Option("--no-model", help="Only meter flows; classify nothing.")]
LogOpt = Annotated[str | None, typer.Option("--log", "-l", help="JSONL event log ('-' = stdout).")]
DashOpt = Annotated[bool | None, typer.Option("--dashboard/--no-dashboard", help="Terminal dashboard [default: when stdout is a terminal and --log is a file].")]
RejectOpt = Annotated[bool | None, typer.Option("--reject/--no-reject", help="Open-set rejection: label flows unlike the model's training data unknown [default: on, or reject in the config].")]
MinConfOpt = Annotated[float | None, typer.Option("--min-confidence", help="Label a flow unknown below this calibrated top-1 probability too (besides the bundle's open-set rejection) [default: 0, or min_confidence in the config].")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (see README); options given here override it.")]


def _serve(cfg, model: str | None, no_model: bool, open_source) -> None:
    """Load the model, open the source with the flow settings the model needs, run to the end.

    `open_source(settings, notice)` builds the source; `notice` is the daemon's operator-notice
    callback (stderr and the dashboard), given at construction."""
    from flagd.capture import CaptureError
    from flagd.daemon import Notices, serve, steady_malloc
    from flagd.flows import FlowSettings
    from flagd.packets import DecodeError
    from flagd.privileges import PrivilegeError
    from flagd.source import FileSource

    steady_malloc()
    if not 0 <= cfg.min_confidence <= 1:
        raise fail(f"min_confidence {cfg.min_confidence} is not in [0, 1]", Exit.USAGE)
    bundle = _load_model(model or cfg.model, no_model, cfg.top_k)  # fail before capturing
    if bundle is not None:  # what flagd.toml / --min-confidence ask of the bundle's decisions
        bundle.reject, bundle.min_confidence = cfg.reject, cfg.min_confidence
    notices = Notices()
    try:
        settings = cfg.pipeline_settings(bundle.settings if bundle else FlowSettings())
        source = open_source(settings, notices)
        pipe = serve(source, bundle, cfg, settings, notices, user=cfg.user)
    except (OSError, ValueError, CaptureError, DecodeError, PrivilegeError) as e:
        raise fail(str(e)) from None
    if pipe.counters.stage_error:  # a stage raised: the run stopped early, with a final stats event
        raise fail(f"stopped: {pipe.counters.stage_error}")
    if pipe.counters.capture_error:
        raise fail(f"{source.name}: {pipe.counters.capture_error}")
    if isinstance(source, FileSource) and source.report.failed:
        # Each was named with its reason as it was skipped; the rest were replayed.
        n, total = len(source.report.failed), len(source.paths)
        raise fail(f"{n} of {total} capture{'s' if total > 1 else ''} could not be read")


@app.command()
def replay(
    captures: Annotated[list[Path], typer.Argument(help="pcap/pcapng files, or directories of them (.pcap, .pcapng, .cap, in name order), replayed one after the other.")],
    log: LogOpt = None,
    model: ModelOpt = None,
    no_model: NoModelOpt = False,
    speed: Annotated[str, typer.Option(help="max, realtime, or a factor of real time.")] = "max",
    dashboard: DashOpt = None,
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Most flows per inference batch.")] = None,
    batch_delay_ms: Annotated[float | None, typer.Option(help="Longest wait for a batch to fill.")] = None,
    stats_interval: Annotated[float | None, typer.Option(help="Seconds between stats events (0: only the final one).")] = None,
    anonymize: Annotated[bool | None, typer.Option("--anonymize/--no-anonymize", help="Keyed-hash pseudonyms instead of addresses in events (key: anonymize_key in the config file).")] = None,
    min_confidence: MinConfOpt = None,
    reject: RejectOpt = None,
) -> None:
    """Run the classification pipeline on capture files and write their events (one log, one
    final stats event). An unreadable file is named with its reason and skipped; the exit
    status is then 1."""
    from flagd.daemon import RunConfig
    from flagd.source import FileSource, expand_captures

    pace = _speed(speed)
    try:
        cfg = RunConfig.load(config, log=log, dashboard=dashboard, batch_size=batch_size,
                             batch_delay_ms=batch_delay_ms, stats_interval=stats_interval,
                             anonymize=anonymize, min_confidence=min_confidence, reject=reject)
    except ValueError as e:
        raise fail(str(e)) from None
    if not expand_captures(captures):
        raise fail(f"no capture files (.pcap, .pcapng, .cap) in {', '.join(map(str, captures))}")
    _serve(cfg, model, no_model, lambda settings, notice: FileSource(captures, pace, notice))


@app.command()
def run(
    iface: Annotated[str | None, typer.Option("--iface", "-i", help="Interface to capture on.")] = None,
    log: LogOpt = None,
    model: ModelOpt = None,
    no_model: NoModelOpt = False,
    bpf: Annotated[str | None, typer.Option(help="Capture filter (pcap syntax).")] = None,
    promisc: Annotated[bool | None, typer.Option("--promisc/--no-promisc", help="Promiscuous mode.")] = None,
    user: Annotated[str | None, typer.Option(help="Drop to this user once the socket is open.")] = None,
    dashboard: DashOpt = None,
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Most flows per inference batch.")] = None,
    batch_delay_ms: Annotated[float | None, typer.Option(help="Longest wait for a batch to fill.")] = None,
    stats_interval: Annotated[float | None, typer.Option(help="Seconds between stats events.")] = None,
    workers: Annotated[int | None, typer.Option(help="Capture processes in one AF_PACKET fanout group (flows hashed symmetrically).")] = None,
    anonymize: Annotated[bool | None, typer.Option("--anonymize/--no-anonymize", help="Keyed-hash pseudonyms instead of addresses in events (key: anonymize_key in the config file).")] = None,
    min_confidence: MinConfOpt = None,
    reject: RejectOpt = None,
) -> None:
    """Capture live traffic on an interface and classify every flow."""
    from flagd.helper import CAP_SETUID, Helper, has_cap_net_raw, has_capability
    from flagd.privileges import PrivilegeError, drop_all_capabilities, forbid_new_privileges

    # First, before any thread exists (numpy's, torch's): no_new_privs reaches only threads
    # started after it, and the capture helper is forked, which is only safe without threads.
    forbid_new_privileges()
    helper = Helper.start() if has_cap_net_raw() else None
    try:
        if helper is not None and not has_capability(CAP_SETUID):
            # Not a full root: CAP_NET_RAW came as a capability of its own (systemd's ambient
            # set), and no --user switch is possible anyway. The helper keeps it; the daemon
            # gives every capability up now, in its only thread, so that no thread it starts
            # later (torch's included) ever holds one. Capabilities are per thread: dropping
            # them after torch has started its threads would leave them there.
            try:
                drop_all_capabilities()
            except PrivilegeError as e:
                raise fail(str(e)) from None
        _run(iface, log, model, no_model, bpf, promisc, user, dashboard, config, batch_size,
             batch_delay_ms, stats_interval, workers, anonymize, helper, min_confidence, reject)
    finally:
        if helper is not None:
            helper.close()


def _run(iface, log, model, no_model, bpf, promisc, user, dashboard, config, batch_size,
         batch_delay_ms, stats_interval, workers, anonymize, helper, min_confidence=None,
         reject=None) -> None:
    from flagd.capture import open_capture
    from flagd.daemon import RunConfig
    from flagd.source import FanoutSource, LiveSource

    try:
        cfg = RunConfig.load(config, iface=iface, log=log, bpf=bpf, promisc=promisc, user=user,
                             dashboard=dashboard, batch_size=batch_size, workers=workers,
                             batch_delay_ms=batch_delay_ms, stats_interval=stats_interval,
                             anonymize=anonymize, min_confidence=min_confidence, reject=reject)
    except ValueError as e:
        raise fail(str(e)) from None
    if not cfg.iface:
        raise fail("no interface: give --iface NAME (or iface in the config file)", Exit.USAGE)
    opener = helper.packet_socket if helper is not None else None

    def open_source(settings, notice):
        if cfg.workers > 1:
            if not no_model:  # inference gets the cores the capture processes leave
                import torch

                torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
            return FanoutSource(cfg.iface, cfg.workers, settings.flows, bpf=cfg.bpf,
                                promisc=cfg.promisc, user=cfg.user, notice=notice, helper=helper)
        return LiveSource(open_capture(cfg.iface, bpf=cfg.bpf, promisc=cfg.promisc, opener=opener),
                          notice)

    _serve(cfg, model, no_model, open_source)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(Exit.INTERRUPTED)


# --- training ---------------------------------------------------------------------------------

LabelsOpt = Annotated[str, typer.Option("--labels", help="dir: class = parent directory name; iscx: original ISCX VPN-nonVPN file names.")]
# outlier exposure, the same in `flagd finetune` and `flagd train`
OutlierWeightOpt = Annotated[float, typer.Option(min=0.0, help="Weight of the outlier-exposure loss.")]
SyntheticOpt = Annotated[bool, typer.Option("--synthetic-outliers", help="Outlier exposure also to flows made from the train flows (payload shuffled, ports redrawn, packets spliced across classes; flagd.outliers), saved as synthetic-outliers.npz for `flagd calibrate --exposure`.")]


def _flow_settings(packets: int, packet_bytes: int, honest: bool, rules: str | None):
    from flagd.flows import FlowSettings
    from flagd.preprocess import DEFAULT_RULES, Preprocessing

    rule_list = tuple(r for r in rules.split(",") if r) if rules is not None else DEFAULT_RULES
    pre = (Preprocessing.honest if honest else Preprocessing)(packet_bytes=packet_bytes, rules=rule_list)
    return FlowSettings(ready_packets=packets, preprocessing=pre)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True)


@dataset_app.command("build")
def dataset_build(
    src: Annotated[list[Path], typer.Argument(help="Capture files or directory trees.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Dataset file (.npz).")],
    labels: LabelsOpt = "dir",
    packets: Annotated[int, typer.Option(help="K: relevant packets kept per flow.")] = 5,
    packet_bytes: Annotated[int, typer.Option(help="B: bytes kept per packet.")] = 128,
    honest: Annotated[bool, typer.Option(help="Mask ports, sequence numbers, IP ID, TTL, checksums, TCP timestamps too.")] = False,
    rules: Annotated[str | None, typer.Option(help="Comma-separated relevance rules ('' = keep every packet).")] = None,
) -> None:
    """Turn captures into labelled, preprocessed flows."""
    from flagd.dataset import build, find_captures
    from flagd.labels import labeller

    for p in src:
        if not p.exists():
            raise fail(f"{p}: no such file or directory")
    try:
        settings = _flow_settings(packets, packet_bytes, honest, rules)
        label = labeller(labels)
    except ValueError as e:
        raise fail(str(e), Exit.USAGE) from None
    n = sum(1 for _ in find_captures(src))
    with _progress() as bar:
        task = bar.add_task("reading captures", total=n)
        ds = build(src, settings, label, progress=lambda cap: bar.advance(task))
    path = ds.save(out)
    st = ds.stats
    typer.echo(f"{path}: {len(ds)} flows in {len(ds.classes)} classes from {st.get('captures', 0)} "
               f"captures; {st.get('duplicates', 0)} duplicates removed; dropped "
               f"{sum(st['dropped'].values())} flows without relevant packets {st['dropped']}")
    for cls, count in st["per_class"].items():
        typer.echo(f"  {cls:24} {count}")
    for err in st["errors"].values():
        typer.echo(f"flagd: skipped {err}", err=True)
    if st.get("captures_unlabelled"):
        typer.echo(f"flagd: {st['captures_unlabelled']} captures had no label and were skipped", err=True)


@dataset_app.command("split")
def dataset_split(
    mode_dir: Annotated[Path, typer.Argument(help="A `flagd train` mode directory (OUT/product, OUT/loio, ...): its dataset.npz and split.json.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory for train.npz, val.npz, test.npz (and unlabelled.npz).")],
) -> None:
    """Cut a training run's dataset by its split, for `flagd finetune`, `calibrate` and
    `evaluate` on exactly the flows the run trained, validated and tested on."""
    import json

    import numpy as np

    from flagd.dataset import Dataset, DatasetError

    split_path = mode_dir / "split.json"
    try:
        ds = Dataset.load(mode_dir / "dataset.npz")
        split = json.loads(split_path.read_text())
    except DatasetError as e:
        raise fail(str(e)) from None
    except (OSError, ValueError) as e:
        raise fail(f"{split_path}: {getattr(e, 'strerror', None) or e}") from None
    for part, rows in split.items():
        if not rows and part == "unlabelled":
            continue
        idx = np.asarray(rows, np.int64)
        if idx.size and not (0 <= idx.min() and idx.max() < len(ds)):
            raise fail(f"{split_path}: {part} rows beyond the {len(ds)} flows of its dataset")
        path = ds.subset(idx).save(out / f"{part}.npz")
        typer.echo(f"{path}: {idx.size} flows")


@vocab_app.command("build")
def vocab_build(
    data: Annotated[list[Path], typer.Argument(help="Datasets (.npz) or capture trees.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Dictionary file (.json).")],
    size: Annotated[int, typer.Option("--size", help="m: phrases kept, the 256 single bytes included.")] = 4096,
) -> None:
    """Fit an N-phrase dictionary on the flows' bytes."""
    from flagd.phrases import PhraseDict

    flows = [f for ds in _datasets(data) for f in ds.flows]
    total = sum(len(p) for f in flows for p in f)
    with _progress() as bar:
        task = bar.add_task("counting n-grams (bytes)", total=total)
        phrases = PhraseDict.fit((p for f in flows for p in f), size,
                                 progress=lambda n: bar.update(task, completed=n))
    phrases.save(out)
    cov = phrases.coverage(p for f in flows for p in f)
    typer.echo(f"{out}: {phrases.size} phrases (sha256 {phrases.sha256[:16]}) from {total:,} bytes")
    typer.echo("bytes covered: " + ", ".join(f"{k} {v:.1%}" if isinstance(v, float) and k.startswith("share") else f"{k} {v}"
                                             for k, v in cov.items()))


def _phrases(vocab: Path):
    from flagd.phrases import PhraseDict, PhraseDictError

    try:
        return PhraseDict.load(vocab)
    except PhraseDictError as e:
        raise fail(str(e)) from None


def _model_input(phrases, sets, max_len: int, packet_aware: bool, unwrap_tunnels: bool = False,
                 tunnel_packets: int = 0):
    """Phrase ids (and packet context) of every flow of the datasets, in order."""
    from flagd import inputs

    flows = [f for ds in sets for f in ds.flows]
    sides = [s for ds in sets for s in ds.sides]
    return inputs.encode(phrases, flows, sides, max_len, packet_aware, unwrap_tunnels,
                         tunnel_packets)


@app.command()
def pretrain(
    data: Annotated[list[Path], typer.Argument(help="Datasets (.npz) or capture trees (labels unused).")],
    vocab: Annotated[Path, typer.Option(help="Phrase dictionary from `flagd vocab build`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run directory.")],
    preset: Annotated[str, typer.Option(help="tiny, small or paper.")] = "small",
    max_len: Annotated[int, typer.Option(help="Longest phrase sequence.")] = 128,
    epochs: Annotated[int, typer.Option(help="Passes over the data (each re-masked).")] = 20,
    batch_size: int = 64,
    lr: float = 5e-4,
    val_fraction: Annotated[float, typer.Option(help="Share of flows held out for validation.")] = 0.1,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    packet_aware: Annotated[bool, typer.Option(help="Packet-aware input (packet index, direction, size, gap); --flat: the paper's.")] = True,
) -> None:
    """Pre-train the encoder by masked-phrase prediction with dynamic masking."""
    import numpy as np

    from flagd.model import ModelConfig
    from flagd.train import pretrain as run_pretrain

    phrases, sets = _phrases(vocab), _datasets(data)
    ids, ctx = _model_input(phrases, sets, max_len, packet_aware)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, int(len(ids) * val_fraction))
    tr, va = order[n_val:], order[:n_val]
    try:
        cfg = ModelConfig.preset(preset, vocab_size=phrases.vocab_size, max_len=max_len,
                                 packet_aware=packet_aware)
    except ValueError as e:
        raise fail(str(e), Exit.USAGE) from None
    m = run_pretrain(ids[tr], ids[va], cfg, out, train_ctx=None if ctx is None else ctx[tr],
                     val_ctx=None if ctx is None else ctx[va], epochs=epochs,
                     batch_size=batch_size, lr=lr, vocab_sha256=phrases.sha256, seed=seed,
                     resume=resume)
    typer.echo(f"{out}/best.pt: validation loss {m.get('best_val_loss', m.get('val_loss'))}")


@app.command()
def finetune(
    train: Annotated[Path, typer.Argument(help="Labelled training dataset (.npz).")],
    val: Annotated[Path, typer.Argument(help="Labelled validation dataset (.npz).")],
    vocab: Annotated[Path, typer.Option(help="Phrase dictionary (the pre-training one).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run directory; the best model is exported to OUT/model/.")],
    init: Annotated[Path | None, typer.Option(help="Pre-trained checkpoint (best.pt).")] = None,
    no_pretrain: Annotated[bool, typer.Option("--no-pretrain", help="Start from random weights (the baseline).")] = False,
    preset: Annotated[str, typer.Option(help="Model preset with --no-pretrain.")] = "small",
    max_len: int = 128,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-4,
    label_fraction: Annotated[float, typer.Option(help="Use this share of the training labels (per class).")] = 1.0,
    balance: Annotated[str, typer.Option(help="Class imbalance: weights (loss weighted per class, as flagd train does), sampler (class-balanced draws) or none.")] = "weights",
    seed: int = 0,
    packet_aware: Annotated[bool, typer.Option(help="With --no-pretrain: packet-aware input; --flat: the paper's.")] = True,
    outliers: Annotated[list[Path] | None, typer.Option(help="Foreign flows (datasets .npz built like TRAIN, or capture trees; labels unused) for outlier exposure.")] = None,
    outlier_weight: OutlierWeightOpt = 0.5,
    synthetic_outliers: SyntheticOpt = False,
    layers: Annotated[int, typer.Option(min=0, help="With --init: fine-tune only its first N layers (a faster model) [default: all].")] = 0,
) -> None:
    """Fine-tune a classifier on [CLS]; keeps the epoch with the best validation macro-F1."""
    import numpy as np
    import torch

    from flagd.dataset import Dataset, DatasetError
    from flagd.experiment import subsample, with_synthetic
    from flagd.flows import FlowSettings
    from flagd.infer import save_bundle
    from flagd.model import ModelConfig
    from flagd.train import BALANCES
    from flagd.train import finetune as run_finetune

    if (init is None) != no_pretrain:
        raise fail("give --init CHECKPOINT, or --no-pretrain for the random-weights baseline", Exit.USAGE)
    if balance not in BALANCES:
        raise fail(f"--balance is {', '.join(BALANCES)}, not {balance!r}", Exit.USAGE)
    phrases = _phrases(vocab)
    try:
        tr, va = Dataset.load(train), Dataset.load(val)
    except DatasetError as e:
        raise fail(str(e)) from None
    if tr.classes != va.classes:
        raise fail(f"{train} and {val} have different classes")
    ckpt = torch.load(init, weights_only=True) if init else None
    tr = tr.subset(subsample(np.arange(len(tr)), tr.labels, label_fraction, seed))
    cfg = None if ckpt else ModelConfig.preset(preset, vocab_size=phrases.vocab_size,
                                               max_len=max_len, packet_aware=packet_aware)
    if layers and not ckpt:
        raise fail("--layers takes the first layers of --init; with --no-pretrain use --preset", Exit.USAGE)
    if layers:
        try:
            cfg = ModelConfig.from_dict(ckpt["config"]).first_layers(layers)
        except ValueError as e:
            raise fail(f"--layers {layers}: {init}: {e}", Exit.USAGE) from None
    max_len = ckpt["config"]["max_len"] if ckpt else max_len
    aware = ckpt["config"].get("packet_aware", False) if ckpt else packet_aware
    saved = ckpt["config"] if ckpt else {}
    view = (saved.get("unwrap_tunnels", False), saved.get("tunnel_packets", 0))  # as pre-trained
    settings = FlowSettings.from_dict(tr.settings)
    foreign = _foreign_flows(outliers or [], settings)
    tr_ids, tr_ctx = _model_input(phrases, [tr], max_len, aware, *view)
    va_ids, va_ctx = _model_input(phrases, [va], max_len, aware, *view)
    o_ids, o_ctx = (_model_input(phrases, foreign, max_len, aware, *view) if foreign
                    else (None, None))
    if synthetic_outliers:
        o_ids, o_ctx = with_synthetic(o_ids, o_ctx, tr, np.arange(len(tr)), phrases, max_len,
                                      aware, seed, out / "synthetic-outliers.npz", *view)
    run_finetune(tr_ids, tr.labels, va_ids, va.labels, train_ctx=tr_ctx, val_ctx=va_ctx,
                 init=ckpt, cfg=cfg, labels=tr.classes, run_dir=out, epochs=epochs,
                 batch_size=batch_size, lr=lr, balance=balance, vocab_sha256=phrases.sha256,
                 seed=seed, outlier_ids=o_ids, outlier_ctx=o_ctx, outlier_weight=outlier_weight)
    best = torch.load(out / "best.pt", weights_only=True)
    bundle = save_bundle(out / "model", best, phrases, settings, max_len, metrics=best["metrics"])
    typer.echo(f"{bundle}: model bundle (use with --model)")


def _foreign_flows(paths: list[Path], settings) -> list:
    """Outlier-exposure flows: datasets built with `settings` (the training set's), or capture
    trees built with them here."""
    from flagd.dataset import DatasetError

    def same(built: dict, what: str) -> None:
        if built != settings.to_dict():
            raise DatasetError(f"{what}: built with other flow settings than the training set; "
                             f"rebuild it with the same --packets and --packet-bytes")

    out = _datasets(paths, settings, same)
    if paths and not sum(map(len, out)):  # training would silently go on without exposure
        raise fail(f"no flows in {', '.join(map(str, paths))} for outlier exposure")
    return out


def _flows_for(bundle, paths: list[Path], labels: str | None) -> list:
    """Datasets for `bundle` (same K, B and preprocessing as the model reads)."""
    return _datasets(paths, bundle.settings, bundle.check_dataset, labels)


def _datasets(paths: list[Path], settings=None, check: Callable[[dict, str], None] | None = None,
              labels: str | None = None) -> list:
    """One dataset per path: a .npz file, its settings passed to `check` (which raises a
    one-line DatasetError or BundleError when they are not `settings`), or a capture tree built
    with `settings` (None: the defaults; labels None: unlabelled)."""
    from flagd.dataset import Dataset, DatasetError, build
    from flagd.infer import BundleError
    from flagd.labels import labeller

    for p in paths:
        if not p.exists():
            raise fail(f"{p}: no such file or directory")
    sets = []
    try:
        for p in paths:
            if p.suffix == ".npz":
                ds = Dataset.load(p)
                if check:
                    check(ds.settings, str(p))
            else:
                ds = build([p], settings, labeller(labels) if labels else None)
            sets.append(ds)
    except (DatasetError, BundleError) as e:
        raise fail(str(e)) from None
    return sets


@app.command(name="evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="Model bundle: a shipped bundle's name (see `flagd models`) or a bundle directory.")],
    data: Annotated[list[Path], typer.Argument(help="Capture trees (class = directory) or datasets (.npz).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    heatmap: Annotated[Path | None, typer.Option(help="Confusion-matrix PNG [default: next to --json].")] = None,
    labels: LabelsOpt = "dir",
    foreign: Annotated[list[Path] | None, typer.Option("--foreign", help="Flows from outside the model's classes (dataset .npz or capture tree; labels unused), repeatable: AUROC and share labelled unknown.")] = None,
) -> None:
    """Score a model on labelled flows: TPR/FPR/FTF (paper), accuracy, macro-F1, confusion
    (rejection off), then open-set figures: coverage, accuracy on accepted flows, ECE before and
    after temperature scaling, and per --foreign source AUROC and rejection rate."""
    import numpy as np
    from rich.console import Console

    from flagd import evaluate
    from flagd.infer import Bundle, BundleError, resolve_model
    from flagd.openset import labels_for, msp_score, softmax

    try:
        bundle = Bundle.load(resolve_model(model))
    except BundleError as e:
        raise fail(str(e)) from None
    sets = _flows_for(bundle, data, labels)
    foreign_sets = [(p, _flows_for(bundle, [p], None)[0]) for p in foreign or []]
    try:
        y = np.concatenate([labels_for(bundle.labels, ds) for ds in sets])
    except ValueError as e:
        raise fail(str(e)) from None
    if not len(y):
        raise fail("no flow with a relevant packet in the data")
    dropped = sum(sum(ds.stats.get("dropped", {}).values()) for ds in sets)
    logits, feats = bundle.outputs_for([f for ds in sets for f in ds.flows],
                                       [s for ds in sets for s in ds.sides])
    report = evaluate.metrics(y, logits.argmax(1), bundle.labels, n_dropped=dropped)

    def decide(lg, ft):  # scores and acceptance; max softmax when no rejection was fitted
        _, scores, accept = bundle.decide(lg, ft)
        return (msp_score(lg) if scores is None else scores), accept

    o = bundle.openset
    probs_after = bundle.decide(logits, feats)[0]
    scores, accept = decide(logits, feats)
    far = {}
    for p, ds in foreign_sets:
        if not len(ds):
            raise fail(f"{p}: no flow with a relevant packet")
        far[p.stem] = (*decide(*bundle.outputs_for(ds.flows, ds.sides)),
                       [ds.sources[i] for i in ds.source])
    report["openset"] = evaluate.openset_report(
        y, softmax(logits), probs_after, scores, accept, far,
        method=o.method if o else None, temperature=o.temperature if o else 1.0,
        threshold=o.threshold if o else None, min_confidence=bundle.min_confidence)
    console = Console()
    console.print(evaluate.render_table(report))
    console.print(evaluate.render_openset(report))
    if json_out:
        evaluate.write_json(report, json_out)
        evaluate.save_heatmap(report, heatmap or json_out.with_suffix(".png"))
    elif heatmap:
        evaluate.save_heatmap(report, heatmap)


@app.command()
def calibrate(
    model: Annotated[Path, typer.Argument(help="Model bundle directory (rewritten: openset.npz and its hash in bundle.json).")],
    val: Annotated[list[Path], typer.Argument(help="The model's validation flows: datasets (.npz) or capture trees (class = directory), never its test flows.")],
    reject_rate: Annotated[float, typer.Option(help="Share of validation flows the threshold labels unknown.")] = 0.05,
    confidence: Annotated[float | None, typer.Option(help="Instead: at most --reject-rate of fresh in-distribution flows unknown with this probability (e.g. 0.9; a conformal bound, which rejects fewer validation flows).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="auto (best AUROC against --exposure; without it mahalanobis), msp, energy, mahalanobis or knn.")] = "auto",
    exposure: Annotated[list[Path] | None, typer.Option(help="Foreign flows to choose the method on (dataset or capture tree; labels unused); never the data a figure is measured on. Repeatable.")] = None,
    labels: LabelsOpt = "dir",
) -> None:
    """Fit a bundle's calibration (temperature) and open-set rejection (score and threshold)."""
    from flagd.infer import Bundle, BundleError
    from flagd.openset import METHODS, fit_rejection

    if method != "auto" and method not in METHODS:
        raise fail(f"unknown method {method!r}: auto, {', '.join(METHODS)}", Exit.USAGE)
    if not 0 <= reject_rate < 1:
        raise fail(f"--reject-rate {reject_rate} is not in [0, 1)", Exit.USAGE)
    if confidence is not None and not 0 < confidence < 1:
        raise fail(f"--confidence {confidence} is not in (0, 1)", Exit.USAGE)
    try:
        bundle = Bundle.load(model, device="cpu")
    except BundleError as e:
        raise fail(str(e)) from None
    sets = _flows_for(bundle, val, labels)
    exp = [ds for p in exposure or [] for ds in _flows_for(bundle, [p], None)]
    val_ds = sets[0] if len(sets) == 1 else _concat(sets)
    try:
        o = fit_rejection(model, val_ds, reject_rate=reject_rate, confidence=confidence,
                          method=None if method == "auto" else method, exposure=exp or None)
    except (ValueError, BundleError) as e:
        raise fail(str(e)) from None
    aurocs = o.info.get("exposure_auroc")
    rule = (f"at most {reject_rate:.0%} of in-distribution flows below it with probability "
            f"{confidence:g}; " if confidence is not None else "")
    typer.echo(f"{model}: {o.method} rejection, threshold {o.threshold:.4f} ({rule}"
               f"{o.info['validation_rejected']:.1%} of {o.info['validation_flows']} validation "
               f"flows below it), temperature {o.temperature:.3f} "
               f"(NLL {o.info['nll_before']:.4f} -> {o.info['nll_after']:.4f})")
    if aurocs:
        typer.echo("AUROC against the exposure flows: "
                   + ", ".join(f"{m} {a:.4f}" for m, a in aurocs.items()))


def _concat(sets: list):
    """One dataset of several (same settings; classes merged by name)."""
    import numpy as np

    from flagd.dataset import Dataset

    classes = sorted({c for ds in sets for c in ds.classes})
    labels = np.concatenate([np.array([classes.index(ds.classes[i]) if i >= 0 else -1
                                       for i in ds.labels], np.int64) for ds in sets])
    sources, source = [], []
    for ds in sets:
        source.append(np.asarray(ds.source) + len(sources))
        sources += ds.sources
    return Dataset([f for ds in sets for f in ds.flows], [s for ds in sets for s in ds.sides],
                   labels, classes, np.concatenate(source), sources,
                   np.concatenate([ds.start for ds in sets]), sets[0].settings, {})


@app.command()
def train(
    tree: Annotated[list[Path], typer.Argument(help="Class-per-directory capture tree(s).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run directory.")],
    preset: str = "small",
    vocab_size: Annotated[int, typer.Option(help="m, the phrase dictionary size.")] = 4096,
    max_len: int = 128,
    pretrain_epochs: int = 20,
    finetune_epochs: int = 20,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch (and pre-training's unless --pretrain-batch-size).")] = 64,
    pretrain_batch_size: Annotated[int | None, typer.Option(help="Pre-training batch [default: --batch-size].")] = None,
    pretrain_lr: float = 5e-4,
    finetune_lr: float = 3e-4,
    variant: Annotated[list[str] | None, typer.Option(help="flag, flag-flat, flag-shallow, no-pretrain, bytes-only and/or rf [default: all].")] = None,
    mode: Annotated[list[str] | None, typer.Option(help="paper, honest, product, loio and/or loio-client (leave one implementation out: lab runs only, masks as honest; a vpn-* class holds out a tunnel kind, with loio-client a client app inside the tunnels) [default: paper and honest].")] = None,
    labels: LabelsOpt = "dir",
    packets: Annotated[int, typer.Option(min=1, help="K: relevant packets per flow the model sees.")] = 5,
    packet_bytes: Annotated[int, typer.Option(help="B: bytes kept per packet, from the IP header.")] = 128,
    packet_aware: Annotated[bool, typer.Option(help="Packet-aware input for flag, no-pretrain and bytes-only; --flat: the paper's flat input.")] = True,
    unlabelled: Annotated[list[Path] | None, typer.Option(help="Extra captures or trees for pre-training only (labels unused).")] = None,
    outliers: Annotated[list[Path] | None, typer.Option(help="Foreign captures or trees (none of the classes) for outlier exposure while fine-tuning.")] = None,
    outlier_weight: OutlierWeightOpt = 0.5,
    synthetic_outliers: SyntheticOpt = False,
    shallow_layers: Annotated[int, typer.Option(min=0, help="flag-shallow: fine-tune the first N pre-trained layers [default: one fewer than the preset].")] = 0,
    equal_steps: Annotated[bool, typer.Option(help="Fine-tune a label fraction f for EPOCHS / f epochs: as many steps as with all labels.")] = False,
    split_by: Annotated[str, typer.Option(help="Product mode's 80/10/10: flow (flows at random) or capture (whole captures, as honest mode; a lab session's flows stay on one side).")] = "flow",
    unwrap_tunnels: Annotated[bool, typer.Option(help="Read WireGuard, OpenVPN and IPsec flows from inside: their data packets at inner size, framing removed (every variant, the forest included).")] = False,
    tunnel_packets: Annotated[int, typer.Option(min=0, help="With --unwrap-tunnels: read a tunnel flow's first N data packets (every variant, the forest included) [default: all it has].")] = 0,
    fraction: Annotated[list[float] | None, typer.Option(min=0.001, max=1.0, help="Labelled fractions to train on [default: 1.0 and 0.1].")] = None,
    draw: Annotated[int, typer.Option(min=0, help="Another draw of the labelled rows and of the fine-tuning and forest seeds (SEED + DRAW), same split and pre-training; rows go to <variant>-<pct>-drawN.")] = 0,
    self_train: Annotated[float | None, typer.Option(min=0.0, max=1.0, metavar="MIN_PROB", help="Self-training for label fractions under 1: each fine-tuned model labels the flows whose labels the fraction lacks; those it gives at least MIN_PROB join the labelled flows for a student fine-tuned from the same start, as many steps (<variant>-<pct>-self-trained).")] = None,
    self_train_rounds: Annotated[int, typer.Option(min=1, help="With --self-train: rounds, each student learning from the previous round's model (<variant>-<pct>-self-trainedN).")] = 1,
    seed: int = 0,
) -> None:
    """The paper's protocol (40% unlabelled, 60% labelled 6:2:2; all and 10% of labels) with
    FLAG (packet-aware and flat), no pre-training, bytes-only and a random forest, an honest
    mode beside it, and the product mode a shipped model is trained in (80/10/10)."""
    from rich.console import Console

    from flagd.evaluate import compare_table
    from flagd.experiment import MODES, VARIANTS, Protocol, run_protocol
    from flagd.model import ModelConfig

    for p in [*tree, *(unlabelled or []), *(outliers or [])]:
        if not p.exists():
            raise fail(f"{p}: no such file or directory")
    for p in tree:
        if not p.is_dir():
            raise fail(f"{p}: not a directory")
    bad = set(variant or ()) - set(VARIANTS) or set(mode or ()) - set(MODES)
    if bad:
        raise fail(f"unknown variant or mode: {', '.join(sorted(bad))}", Exit.USAGE)
    if split_by not in ("flow", "capture"):
        raise fail(f"--split-by is flow or capture, not {split_by!r}", Exit.USAGE)
    proto = Protocol(preset=preset, vocab_size=vocab_size, max_len=max_len,
                     pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs,
                     batch_size=batch_size, pretrain_batch_size=pretrain_batch_size, seed=seed,
                     pretrain_lr=pretrain_lr,
                     ready_packets=packets, packet_bytes=packet_bytes,
                     finetune_lr=finetune_lr, modes=tuple(mode or ("paper", "honest")),
                     variants=tuple(variant or VARIANTS), packet_aware=packet_aware,
                     unlabelled=tuple(map(str, unlabelled or ())),
                     outliers=tuple(map(str, outliers or ())), outlier_weight=outlier_weight,
                     synthetic_outliers=synthetic_outliers, shallow_layers=shallow_layers,
                     equal_steps=equal_steps, split_by=split_by, draw=draw,
                     unwrap_tunnels=unwrap_tunnels, tunnel_packets=tunnel_packets,
                     fractions=tuple(fraction or Protocol.fractions), self_train=self_train,
                     self_train_rounds=self_train_rounds)
    if self_train is not None and min(proto.fractions) >= 1:
        raise fail("--self-train needs a label fraction under 1 (--fraction 0.1): with every "
                   "label there are no flows to label", Exit.USAGE)
    try:  # bad K, B, preset or --shallow-layers: one line now, not a failure hours later
        proto.flow_settings(honest=True)
        proto.shallow(ModelConfig.preset(preset, vocab_size=vocab_size))
    except ValueError as e:
        raise fail(str(e), Exit.USAGE) from None
    try:
        rows = run_protocol(tree, out, proto, label_kind=labels)
    except ValueError as e:  # e.g. too few flows to split
        raise fail(str(e)) from None
    console = Console()
    console.width = max(console.width, 132)  # the table's 10 columns, even when piped
    console.print(compare_table(rows, title=f"Comparison on {', '.join(map(str, tree))}"))
    typer.echo(f"{out}/report.json")
