"""Cluster discovery: every source in the exact shape its platform writes, precedence, bad input.

Platform shapes are those each platform writes: PAI DLC, Vertex, Kubeflow
(training-operator v1 release-1.9 and v2 Trainer) and SageMaker's toolkit
(resourceconfig.json). Every call goes through a read-only view of the environment, so a
discovery that tried to write a platform value would fail every test.
"""

from __future__ import annotations

import copy
import json
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from trainenv.cluster import SOURCES, Cluster, discover_cluster
from trainenv.errors import EXIT_CONFIG, ConfigError
from trainenv.frozen import FrozenRecordError, replace

RC_PATH = "/ml/input/config/resourceconfig.json"


def discover(env=None, *, rc=None, settings=None, hostname="vm", **kw) -> Cluster:
    return discover_cluster(
        MappingProxyType(dict(env or {})),
        resource_config=None if rc is None else MappingProxyType(rc) if isinstance(rc, dict) else rc,
        resource_config_source=RC_PATH,
        settings=settings,
        hostname=hostname,
        **kw,
    )


def fields(cluster: Cluster, *names: str) -> tuple:
    return tuple(getattr(cluster, n) for n in names)


# -- platform shapes -------------------------------------------------------------------------

# Kubeflow v1 PyTorchJob, Master + 2 Workers, nprocPerNode default ("auto"); pod "worker-1".
KF_V1_WORKER1 = {
    "PYTHONUNBUFFERED": "1",
    "MASTER_ADDR": "mnist-master-0",
    "PET_MASTER_ADDR": "mnist-master-0",
    "MASTER_PORT": "23456",
    "PET_MASTER_PORT": "23456",
    "WORLD_SIZE": "3",
    "RANK": "2",
    "PET_NODE_RANK": "2",
    "PET_NPROC_PER_NODE": "auto",
    "PET_NNODES": "3",
}

# Kubeflow v2 TrainJob (torch plugin): PET_* only.
KF_V2_NODE1 = {
    "PET_NNODES": "2",
    "PET_NPROC_PER_NODE": "auto",
    "PET_NODE_RANK": "1",
    "PET_MASTER_ADDR": "tj-trainer-node-0-0.tj",
    "PET_MASTER_PORT": "29500",
}

# Kubeflow v1 elastic PyTorchJob with Workers only: no rank, no MASTER_ADDR.
KF_V1_ELASTIC = {
    "PYTHONUNBUFFERED": "1",
    "PET_NNODES": "1:4",
    "PET_NPROC_PER_NODE": "auto",
    "PET_RDZV_BACKEND": "c10d",
    "PET_RDZV_ENDPOINT": "elastic-job-worker-0:23456",
    "PET_RDZV_ID": "elastic-job",
    "PET_MAX_RESTARTS": "3",
}

# PAI DLC PyTorchJob, 1 master + 1 worker, on the worker.
PAI_DLC_WORKER = {
    "MASTER_ADDR": "dlc18isgeayd1234-master-0",
    "MASTER_PORT": "23456",
    "WORLD_SIZE": "2",
    "RANK": "1",
    "NPROC_PER_NODE": "8",
}

TFJOB_CLUSTER = {
    "chief": ["dist-chief-0.kubeflow.svc:2222"],
    "worker": ["dist-worker-0.kubeflow.svc:2222", "dist-worker-1.kubeflow.svc:2222"],
    "ps": ["dist-ps-0.kubeflow.svc:2222"],
}


def tf_config(task_type, index, cluster=None, **extra) -> str:
    return json.dumps(
        {"cluster": cluster or TFJOB_CLUSTER, "task": {"type": task_type, "index": index}, "environment": "cloud", **extra}
    )


