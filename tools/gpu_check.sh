#!/usr/bin/env bash
# The GPU checks in one run (tools/gpu_check.py says which): at most 8 minutes, each part with its
# own budget. On a GPU machine without network, carry the wheels this repository's .venv cannot
# download there and name their folder:
#   .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w wheels/    # here, once
#   SMF_WHEELS=wheels tools/gpu_check.sh results/                                      # there
#   tools/gpu_check.sh results/ --dry-run                                              # here: the CPU
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$( [[ -x $here/.venv/bin/python ]] && echo "$here/.venv/bin/python" || echo python3 )}
if [[ -n ${SMF_WHEELS:-} ]]; then
  "$python" -m pip install -q --no-index --no-deps "$SMF_WHEELS"/*.whl
fi
"$python" -c "import deepspeed, smf_ds" 2>/dev/null || {
  echo "$0: deepspeed or smf_ds does not import with $python; build the wheels here and pass SMF_WHEELS (see the header)" >&2
  exit 2
}
exec "$python" "$here/tools/gpu_check.py" "$@"
