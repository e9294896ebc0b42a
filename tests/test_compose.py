"""docker-compose.yml checked against the code (CI has no Docker engine to run it).

The Cake services' commands must parse with the real CLI, their environment must be settings the
code reads, and the wiring (NATS, S3 bucket, staging volume, traces) must point at services that
the file defines.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from services.launcher.cli import SERVICES, build_parser
from services.launcher.nats_auth import ROLES, authorization
from shared.runtime.config import ENV_VARS, Settings
from shared.wire.nats_connection import redacted

ROOT = Path(__file__).resolve().parents[1]
AWS_VARS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"}
)
NODES = (("compute", "loader"), ("compute-b", "loader-b"))  # each pair: one node, one staging
REPLICAS = tuple(s for node in NODES[1:] for s in node)  # the second node (--profile scale)
CAKE_SERVICES = (*SERVICES, *REPLICAS)


def kind(name: str) -> str:
    """The Cake service a compose service runs (compute-b runs compute)."""
    return name.removesuffix("-b")


MB = 1024 * 1024


@cache
def compose() -> dict[str, Any]:
    """The parsed docker-compose.yml (anchors and merge keys resolved)."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Any]:
    """Every compose service by name."""
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def cake_services() -> dict[str, dict[str, Any]]:
    """The services built from this project's image (Dockerfile at the root)."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def environment(service: str) -> dict[str, str]:
    """A service's environment as the container sees it (compose accepts maps and lists)."""
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    for name, value in env.items():
        # compose rejects booleans and null would mean "take it from the host"
        assert isinstance(value, str | int | float), f"{service}: {name}={value!r}"
        assert not isinstance(value, bool), f"{service}: {name} is a YAML boolean; quote it"
    return {name: interpolated(str(value)) for name, value in env.items()}


def interpolated(value: str) -> str:
    """A compose value with `${NAME:-default}` as compose fills it when NAME is not set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def settings(service: str) -> Settings:
    """The Settings a service's container builds from its environment."""
    return Settings.from_env(environment(service))


def host_of(url: str) -> str:
    """The host name of a URL (compose service names resolve as hosts)."""
    host = urlparse(url).hostname
    assert host, f"no host in {url!r}"
    return host


def mounts(service: str) -> dict[str, str]:
    """A service's mounts, container path -> source (named volume or host path)."""
    found: dict[str, str] = {}
    for vol in services()[service].get("volumes") or []:
        if isinstance(vol, dict):
            found[vol["target"]] = vol.get("source", "")
        else:
            source, target = vol.split(":")[:2]
            found[target] = source
    return found


def mounted_file(service: str, container_path: str) -> Path:
    """The repository file bind-mounted into a service at container_path."""
    source = mounts(service).get(container_path)
    assert source, f"{service} mounts nothing at {container_path}"
    path = (ROOT / source).resolve()
    assert path.is_file(), f"{service} mounts {source}, which is not a file here"
    return path


def words(command: Any) -> list[str]:
    """A compose command or entrypoint as a list of words."""
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


# --- the Cake services --------------------------------------------------------------------


def test_the_four_services_run_commands_the_cli_accepts() -> None:
    seen = []
    for name, svc in cake_services().items():
        command = words(svc.get("command"))
        try:
            args = build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: `cake {' '.join(command)}` is rejected by services.launcher.cli")
        assert args.command == "serve", name
        assert args.service in SERVICES, name
        assert args.service == kind(name), f"compose service {name} runs {args.service}"
        seen.append(name)
    assert sorted(seen) == sorted(CAKE_SERVICES)


def test_the_second_node_and_nats_cluster_members_are_behind_the_scale_profile() -> None:
    profiled = {name for name, svc in services().items() if svc.get("profiles")}
    assert profiled == {*REPLICAS, "nats-2", "nats-3"}
    assert all(services()[name]["profiles"] == ["scale"] for name in profiled)


