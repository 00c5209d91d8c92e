# Shared by the launch scripts (sourced): check NPROC and find the repository's interpreter.
# After `source common.sh "$@"`: $nproc, $here (the repository), $venv_bin, and "$@" minus NPROC
# is left to the caller, which shifts it off.
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC {retrofit|train|background|eval|experiment} [smf-ds arguments...]" >&2
  exit 2
fi
nproc=$1
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NPROC: expected a positive number of processes, got '$nproc'" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv_bin=$here/.venv/bin
# DeepSpeed's accelerator: the machine's (cuda when torch sees a GPU, else cpu) unless set.
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$here/launch/accelerator.sh" "$venv_bin/python")}
