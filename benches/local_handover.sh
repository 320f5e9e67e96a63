#!/bin/bash
# Local hand-over vs TCP migration of the same memfd guest, one after the
# other in the same run: engine downtime and total time from the reports.
# Usage: benches/local_handover.sh [RUNS]   (after `cargo build --example refvmm`)
# Environment: MEM (default 4G), CMDLINE (test guest, default "ws=1 rate=1"),
# BOOT (seconds to let the guest run first, default 1), R (the refvmm binary).
# Uses a free-ish TCP port 47111 on 127.0.0.1 and a scratch directory.
set -u
R=${R:-$(dirname "$0")/../target/debug/examples/refvmm}
D=$(mktemp -d /tmp/livemig-localbench.XXXXXX); N=${1:-3}
trap 'rm -rf "$D"' EXIT
for i in $(seq 1 $N); do
 for mode in local tcp; do
  rm -rf $D/*
  $R run --memory ${MEM:-4G} --kernel builtin:testguest --cmdline "${CMDLINE:-ws=1 rate=1}" --api-socket $D/a.sock --memory-backend memfd --serial none 2>$D/a.err &
  A=$!
  for t in $(seq 100); do [ -S $D/a.sock ] && break; sleep 0.05; done
  sleep ${BOOT:-1}
  if [ $mode = local ]; then
    $R receive --listen unix:$D/h.sock --api-socket $D/b.sock --serial none 2>$D/b.err & B=$!
    for t in $(seq 100); do [ -S $D/h.sock ] && break; sleep 0.05; done
    $R migrate --api-socket $D/a.sock --local --to unix:$D/h.sock >$D/rep.json 2>$D/m.err
  else
    $R receive --listen tcp:127.0.0.1:47111 --api-socket $D/b.sock --serial none --memory-backend memfd 2>$D/b.err & B=$!
    sleep 0.5
    $R migrate --api-socket $D/a.sock --to tcp:127.0.0.1:47111 >$D/rep.json 2>$D/m.err
  fi
  python3 -c "
import json;r=json.load(open('$D/rep.json'))
print('$mode run $i: downtime %.3f ms total %.1f ms setup %.1f ms pages_sent %d bytes_sent %d' % (r['downtime_ms'], r['total_ms'], r['setup_ms'], r['pages_sent'], r['bytes_sent']))"
  sleep 0.3
  python3 -c "
import socket
s=socket.socket(socket.AF_UNIX);s.connect('$D/b.sock');s.sendall(b'{\"cmd\":\"quit\"}\n');s.recv(100)"
  wait $A $B 2>/dev/null
 done
done