def test_nats_cluster_members_route_to_the_first_server() -> None:
    cluster = re.search(r"^cluster\s*\{(.*?)^\}", nats_conf(), re.MULTILINE | re.DOTALL)
    assert cluster, "nats.conf has no cluster block"
    port = re.search(r"listen:\s*[\d.]+:(\d+)", cluster[1])
    assert port
    for member in ("nats-2", "nats-3"):
        command = words(services()[member]["command"])
        routes = command[command.index("--routes") + 1]
        assert routes == f"nats-route://nats:{port[1]}", member
        assert mounts(member) == mounts("nats"), member  # the same users and limits


@pytest.mark.parametrize("service", CAKE_SERVICES)
def test_environment_has_only_variables_something_reads(service: str) -> None:
    unknown = {
        name
        for name in environment(service)
        if name not in ENV_VARS and not name.startswith("OTEL_") and name not in AWS_VARS
    }
    assert not unknown, f"{service}: variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("service", CAKE_SERVICES)
def test_environment_gives_valid_settings(service: str) -> None:
    got = settings(service)  # raises ConfigError on a bad value
    assert got.log_format == "json"
    # shared.runtime.observability names the trace resource cake-<service>; keep both names the same
    assert environment(service).get("OTEL_SERVICE_NAME") == f"cake-{kind(service)}"


def test_services_agree_on_what_chunk_keys_depend_on() -> None:
    fields = ("model", "model_revision", "chunk_tokens")
    seen = {s: (redacted(settings(s).nats_url), *(getattr(settings(s), f) for f in fields))
            for s in CAKE_SERVICES}  # fmt: skip
    assert len(set(seen.values())) == 1, seen


def test_nats_has_a_user_per_service_with_its_roles_permissions_and_no_published_port() -> None:
    """compose/nats.conf's users are services.launcher.nats_auth's roles, each service connects
    as its own role with the password the server is given, and NATS is not published."""
    conf = (ROOT / "compose" / "nats.conf").read_text()
    block = conf[conf.index("authorization:") + len("authorization:") :]
    block = re.sub(r"\$CAKE_NATS_(\w+)_PASSWORD", lambda m: f'"{m.group(1).lower()}"', block)
    users = {u["user"]: u for u in json.loads(block)["users"]}
    want = {u["user"]: u for u in authorization({r: r for r in ROLES})["users"]}
    assert users == {role: want[role] for role in SERVICES}
    server_env = environment("nats")
    for service in CAKE_SERVICES:
        url = urlparse(settings(service).nats_url)
        assert url.username == kind(service), service
        assert url.password == server_env[f"CAKE_NATS_{kind(service).upper()}_PASSWORD"], service
    assert not any(services()[n].get("ports") for n in ("nats", "nats-2", "nats-3"))


def test_gateway_listens_on_all_interfaces_on_a_published_port() -> None:
    gw = settings("gateway")
    assert gw.host == "0.0.0.0"
    published = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in services()["gateway"]["ports"]}
    assert str(gw.port) in published


@pytest.mark.parametrize("node", NODES)
def test_compute_and_loader_share_a_node_and_its_staging_volume(node: tuple[str, str]) -> None:
    nodes = {settings(s).node for s in node}
    assert len(nodes) == 1, nodes
    sources = set()
    for service in node:
        staging = settings(service).staging_dir
        source = mounts(service).get(staging)
        assert source, f"{service}: nothing mounted at its CAKE_STAGING_DIR {staging}"
        assert source in (compose().get("volumes") or {}), f"{source} is not a named volume"
        sources.add((staging, source))
    assert len(sources) == 1, f"different staging mounts: {sources}"


def test_each_node_has_its_own_name_and_staging_and_they_share_the_store() -> None:
    assert len({settings(compute).node for compute, _ in NODES}) == len(NODES)
    assert len({mounts(compute)["/staging"] for compute, _ in NODES}) == len(NODES)
    assert len({settings(loader).store for _, loader in NODES}) == 1


