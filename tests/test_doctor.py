"""`lmforge doctor`: its parsers and classifiers, and real runs on the single-node Slurm test cluster."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge import cli, doctor
from tests.slurm_cluster import unavailable

pytest_plugins = ["tests.slurm_cluster"]

LMFORGE = Path(sys.executable).parent / "lmforge"  # the console script of this venv
CHECK_NAMES = [name for name, _ in doctor.CHECKS]


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names", "default"),
    [
        ("cpu*\ngpu\n", ["cpu", "gpu"], "cpu"),
        ("gpu\ncpu*\ncpu*\ngpu\n", ["gpu", "cpu"], "cpu"),  # one row per node state: duplicates
        ("debug\nlong\n", ["debug", "long"], None),
        ("", [], None),
    ],
)
def test_parse_partitions(text, names, default):
    assert doctor.parse_partitions(text) == (names, default)


@pytest.mark.parametrize(
    ("gres", "expected"),
    [
        ("gpu:2", True),
        ("gpu:2(S:0)", True),
        ("gpu:a100:4(S:0-1)", True),
        ("shard:8,gpu:1", True),
        ("(null)\ngpu:h100:8", True),
        ("(null)", False),
        ("", False),
        ("mps:100", False),
        ("gpuonly:1", False),
    ],
)
def test_has_gpu_gres(gres, expected):
    assert doctor.has_gpu_gres(gres) is expected


@pytest.mark.parametrize(
    ("fstype", "kind"),
    [
        ("nfs", "shared"),
        ("nfs4", "shared"),
        ("lustre", "shared"),
        ("gpfs", "shared"),
        ("beegfs", "shared"),
        ("fuse.beegfs", "shared"),
        ("ext4", "local"),
        ("ext2/ext3", "local"),  # what `stat -f -c %T` says for ext4
        ("xfs", "local"),
        ("tmpfs", "local"),
        ("overlay", "local"),
        ("overlayfs", "local"),
        ("UNKNOWN (0x19830326)", "unknown"),
        ("fuse.sshfs", "unknown"),
    ],
)
def test_classify_fs(fstype, kind):
    assert doctor.classify_fs(fstype) == kind


MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /dev tmpfs rw 0 0
server:/export/home /home nfs4 rw 0 0
fs0 /scratch lustre rw 0 0
/dev/sdb1 /scratch/local\\040disk ext4 rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/", "overlay"),
        ("/work/main/results", "overlay"),
        ("/home/alice/results", "nfs4"),
        ("/home", "nfs4"),
        ("/homework", "overlay"),  # a prefix of a mount point is not inside it
        ("/scratch/alice", "lustre"),
        ("/scratch/local disk/x", "ext4"),
    ],
)
def test_fs_type_from_mounts(path, fstype):
    assert doctor.fs_type_from_mounts(path, MOUNTS) == fstype


def test_parse_min_job_age():
    assert doctor.parse_min_job_age("MaxJobCount = 10000\nMinJobAge               = 600 sec\n") == 600
    assert doctor.parse_min_job_age("MinJobAge = 1h\n") == 3600
    assert doctor.parse_min_job_age("MaxJobCount = 10000\n") is None


def test_effective_partition():
    assert doctor.effective_partition("gpu", "cpu", "debug") == "gpu"
    assert doctor.effective_partition(None, "cpu", "debug") == "cpu"
    assert doctor.effective_partition(None, None, "debug") == "debug"


def test_format_result_prints_fix_only_for_warn_and_fail():
    assert doctor.format_result("internet", ("OK", "reachable", "unused")) == "[ OK ] internet            reachable"
    lines = doctor.format_result("partitions", ("FAIL", "no gpux", "set it")).splitlines()
    assert lines == ["[FAIL] partitions          no gpux", "       fix: set it"]


def test_write_probe(tmp_path):
    assert doctor.write_probe(tmp_path / "new" / "dir") is None
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe file is deleted
    (tmp_path / "file").write_text("")
    assert "Error" in doctor.write_probe(tmp_path / "file" / "sub")


def test_tcp_connect_open_and_closed_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert doctor.tcp_connect("127.0.0.1", port, 1.0) is None
    start = time.monotonic()
    assert doctor.tcp_connect("127.0.0.1", port, 1.0) is not None  # closed now: refused
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("error", [None, "timed out after 3.0 s"])
def test_internet_check_reports_what_the_probe_saw(monkeypatch, error):
    probed = []
    monkeypatch.setattr(doctor, "tcp_connect", lambda host, port, timeout: probed.append((host, port)) or error)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    status, seen, fix = doctor.check_internet(_context())
    assert probed == [doctor.HUB]
    assert "HF_HUB_OFFLINE=1" in seen and "HF_DATASETS_OFFLINE=<unset>" in seen  # the offline settings, either way
    if error is None:
        assert status == "OK" and "huggingface.co:443 reachable" in seen and fix is None
    else:
        assert status == "WARN" and f"unreachable from this node ({error})" in seen and "HTTPS_PROXY=" in seen
        assert fix.startswith("export HF_DATASETS_OFFLINE=1 WANDB_MODE=offline and pre-download")  # only what is unset


def test_slurm_tests_skip_without_a_cluster_but_fail_on_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no slurmctld"):
        unavailable("no slurmctld")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no slurmctld(.|\n)*CI=true: the Slurm tests must run"):
        unavailable("no slurmctld")


def test_config_error_exits_2(capsys):
    assert cli.main(["doctor", "resources.pretrain.partitio=gpu"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "resources.pretrain.partition" in err  # the did-you-mean hint
    assert cli.main(["doctor", "not-an-override"]) == 2


# --- real runs on the test cluster -----------------------------------------------------------


def _doctor(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.monotonic()
    proc = subprocess.run(
        [str(LMFORGE), "doctor", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - start < 20, "doctor should take a few seconds"
    return proc


def _lines(out: str) -> dict[str, str]:
    """check name -> its status, from doctor's output."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"\[( OK |WARN|FAIL)\] (.{19}) ", line)
        if match:
            found[match.group(2).strip()] = match.group(1).strip()
    return found


