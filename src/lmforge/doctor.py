"""`lmforge doctor [overrides...]`: a preflight to run on the cluster login node before submitting.

It composes the config exactly as the Snakefile does (same Hydra overrides; a sweep gives every
configuration, and each one's resources and fine-tuning base are checked), then checks
what a Slurm run of that config needs: the Slurm client commands, the partitions and GPUs
the config asks for, how job status will be polled, the results directory, internet access
for the Hub, and the MLflow store.  Each check prints one line, ``[ OK ]``, ``[WARN]`` or
``[FAIL]`` with what it saw, and for WARN/FAIL an indented ``fix:`` line.  Exit status: 2 for
a config error, 1 if any check failed, else 0.

The only network traffic is one TCP connect to huggingface.co:443 (3 s) and, when the
MLflow URI is http(s), a GET of its /health endpoint.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lmforge import config, ops, plan, schema, sweep
from lmforge.tracking import tracking_uri
from lmforge.workflow import slurm_resources

OK, WARN, FAIL = "OK", "WARN", "FAIL"
Result = tuple[str, str, str | None]  # (status, what was seen, how to fix it)

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "slurm" / "config.yaml"
PLUGIN_INIT_SECONDS = 40  # snakemake-executor-plugin-slurm's default slurm-init-seconds-before-status-checks
HUB = ("huggingface.co", 443)
CONNECT_TIMEOUT = 3.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
SHARED_FS = ("nfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "cifs", "smb", "panfs", "wekafs")
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "ramfs", "overlay", "f2fs", "vfat", "squashfs")


# --- pure helpers (unit-tested) --------------------------------------------------------------


def parse_partitions(text: str) -> tuple[list[str], str | None]:
    """`sinfo -h -o %P` output -> (partitions in order, without duplicates; the default one or None)."""
    names: list[str] = []
    default = None
    for line in text.split():
        name = line.strip().rstrip("*")
        if line.strip().endswith("*"):
            default = name
        if name and name not in names:
            names.append(name)
    return names, default


def has_gpu_gres(text: str) -> bool:
    """Whether `sinfo -o %G` output lists a GRES named gpu, e.g. gpu:2, gpu:a100:4(S:0-1), shard:8,gpu:1."""
    return any(re.search(r"(^|,)gpu(:|\(|,|$)", line.strip()) for line in text.splitlines())


def classify_fs(fstype: str) -> str:
    """ "shared", "local" or "unknown" for a filesystem type from /proc/mounts or `stat -f -c %T`."""
    kind = fstype.strip().lower().removeprefix("fuse.")
    if kind.startswith(SHARED_FS):
        return "shared"
    if kind.startswith(LOCAL_FS) or kind == "overlayfs":  # stat -f says ext2/ext3 for ext4
        return "local"
    return "unknown"


def fs_type_from_mounts(path: str, mounts: str) -> str | None:
    """The type of the filesystem holding absolute `path`: the longest mount point above it in /proc/mounts."""
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def parse_min_job_age(text: str) -> int | None:
    """MinJobAge in seconds from `scontrol show config` output (`MinJobAge = 300 sec`)."""
    match = re.search(r"^\s*MinJobAge\s*=\s*(\d+)\s*([a-zA-Z]*)", text, re.MULTILINE)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2).lower()
    return value * 3600 if unit in ("h", "hour", "hours") else value


def effective_partition(stage_partition: str | None, profile_partition: str | None, default: str | None):
    """Where a stage's jobs go: its own partition, else the profile's default-resources, else the cluster's."""
    return stage_partition or profile_partition or default


# --- environment probes ----------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 10) -> tuple[int, str]:
    """(exit status, stdout or the last line of stderr); 127 if the command is missing."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd)}: no answer within {timeout:g} s"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return proc.returncode, lines[-1] if lines else f"exit status {proc.returncode}"
    return 0, proc.stdout


def fs_type(path: Path) -> str:
    """Filesystem type of an existing path: /proc/mounts (names beegfs, ext4...), else `stat -f -c %T`."""
    real = os.path.realpath(path)
    try:
        found = fs_type_from_mounts(real, Path("/proc/mounts").read_text())
    except OSError:
        found = None
    if found:
        return found
    status, out = _run(["stat", "-f", "-c", "%T", real])
    return out.strip() if status == 0 else "unknown"


def write_probe(directory: Path) -> str | None:
    """Create `directory`, write, fsync and delete a file in it; None if that worked, else the error."""
    probe = directory / f".lmforge-doctor-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"lmforge doctor\n")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def tcp_connect(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection opens within `timeout` seconds (DNS included), else why not."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=attempt, daemon=True)  # bounds a hanging DNS lookup too
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _profile() -> dict:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(PROFILE))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def profile_resources() -> dict[str, str]:
    """profiles/slurm's default-resources: what every job asks for unless its stage says otherwise."""
    resources = {}
    for item in _profile().get("default-resources") or []:
        key, _, value = str(item).partition("=")
        resources[key.strip()] = value.strip().strip("'\"")
    return resources


