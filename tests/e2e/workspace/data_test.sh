#!/bin/bash
# Runs with cwd = runfiles root of the main repository.
set -eu
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(cat data.txt)" = "hearth data file" ] || fail "data.txt: $(cat data.txt)"
expected='hearth input line 1
hearth input line 2
stage-a
stage-b
2'
[ "$(cat b.txt)" = "$expected" ] || fail "b.txt: $(cat b.txt)"
echo "data_test OK"
