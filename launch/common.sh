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

# The smf-ds rank processes among the descendants of PID ("-m smf_ds.cli" in their command line;
# deepspeed's own launcher processes name it "--module smf_ds.cli").
rank_pids() {
  local parents=$1 pids="" children
  while [[ -n $parents ]]; do
    children=$(ps -o pid= --ppid "$(echo $parents | tr ' ' ,)" 2>/dev/null | tr -s ' \n' ' ')
    pids="$pids $children"
    parents=${children# }
    parents=${parents% }
  done
  for pid in $pids; do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-m smf_ds.cli" && echo "$pid"
  done
  return 0
}

# Run "$@" in the background, send the stop signals this script gets to PIDs that forward_to
# prints (a function taking the child's PID and the signal), and exit with the child's status.
run_forwarding_signals() {
  "$@" &
  child=$!
  for sig in TERM USR1; do   # the default cluster.stop_signals: others are the ranks' own business
    # shellcheck disable=SC2064
    trap "echo \"$0: SIG$sig: asking the ranks to stop after their current step\" >&2; forward_to $child $sig" "$sig"
  done
  while :; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break   # wait returned for a trapped signal: the child runs on
  done
  exit "$status"
}
