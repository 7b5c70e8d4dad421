#!/usr/bin/env bash
# The README's Slurm launch recipe on the single-node Slurm of setup.sh, 2 CPU ranks, 2 epochs of
# experiments/digits.yaml. Three forms, each timed and checked for "fastnet-train: best top-1":
#   torchrun: srun starts one torchrun per node, torchrun starts the 2 ranks (c10d rendezvous on the
#             allocation's first node), as in the README;
#   srun:     srun itself starts the 2 ranks (plain `srun --ntasks=2 python -m fastnet.train`);
#   sbatch:   benchmarks/slurm/recipe.sbatch (the torchrun form) submitted with sbatch --wait.
# Usage (repo root, Slurm up): benchmarks/slurm/run_recipe.sh [torchrun] [srun] [sbatch]  (all by default)
# Everything trains at nice 15: srun runs niced and slurm.conf has PropagatePrioProcess=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-$PWD/.venv}
export OMP_NUM_THREADS=1 PATH="$VENV/bin:$PATH"
ARGS="--config experiments/digits.yaml --epochs 2 --progress log --overwrite"
mkdir -p runs

run() {                                  # run NAME CMD...: time it, keep its log, check the summary line
  local name=$1 log=runs/slurm_recipe_$1.log t0; shift
  echo "== $name: $*"
  t0=$(date +%s.%N)
  "$@" > "$log" 2>&1 || { rc=$?; tail -n 30 "$log"; echo "run_recipe.sh: $name FAILED (exit $rc), log $log" >&2; exit 1; }
  printf '== %s: wall %.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"
  grep 'fastnet-train: best top-1' "$log" || { echo "run_recipe.sh: $name: no 'best top-1' line in $log" >&2; exit 1; }
}

sbatch_wait() {                          # submit, wait for the job's end, then show its output file
  local id rc=0; id=$(nice -n 15 sbatch --parsable --wait --output="runs/slurm_recipe_sbatch.%j.out" "$@") || rc=$?
  # sbatch --wait polls the controller with growing sleeps, so it returns up to ~30 s after the job ends
  echo "job ${id:-?}: $(scontrol show job "${id:-0}" 2>&1 | grep -oE '(JobState|RunTime|StartTime|EndTime)=\S+' | xargs)"
  cat "runs/slurm_recipe_sbatch.${id:-none}.out"; return "$rc"
}

forms=("$@"); [[ $# -gt 0 ]] || forms=(torchrun srun sbatch)
for f in "${forms[@]}"; do case $f in
  torchrun) run torchrun nice -n 15 srun --nodes=1 --ntasks-per-node=1 bash -c \
    "$VENV/bin/torchrun --nnodes=1 --nproc_per_node=2 --rdzv-backend=c10d \
     --rdzv-endpoint=\$(scontrol show hostnames \$SLURM_JOB_NODELIST | head -n1):29500 \
     -m fastnet.train $ARGS --out-dir runs/slurm_recipe" ;;
  # plain srun: fastnet reads the step's SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and meets at
  # the allocation's first node (scontrol), port 20000 + job id mod 20000 (fastnet/distributed.py)
  srun) run srun nice -n 15 srun --nodes=1 --ntasks=2 $VENV/bin/python -m fastnet.train $ARGS \
     --out-dir runs/slurm_recipe_srun ;;
  sbatch) run sbatch sbatch_wait benchmarks/slurm/recipe.sbatch ;;
  *) echo "run_recipe.sh: unknown form '$f' (torchrun, srun, sbatch)" >&2; exit 2 ;;
esac; done
