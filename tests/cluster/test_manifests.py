"""cluster/: every manifest parses and names real code, real presets and real config keys; the KubeRay specs have
the fields the deployment relies on; the Serve configs pass Serve's schema; the launcher YAML passes Ray's own
launcher schema. Offline and fast: no Ray cluster, no Kubernetes, no AWS call."""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

from mlcls_ray.config import SCHEMA, list_presets, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE_DIR = "/home/ray/app"  # cluster/Dockerfile's WORKDIR; jobs/ is copied into it
PYTHON = "/home/ray/anaconda3/bin/python"  # the interpreter of the rayproject/ray base image
IMAGE = "mlcls-ray:<git-sha>"  # the placeholder image name and tag, same in every file
MIN_DRIVER = {"13.0": 580}  # the NVIDIA driver a torch CUDA build needs (CUDA 13.0: 580); a torch upgrade adds a row
MODEL_DIR = "s3://bucket/runs/x/best_model"


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _docs(path: Path) -> list:
    """The documents of a YAML file (a fresh copy each call: tests may change them)."""
    return copy.deepcopy(list(_parsed(path)))


def _kind(kind: str) -> dict[str, dict]:
    found = {p.name: d for p in sorted(CLUSTER.glob("*.yaml")) for d in _docs(p)
             if isinstance(d, dict) and d.get("kind") == kind}
    assert found, f"no {kind} under cluster/"
    return found


def _cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec: the RayCluster's own, each RayJob's rayClusterSpec, the RayService's rayClusterConfig."""
    specs = {n: d["spec"] for n, d in _kind("RayCluster").items()}
    specs |= {n: d["spec"]["rayClusterSpec"] for n, d in _kind("RayJob").items()}
    specs |= {n: d["spec"]["rayClusterConfig"] for n, d in _kind("RayService").items()}
    return specs