def test_the_staging_volume_is_writable_by_the_image_user() -> None:
    source = mounts("compute")[settings("compute").staging_dir]  # loader's: the test above
    opts = (compose()["volumes"][source] or {}).get("driver_opts") or {}
    if "uid=" not in str(opts.get("o", "")):
        return  # a plain named volume takes its owner from the image's /staging
    uid = re.search(r"\buid=(\d+)", opts["o"])
    image_uid = re.search(r"useradd\b.*--uid\s+(\d+)", (ROOT / "Dockerfile").read_text())
    assert uid and image_uid and uid[1] == image_uid[1], "staging tmpfs uid != the image's user"


def test_depends_on_conditions_can_be_met() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services(), f"{name} depends on unknown service {dep}"
            condition = deps[dep].get("condition") if isinstance(deps, dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in services()[dep], f"{dep} has no healthcheck"
    for name in cake_services():
        assert services()[name]["depends_on"]["nats"]["condition"] == "service_healthy"


# --- NATS ---------------------------------------------------------------------------------


def nats_conf() -> str:
    """nats.conf as the nats service reads it (-c PATH), comments removed."""
    command = words(services()["nats"].get("command"))
    flag = next(i for i, w in enumerate(command) if w in ("-c", "--config"))
    text = mounted_file("nats", command[flag + 1]).read_text()
    return re.sub(r"(#|//).*", "", text)


def nats_size(value: str) -> int:
    """A size as nats-server parses it: 8MB, 8M and 8MiB are 8 * 1024 * 1024."""
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b)?", value.strip().strip("\"'"), re.IGNORECASE)
    assert m, f"not a size: {value!r}"
    return int(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " ")


def test_nats_size_parser() -> None:
    assert nats_size("8MB") == nats_size("8M") == 8 * MB
    assert nats_size("1048576") == MB


def test_nats_conf_allows_large_payloads() -> None:
    payload = re.search(r"^\s*max_payload\s*[:=]?\s*(\S+)", nats_conf(), re.MULTILINE)
    assert payload, "nats.conf does not set max_payload (the 1MB default is too small)"
    assert nats_size(payload[1]) > MB


def test_nats_url_points_at_the_nats_service() -> None:
    for service in SERVICES:
        url = urlparse(settings(service).nats_url)
        assert url.hostname in services(), f"{service}: {url.hostname} is not a compose service"
        port = re.search(r"^\s*port\s*[:=]?\s*(\d+)", nats_conf(), re.MULTILINE)
        assert (url.port or 4222) == (int(port[1]) if port else 4222)


# --- S3 (MinIO) ---------------------------------------------------------------------------


def created_bucket() -> str:
    """The bucket the minio-init one-shot creates (`mc mb ... ALIAS/BUCKET`)."""
    init = services()["minio-init"]
    script = " ".join(words(init.get("entrypoint")) + words(init.get("command")))
    m = re.search(r"\bmc mb\b(?:\s+-{1,2}[\w-]+)*\s+\w+/([a-z0-9.-]+)", script)
    assert m, f"minio-init creates no bucket: {script}"
    return m[1]


def test_the_loader_stores_in_the_bucket_minio_init_creates() -> None:
    s3_users = {s for s in CAKE_SERVICES if settings(s).store.startswith("s3://")}
    assert {"loader", "loader-b"} <= s3_users
    minio_env = environment("minio")
    for service in s3_users:
        got = settings(service)
        assert urlparse(got.store).netloc == created_bucket(), got.store
        assert got.s3_endpoint, f"{service}: CAKE_STORE is on S3 but CAKE_S3_ENDPOINT is unset"
        assert host_of(got.s3_endpoint) in services()
        env = environment(service)
        assert env.get("AWS_ACCESS_KEY_ID") == minio_env["MINIO_ROOT_USER"]
        assert env.get("AWS_SECRET_ACCESS_KEY") == minio_env["MINIO_ROOT_PASSWORD"]