def profile_partition() -> str | None:
    """The slurm_partition in profiles/slurm's default-resources: where stages without a partition go."""
    return profile_resources().get("slurm_partition") or None


# --- the checks ------------------------------------------------------------------------------


@dataclass
class Context:
    cfgs: list[DictConfig]  # one per configuration of a sweep; run.* settings are read from the first
    _sinfo: tuple | None = field(default=None, repr=False)

    @property
    def cfg(self) -> DictConfig:
        return self.cfgs[0]

    def stages(self) -> list[tuple[str, schema.StageResources]]:
        """Each stage's resources in every configuration, each distinct request once."""
        pairs = [(stage, plan.resources(cfg, stage)) for cfg in self.cfgs for stage in plan.STAGES]
        return [pair for i, pair in enumerate(pairs) if pair not in pairs[:i]]

    def partitions(self) -> tuple[list[str], str | None, str | None]:
        """(partitions, cluster default, error): `sinfo -h -o %P`, asked once."""
        if self._sinfo is None:
            status, out = _run(["sinfo", "-h", "-o", "%P"])
            self._sinfo = (*parse_partitions(out), None) if status == 0 else ([], None, out.strip())
        return self._sinfo

    def results_dir(self) -> Path:
        return Path(self.cfg.run.results_dir).resolve()


def check_commands(ctx: Context) -> Result:
    missing = [cmd for cmd in ("sbatch", "sinfo", "squeue") if shutil.which(cmd) is None]
    if missing:
        return FAIL, f"not on PATH: {', '.join(missing)}", "run on the cluster login node, or `module load slurm`"
    return OK, f"sbatch, sinfo, squeue in {Path(shutil.which('sbatch')).parent}", None


def _no_sinfo(error: str) -> Result:
    return FAIL, f"cannot list partitions: {error}", "run on the login node; `scontrol ping` must reach slurmctld"


def check_partitions(ctx: Context) -> Result:
    existing, _, error = ctx.partitions()
    if error:
        return _no_sinfo(error)
    named = list(dict.fromkeys((stage, res.partition) for stage, res in ctx.stages() if res.partition))
    if not named:
        return OK, f"no stage names a partition; cluster has: {', '.join(existing)}", None
    bad = [(stage, part) for stage, part in named if part not in existing]
    if not bad:
        used = sorted({part for _, part in named})
        return OK, f"named partitions exist: {', '.join(used)} (cluster has: {', '.join(existing)})", None
    seen = "; ".join(f"partition '{part}' of stage '{stage}' does not exist" for stage, part in bad)
    fixes = []
    for stage, part in bad:
        close = difflib.get_close_matches(part, existing, n=1)
        fixes.append(f"resources.{stage}.partition={close[0] if close else '<one of the above>'}")
    return FAIL, f"{seen}; cluster has: {', '.join(existing)}", f"set {' '.join(fixes)}"


def check_default_partition(ctx: Context) -> Result:
    existing, default, error = ctx.partitions()
    if error:
        return WARN, "not checked: cannot list partitions", "see the partitions check"
    unset = list(dict.fromkeys(stage for stage, res in ctx.stages() if not res.partition))
    if not unset:
        return OK, "every stage names its partition", None
    profile = profile_partition()
    who = ", ".join(unset)
    if profile and profile not in existing:
        return (
            FAIL,
            f"{who} name no partition; profiles/slurm sends them to '{profile}', which does not exist "
            f"(cluster has: {', '.join(existing)})",
            f"change slurm_partition in {PROFILE} default-resources, or set resources.<stage>.partition",
        )
    if profile:
        return (
            OK,
            f"{who} name no partition: profiles/slurm sends them to '{profile}' (cluster default: {default})",
            None,
        )
    if default is None:
        return FAIL, f"{who} name no partition and the cluster has no default", "set resources.<stage>.partition"
    return OK, f"{who} name no partition: they use the cluster default '{default}'", None


