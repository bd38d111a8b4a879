#!/usr/bin/env bash
# One promptdg run submitted by hand (no submitit): sbatch scripts/sbatch_example.sh [overrides ...]
#   sbatch scripts/sbatch_example.sh method=dapt dataset=dtd backbone=vit_b16 shots=16 seed=1
# For sweeps, let Hydra submit a job array instead:
#   promptdg train -m hydra/launcher=slurm resources=gpu1 hydra.launcher.partition=<partition> ...
#
# Time limit and preemption: 120 s before the limit Slurm sends SIGUSR1 to this batch shell
# ("B:"; without it the signal would go to promptdg, whose default action on USR1 is to die). The
# trap requeues the job; Slurm stops the run and later starts this script again from the top, and
# the same command finds its run directory (named by the config's hash): held-out domains that
# finished are read back, the one in progress resumes from its last epoch checkpoint, and a run
# that finished meanwhile is skipped. The lock of the killed process is taken over (dead process
# or other node).
#SBATCH --job-name=promptdg
#SBATCH --partition=gpu
##SBATCH --account=<project>
##SBATCH --qos=<qos>
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# The environment: adapt to the cluster (modules, the venv, shared caches, offline weights).
# module load cuda/12.4
# source /path/to/promptdg/.venv/bin/activate
export PROMPTDG_DATA="${PROMPTDG_DATA:-$HOME/data}"          # <data>/<folder>/<domain>/<class>/<img>
export PROMPTDG_CACHE="${PROMPTDG_CACHE:-$HOME/.cache/promptdg}"  # features: shared by all jobs
export PROMPTDG_OUT="${PROMPTDG_OUT:-$PWD/outputs}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"                 # compute nodes often have no internet

requeue() {
  echo "[sbatch] SIGUSR1 (time limit or preemption) on job ${SLURM_JOB_ID}: requeueing"
  scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR1

echo "[sbatch] job ${SLURM_JOB_ID:-?} on $(hostname), restart count ${SLURM_RESTART_COUNT:-0}"
# srun in the background and `wait`: bash runs a trap only between commands, and `wait` returns
# as soon as the signal arrives.
srun promptdg train "$@" &
wait $!