# --- traces -------------------------------------------------------------------------------


def mounted_config(service: str, flag: str) -> dict[str, Any]:
    """A service's YAML config as it mounts it (`FLAG=PATH` in its command), parsed."""
    command = words(services()[service].get("command"))
    path = next(w.split("=", 1)[1] for w in command if w.startswith(f"{flag}="))
    data = yaml.safe_load(mounted_file(service, path).read_text())
    assert isinstance(data, dict)
    return data


def collector_config() -> dict[str, Any]:
    """The collector's config as its service mounts it (--config=PATH)."""
    return mounted_config("otel-collector", "--config")


def test_services_send_traces_to_the_collectors_http_receiver() -> None:
    http = collector_config()["receivers"]["otlp"]["protocols"]["http"]
    http_port = int(str(http["endpoint"]).rsplit(":", 1)[1])
    for service in CAKE_SERVICES:
        endpoint = environment(service).get("OTEL_EXPORTER_OTLP_ENDPOINT")
        assert endpoint, f"{service} exports no traces"
        assert host_of(endpoint) == "otel-collector"
        assert (
            urlparse(endpoint).port == http_port
        )  # shared.runtime.observability exports OTLP/HTTP


def test_the_collector_exports_traces_to_jaeger() -> None:
    config = collector_config()
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    targets = set()
    for name in exporters:
        assert name.split("/")[0] in ("otlp", "otlp_grpc", "otlphttp", "otlp_http"), name
        endpoint = str(config["exporters"][name]["endpoint"])
        targets.add(host_of(endpoint if "://" in endpoint else f"grpc://{endpoint}"))
    assert "jaeger" in targets
    assert targets <= set(services())
    assert "16686:16686" in services()["jaeger"]["ports"]


# --- metrics ------------------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    """Prometheus's config as its service mounts it (--config.file=PATH)."""
    return mounted_config("prometheus", "--config.file")


def scrape_targets() -> dict[str, set[str]]:
    """Every scrape job's targets (host:port) and the path it scrapes."""
    found: dict[str, set[str]] = {}
    for job in prometheus_config()["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        assert job.get("scheme", "http") == "http", job["job_name"]
        targets = {t for static in job["static_configs"] for t in static["targets"]}
        found.setdefault(job["job_name"], set()).update(targets)
    return found


def metrics_address(service: str) -> str:
    """Where a service's container serves /metrics: the gateway on its API port, the others
    on CAKE_METRICS_PORT."""
    got = settings(service)
    port = got.port if service == "gateway" else got.metrics_port
    assert port, f"{service}: CAKE_METRICS_PORT is 0, nothing serves its metrics"
    return f"{service}:{port}"


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    targets = scrape_targets()
    for service in SERVICES:
        replicas = [s for s in CAKE_SERVICES if kind(s) == service]
        want = {metrics_address(s) for s in replicas}
        assert targets.get(service) == want, f"job {service}: {targets}"
        # reachable from another container: the metrics server listens on every interface
        assert settings(service).host == "0.0.0.0", f"{service} listens on localhost only"
    for job, addresses in targets.items():
        for address in addresses:
            assert address.rsplit(":", 1)[0] in services(), f"job {job} scrapes {address}"


# --- the image ----------------------------------------------------------------------------


def test_the_image_runs_the_cake_script_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.MULTILINE)
    assert entrypoint and json.loads(entrypoint[1]) == ["cake"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cake"] == "services.launcher.cli:main"
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_a_healthcheck_on_its_own_port(service: str) -> None:
    """The gateway is healthy when /health says a request would be served, the others while
    their metrics server answers; compose restarts a service that exits."""
    svc = services()[service]
    probe = " ".join(svc["healthcheck"]["test"])
    got = settings(service)
    if service == "gateway":
        assert f"localhost:{got.port}/health" in probe
    else:
        assert f"localhost:{got.metrics_port}/metrics" in probe
    assert svc["restart"] == "unless-stopped"
