#!/bin/sh
# Long fuzz run of the PSP firmware (tests/test_fuzz.py), beyond what CI runs.
#
#   scripts/fuzz_long.sh                 # 2000 examples per fuzzer, random seeds
#   HV_FUZZ_EXAMPLES=20000 HV_FUZZ_STEPS=80 scripts/fuzz_long.sh
#   HV_FUZZ_BACKEND=python scripts/fuzz_long.sh -k state_machine
#
# HV_FUZZ_EXAMPLES  examples per fuzzer (CI: 25, derandomized; set => random
#                   seeds and the .hypothesis example database, so a failure
#                   found once is replayed first on the next run)
# HV_FUZZ_STEPS     steps per state-machine example (default 40)
# HV_FUZZ_BACKEND   NPT engine backend: c or python (default: c when built)
# Extra arguments go to pytest. Every integrity mode in
# psp_firmware.INTEGRITY_MODES is fuzzed.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HV_FUZZ_EXAMPLES="${HV_FUZZ_EXAMPLES:-2000}"
export HV_FUZZ_STEPS="${HV_FUZZ_STEPS:-40}"
echo "fuzz: $HV_FUZZ_EXAMPLES examples x $HV_FUZZ_STEPS steps, backend ${HV_FUZZ_BACKEND:-default}" >&2
exec "$PY" -m pytest -q -p no:logging tests/test_fuzz.py --hypothesis-show-statistics "$@"
