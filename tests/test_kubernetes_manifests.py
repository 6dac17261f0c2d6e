"""The Kubernetes manifests under deploy/kubernetes, checked offline: no cluster, no kustomize.

Every manifest is validated, strictly (an unknown field is an error), against the API schemas of
one Kubernetes version, :data:`K8S_VERSION`, which kubernetes-validate ships. The kustomizations
are rendered by :func:`render`, a small stand-in for ``kustomize build`` that knows only the
fields these kustomizations use (and fails on any other), so that what an overlay produces is
validated and checked too: the shard count, the URL list that goes with it, the references
between objects, and the settings an operator relies on.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from optserver.sharding import TOKEN_PATTERN

# The one Kubernetes version whose API schemas the manifests must satisfy.
K8S_VERSION = "1.34"

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.parent for path in (BASE / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
KUSTOMIZATION_FILE = "kustomization.yaml"
IMAGE = "optserver:latest"
APP_UID = 10001
PORT = 8000

# The worker's shell command, exactly: the options of create-session and worker it relies on.
WORKER_SCRIPT = (
    'optserver create-session --url "$OPTSERVER_URLS" --admin-key "$OPTSERVER_ADMIN_KEY" '
    '--session-id train --token "$OPTSERVER_SESSION_TOKEN" --workers 3 --exist-ok '
    '&& exec optserver worker --url "$OPTSERVER_URLS" --session train '
    '--token "$OPTSERVER_SESSION_TOKEN" --epochs 30 --log json'
)

Obj = dict[str, Any]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def load_documents(path: Path) -> list[Obj]:
    """The YAML documents of a file, empty ones left out; each must be a mapping."""
    documents: list[Obj] = []
    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if document is None:
            continue
        assert isinstance(document, dict), f"{relative(path)}: a document that is not a mapping"
        documents.append(document)
    return documents


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/kubernetes but the kustomizations themselves."""
    files = [*BASE.rglob("*.yaml"), *BASE.rglob("*.yml")]
    return sorted(path for path in files if path.name != KUSTOMIZATION_FILE)


MANIFESTS = manifest_files()


def validate(document: Obj) -> None:
    """Validate against :data:`K8S_VERSION`'s schemas, strictly; raises when invalid."""
    validated = kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    # kubernetes-validate falls back to the newest older version it has: not here.
    assert validated == K8S_VERSION


# ---------------------------------------------------------------------------------------------
# A small stand-in for `kustomize build`


# What render() understands. Any other field fails the test instead of being silently ignored.
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "secretGenerator",
    "replicas",
    "patches",
}
SCALABLE_KINDS = {"Deployment", "ReplicaSet", "ReplicationController", "StatefulSet"}


def kustomization(directory: Path) -> Obj:
    path = directory / KUSTOMIZATION_FILE
    assert path.is_file(), f"{relative(directory)} has no {KUSTOMIZATION_FILE}"
    (data,) = load_documents(path)
    assert data.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", relative(path)
    assert data.get("kind") == "Kustomization", relative(path)
    unknown = set(data) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{relative(path)}: render() does not know {sorted(unknown)}"
    return data


def resource_paths(directory: Path) -> list[Path]:
    """The `resources` of a kustomization, each one checked to exist."""
    paths: list[Path] = []
    for entry in kustomization(directory).get("resources", []):
        assert isinstance(entry, str), f"{relative(directory)}: resource {entry!r}"
        path = (directory / entry).resolve()
        assert path.exists(), f"{relative(directory)}: resource {entry} does not exist"
        if path.is_dir():
            assert (path / KUSTOMIZATION_FILE).is_file(), f"{entry}: a directory, no kustomization"
        paths.append(path)
    return paths


def merge_patch(target: Obj, patch: Obj, where: str) -> None:
    """A strategic merge patch made of mappings only (lists would merge by their own rules)."""
    for key, value in patch.items():
        assert not isinstance(value, list), f"{where}.{key}: render() merges no lists"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value, f"{where}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def named(objects: list[Obj], kind: str, name: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]


