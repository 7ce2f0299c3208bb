# One rule per stage of the registry (lmforge.plan.STAGES): `python -m lmforge.<stage> CONFIG OUT` on the
# job's own stage, found by its {key}. A sharded stage (curate_shard: data.shards) is one job per shard, each
# with its own key, and its consumer's input names them all: the fan-out is Snakemake's. The scaling fit has a
# job only in a sweep over model sizes and training lengths; `snakemake --until scaling` runs that ladder and
# the fit only.
for stage_name in lmplan.STAGES:

    rule:
        name:
            stage_name
        input:
            unpack(stage_inputs(stage_name)),
        output:
            # The scaling fit's plot goes into `snakemake --report` (the comparison's plots do, from rule compare).
            (
                report(
                    directory(stage_dir(stage_name)),
                    patterns=["loss_vs_compute.png"],
                    caption="../report/scaling.rst",
                    category="Scaling",
                )
                if stage_name == "scaling"
                else directory(stage_dir(stage_name))
            ),
        params:
            **stage_params(stage_name),
        log:
            stage_log(stage_name),
        conda:
            "../../env/environment.yml"
        threads: stage_threads(stage_name)
        resources:
            **stage_resources(stage_name),
        wildcard_constraints:
            key=KEY,
        shell:
            stage_command()
