#!/bin/bash
# Submits the study's job array, then `report` as a job that starts once every task of the array
# has finished successfully. Options are passed on to `skindiff main` in each task.
set -euo pipefail
here=$(dirname "$0")

# --parsable prints "<job id>" or "<job id>;<cluster>".
array=$(sbatch --parsable "$here/main.sbatch" "$@")
array=${array%%;*}
echo "Submitted batch job $array (skindiff main, a job array)"
sbatch --dependency=afterok:"$array" "$here/report.sbatch"