VERTEX_SPEC = {
    "cluster": {
        "workerpool0": ["cmle-training-workerpool0-ab12cd-0:2222"],
        "workerpool1": ["cmle-training-workerpool1-ab12cd-0:2222", "cmle-training-workerpool1-ab12cd-1:2222"],
        "workerpool2": ["cmle-training-workerpool2-ab12cd-0:2222"],
    },
    "environment": "cloud",
    "task": {"type": "workerpool1", "index": 1, "trial": ""},
    "job": {"worker_pool_specs": [{"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1}]},
}


def vertex(task_type, index, spec=VERTEX_SPEC) -> str:
    spec = copy.deepcopy(spec)
    spec["task"] = {"type": task_type, "index": index, "trial": ""}
    return json.dumps(spec)


SAGEMAKER_RC = {
    "current_host": "algo-2",
    "current_instance_type": "ml.p3.16xlarge",
    "current_group_name": "homogeneousCluster",
    "hosts": ["algo-1", "algo-2"],
    "instance_groups": [
        {"instance_group_name": "homogeneousCluster", "instance_type": "ml.p3.16xlarge", "hosts": ["algo-2", "algo-1"]}
    ],
    "network_interface_name": "eth0",
}


def test_no_source_is_a_single_node_named_after_this_machine():
    c = discover({}, hostname="vm")
    assert c == Cluster(("vm",), "vm", 0, 1, "vm", None, None, None, "single")
    assert c.is_master


def test_trainenv_variables():
    c = discover({"TRAINENV_HOSTS": '["n0", "n1", "n2"]', "TRAINENV_CURRENT_HOST": "n1"})
    assert fields(c, "hosts", "current_host", "node_rank", "num_nodes", "master_addr", "source") == (
        ("n0", "n1", "n2"), "n1", 1, 3, "n0", "trainenv",
    )
    assert not c.is_master


def test_trainenv_settings_and_env_beats_settings_per_key():
    yaml_settings = {"hosts": ["y0", "y1"], "current_host": "y1"}
    assert fields(discover(settings=yaml_settings), "hosts", "node_rank") == (("y0", "y1"), 1)
    both = discover({"TRAINENV_HOSTS": '["e0", "e1", "y1"]'}, settings=yaml_settings)
    assert fields(both, "hosts", "current_host", "node_rank") == (("e0", "e1", "y1"), "y1", 2)
    env_current = discover({"TRAINENV_CURRENT_HOST": "y0"}, settings=yaml_settings)
    assert fields(env_current, "current_host", "node_rank") == ("y0", 0)


def test_trainenv_current_host_defaults_to_the_hostname():
    c = discover({"TRAINENV_HOSTS": '["other", "vm"]'}, hostname="vm")
    assert fields(c, "current_host", "node_rank") == ("vm", 1)


def test_exported_empty_host_list_reads_back_as_the_platform_cluster():
    """trainenv exports TRAINENV_HOSTS=[] for a rank-only platform; a child must see the same cluster."""
    parent = discover(KF_V2_NODE1)
    child_env = {**KF_V2_NODE1, "TRAINENV_HOSTS": json.dumps(list(parent.hosts)), "TRAINENV_CURRENT_HOST": "vm"}
    assert discover(child_env) == parent


def test_sagemaker_resourceconfig_with_instance_groups():
    c = discover(rc=SAGEMAKER_RC)
    assert fields(c, "hosts", "current_host", "node_rank", "num_nodes", "master_addr", "network_interface", "source") == (
        ("algo-1", "algo-2"), "algo-2", 1, 2, "algo-1", "eth0", "resourceconfig",
    )


def test_resourceconfig_without_hosts_takes_them_from_the_instance_groups():
    rc = {
        "current_host": "algo-3",
        "current_group_name": "gpu",
        "instance_groups": [
            {"instance_group_name": "cpu", "instance_type": "ml.c5.xlarge", "hosts": ["algo-1"]},
            {"instance_group_name": "gpu", "instance_type": "ml.p4d.24xlarge", "hosts": ["algo-2", "algo-3"]},
        ],
    }
    c = discover(rc=rc)
    assert fields(c, "hosts", "node_rank", "network_interface") == (("algo-1", "algo-2", "algo-3"), 2, None)


def test_tfjob_tf_config_ranks_chief_then_workers_and_strips_ports():
    c = discover({"TF_CONFIG": tf_config("worker", 1)})
    assert fields(c, "hosts", "current_host", "node_rank", "num_nodes", "master_addr", "source") == (
        ("dist-chief-0.kubeflow.svc", "dist-worker-0.kubeflow.svc", "dist-worker-1.kubeflow.svc"),
        "dist-worker-1.kubeflow.svc", 2, 3, "dist-chief-0.kubeflow.svc", "TF_CONFIG",
    )
    assert c.master_port is None  # 2222 is TensorFlow's gRPC port, not torch's
    assert discover({"TF_CONFIG": tf_config("chief", 0)}).is_master


def test_tf_config_master_type_and_chief_before_master_before_worker():
    cluster = {"worker": ["w0:1"], "master": ["m0:1"], "chief": ["c0:1"]}
    ranks = {t: discover({"TF_CONFIG": tf_config(t, 0, cluster)}).node_rank for t in ("chief", "master", "worker")}
    assert ranks == {"chief": 0, "master": 1, "worker": 2}


def test_pai_tfjob_tf_config_workers_only():
    cfg = json.dumps({
        "cluster": {"worker": ["job-worker-0.t123.svc:2222", "job-worker-1.t123.svc:2222"]},
        "task": {"type": "worker", "index": 0},
        "environment": "cloud",
    })
    c = discover({"TF_CONFIG": cfg, "MASTER_PORT": "23456"})
    assert fields(c, "node_rank", "num_nodes", "master_addr", "master_port") == (0, 2, "job-worker-0.t123.svc", 23456)


def test_tf_config_ps_task_is_a_one_node_cluster_of_its_own():
    c = discover({"TF_CONFIG": tf_config("ps", 0)})
    assert fields(c, "hosts", "node_rank", "num_nodes", "source") == (("dist-ps-0.kubeflow.svc",), 0, 1, "TF_CONFIG")
    # ... and never shifts a training node's rank or count:
    assert discover({"TF_CONFIG": tf_config("worker", 0)}).num_nodes == 3


def test_kubeflow_sparse_tf_config_names_no_cluster_and_falls_through():
    sparse = json.dumps({
        "sparseCluster": {"worker": {"1": "dyn-worker-1.kubeflow.svc:2222"}, "ps": ["dyn-ps-0.kubeflow.svc:2222"]},
        "task": {"type": "worker", "index": 1},
    })
    assert discover({"TF_CONFIG": sparse}).source == "single"
    assert discover({"TF_CONFIG": sparse, **KF_V2_NODE1}).source == "PET"
    as_map = json.dumps({"cluster": {"worker": {"1": "dyn-worker-1:2222"}}, "task": {"type": "worker", "index": 1}})
    assert discover({"TF_CONFIG": as_map}).source == "single"


def test_tf_config_without_a_cluster_falls_through():
    for text in ("{}", '{"cluster": {}, "task": {"type": "worker", "index": 0}}', "   "):
        assert discover({"TF_CONFIG": text}).source == "single"


def test_tf_local_multi_worker_on_one_host_has_ranks_but_no_host_list():
    cluster = {"worker": ["localhost:12345", "localhost:23456"]}
    env = {"TF_CONFIG": tf_config("worker", 1, cluster)}
    c = discover(env)
    assert fields(c, "hosts", "node_rank", "num_nodes", "current_host", "master_addr") == ((), 1, 2, "localhost", "localhost")
    # What trainenv exports for it (TRAINENV_HOSTS=[]) reads back as the same cluster.
    assert discover({**env, "TRAINENV_HOSTS": "[]", "TRAINENV_CURRENT_HOST": "localhost"}) == c


def test_ipv6_entries():
    cluster = {"worker": ["[fd00::1]:2222", "[fd00::2]:2222", "fd00::3"]}
    c = discover({"TF_CONFIG": tf_config("worker", 2, cluster)})
    assert c.hosts == ("fd00::1", "fd00::2", "fd00::3")


def test_vertex_cluster_spec_pools_and_reduction_server_not_counted():
    c = discover({"CLUSTER_SPEC": vertex("workerpool1", 1)})
    assert fields(c, "hosts", "node_rank", "num_nodes", "master_addr", "source") == (
        ("cmle-training-workerpool0-ab12cd-0", "cmle-training-workerpool1-ab12cd-0", "cmle-training-workerpool1-ab12cd-1"),
        2, 3, "cmle-training-workerpool0-ab12cd-0", "CLUSTER_SPEC",
    )
    assert discover({"CLUSTER_SPEC": vertex("workerpool0", 0)}).is_master
    server = discover({"CLUSTER_SPEC": vertex("workerpool2", 0)})
    assert fields(server, "hosts", "node_rank", "num_nodes") == (("cmle-training-workerpool2-ab12cd-0",), 0, 1)


def test_vertex_tf_job_sets_both_and_they_agree():
    tf = json.dumps({
        "cluster": {"chief": VERTEX_SPEC["cluster"]["workerpool0"], "worker": VERTEX_SPEC["cluster"]["workerpool1"]},
        "task": {"type": "worker", "index": 0}, "environment": "cloud",
    })
    both = discover({"TF_CONFIG": tf, "CLUSTER_SPEC": vertex("workerpool1", 0)})
    only_spec = discover({"CLUSTER_SPEC": vertex("workerpool1", 0)})
    assert both.source == "TF_CONFIG"
    assert replace(both, source="CLUSTER_SPEC") == only_spec


def test_tf_evaluator_outside_the_cluster_falls_through_to_cluster_spec():
    tf = json.dumps({"cluster": {"chief": ["c:2222"], "worker": ["w:2222"]}, "task": {"type": "evaluator", "index": 0}})
    spec = copy.deepcopy(VERTEX_SPEC)
    spec["cluster"]["workerpool3"] = ["cmle-training-workerpool3-ab12cd-0:2222"]
    c = discover({"TF_CONFIG": tf, "CLUSTER_SPEC": vertex("workerpool3", 0, spec)})
    assert fields(c, "source", "current_host", "num_nodes") == ("CLUSTER_SPEC", "cmle-training-workerpool3-ab12cd-0", 1)


def test_kubeflow_v2_trainjob():
    c = discover(KF_V2_NODE1)
    assert fields(c, "hosts", "current_host", "node_rank", "num_nodes", "master_addr", "master_port", "nproc_per_node", "source") == (
        (), "vm", 1, 2, "tj-trainer-node-0-0.tj", 29500, None, "PET",
    )


def test_kubeflow_v1_pytorchjob_reads_pet_not_the_process_level_names():
    c = discover(KF_V1_WORKER1)
    assert fields(c, "node_rank", "num_nodes", "master_addr", "master_port", "source") == (2, 3, "mnist-master-0", 23456, "PET")
    # nprocPerNode: 4 -> WORLD_SIZE = 3 pods x 4, RANK and PET_NODE_RANK still the pod index.
    c4 = discover({**KF_V1_WORKER1, "PET_NPROC_PER_NODE": "4", "WORLD_SIZE": "12"})
    assert fields(c4, "node_rank", "num_nodes", "nproc_per_node") == (2, 3, 4)


def test_kubeflow_v1_elastic_worker_only_has_no_rank_until_rendezvous():
    c = discover(KF_V1_ELASTIC)
    assert fields(c, "node_rank", "num_nodes", "master_addr", "master_port", "source") == (
        None, 4, "elastic-job-worker-0", None, "PET",
    )
    assert not c.is_master


def test_pet_rank_optional_only_when_it_cannot_be_known():
    assert discover({"PET_NNODES": "1"}).node_rank == 0
    assert discover({"PET_NNODES": "2", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "h:29400"}).node_rank is None
    assert discover({"PET_NNODES": "2:2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m"}).num_nodes == 2
    with pytest.raises(ConfigError, match="PET_NODE_RANK: is not set"):
        discover({"PET_NNODES": "2", "PET_MASTER_ADDR": "m"})


def test_pai_dlc_master_addr_rank_world_size_are_node_level():
    c = discover(PAI_DLC_WORKER)
    assert fields(c, "hosts", "node_rank", "num_nodes", "master_addr", "master_port", "nproc_per_node", "source") == (
        (), 1, 2, "dlc18isgeayd1234-master-0", 23456, 8, "MASTER_ADDR",
    )
    # PAI's NPROC_PER_NODE never scales WORLD_SIZE, even when it divides it.
    big = discover({**PAI_DLC_WORKER, "WORLD_SIZE": "16", "RANK": "9"})
    assert fields(big, "node_rank", "num_nodes") == (9, 16)


def test_kubeflow_v1_mixed_semantics_without_pet_rank():
    env = {k: v for k, v in KF_V1_WORKER1.items() if k not in ("PET_NNODES", "PET_NODE_RANK")}
    env.update(PET_NPROC_PER_NODE="4", WORLD_SIZE="12")
    c = discover(env)
    assert fields(c, "node_rank", "num_nodes", "nproc_per_node", "source") == (2, 3, 4, "MASTER_ADDR")
    with pytest.raises(ConfigError, match=r"RANK: 3 is not below WORLD_SIZE/PET_NPROC_PER_NODE"):
        discover({**env, "RANK": "3"})


def test_inside_a_torchrun_worker_rank_and_world_size_count_processes():
    # What torch 2.13's local elastic agent sets for global rank 3 of 2 nodes x 2.
    worker = {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "3", "WORLD_SIZE": "4",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "3", "ROLE_WORLD_SIZE": "4", "ROLE_NAME": "default", "TORCHELASTIC_RUN_ID": "none",
    }
    c = discover(worker)
    assert fields(c, "node_rank", "num_nodes", "nproc_per_node", "master_port", "source") == (1, 2, 2, 29511, "MASTER_ADDR")


def test_partial_master_addr_set_is_not_a_source():
    assert discover({"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}).source == "single"
    assert discover({"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}).master_port == 29500


def test_master_port_prefers_the_sources_own_name():
    env = {**KF_V2_NODE1, "MASTER_PORT": "1234"}
    assert discover(env).master_port == 29500  # PET source: PET_MASTER_PORT first
    pai = {**PAI_DLC_WORKER, "PET_MASTER_PORT": "4321"}
    assert discover(pai).master_port == 23456  # other sources: MASTER_PORT first
    assert discover({"PET_MASTER_PORT": "4321"}).master_port == 4321


def test_nproc_per_node_keywords_mean_not_said():
    for word in ("auto", "gpu", "cpu", "xpu", "AUTO"):
        assert discover({"PET_NPROC_PER_NODE": word, "NPROC_PER_NODE": "8"}).nproc_per_node is None
    assert discover({"NPROC_PER_NODE": " 8 "}).nproc_per_node == 8


def test_blank_variables_count_as_unset():
    env = {"TF_CONFIG": "", "CLUSTER_SPEC": " ", "TRAINENV_HOSTS": "", "MASTER_ADDR": "", "RANK": "0", "WORLD_SIZE": "1"}
    assert discover(env).source == "single"


# -- precedence ------------------------------------------------------------------------------

ALL_SOURCES = {
    "trainenv": {"TRAINENV_HOSTS": '["t0", "vm"]'},
    "TF_CONFIG": {"TF_CONFIG": tf_config("worker", 0)},
    "CLUSTER_SPEC": {"CLUSTER_SPEC": vertex("workerpool1", 0)},
    "PET": KF_V2_NODE1,
    "MASTER_ADDR": PAI_DLC_WORKER,
    "ADS": {"JOB_RUN_OCID": "ocid1.datasciencejobrun.oc1..x", "NODE_COUNT": "1"},
}


def test_sources_in_contract_order_first_match_wins():
    seen = []
    remaining = dict(ALL_SOURCES)
    rc = SAGEMAKER_RC
    while True:
        env = {k: v for part in remaining.values() for k, v in part.items()}
        c = discover(env, rc=rc)
        seen.append(c.source)
        if c.source == "single":
            break
        if c.source == "resourceconfig":
            rc = None
        else:
            del remaining[c.source]
    assert tuple(seen) == SOURCES


def test_discovery_only_reads():
    env = {k: v for part in ALL_SOURCES.values() for k, v in part.items()}
    rc = copy.deepcopy(SAGEMAKER_RC)
    yaml_settings = {"hosts": ["a", "vm"]}
    for drop in (None, "TRAINENV_HOSTS"):
        view = MappingProxyType({k: v for k, v in env.items() if k != drop})
        discover_cluster(view, resource_config=rc, resource_config_source=RC_PATH, settings=yaml_settings, hostname="vm")
    assert rc == SAGEMAKER_RC and yaml_settings == {"hosts": ["a", "vm"]}


def test_cluster_is_a_frozen_read_only_mapping():
    c = discover(KF_V1_WORKER1)
    assert dict(c)["node_rank"] == 2
    assert json.loads(c.to_json())["hosts"] == []
    with pytest.raises(FrozenRecordError):
        c.node_rank = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="node_rank"):
        Cluster(("a", "b"), "a", 5, 2, "a", None, None, None, "trainenv")
    with pytest.raises(ValueError, match="listed twice"):
        Cluster(("a", "a"), "a", 0, 2, "a", None, None, None, "trainenv")


# -- bad input -------------------------------------------------------------------------------

BAD = [
    # (env, rc, settings, where, problem)
    ({"TRAINENV_HOSTS": "n0,n1"}, None, None, "TRAINENV_HOSTS", "not valid JSON"),
    ({"TRAINENV_HOSTS": '{"n0": 1}'}, None, None, "TRAINENV_HOSTS", "not a JSON list"),
    ({"TRAINENV_HOSTS": '["vm", 3]'}, None, None, "TRAINENV_HOSTS: [1]", "3 is not a host name"),
    ({"TRAINENV_HOSTS": '["vm", ""]'}, None, None, "TRAINENV_HOSTS: [1]", "'' is not a host name"),
    ({"TRAINENV_HOSTS": '["vm", "a b"]'}, None, None, "TRAINENV_HOSTS: [1]", "'a b' is not a host name"),
    ({"TRAINENV_HOSTS": '["vm", "vm"]'}, None, None, "TRAINENV_HOSTS", "'vm' is listed twice"),
    ({"TRAINENV_HOSTS": '["a", "b"]', "TRAINENV_CURRENT_HOST": "c"}, None, None, "TRAINENV_CURRENT_HOST", "'c' is not in TRAINENV_HOSTS"),
    ({"TRAINENV_HOSTS": '["a", "b"]'}, None, None, "hostname", "set TRAINENV_CURRENT_HOST"),
    ({}, None, {"hosts": []}, "trainenv.yaml: hosts", "empty host list"),
    ({}, None, {"hosts": "a,b"}, "trainenv.yaml: hosts", "not a list of host names"),
    ({}, None, {"hosts": ["vm", 7]}, "trainenv.yaml: hosts[1]", "7 is not a host name"),
    ({}, None, {"hosts": ["vm"], "current_host": 5}, "trainenv.yaml: current_host", "5 is not a host name"),
    ({}, None, ["vm"], "trainenv.yaml", "is not a mapping of settings"),
    ({}, ["algo-1"], None, RC_PATH, "not a JSON object"),
    ({}, {"current_host": "algo-1"}, None, f"{RC_PATH}: hosts", "missing"),
    ({}, {"current_host": "algo-1", "hosts": []}, None, f"{RC_PATH}: hosts", "empty host list"),
    ({}, {"hosts": ["algo-1"]}, None, f"{RC_PATH}: current_host", "missing"),
    ({}, {"current_host": "algo-9", "hosts": ["algo-1"]}, None, f"{RC_PATH}: current_host", "'algo-9' is not in hosts"),
    ({}, {"current_host": "algo-1", "hosts": ["algo-1", "algo-1"]}, None, f"{RC_PATH}: hosts", "listed twice"),
    ({}, {"current_host": "algo-1", "hosts": ["algo-1", None]}, None, f"{RC_PATH}: hosts[1]", "None is not a host name"),
    ({}, {**SAGEMAKER_RC, "network_interface_name": 0}, None, f"{RC_PATH}: network_interface_name", "not an interface"),
    ({}, {"current_host": "a", "instance_groups": [{"hosts": "a"}]}, None, f"{RC_PATH}: instance_groups[0].hosts", "not a list"),
    ({}, {"current_host": "a", "instance_groups": {}}, None, f"{RC_PATH}: instance_groups", "not a list of groups"),
    ({"TF_CONFIG": '{"cluster": '}, None, None, "TF_CONFIG", "not valid JSON"),
    ({"TF_CONFIG": '["worker"]'}, None, None, "TF_CONFIG", "not a JSON object"),
    ({"TF_CONFIG": '{"cluster": ["a:1"], "task": {"type": "worker", "index": 0}}'}, None, None, "TF_CONFIG: cluster", "not a JSON object"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}, None, None, "TF_CONFIG: task", "not a JSON object"),
    ({"TF_CONFIG": tf_config("trainer", 0)}, None, None, "TF_CONFIG: task.type", "'trainer' is not a known task type"),
    ({"TF_CONFIG": tf_config("worker", -1)}, None, None, "TF_CONFIG: task.index", "-1 is not a non-negative integer"),
    ({"TF_CONFIG": tf_config("worker", "1")}, None, None, "TF_CONFIG: task.index", "'1' is not a non-negative integer"),
    ({"TF_CONFIG": tf_config("worker", True)}, None, None, "TF_CONFIG: task.index", "True is not"),
    ({"TF_CONFIG": tf_config("worker", 2)}, None, None, "TF_CONFIG: task.index", "2 is out of range: cluster.worker has 2 entries"),
    ({"TF_CONFIG": tf_config("worker", 0, {"chief": ["c:1"]})}, None, None, "TF_CONFIG: task.type", "'worker' has no list in cluster"),
    ({"TF_CONFIG": tf_config("worker", 0, {"worker": "a:1,b:1"})}, None, None, "TF_CONFIG: cluster.worker", "not a list"),
    ({"TF_CONFIG": tf_config("worker", 0, {"worker": ["a:1", 2]})}, None, None, "TF_CONFIG: cluster.worker[1]", "2 is not a host name"),
    ({"TF_CONFIG": tf_config("worker", 0, {"worker": ["a:http"]})}, None, None, "TF_CONFIG: cluster.worker[0]", "not host:port"),
    ({"TF_CONFIG": tf_config("worker", 0, {"worker": ["[fd00::1:2222"]})}, None, None, "TF_CONFIG: cluster.worker[0]", "not [address]:port"),
    ({"TF_CONFIG": tf_config("worker", 0, {"worker": ["a:1", "a:1"]})}, None, None, "TF_CONFIG: cluster", "'a:1' is listed twice"),
    ({"TF_CONFIG": json.dumps({"sparseCluster": {"worker": {"x": "a:1"}}, "task": {"type": "worker", "index": 0}})}, None, None, "TF_CONFIG: sparseCluster.worker", "'x' is not a task index"),
    ({"TF_CONFIG": "[" * 100000}, None, None, "TF_CONFIG", "nested too deeply"),
    ({"CLUSTER_SPEC": "cluster=workerpool0"}, None, None, "CLUSTER_SPEC", "not valid JSON"),
    ({"CLUSTER_SPEC": vertex("workerpool7", 0)}, None, None, "CLUSTER_SPEC: task.type", "'workerpool7' is not a known task type"),
    ({"CLUSTER_SPEC": vertex("workerpool1", 5)}, None, None, "CLUSTER_SPEC: task.index", "5 is out of range"),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool1": ["w:2222"]}, "task": {"type": "workerpool1", "index": 0}})}, None, None, "CLUSTER_SPEC: cluster.workerpool0", "missing"),
    ({"PET_NODE_RANK": "0"}, None, None, "PET_NNODES", "is not set, but PET_NODE_RANK is"),
    ({"PET_NNODES": "two"}, None, None, "PET_NNODES", "'two' is not N or MIN:MAX"),
    ({"PET_NNODES": "1:2:3"}, None, None, "PET_NNODES", "is not N or MIN:MAX"),
    ({"PET_NNODES": "0"}, None, None, "PET_NNODES", "needs 1 <= MIN <= MAX"),
    ({"PET_NNODES": "3:1"}, None, None, "PET_NNODES", "needs 1 <= MIN <= MAX"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "-1"}, None, None, "PET_NODE_RANK", "'-1' is not a non-negative integer"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "m"}, None, None, "PET_NODE_RANK", "2 is not below PET_NNODES=2"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, None, None, "PET_MASTER_ADDR", "is not set"),
    ({**KF_V2_NODE1, "PET_NPROC_PER_NODE": "0"}, None, None, "PET_NPROC_PER_NODE", "0 is not a positive process count"),
    ({**KF_V2_NODE1, "PET_NPROC_PER_NODE": "many"}, None, None, "PET_NPROC_PER_NODE", "'many' is not a non-negative integer"),
    ({**KF_V2_NODE1, "PET_MASTER_PORT": "0"}, None, None, "PET_MASTER_PORT", "'0' is not a port"),
    ({**PAI_DLC_WORKER, "RANK": "-1"}, None, None, "RANK", "'-1' is not a non-negative integer"),
    ({**PAI_DLC_WORKER, "RANK": "1.0"}, None, None, "RANK", "'1.0' is not a non-negative integer"),
    ({**PAI_DLC_WORKER, "RANK": "9" * 5000}, None, None, "RANK", "is not a non-negative integer"),
    ({**PAI_DLC_WORKER, "RANK": "2"}, None, None, "RANK", "2 is not below WORLD_SIZE=2"),
    ({**PAI_DLC_WORKER, "WORLD_SIZE": "0", "RANK": "0"}, None, None, "WORLD_SIZE", "0 is not a positive integer"),
    ({**PAI_DLC_WORKER, "WORLD_SIZE": "two"}, None, None, "WORLD_SIZE", "'two' is not a non-negative integer"),
    ({**PAI_DLC_WORKER, "MASTER_ADDR": "dlc master"}, None, None, "MASTER_ADDR", "'dlc master' is not a host name"),
    ({**PAI_DLC_WORKER, "MASTER_PORT": "70000"}, None, None, "MASTER_PORT", "'70000' is not a port"),
    ({**PAI_DLC_WORKER, "MASTER_PORT": "http"}, None, None, "MASTER_PORT", "'http' is not a port"),
    ({**PAI_DLC_WORKER, "NPROC_PER_NODE": "0"}, None, None, "NPROC_PER_NODE", "0 is not a positive process count"),
    ({"MASTER_PORT": "-5"}, None, None, "MASTER_PORT", "'-5' is not a port"),
]


@pytest.mark.parametrize("env, rc, yaml_settings, where, problem", BAD, ids=[f"{b[3]}|{b[4]}"[:60] for b in BAD])
def test_bad_input_is_a_one_line_config_error_naming_source_key_and_value(env, rc, yaml_settings, where, problem):
    with pytest.raises(ConfigError) as info:
        discover(env, rc=rc, settings=yaml_settings)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(where + ":"), message
    assert problem in message, message
    assert info.value.exit_code == EXIT_CONFIG
    assert len(message) < 400


def test_errors_name_the_settings_file_it_came_from():
    with pytest.raises(ConfigError, match=r"^/ml/usercode/trainenv.yaml: hosts: is an empty host list$"):
        discover(settings={"hosts": []}, settings_source="/ml/usercode/trainenv.yaml")


def test_bad_hostname_argument():
    with pytest.raises(ConfigError, match="hostname"):
        discover({}, hostname="")


def test_error_values_have_url_credentials_redacted():
    with pytest.raises(ConfigError) as info:
        discover({"TF_CONFIG": "https://user:hunter22@example.com/cfg"})
    assert "hunter22" not in str(info.value)


# -- properties ------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_TYPES = ["chief", "master", "worker", "ps", "evaluator", "workerpool0", "workerpool1", "workerpool2", "workerpool3", "bogus"]
_ENTRY = st.sampled_from(["h0:2222", "h1:2222", "[fd00::1]:1", "h2", "localhost:1", "a:b", "", "x y"]) | _JSON
_JOB = st.lists(_ENTRY, max_size=4) | st.dictionaries(st.sampled_from(["0", "1", "x"]), _ENTRY, max_size=2) | _JSON
_TASK = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(_TYPES) | _JSON,
        "index": st.integers(-2, 6) | st.booleans() | st.floats() | st.text(max_size=2),
    },
)
_NEAR_VALID = st.fixed_dictionaries(
    {},
    optional={
        "cluster": st.dictionaries(st.sampled_from(_TYPES), _JOB, max_size=5) | _JSON,
        "sparseCluster": st.dictionaries(st.sampled_from(_TYPES), _JOB, max_size=2) | _JSON,
        "task": _TASK | _JSON,
        "environment": st.just("cloud"),
    },
)


@st.composite
def _mostly_valid(draw) -> dict:
    """A TF_CONFIG- or CLUSTER_SPEC-shaped object; one in three has slips (duplicates, bad index...)."""
    types = draw(st.sampled_from([_TYPES[:5], _TYPES[5:9]]))
    slips = draw(st.integers(0, 2)) == 0
    pool = draw(st.permutations([f"h{i}.svc:2222" for i in range(10)] + ["h0.svc:2223", "[fd00::1]:1", "h9"]))
    cluster = {}
    for job in draw(st.sets(st.sampled_from(types), min_size=1, max_size=4)):
        size = draw(st.integers(0 if slips else 1, 3))
        cluster[job] = draw(st.lists(st.sampled_from(pool), max_size=3)) if slips else [pool.pop() for _ in range(size)]
    if slips:
        task = {"type": draw(st.sampled_from(types + ["bogus"])), "index": draw(st.integers(-1, 3))}
    else:
        job = draw(st.sampled_from(sorted(cluster)))
        task = {"type": job, "index": draw(st.integers(0, len(cluster[job]) - 1))}
    config = {"cluster": cluster, "task": task}
    if draw(st.booleans()):
        config["environment"] = "cloud"
    return config


_TEXT = (
    st.text(max_size=40) | _JSON.map(json.dumps) | _NEAR_VALID.map(json.dumps) | _mostly_valid().map(json.dumps)
)


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["TF_CONFIG", "CLUSTER_SPEC", "TRAINENV_HOSTS"]), text=_TEXT)
def test_any_json_ish_text_parses_or_is_a_config_error(name, text):
    try:
        c = discover({name: text})
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert c.source in (name.replace("TRAINENV_HOSTS", "trainenv"), "single")


