"""The `export neuronpedia` subcommand: a sweep, a dream result or a modes folder in Neuronpedia's export
layout (features/ and activations/batch-N.jsonl.gz per source), for its importer or its exports' readers."""

from __future__ import annotations

import argparse

from ..neuronpedia.export import KINDS, export_neuronpedia, read_jsonl_gz


def cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    folders = export_neuronpedia(args.source, args.out, model=args.model, scan=args.scan, model_id=args.model_id,
                                 source_id=args.source_id, batch_size=args.batch_size, force=args.force)
    for folder in folders:
        files = {kind: sorted((folder / kind).glob("batch-*.jsonl.gz")) for kind in KINDS}
        n = {kind: sum(len(read_jsonl_gz(f)) for f in files[kind]) for kind in KINDS}
        print(f"wrote {folder}: {n['features']} features, {n['activations']} activation rows in "
              f"{len(files['features'])} batch file(s) each of features/ and activations/")
    return 0
