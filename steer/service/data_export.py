"""`steer data export`: a training dataset from stored completions, written to local JSONL
files (read straight from the store at STEER_DATABASE_URL), or uploaded as Files by a running
server (`--upload`: its `POST /v1/steering/datasets`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from steer.service.settings import Settings
from steer.store import Database
from steer.training.datasets import Dataset, DatasetError, DatasetSpec, check, collect, jsonl


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets from stored completions")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("export", help="SFT or preference lines from stored completions")
    p.add_argument("--kind", choices=("sft", "preference"), default="sft")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="only completions with this metadata pair (repeatable)")
    p.add_argument("--model")
    p.add_argument("--strategy")
    p.add_argument("--min-score", type=float, help="the chosen candidate's score, at least")
    p.add_argument("--created-after", type=int, help="unix seconds, inclusive")
    p.add_argument("--created-before", type=int, help="unix seconds, exclusive")
    p.add_argument("--validation-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dedupe", action="store_true")
    p.add_argument("--include-truncated", action="store_true")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", type=Path, help="write the training lines here (JSONL)")
    where.add_argument("--upload", action="store_true",
                       help="have the server at --url store the dataset as Files")
    p.add_argument("--validation-output", type=Path,
                   help="with --output: where the validation lines go")
    p.add_argument("--filename", help="with --upload: the File's name")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="with --upload")
    p.add_argument("--api-key", help="with --upload (default: STEER_API_KEY)")


def spec_of(args: argparse.Namespace) -> DatasetSpec:
    pairs = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return DatasetSpec(
        kind=args.kind, metadata=pairs, model=args.model, strategy=args.strategy,
        min_score=args.min_score, created_after=args.created_after,
        created_before=args.created_before, validation_fraction=args.validation_fraction,
        seed=args.seed, dedupe=not args.no_dedupe, include_truncated=args.include_truncated,
        filename=args.filename,
    )


def export(args: argparse.Namespace, settings: Settings) -> int:
    try:
        spec = spec_of(args)
    except (ValueError, ValidationError) as exc:
        print(f"steer data export: {exc}", file=sys.stderr)
        return 2
    if args.upload:
        return upload(spec, args, settings)
    try:
        data = asyncio.run(gather(spec, settings))
        check(data, spec)
    except DatasetError as exc:
        print(f"steer data export: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(write_local(data, args.output, args.validation_output)))
    return 0


async def gather(spec: DatasetSpec, settings: Settings) -> Dataset:
    db = Database(settings.db_url())
    try:
        await db.start()
        return await collect(db, spec, settings.max_file_bytes)  # what a server would take
    finally:
        await db.close()


def write_local(data: Dataset, output: Path, validation_output: Path | None) -> dict[str, Any]:
    output.write_bytes(jsonl(data.training))
    summary: dict[str, Any] = {"training_file": str(output), "lines": len(data.training),
                               "completions": data.completions, "skipped": dict(data.skipped)}
    if data.validation:
        target = validation_output or output.with_name(f"{output.stem}-validation.jsonl")
        target.write_bytes(jsonl(data.validation))
        summary.update(validation_file=str(target), validation_lines=len(data.validation))
    return summary


def upload(spec: DatasetSpec, args: argparse.Namespace, settings: Settings) -> int:
    key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(f"{args.url.rstrip('/')}/v1/steering/datasets", headers=headers,
                       json=spec.model_dump(exclude_none=True), timeout=600)
    except httpx.HTTPError as exc:
        print(f"steer data export: {args.url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"steer data export: {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    print(r.text)
    return 0