def _pods(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
        [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]


def _gpus(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


def _serve_configs() -> dict[str, dict]:
    configs = {"serve.yaml": yaml.safe_load((CLUSTER / "serve.yaml").read_text())}
    for name, doc in _kind("RayService").items():
        text = doc["spec"]["serveConfigV2"]
        assert isinstance(text, str), f"{name}: serveConfigV2 must be a string (the Serve YAML), not a mapping"
        configs[name] = yaml.safe_load(text)
    return configs


# --- every file ----------------------------------------------------------------------------------------------

def test_every_yaml_parses_and_kubernetes_files_are_ray_io_v1():
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
    names = {p.name for p in files}
    assert {"kuberay-raycluster.yaml", "kuberay-rayjob-train.yaml", "kuberay-rayjob-label.yaml",
            "kuberay-rayservice.yaml", "kuberay-rayjob-check-dataset.yaml", "aws-cluster.yaml",
            "serve.yaml"} <= names
    for path in files:
        docs = _docs(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            if path.name.startswith("kuberay-"):
                assert doc["apiVersion"] == "ray.io/v1", path.name
                assert doc["kind"] in ("RayCluster", "RayJob", "RayService"), path.name
                assert doc["metadata"]["name"], path.name


def test_image_is_the_dockerfiles_and_matches_our_ray_and_python():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base.startswith(f"rayproject/ray:{ray.__version__}-{py}"), (base, ray.__version__, py)
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        for group, pod in _pods(spec):
            for c in pod["containers"]:
                assert c["image"].rsplit("/", 1)[-1] == IMAGE, (name, group, c["image"])
    aws = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    assert aws["docker"]["image"].rsplit("/", 1)[-1] == IMAGE


def test_no_instruction_names_a_mutable_tag():
    """A pod pulls IfNotPresent, so a reused tag keeps the old image on a node after a rebuild: the manifests name the
    commit's tag (IMAGE, checked above), and no file or instruction builds or names a reused one."""
    texts = [*sorted(CLUSTER.iterdir()), ROOT / "README.md"]
    mutable = [(p.name, m) for p in texts for m in re.findall(r"mlcls-ray:(?:latest|<tag>)\b", p.read_text())]
    assert mutable == []


def test_base_image_and_driver_match_the_pinned_torch():
    """torch's wheels bring their own CUDA runtime: the base image is of the same CUDA version, every file that speaks
    of the nodes names the driver that version needs, and the documented GPU node check prints what it should."""
    import torch

    cuda = torch.version.cuda  # of the pinned wheel: the venv holds the torch the image installs
    assert cuda in MIN_DRIVER, f"torch is built for CUDA {cuda}: add its minimum NVIDIA driver to MIN_DRIVER"
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in (CLUSTER / "Dockerfile", CLUSTER / "aws-cluster.yaml",
                                                               CLUSTER / "README.md", ROOT / "README.md")}
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", texts["cluster/Dockerfile"], re.M).group(1)
    assert base.endswith("-cu" + cuda.replace(".", "")), (base, cuda)
    for name, text in texts.items():
        assert f"driver >= {MIN_DRIVER[cuda]}" in text, f"{name}: say which NVIDIA driver the image needs"
        assert set(re.findall(r"CUDA (\d+\.\d+)", text)) <= {cuda}, f"{name}: names another CUDA version"
    check = re.search(r"--entrypoint-num-gpus 1 -- python -c \"([^\"]+)\"", texts["cluster/README.md"]).group(1)
    for part in ("torch.cuda.is_available()", "torch.version.cuda", "torch.backends.cudnn.version()"):
        assert part in check, part
    compile(check, "the GPU node check", "exec")


# --- KubeRay cluster specs -----------------------------------------------------------------------------------

def test_token_auth_comes_with_the_operator_check():
    """KubeRay < 1.5.1 drops authOptions without an error and leaves the dashboard open: the steps check the CRD."""
    check = "kubectl explain raycluster.spec.authOptions"
    assert all(spec["authOptions"]["mode"] == "token" for spec in _cluster_specs().values())
    for path in (ROOT / "README.md", CLUSTER / "README.md", CLUSTER / "kuberay-raycluster.yaml"):
        text = path.read_text()
        assert check in text, f"{path.relative_to(ROOT)}: tell the operator to run `{check}`"
        assert not re.search(r"KubeRay >= 1\.5(?!\.1)\b", text), f"{path.relative_to(ROOT)}: authOptions needs 1.5.1"


@pytest.mark.parametrize("name", sorted(_cluster_specs()))
def test_cluster_spec_layout(name):
    spec = _cluster_specs()[name]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: the head must run no tasks"
    assert spec["enableInTreeAutoscaling"] is True, name
    assert spec["autoscalerOptions"]["version"] == "v2", name
    for group, pod in _pods(spec):
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        shm = [n for n, p in mounts.items() if p == "/dev/shm"]
        assert shm, f"{name}/{group}: /dev/shm is not mounted"
        volume = next(v for v in pod["volumes"] if v["name"] == shm[0])
        assert volume["emptyDir"]["medium"] == "Memory", f"{name}/{group}"
        assert volume["emptyDir"].get("sizeLimit"), f"{name}/{group}: size /dev/shm"
        for c in pod["containers"]:
            assert {"name": "mlcls-aws"} in [e.get("secretRef") for e in c.get("envFrom", [])], \
                f"{name}/{group}: S3 credentials come from the mlcls-aws Secret"
    assert _gpus(spec["headGroupSpec"]["template"]["spec"]) == 0, f"{name}: a GPU on the head is wasted"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group["groupName"])


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob-train.yaml",
                                  "kuberay-rayjob-label.yaml", "kuberay-rayservice.yaml"])
def test_gpu_group_has_gpu_limits_and_toleration(name):
    spec = _cluster_specs()[name]
    gpu = [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]) > 0]
    assert gpu, f"{name}: no worker group with an nvidia.com/gpu limit"
    for g in gpu:
        pod = g["template"]["spec"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (name, g["groupName"])
        for c in pod["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob-train.yaml",
                                  "kuberay-rayjob-label.yaml", "kuberay-rayjob-check-dataset.yaml"])
def test_cpu_group_for_decode(name):
    spec = _cluster_specs()[name]
    assert [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]) == 0], \
        f"{name}: no CPU-only worker group for Ray Data decode"


# --- RayJobs -------------------------------------------------------------------------------------------------