def _gres(partition: str) -> str:
    status, out = _run(["sinfo", "-h", "-p", partition, "-o", "%G"])
    return out.strip() if status == 0 else ""


def check_gpus(ctx: Context) -> Result:
    existing, default, error = ctx.partitions()
    wanted = [(stage, res) for stage, res in ctx.stages() if res.gpus > 0]
    if not wanted:
        return OK, "no stage asks for GPUs", None
    if error:
        return WARN, "not checked: cannot list partitions", "see the partitions check"
    seen, missing = [], []
    for stage, res in wanted:
        part = effective_partition(res.partition, profile_partition(), default)
        if part not in existing:
            seen.append(f"{stage}: partition '{part}' does not exist")
            continue
        gres = _gres(part)
        if has_gpu_gres(gres):
            seen.append(f"{stage} ({res.gpus} GPU) -> '{part}' has GRES {' '.join(gres.split())}")
        else:
            if stage not in missing:
                missing.append(stage)
            seen.append(f"{stage} ({res.gpus} GPU) -> '{part}' has no GPU GRES ({gres or 'none'})")
    if missing:
        with_gpus = [part for part in existing if has_gpu_gres(_gres(part))]
        hint = f"one of: {', '.join(with_gpus)}" if with_gpus else "a GPU partition (this cluster lists none)"
        return FAIL, "; ".join(seen), f"set resources.<stage>.partition for {', '.join(missing)} to {hint}"
    return OK, "; ".join(seen), None


def _status_check_seconds() -> int:
    value = _profile().get("slurm-init-seconds-before-status-checks", PLUGIN_INIT_SECONDS)
    return int(value) if str(value).isdigit() else PLUGIN_INIT_SECONDS


def check_sacct(ctx: Context) -> Result:
    status, out = _run(["sacct", "-n", "-X", "-S", "now", "-o", "JobID"])
    if status == 0:
        return OK, "sacct answers (job accounting available)", None
    code, text = _run(["scontrol", "show", "config"])
    age = parse_min_job_age(text) if code == 0 else None
    delay = _status_check_seconds()
    shown = f"{age}s" if age is not None else f"unknown ({text.strip()})" if code else "unknown"
    seen = f"sacct fails ({out.strip()}); MinJobAge={shown}, status-check delay {delay}s"
    fix = (
        f"without accounting set `slurm-status-command: squeue` in {PROFILE}; it needs MinJobAge >= 3x the "
        "status-check delay (slurm-init-seconds-before-status-checks); `scontrol show config | grep MinJobAge`"
    )
    if age is None or age < 3 * delay:  # the plugin then falls back to the failing sacct and never sees jobs end
        return FAIL, seen, fix
    return WARN, seen, fix


def check_results_dir(ctx: Context) -> Result:
    path = ctx.results_dir()
    error = write_probe(path)
    if error:
        return FAIL, f"{path}: {error}", "set run.results_dir to a writable directory on a shared filesystem"
    return OK, f"{path} is writable (write+fsync+delete)", None


def check_results_fs(ctx: Context) -> Result:
    path = ctx.results_dir()
    if not path.exists():
        return WARN, f"not checked: {path} does not exist", "see the results dir check"
    kind = fs_type(path)
    verdict = classify_fs(kind)
    if verdict == "shared":
        return OK, f"{path} is on {kind} (shared)", None
    fix = "set run.results_dir to a directory on the cluster's shared filesystem (e.g. under $HOME or /scratch)"
    if verdict == "local":
        return WARN, f"{path} is on {kind} (local): compute nodes on other machines will not see it", fix
    return WARN, f"{path} is on {kind} (unknown type): make sure compute nodes see it", fix