@pytest.mark.slurm
def test_default_config_passes(slurm_cluster, tmp_path):
    proc = _doctor(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    statuses = _lines(out)
    assert list(statuses) == CHECK_NAMES, out  # every check printed, in order
    assert "FAIL" not in statuses.values(), out
    assert statuses["slurm commands"] == statuses["partitions"] == statuses["default partition"] == "OK", out
    assert "cluster has: cpu, gpu" in out
    assert "'cpu'" in out  # where stages without a partition go
    assert statuses["job status (sacct)"] == "WARN" and "MinJobAge=600s" in out  # no slurmdbd
    assert "slurm-status-command: squeue" in out
    assert statuses["results dir"] == "OK" and (tmp_path / "results").is_dir()
    hub_reachable = doctor.tcp_connect(*doctor.HUB, doctor.CONNECT_TIMEOUT) is None  # either kind of machine
    assert statuses["internet"] == ("OK" if hub_reachable else "WARN") and "HF_HUB_OFFLINE=" in out
    assert statuses["mlflow store"] in ("OK", "WARN")
    for line in out.splitlines():  # every WARN/FAIL is followed by its fix
        if line.startswith(("[WARN]", "[FAIL]")):
            assert out.splitlines()[out.splitlines().index(line) + 1].startswith("       fix: "), line


@pytest.mark.slurm
def test_gpu_stage_on_gpu_partition(slurm_cluster, tmp_path):
    proc = _doctor(tmp_path, "resources.pretrain.partition=gpu", "resources.pretrain.gpus=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = _lines(proc.stdout)
    assert statuses["partitions"] == statuses["gpu partitions"] == "OK", proc.stdout
    gpu_line = next(line for line in proc.stdout.splitlines() if "gpu partitions" in line)
    assert "pretrain" in gpu_line and f"gpu:{slurm_cluster.gpus}" in gpu_line


@pytest.mark.slurm
def test_misspelt_partition_fails(slurm_cluster, tmp_path):
    proc = _doctor(tmp_path, "resources.pretrain.partition=gpux")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    statuses = _lines(proc.stdout)
    assert statuses["partitions"] == "FAIL", proc.stdout
    assert list(statuses) == CHECK_NAMES  # the other checks still ran
    line = next(line for line in proc.stdout.splitlines() if line.startswith("[FAIL] partitions"))
    assert "gpux" in line and "pretrain" in line and "cpu, gpu" in line
    assert "resources.pretrain.partition=gpu" in proc.stdout  # the fix suggests the close match


@pytest.mark.slurm
def test_requests_the_cluster_would_refuse_fail_naming_the_stage(slurm_cluster, tmp_path):
    # MaxTime of the test partitions is 120 min; the test node has no feature "a100"; a qos of its own is fine.
    proc = _doctor(tmp_path, "resources.evaluate.runtime=999", "resources.tokenizer.constraint='a100&ib'")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _lines(proc.stdout)["job requests"] == "FAIL", proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("[FAIL] job requests"))
    assert "evaluate (" in line and "--time=999" in line and "time limit" in line.lower(), line
    assert "tokenizer (" in line and "--constraint=a100&ib" in line and "feature" in line.lower(), line
    assert "curate" not in line and "pretrain" not in line  # the requests the cluster takes are not named


def test_job_requests_carry_the_profiles_default_resources(slurm_cluster, monkeypatch, tmp_path):
    """An account or constraint put in the profile's default-resources (as the README advises for an account)
    is part of every job's sbatch line, so doctor's test submission must carry it too."""
    profile = tmp_path / "config.yaml"
    profile.write_text("executor: slurm\ndefault-resources:\n  - constraint=no_such_feature\n  - runtime=60\n")
    monkeypatch.setattr(doctor, "PROFILE", profile)
    status, seen, _ = doctor.check_submission(_context())
    assert status == "FAIL" and "--constraint=no_such_feature" in seen and "curate" in seen, seen
    monkeypatch.setattr(doctor, "PROFILE", tmp_path / "no_profile.yaml")
    assert doctor.check_submission(_context())[0] == "OK"


def test_sbatch_options_are_the_plugins_flags():
    stage = doctor.plan.stages(
        _context(
            "resources.pretrain.gpus=2",
            "resources.pretrain.gpu_model=a100",
            "train.processes=2",
            "resources.pretrain.account=lab",
            "resources.pretrain.qos=long",
        ).cfg
    )["pretrain"]
    options = doctor.sbatch_options(doctor.slurm_resources(stage))
    assert {"--account=lab", "--qos=long", "--gpus=a100:2", "--ntasks=2", "--ntasks-per-gpu=1"} <= set(options)
    assert "--time=120" in options and "--signal=URG@120" in options


def test_a_left_build_lock_is_named_with_how_to_clear_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    status, seen, fix = doctor.check_deepspeed_ops(_context())
    assert status == doctor.FAIL and str(tmp_path / "deepspeed_shm_comm" / "lock") in seen and "delete" in fix
    (tmp_path / "deepspeed_shm_comm" / "lock").unlink()
    assert doctor.check_deepspeed_ops(_context())[0] == doctor.WARN  # nothing built there either


# --- checks against a faked cluster (paths the single-node test cluster cannot show) ---------


def _fake_slurm(monkeypatch, answers: dict[str, tuple[int, str]]) -> None:
    """Replace doctor's command runner: `answers` maps a command line to (exit status, output)."""
    monkeypatch.setattr(doctor, "_run", lambda cmd, timeout=10: answers.get(" ".join(cmd), (1, "unexpected")))


def _context(*overrides: str) -> doctor.Context:
    _, configurations = doctor.sweep.expand(list(overrides))
    return doctor.Context(doctor.config.load_many(configurations))


def test_gpu_stage_on_partition_without_gpus_fails(monkeypatch):
    _fake_slurm(
        monkeypatch,
        {
            "sinfo -h -o %P": (0, "cpu*\ngpu\n"),
            "sinfo -h -p cpu -o %G": (0, "(null)\n"),
            "sinfo -h -p gpu -o %G": (0, "gpu:a100:4(S:0-1)\n"),
        },
    )
    status, seen, fix = doctor.check_gpus(_context("resources.pretrain.partition=cpu", "resources.pretrain.gpus=1"))
    assert status == "FAIL" and "pretrain" in seen and "'cpu' has no GPU GRES" in seen
    assert "resources.<stage>.partition for pretrain to one of: gpu" in fix


def test_base_model_must_be_local_or_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert doctor.check_base_model(_context())[0] == "OK"  # this pipeline's own model
    assert doctor.check_base_model(_context(f"finetune.base={tmp_path}"))[0] == "OK"
    status, seen, fix = doctor.check_base_model(_context("finetune.base=HuggingFaceTB/SmolLM2-135M"))
    assert status == "FAIL" and "SmolLM2-135M" in seen and "hf download HuggingFaceTB/SmolLM2-135M" in fix


def test_a_sweep_checks_every_configurations_gpus_and_base_model(monkeypatch, tmp_path):
    _fake_slurm(
        monkeypatch,
        {
            "sinfo -h -o %P": (0, "cpu*\ngpu\n"),
            "sinfo -h -p cpu -o %G": (0, "(null)\n"),
            "sinfo -h -p gpu -o %G": (0, "gpu:a100:4(S:0-1)\n"),
        },
    )
    swept = _context("resources.finetune.gpus=1", "resources.finetune.partition=gpu,cpu")
    status, seen, fix = doctor.check_gpus(swept)
    assert status == "FAIL" and "'gpu' has GRES" in seen and "'cpu' has no GPU GRES" in seen
    assert "for finetune to one of: gpu" in fix

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    status, seen, _ = doctor.check_base_model(_context(f"finetune.base={tmp_path},org/not-downloaded"))
    assert status == "FAIL" and "org/not-downloaded" in seen
    status, seen, _ = doctor.check_base_model(_context(f"finetune.base=pretrain,{tmp_path}"))
    assert status == "OK" and "pretrained model" in seen and str(tmp_path) in seen


def test_profile_partition_missing_on_cluster_fails(monkeypatch, tmp_path):
    # A profile whose default-resources send stages without a partition to one the cluster does not have.
    profile = tmp_path / "config.yaml"
    profile.write_text("executor: slurm\ndefault-resources:\n  - slurm_partition=cpu\n  - runtime=60\n")
    monkeypatch.setattr(doctor, "PROFILE", profile)
    _fake_slurm(monkeypatch, {"sinfo -h -o %P": (0, "batch*\ngpu\n")})
    status, seen, _ = doctor.check_default_partition(_context())
    assert status == "FAIL" and "'cpu', which does not exist" in seen and "batch, gpu" in seen


@pytest.mark.parametrize(("min_job_age", "status"), [("600 sec", "WARN"), ("5 sec", "FAIL")])
def test_sacct_missing_needs_min_job_age(monkeypatch, min_job_age, status):
    _fake_slurm(
        monkeypatch,
        {
            "sacct -n -X -S now -o JobID": (1, "sacct: error: Slurm accounting storage is disabled"),
            "scontrol show config": (0, f"MaxJobCount = 10000\nMinJobAge = {min_job_age}\n"),
        },
    )
    result = doctor.check_sacct(_context())
    assert result[0] == status and "MinJobAge" in result[2] and "squeue" in result[2]


def test_sqlite_on_network_filesystem_warns(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "fs_type", lambda path: "nfs4")
    status, seen, fix = doctor._check_sqlite(f"sqlite:///{tmp_path}/mlflow.db")
    assert status == "WARN" and "nfs4" in seen and "unsafe" in seen and "mlflow server" in fix
    monkeypatch.setattr(doctor, "fs_type", lambda path: "ext4")
    assert doctor._check_sqlite(f"sqlite:///{tmp_path}/mlflow.db")[0] == "OK"
