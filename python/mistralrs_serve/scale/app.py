"""The Ray Serve application: an `ingress` deployment (one replica, no CPU of
its own) in front of an `engine` deployment (N replicas, or between a minimum
and a maximum with Ray Serve's autoscaling on queue depth), whose router is
router.AffinityRouter.

Three ways to run it:
- `mistralrs-serve ray --replicas N --store postgresql://... -m MODEL`
  (`ray_command`): starts a local Ray instance, or joins `--address`;
- `serve run mistralrs_serve.scale.app:build store=postgresql://... replicas=2`
  or a Serve config file whose `import_path` is `mistralrs_serve.scale.app:build`
  and whose `args` are the `mistralrs-serve ray` flags (`build` parses them);
- from Python: `serve.run(application(args))`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from mistralrs_serve.scale.ingress import Ingress
from mistralrs_serve.scale.options import check_args
from mistralrs_serve.scale.replica import EngineReplica

logger = logging.getLogger(__name__)

ROUTER = "mistralrs_serve.scale.router:AffinityRouter"
# A local instance runs in Ray Serve's high-throughput mode: HAProxy in front, straight to
# the ingress replica's own HTTP server, user code and routing on the replica's own event
# loop; and with a slower control loop and metrics export, which on a small machine take
# cores from the engine (the controller: 0.9 CPU-s in a 27 s run at concurrency 64 on 2
# cores, 0.4 at 0.5 s). Ray starts its workers, the engine replicas among them, at nice 15,
# below its own daemons and every other process on the node, whose every wake-up then takes a
# core from the engine's forward; the local instance starts them at 0, as the single server
# runs. A variable already set wins; on a cluster of your own, set them where Ray starts
# (README).
LOCAL_INSTANCE_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def application(args: argparse.Namespace) -> Any:
    """The Serve application for parsed `mistralrs-serve ray` arguments."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    check_args(args)
    engine: dict[str, Any] = {
        "name": "engine",
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "request_router_config": cast(Any, RequestRouterConfig)(  # ray's stub types it loosely
            request_router_class=ROUTER,
            request_router_kwargs={"imbalance": args.affinity_imbalance},
            request_routing_stats_period_s=2.0,
            request_routing_stats_timeout_s=10.0,
        ),
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": 30.0,
    }
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
        engine["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, min(high, args.replicas)),
            "max_replicas": high,
            "target_ongoing_requests": args.target_queue_depth,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 120.0,
        }
    else:
        engine["num_replicas"] = args.replicas
    deployment = cast(Any, serve.deployment)  # as a plain decorator, untyped in ray's stub
    engine_deployment = deployment(EngineDeployment).options(**engine)
    ingress_deployment = deployment(IngressDeployment).options(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, 4 * args.max_ongoing_requests),
    )
    # the largest body any route takes (an upload, with its multipart framing); each route's own
    # limit is the replica's to enforce, with the single server's error
    largest = (max(args.max_body_mb, args.max_file_mb, args.max_audio_mb) << 20) + (1 << 20)
    return ingress_deployment.bind(engine_deployment.bind(args), max_body_bytes=largest)


class EngineDeployment(EngineReplica):
    """EngineReplica as a Serve deployment: ready once its models load."""

    async def __init__(self, args: argparse.Namespace) -> None:  # type: ignore[misc]
        import ray

        # its port on the node's address, which the ingress reaches from any node
        EngineReplica.__init__(self, args, host=ray.util.get_node_ip_address())
        await self.start()

    async def slot(
        self, affinity: str | None = None, avoid: list[str] | None = None, holder: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """`affinity`, `avoid` and `holder` are for the router (router.py), which reads them
        from the call."""
        from ray import serve

        ray_replica = serve.get_replica_context().replica_id.unique_id
        async for found in EngineReplica.slot(self):
            yield {**found, "ray_replica": ray_replica}

    def ping(self) -> str:
        return self.id

    def record_routing_stats(self) -> dict[str, Any]:
        return self.routing_stats()

    def check_health(self) -> None:
        health = self.health()
        if health["status"] == "failed":
            raise RuntimeError(f"replica {self.id} is unhealthy: {health['error']}")

    async def __del__(self) -> None:
        await self.stop()


class IngressDeployment(Ingress):
    async def __init__(self, engine: Any, *, max_body_bytes: int) -> None:  # type: ignore[misc]
        Ingress.__init__(self, engine, max_body_bytes=max_body_bytes)
        # one call makes the handle's router, whose replica stats /health reports from the start
        self._warm = asyncio.get_running_loop().create_task(self._warm_router(engine))

    @staticmethod
    async def _warm_router(engine: Any) -> None:
        try:
            await engine.options(method_name="ping").remote()
        except Exception as e:
            logger.warning("the engine deployment did not answer its first call: %s", e)

    async def __call__(self, request: Any) -> Any:  # the deployment's HTTP entry
        return await Ingress.__call__(self, request)


def parse_ray_args(argv: list[str]) -> argparse.Namespace:
    from mistralrs_serve.cli import build_parser

    return build_parser().parse_args(["ray", *argv])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def build(config: Mapping[str, Any]) -> Any:
    """The application builder for `serve run` / `serve deploy`: its args are the
    `mistralrs-serve ray` flags without the dashes (`store`, `replicas`, `model`, ...);
    a list value repeats its flag, true is a bare flag."""
    argv: list[str] = []
    for name, value in config.items():
        flag = "--" + str(name).replace("_", "-")
        for one in value if isinstance(value, list) else [value]:
            if one is True:
                argv.append(flag)
            elif one is not False and one is not None:
                argv += [flag, str(one)]
    return application(parse_ray_args(argv))


def ray_command(args: argparse.Namespace) -> int:
    """`mistralrs-serve ray`: deploy on a Ray cluster (a local one by default) and serve until
    interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError(
            "`mistralrs-serve ray` needs Ray Serve: pip install 'mistralrs-serve[ray,postgres]'"
        ) from None
    app = application(args)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: shut down as on Ctrl-C
    if not ray.is_initialized():
        if args.address is None:
            for name, value in LOCAL_INSTANCE_ENV.items():
                os.environ.setdefault(name, value)
        ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=args.app_name, route_prefix="/", blocking=False)
    logger.info(
        "serving the OpenAI API on http://%s:%d/v1 from %s engine replicas",
        args.host,
        args.port,
        f"{args.min_replicas}..{args.max_replicas}" if args.max_replicas else args.replicas,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if args.address is None:  # the local instance this command started: stop its proxies too
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(args.app_name)
        return 130
