#!/bin/bash
# Runs with cwd = runfiles root of the main repository.
set -eu
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(./hello)" = "hello from hearth test" ] || fail "hello printed: $(./hello)"
[ "$(cat hello_out.txt)" = "hello from hearth genrule" ] || fail "hello_out.txt: $(cat hello_out.txt)"
echo "hello_test OK"
