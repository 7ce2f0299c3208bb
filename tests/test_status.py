"""`lmforge status`: a result from older code is named, with the command that reruns it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lmforge import cli
from tests.stages import curated_and_tokenized, plan


def test_a_stage_run_on_older_code_is_named_with_the_command_that_reruns_it(tmp_path, capsys):
    overrides = [f"run.results_dir={tmp_path / 'results'}", *curated_and_tokenized(tmp_path)]
    stages = plan(tmp_path / "results", overrides[1:])
    ran = json.loads((Path(stages["tokenizer"].dir) / "manifest.json").read_text())["code"]["files"]
    assert {"tokenizer.py", "stage.py", "schema.py"} <= set(ran)  # the stage's own module, run as __main__, too

    assert cli.main(["status", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"tokenizer     {stages['tokenizer'].key}  current" in lines
    assert f"pretrain      {stages['pretrain'].key}  not run" in lines
    assert not any("--forcerun" in line for line in lines)

    # What a change to tokenizer.py since the run looks like: the hash the manifest recorded differs.
    manifest_path = Path(stages["tokenizer"].dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["code"]["files"]["tokenizer.py"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    assert cli.main(["status", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer     {stages['tokenizer'].key}  older code (tokenizer.py changed since)" in out
    command = next(line for line in out.splitlines() if "--forcerun" in line).split()
    assert command[:2] == ["lmforge", "run"] and command[command.index("--forcerun") + 1 :] == [
        stages["tokenizer"].dir
    ]
    assert [shlex.quote(word) for word in overrides] == command[2 : command.index("--")]