_ENV_VALUE = st.sampled_from(["0", "1", "2", "3", "-1", "1:4", "auto", "x", " ", "99999", "4:1"]) | st.text(max_size=6)


@hsettings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(
        st.sampled_from([
            "PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NPROC_PER_NODE",
            "PET_RDZV_BACKEND", "PET_RDZV_ENDPOINT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
            "NPROC_PER_NODE", "GROUP_RANK", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE", "TRAINENV_CURRENT_HOST",
        ]),
        _ENV_VALUE,
    ),
    rc=st.none() | _JSON | st.fixed_dictionaries({}, optional={
        "hosts": st.lists(_ENTRY, max_size=3) | _JSON, "current_host": _ENTRY,
        "instance_groups": st.lists(st.fixed_dictionaries({}, optional={"hosts": st.lists(_ENTRY, max_size=2)}), max_size=2) | _JSON,
        "network_interface_name": _ENTRY,
    }),
    yaml_settings=st.none() | st.fixed_dictionaries({}, optional={"hosts": st.lists(_ENTRY, max_size=3) | _JSON, "current_host": _ENTRY}),
)
def test_any_env_rank_values_resourceconfig_or_settings_give_a_cluster_or_a_config_error(env, rc, yaml_settings):
    try:
        c = discover(env, rc=rc, settings=yaml_settings)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert c.node_rank is None or 0 <= c.node_rank < c.num_nodes  # Cluster checks the rest itself


