#!/bin/bash
# Passes only inside a Hearth microVM: our agent is PID 1, the hostname is
# the VM's, and the kernel is the Debian cloud kernel (the host's is not).
set -eu
comm=$(cat /proc/1/comm)
[ "$comm" = init ] || { echo "PID 1 is $comm, not hearth's agent"; exit 1; }
[ "$(hostname)" = hearth-vm ] || { echo "hostname $(hostname)"; exit 1; }
case "$(uname -r)" in *-cloud-amd64) ;; *) echo "kernel $(uname -r)"; exit 1 ;; esac
grep -q "SPOKEN INSIDE A MICROVM" vm/shout.txt || { echo "genrule output missing"; exit 1; }
echo "PASS in $(uname -r)"