def check_internet(ctx: Context) -> Result:
    env = ", ".join(f"{name}={os.environ.get(name, '<unset>')}" for name in OFFLINE_ENV)
    error = tcp_connect(*HUB, CONNECT_TIMEOUT)
    if error is None:
        return OK, f"{HUB[0]}:{HUB[1]} reachable from this node ({env})", None
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    via = f"; HTTPS_PROXY={proxy} is set (not tried)" if proxy else ""
    todo = " ".join(f"{name}={value}" for name, value in OFFLINE_ENV.items() if os.environ.get(name) != value)
    fix = (
        f"{'export ' + todo + ' and ' if todo else ''}pre-download models/datasets to the shared HF cache "
        "(HF_HOME) on a login node that has internet; compute nodes often have none"
    )
    return WARN, f"{HUB[0]}:{HUB[1]} unreachable from this node ({error}){via}; {env}", fix


def check_base_model(ctx: Context) -> Result:
    """Every `finetune.base` of the sweep; the first that fails, else all that pass."""
    results = [_check_one_base_model(base) for base in dict.fromkeys(cfg.finetune.base for cfg in ctx.cfgs)]
    failed = [result for result in results if result[0] != OK]
    return failed[0] if failed else (OK, "; ".join(seen for _, seen, _ in results), None)


def _check_one_base_model(base: str) -> Result:
    """A Hub model named as `finetune.base` must already be in the local cache: compute nodes may be offline."""
    if base == "pretrain":
        return OK, "fine-tuning starts from this pipeline's pretrained model", None
    if Path(base).is_dir():
        return OK, f"fine-tuning starts from the local model {base}", None
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(base, local_files_only=True)
    except Exception as err:  # noqa: BLE001 (any failure means: not usable offline)
        fix = f"on a login node with internet: `hf download {base}` with HF_HOME on the shared filesystem"
        return FAIL, f"finetune.base={base} is neither a local directory nor in the Hugging Face cache ({err})", fix
    return OK, f"finetune.base={base} cached at {path}", None


def check_data(ctx: Context) -> Result:
    """Where curation reads each configuration's data.source (a missing one is already a config error)."""
    from lmforge import sources

    seen = []
    for source in dict.fromkeys(cfg.data.source for cfg in ctx.cfgs):
        path = Path(source).expanduser()
        if source == "stdlib":
            seen.append("data.source=stdlib: this interpreter's standard library")
        elif path.exists():
            seen.append(f"data.source={source}: local {'directory' if path.is_dir() else 'file'} {path.resolve()}")
        else:
            cached = sources.cached_hub_dataset(source)
            if cached is None:  # the config check passed: the cache moved since (HF_HOME differs here)
                return FAIL, f"data.source={source} is not in the HF cache", "download it into the HF cache first"
            seen.append(f"data.source={source}: Hub dataset cached at {cached}")
    return OK, "; ".join(seen), None


def _check_sqlite(uri: str) -> Result:
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    error = write_probe(db.parent)
    if error:
        return FAIL, f"{uri}: {db.parent} not writable ({error})", "set run.mlflow_uri or MLFLOW_TRACKING_URI"
    kind = fs_type(db.parent)
    if classify_fs(kind) == "shared":
        return (
            WARN,
            f"{uri} is on {kind}: SQLite over a network filesystem is unsafe where its locks are not honoured "
            "(only the local `history` rule writes it, but two Snakemake runs on different login nodes would)",
            "run `mlflow server --backend-store-uri sqlite:////<local disk>/mlflow.db --host 0.0.0.0 --port 5000` "
            "on the login node and set run.mlflow_uri=http://<login node>:5000 (or MLFLOW_TRACKING_URI)",
        )
    return OK, f"{uri} (directory writable, {kind})", None


