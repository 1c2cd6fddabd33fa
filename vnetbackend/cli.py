"""The ``vnetbackend`` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from vnetbackend import tap
from vnetbackend.bench import BENCHMARKS
from vnetbackend.choices import add_platform_options
from vnetbackend.daemon import launch, serve
from vnetbackend.daemon.lifecycle import Ending
from vnetbackend.daemon.privileges import QEMU_USER
from vnetbackend.daemon.run_dir import default_run_dir
from vnetbackend.errors import VnetError
from vnetbackend.qemu.command import DEVICE_ID
from vnetbackend.rss import ALL_HASH_TYPES, InvalidRssConfig, RssConfig, parse_hash_types
from vnetbackend.rss.vectors import MICROSOFT_KEY


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


def _tap_name(text: str) -> str:
    try:
        tap.check_name(text)
    except tap.TapError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


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


def _run_dir(args: argparse.Namespace) -> Path:
    return args.run_dir or default_run_dir(args.tap)


def _finish(outcome: Coroutine[Any, Any, tuple[Ending, str]]) -> int:
    """Run the daemon; its exit status (1 when it could not be set up)."""
    try:
        ending, reason = asyncio.run(outcome)
    except VnetError as err:
        print(f"vnetbackend: {err}", file=sys.stderr)
        return 1
    if ending is not Ending.REQUESTED:
        print(f"vnetbackend: {reason}", file=sys.stderr)
    return ending.value


def _cmd_run(args: argparse.Namespace) -> int:
    qemu_args = args.qemu_args[1:] if args.qemu_args[:1] == ["--"] else args.qemu_args
    run_dir = _run_dir(args)
    options = launch.RunOptions(
        qemu_args=tuple(qemu_args), tap_name=args.tap, queues=args.queues, run_dir=run_dir,
        monitor=args.monitor or run_dir / launch.MONITOR_SOCKET, mac=args.mac,
        pass_fds=tuple(args.pass_fd), qemu=args.qemu, qemu_user=args.qemu_user)
    return _finish(launch.run(options))


def _cmd_attach(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    return _finish(launch.attach(
        args.qmp, args.tap, run_dir, args.monitor or run_dir / launch.MONITOR_SOCKET,
        args.device_id, not args.poll_control_queue))


def _cmd_serve(args: argparse.Namespace) -> int:
    run_root = args.run_dir or serve.SERVE_ROOT
    return _finish(serve.serve(serve.ServeOptions(
        monitor=args.monitor or run_root / serve.MONITOR_SOCKET, run_root=run_root,
        qemu_user=args.qemu_user, qemu=args.qemu)))


def _cmd_demo(args: argparse.Namespace) -> int:
    from vnetbackend import demo  # the demo pulls in the test bed; load it only for this

    return demo.main(args.queues, args.per_class, args.json, args.qemu, args.guest_kernel)


def _cmd_vm(args: argparse.Namespace) -> int:
    import tempfile

    from vnetbackend import shell  # pulls in the test bed; load it only for this
    from vnetbackend.testbed.platform import Platform

    run_dir = _run_dir(args)
    with tempfile.TemporaryDirectory(prefix="vnetbackend-vm-") as work:
        try:
            return shell.main(args.tap, args.queues, run_dir,
                              args.monitor or run_dir / launch.MONITOR_SOCKET,
                              Platform.from_args(args), Path(work))
        except VnetError as err:
            print(f"vnetbackend vm: {err}", file=sys.stderr)
            return 1


def _add_daemon_options(parser: argparse.ArgumentParser, tap_help: str,
                        tap_default: str | None = None) -> None:
    parser.add_argument("--tap", required=tap_default is None, default=tap_default,
                        type=_tap_name, help=tap_help)
    parser.add_argument("--run-dir", type=Path,
                        help="sockets and QEMU's log, mode 0700 (default: "
                             "/run/vnetbackend/TAP)")
    parser.add_argument("--monitor", type=Path,
                        help="the daemon's QMP monitor socket (default: RUN_DIR/monitor.sock)")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command's parser. Only the benchmark *argv* names (if any) is imported, to
    add its own options: the others are listed by name and summary."""
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

    run = commands.add_parser(
        "run", help="launch QEMU on a new multi-queue tap and mirror its guest's RSS",
        description="Everything after -- is passed to QEMU; vnetbackend adds the tap, "
                    f"the virtio-net device (id {DEVICE_ID}), a QMP monitor, "
                    "the RSS trace events, and the switch to an unprivileged user in a "
                    "seccomp sandbox.")
    _add_daemon_options(run, "name of the tap to create")
    run.add_argument("--queues", type=int, default=2, choices=range(1, 9), metavar="1..8",
                     help="queue pairs (default: %(default)s)")
    run.add_argument("--mac", help="the guest's MAC address")
    run.add_argument("--pass-fd", type=int, action="append", default=[], metavar="FD",
                     help="an open fd QEMU inherits (for -chardev ...,fd=FD); repeatable")
    run.add_argument("--qemu-user", default=QEMU_USER, metavar="USER",
                     help="the unprivileged user QEMU switches to once started "
                          "(default: %(default)s, created by scripts/setup)")
    add_platform_options(run, guest=False)
    run.add_argument("qemu_args", nargs=argparse.REMAINDER, help="-- QEMU arguments")
    run.set_defaults(handler=_cmd_run)

    attach = commands.add_parser(
        "attach", help="mirror the guest RSS of a running QEMU onto its tap")
    _add_daemon_options(attach, "the tap QEMU's virtio-net device uses")
    attach.add_argument("--qmp", type=Path, required=True, help="QEMU's QMP socket")
    attach.add_argument("--device-id", default=DEVICE_ID,
                        help="qdev id of the virtio-net device (default: %(default)s)")
    attach.add_argument("--poll-control-queue", action="store_true",
                        help="follow the guest's control queue instead of QEMU's trace events")
    attach.set_defaults(handler=_cmd_attach)

    serve_cmd = commands.add_parser(
        "serve", help="one daemon for many VMs: add, remove and list them on its monitor",
        description="Compiles the steering program once and serves every VM added with "
                    "vnet-add-vm on its QMP monitor, each with its own program instance "
                    "and maps.")
    serve_cmd.add_argument("--monitor", type=Path,
                           help="the daemon's QMP monitor socket (default: "
                                "RUN_DIR/monitor.sock)")
    serve_cmd.add_argument("--run-dir", type=Path,
                           help="the monitor and one directory per VM, mode 0700 "
                                "(default: /run/vnetbackend/serve)")
    serve_cmd.add_argument("--qemu-user", default=QEMU_USER, metavar="USER",
                           help="the unprivileged user QEMUs it launches switch to "
                                "(default: %(default)s)")
    add_platform_options(serve_cmd, guest=False)
    serve_cmd.set_defaults(handler=_cmd_serve)

    demo = commands.add_parser(
        "demo", help="the prototype end to end on the test guest: negotiation, live RSS "
                     "changes, a traffic mix and the three-way hash check")
    demo.add_argument("--json", action="store_true", help="one JSON object on stdout")
    demo.add_argument("--queues", type=int, default=4, choices=range(2, 9), metavar="2..8",
                      help="queue pairs (default: %(default)s)")
    demo.add_argument("--per-class", type=int, default=2, metavar="N",
                      help="frames of each class per configuration (default: %(default)s)")
    add_platform_options(demo, guest=True)
    demo.set_defaults(handler=_cmd_demo)

    vm = commands.add_parser(
        "vm", help="boot the test guest under the daemon and open a shell in it",
        description="The test guest (scripts/setup builds it) launched as `run` launches "
                    "QEMU, with a shell on its console connected to this terminal and the "
                    "daemon's monitor path printed; Ctrl-] leaves.")
    _add_daemon_options(vm, "name of the tap to create (default: vnetvm<pid>)",
                        tap_default=f"vnetvm{os.getpid() % 100000}")
    vm.add_argument("--queues", type=int, default=4, choices=range(1, 9), metavar="1..8",
                    help="queue pairs, and vCPUs (default: %(default)s)")
    add_platform_options(vm, guest=True)
    vm.set_defaults(handler=_cmd_vm)

    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    for name, (module_name, summary) in BENCHMARKS.items():
        sub = benches.add_parser(name, help=summary)
        sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=_cmd_bench, bench_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vnetbackend: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
