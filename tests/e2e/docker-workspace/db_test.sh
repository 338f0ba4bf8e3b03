#!/bin/bash
# A database server container outlives the test: the first run starts it
# ($DB_IMAGE, whose /usr/local/bin/db-server serves /data over HTTP on 8080),
# later runs on the recycled VM find it with `docker container inspect`,
# reset its state and use it.
set -eu
if [ "$(docker container inspect -f '{{.State.Running}}' db 2>/dev/null)" = true ]; then
  echo "db: reused"
  docker exec db sh -c 'rm -f /data/*'
else
  echo "db: started"
  docker run -d --name db "$DB_IMAGE" /usr/local/bin/db-server >/dev/null
fi
docker exec db sh -c "ls /data | wc -l" | grep -qx 0 || { echo "db not reset"; exit 1; }
docker exec db sh -c "echo row-$RUN_ID > /data/rows"
got=
for _ in $(seq 100); do
  got=$(docker exec db wget -qO- http://127.0.0.1:8080/rows 2>/dev/null) && break
  sleep 0.2
done
[ "$got" = "row-$RUN_ID" ] || { echo "db answered '$got'"; exit 1; }
echo "db answered: $got"
