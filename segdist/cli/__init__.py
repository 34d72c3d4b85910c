"""The command lines: each module parses its arguments and runs its command with the library's
functions; what only the command needs lives here with it (eval: the report folder and the worst
samples; predict: the inputs, the output formats and the files each rank writes). They run
as console scripts (`segdist-train`, `segdist-eval`, `segdist-predict`, `segdist-shard`,
`segdist-bench`), as `launch/<name>.py` (the same, through a shim), or as modules
(`accelerate launch -m segdist.cli.train RECIPE`). User errors become one stderr line and exit
code 2 (segdist.errors.run_cli)."""
