"""The ``vnetbackend`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from vnetbackend.bench import BENCHMARKS
from vnetbackend.rss import ALL_HASH_TYPES, InvalidRssConfig, RssConfig, parse_hash_types
from vnetbackend.rss.samples import MICROSOFT_KEY


def _hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", "").replace(" ", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex bytes: {text!r}") from None


def _queue_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated queue list: {text!r}") from None


def _hash_types(text: str) -> int:
    try:
        return parse_hash_types(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_hash(args: argparse.Namespace) -> int:
    table = args.table or [0]
    queues = args.queues or max(max(table), args.unclassified_queue) + 1
    try:
        config = RssConfig(hash_types=args.types, key=args.key, indirection_table=table,
                           queues=queues, unclassified_queue=args.unclassified_queue)
    except InvalidRssConfig as err:
        print(f"vnetbackend hash: {err}", file=sys.stderr)
        return 2
    result = config.steer(args.frame)
    print(json.dumps({
        "hash": f"0x{result.hash:08x}",
        "report_type": result.report.virtio_name,
        "input": result.hash_input.hex(),
        "queue": result.queue,
    }))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    figures = args.bench_module.run(args)
    if args.json:
        print(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnetbackend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    hash_cmd = commands.add_parser(
        "hash", help="hash one frame with the reference model and print JSON")
    hash_cmd.add_argument("frame", type=_hex_bytes, help="the Ethernet frame, hex")
    hash_cmd.add_argument("--key", type=_hex_bytes, default=MICROSOFT_KEY,
                          help="RSS key, hex (default: the Microsoft verification key)")
    hash_cmd.add_argument("--types", type=_hash_types, default=ALL_HASH_TYPES,
                          help="enabled hash types: virtio names (ipv4,tcpv4,...) "
                               "or a hex mask (default: all)")
    hash_cmd.add_argument("--table", type=_queue_list,
                          help="indirection table, comma-separated queues (default: 0)")
    hash_cmd.add_argument("--queues", type=int, help="receive queues in use")
    hash_cmd.add_argument("--unclassified-queue", type=int, default=0)
    hash_cmd.set_defaults(handler=_cmd_hash)

    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
        module.add_arguments(sub)
        sub.set_defaults(handler=_cmd_bench, bench_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
