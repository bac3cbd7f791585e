#!/usr/bin/env bash
# The embedded default run, recorded: reports/default/{orientation,shape}/ and reports/default_score.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf reports/default
asbound score --out reports/default --no-progress | tee reports/default_score.txt
