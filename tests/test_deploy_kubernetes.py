"""Static checks of the Kubernetes manifests in deploy/kubernetes.

No cluster here: every manifest is validated offline against the Kubernetes OpenAPI schemas that
the `kubernetes-validate` package bundles (strict: an unknown field fails), the KEDA objects
against a schema of the fields KEDA documents (written below; the HPA behavior they carry is
checked with Kubernetes' own schema), and everything is held to the code it deploys: each
`sumfleet ...` command line parses with the real CLI parser, each SUMFLEET_* value is valid
Settings, the worker probe is docker-compose.yml's, and each ScaledObject's query reads real
columns and states of `batches` for the model its Deployment serves.
(tests/test_deploy_fleet.py runs that query and the probe against the real services.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version  # type: ignore[import-untyped]

from models.settings import Settings
from models.states import BatchState
from models.tables import Batch
from tests.test_deploy import COMPOSE, MODEL_VOLUME, parse_sumfleet

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests are written for, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.28", latest_version())
KEDA_API = "keda.sh/v1alpha1"
IMAGE_USER = 10001  # the Dockerfile's USER
CACHE_VARIABLES = ("HF_HOME", "XDG_CACHE_HOME", "SUMFLEET_CACHE_DIR", "SUMFLEET_ADAPTER_DIR")
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet")


# --- loading ------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(`file#index kind/name`, object) for every object of every manifest."""
    found = []
    for path in manifest_files():
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: document {index} is not a mapping"
            label = f"{path.relative_to(KUBERNETES)}#{index} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            found.append((label, doc))
    return found


