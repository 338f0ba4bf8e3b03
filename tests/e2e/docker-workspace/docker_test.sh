#!/bin/bash
# The seed's test is the `docker run` line. The lines around it print what a
# recycled VM keeps between runs (image cache, dockerd, files), which the
# end-to-end test reads from the test log.
cached=absent
docker image inspect ubuntu:20.04 >/dev/null 2>&1 && cached=present
echo "image-before: $cached"
echo "dockerd-started: $(stat -c %Y /var/run/docker.pid)"
runs=$(cat /var/tmp/hearth-runs 2>/dev/null || echo 0)
echo "runs-before: $runs"
docker run --rm ubuntu:20.04 echo 'PASS' || exit 1
echo $((runs + 1)) > /var/tmp/hearth-runs
