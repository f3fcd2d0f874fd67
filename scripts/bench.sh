#!/usr/bin/env bash
# The benchmark of issue 5 (see benches/run.sh --help): `scripts/bench.sh --quick` for a smoke run.
exec "$(dirname "$0")/../benches/run.sh" "$@"