MANIFESTS = load_manifests()
KUBERNETES_OBJECTS = [(label, doc) for label, doc in MANIFESTS if doc.get("apiVersion") != KEDA_API]
KEDA_OBJECTS = [(label, doc) for label, doc in MANIFESTS if doc.get("apiVersion") == KEDA_API]


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in MANIFESTS if doc.get("kind") == kind}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def sumfleet_argv(container: dict[str, Any]) -> list[str] | None:
    """The `sumfleet` argv a container runs (the image's ENTRYPOINT is `sumfleet`), or None."""
    if not str(container.get("image", "")).split("/")[-1].startswith("sumfleet:"):
        return None
    command, args = container.get("command"), list(container.get("args", []))
    if command is None:
        return args
    return [*command[1:], *args] if command[:1] == ["sumfleet"] else None


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom), then `env` (literal values only)."""
    env: dict[str, str] = {}
    configmaps = objects("ConfigMap")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def secret_data(name: str) -> dict[str, str]:
    secret = objects("Secret")[name]
    return dict(secret.get("stringData", {}))


def worker_deployments() -> dict[str, dict[str, Any]]:
    return {
        name: doc
        for name, doc in objects("Deployment").items()
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "worker"
    }


def worker_model(doc: dict[str, Any]) -> str:
    argv = sumfleet_argv(pod_spec(doc)["containers"][0])
    assert argv is not None, f"{doc['metadata']['name']} does not run the sumfleet image"
    model: str = parse_sumfleet(argv, doc["metadata"]["name"]).model
    return model


def compose_probe() -> str:
    probe = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["x-worker-probe"]
    assert isinstance(probe, str)
    return probe


# --- the Kubernetes schema ----------------------------------------------------------------------


def test_there_are_manifests_of_every_kind_asked_for() -> None:
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    wanted = {"Deployment", "Service", "Job", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    wanted |= {"ScaledObject", "TriggerAuthentication"}
    assert wanted <= kinds, f"deploy/kubernetes lacks {sorted(wanted - kinds)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("label", "doc"), KUBERNETES_OBJECTS, ids=[label for label, _ in KUBERNETES_OBJECTS])
def test_manifest_validates_against_the_kubernetes_schema(label: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{label} is not a valid {doc.get('kind')} for Kubernetes {version}: {path}: {error.message}")
    except SchemaNotFoundError as error:
        pytest.fail(f"{label}: {error.message}")


def test_the_kubernetes_validator_is_strict() -> None:
    """A misspelled field and a wrongly typed value both fail: the validation above means something."""
    deployment = next(doc for doc in worker_deployments().values())
    misspelled = yaml.safe_load(yaml.safe_dump(deployment))
    pod_spec(misspelled)["terminationGracePeriod"] = 600
    typed = yaml.safe_load(yaml.safe_dump(deployment))
    pod_spec(typed)["containers"][0]["resources"]["limits"]["memory"] = {"GiB": 16}
    for broken in (misspelled, typed):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, latest_version(), strict=True)


def test_each_kustomization_lists_every_manifest_beside_it() -> None:
    folders = sorted({path.parent for path in manifest_files()})
    for folder in folders:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
        listed = sorted(kustomization.get("resources", []))
        present = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        assert listed == present, f"{folder}/kustomization.yaml lists {listed}, the folder has {present}"
        assert kustomization.get("namespace") == "sumfleet"
    assert all("namespace" not in doc["metadata"] for _, doc in MANIFESTS), (
        "leave metadata.namespace out: kustomize (or kubectl -n) sets it"
    )


# --- KEDA: the fields it documents --------------------------------------------------------------

# keda.sh/v1alpha1 ScaledObject, as KEDA's "ScaledObject specification" documents it (2.x). The
# HPA behavior under advanced.horizontalPodAutoscalerConfig is Kubernetes' own type: it is checked
# with Kubernetes' schema (test_scaled_object_hpa_behavior_is_valid_for_kubernetes).
_INT = {"type": "integer", "minimum": 0}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_AUTHENTICATION_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": KEDA_API},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": _NAME,
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": _INT,
                        "behavior": {
                            "enum": ["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": _NAME, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "formula": {"type": "string"},
                                "target": {"type": "string"},
                                "activationTarget": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            # every metadata value is a string, numbers too ("1000")
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": _AUTHENTICATION_REF,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
# The `postgresql` scaler's trigger metadata (KEDA's PostgreSQL scaler page): a query returning a
# number, targetQueryValue (required), activationTargetQueryValue, and connection details unless a
# TriggerAuthentication gives them.
_NUMBER = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
POSTGRESQL_METADATA_SCHEMA = {
    "type": "object",
    "required": ["query", "targetQueryValue"],
    "additionalProperties": False,
    "properties": {
        "query": {"type": "string", "minLength": 1},
        "targetQueryValue": _NUMBER,
        "activationTargetQueryValue": _NUMBER,
        "connectionFromEnv": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "string"},
        "userName": {"type": "string"},
        "passwordFromEnv": {"type": "string"},
        "dbName": {"type": "string"},
        "sslmode": {"type": "string"},
    },
}
# The parameters a TriggerAuthentication may give the postgresql scaler.
POSTGRESQL_AUTH_PARAMETERS = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}
_TARGET_REFS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["parameter", "name", "key"],
        "additionalProperties": False,
        "properties": {"parameter": {"type": "string"}, "name": _NAME, "key": {"type": "string"}},
    },
}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": KEDA_API},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": _TARGET_REFS,
                "configMapTargetRef": _TARGET_REFS,
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "containerName": {"type": "string"},
                        },
                    },
                },
                "podIdentity": {"type": "object"},
            },
        },
    },
}
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA}


def keda_problems(doc: dict[str, Any]) -> list[str]:
    schema = KEDA_SCHEMAS.get(doc.get("kind", ""))
    if schema is None:
        return [f"{doc.get('kind')} is not a KEDA kind these manifests use ({sorted(KEDA_SCHEMAS)})"]
    validator = jsonschema.Draft202012Validator(schema)
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc["kind"] == "ScaledObject" and not problems:
        for index, trigger in enumerate(doc["spec"]["triggers"]):
            if trigger["type"] == "postgresql":
                metadata = jsonschema.Draft202012Validator(POSTGRESQL_METADATA_SCHEMA)
                problems += [
                    f"spec.triggers.{index}.metadata.{'.'.join(map(str, e.path))}: {e.message}"
                    for e in metadata.iter_errors(trigger["metadata"])
                ]
    return problems


@pytest.mark.parametrize(("label", "doc"), KEDA_OBJECTS, ids=[label for label, _ in KEDA_OBJECTS])
def test_keda_objects_use_only_the_fields_keda_documents(label: str, doc: dict[str, Any]) -> None:
    problems = keda_problems(doc)
    assert not problems, f"{label}: " + "; ".join(problems)


def test_the_keda_check_catches_misspelled_fields() -> None:
    scaled = next(doc for _, doc in KEDA_OBJECTS if doc["kind"] == "ScaledObject")
    for path, value in (
        (("spec", "minReplicas"), 0),  # the HPA's name, not KEDA's minReplicaCount
        (("spec", "triggers", 0, "metadata", "targetValue"), "5"),
        (("spec", "triggers", 0, "metadata", "targetQueryValue"), 5),  # not a string
        (("spec", "cooldownPeriod"), "300"),
    ):
        broken = yaml.safe_load(yaml.safe_dump(scaled))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert keda_problems(broken), f"the KEDA check accepted {'.'.join(map(str, path))} = {value!r}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_scaled_object_hpa_behavior_is_valid_for_kubernetes(version: str) -> None:
    """KEDA hands advanced.horizontalPodAutoscalerConfig.behavior to the HPA it makes: check it as one."""
    for name, scaled in objects("ScaledObject").items():
        behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is None:
            continue
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": f"keda-hpa-{name}"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": 1,
                "maxReplicas": scaled["spec"]["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        try:
            kubernetes_validate.validate(hpa, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"ScaledObject {name}: its HPA behavior is invalid: {error.message}")


# --- the manifests against the code -------------------------------------------------------------


def test_every_sumfleet_command_line_parses_with_the_cli() -> None:
    """Container args (the image's entry point is `sumfleet`) and the `sumfleet ...` examples in comments."""
    ran = 0
    for label, doc in MANIFESTS:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in containers(doc):
            argv = sumfleet_argv(container)
            assert argv is not None, f"{label}: container {container['name']} does not run sumfleet"
            parse_sumfleet(argv, f"{label} container {container['name']}")
            ran += 1
    assert ran >= 4, "expected the migration, the API and two worker containers"
    examples = 0
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            body = line.lstrip().lstrip("#")
            # examples are indented in their comment (`#   kubectl ...`), prose is not
            if not re.match(r"\s*#\s{2,}\S", line) or not re.search(r"(^\s*|\s--\s+)sumfleet\s+\S", body):
                continue
            tokens = shlex.split(body, comments=True)
            # `sumfleet` in command position: first on the line, or after `--` (kubectl exec ... -- sumfleet)
            at = [i for i, t in enumerate(tokens) if t == "sumfleet" and (i == 0 or tokens[i - 1] == "--")]
            if not at:
                continue  # `sumfleet` as a namespace or in prose
            argv = tokens[at[0] + 1 :]
            stops = [i for i, t in enumerate(argv) if t in ("|", ">", "&&", ";")]
            parse_sumfleet(argv[: stops[0]] if stops else argv, f"{path.relative_to(ROOT)}:{number}")
            examples += 1
    assert examples >= 1, "the manifests' comments show no `sumfleet ...` example"


def test_settings_given_to_the_pods_are_valid() -> None:
    """Each container's SUMFLEET_* values (ConfigMap, env) and the Secret's URLs make valid Settings."""
    secrets = objects("Secret")
    for label, doc in MANIFESTS:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in containers(doc):
            env = container_env(container)
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{label}: no Secret {ref['name']}"
                    data = secret_data(ref["name"])
                    assert ref["key"] in data, f"{label}: Secret {ref['name']} has no key {ref['key']}"
                    env[item["name"]] = data[ref["key"]]
            given = {k.removeprefix("SUMFLEET_").lower(): v for k, v in env.items() if k.startswith("SUMFLEET_")}
            unknown = sorted(k for k in given if k not in Settings.model_fields)
            assert not unknown, f"{label}: SUMFLEET_{unknown} are not settings"
            try:
                settings = Settings.model_validate(given)
            except ValueError as error:
                pytest.fail(f"{label} container {container['name']}: invalid settings: {error}")
            assert settings.database_url.startswith("postgresql+psycopg://"), f"{label}: no PostgreSQL URL"
            assert settings.broker_url.startswith("redis://"), f"{label}: no Redis URL"


def test_the_secret_gives_keda_the_same_database_as_sumfleet() -> None:
    data = secret_data("sumfleet-secrets")
    ours, keda = urlsplit(data["SUMFLEET_DATABASE_URL"]), urlsplit(data["keda-postgresql-connection"])
    assert ours.scheme == "postgresql+psycopg", "SUMFLEET_DATABASE_URL is SQLAlchemy's psycopg 3 URL"
    assert keda.scheme == "postgresql", "KEDA's connection is a libpq URL (its Go driver knows no +psycopg)"
    same = ("username", "password", "hostname", "port", "path")
    assert [getattr(ours, a) for a in same] == [getattr(keda, a) for a in same], (
        "KEDA's connection and SUMFLEET_DATABASE_URL must name the same database, user and password"
    )
    assert "sslmode" in parse_qs(keda.query), "give KEDA's connection an explicit sslmode"
    assert str(keda.hostname).endswith(".svc.cluster.local"), "KEDA connects from its own namespace: use the FQDN"


@pytest.mark.parametrize("name", sorted(worker_deployments()))
def test_worker_deployment(name: str) -> None:
    doc = worker_deployments()[name]
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    args = parse_sumfleet(sumfleet_argv(container) or [], name)
    assert args.command == "worker" and args.concurrency == 1, f"{name}: one `sumfleet worker` process per pod"
    model = args.model
    assert name == f"sumfleet-worker-{model}", f"{name} serves {model}: name it sumfleet-worker-{model}"
    labels = doc["metadata"]["labels"]
    assert labels.get("sumfleet/model") == model, f"{name}: label sumfleet/model should be {model}"
    assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    assert "replicas" not in doc["spec"], f"{name}: leave replicas to KEDA (re-applying would undo its scaling)"

    grace = spec.get("terminationGracePeriodSeconds", 30)
    assert grace >= 60, f"{name}: terminationGracePeriodSeconds {grace}; SIGTERM must let a generation batch finish"
    probe = compose_probe()
    assert container["readinessProbe"]["exec"]["command"] == ["python", "-c", probe], (
        f"{name}: readiness must run docker-compose.yml's worker probe"
    )
    assert container["livenessProbe"]["exec"]["command"] == ["python", "-c", probe, "live"], (
        f"{name}: liveness must run the worker probe with `live` (the process only)"
    )
    for kind in ("readinessProbe", "livenessProbe"):
        assert container[kind].get("timeoutSeconds", 1) >= 10, f"{name}: {kind} needs 10 s (it imports celery)"

    security = spec.get("securityContext", {})
    assert (security.get("runAsUser"), security.get("fsGroup")) == (IMAGE_USER, IMAGE_USER), (
        f"{name}: run as the image's user {IMAGE_USER}, with fsGroup {IMAGE_USER} so it can write the model volume"
    )
    env = container_env(container)
    limits = container["resources"].get("limits", {})
    if env.get("SUMFLEET_DEVICE") == "cuda":
        assert str(limits.get("nvidia.com/gpu")) == "1", f"{name}: a GPU worker asks for exactly one GPU"
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu")
        assert requested is None or str(requested) == "1"
        assert container["image"].endswith(":gpu"), f"{name}: GPU workers run the CUDA image sumfleet:gpu"
        assert grace >= 300, f"{name}: a GPU generation batch of long documents can take minutes"
    else:
        assert "nvidia.com/gpu" not in limits, f"{name}: a CPU worker asks for no GPU"
    assert limits.get("memory"), f"{name}: set a memory limit"


def test_the_grace_period_says_why() -> None:
    """The GPU worker's terminationGracePeriodSeconds comes with the reason (drain: one generation batch)."""
    text = (KUBERNETES / "worker-smollm2-gpu.yaml").read_text(encoding="utf-8")
    before = text.split("terminationGracePeriodSeconds:")[0].splitlines()[-8:]
    note = " ".join(line.strip().lstrip("#") for line in before if line.strip().startswith("#"))
    for words in ("SIGTERM", "generation batch", "back to the queue"):
        assert words in note, f"the note above terminationGracePeriodSeconds should say `{words}`: {note!r}"


def test_there_are_gpu_and_cpu_workers() -> None:
    devices = {
        name: container_env(pod_spec(doc)["containers"][0]).get("SUMFLEET_DEVICE")
        for name, doc in worker_deployments().items()
    }
    assert "cuda" in devices.values() and "cpu" in devices.values(), f"worker devices: {devices}"


def test_every_pod_that_names_models_mounts_the_model_volume_with_its_caches() -> None:
    """Workers load models, the API resolves their names: both see the volume, every cache on it."""
    claims = objects("PersistentVolumeClaim")
    deployments = objects("Deployment")
    for name in [*worker_deployments(), "sumfleet-api"]:
        spec = pod_spec(deployments[name])
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert MODEL_VOLUME in mounts, f"{name} must mount the model volume at {MODEL_VOLUME}"
        claim = volumes[mounts[MODEL_VOLUME]].get("persistentVolumeClaim", {}).get("claimName")
        assert claim in claims, f"{name}: {MODEL_VOLUME} must come from a PersistentVolumeClaim here, not {claim!r}"
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "workers on several nodes share the volume"
        env = container_env(container)
        for variable in CACHE_VARIABLES:
            assert env.get(variable, "").startswith(MODEL_VOLUME + "/"), (
                f"{name}: {variable} is {env.get(variable)!r}, not on the model volume"
            )


def test_api_deployment_and_service() -> None:
    api = objects("Deployment")["sumfleet-api"]
    (container,) = pod_spec(api)["containers"]
    args = parse_sumfleet(sumfleet_argv(container) or [], "sumfleet-api")
    assert (args.command, args.host) == ("api", "0.0.0.0"), f"the API must listen on 0.0.0.0: {args}"
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert args.port in ports.values(), f"the API listens on {args.port}, the container declares {ports}"

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return int(ports[port]) if isinstance(port, str) else int(port)

    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and port_of(container["livenessProbe"]) == (
        args.port
    ), "the API's liveness probe must GET /health"
    assert container["readinessProbe"]["httpGet"]["path"] in ("/ready", "/health")
    service = objects("Service")["sumfleet-api"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service must select the API's pods"
    target = service["spec"]["ports"][0]["targetPort"]
    assert (ports.get(target) if isinstance(target, str) else target) == args.port


def test_migration_job_runs_db_upgrade() -> None:
    (job,) = objects("Job").values()
    (container,) = pod_spec(job)["containers"]
    args = parse_sumfleet(sumfleet_argv(container) or [], "migration job")
    assert (args.command, args.action) == ("db", "upgrade")
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")


# --- KEDA against the workers and the schema ----------------------------------------------------


def backlog_query(model: str) -> str:
    """The query of the ScaledObject scaling `model`'s workers (tests/test_deploy_fleet.py runs it)."""
    for scaled in objects("ScaledObject").values():
        if scaled["metadata"].get("labels", {}).get("sumfleet/model") == model:
            (trigger,) = scaled["spec"]["triggers"]
            query: str = trigger["metadata"]["query"]
            return query
    raise AssertionError(f"no ScaledObject for model {model}")


@pytest.mark.parametrize("name", sorted(worker_deployments()))
def test_a_scaled_object_scales_each_worker_on_its_models_backlog_down_to_zero(name: str) -> None:
    model = worker_model(worker_deployments()[name])
    scaled = [doc for doc in objects("ScaledObject").values() if doc["spec"]["scaleTargetRef"]["name"] == name]
    assert len(scaled) == 1, f"Deployment {name} needs exactly one ScaledObject, has {len(scaled)}"
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0, f"{name}: minReplicaCount 0 lets KEDA scale an idle model to zero"
    assert spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql", f"{name}: scale on the database's counters, not {trigger['type']}"
    assert float(trigger["metadata"]["targetQueryValue"]) >= 1, "targetQueryValue is documents per worker"
    assert float(trigger["metadata"].get("activationTargetQueryValue", "0")) == 0, "any backlog wakes a worker"
    auth = objects("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] in POSTGRESQL_AUTH_PARAMETERS
    assert ref["key"] in secret_data(ref["name"]), f"TriggerAuthentication reads a key Secret {ref['name']} lacks"
    assert backlog_query(model) == trigger["metadata"]["query"]

    query = trigger["metadata"]["query"]
    assert re.search(rf"\bmodel\s*=\s*'{re.escape(model)}'", query), f"{name} serves {model}; its query: {query}"
    columns = set(Batch.__table__.columns.keys())
    used = set(re.findall(r"\b(jobs_[a-z]+|model|state)\b", query))
    assert used <= columns and {"jobs_queued", "jobs_running"} <= used, f"{query} reads columns batches lacks"
    assert re.search(r"\bFROM\s+batches\b", query, re.IGNORECASE)
    states = set(re.findall(r"'([a-z]+)'", query.split("state", 1)[1]))
    unfinished = {state.value for state in BatchState if not state.finished}
    assert states == unfinished, f"the query's batch states {states} should be the unfinished ones {unfinished}"