def render(directory: Path) -> list[Obj]:
    """The objects a kustomization produces, as `kustomize build` would, but for the hash suffix
    it appends to generated names (references keep the plain names here)."""
    spec = kustomization(directory)
    objects: list[Obj] = []
    for path in resource_paths(directory):
        objects += render(path) if path.is_dir() else load_documents(path)
    for generator in spec.get("secretGenerator", []):
        assert set(generator) <= {"name", "literals"}, f"secretGenerator fields {set(generator)}"
        data: dict[str, str] = {}
        for literal in generator["literals"]:
            key, equals, value = literal.partition("=")
            assert equals, f"secretGenerator {generator['name']}: {literal!r} is not key=value"
            data[key] = base64.b64encode(value.encode()).decode()
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "type": "Opaque",
                "data": data,
            }
        )
    for entry in spec.get("patches", []):
        assert set(entry) <= {"path", "target"}, f"patch fields {set(entry)}"
        (patch,) = load_documents(directory / entry["path"])
        target = entry.get("target", {"kind": patch["kind"], "name": patch["metadata"]["name"]})
        assert set(target) <= {"kind", "name"}, f"patch target fields {set(target)}"
        assert (patch["kind"], patch["metadata"]["name"]) == (target["kind"], target["name"])
        matches = named(objects, target["kind"], target["name"])
        assert len(matches) == 1, f"patch {entry['path']} matches {len(matches)} objects"
        assert matches[0]["apiVersion"] == patch["apiVersion"]
        merge_patch(matches[0], patch, entry["path"])
    for replicas in spec.get("replicas", []):
        matches = [
            o
            for o in objects
            if o["kind"] in SCALABLE_KINDS and o["metadata"]["name"] == replicas["name"]
        ]
        assert len(matches) == 1, f"replicas {replicas['name']} names {len(matches)} objects"
        assert isinstance(replicas["count"], int)
        matches[0]["spec"]["replicas"] = replicas["count"]
    if "namespace" in spec:
        for o in objects:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = spec["namespace"]
    return objects


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    matches = [o for o in objects if o["kind"] == kind]
    if name is not None:
        matches = named(matches, kind, name)
    assert len(matches) == 1, f"{len(matches)} objects of kind {kind} named {name}"
    return matches[0]


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) of every object with a pod template."""
    for o in objects:
        template = o.get("spec", {}).get("template")
        if template is not None:
            yield o, template["spec"]


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env(container: Obj) -> dict[str, Obj]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def shard_urls(objects: list[Obj]) -> list[str]:
    urls = one(objects, "ConfigMap", "optserver-shards")["data"]["OPTSERVER_URLS"]
    assert isinstance(urls, str)
    return urls.split(",")


def ids(directories: list[Path]) -> list[str]:
    return [relative(directory) for directory in directories]


# ---------------------------------------------------------------------------------------------
# Schema validation


def test_the_manifests_are_found() -> None:
    names = {relative(path) for path in MANIFESTS}
    for name in ("statefulset", "service", "configmap", "job", "namespace"):
        assert f"deploy/kubernetes/{name}.yaml" in names
    assert OVERLAYS, "no overlay under deploy/kubernetes/overlays"


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_manifest_is_valid(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{relative(path)} holds no object"
    for document in documents:
        validate(document)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_rendered_objects_are_valid(directory: Path) -> None:
    objects = render(directory)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    for o in objects:
        validate(o)


def statefulset_document() -> Obj:
    (document,) = load_documents(BASE / "statefulset.yaml")
    return document


def misspell_service_name(s: Obj) -> None:
    s["spec"]["servicename"] = s["spec"].pop("serviceName")


def replicas_as_text(s: Obj) -> None:
    s["spec"]["replicas"] = "two"


def misspell_probe_path(s: Obj) -> None:
    probe = s["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["pth"] = probe["httpGet"].pop("path")


def unknown_claim_field(s: Obj) -> None:
    s["spec"]["volumeClaimTemplates"][0]["spec"]["size"] = "10Gi"


def env_value_as_list(s: Obj) -> None:
    s["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = ["/data"]


@pytest.mark.parametrize(
    ("breakage", "where"),
    [
        (misspell_service_name, "spec"),  # unknown fields are errors (strict)
        (replicas_as_text, "spec.replicas"),
        (misspell_probe_path, "spec.template.spec.containers.0.readinessProbe.httpGet"),
        (unknown_claim_field, "spec.volumeClaimTemplates.0.spec"),
        (env_value_as_list, "spec.template.spec.containers.0.env.0.value"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_a_broken_statefulset_is_refused(breakage: Callable[[Obj], None], where: str) -> None:
    document = statefulset_document()
    validate(document)
    breakage(document)
    with pytest.raises(kubernetes_validate.ValidationError) as refused:
        validate(document)
    assert ".".join(str(step) for step in refused.value.path) == where


# ---------------------------------------------------------------------------------------------
# The kustomizations


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_kustomization_resources_exist(directory: Path) -> None:
    paths = resource_paths(directory)
    assert paths
    if directory != BASE:
        assert BASE in paths, f"{relative(directory)} does not build on {relative(BASE)}"
    for entry in kustomization(directory).get("patches", []):
        assert (directory / entry["path"]).is_file(), f"patch {entry['path']} does not exist"


def test_every_manifest_is_used() -> None:
    used: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        used.update(path for path in resource_paths(directory) if path.is_file())
        used.update(
            (directory / entry["path"]).resolve()
            for entry in kustomization(directory).get("patches", [])
        )
    unused = [relative(path) for path in MANIFESTS if path.resolve() not in used]
    assert not unused, f"in no kustomization: {unused}"


def test_the_base_has_its_namespace() -> None:
    namespace = kustomization(BASE)["namespace"]
    assert namespace == "optserver"
    assert one(render(BASE), "Namespace")["metadata"]["name"] == namespace


@pytest.mark.parametrize(
    ("directory", "shards"),
    [(BASE, 2), (BASE / "overlays" / "four-shards", 4)],
    ids=["base", "four-shards"],
)
def test_shard_count(directory: Path, shards: int) -> None:
    objects = render(directory)
    assert one(objects, "StatefulSet", "optserver")["spec"]["replicas"] == shards
    assert shard_urls(objects) == [f"http://optserver-{i}.optserver:8000" for i in range(shards)]


@pytest.mark.parametrize("directory", OVERLAYS, ids=ids(OVERLAYS))
def test_overlay_urls_follow_its_replicas(directory: Path) -> None:
    spec = kustomization(directory)
    objects = render(directory)
    statefulset = one(objects, "StatefulSet")
    (count,) = [
        r["count"] for r in spec["replicas"] if r["name"] == statefulset["metadata"]["name"]
    ]
    name = statefulset["metadata"]["name"]
    service = statefulset["spec"]["serviceName"]
    assert shard_urls(objects) == [f"http://{name}-{i}.{service}:{PORT}" for i in range(count)]


# ---------------------------------------------------------------------------------------------
# What an operator relies on, in every rendering


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_the_shards_have_stable_names(directory: Path) -> None:
    objects = render(directory)
    statefulset = one(objects, "StatefulSet", "optserver")
    service = one(objects, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_the_shard_server(directory: Path) -> None:
    statefulset = one(render(directory), "StatefulSet", "optserver")
    pod = statefulset["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["command"] == ["optserver", "serve", "--host", "0.0.0.0", "--port", str(PORT)]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"http": PORT}

    def probe(kind: str) -> tuple[str, int]:
        get = server[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/readyz", PORT)
    assert probe("livenessProbe") == ("/healthz", PORT)
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert env(server)["OPTSERVER_LOG_LEVEL"]["value"] == "warning"

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["fsGroup"] == APP_UID


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_the_data_directory_is_persistent(directory: Path) -> None:
    statefulset = one(render(directory), "StatefulSet", "optserver")
    (server,) = statefulset["spec"]["template"]["spec"]["containers"]
    data_dir = env(server)["OPTSERVER_DATA_DIR"]["value"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = [m for m in server["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert [m["mountPath"] for m in mounts] == [data_dir]
    assert "volumes" not in statefulset["spec"]["template"]["spec"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_every_container_has_resources(directory: Path) -> None:
    workloads = list(pod_templates(render(directory)))
    assert {workload["kind"] for workload, _ in workloads} == {"StatefulSet", "Job"}
    for workload, pod in workloads:
        for container in containers(pod):
            where = f"{workload['kind']} {workload['metadata']['name']}: {container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert set(resources.get(bound, {})) >= {"cpu", "memory"}, f"{where}: {bound}"
            assert container["image"] == IMAGE, where
            assert container["imagePullPolicy"] == "IfNotPresent", where


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_references_resolve(directory: Path) -> None:
    """Every secretKeyRef and configMapKeyRef names an object of the rendering, and a key of it."""
    objects = render(directory)
    for workload, pod in pod_templates(objects):
        for container in containers(pod):
            for entry in container.get("env", []):
                source = entry.get("valueFrom", {})
                for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if ref in source:
                        target = one(objects, kind, source[ref]["name"])
                        where = f"{workload['metadata']['name']}: {entry['name']}"
                        assert source[ref]["key"] in target["data"], where


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_credentials_come_from_secrets(directory: Path) -> None:
    expected = {
        "OPTSERVER_ADMIN_KEY": ("optserver-admin", "admin-key"),
        "OPTSERVER_SESSION_TOKEN": ("optserver-session", "token"),
    }
    seen: set[str] = set()
    for _, pod in pod_templates(render(directory)):
        for container in containers(pod):
            for name, entry in env(container).items():
                if re.search(r"KEY|TOKEN|PASSWORD|SECRET", name):
                    assert "value" not in entry, f"{container['name']}: {name} is a literal"
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) == expected[name]
                    seen.add(name)
    assert seen == set(expected)


def test_shipped_secrets_are_placeholders() -> None:
    """The repository holds placeholders, never real credentials; the token is a valid one."""
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
        for o in render(BASE)
        if o["kind"] == "Secret"
    }
    assert set(secrets) == {"optserver-admin", "optserver-session"}
    for data in secrets.values():
        for value in data.values():
            assert "change-me" in value, "a real secret in deploy/kubernetes: use a placeholder"
    token = secrets["optserver-session"]["token"]
    assert re.fullmatch(TOKEN_PATTERN, token), f"{token!r} does not match {TOKEN_PATTERN}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_the_training_job(directory: Path) -> None:
    objects = render(directory)
    job = one(objects, "Job", "optserver-train")
    spec = job["spec"]
    assert (spec["parallelism"], spec["completions"], spec["completionMode"]) == (3, 3, "Indexed")
    assert 1 <= spec["backoffLimit"] <= 10
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (worker,) = pod["containers"]
    assert worker["command"][:2] == ["sh", "-c"]
    (script,) = worker["command"][2:]
    assert script == WORKER_SCRIPT
    assert f"--workers {spec['parallelism']}" in script
    for container in containers(pod):
        urls = env(container)["OPTSERVER_URLS"]
        assert "value" not in urls
        ref = urls["valueFrom"]["configMapKeyRef"]
        assert (ref["name"], ref["key"]) == ("optserver-shards", "OPTSERVER_URLS")
