"""The `mistralrs-serve ray` flags (kept apart from app.py, so the CLI parser does not import Ray)."""

from __future__ import annotations

import argparse


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (many replicas; needs mistralrs-serve[ray,postgres])")
    g.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join ('auto', or ray://HEAD:10001); default: start a local Ray instance",
    )
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (without autoscaling)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale: the fewest engine replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale: the most engine replicas")
    g.add_argument(
        "--target-queue-depth",
        type=float,
        default=16.0,
        help="autoscale: the requests per replica (running and waiting) Ray Serve aims for",
    )
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each engine replica reserves")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each engine replica reserves")
    g.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=256,
        help="requests a replica takes at once (more wait in the ingress for a free replica)",
    )
    g.add_argument(
        "--affinity-imbalance",
        type=int,
        default=8,
        help="a request leaves its prefix's replica when that queue is this much longer than the shortest",
    )
    g.add_argument("--app-name", default="mistralrs-serve", help="the Serve application's name")


def check_args(args: argparse.Namespace) -> None:
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.min_replicas is not None and args.min_replicas < 0:
        raise ValueError(f"--min-replicas must be at least 0, got {args.min_replicas}")
    if args.max_replicas is not None and args.max_replicas < max(1, args.min_replicas or 0):
        raise ValueError("--max-replicas must be at least 1 and at least --min-replicas")
    if args.replicas > 1 or args.max_replicas not in (None, 1):
        store = args.store or ""
        if not store.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "more than one replica needs a shared --store postgresql://... (each replica would "
                "otherwise keep its own responses, files and sessions)"
            )
