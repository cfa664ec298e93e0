"""Dreams and top dataset examples in Neuronpedia's export layout, the one its public exports bucket uses
and its admin panel imports (docs.neuronpedia.org, "Exports"):

    OUT/MODEL_ID/SOURCE_ID/features/batch-N.jsonl.gz      one feature per line
    OUT/MODEL_ID/SOURCE_ID/activations/batch-N.jsonl.gz   one activation row (a text) per line

Batch N of activations holds the rows of the features of batch N of features. The fields are Neuronpedia's
own (its `Feature` and `Activation` records); those written, and why:

- both: `modelId`, `layer` (the source id, e.g. "8-res-jb"), `index` (a string, as Neuronpedia writes it),
  `creatorId` (None unless given: the importer assigns one), `createdAt` (the export's time, ISO 8601).
- feature: `maxActApprox` (the highest activation of its top dataset examples; of its dreams when it has
  none) and `hasVector` (False: no steering vector is exported). The fields dreamlens does not compute
  (logit lens, histograms, correlated features, ...) are left out, so the importer keeps its defaults.
- activation: `id` (stable: a digest of the row's feature and origin), `tokens` (each token decoded alone,
  the start token and the dream's prefix and suffix included: the text the model read), `values` (one per
  token), `maxValue`, `maxValueTokenIndex`, `minValue`, `dataSource` and `dataIndex`: a dataset example's
  corpus and document number; a dream's "dreamlens:METHOD" (":mode-K" for a mode K > 1) and its rank on the
  Pareto frontier (0: the most fluent).

dreamlens keeps one value per prompt: the objective at the last token. That token's value is the row's
`maxValue` at `maxValueTokenIndex` (the last index), and every other token's value is written as 0: not
measured, not inactive. Hence only objectives read at the last token, one neuron or SAE latent each, can be
exported (a `sae_pre:` latent's values are its pre-activations). Prompts whose activation is not finite
are left out. The SAE's `neuronpedia_id` gives the model and source ids, so the rows land on the feature's
own page; other objectives get ids made up from the model and the hook (see `ids.export_feature`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import models
from ..analysis.errors import ScanLookupError
from ..analysis.scan import ScanResult
from ..errors import OutputError
from ..models import bos_token_id, decode, encode, smollm2_config
from ..modes.result import Modes
from ..results import DreamResult
from ..sweeps.chunk import load_model_spec
from ..sweeps.store import Sweep, load_sweep
from .errors import NeuronpediaError
from .ids import Feature, export_feature

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer


KINDS = ("features", "activations")


@dataclass
class Texts:
    """One objective's prompts to export: its top examples (`examples`: ids, activation, doc) and its
    dreams' frontiers (`dreams`: (dataSource, frontier with ids and activation, by rank)), and the
    context every prompt was read in (`bos`: the start token, if any; the dreams' `prefix`, `suffix`)."""

    objective: str
    examples: pd.DataFrame | None
    corpus: str
    bos: int | None
    dreams: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    prefix: str = ""
    suffix: str = ""


def _decode_all(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    return [decode(model, [int(t)]) for t in ids]


def _row_id(*parts: Any) -> str:
    """A stable id for a row (Neuronpedia's are cuid-like: lower-case letters and digits, a letter first)."""
    return "d" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def activation_row(feature: Feature, model: HookedTransformer, ids: Sequence[int], value: float, *,
                   data_source: str, data_index: str | None, creator_id: str | None, created_at: str) -> dict[str, Any]:
    """One activation row: the tokens the model read (`ids`, start token and context included) and the
    objective's `value` at the last of them (every other token 0: not measured)."""
    tokens = _decode_all(model, ids)
    values = [0.0] * (len(tokens) - 1) + [float(value)]
    return {
        "id": _row_id(feature.model_id, feature.source, feature.index, data_source, data_index, list(map(int, ids))),
        "modelId": feature.model_id,
        "layer": feature.source,
        "index": str(feature.index),
        "tokens": tokens,
        "values": values,
        "maxValue": float(value),
        "maxValueTokenIndex": len(tokens) - 1,
        "minValue": min(values),
        "dataSource": data_source,
        "dataIndex": data_index,
        "creatorId": creator_id,
        "createdAt": created_at,
    }


def feature_rows(texts: Texts, feature: Feature, model: HookedTransformer, *, creator_id: str | None = None,
                 created_at: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The feature row of one objective and its activation rows: its top examples (in rank order), then
    each dream's frontier (most fluent first)."""
    start = [texts.bos] if texts.bos is not None else []
    head = start + (encode(model, texts.prefix) if texts.prefix else [])
    tail = encode(model, texts.suffix) if texts.suffix else []
    rows: list[dict[str, Any]] = []
    for _, e in (texts.examples.iterrows() if texts.examples is not None else iter(())):
        if math.isfinite(float(e["activation"])):
            rows.append(activation_row(feature, model, start + [int(t) for t in e["ids"]], float(e["activation"]),
                                       data_source=texts.corpus, data_index=str(int(e["doc"])), creator_id=creator_id,
                                       created_at=created_at))
    top = [r["maxValue"] for r in rows]
    for source, frontier in texts.dreams:
        for rank, (_, d) in enumerate(frontier.iterrows()):
            if math.isfinite(float(d["activation"])):
                rows.append(activation_row(feature, model, head + [int(t) for t in d["ids"]] + tail,
                                           float(d["activation"]), data_source=source, data_index=str(rank),
                                           creator_id=creator_id, created_at=created_at))
    best = max(top) if top else max((r["maxValue"] for r in rows), default=0.0)
    feature_row = {"modelId": feature.model_id, "layer": feature.source, "index": str(feature.index),
                   "maxActApprox": best, "hasVector": False, "creatorId": creator_id, "createdAt": created_at}
    return feature_row, rows


# ---------------------------------------------------------------------------------------------
# What a folder holds, as Texts


def _dream_source(method: str, mode: int | None = None) -> str:
    return f"dreamlens:{method}" + (f":mode-{mode}" if mode is not None and mode > 1 else "")


def _scan_examples(scan: ScanResult | None, objective: str) -> tuple[pd.DataFrame | None, str]:
    if scan is None:
        return None, ""
    try:
        top = scan.top(objective)
    except ScanLookupError as e:
        raise NeuronpediaError(f"the scan holds no examples of {objective!r} ({e}); pass the scan of this objective") from e
    return top, str(scan.meta.get("corpus", ""))


def result_texts(result: DreamResult, scan: ScanResult | None = None) -> Texts:
    """A dream result's frontier, with its objective's top examples from `scan`."""
    examples, corpus = _scan_examples(scan, result.objective)
    return Texts(result.objective, examples, corpus, result.bos_token_id,
                 [(_dream_source(result.method), result.frontier)], result.prefix, result.suffix)


def modes_texts(modes: Modes, scan: ScanResult | None = None) -> Texts:
    """Every mode's frontier (mode K's dataSource ends ':mode-K', K > 1), with the top examples from `scan`."""
    examples, corpus = _scan_examples(scan, modes.objective)
    first = modes.dreams[0] if modes.dreams else None
    dreams = [(_dream_source(r.method, k + 1), r.frontier) for k, r in enumerate(modes.dreams)]
    return Texts(modes.objective, examples, corpus, first.bos_token_id if first else None, dreams,
                 first.prefix if first else "", first.suffix if first else "")


def sweep_texts(sweep: Sweep, bos: int | None) -> Iterator[Texts]:
    """Each finished objective of a sweep: its top examples and its dreams (every mode's); `bos`: the start
    token of its model (a sweep does not store it)."""
    method, options = str(sweep.config.get("method")), sweep.config.get("options") or {}
    done = sorted({int(i) for i in sweep.summary["index"]}) if len(sweep.summary) else []
    for i in done:
        front = sweep.frontier(i, mode=None)
        modes = sorted({int(m) for m in front["mode"]}) if "mode" in front.columns and len(front) else [1]
        dreams = [(_dream_source(method, m if sweep.modes > 1 else None),
                   front[front["mode"] == m] if "mode" in front.columns else front) for m in modes]
        yield Texts(sweep.objectives[i], sweep.top(i), str(sweep.config.get("corpus", "")), bos, dreams,
                    str(options.get("prefix") or ""), str(options.get("suffix") or ""))


# ---------------------------------------------------------------------------------------------
# The files


def _write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:  # mtime 0: the same rows give the same bytes
        f.write(text.encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def read_jsonl_gz(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of one batch file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_out(out: Path, folders: Sequence[Path], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file; give a folder for the Neuronpedia export")
    for folder in folders:
        old = [p for kind in KINDS for p in (folder / kind).glob("batch-*.jsonl.gz")]
        if old and not force:
            raise OutputError(f"{str(folder)!r} already holds a Neuronpedia export; pass force=True (--force) to "
                              "replace it, or choose another folder")


def export_neuronpedia(
    source: str | os.PathLike | Sweep | DreamResult | Modes,
    out: str | os.PathLike,
    *,
    model: HookedTransformer | str | None = None,
    scan: ScanResult | str | os.PathLike | None = None,
    model_id: str | None = None,
    source_id: str | None = None,
    batch_size: int = 128,
    creator_id: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Write a sweep's objectives (or a dream result's, or a modes folder's one) in Neuronpedia's export
    layout under `out` (see the module docstring for the files and fields): each objective a feature, its
    top dataset examples and its dreams' frontiers its activation rows. Returns the source folders written
    (`out/MODEL_ID/SOURCE_ID`).

    `source`: a folder (sweep, dream result or modes) or the object. `model`: the model whose tokenizer
    splits the texts into tokens (a loaded one, or what `load_model` takes; default: the dream's own model,
    for a sweep its model spec). `scan`: the top examples of a dream result or modes (default: the scan
    saved in their folder, `OUT/scan`; without one, dreams only). `model_id`, `source_id`: Neuronpedia's ids
    for every feature (default: from the SAE's `neuronpedia_id`, else the model's name and the hook).
    `batch_size`: features per batch file. An export already in a source folder is replaced only with `force`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NeuronpediaError(f"batch_size must be a positive number of features per file, got {batch_size!r}")
    folder, obj = _read(source)
    if scan is not None and isinstance(obj, Sweep):
        raise NeuronpediaError("a sweep holds its top examples already; drop scan= (--scan)")
    scan = _scan_of(scan, folder) if not isinstance(obj, Sweep) else None
    loaded = _model_of(model, obj)
    if isinstance(obj, Sweep):
        texts = list(sweep_texts(obj, bos_token_id(loaded)))
        model_name = ""  # a sweep names a model spec (a factory, a folder): the model's own name instead
    elif isinstance(obj, Modes):
        texts = [modes_texts(obj, scan)]
        model_name = obj.dreams[0].model_name if obj.dreams else ""
    else:
        assert isinstance(obj, DreamResult)
        texts = [result_texts(obj, scan)]
        model_name = obj.model_name
    model_name = model_name if model_name and not model_name.startswith("in-memory:") else str(loaded.cfg.model_name)
    features, left_out = [], []
    for t in list(texts):
        try:
            features.append(export_feature(t.objective, model_name, model_id=model_id, source=source_id))
        except NeuronpediaError as e:
            if not isinstance(obj, Sweep) or len(texts) == 1:
                raise
            left_out.append((t, e))
    if left_out:  # a sweep's other objectives are exported all the same
        if not features:
            raise left_out[0][1]
        texts = [t for t in texts if all(t is not u for u, _ in left_out)]
        warnings.warn(f"{len(left_out)} of the sweep's objectives are no Neuronpedia feature and were left out, e.g. "
                      f"{left_out[0][1]}", stacklevel=2)
    seen: dict[Feature, str] = {}
    for t, f in zip(texts, features):
        if f in seen:
            raise NeuronpediaError(f"{seen[f]!r} and {t.objective!r} are both the feature {f.url}; export them apart")
        seen[f] = t.objective
    root = Path(out)
    groups: dict[tuple[str, str], list[int]] = {}
    for k, f in enumerate(features):
        groups.setdefault((f.model_id, f.source), []).append(k)
    folders = {key: root / key[0] / key[1] for key in groups}
    _check_out(root, list(folders.values()), force)
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    for key, members in groups.items():
        where = folders[key]
        for kind in KINDS:
            (where / kind).mkdir(parents=True, exist_ok=True)
            for old in (where / kind).glob("batch-*.jsonl.gz"):
                old.unlink()
        members.sort(key=lambda k: features[k].index)
        for n, lo in enumerate(range(0, len(members), batch_size)):
            feats, acts = [], []
            for k in members[lo : lo + batch_size]:
                f_row, a_rows = feature_rows(texts[k], features[k], loaded, creator_id=creator_id, created_at=created_at)
                feats.append(f_row)
                acts += a_rows
            _write_jsonl_gz(where / "features" / f"batch-{n}.jsonl.gz", feats)
            _write_jsonl_gz(where / "activations" / f"batch-{n}.jsonl.gz", acts)
    return list(folders.values())


def _read(source: Any) -> tuple[Path | None, Any]:
    """(folder, object) of what `export_neuronpedia` was given."""
    if isinstance(source, (Sweep, DreamResult, Modes)):
        return (Path(source.folder) if isinstance(source, Sweep) else None), source
    folder = Path(source)
    if (folder / "sweep.json").is_file():
        return folder, load_sweep(folder)
    if (folder / "modes.json").is_file():
        return folder, Modes.load(folder)
    if (folder / "result.json").is_file():
        return folder, DreamResult.load(folder)
    raise NeuronpediaError(f"{str(folder)!r} is not a sweep, a dream result or a modes folder (no sweep.json, result.json "
                           "or modes.json); pass the folder given to `dreamlens sweep --out` or `dreamlens dream --out`")


def _scan_of(scan: Any, folder: Path | None) -> ScanResult | None:
    if isinstance(scan, ScanResult):
        return scan
    if scan is not None:
        return ScanResult.load(scan)
    own = folder / "scan" if folder is not None else None  # `dream --from-examples` and `--modes` save it there
    return ScanResult.load(own) if own is not None and (own / "scan.json").is_file() else None


def _model_of(model: Any, obj: Any) -> HookedTransformer:
    """The model whose tokenizer the rows need: `model` itself, loaded by name, or the dream's own."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    if model is not None:
        return models.load_model(str(model), device="cpu")
    if isinstance(obj, Sweep):
        spec = obj.config.get("model")
        if isinstance(spec, str) and spec.startswith("in-memory:"):
            raise NeuronpediaError(f"the sweep's model was given in memory ({spec!r}); pass it as model= (or --model NAME)")
        return load_model_spec(spec, device="cpu")
    first = obj.dreams[0] if hasattr(obj, "dreams") and obj.dreams else obj
    name = getattr(first, "model_name", "")
    return models.load_model(None if name in ("", smollm2_config().model_name) else name, device="cpu")
