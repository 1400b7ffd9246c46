"""cluster.yaml and platform/runtime_env.yaml, checked offline.

The cluster file goes through the same steps as `ray up` before it touches a cloud:
``prepare_config`` (merge with the GCP provider's bundled defaults.yaml, merge setup commands, check the docker
section, fill per-node-type min/max workers) and ``validate_config`` (Ray's ray-schema.json). Both are private
Ray APIs: pyproject pins Ray 2.60.*, the version checked here. Neither needs credentials or the network: for the
``gcp`` provider, prepare_config only reads ``ray/autoscaler/gcp/defaults.yaml``; the calls that reach Google
(``bootstrap_config``: IAM, SSH keys, subnets) run later in ``ray up`` and are not used here.

The rest checks what the platform relies on: a CPU-only head, GPU workers with 2 × A100, the project installed
on every node, token auth, the MLflow address, shared storage, and a dashboard reachable only through
`ray dashboard`'s SSH tunnel.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RUNTIME_ENV = ROOT / "platform" / "runtime_env.yaml"
DOCKERFILE = ROOT / "platform" / "Dockerfile"
SHARED = "/mnt/ct3dflow"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def _flags(command: str) -> dict:
    """``--key=value`` and ``--key value`` options of a shell command line."""
    out: dict = {}
    words = shlex.split(command)
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        if "=" in w:
            k, v = w[2:].split("=", 1)
        elif i + 1 < len(words) and not words[i + 1].startswith("-") and words[i + 1] not in ("&&", ";"):
            k, v = w[2:], words[i + 1]
        else:
            k, v = w[2:], True
        out[k] = v
    return out


def _ray_start(commands: list[str], head: bool) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, f"expected one `ray start` command, got {starts}"
    assert ("--head" in starts[0]) == head
    return starts[0]


def _env_exports(commands: list[str]) -> dict:
    """The ``export NAME=VALUE`` lines that setup_commands write to the nodes' environment file."""
    text = "\n".join(commands)
    return dict(re.findall(r"export ([A-Z_][A-Z0-9_]*)=([^'\s]+)", text))


def _torch_pin(text: str) -> str:
    m = re.search(r"torch==([0-9][0-9.]*)", text)
    assert m, "no torch==X.Y.Z pin found"
    return m.group(1)


# --------------------------------------------------------------------------------------------------------
def test_ray_schema_accepts_the_prepared_config(prepared):
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["cluster_name"] == "ct3dflow"
    assert prepared["cluster_synced_files"] == []  # validate_config insists on it; defaults fill it