def _entrypoint(doc: dict) -> tuple[str, str, list[str]]:
    """(entry point file, -c value, -o values) of a RayJob's entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == PYTHON, f"the entrypoint runs on the head: use the image's interpreter {PYTHON}"
    preset, overrides = None, []
    for flag, value in zip(argv[2::2], argv[3::2]):
        assert flag in ("-c", "-o"), f"unexpected argument {flag!r} in {argv}"
        if flag == "-c":
            preset = value
        else:
            overrides.append(value)
    assert len(argv) % 2 == 0 and preset, argv
    return argv[1], preset, overrides


def _job_mode(script: Path) -> str:
    return re.search(r'"Global\.mode=(\w+)"', script.read_text()).group(1)


@pytest.mark.parametrize("name", sorted(_kind("RayJob")))
def test_rayjob_entrypoint_names_real_code_presets_and_keys(name):
    script, preset, overrides = _entrypoint(_kind("RayJob")[name])
    assert script.startswith(f"{IMAGE_DIR}/jobs/"), f"{script}: jobs/ lives at {IMAGE_DIR}/jobs in the image"
    local = ROOT / script.removeprefix(f"{IMAGE_DIR}/")
    assert local.is_file(), f"{script}: no {local.relative_to(ROOT)}"
    assert preset in list_presets() or preset.endswith("_ML"), preset
    for text in overrides:
        key, sep, value = text.partition("=")
        assert sep and key in SCHEMA, f"-o {text}: {key!r} is not a config key"
        if key.endswith(("dataset_dir", "output", "model_dir", "input")):
            assert value.startswith("s3://"), f"-o {text}: on a cluster, paths must be on shared storage"
    # the whole command line, as the job runs it (its Global.mode appended), is a valid config
    cfg = load_config(preset, [*overrides, f"Global.mode={_job_mode(local)}"], check_paths=False)
    assert cfg["Global.mode"] == _job_mode(local)


@pytest.mark.parametrize("name", sorted(_kind("RayJob")))
def test_rayjob_lifecycle(name):
    spec = _kind("RayJob")[name]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, name
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0, name
    assert "rayClusterSpec" in spec, name


def test_train_job_uses_gpu_workers_it_can_get_and_a_retry_resumes():
    doc = _kind("RayJob")["kuberay-rayjob-train.yaml"]
    script, _, overrides = _entrypoint(doc)
    assert script.endswith("/jobs/train.py")
    o = dict(t.split("=", 1) for t in overrides)
    assert o["Global.device"] == "gpu"
    # a retried attempt runs the same entrypoint: auto resumes it, and starts the first attempt afresh (latest
    # would fail the first attempt, which has no checkpoint yet)
    assert o.get("Train.resume_path") == "auto"
    assert int(o["Train.max_failures"]) >= 1, "node loss should be survived inside the run"
    gpu = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g["template"]["spec"])]
    assert int(o["Train.num_workers"]) <= sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in gpu)
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "600"
    # and the file says so: no comment may promise an operator that a retry starts over
    comments = [line for line in (CLUSTER / "kuberay-rayjob-train.yaml").read_text().splitlines() if "#" in line]
    wrong = [c for c in comments if re.search(r"epoch 0|from scratch|starts? over|from the start", c, re.I)]
    assert wrong == [], wrong


def test_label_job_writes_s3_and_its_actors_fit_the_gpu_group():
    doc = _kind("RayJob")["kuberay-rayjob-label.yaml"]
    script, _, overrides = _entrypoint(doc)
    assert script.endswith("/jobs/label.py")
    o = dict(t.split("=", 1) for t in overrides)
    assert o["Label.input"].startswith("s3://") and o["Label.output"].startswith("s3://")
    gpu = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if _gpus(g["template"]["spec"])]
    assert int(o["Label.concurrency"]) <= sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in gpu)


# --- Serve ---------------------------------------------------------------------------------------------------

def test_rayservice_serves_the_same_app_as_serve_yaml():
    configs = _serve_configs()
    ours = configs.pop("serve.yaml")
    for name, config in configs.items():
        assert config == ours, f"{name}: serveConfigV2 differs from cluster/serve.yaml"


@pytest.mark.parametrize("name", sorted(_serve_configs()))
def test_serve_config_validates_and_builds(name):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from mlcls_ray.infer.serve_settings import ServeSettings

    config = _serve_configs()[name]
    ServeDeploySchema.model_validate(config)  # raises on a bad field or value
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder), app["import_path"]
        args = {**app["args"], "model_dir": app["args"].get("model_dir") or MODEL_DIR}
        settings = ServeSettings.from_args(args)
        assert settings.on_gpu, f"{name}: the endpoint is meant to run on GPU replicas"
        built = builder(args)  # binds the deployment; no model is read, no Serve started
        assert isinstance(built, Application)
        deployed = built._bound_deployment.name
        for d in app.get("deployments", []):
            assert d["name"] == deployed, f"{name}: deployment {d['name']!r} is not in the app ({deployed!r})"
            # Serve's own check of the autoscaling fields (ServeDeploySchema keeps them as a plain dict)
            auto = AutoscalingConfig(**d["autoscaling_config"])
            assert auto.min_replicas >= 1, f"{name}: keep one replica warm, or the first request waits for a GPU pod"
            assert d["ray_actor_options"]["num_gpus"] == 1, name
            assert d["max_ongoing_requests"] >= 2 * d["user_config"]["max_batch_size"], name


def test_serve_validation_can_fail():
    from ray.serve.schema import ServeDeploySchema

    from mlcls_ray.infer.serve_settings import ServeSettings

    from pydantic import ValidationError

    from ray.serve.config import AutoscalingConfig

    config = copy.deepcopy(_serve_configs()["serve.yaml"])
    deployment = config["applications"][0]["deployments"][0]
    deployment["max_ongoing_requests"] = -1
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(config)
    with pytest.raises(ValidationError, match="max_replicas"):
        AutoscalingConfig(**{**deployment["autoscaling_config"], "min_replicas": 5, "max_replicas": 2})
    with pytest.raises(ValueError):
        ServeSettings.from_args({**config["applications"][0]["args"], "max_batch_sise": 8})


def test_rayservice_gpu_group_can_hold_every_replica():
    doc = _kind("RayService")["kuberay-rayservice.yaml"]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    needed = max(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"]
                 for a in config["applications"] for d in a["deployments"])
    floor = min(d["autoscaling_config"]["min_replicas"] for a in config["applications"] for d in a["deployments"])
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in groups) >= needed
    assert sum(g["minReplicas"] * _gpus(g["template"]["spec"]) for g in groups) >= floor


def test_rayservice_replicas_read_the_bearer_token_from_a_secret():
    """The endpoint listens on every interface: its app requires a token, and every pod that runs replicas gets the
    variable auth_token_env names from a Secret, never as a value written in the manifest."""
    doc = _kind("RayService")["kuberay-rayservice.yaml"]
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    name = app["args"]["auth_token_env"]
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            (env,) = [e for e in c.get("env", []) if e["name"] == name]
            assert set(env) == {"name", "valueFrom"} and "secretKeyRef" in env["valueFrom"], (group["groupName"], env)


# --- AWS launcher --------------------------------------------------------------------------------------------

def _launcher_validate(config: dict) -> dict:
    """What `ray up` does before it calls AWS: fill in the defaults, then Ray's JSON-schema check. (`ray up` also
    asks AWS for the instance types' resources in between; that is left out here.)"""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_launcher_yaml_validates():
    config = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    prepared = _launcher_validate(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"], "a spot head takes the cluster down with it"
    gpu = [t for n, t in types.items() if n != prepared["head_node_type"] and t["node_config"]["InstanceType"]
           .startswith(("g4", "g5", "g6", "p3", "p4", "p5"))]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    # /dev/shm holds the object store: one fixed size for every node type would cap it on the larger ones, so the
    # launcher sizes it per node from the node's memory (it does so when no run option names --shm-size)
    docker = [prepared["docker"], *(t.get("docker", {}) for t in types.values())]
    options = [o for d in docker for key in ("run_options", "head_run_options", "worker_run_options")
               for o in d.get(key, [])]
    assert not [o for o in options if "--shm-size" in o], options
    assert not prepared["docker"].get("disable_shm_size_detection")
    assert prepared["setup_commands"] == [], "everything comes from the image"


def test_aws_launcher_validation_can_fail():
    from jsonschema import ValidationError

    config = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    with pytest.raises(ValidationError):
        _launcher_validate({**config, "no_such_field": 1})
    with pytest.raises(ValueError):
        _launcher_validate({**config, "head_node_type": "no.such.type"})