def _check_http(uri: str) -> Result:
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (the user's own MLflow URI)
            return OK, f"{url} answered {response.status}", None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return FAIL, f"{url}: {err}", "start the MLflow server, or fix run.mlflow_uri / MLFLOW_TRACKING_URI"


def check_mlflow(ctx: Context) -> Result:
    uri = tracking_uri(OmegaConf.to_container(ctx.cfg.run, resolve=True))
    if uri.startswith("sqlite:///"):
        return _check_sqlite(uri)
    if uri.startswith(("http://", "https://")):
        return _check_http(uri)
    return WARN, f"{uri}: this store type is not checked", "make sure compute nodes can reach and write it"


def sbatch_options(resources: dict) -> list[str]:
    """The sbatch options of one job's resources (workflow.slurm_resources), as the Slurm plugin submits them."""
    flags = {
        "slurm_partition": "--partition",
        "slurm_account": "--account",
        "qos": "--qos",
        "constraint": "--constraint",
        "runtime": "--time",
        "mem_mb": "--mem",
        "cpus_per_task": "--cpus-per-task",
        "nodes": "--nodes",
        "tasks": "--ntasks",
        "tasks_per_gpu": "--ntasks-per-gpu",
    }
    options = [f"{flag}={resources[key]}" for key, flag in flags.items() if key in resources]
    if resources.get("gpu"):
        model = f"{resources['gpu_model']}:" if resources.get("gpu_model") else ""
        options.append(f"--gpus={model}{resources['gpu']}")
    return options + resources.get("slurm_extra", "").split()


def check_submission(ctx: Context) -> Result:
    """`sbatch --test-only` for each distinct request of the planned jobs: what the cluster would refuse."""
    if shutil.which("sbatch") is None:
        return WARN, "not checked: no sbatch", "see the slurm commands check"
    requests: dict[tuple, list[str]] = {}
    for cfg in ctx.cfgs:
        for stage in plan.stages(cfg).values():
            options = tuple(sbatch_options({**profile_resources(), **slurm_resources(stage)}))
            requests.setdefault(options, []).append(stage.name)
    refused = []
    for options, names in requests.items():
        status, out = _run(["sbatch", "--test-only", *options, "--wrap", "true"])
        if status != 0:
            refused.append(f"{', '.join(dict.fromkeys(names))} ({' '.join(options)}): {out.strip()}")
    if refused:
        return FAIL, "; ".join(refused), "change resources.<stage>.* (conf/resources/default.yaml or overrides)"
    return OK, f"sbatch --test-only accepts all {len(requests)} distinct job requests", None


def check_deepspeed_ops(ctx: Context) -> Result:
    directory = ops.extensions_dir()
    stale = ops.describe_locks(directory)
    if stale:
        return FAIL, "; ".join(stale), "delete the lock file once no build runs, then `python -m lmforge.ops`"
    built = sorted(path.parent.name for path in directory.glob("*/*.so"))
    if not built:
        return WARN, f"no DeepSpeed op built in {directory}", "run `python -m lmforge.ops` (env/setup.sh does)"
    return OK, f"built in {directory}: {', '.join(built)}", None


CHECKS: list[tuple[str, Callable[[Context], Result]]] = [
    ("slurm commands", check_commands),
    ("partitions", check_partitions),
    ("default partition", check_default_partition),
    ("gpu partitions", check_gpus),
    ("job status (sacct)", check_sacct),
    ("job requests", check_submission),
    ("deepspeed ops", check_deepspeed_ops),
    ("results dir", check_results_dir),
    ("results filesystem", check_results_fs),
    ("internet", check_internet),
    ("data source", check_data),
    ("fine-tuning base", check_base_model),
    ("mlflow store", check_mlflow),
]


# --- running ---------------------------------------------------------------------------------


def run_checks(ctx: Context) -> list[tuple[str, Result]]:
    results = []
    for name, check in CHECKS:
        try:
            result = check(ctx)
        except Exception as err:  # a broken check must not hide the others
            result = (FAIL, f"check crashed: {type(err).__name__}: {err}", "report this as an lmforge bug")
        results.append((name, result))
        print(format_result(name, result), flush=True)
    return results


def format_result(name: str, result: Result) -> str:
    status, seen, fix = result
    line = f"[{status.center(4)}] {name:<19} {seen}"
    return f"{line}\n       fix: {fix}" if fix and status != OK else line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. train.lr=1e-3")


def main(args: argparse.Namespace) -> int:
    try:
        _, configurations = sweep.expand(args.overrides)  # a sweep: every configuration's resources and base
        cfgs = config.load_many(configurations)
    except (config.ConfigError, HydraException) as err:
        print(f"lmforge doctor: config error: {err}", file=sys.stderr)
        return 2
    count = f" ({len(cfgs)} configurations)" if len(cfgs) > 1 else ""
    print(f"lmforge doctor: {' '.join(args.overrides) or '(default config)'}{count}")
    results = run_checks(Context(cfgs))
    counts = {status: sum(res[0] == status for _, res in results) for status in (OK, WARN, FAIL)}
    print(f"{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return 1 if counts[FAIL] else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="lmforge doctor", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