def test_ray_schema_rejects_a_broken_config(raw):
    """The validation is real: a misspelt key or a wrong type fails it."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_a100x2"]["resorces"] = bad["available_node_types"]["gpu_a100x2"].pop(
        "resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["max_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_head_is_cpu_only(prepared):
    head_type = prepared["head_node_type"]
    head = prepared["available_node_types"][head_type]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 4
    assert head["max_workers"] == 0
    assert "guestAccelerators" not in head["node_config"]
    assert not head["node_config"]["machineType"].startswith(("a2-", "a3-", "g2-"))
    start = _ray_start(prepared["head_start_ray_commands"], head=True)
    assert _flags(start).get("num-gpus") == "0"


def test_gpu_workers_have_two_a100(prepared):
    head_type = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head_type}
    assert len(workers) == 1
    (name, node), = workers.items()
    assert node["resources"]["GPU"] == 2
    assert node["resources"]["accelerator_type:A100"] == 1  # the resource name Ray detects on A100 nodes
    assert node["node_config"]["machineType"] == "a2-highgpu-2g"  # 2 × A100 40 GB on GCP
    assert node["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"  # GPU VMs cannot migrate
    assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]
    # Ray Train's 2 workers × 1 GPU of configs/paper.yaml fit on one node
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert paper["ray"]["use_gpu"] and paper["ray"]["num_workers"] <= node["resources"]["GPU"]


def test_setup_installs_the_project_on_every_node(prepared):
    assert prepared["file_mounts"].get("~/ct3dflow") == ".", "the checkout must reach the nodes"
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]  # after prepare_config: setup_commands + the node kind's own
        installs = [c for c in cmds if re.search(r"pip install .*-e ~/ct3dflow\b", c)]
        assert installs, f"{key} does not install ct3dflow"
        torch_at = next(i for i, c in enumerate(cmds) if "torch==" in c)
        assert torch_at < cmds.index(installs[0]), "torch must be pinned before the project pulls any torch"
        # nothing of the provider defaults' Ray nightly wheel survives the merge
        assert not any("ray-wheels" in c or "dev0" in c for c in cmds)
    assert any("google-api-python-client" in c for c in prepared["head_setup_commands"])


def test_torch_pins_agree_and_fit_pyproject(raw):
    cluster_pin = _torch_pin("\n".join(raw["setup_commands"]))
    docker_pin = re.search(r"ARG TORCH_VERSION=([0-9.]+)", DOCKERFILE.read_text()).group(1)
    assert cluster_pin == docker_pin
    spec = re.search(r'"torch([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert Version(cluster_pin) in SpecifierSet(spec), f"torch=={cluster_pin} outside pyproject's {spec}"


def test_dashboard_only_on_loopback(prepared):
    start = _ray_start(prepared["head_start_ray_commands"], head=True)
    flags = _flags(start)
    assert flags.get("dashboard-host") in ("127.0.0.1", "localhost"), "dashboard must not face the network"
    # `ray dashboard cluster.yaml` forwards to remote port 8265 unless told otherwise
    assert str(flags.get("dashboard-port", "8265")) == "8265"
    everything = yaml.safe_dump(prepared)
    assert "0.0.0.0" not in everything


def test_token_auth_on_every_node(prepared):
    env = _env_exports(prepared["setup_commands"])
    assert env.get("RAY_AUTH_MODE") == "token"
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    assert token_path.endswith("/.ray/ct3dflow_cluster_token")
    # the token file travels with file_mounts (the head's autoscaler copies the mounts on to workers) ...
    remote = "~/" + token_path.split("$HOME/", 1)[1]
    assert remote in prepared["file_mounts"]
    # ... and the environment is in force when Ray starts, on the head and on the workers
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        assert "source ~/ct3dflow.env" in _ray_start(prepared[key], head=head)
    # no token value in the file
    text = CLUSTER.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text)


def test_mlflow_and_shared_storage_reach_jobs(prepared, runtime_env):
    env = _env_exports(prepared["setup_commands"])
    assert env.get("MLFLOW_TRACKING_URI", "").startswith("http://")
    assert env["CT3DFLOW_WORK"].startswith(SHARED + "/")
    assert env["CT3DFLOW_DATA"].startswith(SHARED + "/")
    # the shared path is mounted on the VM and bind-mounted into the container
    assert any(SHARED in c and ("gcsfuse" in c or "mount" in c) for c in prepared["initialization_commands"])
    assert f"-v {SHARED}:{SHARED}" in prepared["docker"]["run_options"]
    # the runtime environment of jobs says the same
    renv = runtime_env["env_vars"]
    assert renv["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    assert renv["CT3DFLOW_WORK"] == env["CT3DFLOW_WORK"]
    assert renv["CT3DFLOW_DATA"] == env["CT3DFLOW_DATA"]
    assert renv["RAY_AUTH_MODE"] == "token"


def test_openmp_threads_wait_passively_on_every_node_and_in_every_job(prepared, runtime_env, tmp_path):
    """The nodes' environment file, the jobs' runtime env and the local platform scripts (which start the
    local Ray head: its workers inherit it) all make torch's OpenMP threads wait passively."""
    assert _env_exports(prepared["setup_commands"]).get("OMP_WAIT_POLICY") == "PASSIVE"
    assert runtime_env["env_vars"].get("OMP_WAIT_POLICY") == "PASSIVE"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["CT3DFLOW_STATE"] = str(tmp_path)
    out = subprocess.run(["bash", "-c", f"source {ROOT / 'platform' / 'env.sh'} && echo $OMP_WAIT_POLICY"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


@pytest.mark.parametrize("host, client", [(None, "127.0.0.1"), ("10.1.2.3", "10.1.2.3"), ("0.0.0.0", "127.0.0.1"),
                                          ("fd00::5", "[fd00::5]"), ("::", "[::1]")])
def test_jobs_ask_the_tracking_server_where_it_listens(tmp_path, host, client):
    """A head that serves MLflow on its private address (MLFLOW_HOST, docs/CLUSTER.md) is asked there by the
    clients env.sh sets up (MLFLOW_TRACKING_URI): the loopback would find nothing. (mlflow-server.sh's health
    check asks the same host; the suite starts its real server with that script, on the loopback.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_HOST")}
    env.update(CT3DFLOW_STATE=str(tmp_path), MLFLOW_PORT="5999", **({"MLFLOW_HOST": host} if host else {}))
    out = subprocess.run(["bash", "-c", f"source {ROOT / 'platform' / 'env.sh'} && echo $MLFLOW_TRACKING_URI"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"http://{client}:5999"


def test_runtime_env_is_valid_for_ray(runtime_env):
    from ray.runtime_env import RuntimeEnv

    parsed = RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert parsed["working_dir"] == "."
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values()), "env_vars values must be strings"
    for must in (".venv/", "work/", ".git/"):
        assert must in runtime_env["excludes"]
    assert "RAY_AUTH_TOKEN" not in runtime_env["env_vars"], "a runtime_env is visible in the job's metadata"
    assert "pip" not in runtime_env and "conda" not in runtime_env


def test_dockerfile_runs_as_non_root_without_secrets():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^FROM\s+\$\{RAY_IMAGE\}", text, flags=re.M)
    assert "ARG RAY_IMAGE=rayproject/ray:2.60." in text
    assert not re.search(r"^COPY\s+(--\S+\s+)*\.\s", text, flags=re.M), "copy named paths, never the whole tree"
    assert not re.search(r"(TOKEN|SECRET|PASSWORD|KEY)\s*=", text.replace("TORCH_VERSION", ""))
