"""The Ray Serve application's arguments: `mistralrs-serve ray` flags, and the
same flags as a Serve config file's `args` (the README's example is parsed
here as `serve deploy` would hand it to `build`). Nothing is deployed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mistralrs_serve.scale.app import LOCAL_INSTANCE_ENV, build, parse_ray_args

README = Path(__file__).resolve().parents[2] / "README.md"


def deployments(app: object) -> dict[str, dict[str, object]]:
    """Each bound deployment's name and options, from the ingress down."""
    found: dict[str, dict[str, object]] = {}
    bound = app._bound_deployment  # type: ignore[attr-defined]
    found[bound.name] = bound._deployment_config.model_dump()
    for arg in bound.init_args:
        if hasattr(arg, "_bound_deployment"):
            found.update(deployments(arg))
    return found


def test_the_readmes_serve_config_builds() -> None:
    block = re.search(r"```yaml\n(applications:.*?)```", README.read_text(), re.S)
    assert block is not None
    config = yaml.safe_load(block.group(1))["applications"][0]
    assert config["import_path"] == "mistralrs_serve.scale.app:build"
    found = deployments(build(config["args"]))
    assert set(found) == {"ingress", "engine"}
    scaling = found["engine"]["autoscaling_config"]
    assert isinstance(scaling, dict) and (scaling["min_replicas"], scaling["max_replicas"]) == (1, 8)
    router = found["engine"]["request_router_config"]
    assert isinstance(router, dict) and router["request_router_class"].endswith("AffinityRouter")


def test_the_readme_names_the_local_instances_ray_settings() -> None:
    """What `mistralrs-serve ray` sets for a local Ray instance is what the README says it
    sets, and the README's `ray start` for a cluster of one's own sets Serve's
    high-throughput mode and its workers' priority too."""
    text = README.read_text()
    for name, value in LOCAL_INSTANCE_ENV.items():
        assert f"`{name}={value}`" in text, name
    start = re.search(r"^(.*) ray start --head$", text, re.M)
    assert start is not None
    wanted = {"RAY_worker_niceness=0", "RAY_SERVE_ENABLE_HA_PROXY=1", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"}
    assert wanted <= set(start.group(1).split())


def test_fixed_replicas_and_flags() -> None:
    args = parse_ray_args(["--replicas", "3", "--store", "postgresql://db/x", "--replica-cpus", "2"])
    found = deployments(build({"replicas": 3, "store": "postgresql://db/x", "replica_cpus": 2}))
    assert found["engine"]["num_replicas"] == 3 and found["engine"]["autoscaling_config"] is None
    assert args.replicas == 3 and args.replica_cpus == 2.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"replicas": 2}, "needs a shared --store postgresql"),
        ({"replicas": 0}, "--replicas must be at least 1"),
        ({"min_replicas": 3, "max_replicas": 2, "store": "postgresql://db/x"}, "--max-replicas must be"),
        ({"max_replicas": 4, "store": "sqlite"}, "needs a shared --store postgresql"),
    ],
)
def test_bad_arguments_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(config)


def test_one_replica_may_keep_the_embedded_store() -> None:
    assert set(deployments(build({}))) == {"ingress", "engine"}