@hsettings(max_examples=100, deadline=None)
@given(
    chiefs=st.integers(0, 1),
    masters=st.integers(0, 1),
    workers=st.integers(0, 4),
    ps=st.integers(0, 2),
)
def test_every_training_task_gets_a_distinct_rank_and_chief_first(chiefs, masters, workers, ps):
    counts = {"chief": chiefs, "master": masters, "worker": workers, "ps": ps}
    cluster = {t: [f"{t}-{i}.svc:2222" for i in range(n)] for t, n in counts.items() if n}
    training = [(t, i) for t in ("chief", "master", "worker") for i in range(counts[t])]
    if not training:
        return
    ranks = []
    for task_type, index in training:
        c = discover({"TF_CONFIG": tf_config(task_type, index, cluster)})
        assert c.num_nodes == len(training)
        assert c.current_host == f"{task_type}-{index}.svc"
        assert c.master_addr == c.hosts[0] == f"{training[0][0]}-0.svc"
        ranks.append(c.node_rank)
    assert ranks == list(range(len(training)))


# -- real torchrun ---------------------------------------------------------------------------


@pytest.mark.distributed
def test_inside_real_torchrun_workers_node_facts_come_from_group_values(tmp_path):
    from distributed_harness import json_lines, launcher_environ, start, wait_all
    from support import PYTHON, free_port, need_torch, write_script

    need_torch()

    script = write_script(
        tmp_path / "discover.py",
        "import json, os, socket\n"
        "from trainenv.cluster import discover_cluster\n"
        "c = discover_cluster(os.environ, resource_config=None, resource_config_source='-',\n"
        "                     settings=None, hostname=socket.gethostname())\n"
        "print(json.dumps({'rank': int(os.environ['RANK']), **c.to_dict()}), flush=True)\n",
    )
    port = free_port()
    procs = [
        start(
            [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), script],
            env=launcher_environ(tmp_path, GLOO_SOCKET_IFNAME="lo"),
            log_dir=tmp_path,
        )
        for node in (0, 1)
    ]
    results = wait_all(procs, 120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    seen = sorted((row for r in results for row in json_lines(r.stdout)), key=lambda row: row["rank"])
    assert [(row["rank"], row["node_rank"], row["num_nodes"], row["nproc_per_node"]) for row in seen] == [
        (0, 0, 2, 2), (1, 0, 2, 2), (2, 1, 2, 2), (3, 1, 2, 2),
    ]
    assert {(row["source"], row["master_addr"], row["master_port"]) for row in seen} == {("MASTER_ADDR", "127.0.0.1", port)}
